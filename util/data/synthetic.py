"""The built-in dataset: pictures of shapes and textures drawn on the fly.

No files, no download. Sample `i` of a split is a pure function of (seed, split, i), so train and
val are disjoint and every process and every run sees the same images. Foreground and background
colours are random per image, so the class is in the shape or texture, never in the mean colour.

With `in_chans` N other than 3 (--in_chans) a sample is a float32 tensor [N, H, W] in [0, 1]
whose bands each show one pattern in two random grey levels: ONLY THE LAST BAND shows the
sample's class; each other band shows a class drawn at random, independent of the label, so a
model that keeps only some of the first bands (e.g. three) stays at chance.
"""
import numpy as np
from PIL import Image
from torch.utils.data import Dataset

PATTERNS = ("disc", "square", "triangle", "ring", "cross",
            "hstripes", "vstripes", "checker", "dstripes", "dots")
_SPLIT_ID = {"train": 1, "val": 2}


def _render(pattern, size, rng):
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    cy, cx = rng.uniform(0.35, 0.65, size=2)
    r = rng.uniform(0.2, 0.32)
    period = rng.uniform(0.12, 0.25)
    phase = rng.uniform(0, 1)
    dy, dx = yy - cy, xx - cx
    if pattern == "disc":
        m = dy ** 2 + dx ** 2 < r ** 2
    elif pattern == "square":
        m = (np.abs(dy) < r * 0.85) & (np.abs(dx) < r * 0.85)
    elif pattern == "triangle":
        m = (dy < r * 0.7) & (dy > -r) & (np.abs(dx) < (dy + r) * 0.6)
    elif pattern == "ring":
        d = np.sqrt(dy ** 2 + dx ** 2)
        m = (d < r) & (d > r * 0.55)
    elif pattern == "cross":
        w = r * 0.3
        m = ((np.abs(dy) < w) & (np.abs(dx) < r)) | ((np.abs(dx) < w) & (np.abs(dy) < r))
    elif pattern == "hstripes":
        m = ((yy / period + phase) % 1.0) < 0.5
    elif pattern == "vstripes":
        m = ((xx / period + phase) % 1.0) < 0.5
    elif pattern == "checker":
        m = (((yy / period + phase) // 1 + (xx / period) // 1) % 2) < 1
    elif pattern == "dstripes":
        m = (((yy + xx) / period + phase) % 1.0) < 0.5
    else:  # dots
        fy, fx = (yy / period + phase) % 1.0 - 0.5, (xx / period + phase) % 1.0 - 0.5
        m = fy ** 2 + fx ** 2 < 0.09
    return m


class SyntheticShapes(Dataset):
    """`num_samples` RGB images (`in_chans` 3) or [in_chans, H, W] float32 tensors of
    `image_size` px in `num_classes` (<= 10) classes."""

    def __init__(self, split, num_samples, image_size, num_classes=10, seed=0, transform=None, in_chans=3):
        if split not in _SPLIT_ID:
            raise ValueError(f"split must be train or val, not {split!r}")
        self.in_chans = int(in_chans)
        self.split, self.n, self.size = split, int(num_samples), int(image_size)
        self.num_classes, self.seed, self.transform = int(num_classes), int(seed), transform
        self.classes = list(PATTERNS[: self.num_classes])

    def __len__(self):
        return self.n

    def label(self, index):
        return index % self.num_classes

    def image(self, index):
        rng = np.random.default_rng([self.seed, _SPLIT_ID[self.split], index])
        if self.in_chans != 3:
            return self._bands(index, rng)
        mask = _render(PATTERNS[self.label(index)], self.size, rng)
        fg, bg = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
        while np.abs(fg - bg).sum() < 150:  # keep the shape visible
            fg = rng.uniform(0, 255, size=3).astype(np.float32)
        img = np.where(mask[..., None], fg, bg)
        img += rng.normal(0, 12, size=img.shape).astype(np.float32)
        return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")

    def band_classes(self, index):
        """The class each band of sample `index` shows (in_chans other than 3): random ones, then the label."""
        rng = np.random.default_rng([self.seed, _SPLIT_ID[self.split], index, 1])  # apart from the drawing's
        return [int(c) for c in rng.integers(0, self.num_classes, size=self.in_chans - 1)] + [self.label(index)]

    def _bands(self, index, rng):
        import torch
        bands = []
        for c in self.band_classes(index):
            mask = _render(PATTERNS[c], self.size, rng)
            fg, bg = rng.uniform(0, 1, size=2)
            while abs(fg - bg) < 0.3:  # keep the pattern visible
                fg = rng.uniform(0, 1)
            band = np.where(mask, fg, bg).astype(np.float32) + rng.normal(0, 0.05, mask.shape).astype(np.float32)
            bands.append(np.clip(band, 0, 1))
        return torch.from_numpy(np.stack(bands))

    def __getitem__(self, index):
        img = self.image(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.label(index)


def build(is_train, args, transform):
    """--data_set synthetic: no path; --synthetic_* flags choose the images."""
    n = args.synthetic_train_samples if is_train else args.synthetic_val_samples
    ds = SyntheticShapes("train" if is_train else "val", n, args.input_size, num_classes=args.synthetic_classes,
                         seed=args.synthetic_seed, transform=transform, in_chans=args.in_chans)
    return ds, ds.num_classes


def num_classes(args):
    return args.synthetic_classes


def check(args):
    pass

"""--jpeg_draft: a JPEG whose crop is shrunk at least 2x anyway is decoded at 1/2, 1/4 or 1/8
size (libjpeg's DCT scaling, Pillow's `Image.draft`), and the crop box is mapped onto the
smaller image.

The image file is opened lazily (`LazyLoader`: the header only, so the size is known), the
transform's first op draws its crop exactly as without the flag (the same get_params, the same
RNG, the same order), asks for the largest reduction that keeps the crop at least as large as
its output in both directions, decodes, and resizes the mapped box in one Pillow call. When the
reduction would be 1 (crop shrunk < 2x), or the image is not a JPEG, or it is decoded already,
the crop is still decoded in full. A file that fails to decode raises `UnreadableImage`, which
the datasets count and replace like an image that fails to open (util/data/bad_images.py).

The crop-and-resize itself runs in torch's uint8 antialiased kernel (`simd_resized_crop`, about
3x Pillow's with the conversions; the same filters, pixels equal up to rounding) for bilinear and bicubic;
Pillow's for the other interpolations and for a drafted image's fractional box."""
import random

import numpy as np
import torch
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms
from torchvision.transforms import functional as F

SCALES = (8, 4, 2)  # libjpeg's DCT scaling factors Pillow's draft uses (1 = no reduction)


class UnreadableImage(OSError):
    """An image that opened (its header is fine) but failed to decode, in a transform."""


class LazyLoader:
    """An image folder's loader: opens the file without decoding it (the transform decodes)."""
    lazy = True

    def __call__(self, path):
        return Image.open(path)

    @staticmethod
    def finish(img):
        """The image decoded in RGB, for a transform that does not decode itself."""
        return decode_rgb(img)


def decode_rgb(img):
    """`img` decoded now, in RGB (no copy when it is RGB already); a decoding error is UnreadableImage."""
    try:
        img.load()
    except Exception as e:  # truncated or corrupt data: the user's file, counted and replaced
        raise UnreadableImage(f"{type(e).__name__}: {e}") from e
    return img if img.mode == "RGB" else img.convert("RGB")


def reduction(img, shrink):
    """The draft scale (8, 4, 2 or 1) for an image whose crop is shrunk `shrink` times; 1 unless
    `img` is a JPEG not yet decoded and Pillow's draft would choose exactly that scale."""
    if shrink < 2 or getattr(img, "format", None) != "JPEG" or len(getattr(img, "tile", ())) != 1:
        return 1, None
    w, h = img.size
    for s in SCALES:
        if s > shrink:
            continue
        req = (max(1, w // s), max(1, h // s))
        got = min(w // req[0], h // req[1])
        if next((c for c in SCALES if got >= c), 1) == s:
            return s, req
    return 1, None


def drafted(img, shrink):
    """Decode `img` (a lazily opened image) at the largest reduction its crop allows; returns the
    RGB image and the factor mapping full-size coordinates onto it (1.0: decoded at full size)."""
    s, req = reduction(img, shrink)
    full_w = img.size[0]
    ratio = 1.0
    if s > 1:
        got = img.draft("RGB", req)
        if got is not None:
            ratio = got[1][2] / full_w  # Pillow's box of the whole image on the reduced one: 1 / s
    return decode_rgb(img), ratio


def _pil_interp(interpolation):
    if isinstance(interpolation, int):
        return interpolation
    return F.pil_modes_mapping[interpolation]


TORCH_MODES = {Image.BILINEAR: "bilinear", Image.BICUBIC: "bicubic"}  # Pillow's filters torch reproduces


def pillow_resized_crop(img, box, size, interpolation):
    """timm's and torchvision's op: `img.crop(box)` resized to `size` (w, h) by Pillow."""
    left, top, right, bottom = box
    return F.resized_crop(img, top, left, bottom - top, right - left, [size[1], size[0]], interpolation)


def simd_resized_crop(img, box, size, interpolation):
    """Pillow's `img.crop(box).resize(size, interpolation)` (torchvision's resized_crop) through
    torch's uint8 antialiased interpolate, which ports Pillow's filters to SIMD: on these CPUs
    about 3x faster with the conversions, pixels equal up to rounding (mean abs diff about 0.02
    in 0-255 units, up to about 10 levels at a few sharp edges). Pillow's own where torch has
    no equal (nearest, lanczos, box, hamming), for a mode other than RGB, or a box reaching
    outside the image (Pillow pads it)."""
    mode = TORCH_MODES.get(_pil_interp(interpolation))
    left, top, right, bottom = box
    inside = 0 <= left < right <= img.size[0] and 0 <= top < bottom <= img.size[1]
    if mode is None or img.mode != "RGB" or not inside:
        return pillow_resized_crop(img, box, size, interpolation)
    hwc = torch.from_numpy(np.array(img.crop(box)))  # the crop copied out, writable, channels last
    out = torch.nn.functional.interpolate(hwc.permute(2, 0, 1).unsqueeze(0), size=(size[1], size[0]),
                                          mode=mode, antialias=True)[0].contiguous().numpy()
    # three planes merged by Pillow: ~10x faster than transposing to height x width x 3 first
    return Image.merge("RGB", [Image.frombuffer("L", size, out[c], "raw", "L", 0, 1) for c in range(3)])


def resized_box(img, ratio, box, size, interpolation):
    """The crop `box` (left, top, right, bottom on the full-size image) of `img` (decoded at
    `ratio` of its full size) resized to `size` (w, h)."""
    if ratio == 1.0:
        return simd_resized_crop(img, box, size, interpolation)
    return img.resize(size, _pil_interp(interpolation), box=tuple(v * ratio for v in box))


class _Drafting:
    """What the drafting twins share: built from the op they replace, and per class (per
    process) counts of how often the draft fired, for the benchmark's hit rate."""

    hits = calls = 0

    @classmethod
    def like(cls, op):
        new = cls.__new__(cls)
        new.__dict__.update(op.__dict__)
        return new

    def _drafted(self, img, shrink):
        img, ratio = drafted(img, shrink)
        type(self).calls += 1
        type(self).hits += ratio != 1.0
        return img, ratio


class DraftRandomResizedCrop(_Drafting, RandomResizedCropAndInterpolation):
    """timm's RandomResizedCropAndInterpolation (fine-tuning), drafting the decode."""

    def __call__(self, img):
        i, j, h, w = self.get_params(img, self.scale, self.ratio)
        if isinstance(self.interpolation, (tuple, list)):
            interpolation = random.choice(self.interpolation)
        else:
            interpolation = self.interpolation
        return _crop(self, img, (j, i, j + w, i + h), interpolation)


class DraftTorchvisionRandomResizedCrop(_Drafting, transforms.RandomResizedCrop):
    """torchvision's RandomResizedCrop (FCMAE pretraining: its torch RNG draws), drafting the decode."""

    def forward(self, img):
        i, j, h, w = self.get_params(img, self.scale, self.ratio)
        return _crop(self, img, (j, i, j + w, i + h), self.interpolation)


def _crop(op, img, box, interpolation):
    out_h, out_w = op.size if isinstance(op.size, (tuple, list)) else (op.size, op.size)
    shrink = min((box[2] - box[0]) / out_w, (box[3] - box[1]) / out_h)
    img, ratio = op._drafted(img, shrink)
    return resized_box(img, ratio, box, (out_w, out_h), interpolation)


def resize_size(w, h, size, max_size=None):
    """(w, h) that torchvision's Resize(size) gives an image of w x h."""
    if isinstance(size, (tuple, list)) and len(size) == 2:
        return size[1], size[0]
    size = size[0] if isinstance(size, (tuple, list)) else size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    if max_size is not None and new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_short, new_long) if w <= h else (new_long, new_short)


class DraftResize(_Drafting, transforms.Resize):
    """torchvision's Resize (evaluation: before the centre crop), drafting the decode."""

    def forward(self, img):
        w, h = img.size
        out_w, out_h = resize_size(w, h, self.size, self.max_size)
        img, ratio = self._drafted(img, min(w / out_w, h / out_h))
        if ratio == 1.0:
            return simd_resized_crop(img, (0, 0, w, h), (out_w, out_h), self.interpolation)
        return img.resize((out_w, out_h), _pil_interp(self.interpolation), box=(0, 0, w * ratio, h * ratio))


DRAFTS = ((RandomResizedCropAndInterpolation, DraftRandomResizedCrop),
          (transforms.RandomResizedCrop, DraftTorchvisionRandomResizedCrop),
          (transforms.Resize, DraftResize))


def draft_first(transform):
    """`transform` (a Compose) with its first op, a random resized crop or a resize, replaced by
    its drafting twin; the Compose is marked `decodes` (its first op decodes a lazily opened
    image). Returned unchanged when the first op is none of those."""
    ops = getattr(transform, "transforms", None)
    if not ops:
        return transform
    for plain, twin in DRAFTS:
        if type(ops[0]) is plain:
            ops[0] = twin.like(ops[0])
            transform.decodes = True
            break
    return transform


def draft_counts():
    """{op name: (fired, calls)} in this process, for the benchmark's hit rate."""
    return {twin.__name__: (twin.hits, twin.calls) for _, twin in DRAFTS}


def reset_counts():
    for _, twin in DRAFTS:
        twin.hits = twin.calls = 0


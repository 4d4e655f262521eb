"""Datasets, transforms, samplers and loaders for both scripts.

Augmentation randomness is seeded per sample from (seed, epoch, index), so the images of a step
do not depend on the number of workers, on the rank layout or on where a run was resumed: the
basis of exact resume and of the DDP-equivalence tests.
"""
import os
import random
import sys

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import datasets, transforms

from util.errors import UserError
from util.synthetic import SyntheticShapes

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
INCEPTION_MEAN, INCEPTION_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
DATA_SETS = ("synthetic", "image_folder", "IMNET", "CIFAR")


_timm_posterize = None  # timm's own posterize, once _patch_posterize_for_new_pillow replaced it


def _posterize_zero_bits_safe(img, bits_to_keep, **kw):
    """timm's posterize, but 0 bits gives a black image (as Pillow < 13 did) instead of Pillow
    13's ValueError. Module-level, so the train transform pickles (DataLoader workers started
    with spawn or forkserver)."""
    if bits_to_keep <= 0:
        from PIL import Image
        return Image.new(img.mode, img.size)
    original = _timm_posterize
    if original is None:  # a process that unpickled the transform without patching timm
        import timm.data.auto_augment as aa
        original = aa.posterize
    return original(img, bits_to_keep, **kw)


_posterize_zero_bits_safe._zero_bits_safe = True


def _patch_posterize_for_new_pillow():
    """timm's RandAugment 'increasing' posterize can ask for 0 bits. Pillow < 13 turned that into
    a black image; Pillow 13 raises ValueError. Keep the old result (black) instead of crashing."""
    global _timm_posterize
    import timm.data.auto_augment as aa
    if getattr(aa.posterize, "_zero_bits_safe", False):
        return
    original = _timm_posterize = aa.posterize
    aa.posterize = _posterize_zero_bits_safe
    for name, fn in list(aa.NAME_TO_OP.items()):
        if fn is original:
            aa.NAME_TO_OP[name] = _posterize_zero_bits_safe


def mean_std(args):
    return ((IMAGENET_MEAN, IMAGENET_STD) if getattr(args, "imagenet_default_mean_and_std", True)
            else (INCEPTION_MEAN, INCEPTION_STD))


def build_transform(is_train, args):
    """Fine-tuning transforms: timm's create_transform for training, resize + centre crop for eval."""
    mean, std = mean_std(args)
    size = args.input_size
    if is_train:
        from timm.data import create_transform
        _patch_posterize_for_new_pillow()
        aa = args.aa if args.aa not in (None, "", "none", "None") else None
        return create_transform(
            input_size=size, is_training=True, color_jitter=args.color_jitter, auto_augment=aa,
            scale=tuple(getattr(args, "scale", (0.08, 1.0))),
            interpolation=args.train_interpolation, re_prob=args.reprob, re_mode=args.remode,
            re_count=args.recount, mean=mean, std=std)
    steps = []
    if size >= 384:  # as in the original: no crop at large sizes
        steps.append(transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BICUBIC))
    else:
        crop_pct = args.crop_pct if args.crop_pct else 224 / 256
        steps += [transforms.Resize(int(size / crop_pct), interpolation=transforms.InterpolationMode.BICUBIC),
                  transforms.CenterCrop(size)]
    steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    return transforms.Compose(steps)


def build_pretrain_transform(args):
    """The original FCMAE augmentation: RandomResizedCrop(0.2-1, bicubic) + horizontal flip."""
    mean, std = mean_std(args)
    return transforms.Compose([
        transforms.RandomResizedCrop(args.input_size, scale=(0.2, 1.0),
                                     interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), transforms.Normalize(mean, std)])


class BadImageLog:
    """Records unreadable images in `<path>`, one line each, appended by any worker process:
    `<split>\t<image path>\t<error>`, split `train` or `val` (a replaced validation image biases
    the accuracy, so it is counted too). Lines written before the split column read as train."""

    SPLITS = ("train", "val")

    def __init__(self, path=None, split="train"):
        self.path, self.split = path, split

    def add(self, image_path, err):
        what = "another validation sample" if self.split == "val" else "another sample"
        error = " ".join(f"{type(err).__name__}: {err}".split())  # one line, no tabs
        sys.stderr.write(f"warning: unreadable image {image_path} ({error}); using {what} in its place\n")
        if self.path:
            with open(self.path, "a") as f:
                f.write(f"{self.split}\t{image_path}\t{error}\n")

    def entries(self):
        if not self.path or not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [line.rstrip("\n") for line in f if line.strip()]

    @classmethod
    def parse(cls, line):
        """(split, image path, error) of one line."""
        parts = line.split("\t")
        if len(parts) >= 3 and parts[0] in cls.SPLITS:
            return parts[0], parts[1], "\t".join(parts[2:])
        return "train", parts[0], "\t".join(parts[1:])

    def found(self):
        """The distinct (split, image path) pairs listed, sorted: each epoch meets a bad file again."""
        return sorted({self.parse(e)[:2] for e in self.entries()})

    @classmethod
    def recheck(cls, path, loader=None):
        """At launch, before any image is read: keep on the list only the images that are still
        unreadable (one line each); fixed or removed ones leave it, so a run stopped by
        --max_bad_images resumes once they are fixed. The list as it was is kept beside it as
        `<name>.previous.txt`. Returns the (split, image path) pairs still listed."""
        if not os.path.exists(path):
            return []
        if loader is None:
            from torchvision.datasets.folder import default_loader as loader
        kept, seen = [], set()
        for line in cls(path).entries():
            split, image, _ = cls.parse(line)
            if (split, image) in seen:
                continue
            seen.add((split, image))
            if os.path.exists(image) and not _readable(image, loader):
                kept.append(line if line.startswith(f"{split}\t") else f"{split}\t{line}")
        from util.atomic import atomic_write_text
        root, ext = os.path.splitext(path)
        os.replace(path, f"{root}.previous{ext}")
        if kept:
            atomic_write_text(path, "".join(k + "\n" for k in kept))
        return sorted(cls.parse(k)[:2] for k in kept)


def _readable(path, loader):
    try:
        sample = loader(path)
        sample.load() if hasattr(sample, "load") else None
        return True
    except Exception:
        return False


class SafeImageFolder(datasets.ImageFolder):
    """ImageFolder that replaces an unreadable image by the next readable one and logs it."""

    bad_log = BadImageLog()

    def __getitem__(self, index):
        for attempt in range(len(self.samples)):
            i = (index + attempt) % len(self.samples)
            path, target = self.samples[i]
            try:
                sample = self.loader(path)
                sample.load() if hasattr(sample, "load") else None
            except Exception as e:  # corrupt or unreadable file: a user's data, not our fault
                self.bad_log.add(path, e)
                continue
            if self.transform is not None:
                sample = self.transform(sample)
            return sample, target
        raise UserError("no readable image in the dataset; check the files under the data path")


def _image_folder(root, transform, what):
    if not os.path.isdir(root):
        raise UserError(f"{what} folder {root} does not exist; --data_path must hold train/ and val/ "
                        "class folders (or give --eval_data_path)")
    try:
        return SafeImageFolder(root, transform=transform)
    except FileNotFoundError as e:  # no class folders, or a class folder without images
        raise UserError(f"{what} folder {root}: {e}; every class folder needs at least one image") from None


def build_dataset(is_train, args, transform=None):
    """Return (dataset, nb_classes). `transform` overrides the fine-tuning transforms."""
    if args.data_set not in DATA_SETS:
        import difflib
        close = difflib.get_close_matches(args.data_set, DATA_SETS, n=2, cutoff=0.3)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise UserError(f"unknown --data_set {args.data_set!r}: choose one of {', '.join(DATA_SETS)}{hint}")
    if transform is None:
        transform = build_transform(is_train, args)
    if args.data_set == "synthetic":
        n = args.synthetic_train_samples if is_train else args.synthetic_val_samples
        ds = SyntheticShapes("train" if is_train else "val", n, args.input_size,
                             num_classes=args.synthetic_classes, seed=args.synthetic_seed,
                             transform=transform)
        return ds, ds.num_classes
    if not args.data_path:
        raise UserError(f"--data_set {args.data_set} needs --data_path (a folder with train/ and val/); "
                        "or use --data_set synthetic")
    if args.data_set == "CIFAR":
        try:
            ds = datasets.CIFAR100(args.data_path, train=is_train, transform=transform, download=False)
        except RuntimeError as e:
            raise UserError(f"CIFAR-100 not found under {args.data_path} ({e}); download it there "
                            "first, this suite never downloads at run time") from None
        return ds, 100
    if is_train:
        root = os.path.join(args.data_path, "train")
    else:
        root = args.eval_data_path or os.path.join(args.data_path, "val")
    ds = _image_folder(root, transform, "training" if is_train else "validation")
    return ds, len(ds.classes)


def check_same_classes(train_ds, val_ds):
    a, b = getattr(train_ds, "classes", None), getattr(val_ds, "classes", None)
    if a is not None and b is not None and list(a) != list(b):
        only_train = sorted(set(a) - set(b))[:3]
        only_val = sorted(set(b) - set(a))[:3]
        raise UserError(f"train and val have different classes (only in train: {only_train}, "
                        f"only in val: {only_val}); both folders need the same class folders")


class SeededTransform(Dataset):
    """Wraps a dataset so that the sampler's (index, seed) keys seed each sample's augmentation."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getattr__(self, name):
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, key):
        index, seed = key
        in_worker = torch.utils.data.get_worker_info() is not None
        if in_worker:
            random.seed(seed)
            np.random.seed(seed % 2 ** 32)
            torch.manual_seed(seed)
            return self.dataset[index]
        # single-process loading: keep the training process's own RNG streams untouched
        py, npst = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            np.random.seed(seed % 2 ** 32)
            torch.manual_seed(seed)
            out = self.dataset[index]
        random.setstate(py)
        np.random.set_state(npst)
        return out


class TrainSampler(Sampler):
    """Shuffled, rank-sliced, resumable: yields (index, augmentation seed) keys.

    Global order = permutation(seed, epoch), padded to a multiple of the world size; rank r takes
    positions r, r+W, ... so W ranks x batch B see exactly what 1 rank x batch W*B sees.
    `set_epoch(e, start=k)` skips the first k samples of this rank (resume mid-epoch).
    """

    def __init__(self, n, num_replicas=1, rank=0, seed=0, shuffle=True):
        self.n, self.world, self.rank, self.seed, self.shuffle = n, num_replicas, rank, seed, shuffle
        self.epoch, self.start = 0, 0
        self.num_samples = -(-n // num_replicas)

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = int(epoch), int(start)

    def order(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            idx = torch.randperm(self.n, generator=g).tolist()
        else:
            idx = list(range(self.n))
        idx += idx[: self.num_samples * self.world - self.n]
        return idx[self.rank::self.world]

    def __iter__(self):
        base = (self.seed * 1_000_003 + self.epoch) * 10_000_019
        for i in self.order()[self.start:]:
            yield i, (base + i) % (2 ** 62)

    def __len__(self):
        return self.num_samples - self.start


class EvalSampler(Sampler):
    """Rank r takes samples r, r+W, ...: no padding, so summed counts are exact."""

    def __init__(self, n, num_replicas=1, rank=0):
        self.indices = list(range(rank, n, num_replicas))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def build_train_loader(dataset, args, world_size, rank):
    sampler = TrainSampler(len(dataset), world_size, rank, seed=args.seed)
    if len(dataset) < args.batch_size * world_size:
        raise UserError(f"the training set has {len(dataset)} images, fewer than one global batch "
                        f"({args.batch_size} x {world_size}); lower --batch_size")
    return _loader(SeededTransform(dataset), sampler, args, drop_last=True)


def build_eval_loader(dataset, args, world_size, rank):
    if getattr(args, "dist_eval", True):
        sampler = EvalSampler(len(dataset), world_size, rank)
    else:  # every rank evaluates everything; only counts from rank 0 matter
        sampler = EvalSampler(len(dataset), 1, 0)
    return _loader(dataset, sampler, args, drop_last=False, batch_size=int(1.5 * args.batch_size))


def _loader(dataset, sampler, args, drop_last, batch_size=None):
    workers = args.num_workers
    kw = dict(persistent_workers=True, prefetch_factor=4) if workers > 0 else {}
    # its own generator: creating an iterator must not draw from the training RNG (exact resume)
    kw["generator"] = torch.Generator().manual_seed(args.seed)
    return DataLoader(dataset, sampler=sampler, batch_size=batch_size or args.batch_size,
                      num_workers=workers, pin_memory=args.pin_mem and torch.cuda.is_available(),
                      drop_last=drop_last, **kw)

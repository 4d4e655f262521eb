"""Datasets, transforms, samplers and loaders for both scripts.

`_REGISTRY` is the registry: --data_set name -> the file of util/data that is that dataset kind
(its `build`, `num_classes` and `check`, util/data/base.py) and the check of its path flags.
Adding a kind touches only this mapping and the kind's file. The functions here are what the
rest of the suite calls: `build_dataset`, `check_paths` (the scripts' flag checks), `check_data`
and `num_classes` (a launcher, before queueing).

Nothing here imports torch until it is needed: a kind's file (torchvision, torch datasets) is
imported when the kind is first used, and the other names below on first access, so the
checks before any compute (`check_paths`, util/validate.py) stay cheap: a path check is plain
file-system work (util/data/base.py).
"""
import functools
import importlib

from util.data.base import CSV_FILES, check_same_classes, file_paths, folder_paths  # noqa: F401 (API)
from util.errors import UserError

_REGISTRY = {  # --data_set -> (its file of util/data, what its path flags name)
    "synthetic": ("synthetic", functools.partial(folder_paths, data_path=False)),
    "image_folder": ("folder", folder_paths),
    "IMNET": ("folder", folder_paths),
    "CIFAR": ("cifar", folder_paths),
    "csv": ("csv", functools.partial(file_paths, what=CSV_FILES)),
    "wds": ("wds", folder_paths),
}
DATA_SETS = tuple(_REGISTRY)

_LAZY = {  # name -> the file of util/data that defines it (imported on first access)
    "BadImageLog": "bad_images", "load_bands": "bands", "SeededTransform": "loaders", "TrainSampler": "loaders",
    "build_eval_loader": "loaders", "build_train_loader": "loaders", "eval_indices": "loaders",
    "SyntheticShapes": "synthetic", "build_pretrain_transform": "transforms", "build_transform": "transforms",
    "mean_std": "transforms", "posterize_zero_bits_safe": "transforms"}


def _import(name):
    return importlib.import_module(f"util.data.{name}")


def __getattr__(name):  # PEP 562: the names of _LAZY, and KINDS (every kind, so every kind's file)
    if name == "KINDS":
        return {n: _import(_REGISTRY[n][0]) for n in DATA_SETS}
    if name in _LAZY:
        return getattr(_import(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _kind(args, hint=True):
    """The kind of --data_set, its file imported now; `hint`: name the close matches of an unknown name."""
    if args.data_set in _REGISTRY:
        return _import(_REGISTRY[args.data_set][0])
    close = []
    if hint:
        import difflib
        close = difflib.get_close_matches(args.data_set, DATA_SETS, n=2, cutoff=0.3)
    matches = f"; did you mean {' or '.join(close)}?" if close else ""
    raise UserError(f"unknown --data_set {args.data_set!r}: choose one of {', '.join(DATA_SETS)}{matches}")


def build_dataset(is_train, args, transform=None):
    """Return (dataset, nb_classes). `transform` overrides the fine-tuning transforms."""
    kind = _kind(args)
    if transform is None:
        from util.data.transforms import build_transform
        transform = build_transform(is_train, args)
    return kind.build(is_train, args, transform)


def check_paths(args):
    """The paths the flags name exist and can be read (folders or, for csv, files); imports no
    kind's file (no torch). An unknown --data_set is left to build_dataset, which names the
    close matches."""
    entry = _REGISTRY.get(args.data_set)
    (entry[1] if entry else folder_paths)(args)


def check_data(args):
    """The cheap part of build_dataset's checks, without listing a whole dataset on the
    submitting machine (a launcher, before queueing)."""
    _kind(args, hint=False).check(args)


def num_classes(args):
    """The class count, found without reading an image (e.g. class folders' names; CIFAR 100)."""
    return _kind(args).num_classes(args)

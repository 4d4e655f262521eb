"""Datasets, transforms, samplers and loaders for both scripts.

`KINDS` is the registry: --data_set name -> kind (util/data/base.DataKind), each in its own
file: how it is built, its class count and its cheap checks. Adding a kind touches only this
mapping and the kind's file. The functions here are what the rest of the suite calls:
`build_dataset`, `check_paths` (the scripts' flag checks), `check_data` and `num_classes`
(a launcher, before queueing).

Nothing here imports torch until it is needed: a kind's file (torchvision, torch datasets) is
imported when the kind is first used, and the other names below on first access, so the
checks before any compute (`check_paths`, util/validate.py) stay cheap: an entry's `paths`
check is plain file-system work (util/data/base.py).
"""
import functools
import importlib

from util.data.base import CSV_FILES, DataKind, check_same_classes, file_paths, folder_paths
from util.errors import UserError

_REGISTRY = {  # --data_set -> (file of util/data, kind class, its arguments, what its path flags name)
    "synthetic": ("synthetic", "SyntheticKind", (), functools.partial(folder_paths, data_path=False)),
    "image_folder": ("folder", "ImageFolderKind", ("image_folder",), folder_paths),
    "IMNET": ("folder", "ImageFolderKind", ("IMNET",), folder_paths),
    "CIFAR": ("cifar", "CifarKind", (), folder_paths),
    "csv": ("csv", "CsvKind", (), functools.partial(file_paths, what=CSV_FILES)),
    "wds": ("wds", "ShardKind", (), folder_paths),
}
DATA_SETS = tuple(_REGISTRY)

_LAZY = {  # name -> the file of util/data that defines it (imported on first access)
    "BadImageLog": "bad_images", "ReplacesUnreadable": "bad_images", "CifarKind": "cifar",
    "CsvKind": "csv", "ImageFolderKind": "folder", "SafeImageFolder": "folder",
    "EvalSampler": "loaders", "SeededTransform": "loaders", "TrainSampler": "loaders",
    "build_eval_loader": "loaders", "build_train_loader": "loaders", "SyntheticKind": "synthetic",
    "SyntheticShapes": "synthetic", "IMAGENET_MEAN": "transforms", "IMAGENET_STD": "transforms",
    "INCEPTION_MEAN": "transforms", "INCEPTION_STD": "transforms", "build_pretrain_transform": "transforms",
    "build_transform": "transforms", "mean_std": "transforms", "posterize_zero_bits_safe": "transforms",
    "ShardKind": "wds"}

__all__ = [  # the names other modules import from util.data
    "BadImageLog", "DATA_SETS", "DataKind", "EvalSampler", "IMAGENET_MEAN", "IMAGENET_STD",
    "INCEPTION_MEAN", "INCEPTION_STD", "KINDS", "ReplacesUnreadable", "SafeImageFolder", "SeededTransform",
    "SyntheticShapes", "TrainSampler", "build_dataset", "build_eval_loader", "build_pretrain_transform",
    "build_train_loader", "build_transform", "check_data", "check_paths", "check_same_classes", "kind_of",
    "mean_std", "num_classes", "posterize_zero_bits_safe"]


@functools.lru_cache(maxsize=None)
def _kind(name):
    """The registry entry's kind object, its file imported now (one object per name)."""
    module, cls, kind_args = _REGISTRY[name][:3]
    return getattr(importlib.import_module(f"util.data.{module}"), cls)(*kind_args)


def __getattr__(name):  # PEP 562: the names of _LAZY, and KINDS (every kind, so every kind's file)
    if name == "KINDS":
        return {n: _kind(n) for n in DATA_SETS}
    if name in _LAZY:
        return getattr(importlib.import_module(f"util.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def kind_of(args, hint=True):
    """The registry entry of --data_set; `hint`: name the close matches of an unknown name."""
    if args.data_set in _REGISTRY:
        return _kind(args.data_set)
    close = []
    if hint:
        import difflib
        close = difflib.get_close_matches(args.data_set, DATA_SETS, n=2, cutoff=0.3)
    matches = f"; did you mean {' or '.join(close)}?" if close else ""
    raise UserError(f"unknown --data_set {args.data_set!r}: choose one of {', '.join(DATA_SETS)}{matches}")


def build_dataset(is_train, args, transform=None):
    """Return (dataset, nb_classes). `transform` overrides the fine-tuning transforms."""
    kind = kind_of(args)
    if transform is None:
        from util.data.transforms import build_transform
        transform = build_transform(is_train, args)
    return kind.build(is_train, args, transform)


def check_paths(args):
    """The paths the flags name exist and can be read (folders or, for csv, files); imports no
    kind's file (no torch). An unknown --data_set is left to build_dataset, which names the
    close matches."""
    entry = _REGISTRY.get(args.data_set)
    (entry[3] if entry else folder_paths)(args)


def check_data(args):
    """The cheap part of build_dataset's checks, without listing a whole dataset on the
    submitting machine (a launcher, before queueing)."""
    kind_of(args, hint=False).check(args)


def num_classes(args):
    """The class count, found without reading an image (e.g. class folders' names; CIFAR 100)."""
    return kind_of(args).num_classes(args)

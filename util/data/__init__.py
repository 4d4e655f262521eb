"""Datasets, transforms, samplers and loaders for both scripts.

`KINDS` is the registry: --data_set name -> kind (util/data/base.DataKind), each in its own
file: how it is built, its class count and its cheap checks. Adding a kind touches only this
mapping and the kind's file. The functions here are what the rest of the suite calls:
`build_dataset`, `check_paths` (the scripts' flag checks), `check_data` and `num_classes`
(a launcher, before queueing).
"""
from util.data.bad_images import BadImageLog, ReplacesUnreadable
from util.data.base import DataKind, check_same_classes
from util.data.cifar import CifarKind
from util.data.csv import CsvKind
from util.data.folder import ImageFolderKind, SafeImageFolder
from util.data.loaders import EvalSampler, SeededTransform, TrainSampler, build_eval_loader, build_train_loader
from util.data.synthetic import SyntheticKind, SyntheticShapes
from util.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, INCEPTION_MEAN, INCEPTION_STD,
                                  build_pretrain_transform, build_transform, mean_std,
                                  posterize_zero_bits_safe)
from util.data.wds import ShardKind
from util.errors import UserError

KINDS = {
    "synthetic": SyntheticKind(),
    "image_folder": ImageFolderKind("image_folder"),
    "IMNET": ImageFolderKind("IMNET"),
    "CIFAR": CifarKind(),
    "csv": CsvKind(),
    "wds": ShardKind(),
}
DATA_SETS = tuple(KINDS)

__all__ = [  # the names other modules import from util.data
    "BadImageLog", "DATA_SETS", "DataKind", "EvalSampler", "IMAGENET_MEAN", "IMAGENET_STD",
    "INCEPTION_MEAN", "INCEPTION_STD", "KINDS", "ReplacesUnreadable", "SafeImageFolder", "SeededTransform",
    "SyntheticShapes", "TrainSampler", "build_dataset", "build_eval_loader", "build_pretrain_transform",
    "build_train_loader", "build_transform", "check_data", "check_paths", "check_same_classes", "kind_of",
    "mean_std", "num_classes", "posterize_zero_bits_safe"]


def kind_of(args, hint=True):
    """The registry entry of --data_set; `hint`: name the close matches of an unknown name."""
    if args.data_set in KINDS:
        return KINDS[args.data_set]
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
        transform = build_transform(is_train, args)
    return kind.build(is_train, args, transform)


def check_paths(args):
    """The paths the flags name exist and can be read (folders or, for csv, files). An unknown
    --data_set is left to build_dataset, which names the close matches."""
    KINDS.get(args.data_set, DataKind()).check_paths(args)


def check_data(args):
    """The cheap part of build_dataset's checks, without listing a whole dataset on the
    submitting machine (a launcher, before queueing)."""
    kind_of(args, hint=False).check(args)


def num_classes(args):
    """The class count, found without reading an image (e.g. class folders' names; CIFAR 100)."""
    return kind_of(args).num_classes(args)

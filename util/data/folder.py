"""Image folders: `<data_path>/train/<class>/*` and `<data_path>/val/<class>/*` (or
--eval_data_path), classes sorted by folder name (--data_set image_folder and IMNET)."""
import argparse
import os

from torchvision import datasets
from torchvision.datasets.folder import default_loader

from util.data.bad_images import ReplacesUnreadable
from util.data.base import check_folder, check_same_classes, needs_val, require_data_path
from util.errors import UserError


class SafeImageFolder(ReplacesUnreadable, datasets.ImageFolder):
    """ImageFolder that replaces an unreadable image by the next readable one and logs it."""


def _class_folders(root):
    return sorted(e.name for e in os.scandir(root) if e.is_dir())


def build(is_train, args, transform):
    require_data_path(args)
    if is_train:
        root = os.path.join(args.data_path, "train")
    else:
        root = args.eval_data_path or os.path.join(args.data_path, "val")
    what = "training" if is_train else "validation"
    if not os.path.isdir(root):
        raise UserError(f"{what} folder {root} does not exist; --data_path must hold train/ and val/ "
                        "class folders (or give --eval_data_path)")
    loader = default_loader
    if args.jpeg_draft:  # files opened, not decoded; the transform decodes (util/data/decode.py)
        from util.data.decode import open_lazily as loader
    try:
        ds = SafeImageFolder(root, transform=transform, loader=loader)
    except FileNotFoundError as e:  # no class folders, or a class folder without images
        raise UserError(f"{what} folder {root}: {e}; every class folder needs at least one image") from None
    return ds, len(ds.classes)


def num_classes(args):
    return len(_class_folders(os.path.join(args.data_path, "train")))


def check(args):
    """The folders exist and, when the run evaluates, train and val name the same class
    folders; no image is listed."""
    check_folder(args)
    train = os.path.join(args.data_path, "train")
    if not os.path.isdir(train):
        raise UserError(f"training folder {train} does not exist; --data_path must hold train/ "
                        "and val/ class folders")
    if not needs_val(args):
        return
    val = getattr(args, "eval_data_path", None) or os.path.join(args.data_path, "val")
    if not os.path.isdir(val):
        raise UserError(f"validation folder {val} does not exist; give --eval_data_path or "
                        "--disable_eval True")
    check_same_classes(*(argparse.Namespace(classes=_class_folders(d)) for d in (train, val)))

"""Image folders: `<data_path>/train/<class>/*` and `<data_path>/val/<class>/*` (or
--eval_data_path), classes sorted by folder name (--data_set image_folder and IMNET). A class
folder holds images Pillow reads, `.npy` arrays and TIFF files (util/data/bands.py reads them)."""
import argparse
import os

from torchvision import datasets

from util.data.bad_images import ReplacesUnreadable
from util.data.bands import check_first, is_sample_file, loader_for
from util.data.base import check_folder, check_same_classes, needs_val, require_data_path
from util.errors import UserError


class SafeImageFolder(ReplacesUnreadable, datasets.ImageFolder):
    """ImageFolder that replaces an unreadable image by the next readable one and logs it."""


def _class_folders(root):
    return sorted(e.name for e in os.scandir(root) if e.is_dir())


def first_file(root):
    """The first sample an ImageFolder of `root` lists (class folders, then their files, sorted),
    found without listing more than one class folder; None if there is none."""
    for c in _class_folders(root):
        for folder, _, files in sorted(os.walk(os.path.join(root, c), followlinks=True)):
            for f in sorted(files):
                if is_sample_file(f):
                    return os.path.join(folder, f)
    return None


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
    try:  # with --jpeg_draft Pillow images are opened, not decoded; the transform decodes (util/data/decode.py)
        ds = SafeImageFolder(root, transform=transform, loader=loader_for(args), is_valid_file=is_sample_file)
    except FileNotFoundError as e:  # no class folders, or a class folder without images
        raise UserError(f"{what} folder {root}: {e}; every class folder needs at least one image "
                        "(an image, .npy or .tif file)") from None
    check_first(ds.samples[0][0], args.in_chans, what)
    return ds, len(ds.classes)


def num_classes(args):
    return len(_class_folders(os.path.join(args.data_path, "train")))


def check(args):
    """The folders exist and, when the run evaluates, train and val name the same class
    folders; the first sample of each split is read (its bands); no folder is listed whole."""
    check_folder(args)
    train = os.path.join(args.data_path, "train")
    if not os.path.isdir(train):
        raise UserError(f"training folder {train} does not exist; --data_path must hold train/ "
                        "and val/ class folders")
    folders = {"training": train}
    if needs_val(args):
        val = getattr(args, "eval_data_path", None) or os.path.join(args.data_path, "val")
        if not os.path.isdir(val):
            raise UserError(f"validation folder {val} does not exist; give --eval_data_path or "
                            "--disable_eval True")
        check_same_classes(*(argparse.Namespace(classes=_class_folders(d)) for d in (train, val)))
        folders["validation"] = val
    for what, root in folders.items():
        first = first_file(root)
        if first is not None:
            check_first(first, args.in_chans, what)

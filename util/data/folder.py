"""Image folders: `<data_path>/train/<class>/*` and `<data_path>/val/<class>/*` (or
--eval_data_path), classes sorted by folder name (--data_set image_folder and IMNET)."""
import argparse
import os

from torchvision import datasets

from util.data.bad_images import ReplacesUnreadable
from util.data.base import DataKind, check_same_classes, needs_val
from util.errors import UserError


class SafeImageFolder(ReplacesUnreadable, datasets.ImageFolder):
    """ImageFolder that replaces an unreadable image by the next readable one and logs it."""


def _image_folder(root, transform, what, lazy=False):
    if not os.path.isdir(root):
        raise UserError(f"{what} folder {root} does not exist; --data_path must hold train/ and val/ "
                        "class folders (or give --eval_data_path)")
    try:
        if lazy:  # --jpeg_draft: files opened, not decoded; the transform decodes (util/data/decode.py)
            from util.data.decode import LazyLoader
            return SafeImageFolder(root, transform=transform, loader=LazyLoader())
        return SafeImageFolder(root, transform=transform)
    except FileNotFoundError as e:  # no class folders, or a class folder without images
        raise UserError(f"{what} folder {root}: {e}; every class folder needs at least one image") from None


def _class_folders(root):
    return sorted(e.name for e in os.scandir(root) if e.is_dir())


class ImageFolderKind(DataKind):
    def __init__(self, name):
        self.name = name

    def build(self, is_train, args, transform):
        self.require_data_path(args)
        if is_train:
            root = os.path.join(args.data_path, "train")
        else:
            root = args.eval_data_path or os.path.join(args.data_path, "val")
        ds = _image_folder(root, transform, "training" if is_train else "validation",
                           lazy=bool(args.jpeg_draft))
        return ds, len(ds.classes)

    def num_classes(self, args):
        return len(_class_folders(os.path.join(args.data_path, "train")))

    def check(self, args):
        """The folders exist and, when the run evaluates, train and val name the same class
        folders; no image is listed."""
        super().check(args)
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

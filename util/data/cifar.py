"""CIFAR-100 from torchvision, read from --data_path (never downloaded at run time)."""
from torchvision import datasets

from util.data.base import check_folder, require_data_path
from util.errors import UserError


def _rgb_only(args):
    if args.in_chans != 3:
        raise UserError(f"CIFAR-100 images have 3 bands (RGB), but --in_chans is {args.in_chans}; pass --in_chans 3")


def build(is_train, args, transform):
    require_data_path(args)
    _rgb_only(args)
    try:
        ds = datasets.CIFAR100(args.data_path, train=is_train, transform=transform, download=False)
    except RuntimeError as e:
        raise UserError(f"CIFAR-100 not found under {args.data_path} ({e}); download it there "
                        "first, this suite never downloads at run time") from None
    return ds, 100


def num_classes(args):
    return 100


def check(args):
    check_folder(args)
    _rgb_only(args)

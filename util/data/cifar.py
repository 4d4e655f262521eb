"""CIFAR-100 from torchvision, read from --data_path (never downloaded at run time)."""
from torchvision import datasets

from util.data.base import DataKind
from util.errors import UserError


class CifarKind(DataKind):
    name = "CIFAR"

    def build(self, is_train, args, transform):
        self.require_data_path(args)
        try:
            ds = datasets.CIFAR100(args.data_path, train=is_train, transform=transform, download=False)
        except RuntimeError as e:
            raise UserError(f"CIFAR-100 not found under {args.data_path} ({e}); download it there "
                            "first, this suite never downloads at run time") from None
        return ds, 100

    def num_classes(self, args):
        return 100

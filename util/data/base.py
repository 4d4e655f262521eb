"""What the dataset kinds share: the checks of --data_path and --eval_data_path.

A kind (a file of util/data named in the registry, util/data/__init__.py) provides
`build(is_train, args, transform)` -> (dataset, number of classes), `num_classes(args)` (found
without reading an image) and `check(args)`: what a launcher verifies before queueing a job,
without listing a whole dataset on the submitting machine. The scripts' flag checks, that the
paths given exist and can be read, are the registry entry's `folder_paths` / `file_paths` here,
which import no torch (a kind's own file may).
"""
import os

from util.errors import UserError

FOLDER = "a folder with train/ and val/"  # what --data_path names, unless a kind says otherwise


def require_data_path(args, what=FOLDER):
    if not args.data_path:
        raise UserError(f"--data_set {args.data_set} needs --data_path ({what}); "
                        "or use --data_set synthetic")


def check_folder(args, what=FOLDER):
    """A kind's `check` when --data_path is a folder (`what`: the folder, for the fix)."""
    require_data_path(args, what)
    if not os.path.isdir(args.data_path):
        raise UserError(f"--data_path {args.data_path} does not exist (or is not a folder); "
                        "give the dataset root, reachable from the compute nodes")


CSV_FILES = {"--data_path": "the training CSV", "--eval_data_path": "the validation CSV"}  # csv's path flags


def folder_paths(args, data_path=True):
    """--data_path (unless `data_path` is False: a kind that reads none) and --eval_data_path,
    where given, are folders that can be read."""
    if data_path and args.data_path:
        readable_dir(args.data_path, "--data_path")
    if getattr(args, "eval_data_path", None):
        readable_dir(args.eval_data_path, "--eval_data_path")


def file_paths(args, what):
    """--data_path and --eval_data_path, where given, are files that can be read; `what`: flag
    -> the file it names, for the fix (e.g. "the training CSV")."""
    for flag in ("--data_path", "--eval_data_path"):
        path = getattr(args, flag[2:], None)
        if path:
            readable_file(path, flag, f"give the path of {what[flag]}")


def needs_val(args):
    """Whether the run evaluates (fine-tuning without --disable_eval, or --eval); pretraining never."""
    return not (getattr(args, "disable_eval", True) and not getattr(args, "eval", False))


def readable_dir(path, flag):
    if not os.path.isdir(path):
        raise UserError(f"{flag} {path}: no such directory")
    try:
        os.listdir(path)
    except OSError as e:
        raise UserError(f"{flag} {path} cannot be read ({e.strerror}); check its permissions") from None


def readable_file(path, flag, what):
    """`what`: the fix, e.g. "give the path of the training CSV"."""
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path}: no such file; {what}")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise UserError(f"{flag} {path} cannot be read ({e.strerror}); check its permissions") from None


def check_same_classes(train_ds, val_ds):
    a, b = getattr(train_ds, "classes", None), getattr(val_ds, "classes", None)
    if a is not None and b is not None and list(a) != list(b):
        only_train = sorted(set(a) - set(b))[:3]
        only_val = sorted(set(b) - set(a))[:3]
        raise UserError(f"train and val have different classes (only in train: {only_train}, "
                        f"only in val: {only_val}); both folders need the same class folders")

"""--data_set csv: images listed in CSV files, `--data_path train.csv --eval_data_path val.csv`.

Each file has a header row naming the columns `path` and `label` (in any order; other columns
are ignored). A path is absolute or relative to the CSV file's folder; a label is a class name.
The classes are the training file's labels sorted by name, as the class folders of an image
folder; every validation label must be one of them. A listed file is an image Pillow reads, a
`.npy` array or a TIFF file (util/data/bands.py). Unreadable images are replaced and logged as in
an image folder (util/data/bad_images.py).
"""
import csv
import os

from torch.utils.data import Dataset

from util.data.bad_images import ReplacesUnreadable
from util.data.bands import BandLoader, check_first, loader_for
from util.data.base import CSV_FILES, needs_val, readable_file, require_data_path
from util.errors import UserError

COLUMNS = ("path", "label")
WHAT = "the training CSV file, whose header row names path,label"  # what --data_path names


def read_list(path, flag):
    """[(image path, label, line number)] of one CSV file; `flag` names it in errors."""
    readable_file(path, flag, f"give the path of {CSV_FILES[flag]} (a file whose header row names path,label)")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, skipinitialspace=True)
            header = [(c or "").strip() for c in reader.fieldnames or []]
            missing = [c for c in COLUMNS if c not in header]
            if missing:
                raise UserError(f"{flag} {path} has no {' or '.join(map(repr, missing))} column (header row: "
                                f"{', '.join(header) or 'none'}); its first row must name the columns path,label")
            reader.fieldnames = header
            rows = [_row(r, path, reader.line_num, folder) for r in reader]
    except (csv.Error, UnicodeDecodeError) as e:
        raise UserError(f"{flag} {path} is not a readable CSV file ({e}); write it as UTF-8 text, "
                        "one image per row") from None
    if not rows:
        raise UserError(f"{flag} {path} lists no images; add rows path,label below its header row")
    return rows


def _row(row, path, line, folder):
    image, label = ((row.get(c) or "").strip() for c in COLUMNS)
    if not image or not label:
        raise UserError(f"{path} line {line}: empty path or label; every row needs both")
    return os.path.normpath(os.path.join(folder, image)), label, line


class CsvImages(ReplacesUnreadable, Dataset):
    """The images of one file list; `classes` and `class_to_idx` as an ImageFolder's."""

    def __init__(self, rows, classes, transform=None, loader=BandLoader()):
        self.classes = list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples = [(image, self.class_to_idx[label]) for image, label, _ in rows]
        self.targets = [t for _, t in self.samples]
        self.loader, self.transform = loader, transform

    def __len__(self):
        return len(self.samples)


def _train(args):
    """(training rows, class names sorted)."""
    require_data_path(args, WHAT)
    rows = read_list(args.data_path, "--data_path")
    return rows, sorted({label for _, label, _ in rows})


def _val_rows(args, classes):
    """The validation list, every label of which is a class of the training list."""
    if not getattr(args, "eval_data_path", None):
        raise UserError("--data_set csv needs --eval_data_path (the validation CSV file, whose header row "
                        "names path,label); give it, or --disable_eval True to train without evaluation")
    rows = read_list(args.eval_data_path, "--eval_data_path")
    known = set(classes)
    for _, label, line in rows:
        if label not in known:
            shown = ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
            raise UserError(f"--eval_data_path {args.eval_data_path} line {line}: class {label!r} is not in the "
                            f"training CSV {args.data_path} (its classes: {shown}); use one of its labels or "
                            "drop the row")
    return rows


def check(args):
    """Reads the file lists: columns, validation classes known to training, and the first
    sample of each list (its bands)."""
    rows, classes = _train(args)
    check_first(rows[0][0], args.in_chans, "training")
    if needs_val(args):
        check_first(_val_rows(args, classes)[0][0], args.in_chans, "validation")


def num_classes(args):
    return len(_train(args)[1])


def build(is_train, args, transform):
    rows, classes = _train(args)
    if not is_train:
        rows = _val_rows(args, classes)
    check_first(rows[0][0], args.in_chans, "training" if is_train else "validation")
    # with --jpeg_draft Pillow images are opened, not decoded; the transform decodes (util/data/decode.py)
    return CsvImages(rows, classes, transform, loader_for(args)), len(classes)

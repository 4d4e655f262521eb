"""--predict PATH: the inputs a fine-tuned classifier labels, and predictions.csv.

PATH is one of
- a folder of images at any depth: every sample file (util/data/bands.EXTENSIONS: images Pillow
  reads, `.npy` arrays, TIFF files) in the order an image folder lists them (folders sorted,
  each folder's files sorted by name), so a `val/` folder comes in --eval's order;
- a CSV file whose header row names a `path` column (other columns, e.g. `label`, are ignored):
  its rows in order; a path is absolute or relative to the CSV file's folder, as for --data_set csv;
- tar shards (util/make_shards.py's layout; no `.cls` labels needed): a `.tar` file, a folder
  holding `.tar` files (all of them, sorted by name) or a pattern such as `shards/val-*.tar`;
  each shard's samples in the order it stores them, named `<shard>:<key>` as in bad_images.txt.

The registry's dataset kinds (util/data/) need labels and a class list; here nothing does: the
class names come from the checkpoint. Samples are read by util/data/bands.load_bands (the
checkpoint's --in_chans). A file that cannot be read is not replaced, as in training, but kept
with its error: its row has no prediction, and no other row moves.

predictions.csv, one row per input in input order, for pandas as it is (`pd.read_csv`):
`path,prediction,probability,prediction_2,probability_2,...,prediction_5,probability_5,error`
(k = min(5, classes) pairs): the class names from best to fifth, each with its probability
(softmax; sigmoid per class for a --bce_loss model), and `error` (empty, or why the file could
not be read; then the predictions are empty).
"""
import csv
import glob
import io
import os
import tarfile

import torch
from torch.utils.data import Dataset

from util.data.bands import is_sample_file, load_bands
from util.data.wds import IMAGE_EXTS, MAKE
from util.errors import UserError

INPUTS = "a folder of images, a CSV file with a path column, or .tar shards"  # what --predict names


def list_inputs(path):
    """(names for the `path` column, sources to read) of PATH, in input order; a source is a file
    path or (shard, offset, size, name). One line (UserError) when PATH holds no input."""
    pattern = not os.path.exists(path) and any(c in path for c in "*?[")  # a folder may be named img[1]
    in_folder = os.path.isdir(path) and sorted(glob.glob(os.path.join(glob.escape(path), "*.tar")))
    if pattern or path.endswith(".tar") or in_folder:
        shards = in_folder or (sorted(glob.glob(path)) if pattern else [path])
        sources = [member for shard in shards for member in shard_members(shard)]
        names = [name for *_, name in sources]
    elif os.path.isdir(path):
        names = [os.path.join(folder, f) for folder, _, files in sorted(os.walk(path, followlinks=True))
                 for f in sorted(files) if is_sample_file(f)]
        sources = names
    elif os.path.isfile(path) and path.lower().endswith(".csv"):
        names = csv_paths(path)
        folder = os.path.dirname(os.path.abspath(path))
        sources = [os.path.normpath(os.path.join(folder, p)) for p in names]
    else:
        raise UserError(f"--predict {path}: give {INPUTS} (a .csv or .tar file, a folder, or a pattern such as "
                        "shards/val-*.tar)")
    if not names:
        raise UserError(f"--predict {path} holds no images (image files Pillow reads, .npy or .tif files at any "
                        f"depth, CSV rows or shard samples); give {INPUTS}")
    return names, sources


def csv_paths(path):
    """The `path` column of a CSV file, as written in it, in row order."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, skipinitialspace=True)
            header = [(c or "").strip() for c in reader.fieldnames or []]
            if "path" not in header:
                raise UserError(f"--predict {path} has no 'path' column (header row: {', '.join(header) or 'none'}); "
                                "its first row must name the columns, one of them path")
            reader.fieldnames = header
            rows = [((r.get("path") or "").strip(), reader.line_num) for r in reader]
    except (csv.Error, UnicodeDecodeError) as e:
        raise UserError(f"--predict {path} is not a readable CSV file ({e}); write it as UTF-8 text, "
                        "one image per row") from None
    for image, line in rows:
        if not image:
            raise UserError(f"--predict {path} line {line}: empty path; every row needs one")
    return [image for image, _ in rows]


def shard_members(shard):
    """[(shard, offset, size, `shard:key`)] of a tar shard's samples, in stored order; the key is
    a member's path up to its file name's first dot, as util/data/wds.py reads shards."""
    out = []
    try:
        with tarfile.open(shard, "r:") as tar:
            for m in tar:
                folder, name = os.path.split(m.name)
                stem, _, ext = name.partition(".")
                if m.isfile() and ext.lower() in IMAGE_EXTS:
                    out.append((shard, m.offset_data, m.size, f"{shard}:{os.path.join(folder, stem)}"))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UserError(f"--predict: shard {shard} is not a readable tar file ({type(e).__name__}: {e}); "
                        f"write it again with {MAKE}") from None
    return out


class PredictInputs(Dataset):
    """Item i: (the evaluation transform of input i, i, error text). An input that cannot be read
    gives a blank image and its error instead (its row gets no prediction); the batch goes on."""

    def __init__(self, sources, transform, in_chans, input_size):
        self.sources, self.transform, self.in_chans = sources, transform, in_chans
        self.blank = torch.zeros(in_chans, input_size, input_size)

    def __len__(self):
        return len(self.sources)

    def __getitem__(self, i):
        src = self.sources[i]
        try:
            if isinstance(src, str):
                sample = load_bands(src, self.in_chans)
            else:  # a shard member: one read at its offset
                shard, offset, size, name = src
                with open(shard, "rb") as f:
                    data = os.pread(f.fileno(), size, offset)
                sample = load_bands(io.BytesIO(data), self.in_chans, name=name)
        except Exception as e:  # a missing, corrupt or unusable file: the user's data, reported in its row
            return self.blank, i, " ".join(f"{type(e).__name__}: {e}".split())
        return self.transform(sample), i, ""


def write_predictions(path, names, results, classes):
    """predictions.csv at `path`, atomically (models/atomic.py). `results[i]`: ([(class index,
    probability)] best first, error text) of input i, named `names[i]`."""
    from models.atomic import atomic_file
    k = min(5, len(classes))
    header = ["path", "prediction", "probability"]
    header += [f"{col}_{j}" for j in range(2, k + 1) for col in ("prediction", "probability")]
    with atomic_file(path) as f:
        text = io.TextIOWrapper(f, encoding="utf-8", newline="")
        out = csv.writer(text, lineterminator="\n")
        out.writerow(header + ["error"])
        for name, (top, error) in zip(names, results):
            cells = [cell for c, p in top for cell in (classes[c], f"{p:.6g}")]
            out.writerow([name, *cells, *[""] * (2 * k - len(cells)), error])
        text.flush()
        text.detach()  # atomic_file syncs and closes the file itself

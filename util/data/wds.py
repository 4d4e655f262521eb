"""--data_set wds: tar shards in the WebDataset layout, `--data_path OUT` as written by
`python -m util.make_shards SRC OUT`: `OUT/train-000000.tar`, ..., `OUT/val-000000.tar`, ...
(or the val shards in --eval_data_path) and `OUT/classes.json` (the class names, in label order).
A sample is the members sharing a key: `<key>.jpg` (or .png, .webp, ..., a `.npy` array or a
`.tif`/`.tiff` file: util/data/bands.py reads it) and `<key>.cls` (the class index as text).

The reader is an index over plain tar files (Python's tarfile, no dependency): at start each
shard's headers are read once and every sample's image is located by its byte offset, so a
sample is one `os.pread` from an open shard. util.make_shards also writes each shard's index
beside it (`<shard>.idx.json`, used while the shard's size and modification time are the ones
recorded), so a job starts without reading every header (about 60 us per sample on one core).
Random access makes a shard folder an ordinary map-style dataset: the suite's TrainSampler
shuffles it per epoch by seed, splits it over ranks (and the DataLoader over workers), each
sample once per epoch, and resumes exactly mid-epoch, as with an image folder; evaluation
counts every validation sample once (util/data/loaders.eval_indices). A streaming reader
(webdataset) shuffles only within a buffer and cannot resume mid-epoch exactly; wids would add
a dependency and its own index files for what tarfile gives here. An image that does not decode
is counted and replaced like a bad image (util/data/bad_images.py).
"""
import glob
import io
import json
import os
import tarfile

import numpy as np
from torch.utils.data import Dataset

from util.data.bad_images import ReplacesUnreadable
from util.data.bands import check_first, load_bands
from util.data.base import check_folder, needs_val, readable_dir, require_data_path
from util.errors import UserError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "pgm", "bmp", "tif", "tiff", "npy")
SPLITS = {"train": "train-*.tar", "val": "val-*.tar"}
MAKE = "python -m util.make_shards SRC OUT"
WHAT = f"a folder of train-*.tar / val-*.tar shards and classes.json ({MAKE})"  # what --data_path names
MAX_OPEN = 256  # open shards kept per process (least recently used closed first)


def shard_paths(folder, split):
    return sorted(glob.glob(os.path.join(folder, SPLITS[split])))


def read_classes(folder):
    path = os.path.join(folder, "classes.json")
    try:
        with open(path, encoding="utf-8") as f:
            classes = json.load(f)
    except FileNotFoundError:
        raise UserError(f"--data_path {folder} has no classes.json (the class names in label order); "
                        f"write the shards with {MAKE}") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read as JSON ({e}); write it again with {MAKE}") from None
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        raise UserError(f"{path} must be a JSON list of class names (label order); write it again with {MAKE}")
    return classes


def _stamp(path):
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def write_index(path, rows):
    """`<shard>.idx.json` beside a shard: its samples' offsets, valid while the shard's size and
    modification time are those recorded (util.make_shards writes it; a reader without it scans)."""
    from models.atomic import atomic_write_text
    index = {"shard": _stamp(path), "samples": [list(r) for r in rows]}
    atomic_write_text(path + ".idx.json", json.dumps(index, separators=(",", ":")) + "\n")


def read_shard(path, n_classes):
    """The samples of one shard: from its index file where that still describes it, else scanned."""
    try:
        with open(path + ".idx.json", encoding="utf-8") as f:
            index = json.load(f)
        if index["shard"] == _stamp(path):
            rows = [(str(k), int(o), int(n), int(lb)) for k, o, n, lb in index["samples"]]
            return _pair(path, {k: (o, n) for k, o, n, _ in rows}, {k: lb for k, _, _, lb in rows}, n_classes, False)
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no index, or not one of ours: read the headers
    return scan_shard(path, n_classes)


def scan_shard(path, n_classes, first_only=False):
    """[(key, data offset, size, label)] of one shard's samples; a sample without a label, or
    a label that is not a class of classes.json, is refused."""
    images, labels = {}, {}
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                folder, name = os.path.split(m.name)
                stem, _, ext = name.partition(".")  # the key: the path up to its file name's first dot
                key, ext = os.path.join(folder, stem), ext.lower()
                if ext in IMAGE_EXTS:
                    images[key] = (m.offset_data, m.size)
                elif ext == "cls":
                    try:
                        labels[key] = int(tar.extractfile(m).read().decode("ascii").strip())
                    except (ValueError, UnicodeDecodeError):
                        raise UserError(f"{path}: {key}.cls is not a class index; each <key>.cls holds the "
                                        "label as text, e.g. 3") from None
                if first_only and images.keys() & labels.keys():
                    break
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UserError(f"shard {path} is not a readable tar file ({type(e).__name__}: {e}); "
                        f"write it again with {MAKE}") from None
    return _pair(path, images, labels, n_classes, first_only)


def _pair(path, images, labels, n_classes, first_only):
    out = []
    for key, (offset, size) in images.items():
        if key not in labels:
            if first_only:
                continue
            raise UserError(f"shard {path}: sample {key} has no label ({key}.cls); every sample needs "
                            f"<key>.cls with its class index; write the shards again with {MAKE}")
        if not 0 <= labels[key] < n_classes:
            raise UserError(f"shard {path}: sample {key} has label {labels[key]}, but classes.json lists "
                            f"{n_classes} classes (labels 0 to {n_classes - 1}); the shards and classes.json "
                            f"do not belong together: write them again with {MAKE}")
        out.append((key, offset, size, labels[key]))
        if first_only:
            break
    if not out and not first_only:
        raise UserError(f"shard {path} holds no image samples (<key>.jpg/.png/.npy/.tif and <key>.cls); "
                        f"write it again with {MAKE}")
    return out


class ShardSamples(ReplacesUnreadable, Dataset):
    """The samples of one split's shards, read by offset; `classes` and `targets` as an ImageFolder's."""

    def __init__(self, paths, classes, transform=None, in_chans=3):
        self.paths, self.classes, self.transform, self.in_chans = list(paths), list(classes), transform, in_chans
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        rows = [(s, *r) for s, p in enumerate(self.paths) for r in read_shard(p, len(self.classes))]
        self.keys = [r[1] for r in rows]
        self.where = np.array([(r[0], r[2], r[3]) for r in rows], dtype=np.int64).reshape(-1, 3)
        self.targets = [r[4] for r in rows]
        self.samples = _Samples(self)
        self._files, self._pid = {}, None

    def __len__(self):
        return len(self.targets)

    def __getstate__(self):  # workers started by spawn open their own files
        return {**self.__dict__, "_files": {}, "_pid": None}

    def still_unreadable(self, name):
        """`shard.tar:key` of an earlier launch's bad-image list: still in these shards and unreadable?"""
        from util.data.bad_images import _readable
        shard, _, key = name.rpartition(":")
        if shard not in self.paths:
            return False
        rows = np.flatnonzero(self.where[:, 0] == self.paths.index(shard))
        index = next((int(i) for i in rows if self.keys[i] == key), None)
        return index is not None and not _readable(SampleRef(index, self), self.loader)

    def loader(self, ref):
        """The sample `ref.index` (util/data/bands.load_bands), decoded now (a damaged one fails
        here; with --jpeg_draft a Pillow image is opened only: the transform decodes it)."""
        shard, offset, size = (int(v) for v in self.where[ref.index])
        data = os.pread(self._fd(shard), size, offset)
        if len(data) != size:
            raise OSError(f"short read ({len(data)} of {size} bytes)")
        lazy = getattr(self.transform, "decodes", False)  # --jpeg_draft: util/data/decode.draft_first's mark
        return load_bands(io.BytesIO(data), self.in_chans, name=ref, lazy=lazy)

    def _fd(self, shard):
        if self._pid != os.getpid():  # a forked worker: its own descriptors (the inherited closed here)
            for inherited in self._files.values():
                os.close(inherited)
            self._files, self._pid = {}, os.getpid()
        fd = self._files.pop(shard, None)
        if fd is None:
            if len(self._files) >= MAX_OPEN:
                os.close(self._files.pop(next(iter(self._files))))
            fd = os.open(self.paths[shard], os.O_RDONLY)
        self._files[shard] = fd  # the most recently used last
        return fd


class SampleRef:
    """One sample as ReplacesUnreadable sees it: its name (`shard.tar:key`) in logs."""
    __slots__ = ("index", "dataset")

    def __init__(self, index, dataset):
        self.index, self.dataset = index, dataset

    def __str__(self):
        ds = self.dataset
        return f"{ds.paths[ds.where[self.index, 0]]}:{ds.keys[self.index]}"


class _Samples:
    """(SampleRef, target) pairs, made on demand (no list of a million tuples)."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds.targets)

    def __getitem__(self, i):
        return SampleRef(i, self.ds), self.ds.targets[i]


def _paths(args, is_train):
    folder = args.data_path if is_train else (getattr(args, "eval_data_path", None) or args.data_path)
    readable_dir(folder, "--data_path" if folder == args.data_path else "--eval_data_path")
    split = "train" if is_train else "val"
    paths = shard_paths(folder, split)
    if not paths:
        fix = f"write them with {MAKE}" if is_train else "give --eval_data_path or --disable_eval True"
        raise UserError(f"{folder} holds no {split} shards ({SPLITS[split]}); {fix}")
    return paths


def build(is_train, args, transform):
    require_data_path(args, WHAT)
    classes = read_classes(args.data_path)
    ds = ShardSamples(_paths(args, is_train), classes, transform, args.in_chans)
    if len(ds):
        _check_first(ds.paths[int(ds.where[0, 0])], *(int(v) for v in ds.where[0, 1:]), ds.keys[0], args, is_train)
    if is_train:
        missing = sorted(set(range(len(classes))) - set(ds.targets))
        if missing:
            shown = ", ".join(repr(classes[i]) for i in missing[:3]) + (", ..." if len(missing) > 3 else "")
            raise UserError(f"classes.json lists {len(classes)} classes but the training shards hold no sample "
                            f"of {len(missing)} of them ({shown}); the shards and classes.json do not belong "
                            f"together: write them again with {MAKE}")
    return ds, len(classes)


def num_classes(args):
    require_data_path(args, WHAT)
    return len(read_classes(args.data_path))


def _check_first(path, offset, size, key, args, is_train):
    """A split's first sample read (util/data/bands.check_first): its bands, its file type."""
    with open(path, "rb") as f:
        data = os.pread(f.fileno(), size, offset)
    check_first(io.BytesIO(data), args.in_chans, "training" if is_train else "validation", f"{path}:{key}")


def check(args):
    """classes.json, the shards of each split the run reads, the first sample of each shard
    (its header, image and label; the full index is read at the job's start) and the bands of
    each split's first sample."""
    check_folder(args, WHAT)
    n = len(read_classes(args.data_path))
    for is_train in (True, False) if needs_val(args) else (True,):
        for i, path in enumerate(_paths(args, is_train)):
            first = scan_shard(path, n, first_only=True)
            if not first:
                raise UserError(f"shard {path}: its first image has no label (<key>.cls); write the shards "
                                f"again with {MAKE}")
            if i == 0:
                key, offset, size, _ = first[0]
                _check_first(path, offset, size, key, args, is_train)

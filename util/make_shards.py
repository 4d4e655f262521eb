"""Turn an image folder into tar shards for --data_set wds (util/data/wds.py):

    python -m util.make_shards SRC OUT --shard_size 1000

SRC holds `train/<class>/*` and, optionally, `val/<class>/*` (the same class folders). OUT gets
`train-000000.tar`, ..., `val-000000.tar`, ... in the WebDataset layout (`<key>.jpg`, `.png`,
`.npy`, `.tiff`, ...: the file's own bytes, plus `<key>.cls`, the class index), each with its index
`<shard>.idx.json` (the samples' byte offsets), and `classes.json` (the class names sorted, as an
image folder's). Each split's samples are shuffled once (--seed) so a
shard mixes classes, which streaming readers need. Every shard is written atomically and
classes.json last: a folder with classes.json is complete. Mistakes are one line, exit 2, with
nothing written.
"""
import argparse
import glob
import io
import json
import os
import sys
import tarfile

import numpy as np

from models.atomic import atomic_file, atomic_write_text
from util.data.wds import scan_shard, write_index
from util.errors import UserError, user_errors

EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp", ".ppm": "ppm", ".pgm": "pgm",
              ".bmp": "bmp", ".tif": "tiff", ".tiff": "tiff", ".npy": "npy"}


def list_split(root, what):
    """(class names sorted, [(image path, label)]) of one split's class folders."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise UserError(f"{what} folder {root} has no class folders; it must hold <class>/<image> files")
    samples = []
    for label, c in enumerate(classes):
        files = sorted(e.path for e in os.scandir(os.path.join(root, c))
                       if e.is_file() and os.path.splitext(e.name)[1].lower() in EXTENSIONS)
        if not files:
            raise UserError(f"{what} class folder {os.path.join(root, c)} holds no image "
                            f"({', '.join(sorted(set(EXTENSIONS)))}); every class folder needs at least one")
        samples += [(f, label) for f in files]
    return classes, samples


def plan(src, out, shard_size):
    """{split: samples}, the classes; every check before anything is written."""
    if shard_size < 1:
        raise UserError(f"--shard_size {shard_size} must be >= 1 (samples per shard), e.g. 1000")
    train = os.path.join(src, "train")
    if not os.path.isdir(train):
        raise UserError(f"{src} has no train/ folder; SRC must hold train/<class>/ (and val/<class>/) images")
    classes, samples = list_split(train, "training")
    splits = {"train": samples}
    val = os.path.join(src, "val")
    if os.path.isdir(val):
        val_classes, splits["val"] = list_split(val, "validation")
        if val_classes != classes:
            only_train = sorted(set(classes) - set(val_classes))[:3]
            only_val = sorted(set(val_classes) - set(classes))[:3]
            raise UserError(f"{src}: train/ and val/ have different class folders (only in train: {only_train}, "
                            f"only in val: {only_val}); both need the same class folders")
    taken = [p for p in ("train-*.tar", "val-*.tar", "classes.json") if glob.glob(os.path.join(out, p))]
    if taken:
        raise UserError(f"{out} already holds shards ({', '.join(taken)}); give a new folder or remove them")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"{out} is a file; give a folder for the shards")
    return splits, classes


def write_shard(path, samples, first):
    """One tar: `<key>.<ext>` (the file's bytes) and `<key>.cls` for each sample; keys count on
    from `first`, so they are unique in the split."""
    with atomic_file(path) as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i, (image, label) in enumerate(samples):
            key = f"{first + i:08d}"
            with open(image, "rb") as img:
                data = img.read()
            ext = EXTENSIONS[os.path.splitext(image)[1].lower()]
            for name, payload in ((f"{key}.{ext}", data), (f"{key}.cls", str(label).encode())):
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(payload), 0o644, 0
                tar.addfile(info, io.BytesIO(payload))


def make_shards(src, out, shard_size, seed=0):
    """Write the shards and classes.json; returns {split: (shards, samples)}."""
    splits, classes = plan(src, out, shard_size)
    os.makedirs(out, exist_ok=True)
    made = {}
    for split, samples in splits.items():
        order = np.random.default_rng(seed).permutation(len(samples))
        samples = [samples[i] for i in order]
        starts = range(0, len(samples), shard_size)
        for n, start in enumerate(starts):
            path = os.path.join(out, f"{split}-{n:06d}.tar")
            write_shard(path, samples[start:start + shard_size], start)
            write_index(path, scan_shard(path, len(classes)))
        made[split] = (len(starts), len(samples))
    atomic_write_text(os.path.join(out, "classes.json"), json.dumps(classes, indent=0) + "\n")
    return made


@user_errors()
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", metavar="SRC", help="image folder with train/<class>/ and val/<class>/")
    p.add_argument("out", metavar="OUT", help="folder for the shards and classes.json (new, or without shards)")
    p.add_argument("--shard_size", type=int, default=1000, help="samples per shard")
    p.add_argument("--seed", type=int, default=0, help="the order of the samples in the shards")
    a = p.parse_args(argv)
    made = make_shards(a.src, a.out, a.shard_size, a.seed)
    parts = [f"{shards} {split} shard(s) ({n} samples)" for split, (shards, n) in made.items()]
    print(f"wrote {' and '.join(parts)} and classes.json to {a.out}")


if __name__ == "__main__":
    sys.exit(main())

"""One reader for every sample file: images Pillow reads, `.npy` arrays and (multi-page) TIFF files.

`load_bands(src, in_chans)` gives what the transforms take (util/data/transforms.py), either
 (a) a PIL image in RGB: --in_chans 3 and an 8-bit image Pillow reads (L, P, RGBA, CMYK... are
     converted as they always were), or a 3-band uint8 array; or
 (b) a float32 tensor [in_chans, H, W]: uint8 / 255, 16-bit / 65535, float data as stored.
Pillow images keep their bands off 3 (L and I;16: one, LA two, RGB three, RGBA and CMYK four);
a `.npy` array is [C, H, W] or [H, W, C] (or [H, W] with --in_chans 1) of uint8, uint16 or
float32; a TIFF's pages are stacked as bands (a page of S samples gives S bands).

A file that cannot be a sample raises `BadSample` (a ValueError naming the file): during a run
it is replaced and counted like an unreadable image (util/data/bad_images.py). A `FormatError`
(a band count other than --in_chans, a layout or data type we do not read, a file type nothing
reads, TIFF pages of different sizes) in a split's first sample ends the launch before any
compute, in one line (`check_first`). Imports no torch until a tensor is made.
"""
import functools
import os

import numpy as np
from PIL import Image

# what an image folder lists: torchvision's IMG_EXTENSIONS and .npy (make_shards packs the same)
EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".npy")
HIGH_BIT = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")  # Pillow modes that are not 8-bit data
_TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")  # classic and BigTIFF, either byte order


class BadSample(ValueError):
    """A file that is no usable sample (during a run: replaced and counted as an unreadable image)."""


class FormatError(BadSample):
    """A file of a kind or shape the run cannot use; in a split's first sample, one line before any compute."""


def is_sample_file(path):
    """Whether an image folder lists this file (ImageFolder's `is_valid_file`)."""
    return path.lower().endswith(EXTENSIONS)


def _n(k, what):
    return f"{k} {what}{'' if k == 1 else 's'}"


def mismatch(name, bands, in_chans, shape=""):
    return FormatError(f"{name} has {_n(bands, 'band')}{shape}, but --in_chans is {in_chans}; pass --in_chans "
                       f"{bands} (and {_n(bands, 'value')} to --mean/--std if you give them), or use files of "
                       f"{_n(in_chans, 'band')}")


def load_bands(src, in_chans, name=None, lazy=False):
    """The sample in file `src` (a path, or a seekable binary file such as a tar member's bytes),
    as (a) or (b) above; `name` names it in errors (default: the path). `lazy` (--jpeg_draft):
    a path (a) image is returned opened, not decoded (util/data/decode.py decodes it)."""
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        name = path if name is None else name
        suffix = os.path.splitext(path)[1].lower()
        if lazy and in_chans == 3 and suffix in _pillow_suffixes() and suffix not in (".tif", ".tiff"):
            img = Image.open(path)  # Pillow closes the file once the transform decodes it
            if img.mode not in HIGH_BIT:
                return img
            img.close()
        with open(path, "rb") as f:
            return _read(f, in_chans, name, suffix, False)
    return _read(src, in_chans, "the sample" if name is None else str(name), "", lazy)


def _read(f, in_chans, name, suffix, lazy):
    head = f.read(8)
    f.seek(0)
    if head.startswith(b"\x93NUMPY"):
        return _sample(_npy(f, in_chans, name), in_chans, name)
    tiff = head[:4] in _TIFF_MAGIC
    if suffix == ".npy":
        raise BadSample(f"{name} is not a readable .npy array (no NumPy header)")
    if not tiff and suffix and suffix not in _pillow_suffixes() | {".tif", ".tiff"}:
        raise FormatError(f"{name}: no reader for {suffix} files; use images Pillow reads (.png, .jpg, ...), "
                          ".npy arrays or .tif/.tiff files")
    arr = None
    if not tiff or in_chans == 3:  # an 8-bit one-page TIFF with 3 bands stays on Pillow's path, as before
        arr = _pillow(f, in_chans, lazy, tiff)
        if isinstance(arr, Image.Image):
            return arr
    if arr is None:
        f.seek(0)
        arr = _tiff(f, name)
    return _sample(arr, in_chans, name)


@functools.lru_cache(maxsize=1)
def _pillow_suffixes():
    Image.init()
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def _pillow(f, in_chans, lazy, tiff):
    """Path (a) as an RGB image; else the bands [C, H, W]; None: a TIFF for tifffile."""
    try:
        img = Image.open(f)
    except Exception:
        if tiff:
            return None  # a TIFF layout Pillow does not read
        raise
    if in_chans == 3 and img.mode not in HIGH_BIT and not (tiff and getattr(img, "n_frames", 1) > 1):
        return img if lazy else img.convert("RGB")
    if tiff:
        return None
    img.load()
    if img.mode in ("1", "P", "PA"):
        img = img.convert({"1": "L", "PA": "RGBA"}.get(img.mode, "RGBA" if img.has_transparency_data else "RGB"))
    if img.mode == "I":  # 32-bit integer pixels: Pillow's mode for 16-bit files of several formats
        return (np.asarray(img, dtype=np.float32) / 65535)[None]
    arr = np.asarray(img)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _npy(f, in_chans, name):
    try:
        arr = np.load(f, allow_pickle=False)
    except ValueError as e:  # pickled objects, or a damaged header
        raise BadSample(f"{name} is not a readable .npy array ({e})") from None
    if arr.ndim == 2 and in_chans > 1:
        raise FormatError(f"{name} is a 2-D array {tuple(arr.shape)} (one band), but --in_chans is {in_chans}; "
                          f"save it as [C, H, W] or [H, W, C] with {in_chans} bands, or pass --in_chans 1")
    if arr.ndim == 2:
        return arr[None]
    if arr.ndim != 3:
        raise FormatError(f"{name} has shape {tuple(arr.shape)}; a .npy sample is [C, H, W] or [H, W, C] "
                          "(or [H, W] with --in_chans 1)")
    if arr.shape[0] == in_chans:
        return arr
    if arr.shape[2] == in_chans:
        return arr.transpose(2, 0, 1)
    raise mismatch(name, min(arr.shape[0], arr.shape[2]), in_chans, f" (shape {tuple(arr.shape)})")


def _tiff(f, name):
    """The pages stacked as bands [C, H, W]; a page of S samples (RGB, or planar) gives S bands."""
    import tifffile
    with tifffile.TiffFile(f) as tif:
        pages = list(tif.pages)
        sizes = [(p.imagelength, p.imagewidth) for p in pages]
        if len(set(sizes)) > 1:
            shown = ", ".join(f"{h}x{w}" for h, w in sizes[:4]) + (", ..." if len(sizes) > 4 else "")
            raise FormatError(f"{name}: its pages differ in size ({shown}); a multi-page TIFF sample holds one "
                              "band per page, all of one size: write it again with pages of equal size")
        bands = []
        for page, (h, w) in zip(pages, sizes):
            a = page.asarray()
            a = np.moveaxis(a, -1, 0) if page.axes.endswith("S") else a
            bands.append(a.reshape(-1, h, w))
    return bands[0] if len(bands) == 1 else np.concatenate(bands)


def _sample(arr, in_chans, name):
    """[C, H, W] data -> (a) or (b)."""
    if arr.shape[0] != in_chans:
        raise mismatch(name, arr.shape[0], in_chans)
    kind, size = arr.dtype.kind, arr.dtype.itemsize
    if kind == "u" and size == 1 and in_chans == 3:
        return Image.fromarray(np.ascontiguousarray(arr.transpose(1, 2, 0)), "RGB")
    if kind == "u" and size in (1, 2):
        out = np.divide(arr, 255 if size == 1 else 65535, dtype=np.float32)
    elif kind == "f":
        out = arr.astype(np.float32, order="C")
        if not np.isfinite(out).all():
            raise BadSample(f"{name} holds NaN or infinite values")
    else:
        raise FormatError(f"{name} holds {arr.dtype} data; save uint8, uint16 or float32")
    import torch
    return torch.from_numpy(np.ascontiguousarray(out))


class BandLoader:
    """An image folder's or CSV list's loader: `load_bands` with the run's --in_chans. `lazy`
    (--jpeg_draft): a Pillow image opened, not decoded; `finish` decodes it (bad_images._load)."""

    def __init__(self, in_chans=3, lazy=False):
        self.in_chans, self.lazy = in_chans, lazy

    def __call__(self, path):
        return load_bands(path, self.in_chans, lazy=self.lazy)

    @staticmethod
    def finish(sample):
        if isinstance(sample, Image.Image):
            from util.data.decode import decode_rgb
            return decode_rgb(sample)
        return sample


def loader_for(args):
    return BandLoader(args.in_chans, args.jpeg_draft)


def check_first(src, in_chans, what, name=None):
    """A split's first sample, read now (`what`: "training" or "validation"): a FormatError ends
    the launch in one line (UserError); a damaged or non-finite sample is left to the run, which
    replaces and counts it."""
    from util.errors import UserError
    try:
        load_bands(src, in_chans, name)
    except FormatError as e:
        raise UserError(f"the first {what} sample: {e}") from None
    except Exception:
        pass

"""--jpeg_draft: a JPEG whose crop is shrunk at least 2x anyway is decoded at 1/2, 1/4 or 1/8
size (libjpeg's DCT scaling, Pillow's `Image.draft`), and the crop box is mapped onto the
smaller image.

The image file is opened lazily (`open_lazily`: the header only, so the size is known), the
transform's first op draws its crop exactly as without the flag (the same get_params, the same
RNG, the same order), asks for the largest reduction that keeps the crop at least as large as
its output in both directions, decodes, and resizes the mapped box in one Pillow call. When the
reduction would be 1 (crop shrunk < 2x), or the image is not a JPEG, or it is decoded already,
the crop is still decoded in full. A file that fails to decode raises `UnreadableImage`, which
the datasets count and replace like an image that fails to open (util/data/bad_images.py).

The crop-and-resize itself runs in torch's uint8 antialiased kernel (`simd_resized_crop`, about
3x Pillow's with the conversions; the same filters, pixels equal up to rounding) for bilinear and bicubic;
Pillow's for the other interpolations and for a drafted image's fractional box."""
import functools
import random

import numpy as np
import torch
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms
from torchvision.transforms import functional as F

SCALES = (8, 4, 2)  # libjpeg's DCT scaling factors Pillow's draft uses (1 = no reduction)


class UnreadableImage(OSError):
    """An image that opened (its header is fine) but failed to decode, in a transform."""


def decode_rgb(img):
    """`img` decoded now, in RGB (no copy when it is RGB already); a decoding error is UnreadableImage."""
    try:
        img.load()
    except Exception as e:  # truncated or corrupt data: the user's file, counted and replaced
        raise UnreadableImage(f"{type(e).__name__}: {e}") from e
    return img if img.mode == "RGB" else img.convert("RGB")


def open_lazily(path):
    """The loader of an image folder or a CSV list under --jpeg_draft: the file opened, not
    decoded (the transform decodes)."""
    return Image.open(path)


# for a transform that does not decode (util/data/bad_images._load): the image decoded in RGB
open_lazily.lazy, open_lazily.finish = True, decode_rgb


def reduction(img, shrink):
    """The draft scale (8, 4, 2 or 1) for an image whose crop is shrunk `shrink` times; 1 unless
    `img` is a JPEG not yet decoded and Pillow's draft would choose exactly that scale."""
    if shrink < 2 or getattr(img, "format", None) != "JPEG" or len(getattr(img, "tile", ())) != 1:
        return 1, None
    w, h = img.size
    for s in SCALES:
        if s > shrink:
            continue
        req = (max(1, w // s), max(1, h // s))
        got = min(w // req[0], h // req[1])
        if next((c for c in SCALES if got >= c), 1) == s:
            return s, req
    return 1, None


def drafted(img, shrink):
    """Decode `img` (a lazily opened image) at the largest reduction its crop allows; returns the
    RGB image and the factor mapping full-size coordinates onto it (1.0: decoded at full size)."""
    s, req = reduction(img, shrink)
    full_w = img.size[0]
    ratio = 1.0
    if s > 1:
        got = img.draft("RGB", req)
        if got is not None:
            ratio = got[1][2] / full_w  # Pillow's box of the whole image on the reduced one: 1 / s
    return decode_rgb(img), ratio


def _pil_interp(interpolation):
    if isinstance(interpolation, int):
        return interpolation
    return F.pil_modes_mapping[interpolation]


TORCH_MODES = {Image.BILINEAR: "bilinear", Image.BICUBIC: "bicubic"}  # Pillow's filters torch reproduces


def pillow_resized_crop(img, box, size, interpolation):
    """timm's and torchvision's op: `img.crop(box)` resized to `size` (w, h) by Pillow."""
    left, top, right, bottom = box
    return F.resized_crop(img, top, left, bottom - top, right - left, [size[1], size[0]], interpolation)


def simd_resized_crop(img, box, size, interpolation):
    """Pillow's `img.crop(box).resize(size, interpolation)` (torchvision's resized_crop) through
    torch's uint8 antialiased interpolate, which ports Pillow's filters to SIMD: on these CPUs
    about 3x faster with the conversions, pixels equal up to rounding (mean abs diff about 0.02
    in 0-255 units, up to about 10 levels at a few sharp edges). Pillow's own where torch has
    no equal (nearest, lanczos, box, hamming), for a mode other than RGB, or a box reaching
    outside the image (Pillow pads it)."""
    mode = TORCH_MODES.get(_pil_interp(interpolation))
    left, top, right, bottom = box
    inside = 0 <= left < right <= img.size[0] and 0 <= top < bottom <= img.size[1]
    if mode is None or img.mode != "RGB" or not inside:
        return pillow_resized_crop(img, box, size, interpolation)
    hwc = torch.from_numpy(np.array(img.crop(box)))  # the crop copied out, writable, channels last
    out = torch.nn.functional.interpolate(hwc.permute(2, 0, 1).unsqueeze(0), size=(size[1], size[0]),
                                          mode=mode, antialias=True)[0].contiguous().numpy()
    # three planes merged by Pillow: ~10x faster than transposing to height x width x 3 first
    return Image.merge("RGB", [Image.frombuffer("L", size, out[c], "raw", "L", 0, 1) for c in range(3)])


def resized_box(img, ratio, box, size, interpolation):
    """The crop `box` (left, top, right, bottom on the full-size image) of `img` (decoded at
    `ratio` of its full size) resized to `size` (w, h)."""
    if ratio == 1.0:
        return simd_resized_crop(img, box, size, interpolation)
    return img.resize(size, _pil_interp(interpolation), box=tuple(v * ratio for v in box))


def _drafted_crop(op, img):
    """timm's RandomResizedCropAndInterpolation (fine-tuning: Python's RNG) or torchvision's
    RandomResizedCrop (FCMAE pretraining: torch's RNG), `op`, drafting the decode: the same draws."""
    i, j, h, w = op.get_params(img, op.scale, op.ratio)
    interpolation = op.interpolation
    if isinstance(interpolation, (tuple, list)):  # timm's "random": one of them per image
        interpolation = random.choice(interpolation)
    box = (j, i, j + w, i + h)
    out_h, out_w = op.size if isinstance(op.size, (tuple, list)) else (op.size, op.size)
    img, ratio = drafted(img, min(w / out_w, h / out_h))
    return resized_box(img, ratio, box, (out_w, out_h), interpolation)


def resize_size(w, h, size, max_size=None):
    """(w, h) that torchvision's Resize(size) gives an image of w x h."""
    if isinstance(size, (tuple, list)) and len(size) == 2:
        return size[1], size[0]
    size = size[0] if isinstance(size, (tuple, list)) else size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    if max_size is not None and new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_short, new_long) if w <= h else (new_long, new_short)


def _drafted_resize(op, img):
    """torchvision's Resize `op` (evaluation: before the centre crop), drafting the decode."""
    w, h = img.size
    out_w, out_h = resize_size(w, h, op.size, op.max_size)
    img, ratio = drafted(img, min(w / out_w, h / out_h))
    if ratio == 1.0:
        return simd_resized_crop(img, (0, 0, w, h), (out_w, out_h), op.interpolation)
    return img.resize((out_w, out_h), _pil_interp(op.interpolation), box=(0, 0, w * ratio, h * ratio))


DRAFTS = {RandomResizedCropAndInterpolation: _drafted_crop, transforms.RandomResizedCrop: _drafted_crop,
          transforms.Resize: _drafted_resize}


def drafting(op):
    """`op` (a random resized crop or a resize, as DRAFTS lists) that decodes a lazily opened
    image itself, at the largest reduction its output allows; it pickles (DataLoader workers)."""
    return functools.partial(DRAFTS[type(op)], op)


def draft_first(transform):
    """`transform` (a Compose) with its first op, a random resized crop or a resize, replaced by
    its drafting twin; the Compose is marked `decodes` (its first op decodes a lazily opened
    image). Returned unchanged when the first op is none of those."""
    ops = getattr(transform, "transforms", None)
    if ops and type(ops[0]) in DRAFTS:
        ops[0] = drafting(ops[0])
        transform.decodes = True
    return transform

"""Write a benchmark image folder of ImageNet-like JPEGs: OUT/train/<class>/*.jpg and
OUT/val/<class>/*.jpg, about 500x375 (sizes vary a little, a quarter portrait; --scale for
larger images), quality 90, varied content (gradients, shapes, textured noise, soft blur),
seeded: the same arguments give the same files. NumPy + Pillow only.

    python -m benchmarks.make_bench_images OUT --images 256 --classes 8 [--val_images 32]
"""
import argparse
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def _size(rng, scale):
    w, h = int(rng.integers(440, 541) * scale), int(rng.integers(330, 406) * scale)
    return (h, w) if rng.random() < 0.25 else (w, h)  # a quarter portrait


def bench_image(rng, scale=1.0):
    """One image: a colour gradient, textured noise at a random grain, shapes, a soft blur."""
    w, h = _size(rng, scale)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, np.pi)
    t = (xx * np.cos(angle) + yy * np.sin(angle)) / (w + h)
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    grain = int(rng.choice([1, 1, 2, 2, 4, 8]))  # texture: noise upsampled from a coarse grid
    small = rng.normal(0, 1, (h // grain + 1, w // grain + 1, 3)).astype(np.float32)
    noise = np.repeat(np.repeat(small, grain, 0), grain, 1)[:h, :w]
    img += noise * rng.uniform(8, 40)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(pil)
    for _ in range(int(rng.integers(3, 12))):
        x0, y0 = rng.uniform(-0.1, 0.9) * w, rng.uniform(-0.1, 0.9) * h
        x1, y1 = x0 + rng.uniform(0.05, 0.6) * w, y0 + rng.uniform(0.05, 0.6) * h
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        kind = rng.integers(3)
        if kind == 0:
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif kind == 1:
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            pts = [(float(rng.uniform(x0, x1)), float(rng.uniform(y0, y1))) for _ in range(int(rng.integers(3, 7)))]
            draw.polygon(pts, fill=fill)
    if rng.random() < 0.5:
        pil = pil.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.0))))
    return pil


def write_set(out, images=256, classes=8, val_images=None, seed=0, quality=90, scale=1.0):
    """Write `images` training and `val_images` (default images // 8, at least classes)
    validation JPEGs under `out`; returns `out`."""
    val_images = val_images if val_images is not None else max(classes, images // 8)
    rng = np.random.default_rng(seed)
    for split, n in (("train", images), ("val", val_images)):
        for i in range(n):
            folder = os.path.join(out, split, f"c{i % classes:03d}")
            os.makedirs(folder, exist_ok=True)
            bench_image(rng, scale).save(os.path.join(folder, f"{i:06d}.jpg"), quality=quality)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--images", type=int, default=256, help="training images")
    p.add_argument("--classes", type=int, default=8)
    p.add_argument("--val_images", type=int, default=None, help="validation images (default: images // 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--scale", type=float, default=1.0, help="image size factor (2: about 1000x750)")
    a = p.parse_args(argv)
    write_set(a.out, a.images, a.classes, a.val_images, a.seed, a.quality, a.scale)
    print(a.out)


if __name__ == "__main__":
    main()

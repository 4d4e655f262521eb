"""Images per second per loader worker of our training data pipeline against a plain one, on
one image folder, timed round-robin:

- `plain`: torchvision ImageFolder + timm create_transform(is_training=True), our fine-tuning
  recipe (RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, bicubic, ImageNet mean/std),
  float tensors out, as a CPU-only pipeline does;
- `uint8`: ours with --device_transforms true (uint8 tensors; normalisation and random erasing
  run on the training device, not timed here);
- `ours`: uint8 plus --jpeg_draft True (what a GPU run uses: reduced-size decoding where the
  crop allows, the crop resized by torch's SIMD uint8 kernel): img_per_s_per_worker.

Also: how often the draft fired, and how our crops differ from timm's of the same boxes (the
SIMD resize over all crops; the drafted crops: mean absolute difference in 0-255 units,
per-channel mean and std of both).

    python -m benchmarks.bench_data [--data_path DIR] [--workers 1 2] [--input_size 224] [--json]
    python -m benchmarks.bench_data --bands 4 [--workers 1 2]   # uint16 .npy, 4 bands (issue 23)

Without --data_path a temporary set is written by benchmarks/make_bench_images.py.
"""
import argparse
import contextlib
import json
import os
import random
import statistics
import tempfile
import time

import numpy as np
import torch

CONTENDERS = ("plain", "uint8", "ours")


def _args(data_path, input_size, draft):
    from main_finetune import get_args_parser
    from util.config import parse_args
    return parse_args(get_args_parser(), ["--data_set", "image_folder", "--data_path", data_path,
                                          "--input_size", str(input_size), "--jpeg_draft", str(draft)])


def datasets(data_path, input_size):
    """{name: training dataset} of the three pipelines, over the same files."""
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder

    from util.data import build_dataset, build_transform
    from util.data.transforms import IMAGENET_MEAN, IMAGENET_STD, _guard_posterize
    a = _args(data_path, input_size, False)
    # timm's transform as it is, but Pillow 13's posterize refuses 0 bits: the suite's guard
    plain = ImageFolder(os.path.join(data_path, "train"), transform=_guard_posterize(create_transform(
        input_size=input_size, is_training=True, auto_augment=a.aa, scale=(0.08, 1.0),
        interpolation=a.train_interpolation, re_prob=a.reprob, re_mode=a.remode, re_count=a.recount,
        mean=IMAGENET_MEAN, std=IMAGENET_STD)))
    out = {"plain": plain}
    for name, draft in (("uint8", False), ("ours", True)):
        a = _args(data_path, input_size, draft)
        out[name] = build_dataset(True, a, transform=build_transform(True, a, uint8=True))[0]
    return out


def _seed_worker(worker_id):
    random.seed(1000 + worker_id)
    torch.manual_seed(1000 + worker_id)


def time_loaders(sets, workers, rounds, batch_size=32):
    """{name: [seconds per pass]} over each dataset with `workers` DataLoader workers
    (persistent; one untimed pass first), the contenders interleaved round by round."""
    from torch.utils.data import DataLoader
    loaders = {n: DataLoader(ds, batch_size=batch_size, num_workers=workers, shuffle=False,
                             persistent_workers=workers > 0, worker_init_fn=_seed_worker)
               for n, ds in sets.items()}
    times = {n: [] for n in sets}
    for r in range(rounds + 1):
        for n, ld in loaders.items():
            random.seed(r)
            torch.manual_seed(r)
            t0 = time.perf_counter()
            for _ in ld:
                pass
            if r:  # the first pass starts the workers and warms the caches
                times[n].append(time.perf_counter() - t0)
    return times


@contextlib.contextmanager
def counting_drafts():
    """{"hits", "calls"}: how often the draft fired (decoded at reduced size) in this process, of
    how many drafting decodes, while inside (util.data.decode.drafted wrapped, then restored)."""
    from util.data import decode
    counts, plain = {"hits": 0, "calls": 0}, decode.drafted

    def counted(img, shrink):
        img, ratio = plain(img, shrink)
        counts["calls"] += 1
        counts["hits"] += ratio != 1.0
        return img, ratio
    decode.drafted = counted
    try:
        yield counts
    finally:
        decode.drafted = plain


def draft_hit_rate(ds, limit=512):
    """The share of training samples whose crop the draft decoded at reduced size (in-process)."""
    random.seed(0)
    torch.manual_seed(0)
    with counting_drafts() as counts:
        for i in range(min(len(ds), limit)):
            ds[i]
    return counts["hits"] / max(counts["calls"], 1), counts["calls"]


def pixel_stats(data_path, input_size, limit=256):
    """Our crops against timm's (a full decode, Pillow's crop and resize) of the same boxes (timm's
    RandomResizedCrop params): over every crop, the SIMD resize's mean and largest absolute
    difference (0-255); over the crops where the draft fires, the mean absolute difference, its
    99th percentile and the per-channel mean and std of both."""
    import glob

    from PIL import Image
    from timm.data.transforms import RandomResizedCropAndInterpolation as RRC

    from util.data.decode import decode_rgb, drafted, pillow_resized_crop, resized_box
    rrc = RRC(input_size, interpolation="bicubic")
    files = sorted(glob.glob(os.path.join(data_path, "train", "*", "*.jpg")))[:limit]
    rng = random.Random(0)
    full, draft, simd = [], [], []
    for f in files:
        random.seed(rng.random())
        i, j, h, w = rrc.get_params(Image.open(f), rrc.scale, rrc.ratio)
        box, size = (j, i, j + w, i + h), (input_size, input_size)
        img, ratio = drafted(Image.open(f), min(w, h) / input_size)
        ours = np.asarray(resized_box(img, ratio, box, size, rrc.interpolation), np.float64)
        timm = np.asarray(pillow_resized_crop(decode_rgb(Image.open(f)), box, size, rrc.interpolation), np.float64)
        if ratio != 1.0:
            draft.append(ours)
            full.append(timm)
        else:
            simd.append(np.abs(ours - timm))
    out = {"pixel_simd_crops_compared": len(simd)}
    if simd:
        out["pixel_simd_mean_abs_diff"] = round(float(np.mean([d.mean() for d in simd])), 4)
        out["pixel_simd_max_abs_diff"] = float(max(d.max() for d in simd))
    out["pixel_crops_compared"] = len(full)
    if not full:
        return out
    a, b = np.stack(full), np.stack(draft)
    out.update({"pixel_mean_abs_diff": round(float(np.abs(a - b).mean()), 3),
                "pixel_max_abs_diff_p99": round(float(np.percentile(np.abs(a - b), 99)), 2),
                "pixel_full_mean": [round(float(v), 2) for v in a.mean((0, 1, 2))],
                "pixel_draft_mean": [round(float(v), 2) for v in b.mean((0, 1, 2))],
                "pixel_full_std": [round(float(v), 2) for v in a.std((0, 1, 2))],
                "pixel_draft_std": [round(float(v), 2) for v in b.std((0, 1, 2))]})
    return out


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        return ""


def run(data_path, workers=(1, 2), input_size=224, rounds=3):
    """The benchmark's figures (a dict) on the image folder `data_path`."""
    torch.set_num_threads(1)  # in-process as in a worker: one thread
    sets = datasets(data_path, input_size)
    n = len(sets["plain"])
    out = {"images": n, "input_size": input_size, "rounds": rounds, "cpu": _cpu_name(), "cores": os.cpu_count()}
    for w in workers:
        times = time_loaders(sets, w, rounds)
        for name in CONTENDERS:
            rate = n / statistics.median(times[name]) / max(w, 1)
            out[f"workers_{w}_{name}_img_per_s_per_worker"] = round(rate, 1)
        out[f"workers_{w}_ours_vs_plain"] = round(out[f"workers_{w}_ours_img_per_s_per_worker"]
                                                  / out[f"workers_{w}_plain_img_per_s_per_worker"], 3)
        out[f"workers_{w}_uint8_vs_plain"] = round(out[f"workers_{w}_uint8_img_per_s_per_worker"]
                                                   / out[f"workers_{w}_plain_img_per_s_per_worker"], 3)
    last = workers[-1]
    out["img_per_s_per_worker"] = out[f"workers_{last}_ours_img_per_s_per_worker"]
    out["plain_img_per_s_per_worker"] = out[f"workers_{last}_plain_img_per_s_per_worker"]
    out["uint8_img_per_s_per_worker"] = out[f"workers_{last}_uint8_img_per_s_per_worker"]
    out["ours_vs_plain"] = out[f"workers_{last}_ours_vs_plain"]
    out["draft_hit_rate"], _ = draft_hit_rate(sets["ours"])
    out["draft_hit_rate"] = round(out["draft_hit_rate"], 4)
    out.update(pixel_stats(data_path, input_size))
    return out


def run_bands(workers=(1, 2), input_size=224, rounds=3, bands=4, images=256, side=256):
    """Images per second per worker of the fine-tuning training pipeline on `images` uint16 .npy
    files of `bands` bands (`side` px square, [C, H, W]): read, scaled to 0-1, cropped, flipped,
    normalised and erased in the workers (`float`), or left for the device (`device`)."""
    from util.data import build_dataset, build_transform
    from main_finetune import get_args_parser
    from util.config import parse_args
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    out = {"images": images, "bands": bands, "side": side, "input_size": input_size, "rounds": rounds,
           "cpu": _cpu_name(), "cores": os.cpu_count()}
    with tempfile.TemporaryDirectory() as d:
        for i in range(images):
            folder = os.path.join(d, "train", f"c{i % 4}")
            os.makedirs(folder, exist_ok=True)
            np.save(os.path.join(folder, f"{i}.npy"), rng.integers(0, 65536, (bands, side, side), dtype=np.uint16))
        a = parse_args(get_args_parser(), ["--data_set", "image_folder", "--data_path", d, "--in_chans", str(bands),
                                           "--input_size", str(input_size), "--aa", "none"])
        sets = {name: build_dataset(True, a, transform=build_transform(True, a, uint8=dev))[0]
                for name, dev in (("float", False), ("device", True))}
        for w in workers:
            times = time_loaders(sets, w, rounds)
            for name in sets:
                out[f"workers_{w}_{name}_img_per_s_per_worker"] = round(images / statistics.median(times[name]) / max(w, 1), 1)
    return out


def run_on(data_path=None, images=256, **kw):
    """`run` on `data_path`, or on a temporary benchmark set of `images` training JPEGs."""
    if data_path:
        return run(data_path, **kw)
    from benchmarks.make_bench_images import write_set
    with tempfile.TemporaryDirectory() as d:
        return run(write_set(d, images=images, classes=8), **kw)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", default=None)
    p.add_argument("--data_images", type=int, default=256)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--input_size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--bands", type=int, default=None, help="time N-band uint16 .npy files instead (4: the issue's)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.bands:
        out = run_bands(a.workers, a.input_size, a.rounds, a.bands, a.data_images)
    else:
        out = run_on(a.data_path, a.data_images, workers=a.workers, input_size=a.input_size, rounds=a.rounds)
    print(json.dumps(out) if a.json else "\n".join(f"{k:40s} {v}" for k, v in out.items()))


if __name__ == "__main__":
    main()

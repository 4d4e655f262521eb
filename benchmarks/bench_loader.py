"""Does the device wait on data? The real fine-tuning script on a generated JPEG image folder
(benchmarks/make_bench_images.py), once with batches finished on the device (uint8 from the
workers, --device_transforms true --jpeg_draft True) and once with float batches from the
workers (--device_transforms false): the second epoch's img/s and `data_wait` (the share of
the epoch the loop waited for batches) from log.txt. Issue 13, item 5 (run by gpu_check.sh).

    python benchmarks/bench_loader.py --models convnextv2_tiny convnextv2_base --workers 14 --out FILE
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = {"device_uint8": ["--device_transforms", "true", "--jpeg_draft", "True"],
         "worker_float": ["--device_transforms", "false"]}


def train(a, data, model, mode, out_dir):
    """The second epoch's log line of one short run (the first one warms workers and kernels)."""
    cmd = [sys.executable, os.path.join(ROOT, "main_finetune.py"), "--data_set", "image_folder",
           "--data_path", data, "--model", model, "--input_size", str(a.input_size),
           "--batch_size", str(a.batch_size), "--epochs", "2", "--warmup_epochs", "0",
           "--num_workers", str(a.workers), "--disable_eval", "True", "--use_amp", "True",
           "--channels_last", "True", "--print_freq", "1000", "--save_ckpt_freq", "1000",
           "--output_dir", out_dir, *MODES[mode]]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        return {"error": (p.stdout + p.stderr)[-800:]}
    with open(os.path.join(out_dir, "log.txt")) as f:
        last = [json.loads(line) for line in f if line.strip()][-1]
    return {"img_per_s": round(last["train_img_per_s"], 1), "data_wait": round(last["train_data_wait"], 3)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["convnextv2_tiny", "convnextv2_base"])
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--input_size", type=int, default=224)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    p.add_argument("--out", metavar="FILE", help="also write the JSON object to FILE")
    a = p.parse_args()
    out = {"workers": a.workers, "images": a.images, "input_size": a.input_size, "batch_size": a.batch_size}
    with tempfile.TemporaryDirectory() as d:
        data = os.path.join(d, "images")
        subprocess.run([sys.executable, "-m", "benchmarks.make_bench_images", data, "--images", str(a.images),
                        "--classes", "10", "--val_images", "10"], check=True, cwd=ROOT)
        for model in a.models:
            for mode in MODES:
                out[f"{model}_{mode}"] = train(a, data, model, mode, os.path.join(d, f"run-{model}-{mode}"))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

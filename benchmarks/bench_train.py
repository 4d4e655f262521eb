"""Throughput of the suite's real engines against a plain timm training loop, in one process.

    python benchmarks/bench_train.py --model convnextv2_atto --input_size 224 --batch_size 32
    python benchmarks/bench_train.py ... --channels_last --json
    python benchmarks/bench_train.py --data_pipeline --workers 0 1 2     # JPEG decode + augment
    python benchmarks/bench_train.py --startup                           # README demo: first step

Contenders are timed round-robin (machine stalls hit all of them), each a median over rounds.
Engines run through engine_finetune.train_one_epoch / engine_pretrain.train_one_epoch /
engine_finetune.evaluate themselves, fed from an in-memory loader.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402


class InMemoryLoader:
    """The same prepared batches every epoch (what the engines iterate over)."""

    def __init__(self, batches):
        self.batches, self.batch_size = batches, batches[0][0].shape[0]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def _loop_state(amp, steps):
    from util.train_loop import LoopState
    return LoopState(amp=amp, updates_per_epoch=steps, print_freq=10 ** 9)


class Contender:
    def __init__(self, name, fn, images_per_call):
        self.name, self.fn, self.images = name, fn, images_per_call
        self.times, self.faults = [], []

    def run(self):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        self.fn()
        self.times.append(time.perf_counter() - t0)
        self.faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)

    def img_per_s(self):
        return self.images / statistics.median(self.times)


def build_contenders(a):
    import timm
    import engine_finetune
    import engine_pretrain
    from util.speed import maybe_compile
    from models import create_fcmae, create_model
    from util.optim import create_optimizer
    from util.train_loop import Amp

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fmt = torch.channels_last if a.channels_last else torch.contiguous_format
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(a.batch_size, 3, a.input_size, a.input_size, generator=g),
                torch.randint(0, 1000, (a.batch_size,), generator=g)) for _ in range(a.steps)]
    batches = [(x.to(device).contiguous(memory_format=fmt), y.to(device)) for x, y in batches]
    loader = InMemoryLoader(batches)
    amp = Amp.create(a.use_amp, device)
    opt_args = argparse.Namespace(weight_decay=0.05, layer_decay=1.0, opt="adamw", opt_eps=1e-8, opt_betas=None,
                                  lr=1e-4, momentum=0.9, device=str(device))

    def prep(m):
        m = m.to(device)
        return m.to(memory_format=torch.channels_last) if a.channels_last else m

    ours = prep(create_model(a.model, num_classes=1000))
    ours_opt = create_optimizer(opt_args, ours)
    ours_run = maybe_compile(ours, a.compile)
    crit = torch.nn.CrossEntropyLoss()
    st = _loop_state(amp, a.steps)
    fcmae = prep(create_fcmae(a.model, decoder_embed_dim=512))
    fcmae_opt = create_optimizer(opt_args, fcmae, betas=(0.9, 0.95))
    fcmae_run = maybe_compile(fcmae, a.compile)
    st_pre = _loop_state(amp, a.steps)
    ref = prep(timm.create_model(a.model, num_classes=1000))
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-4, weight_decay=0.05)
    ref_run = torch.compile(ref) if a.compile else ref

    def plain():
        ref_run.train()
        for x, y in batches:
            with amp.autocast():
                loss = crit(ref_run(x), y)
            loss.backward()
            ref_opt.step()
            ref_opt.zero_grad(set_to_none=True)

    n = a.steps * a.batch_size
    return [
        Contender("finetune", lambda: engine_finetune.train_one_epoch(ours_run, crit, loader, ours_opt, device, 0, st), n),
        Contender("pretrain", lambda: engine_pretrain.train_one_epoch(fcmae_run, loader, fcmae_opt, device, 0, st_pre,
                                                                     mask_ratio=0.6), n),
        Contender("eval", lambda: engine_finetune.evaluate(loader, ours_run, device, amp, reduce=False,
                                                           channels_last=a.channels_last), n),
        Contender("plain_timm", plain, n),
    ], device


def bench_engines(a):
    import builtins
    from util.speed import tune_allocator
    tuned = tune_allocator(True) if not a.no_malloc_tuning else False
    t0 = time.perf_counter()
    contenders, device = build_contenders(a)
    quiet = builtins.print
    builtins.print = lambda *x, **k: None  # evaluate() prints its accuracy line
    first = {}
    try:
        for c in contenders:  # warm-up round (compilation, allocator), timed as the first call
            s = time.perf_counter()
            c.fn()
            first[c.name] = time.perf_counter() - s
        for _ in range(a.rounds):
            for c in contenders:
                c.run()
    finally:
        builtins.print = quiet
    out = {f"{c.name}_img_per_s": round(c.img_per_s(), 2) for c in contenders}
    out.update({f"{c.name}_page_faults_per_step": int(statistics.median(c.faults) / a.steps) for c in contenders})
    out["first_step_s"] = round(first["finetune"] / a.steps, 3)
    out["setup_s"] = round(time.perf_counter() - t0 - sum(first.values()) - sum(sum(c.times) for c in contenders), 2)
    out["peak_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else
                               resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    f, p = out["finetune_img_per_s"], out["plain_timm_img_per_s"]
    out.update(finetune_vs_plain=round(f / p, 3), pretrain_step_vs_finetune_step=round(f / out["pretrain_img_per_s"], 3),
               eval_vs_finetune=round(out["eval_img_per_s"] / f, 3))
    out.update(model=a.model, input_size=a.input_size, batch_size=a.batch_size, channels_last=a.channels_last,
               compile=a.compile, use_amp=a.use_amp, malloc_tuned=tuned, device=str(device),
               threads=torch.get_num_threads(), torch=torch.__version__)
    return out


def bench_data(a):
    """JPEGs written here, decoded and augmented by our training transforms."""
    from torch.utils.data import DataLoader
    from main_finetune import get_args_parser
    from util.config import parse_args
    from util.data import build_dataset
    from util.synthetic import SyntheticShapes
    with tempfile.TemporaryDirectory() as d:
        src = SyntheticShapes("train", a.data_images, 320)
        for split in ("train", "val"):
            for i in range(a.data_images):
                folder = os.path.join(d, split, f"c{src.label(i)}")
                os.makedirs(folder, exist_ok=True)
                src.image(i).resize((400, 320)).save(os.path.join(folder, f"{i}.jpg"), quality=90)
        args = parse_args(get_args_parser(), ["--data_set", "image_folder", "--data_path", d,
                                              "--input_size", str(a.input_size)])
        ds, _ = build_dataset(True, args)
        out = {}
        for w in a.workers:
            loader = DataLoader(ds, batch_size=32, num_workers=w, shuffle=True)
            t0 = time.perf_counter()
            n = sum(x.shape[0] for x, _ in loader)
            rate = n / (time.perf_counter() - t0)
            out[f"workers_{w}_img_per_s"] = round(rate, 1)
            out[f"workers_{w}_img_per_s_per_worker"] = round(rate / max(w, 1), 1)
        return out


def bench_startup(a):
    """Seconds from the README demo command to its first logged training step."""
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, os.path.join(ROOT, "main_finetune.py"), "--config",
               os.path.join(ROOT, "configs", "demo_finetune.yaml"), "--print_freq", "1", "--output_dir", d]
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        first = None
        for line in p.stdout:
            if line.startswith("train epoch 0 [1/"):
                first = time.perf_counter() - t0
                break
        p.kill()
        p.wait()
        return {"demo_first_step_s": round(first, 2) if first else None}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="convnextv2_atto")
    p.add_argument("--input_size", type=int, default=224)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--steps", type=int, default=2, help="steps per timed call")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--channels_last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--use_amp", action="store_true")
    p.add_argument("--no_malloc_tuning", action="store_true", help="keep glibc's default allocator settings")
    p.add_argument("--data_pipeline", action="store_true", help="measure JPEG decode + augmentation instead")
    p.add_argument("--data_images", type=int, default=256)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--startup", action="store_true", help="measure the README demo's time to first step")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args()
    out = bench_data(a) if a.data_pipeline else bench_startup(a) if a.startup else bench_engines(a)
    if a.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:36s} {v}")


if __name__ == "__main__":
    main()

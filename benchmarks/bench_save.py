"""Peak host memory of one checkpoint save: the earlier BytesIO path against atomic.py's stream.

    python benchmarks/bench_save.py                       # convnextv2_base with its AdamW state
    python benchmarks/bench_save.py --model convnextv2_atto --json

Each contender runs in its own fresh process: build the model, take one AdamW step (so the
optimizer holds its two moments), then save {"model", "optimizer", "epoch"} once and report the
resident memory the save added: the high-water mark (VmHWM) reset just before the save by
writing "5" to /proc/self/clear_refs, minus the resident size at that moment. Where the reset is
not available the figure is the growth of ru_maxrss, which only sees memory above the process's
earlier peak (`peak_kind` says which). Contenders:
  before  torch.save into an io.BytesIO, then atomic_write_bytes(path, buf.getvalue()) (the code
          before issue 12)
  after   atomic.atomic_torch_save: torch.save straight into the temporary file
"""
import argparse
import gc
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CONTENDERS = ("before", "after")


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak():
    """Reset VmHWM to the current VmRSS; False where the kernel or permissions do not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kb("VmHWM") <= _status_kb("VmRSS") + 1024  # a reset peak is the current size
    except (OSError, KeyError):
        return False


def _max_rss_kb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _save_before(state, path):
    """The earlier code, reproduced: the whole checkpoint in a BytesIO, then its bytes written."""
    import torch

    from models.atomic import atomic_write_bytes
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def _save_after(state, path):
    from models.atomic import atomic_torch_save
    atomic_torch_save(state, path)


def _checkpoint_state(model_name):
    """A model and its AdamW state after one step, as a checkpoint dict."""
    import torch

    import models
    torch.manual_seed(0)
    model = models.create_model(model_name)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    model(torch.randn(2, 3, 64, 64)).float().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 0}


def _tensor_bytes(obj):
    import torch
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def child(contender, model_name, folder):
    """One save in this process; returns its figures."""
    import torch
    torch.set_num_threads(1)
    state = _checkpoint_state(model_name)
    save = {"before": _save_before, "after": _save_after}[contender]
    path = os.path.join(folder, f"checkpoint-{contender}.pth")
    gc.collect()
    max_rss0 = _max_rss_kb()
    reset = _reset_peak()
    rss0 = _status_kb("VmRSS")
    t0 = time.perf_counter()
    save(state, path)
    took = time.perf_counter() - t0
    added_kb = _status_kb("VmHWM") - rss0 if reset else _max_rss_kb() - max_rss0
    size = os.path.getsize(path)
    os.remove(path)
    return {"contender": contender, "peak_added_mb": added_kb / 1024, "checkpoint_mb": size / 2 ** 20,
            "state_tensor_mb": _tensor_bytes(state) / 2 ** 20, "rss_before_save_mb": rss0 / 1024,
            "save_s": took, "peak_kind": "vmhwm_reset" if reset else "ru_maxrss_delta"}


def _run_child(contender, model_name, folder):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", contender, "--model", model_name,
           "--folder", folder]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    if p.returncode != 0:
        raise SystemExit(f"{contender} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def compare(model_name, folder):
    """Run each contender in a fresh process; the figures side by side and their ratio."""
    runs = {c: _run_child(c, model_name, folder) for c in CONTENDERS}
    out = {"model": model_name, "cpu": _cpu_name(), "checkpoint_mb": runs["after"]["checkpoint_mb"],
           "state_tensor_mb": runs["after"]["state_tensor_mb"],
           "peak_kind": sorted({r["peak_kind"] for r in runs.values()})}
    for c, r in runs.items():
        out[f"{c}_peak_added_mb"] = r["peak_added_mb"]
        out[f"{c}_save_s"] = r["save_s"]
        out[f"{c}_checkpoint_mb"] = r["checkpoint_mb"]
    after = max(out["after_peak_added_mb"], 1e-9)
    out["before_vs_after_peak"] = out["before_peak_added_mb"] / after
    out["before_peak_vs_checkpoint"] = out["before_peak_added_mb"] / out["checkpoint_mb"]
    out["after_peak_vs_checkpoint"] = out["after_peak_added_mb"] / out["checkpoint_mb"]
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="convnextv2_base")
    p.add_argument("--folder", default=None, help="where the checkpoints are written (default: a temporary "
                                                  "folder; each is deleted after its save)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--child", choices=CONTENDERS, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.model, a.folder)))
        return
    with tempfile.TemporaryDirectory(dir=a.folder, prefix="bench_save-") as folder:
        out = compare(a.model, folder)
    if a.json:
        print(json.dumps(out))
        return
    print(f"{out['model']}: checkpoint {out['checkpoint_mb']:.0f} MB ({out['cpu']}; {', '.join(out['peak_kind'])})")
    for c in CONTENDERS:
        print(f"  {c:<7} peak host memory added by the save {out[f'{c}_peak_added_mb']:8.1f} MB "
              f"({out[f'{c}_peak_added_mb'] / out['checkpoint_mb']:.2f}x the checkpoint), {out[f'{c}_save_s']:.2f} s")
    print(f"  before / after: {out['before_vs_after_peak']:.1f}x")


if __name__ == "__main__":
    main()

"""Speed features (issue 7): a --compile failure in one line, the preemption flags' own gloo group, and
the training benchmark's JSON."""
import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT, TINY, _free_port, script_env


def test_compile_failure_is_one_line_naming_the_way_out(tmp_path):
    """Compilation fails at the first step (here: no C++ compiler for inductor on CPU), not in
    torch.compile(): the run stops with one line that names --compile False, exit 2; the same
    command with --compile False trains."""
    env = dict(script_env(), CXX="/nonexistent/g++",
               TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))  # no kernel compiled earlier
    argv = [*TINY, "--epochs", "1", "--batch_size", "16", "--output_dir", str(tmp_path / "run")]
    p = subprocess.run([sys.executable, "main_finetune.py", *argv, "--compile", "True"], env=env,
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode == 2 and len(errors) == 1, p.stderr[-3000:]
    assert "InvalidCxxCompiler" in errors[0] and errors[0].endswith("run with --compile False to train without "
                                                                    "compilation"), errors[0]
    assert "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, "main_finetune.py", *argv, "--compile", "False"], env=env,
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]


def test_allocator_is_tuned_for_cpu_runs_only(monkeypatch):
    """glibc's heap tuning helps CPU steps; a CUDA run keeps glibc's defaults (issue 12)."""
    import util.speed as speed
    calls = []
    monkeypatch.setattr(speed, "tune_allocator", lambda enabled=True: calls.append(enabled) or True)
    assert speed.tune_allocator_for(torch.device("cuda", 0)) is False and calls == []
    assert speed.tune_allocator_for(torch.device("cpu")) is True and calls == [True]


def test_preflight_takes_the_training_step(capsys):
    """--preflight times util/train_loop.train_step itself: with update_freq 2 its two steps are
    one update, which gets the scheduled lr, clips the gradient norm and updates the EMA."""
    from timm.utils import ModelEmaV3

    from util.preflight import preflight
    from util.train_loop import Amp
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    ema = ModelEmaV3(model, decay=0.5)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    ema_before = torch.cat([p.detach().flatten().clone() for p in ema.module.parameters()])
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    batches = [(torch.randn(4, 3, 2, 2), torch.randint(0, 3, (4,))) for _ in range(4)]
    args = argparse.Namespace(update_freq=2, num_workers=0, batch_size=4, epochs=1, clip_grad=0.01,
                              skip_nonfinite=0, channels_last=False, compile=False)
    loss = lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731
    preflight(args, model, loss, batches, opt, torch.device("cpu"), Amp.create(False, torch.device("cpu")), ema,
              [0.5, 0.25])
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert opt.param_groups[0]["lr"] == 0.5
    assert float((after - before).norm()) == pytest.approx(0.5 * 0.01, rel=1e-4)  # lr x clipped norm
    assert not torch.equal(torch.cat([p.detach().flatten() for p in ema.module.parameters()]), ema_before)
    assert "one epoch = 4 steps" in capsys.readouterr().out


_FLAGS_WORKER = r"""
import json
import torch.distributed as dist
from util.preemption import StopSignals

dist.init_process_group("gloo")


class OwnGroup(StopSignals):  # what an NCCL default group gets
    @staticmethod
    def _default_group_takes_cpu():
        return False


result = {}
for name, cls in (("default", StopSignals), ("own", OwnGroup)):
    s = cls(save_every_minutes=0, rank=dist.get_rank())
    decided = []
    for step in range(4):
        if step == 1 and dist.get_rank() == 1:
            s.requested = "SIGTERM"      # what the signal handler sets
        decided.append(list(s.poll()))
    result[name] = {"decided": decided, "device": s._pending[1].device.type,
                    "group": None if s._group is None else dist.get_backend(s._group)}
    s.drain()
dist.destroy_process_group()
print(json.dumps(result))
"""


def test_stop_flags_travel_on_cpu_in_their_own_gloo_group():
    """Under NCCL the flags go through a gloo group of their own (no CUDA tensor, no device
    sync per step); both ways every rank decides the same, one optimizer step after the flag."""
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, "-c", _FLAGS_WORKER], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=dict(script_env(), RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=port)) for r in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    lagged = [[False, False], [False, False], [True, False], [True, False]]
    for r in results:
        assert r["default"] == {"decided": lagged, "device": "cpu", "group": None}
        assert r["own"] == {"decided": lagged, "device": "cpu", "group": "gloo"}


def _bench():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import bench_train
    finally:
        sys.path.pop(0)
    return bench_train


def test_bench_train_smoke():
    """The smallest benchmark run: every contender's rate, memory, first step and the MACs.
    64 px: the smallest size FCMAE can mask at (a 32 px input leaves its last stage 1x1)."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_train.py"), "--input_size", "64",
                        "--batch_size", "2", "--steps", "1", "--rounds", "1", "--peak_tflops", "1", "--json"],
                       env=script_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    names = ("finetune", "pretrain", "eval", "plain_timm")
    keys = ["peak_mem_mb", "first_step_s", "forward_gmacs", "mfu", "plain_timm_mfu", "max_rss_mb",
            "finetune_gflops_per_img", "pretrain_gflops_per_img", "pretrain_flops_vs_finetune_flops"]
    keys += [f"{n}_{k}" for n in names for k in ("img_per_s", "first_step_s", "peak_mem_mb", "step_mem_mb")]
    for k in keys:
        assert isinstance(out.get(k), (int, float)) and out[k] > 0, (k, out.get(k))
    assert out["peak_mem_mb"] == max(out[f"{n}_peak_mem_mb"] for n in names)
    assert out["first_step_s"] == out["finetune_first_step_s"]
    # convnextv2_atto: 0.55 GMACs at 224 px (timm's figure), so (64/224)^2 of it here
    assert out["forward_gmacs"] == pytest.approx(0.55 * (64 / 224) ** 2, rel=0.05)
    # a training step is about 3 forwards (the stem's input needs no gradient)
    assert 2.5 < out["finetune_gflops_per_img"] / (2 * out["forward_gmacs"]) < 3.0


def test_mfu_peak_table(monkeypatch):
    bench = _bench()
    a = argparse.Namespace(peak_tflops=None)
    assert bench.peak_tflops(a, torch.device("cpu")) == (None, None)  # no mfu without a peak
    for name, tf in (("NVIDIA H200", 989.0), ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                     ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA GeForce RTX 3090", 71.0), ("NVIDIA L40", 181.0),
                     ("NVIDIA L4", 121.0), ("Some Future GPU", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        assert bench.peak_tflops(a, torch.device("cuda"))[0] == tf, name
    assert bench.peak_tflops(argparse.Namespace(peak_tflops=123.0), torch.device("cuda")) == (123.0, "--peak_tflops")


def test_flop_count_of_a_depthwise_conv_backward():
    """The benchmark's FLOPs per step: a conv's backward costs its forward once per gradient
    (input, weight), also for a depthwise conv, which torch's own formula counts `groups` times over."""
    bench = _bench()
    conv = torch.nn.Conv2d(40, 40, 7, padding=3, groups=40)
    x = torch.randn(2, 40, 16, 16, requires_grad=True)
    forward = 2 * 2 * 40 * 16 * 16 * 49  # 2 FLOPs a MAC
    assert bench.step_gflops(lambda: conv(x).sum().backward(), 1) * 1e9 == pytest.approx(forward * 3)
    x = torch.randn(2, 40, 16, 16)  # no input gradient wanted: forward + weight gradient
    assert bench.step_gflops(lambda: conv(x).sum().backward(), 1) * 1e9 == pytest.approx(forward * 2)

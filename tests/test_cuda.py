"""The suite's CUDA paths (issue 15): our model against timm on the GPU, autocast (bf16, fp16 with
the loss scaler), fused AdamW, channels_last and torch.compile, the keep-mask path, torchrun and
the preemption flags under NCCL, exact resume with deterministic algorithms.

Skipped where CUDA is absent (CI, the CPU machines). `benchmarks/gpu_check.sh OUTDIR` runs it on
a GPU. `CUDA_TESTS_DEVICE=cpu` runs the same steps on the CPU, smaller (a dry run of this file:
what can only hold on CUDA, such as fused AdamW or NCCL, is asserted there only).

The real scripts run in fresh interpreters (not tests/forkrun.py's forked children: a fork of a
process that has touched CUDA cannot use it), through `_LAUNCH`, which may first call a hook of
this module in the child: `report` (the autocast policy and optimizer the run built, on stderr),
`force_fp16` (what a GPU without bf16 gets), `same_rng_compiled`, `deterministic`.
"""
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from models import create_fcmae, create_model
from tests.helpers import ROOT, TINY, _free_port, read_log, run_record, script_env, weights
from tests.test_models import _randomise, reference_block

DEVICE = os.environ.get("CUDA_TESTS_DEVICE", "cuda")
ON_CUDA = DEVICE == "cuda"
pytestmark = pytest.mark.skipif(
    ON_CUDA and not torch.cuda.is_available(),
    reason="needs CUDA: no GPU here (benchmarks/gpu_check.sh runs these on one; CUDA_TESTS_DEVICE=cpu "
           "runs the same steps on the CPU)")

STEPS = 50 if ON_CUDA else 3              # autocast runs: optimizer steps that must stay finite
AMP_MODEL = "convnextv2_tiny" if ON_CUDA else "convnextv2_atto"
FT = "main_finetune.py"
PT = "main_pretrain.py"
FT_ARGS = TINY + ["--device", DEVICE]
PT_ARGS = ["--model", "convnextv2_atto", "--data_set", "synthetic", "--input_size", "64", "--num_workers", "0",
           "--print_freq", "1", "--warmup_epochs", "0", "--blr", "2e-2", "--decoder_embed_dim", "128",
           "--device", DEVICE]
# what torch.compile and channels_last may change in a step's loss (fp32, per step, relative)
LOSS_RTOL = {"channels_last": 1e-4, "compile": 1e-3}
NONDETERMINISTIC = re.compile(r"(\S+) does not have a deterministic implementation")

_LAUNCH = r"""
import importlib, runpy, sys
hooks, script = sys.argv[1], sys.argv[2]
sys.argv = sys.argv[2:]
for hook in filter(None, hooks.split(",")):
    getattr(importlib.import_module("tests.test_cuda"), hook)()
runpy.run_path(script, run_name="__main__")
"""


# ------------------------------------------------------------------ hooks, called in the child

def report():
    """Say on stderr which autocast policy and optimizer the run built (asserted by the tests)."""
    import util.trainer
    from util.train_loop import Amp
    create_amp, create_opt = Amp.create.__func__, util.trainer.create_optimizer

    def amp(cls, use_amp, device):
        a = create_amp(cls, use_amp, device)
        sys.stderr.write(f"test-amp: enabled={a.enabled} dtype={a.dtype} scaler={a.scaler.is_enabled()}\n")
        return a

    def optimizer(*args, **kwargs):
        opt = create_opt(*args, **kwargs)
        sys.stderr.write(f"test-optimizer: {type(opt).__name__} fused={bool(opt.defaults.get('fused'))}\n")
        return opt
    Amp.create = classmethod(amp)
    util.trainer.create_optimizer = optimizer


def force_fp16():
    """What a GPU without bf16 gets from util/train_loop.Amp: fp16 autocast and the GradScaler
    (the scripts have no flag to ask for fp16 where bf16 is supported)."""
    torch.cuda.is_bf16_supported = lambda *args, **kwargs: False
    report()


def same_rng_compiled():
    """Inductor draws random numbers (FCMAE's masks, drop path) its own way; with fallback_random
    it draws eager's, so compiled and eager losses can be compared step by step."""
    import torch._inductor.config
    torch._inductor.config.fallback_random = True


def deterministic():
    """Deterministic kernels (an op without one warns, named on stderr), and no cuDNN autotuning,
    which may pick another deterministic algorithm in each process (start_process turns it on)."""
    import util.run_context
    torch.use_deterministic_algorithms(True, warn_only=True)
    start = util.run_context.start_process

    def start_process(args):
        dist = start(args)
        torch.backends.cudnn.benchmark = False
        return dist
    util.run_context.start_process = start_process


# ------------------------------------------------------------------ running the scripts

def _command(script, args, hooks=""):
    return [sys.executable, "-c", _LAUNCH, hooks, os.path.join(ROOT, script), *map(str, args)]


def _env(extra=None):
    return dict(script_env(), **(extra or {}))


def _script(script, args, hooks="report", env=None, timeout=600):
    p = subprocess.run(_command(script, args, hooks), env=_env(env), capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT)
    assert p.returncode == 0, f"{script} {args} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def _stop_midway(cmd, env=None, at="train epoch 0 [5/"):
    """Start `cmd`, send SIGTERM once it has printed `at`, wait for it to end; all its output."""
    p = subprocess.Popen(cmd, env=_env(env), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if at in line:
            p.send_signal(signal.SIGTERM)
            break
    lines += p.stdout.readlines()
    p.wait(timeout=180)
    return "".join(lines)


def _losses(run_dir):
    """The per-step training losses from TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tb = EventAccumulator(str(run_dir / "tensorboard"))
    tb.Reload()
    return torch.tensor([e.value for e in tb.Scalars("train/loss")], dtype=torch.float64)


def _tensors(d):
    return {k: v for k, v in d.items() if torch.is_tensor(v)}


def _max_diff(a, b):
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


# ------------------------------------------------------------------ the model on the device

@pytest.fixture
def fp32():
    """True fp32 (no TF32 in cuDNN's convolutions or cuBLAS's matmuls) for the 1e-4 comparisons."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("name", ["convnextv2_atto", "convnextv2_tiny"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_model_equals_timm_forward_and_backward(fp32, name, fmt):
    """On CUDA our blocks run their Linear layers as nn.Linear (not the CPU's 1x1 convs): outputs
    within 1e-4 of timm's, and every gradient within 1e-4 of timm's relative to its largest entry."""
    import timm
    from timm.models.convnext import checkpoint_filter_fn
    torch.manual_seed(0)
    ours = _randomise(create_model(name, num_classes=10)).eval()
    theirs = timm.create_model(name, num_classes=10).eval()
    theirs.load_state_dict(checkpoint_filter_fn(ours.state_dict(), theirs), strict=True)
    ours.to(DEVICE, memory_format=fmt)
    theirs.to(DEVICE, memory_format=fmt)
    x = torch.randn(4, 3, 64, 64, device=DEVICE).contiguous(memory_format=fmt)
    dy = torch.randn(4, 10, device=DEVICE)
    out, ref = ours(x), theirs(x)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    (out * dy).sum().backward()
    (ref * dy).sum().backward()
    grads = checkpoint_filter_fn({k: p.grad for k, p in ours.named_parameters()}, theirs)
    for k, p in theirs.named_parameters():
        err = _rel(grads[k].reshape(p.shape), p.grad)
        assert err < 1e-4, (k, err)


@pytest.mark.parametrize("ragged", [False, True])
def test_keep_mask_sparse_semantics(fp32, ragged):
    """The FCMAE encoder's gathered-rows path (nn.Linear on the rows on CUDA) equals the masked
    dense reference; removed positions hold exact zeros; a block's gradients (float64) match."""
    from tests.test_fcmae import reference_encoder
    torch.manual_seed(0)
    m = create_fcmae("convnextv2_atto")
    _randomise(m.encoder)
    enc = m.encoder.to(DEVICE).eval()
    x = torch.randn(2, 3, 64, 96, device=DEVICE)
    keep = torch.tensor([[[1, 0, 1], [0, 0, 1]], [[0, 1, 1], [1, 0, 0]]], dtype=torch.bool, device=DEVICE)
    keep[1, 1, 1] = ragged
    with torch.no_grad():
        out = enc.forward_encoder(x, keep)
        ref = reference_encoder(enc, x, keep)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert out.masked_select(~keep.unsqueeze(1)).abs().max() == 0
    from models.convnextv2 import Block
    block = _randomise(Block(8)).double().to(DEVICE)
    xb = torch.randn(2, 8, 6, 6, dtype=torch.double, device=DEVICE, requires_grad=True)
    kb = (torch.rand(2, 1, 6, 6, device=DEVICE) > 0.4).double()
    if not ragged:
        kb[1] = kb[0]
    dy = torch.randn(2, 8, 6, 6, dtype=torch.double, device=DEVICE)
    params = [xb] + list(block.parameters())
    for a, b in zip(torch.autograd.grad(block(xb, kb), params, dy),
                    torch.autograd.grad(reference_block(block, xb, kb), params, dy)):
        torch.testing.assert_close(a, b)


def test_fused_adamw_is_the_optimizer():
    """util/optim.create_optimizer gives fused AdamW on CUDA (every parameter group, layer decay
    too), and a step with it moves the weights and keeps them finite."""
    from types import SimpleNamespace

    from engine_finetune import FinetuneTask
    from main_finetune import get_args_parser
    from util.config import parse_args
    from util.optim import create_optimizer
    args = parse_args(get_args_parser(), FT_ARGS + ["--layer_decay", "0.8"])
    model = create_model("convnextv2_atto", num_classes=10).to(DEVICE)
    settings = FinetuneTask.optimizer_settings(SimpleNamespace(args=args))  # the flags, as the Trainer hands them
    opt = create_optimizer(model, 1e-3, torch.device(DEVICE), **settings)
    assert type(opt) is torch.optim.AdamW
    assert bool(opt.defaults.get("fused")) == ON_CUDA and len(opt.param_groups) > 2
    assert all(bool(g.get("fused")) == ON_CUDA for g in opt.param_groups)
    before = [p.detach().clone() for p in model.parameters()]
    torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32, device=DEVICE)),
                                      torch.tensor([1, 2], device=DEVICE)).backward()
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ------------------------------------------------------------------ the real scripts

@pytest.mark.parametrize("script", [FT, PT])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_autocast_steps_stay_finite(tmp_path, script, dtype):
    """STEPS optimizer steps on the built-in data under autocast (bf16; fp16 with the GradScaler,
    forced as on a GPU without bf16): every step's loss finite, the weights finite, the run
    completed with fused AdamW."""
    out = tmp_path / "run"
    args = (FT_ARGS if script == FT else PT_ARGS) + [
        "--model", AMP_MODEL, "--input_size", "64", "--use_amp", "True", "--epochs", "1", "--batch_size", "8",
        "--synthetic_train_samples", str(8 * STEPS), "--output_dir", out]
    p = _script(script, args, hooks="force_fp16" if dtype == "float16" else "report")
    if ON_CUDA:
        scaler = dtype == "float16"
        assert f"test-amp: enabled=True dtype=torch.{dtype} scaler={scaler}" in p.stderr, p.stderr[-2000:]
        assert "test-optimizer: AdamW fused=True" in p.stderr, p.stderr[-2000:]
    losses = _losses(out)
    assert len(losses) == STEPS and torch.isfinite(losses).all(), losses
    assert run_record(out)["status"] == "completed"
    w = weights(out / "checkpoint-0.pth")
    assert all(torch.isfinite(v).all() for v in w.values() if v.is_floating_point())
    if script == FT:
        assert "test_acc1" in read_log(out)[-1]


@pytest.mark.parametrize("script", [FT, PT])
def test_channels_last_and_compile_give_the_losses_of_eager(tmp_path, script):
    """8 fp32 steps: each step's loss with --channels_last within 1e-4 (relative) of eager's, with
    --compile within 1e-3 (inductor's fused reductions round differently); compiling must really
    compile here (no eager fallback)."""
    steps = 8 if ON_CUDA else 2
    base = (FT_ARGS + ["--disable_eval", "True"] if script == FT else PT_ARGS) + [
        "--epochs", "1", "--batch_size", "8", "--synthetic_train_samples", str(8 * steps)]
    variants = {"eager": [], "channels_last": ["--channels_last", "True"]}
    if ON_CUDA:  # a CPU compile takes ~10 minutes on the machines of this project
        variants["compile"] = ["--compile", "True"]
    losses = {}
    for name, extra in variants.items():
        hooks = "report,same_rng_compiled" if name == "compile" else "report"
        p = _script(script, base + extra + ["--output_dir", tmp_path / name], hooks=hooks)
        assert "warning: --compile" not in p.stderr, p.stderr[-2000:]
        losses[name] = _losses(tmp_path / name)
        assert len(losses[name]) == steps
    for name in variants.keys() - {"eager"}:
        torch.testing.assert_close(losses[name], losses["eager"], rtol=LOSS_RTOL[name], atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_torchrun_trains_evaluates_and_stops_on_sigterm(tmp_path):
    """A 1-process torchrun on the GPU: epoch 0 trains and evaluates; SIGTERM to torchrun in epoch
    1 stops the run at a step boundary with its state saved (run.json preempted); the same
    command then finishes it. (One process makes no process group: NCCL itself is the next test's.)"""
    out = tmp_path / "run"
    args = FT_ARGS + ["--epochs", "3", "--batch_size", "8", "--synthetic_train_samples", "96",
                      "--output_dir", out]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port",
           str(_free_port()), os.path.join(ROOT, FT), *map(str, args)]
    text = _stop_midway(cmd, at="train epoch 1 [5/")
    rec = run_record(out)
    assert rec["status"] == "preempted", text[-3000:]
    assert "state saved" in text, text[-3000:]
    assert [e["epoch"] for e in read_log(out)] == [0] and "test_acc1" in read_log(out)[0]
    ck = torch.load(out / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    assert ck["epoch"] == 1 and 5 <= ck["step"] < 12, ck["step"]
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert run_record(out)["status"] == "completed"
    assert [e["epoch"] for e in read_log(out)] == [0, 1, 2]


_NCCL_WORKER = r"""
import json, sys, warnings
import torch
import torch.distributed as dist
from models import create_model
from util.preemption import StopSignals

device = torch.device(sys.argv[1])
if device.type == "cuda":
    torch.cuda.set_device(device)
dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
s = StopSignals(save_every_minutes=0, rank=0)
decided = []
for step in range(3):
    if step == 1:
        s.requested = "SIGTERM"
    decided.append(list(s.poll()))
out = {"backend": dist.get_backend(), "decided": decided, "flags_device": s._pending[1].device.type,
       "flags_group": None if s._group is None else dist.get_backend(s._group)}
s.drain()
model = create_model("convnextv2_atto", num_classes=10).to(device)
for m in model.modules():  # as util/trainer.place_model does for our models
    if isinstance(m, torch.nn.Conv2d):
        m.to(memory_format=torch.channels_last)
ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(2):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = ddp(torch.randn(4, 3, 64, 64, device=device)).float().logsumexp(1).mean()
        loss.backward()
t = torch.ones(3, device=device)
dist.all_reduce(t)
out.update(warnings=[str(w.message)[:200] for w in caught], grads_finite=all(
    bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None), all_reduce=t.tolist())
dist.destroy_process_group()
print(json.dumps(out))
"""


def test_nccl_group_carries_the_stop_flags_and_ddp():
    """A process group of one on NCCL: the stop flags travel in their own gloo group on the CPU
    and decide one step after the flag; DDP over our model (channels_last conv weights) trains
    under bf16 without the 'grad strides do not match bucket view' warning."""
    env = _env({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "WORLD_SIZE": "1"})
    dev = "cuda:0" if ON_CUDA else "cpu"
    p = subprocess.run([sys.executable, "-c", _NCCL_WORKER, dev], env=env, capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["backend"] == ("nccl" if ON_CUDA else "gloo")
    assert r["decided"] == [[False, False], [False, False], [True, False]]
    assert r["flags_device"] == "cpu" and r["flags_group"] == ("gloo" if ON_CUDA else None)
    assert not [w for w in r["warnings"] if "stride" in w.lower()], r["warnings"]
    assert "Grad strides do not match" not in p.stderr, p.stderr[-2000:]  # C++ warnings of the backward
    assert r["grads_finite"] and r["all_reduce"] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("script", [FT, PT])
def test_exact_resume_with_deterministic_algorithms(tmp_path, script):
    """Stopped by SIGTERM at step 5 and started again, the run ends with the weights (and EMA) of a
    run that never stopped, bit for bit, under torch.use_deterministic_algorithms and
    CUBLAS_WORKSPACE_CONFIG=:4096:8. Where an op has no deterministic CUDA kernel (it warns), the
    test xfails with the ops and the measured differences: resumed vs uninterrupted, and between
    two uninterrupted runs (the kernels' own run-to-run spread)."""
    env = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    common = (FT_ARGS + ["--drop_path", "0.1", "--warmup_epochs", "1", "--model_ema", "True",
                         "--model_ema_decay", "0.9"] if script == FT else PT_ARGS) + [
        "--epochs", "2", "--batch_size", "8", "--synthetic_train_samples", "96"]
    hooks = "report,deterministic"
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    texts = [_script(script, common + ["--output_dir", ref], hooks=hooks, env=env).stderr]
    texts.append(_stop_midway(_command(script, common + ["--output_dir", cut], hooks), env=env))
    assert run_record(cut)["status"] == "preempted", texts[-1][-3000:]
    texts.append(_script(script, common + ["--output_dir", cut], hooks=hooks, env=env).stderr)
    assert run_record(cut)["status"] == "completed"
    a = torch.load(ref / "checkpoint-1.pth", map_location="cpu", weights_only=True)
    b = torch.load(cut / "checkpoint-1.pth", map_location="cpu", weights_only=True)
    keys = [k for k in ("model", "model_ema") if k in a]
    if all(torch.equal(a[k][n], b[k][n]) for k in keys for n in a[k]):
        return
    ops = sorted({m for t in texts for m in NONDETERMINISTIC.findall(t)})
    diff = max(_max_diff(_tensors(a[k]), _tensors(b[k])) for k in keys)
    assert ops, f"resume not bit-identical (max |dw| {diff:.3e}) although every op was deterministic"
    again = tmp_path / "ref2"
    _script(script, common + ["--output_dir", again], hooks=hooks, env=env)
    c = torch.load(again / "checkpoint-1.pth", map_location="cpu", weights_only=True)
    spread = max(_max_diff(_tensors(a[k]), _tensors(c[k])) for k in keys)
    pytest.xfail(f"no deterministic CUDA kernel for {', '.join(ops)}: max |dw| resumed vs uninterrupted "
                 f"{diff:.3e}, between two uninterrupted runs {spread:.3e}")


def test_device_batches_on_cuda_equal_the_cpu_finishing():
    """--device_transforms on CUDA (copied and finished on a side stream one batch ahead): the
    same batches, in order, as the CPU path; erased boxes the same too (const fill)."""
    from util.data.device_batches import DeviceBatches, RandomErasingBySample
    g = torch.Generator().manual_seed(0)
    loader = [(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(4) + i,
               torch.arange(4) + 10 * i) for i in range(5)]
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    plain_cpu = list(DeviceBatches(loader, torch.device("cpu"), mean, std))
    plain_dev = list(DeviceBatches(loader, torch.device(DEVICE), mean, std, channels_last=True))
    assert len(plain_dev) == 5
    for (x, y), (u, v) in zip(plain_cpu, plain_dev):
        assert torch.equal(y, v.cpu())
        torch.testing.assert_close(u.cpu(), x, atol=1e-5, rtol=0)
    erase = RandomErasingBySample(1.0, "const")
    erased_cpu = list(DeviceBatches(loader, torch.device("cpu"), mean, std, erasing=erase))
    erased_dev = list(DeviceBatches(loader, torch.device(DEVICE), mean, std, erasing=erase))
    for (x, _), (u, _) in zip(erased_cpu, erased_dev):
        torch.testing.assert_close(u.cpu(), x, atol=1e-5, rtol=0)  # const fill: boxes and values equal

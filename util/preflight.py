"""`--preflight`: a couple of real training steps (the real model, data, optimizer, autocast,
scaler and the very step function of training), then time and memory per step and an estimate
for an epoch. Nothing is saved and the run is not marked: a launch with --preflight leaves no
checkpoint and no run.json behind.
"""
import datetime
import math
import resource
import sys
import time

import torch

from util import distributed as du
from util.console import info
from util.errors import UserError
from util.train_loop import train_step


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20, "CUDA allocated"
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return (kib / 2 ** 20 if sys.platform == "darwin" else kib / 2 ** 10), "process RSS"


def preflight(args, model, loss_fn, train_loader, optimizer, device, st, updates_per_epoch):
    """Run the real training step (util/train_loop.train_step: accumulation, clipping, EMA, the
    lr schedule) on the first two batches: the first pays the one-time costs (allocator, cuDNN
    autotuning, compilation), the second is timed; print the figures. `loss_fn(model, batch)`:
    the task's loss; `st`: the run's LoopState."""
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    optimizer.zero_grad(set_to_none=True)
    params = [p for p in model.parameters() if p.requires_grad]
    it = iter(train_loader)
    times, loads, losses = [], [], []
    for step in range(min(2, len(train_loader))):
        t0 = time.perf_counter()
        batch = next(it)
        t1 = time.perf_counter()
        losses.append(train_step(model, loss_fn, batch, optimizer, device, 0, step, st, params).loss)
        _sync(device)
        t2 = time.perf_counter()
        loads.append(t1 - t0)
        times.append(t2 - t1)
    del it
    loss = float(losses[-1])
    if not math.isfinite(loss):
        raise UserError(f"--preflight: the loss is {loss} already at the first steps; lower --lr/--blr "
                        "or check the data and --input_size")
    mem, what = _peak_memory_mib(device)
    steps = updates_per_epoch * args.update_freq  # micro-steps (batches) per epoch on each process
    step_s = times[-1]
    # loading overlaps the steps with workers, adds to them without
    per_step = step_s + loads[-1] if args.num_workers == 0 else max(step_s, loads[-1] / args.num_workers)
    epoch_s = steps * per_step
    eta = datetime.timedelta(seconds=round(epoch_s))
    info(f"preflight: {step_s:.3f} s per step of {args.batch_size} images x {du.get_world_size()} "
         f"process(es) (first step {times[0]:.3f} s, loading a batch {loads[-1]:.3f} s); peak "
         f"memory {mem:.0f} MiB ({what}); one epoch = {steps} steps = about {eta} "
         f"({args.epochs} epochs about {datetime.timedelta(seconds=round(epoch_s * args.epochs))}); "
         f"loss {loss:.4f}. Nothing was saved.")
    return {"step_s": step_s, "first_step_s": times[0], "load_s": loads[-1], "peak_mib": mem,
            "epoch_s": epoch_s, "loss": loss}

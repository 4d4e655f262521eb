"""`--preflight`: a couple of real training steps (the real model, data, optimizer, autocast and
scaler), then time and memory per step and an estimate for an epoch. Nothing is saved and the
run is not marked: a launch with --preflight leaves no checkpoint and no run.json behind.
"""
import datetime
import math
import resource
import sys
import time

import torch

from util import distributed as du
from util.errors import UserError


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20, "CUDA allocated"
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return (kib / 2 ** 20 if sys.platform == "darwin" else kib / 2 ** 10), "process RSS"


def _one_step(model, loss_fn, batch, optimizer, device, amp, channels_last):
    batch = [x.to(device, non_blocking=True) if torch.is_tensor(x) else x for x in batch]
    if channels_last and batch[0].ndim == 4:
        batch[0] = batch[0].contiguous(memory_format=torch.channels_last)
    with amp.autocast():
        loss = loss_fn(model, batch)
    if isinstance(loss, tuple):
        loss = loss[0]
    amp.scaler.scale(loss).backward()
    amp.scaler.step(optimizer)
    amp.scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def preflight(args, model, loss_fn, train_loader, optimizer, device, amp, updates_per_epoch):
    """Run a first step (one-time costs: allocator, cuDNN autotuning, compilation) and a second
    one, timed, on the first two batches; print the figures. `loss_fn(model, batch) -> loss`
    (or (loss, extras)), as in the engines."""
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    it = iter(train_loader)
    times, loads, losses = [], [], []
    for _ in range(min(2, len(train_loader))):
        t0 = time.perf_counter()
        batch = next(it)
        t1 = time.perf_counter()
        losses.append(_one_step(model, loss_fn, batch, optimizer, device, amp, args.channels_last))
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
    print(f"preflight: {step_s:.3f} s per step of {args.batch_size} images x {du.get_world_size()} "
          f"process(es) (first step {times[0]:.3f} s, loading a batch {loads[-1]:.3f} s); peak "
          f"memory {mem:.0f} MiB ({what}); one epoch = {steps} steps = about {eta} "
          f"({args.epochs} epochs about {datetime.timedelta(seconds=round(epoch_s * args.epochs))}); "
          f"loss {loss:.4f}. Nothing was saved.", flush=True)
    return {"step_s": step_s, "first_step_s": times[0], "load_s": loads[-1], "peak_mib": mem,
            "epoch_s": epoch_s, "loss": loss}

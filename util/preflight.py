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


def preflight(args, model, loss_fn, train_loader, optimizer, device, amp, ema=None, lr_schedule=None,
              wd_schedule=None):
    """Run the real training step (util/train_loop.train_step: accumulation, clipping, EMA, the
    first update's lr and weight decay) on the first two batches: the first pays the one-time
    costs (allocator, cuDNN autotuning, compilation), the second is timed; print the figures.
    `loss_fn(model, batch)`: the task's loss."""
    from util.optim import apply_schedule
    from util.train_loop import compile_failed
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    optimizer.zero_grad(set_to_none=True)
    if lr_schedule is not None:
        apply_schedule(optimizer, float(lr_schedule[0]), None if wd_schedule is None else float(wd_schedule[0]))
    it = iter(train_loader)
    times, loads, losses = [], [], []
    for step in range(min(2, len(train_loader))):
        t0 = time.perf_counter()
        batch = next(it)
        t1 = time.perf_counter()
        update = (step + 1) % args.update_freq == 0
        try:
            out = train_step(model, loss_fn, batch, optimizer, device, amp, args, update, ema)
        except Exception as e:
            if args.compile and step == 0 and not isinstance(e, UserError):
                raise compile_failed(e) from e
            raise
        losses.append(float("nan") if out is None else out[0])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t2 = time.perf_counter()
        loads.append(t1 - t0)
        times.append(t2 - t1)
    del it
    loss = float(losses[-1])
    if not math.isfinite(loss):
        raise UserError(f"--preflight: the loss is {loss} already at the first steps; lower --lr/--blr "
                        "or check the data and --input_size")
    if device.type == "cuda":
        mem, what = torch.cuda.max_memory_allocated(device) / 2 ** 20, "CUDA allocated"
    else:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        mem, what = (kib / 2 ** 20 if sys.platform == "darwin" else kib / 2 ** 10), "process RSS"
    steps = len(train_loader) // args.update_freq * args.update_freq  # micro-steps per epoch on each process
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

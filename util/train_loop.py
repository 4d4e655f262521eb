"""The optimisation loop every task shares: `train_step` (accumulation with DDP `no_sync`,
autocast, scaled backward, clipping, EMA), the step --preflight times too, and
`train_one_epoch` around it: the lr/wd schedule, logging without per-step host syncs and a
clean stop at a step boundary (preemption, rolling checkpoint). A task gives the loss of a
batch; the run's settings come from `args` (update_freq, clip_grad, print_freq,
skip_nonfinite, channels_last)."""
import contextlib
import time
from dataclasses import dataclass
from typing import Optional

import torch

from util.console import info
from util.distributed import get_world_size, is_dist
from util.errors import UserError, first_line
from util.logger import StepMeter, progress_line
from util.optim import apply_schedule
from util.preemption import Preempted


@dataclass
class Amp:
    """Autocast policy: bf16 where the device supports it, fp16 + GradScaler otherwise (CUDA)."""
    enabled: bool = False
    device_type: str = "cpu"
    dtype: torch.dtype = torch.bfloat16
    scaler: Optional[torch.amp.GradScaler] = None

    @classmethod
    def create(cls, use_amp, device):
        dtype = torch.bfloat16
        if use_amp and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            dtype = torch.float16
        scaler = torch.amp.GradScaler(device.type, enabled=bool(use_amp and dtype == torch.float16))
        return cls(bool(use_amp), device.type, dtype, scaler)

    def autocast(self):
        return torch.autocast(device_type=self.device_type, dtype=self.dtype, enabled=self.enabled)


def train_step(model, loss_fn, batch, optimizer, device, amp, args, update, ema=None, ema_step=0,
               measure_norm=False):
    """One micro-step, as every run (and --preflight) takes it: the batch on the device, forward
    under autocast (DDP's no_sync while accumulating), backward of the scaled loss / update_freq;
    when `update` (the update's last micro-step) clipping (else, with `measure_norm`, the norm
    for the log), optimizer step, EMA. `loss_fn(model, batch)` returns the loss.
    Returns (detached loss, gradient norm or None), or None when --skip_nonfinite skipped it."""
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    batch = [x.to(device, non_blocking=True, memory_format=fmt) if torch.is_tensor(x) and x.ndim == 4
             else x.to(device, non_blocking=True) if torch.is_tensor(x) else x for x in batch]
    sync_ctx = model.no_sync() if (not update and hasattr(model, "no_sync")) else contextlib.nullcontext()
    with sync_ctx:
        with amp.autocast():
            loss = loss_fn(model, batch)
        loss_d = loss.detach()
        if args.skip_nonfinite and not _all_finite(loss_d):
            optimizer.zero_grad(set_to_none=True)
            return None
        amp.scaler.scale(loss / args.update_freq).backward()
    if not update:
        return loss_d, None
    norm, params = None, [p for p in model.parameters() if p.requires_grad]
    if args.clip_grad:
        amp.scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, args.clip_grad)
    elif measure_norm:  # for the log only: measure, do not clip, undo the loss scale
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        norm = norm / amp.scaler.get_scale() if amp.scaler.is_enabled() else norm
    amp.scaler.step(optimizer)
    amp.scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        ema.update(model, step=ema_step)
    return loss_d, norm


def train_one_epoch(model, loss_fn, data_loader, optimizer, device, epoch, args, amp, ema=None,
                    lr_schedule=None, wd_schedule=None, start_step=0, tb=None, stop=None, save_fn=None,
                    checks=None, skipped_steps=None):
    """Train one epoch from micro-step `start_step`: the update's lr and weight decay from the
    schedules (one value per optimizer update), train_step for each batch, a log line (console;
    `tb`: TensorBoard and the trackers, util/tracking.Tracking) every --print_freq steps and
    `checks()` before it; after each update `stop` (util/preemption.StopSignals) is polled:
    `save_fn(epoch, next_step)` writes the rolling checkpoint, and a requested stop raises
    Preempted after saving. Steps skipped under --skip_nonfinite are appended to `skipped_steps`
    ([epoch, step]). Returns the epoch's averaged stats."""
    model.train()
    uf, world = args.update_freq, get_world_size()
    # the loader of a resumed epoch holds its remaining batches only
    total = (start_step + len(data_loader)) // uf * uf   # whole updates only
    updates_per_epoch = total // uf
    skipped_steps = [] if skipped_steps is None else skipped_steps
    # the epoch's running sums stay on the device between log lines: no per-step host sync
    meter = StepMeter()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    first_bad = torch.full((), -1, device=device, dtype=torch.long)
    n_steps = images_since_log = 0
    data_s = data_s_log = 0.0   # seconds waited for batches: the share of the epoch a device waits on data
    t0 = t_log = time.time()
    optimizer.zero_grad(set_to_none=True)
    batches = iter(data_loader)
    for step in range(start_step, total):
        t = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            break
        waited = time.perf_counter() - t
        data_s, data_s_log = data_s + waited, data_s_log + waited
        it = epoch * updates_per_epoch + step // uf
        if step % uf == 0 and lr_schedule is not None:
            apply_schedule(optimizer, float(lr_schedule[it]), None if wd_schedule is None else float(wd_schedule[it]))
        log_now = (step + 1) % args.print_freq == 0 or step + 1 == total
        update = (step + 1) % uf == 0
        try:
            out = train_step(model, loss_fn, batch, optimizer, device, amp, args, update, ema, it, log_now)
        except Exception as e:
            if args.compile and step == start_step and not isinstance(e, UserError):
                raise compile_failed(e) from e
            raise
        if out is None:
            skipped_steps.append([epoch, step])
            print(f"warning: non-finite loss at epoch {epoch} step {step}; step skipped "
                  f"({len(skipped_steps)}/{args.skip_nonfinite})", flush=True)  # every rank says it
            if len(skipped_steps) > args.skip_nonfinite:
                raise NonFiniteLoss(f"more than --skip_nonfinite {args.skip_nonfinite} non-finite losses (last at "
                                    f"epoch {epoch} step {step}); lower --lr/--blr or check the data")
            continue
        loss, grad_norm = out
        loss_sum += loss
        first_bad = torch.where(~torch.isfinite(loss) & (first_bad < 0), torch.full_like(first_bad, step), first_bad)
        n_steps += 1
        images_since_log += batch[0].shape[0]
        if log_now:
            _raise_if_bad(first_bad, epoch)
            if checks is not None:
                checks()
            now = time.time()
            ips = images_since_log * world / max(now - t_log, 1e-9)
            data_wait = data_s_log / max(now - t_log, 1e-9)
            vals = {"loss": loss.item(), "lr": max(g["lr"] for g in optimizer.param_groups)}
            if grad_norm is not None:
                vals["grad_norm"] = float(grad_norm)
            meter.update(**vals)
            meter.set_average("loss", float(loss_sum) / n_steps)  # the steps log.txt averages
            info(progress_line(f"train epoch {epoch}", step + 1, total, t0, n_steps, meter, ips, data_wait))
            if tb is not None:
                mem = torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else None
                tb.scalars(epoch * updates_per_epoch + (step + 1) // uf, prefix="train/", img_per_s=ips,
                           data_wait=data_wait, peak_mem_mb=mem,
                           min_lr=min(g["lr"] for g in optimizer.param_groups), **vals)
            t_log, images_since_log, data_s_log = now, 0, 0.0
        if update and stop is not None and step + 1 < total:
            stop_now, save_rolling = stop.poll()
            if (stop_now or save_rolling) and save_fn is not None:
                _raise_if_bad(first_bad, epoch)  # never overwrite a good checkpoint with NaN weights
                save_fn(epoch, step + 1)
                stop.saved()
            if stop_now:
                raise Preempted(f"stopped at epoch {epoch} step {step + 1}")
    if stop is not None:
        stop.drain()
    _raise_if_bad(first_bad, epoch)
    elapsed = time.time() - t0
    stats = meter.averages()
    stats["loss"] = float(loss_sum) / max(n_steps, 1)
    stats["lr"] = max(g["lr"] for g in optimizer.param_groups)
    stats["img_per_s"] = n_steps * (data_loader.batch_size or 1) * world / max(elapsed, 1e-9)
    stats["data_wait"] = data_s / max(elapsed, 1e-9)
    return stats


class NonFiniteLoss(UserError):
    pass


def compile_failed(e):
    """The one line for a first step that failed under --compile: torch.compile compiles at the
    first call (dynamo, inductor, a C++ compiler on CPU, triton on GPU), so that is where a
    platform it cannot compile on shows. Eager runs of the same step give the real traceback."""
    return UserError(f"--compile: the first training step failed under torch.compile ({type(e).__name__}: "
                     f"{first_line(e)}); run with --compile False to train without compilation")


def _all_finite(loss):
    """Is the loss finite on every rank? All ranks must skip a step together: a rank that
    skipped the backward while the others run it would leave them waiting in DDP's all-reduce."""
    ok = torch.isfinite(loss).to(torch.int32).reshape(1)
    if is_dist():
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    return bool(ok.item())


def _raise_if_bad(first_bad, epoch):
    """Stop with the first step whose loss was not finite on any rank (all ranks agree)."""
    b = first_bad.reshape(1).clone()
    if is_dist():
        none = torch.full_like(b, 2 ** 62)
        b = torch.where(b < 0, none, b)
        torch.distributed.all_reduce(b, op=torch.distributed.ReduceOp.MIN)
        b = torch.where(b == none, torch.full_like(b, -1), b)
    b = int(b.item())
    if b >= 0:
        raise NonFiniteLoss(f"loss is not finite at epoch {epoch} step {b}; lower --lr/--blr, set --clip_grad "
                            "or --skip_nonfinite N, or check the data; the last good checkpoint is untouched")

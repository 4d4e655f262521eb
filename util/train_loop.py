"""The optimisation loop both engines share: accumulation with DDP `no_sync`, autocast, scaled
backward, clipping, per-iteration lr/wd schedule, EMA, logging without per-step host syncs,
and a clean stop at a step boundary (preemption, rolling checkpoint)."""
import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from util.errors import UserError
from util.logger import StepMeter, progress_line
from util.optim import apply_schedule
from util.preemption import Preempted


class NonFiniteLoss(UserError):
    pass


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


@dataclass
class LoopState:
    """What a train_one_epoch needs besides the model, data and optimizer."""
    amp: Amp
    update_freq: int = 1
    clip_grad: Optional[float] = None
    lr_schedule: Optional[object] = None        # numpy array, one value per optimizer update
    wd_schedule: Optional[object] = None
    updates_per_epoch: int = 1
    model_ema: Optional[object] = None
    print_freq: int = 20
    tb: Optional[object] = None
    stop: Optional[object] = None               # util.preemption.StopSignals
    save_fn: Optional[Callable] = None          # save_fn(epoch, next_step, tag) at a boundary
    skip_nonfinite: int = 0
    skipped_steps: list = field(default_factory=list)
    channels_last: bool = False
    world_size: int = 1
    checks: Optional[Callable] = None           # checks() at each log line, same steps on all ranks


def _to_device(x, device, channels_last):
    if not torch.is_tensor(x):
        return x
    if channels_last and x.ndim == 4:
        return x.to(device, non_blocking=True, memory_format=torch.channels_last)
    return x.to(device, non_blocking=True)


def run_epoch(model, loss_fn, data_loader, optimizer, device, epoch, st: LoopState,
              start_step=0, header="train"):
    """Train one epoch from micro-step `start_step`. `loss_fn(model, batch) -> (loss, extras)`.

    Returns averaged stats. Raises Preempted after saving when a stop was requested.
    """
    model.train()
    uf = st.update_freq
    total = (start_step + len(data_loader)) // uf * uf   # whole updates only
    meter = StepMeter()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    first_bad = torch.full((), -1, device=device, dtype=torch.long)
    n_steps = 0
    t0 = t_log = time.time()
    imgs_since_log = 0
    optimizer.zero_grad(set_to_none=True)
    params = [p for p in model.parameters() if p.requires_grad]
    for step, batch in enumerate(data_loader, start=start_step):
        if step >= total:
            break
        it = epoch * st.updates_per_epoch + step // uf
        if step % uf == 0 and st.lr_schedule is not None:
            apply_schedule(optimizer, float(st.lr_schedule[it]),
                           float(st.wd_schedule[it]) if st.wd_schedule is not None else None)
        batch = [_to_device(x, device, st.channels_last) for x in batch]
        is_update = (step + 1) % uf == 0
        sync_ctx = model.no_sync() if (not is_update and hasattr(model, "no_sync")) else contextlib.nullcontext()
        with sync_ctx:
            with st.amp.autocast():
                loss, extras = loss_fn(model, batch)
            loss_d = loss.detach()
            if st.skip_nonfinite:
                if not _all_finite(loss_d):
                    _record_skip(st, epoch, step)
                    optimizer.zero_grad(set_to_none=True)
                    continue
            st.amp.scaler.scale(loss / uf).backward()
        loss_sum += loss_d
        bad = ~torch.isfinite(loss_d)
        first_bad = torch.where(bad & (first_bad < 0), torch.full_like(first_bad, step), first_bad)
        n_steps += 1
        imgs_since_log += batch[0].shape[0]
        norm = None
        log_now = (step + 1) % st.print_freq == 0 or step + 1 == total
        if is_update:
            if st.clip_grad:
                st.amp.scaler.unscale_(optimizer)
                norm = torch.nn.utils.clip_grad_norm_(params, st.clip_grad)
            elif log_now:  # for the log only: measure, do not clip, undo the loss scale
                norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
                norm = norm / st.amp.scaler.get_scale() if st.amp.scaler.is_enabled() else norm
            st.amp.scaler.step(optimizer)
            st.amp.scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if st.model_ema is not None:
                st.model_ema.update(model, step=it)
        if log_now:
            _raise_if_bad(first_bad, epoch)
            if st.checks is not None:
                st.checks()
            now = time.time()
            ips = imgs_since_log * st.world_size / max(now - t_log, 1e-9)
            max_lr = max(g["lr"] for g in optimizer.param_groups)
            vals = {"loss": loss_d.item(), "lr": max_lr}
            if norm is not None:
                vals["grad_norm"] = float(norm)
            vals.update({k: float(v) for k, v in (extras or {}).items()})
            meter.update(**vals)
            print(progress_line(f"{header} epoch {epoch}", step + 1, total, t0, n_steps, meter, ips), flush=True)
            if st.tb is not None:
                gstep = epoch * st.updates_per_epoch + (step + 1) // uf
                mem = torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else None
                st.tb.scalars(gstep, prefix="train/", img_per_s=ips, peak_mem_mb=mem, min_lr=min(
                    g["lr"] for g in optimizer.param_groups), **vals)
            t_log, imgs_since_log = now, 0
        if is_update and st.stop is not None and step + 1 < total:
            stop, save_rolling = st.stop.poll()
            if (stop or save_rolling) and st.save_fn is not None:
                _raise_if_bad(first_bad, epoch)  # never overwrite a good checkpoint with NaN weights
                st.save_fn(epoch, step + 1, "last")
                st.stop.saved()
            if stop:
                raise Preempted(f"stopped at epoch {epoch} step {step + 1}")
    if st.stop is not None:
        st.stop.drain()
    _raise_if_bad(first_bad, epoch)
    elapsed = time.time() - t0
    n_imgs = n_steps * (data_loader.batch_size or 1) * st.world_size
    stats = meter.averages()
    stats["loss"] = float(loss_sum) / max(n_steps, 1)
    stats["lr"] = max(g["lr"] for g in optimizer.param_groups)
    stats["img_per_s"] = n_imgs / max(elapsed, 1e-9)
    return stats


def _distributed():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _all_finite(loss):
    """Is the loss finite on every rank? All ranks must skip a step together: a rank that
    skipped the backward while the others run it would leave them waiting in DDP's all-reduce."""
    ok = torch.isfinite(loss).to(torch.int32).reshape(1)
    if _distributed():
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    return bool(ok.item())


def _raise_if_bad(first_bad, epoch):
    """Stop with the first step whose loss was not finite on any rank (all ranks agree)."""
    b = first_bad.reshape(1).clone()
    if _distributed():
        none = torch.full_like(b, 2 ** 62)
        b = torch.where(b < 0, none, b)
        torch.distributed.all_reduce(b, op=torch.distributed.ReduceOp.MIN)
        b = torch.where(b == none, torch.full_like(b, -1), b)
    b = int(b.item())
    if b >= 0:
        raise NonFiniteLoss(f"loss is not finite at epoch {epoch} step {b}; lower --lr/--blr, set --clip_grad "
                            "or --skip_nonfinite N, or check the data; the last good checkpoint is untouched")


def _record_skip(st, epoch, step):
    st.skipped_steps.append([epoch, step])
    print(f"warning: non-finite loss at epoch {epoch} step {step}; step skipped "
          f"({len(st.skipped_steps)}/{st.skip_nonfinite})", force=True, flush=True)
    if len(st.skipped_steps) > st.skip_nonfinite:
        raise NonFiniteLoss(f"more than --skip_nonfinite {st.skip_nonfinite} non-finite losses "
                            f"(last at epoch {epoch} step {step}); lower --lr/--blr or check the data")

"""The optimisation loop every task shares: `train_step` (accumulation with DDP `no_sync`,
autocast, scaled backward, clipping, per-iteration lr/wd schedule, EMA), the step --preflight
times too, and `train_one_epoch` around it: logging without per-step host syncs and a clean
stop at a step boundary (preemption, rolling checkpoint). A task gives the loss of a batch."""
import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from util.console import info
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
    """What train_step and train_one_epoch need besides the model, data and optimizer."""
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


@dataclass
class Loss:
    """A loss function may return this instead of the bare loss, to log more scalars."""
    value: torch.Tensor
    extras: Optional[dict] = None


@dataclass
class Step:
    """What one micro-step did, for the epoch's bookkeeping."""
    loss: torch.Tensor                  # detached, still on the device
    extras: Optional[dict] = None       # more scalars from the loss function, for the log
    images: int = 0
    updated: bool = False               # the optimizer stepped (the update's last micro-step)
    grad_norm: Optional[torch.Tensor] = None
    skipped: bool = False               # a non-finite loss skipped under --skip_nonfinite


def train_step(model, loss_fn, batch, optimizer, device, epoch, step, st: LoopState, params,
               measure_norm=False):
    """Micro-step `step` of `epoch`, as every run (and --preflight) takes it: the update's lr and
    weight decay, the batch on the device, forward under autocast (DDP's no_sync while
    accumulating), backward of the scaled loss / update_freq; on the update's last micro-step
    clipping (else, with `measure_norm`, the norm for the log), optimizer step, EMA.
    `loss_fn(model, batch)` returns the loss (a tensor, or a Loss with extras for the log)."""
    uf = st.update_freq
    it = epoch * st.updates_per_epoch + step // uf
    if step % uf == 0 and st.lr_schedule is not None:
        apply_schedule(optimizer, float(st.lr_schedule[it]),
                       float(st.wd_schedule[it]) if st.wd_schedule is not None else None)
    batch = [_to_device(x, device, st.channels_last) for x in batch]
    is_update = (step + 1) % uf == 0
    sync_ctx = model.no_sync() if (not is_update and hasattr(model, "no_sync")) else contextlib.nullcontext()
    with sync_ctx:
        with st.amp.autocast():
            loss = loss_fn(model, batch)
        loss, extras = (loss.value, loss.extras) if isinstance(loss, Loss) else (loss, None)
        loss_d = loss.detach()
        if st.skip_nonfinite and not _all_finite(loss_d):
            _record_skip(st, epoch, step)
            optimizer.zero_grad(set_to_none=True)
            return Step(loss_d, skipped=True)
        st.amp.scaler.scale(loss / uf).backward()
    norm = _update(model, optimizer, params, st, it, measure_norm) if is_update else None
    return Step(loss_d, extras, batch[0].shape[0], is_update, norm)


def _update(model, optimizer, params, st, it, measure_norm):
    """Clip (or measure), step, zero the gradients, update the EMA. Returns the norm or None."""
    norm = None
    if st.clip_grad:
        st.amp.scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, st.clip_grad)
    elif measure_norm:  # for the log only: measure, do not clip, undo the loss scale
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        norm = norm / st.amp.scaler.get_scale() if st.amp.scaler.is_enabled() else norm
    st.amp.scaler.step(optimizer)
    st.amp.scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if st.model_ema is not None:
        st.model_ema.update(model, step=it)
    return norm


class _Tally:
    """An epoch's running sums, kept on the device between log lines (no per-step host sync)."""

    def __init__(self, device):
        self.meter = StepMeter()
        self.loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.first_bad = torch.full((), -1, device=device, dtype=torch.long)
        self.n_steps, self.images_since_log = 0, 0
        self.data_s = self.data_s_log = 0.0   # seconds the loop waited for its batches
        self.t0 = self.t_log = time.time()

    def add(self, step, out):
        self.loss_sum += out.loss
        bad = ~torch.isfinite(out.loss)
        self.first_bad = torch.where(bad & (self.first_bad < 0), torch.full_like(self.first_bad, step),
                                     self.first_bad)
        self.n_steps += 1
        self.images_since_log += out.images

    def stats(self, optimizer, batch_size, world_size):
        elapsed = time.time() - self.t0
        stats = self.meter.averages()
        stats["loss"] = float(self.loss_sum) / max(self.n_steps, 1)
        stats["lr"] = max(g["lr"] for g in optimizer.param_groups)
        stats["img_per_s"] = self.n_steps * (batch_size or 1) * world_size / max(elapsed, 1e-9)
        stats["data_wait"] = self.data_s / max(elapsed, 1e-9)
        return stats


def _timed(loader, tally):
    """The loader's batches, adding the time spent waiting for each to `tally.data_s`: the share
    of an epoch a device waits on data (on CUDA the host runs ahead of the device, so a loop that
    keeps the GPU busy waits here only when the loader is behind)."""
    it = iter(loader)
    while True:
        t = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            return
        waited = time.perf_counter() - t
        tally.data_s += waited
        tally.data_s_log += waited
        yield batch


def train_one_epoch(model, loss_fn, data_loader, optimizer, device, epoch, st: LoopState,
                    start_step=0, header="train"):
    """Train one epoch from micro-step `start_step` (train_step for each batch), with a log line
    every --print_freq steps and a stop at an update boundary. Returns the epoch's averaged
    stats. Raises Preempted after saving when a stop was requested."""
    model.train()
    uf = st.update_freq
    total = (start_step + len(data_loader)) // uf * uf   # whole updates only
    tally = _Tally(device)
    optimizer.zero_grad(set_to_none=True)
    params = [p for p in model.parameters() if p.requires_grad]
    for step, batch in enumerate(_timed(data_loader, tally), start=start_step):
        if step >= total:
            break
        log_now = (step + 1) % st.print_freq == 0 or step + 1 == total
        out = train_step(model, loss_fn, batch, optimizer, device, epoch, step, st, params, log_now)
        if out.skipped:
            continue
        tally.add(step, out)
        if log_now:
            _log_line(st, tally, out, optimizer, device, f"{header} epoch {epoch}", step, total, epoch)
        if out.updated and st.stop is not None and step + 1 < total:
            _poll_stop(st, tally, epoch, step)
    if st.stop is not None:
        st.stop.drain()
    _raise_if_bad(tally.first_bad, epoch)
    return tally.stats(optimizer, data_loader.batch_size, st.world_size)


def _log_line(st, tally, out, optimizer, device, header, step, total, epoch):
    """The console line (rank 0) and TensorBoard scalars of a logging step; the checks first."""
    _raise_if_bad(tally.first_bad, epoch)
    if st.checks is not None:
        st.checks()
    now = time.time()
    ips = tally.images_since_log * st.world_size / max(now - tally.t_log, 1e-9)
    data_wait = tally.data_s_log / max(now - tally.t_log, 1e-9)
    vals = {"loss": out.loss.item(), "lr": max(g["lr"] for g in optimizer.param_groups)}
    if out.grad_norm is not None:
        vals["grad_norm"] = float(out.grad_norm)
    vals.update({k: float(v) for k, v in (out.extras or {}).items()})
    tally.meter.update(**vals)
    tally.meter.set_average("loss", float(tally.loss_sum) / max(tally.n_steps, 1))  # the steps log.txt averages
    info(progress_line(header, step + 1, total, tally.t0, tally.n_steps, tally.meter, ips, data_wait))
    if st.tb is not None:
        gstep = epoch * st.updates_per_epoch + (step + 1) // st.update_freq
        mem = torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else None
        st.tb.scalars(gstep, prefix="train/", img_per_s=ips, data_wait=data_wait, peak_mem_mb=mem, min_lr=min(
            g["lr"] for g in optimizer.param_groups), **vals)
    tally.t_log, tally.images_since_log, tally.data_s_log = now, 0, 0.0


def _poll_stop(st, tally, epoch, step):
    """After an update: a rolling checkpoint when due, save and stop when a signal came."""
    decision = st.stop.poll()
    if (decision.stop or decision.save_rolling) and st.save_fn is not None:
        _raise_if_bad(tally.first_bad, epoch)  # never overwrite a good checkpoint with NaN weights
        st.save_fn(epoch, step + 1, "last")
        st.stop.saved()
    if decision.stop:
        raise Preempted(f"stopped at epoch {epoch} step {step + 1}")


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
          f"({len(st.skipped_steps)}/{st.skip_nonfinite})", flush=True)  # every rank says it
    if len(st.skipped_steps) > st.skip_nonfinite:
        raise NonFiniteLoss(f"more than --skip_nonfinite {st.skip_nonfinite} non-finite losses "
                            f"(last at epoch {epoch} step {step}); lower --lr/--blr or check the data")

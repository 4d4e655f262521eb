"""What both main scripts do around their epoch loop: seeding, the run directory and record,
checkpoint state (save with every rank's RNG, restore), and the final status."""
import os
import random
import sys

import numpy as np
import torch

from util import distributed as du
from util import runs
from util.checkpoint import (find_resumable, load_checkpoint, plain_args, prune_epoch_checkpoints,
                             rng_state, save_checkpoint, set_rng_state)
from util.config import save_config
from util.errors import UserError


def start_process(args):
    """What every process does first: allocator tuning, the process group and device
    (util/distributed.py), per-rank seeds, cudnn autotuning. Returns the DistInfo."""
    from util.speed import tune_allocator
    tune_allocator()  # CPU: keep activation buffers in the heap (2x faster steps here)
    info = du.init_distributed(args)
    seed_everything(args.seed, info.rank)
    torch.backends.cudnn.benchmark = True
    return info


def seed_everything(seed, rank):
    seed = seed + rank
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)


class AlreadyCompleted(SystemExit):
    """Exit 0: the run these settings name has completed. A caller that catches it (the
    hyperparameter search, util/hpo.py) learns which run it was and reuses its result."""

    def __init__(self, run_dir):
        super().__init__(0)
        self.run_dir = run_dir


def open_run(args, kind, world_size, extra=None):
    """Pick the run directory (rank 0 decides, all ranks agree; a refusal stops every rank),
    write config.yaml (not for --eval) and start the run record. Returns (run_dir, record) or
    exits 0 (AlreadyCompleted) when the run already completed."""
    decision = None
    if du.is_main_process():
        try:
            decision = ("dir", runs.prepare_run_dir(args, kind=kind, world_size=world_size))
        except runs.RunCompleted as done:
            decision = ("done", str(done), done.run_dir)
        except UserError as e:  # every rank stops with it, none waits for the others
            decision = ("error", str(e))
    decision = du.broadcast_object(decision)
    if decision[0] == "error":
        raise UserError(decision[1])
    if decision[0] == "done":
        print(decision[1])
        du.cleanup()
        raise AlreadyCompleted(decision[2])
    run_dir = decision[1]
    args.output_dir = run_dir
    if not args.log_dir:
        args.log_dir = os.path.join(run_dir, "tensorboard")
    if du.is_main_process():
        os.makedirs(run_dir, exist_ok=True)
        if not getattr(args, "eval", False):  # evaluating leaves the run's config as it is
            save_config(args, os.path.join(run_dir, "config.yaml"))
    hosts = du.all_gather_object(os.uname().nodename)
    record = runs.RunRecord(run_dir, args, kind, world_size=world_size, is_main=du.is_main_process(),
                            hostnames=sorted(set(hosts)))
    return run_dir, record


class TrainingState:
    """Everything exact resume needs, gathered from (and restored into) live objects."""

    def __init__(self, args, model_without_ddp, optimizer, scaler, model_ema=None):
        self.args, self.model, self.optimizer, self.scaler, self.ema = (
            args, model_without_ddp, optimizer, scaler, model_ema)
        self.best = {"name": None, "value": None, "epoch": None}
        self.extra = {}

    def state(self, epoch, step, updates_per_epoch, update_freq, epoch_done):
        rngs = du.all_gather_object(rng_state())  # collective: every rank calls save()
        # optimizer updates done: an epoch's end counts its whole epoch, so auto-resume prefers
        # it to a rolling checkpoint-last.pth from inside the same epoch
        done = (epoch + 1) * updates_per_epoch if epoch_done else epoch * updates_per_epoch + step // update_freq
        s = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
             "scaler": self.scaler.state_dict(), "epoch": epoch, "step": step,
             "epoch_done": epoch_done, "global_step": done,
             "rng": rngs, "world_size": du.get_world_size(), "best": dict(self.best),
             "args": plain_args(self.args), "extra": dict(self.extra)}
        if self.ema is not None:
            s["model_ema"] = self.ema.module.state_dict()
        return s

    def save(self, path, **kw):
        s = self.state(**kw)
        if du.is_main_process():
            save_checkpoint(s, path)
        du.barrier()

    def restore(self, ckpt, path):
        from util.checkpoint import check_state_dict_matches
        check_state_dict_matches(self.model, ckpt["model"], f"checkpoint {path}")
        self.model.load_state_dict(ckpt["model"])
        if "optimizer" in ckpt:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        if "scaler" in ckpt and ckpt["scaler"]:
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None and "model_ema" in ckpt:
            self.ema.module.load_state_dict(ckpt["model_ema"])
        self.best = dict(ckpt.get("best") or self.best)
        self.extra = dict(ckpt.get("extra") or {})
        rngs = ckpt.get("rng")
        if rngs and len(rngs) == du.get_world_size():
            set_rng_state(rngs[du.get_rank()])
        elif rngs:
            print(f"warning: {path} was written by {len(rngs)} processes, this run has "
                  f"{du.get_world_size()}: random streams restart from the seed")
        if ckpt.get("epoch_done", True):
            return ckpt["epoch"] + 1, 0
        return ckpt["epoch"], self._step_in_this_layout(ckpt, path)

    def _step_in_this_layout(self, ckpt, path):
        """The saved micro-step, converted when this launch splits the global batch otherwise
        (other world size, batch_size or update_freq). The sampler hands out the epoch's
        order as a prefix shared by all ranks, so what matters is the number of samples
        consumed: step x batch_size x world_size."""
        saved = ckpt.get("args") or {}
        old = (ckpt.get("world_size") or 1, saved.get("batch_size"), saved.get("update_freq") or 1)
        new = (du.get_world_size(), self.args.batch_size, self.args.update_freq)
        if old[1] is None or old == new:
            return ckpt["step"]
        samples = ckpt["step"] * old[0] * old[1]
        per_update = new[0] * new[1] * new[2]
        if samples % per_update:
            raise UserError(f"{path} stopped inside epoch {ckpt['epoch']} after {samples} samples, not a "
                            f"whole number of this launch's global batches of {per_update}; resume it "
                            f"with a global batch of {old[0] * old[1] * old[2]} (batch_size x update_freq x processes)")
        step = samples // (new[0] * new[1])
        print(f"{path}: saved by {old[0]} process(es) x batch {old[1]} x update_freq {old[2]} at step "
              f"{ckpt['step']}; this launch continues at step {step} (same {samples} samples consumed)")
        return step


def resume_point(args, tstate):
    """Resume from --resume, else (auto_resume) from the newest whole checkpoint of the run.
    Returns (start_epoch, start_step, path or None)."""
    path, ckpt = None, None
    if args.resume:
        path, ckpt = args.resume, load_checkpoint(args.resume)
    elif args.auto_resume and args.output_dir:
        path, ckpt = find_resumable(args.output_dir)
    if ckpt is None:
        return args.start_epoch, 0, None
    epoch, step = tstate.restore(ckpt, path)
    print(f"resumed from {path}: epoch {epoch} step {step}")
    return epoch, step, path


def save_epoch_checkpoints(args, tstate, epoch, updates_per_epoch, is_best):
    """checkpoint-<epoch>.pth (every save_ckpt_freq epochs and at the end), checkpoint-best.pth,
    and checkpoint-last.pth, keeping the newest save_ckpt_num epoch files."""
    if not (args.save_ckpt and args.output_dir):
        return
    kw = dict(epoch=epoch, step=0, updates_per_epoch=updates_per_epoch, update_freq=args.update_freq,
              epoch_done=True)
    state = tstate.state(**kw)
    if du.is_main_process():
        if (epoch + 1) % args.save_ckpt_freq == 0 or epoch + 1 == args.epochs:
            save_checkpoint(state, os.path.join(args.output_dir, f"checkpoint-{epoch}.pth"))
            prune_epoch_checkpoints(args.output_dir, args.save_ckpt_num)
        else:  # resume picks the checkpoint with the highest global step, whichever file it is
            save_checkpoint(state, os.path.join(args.output_dir, "checkpoint-last.pth"))
        if is_best:
            save_checkpoint(state, os.path.join(args.output_dir, "checkpoint-best.pth"))
    du.barrier()


def make_loop(args, run_dir, record, tstate, amp, updates_per_epoch, lr_schedule, wd_schedule, rank,
              world, resume_at, model_ema=None):
    """TensorBoard, signal handling and the loop settings, with the rolling-checkpoint hook."""
    from util.logger import TensorBoard
    from util.preemption import StopSignals
    from util.train_loop import LoopState
    start_epoch, start_step, resumed_from = resume_at
    # the first step this run will log; TensorBoard drops what a stopped run logged from there on
    purge = start_epoch * updates_per_epoch + start_step // args.update_freq + 1 if resumed_from else None
    tb = TensorBoard(args.log_dir, purge_step=purge)
    stop = StopSignals(args.save_ckpt_minutes, rank).install()

    def save_last(epoch, step, tag):
        tstate.save(os.path.join(run_dir, "checkpoint-last.pth"), epoch=epoch, step=step,
                    updates_per_epoch=updates_per_epoch, update_freq=args.update_freq, epoch_done=False)
        record.update(epoch=epoch, step=step)

    return LoopState(amp=amp, update_freq=args.update_freq, clip_grad=args.clip_grad,
                     lr_schedule=lr_schedule, wd_schedule=wd_schedule, updates_per_epoch=updates_per_epoch,
                     model_ema=model_ema, print_freq=args.print_freq, tb=tb, stop=stop, save_fn=save_last,
                     skip_nonfinite=args.skip_nonfinite, channels_last=args.channels_last, world_size=world,
                     # the same list as the checkpoint's: a resumed run keeps counting skips
                     skipped_steps=tstate.extra.setdefault("skipped_steps", []))


def run_epochs(args, run_dir, record, tstate, loop, train_loader, resume_at, train_fn, eval_fn=None,
               best_name=None, lower_is_better=False, epoch_extra=None, epoch_callback=None):
    """The epoch loop of both scripts: train, evaluate, best, checkpoints, log.txt, TensorBoard,
    run record; ends the record as completed, preempted or failed.

    train_fn(epoch, start_step) -> train stats; eval_fn(epoch) -> dict of log entries or None;
    epoch_extra() -> dict added to each log line; epoch_callback(epoch, log) after each epoch.
    """
    import time
    from util.logger import append_json_log
    from util.preemption import Preempted
    start_epoch, start_step, _ = resume_at
    upe = loop.updates_per_epoch
    print(f"start training for {args.epochs} epochs from epoch {start_epoch} step {start_step}")
    t_start = time.time()
    try:
        for epoch in range(start_epoch, args.epochs):
            step0 = start_step if epoch == start_epoch else 0
            train_loader.sampler.set_epoch(epoch, start=step0 * args.batch_size)
            log = {"epoch": epoch, **{f"train_{k}": v for k, v in train_fn(epoch, step0).items()}}
            evaluated = (eval_fn(epoch) if eval_fn else None) or {}
            log.update(evaluated)
            value, best = log.get(best_name or "train_loss"), tstate.best["value"]
            better = value is not None and (best is None or (value < best if lower_is_better else value > best))
            if better:
                tstate.best = {"name": best_name or "train_loss", "value": value, "epoch": epoch}
            tstate.extra["skipped_steps"] = loop.skipped_steps
            save_epoch_checkpoints(args, tstate, epoch, upe, better and bool(evaluated))
            stop_after_logging = None
            try:
                log.update(epoch_extra() if epoch_extra else {})
            except UserError as e:  # e.g. too many bad images: the epoch still gets its log line
                stop_after_logging = e
            append_json_log(run_dir, log)
            loop.tb.scalars(epoch, prefix="epoch/", **{k: v for k, v in log.items()
                                                      if isinstance(v, (int, float)) and k != "epoch"})
            loop.tb.flush()
            record.update(epoch=epoch + 1, step=0, best_metric=tstate.best,
                          **{k: v for k, v in log.items() if k in ("bad_images", "bad_val_images")},
                          **({"skipped_steps": loop.skipped_steps} if loop.skipped_steps else {}))
            if stop_after_logging is not None:
                raise stop_after_logging
            if epoch_callback is not None:
                epoch_callback(epoch, log)
            if args.save_ckpt and loop.stop is not None and any(du.all_gather_object(bool(loop.stop.requested))):
                # a signal during the last step, the evaluation or the save: the epoch's
                # checkpoint is written, so stop now rather than after the next epoch's first step
                raise Preempted(f"stopped after epoch {epoch}")
    except Preempted as p:
        record.finish("preempted", reason=str(p))
        print(f"preempted: state saved in {run_dir}; run the same command to resume")
        return {"status": "preempted", "run_dir": run_dir}
    except BaseException as e:  # an exception may name its own status (util/hpo.py: "pruned")
        try:
            record.finish(getattr(e, "run_status", "failed"), reason=f"{type(e).__name__}: {e}",
                          **({"skipped_steps": loop.skipped_steps} if loop.skipped_steps else {}))
        except UserError as unwritten:  # a full disk: the first error is the one to show
            print(f"warning: {unwritten}", file=sys.stderr, flush=True)
        raise
    finally:
        loop.tb.close()
        loop.stop.uninstall()
    record.finish("completed")
    print(f"training time {time.time() - t_start:.0f} s; best {tstate.best['name']} {tstate.best['value']}")
    return {"status": "completed", "best": tstate.best, "run_dir": run_dir}


def place_model(model, args, info):
    """Device, memory format, DDP and torch.compile. Returns (ddp_model, train_model): evaluate
    with the first, train with the second (the compiled one when --compile)."""
    import torch
    from util.speed import maybe_compile
    model.to(info.device)
    if getattr(model, "channels_last_inside", False):
        # ours compute in channels_last whatever the input: conv weights in that layout get their
        # gradients in the layout DDP's buckets expect (no copy per step, no stride warning);
        # GRN's [1, 1, 1, C] parameters keep theirs, as their gradients do
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.to(memory_format=torch.channels_last)
    elif args.channels_last:
        model.to(memory_format=torch.channels_last)
    if info.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    return model, maybe_compile(model, args.compile)


def lr_schedule_for(args, train_loader):
    """(updates per epoch, per-update lr values: linear warmup then cosine to --min_lr)."""
    from util.errors import UserError
    from util.optim import cosine_schedule
    updates_per_epoch = len(train_loader) // args.update_freq
    if updates_per_epoch < 1:
        raise UserError("one epoch has fewer batches than --update_freq; lower --update_freq or --batch_size")
    return updates_per_epoch, cosine_schedule(args.lr, args.min_lr, args.epochs, updates_per_epoch,
                                              args.warmup_epochs, args.warmup_steps)


def attach_bad_image_log(train_set, run_dir, val_set=None):
    """Unreadable images of an ImageFolder (train and val) are logged to <run_dir>/bad_images.txt.
    First rank 0 re-checks the list an earlier launch left (BadImageLog.recheck): images fixed
    since then no longer count, so relaunching after fixing them resumes."""
    if hasattr(train_set, "bad_log"):
        from util.data import BadImageLog
        path = os.path.join(run_dir, "bad_images.txt")
        if du.is_main_process():
            BadImageLog.recheck(path, getattr(train_set, "loader", None))
        du.barrier()  # no rank reads or appends to the list before the re-check is done
        train_set.bad_log = BadImageLog(path, "train")
        if hasattr(val_set, "bad_log"):
            val_set.bad_log = BadImageLog(path, "val")

"""Exact resume: everything a checkpoint holds, gathered from (and restored into) the live
objects, where a run starts again (ResumePoint), and the epoch checkpoints a run keeps."""
import os
from dataclasses import dataclass
from typing import Optional

from util import distributed as du
from util.checkpoint import (find_resumable, load_checkpoint, prune_epoch_checkpoints, rng_state,
                             save_checkpoint, set_rng_state)
from util.console import info
from util.errors import UserError


@dataclass(frozen=True)
class ResumePoint:
    """Where training starts: epoch, micro-step inside it, and the checkpoint it came from."""
    epoch: int
    step: int = 0
    path: Optional[str] = None     # None: a fresh start


class TrainingState:
    """Everything exact resume needs. `args`: the parsed settings (this launch's batch split);
    `saved_args`: the plain dict a checkpoint stores under "args" (RunContext.settings)."""

    def __init__(self, args, saved_args, model_without_ddp, optimizer, scaler, model_ema=None):
        self.args, self.saved_args = args, dict(saved_args)
        self.model, self.optimizer, self.scaler, self.ema = model_without_ddp, optimizer, scaler, model_ema
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
             "args": dict(self.saved_args), "extra": dict(self.extra)}
        if self.ema is not None:
            s["model_ema"] = self.ema.module.state_dict()
        return s

    def save(self, path, **kw):
        s = self.state(**kw)
        if du.is_main_process():
            save_checkpoint(s, path)
        du.barrier()

    def restore(self, ckpt, path):
        """Load `ckpt` (read from `path`) into the live objects. Returns the ResumePoint."""
        from util.checkpoint import check_state_dict_matches
        check_state_dict_matches(self.model, ckpt["model"], f"checkpoint {path}")
        self.model.load_state_dict(ckpt["model"])
        if "optimizer" in ckpt and not self.args.eval:  # evaluating needs the weights only
            try:
                self.optimizer.load_state_dict(ckpt["optimizer"])
            except ValueError as e:  # torch: "... doesn't match the size of optimizer's group"
                raise UserError(f"checkpoint {path} holds an optimizer over other parameters than this run's "
                                f"({e}); resume it with the flags it was trained with (e.g. --freeze_stages, "
                                "--layer_decay, --opt)") from None
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
            info(f"warning: {path} was written by {len(rngs)} processes, this run has "
                 f"{du.get_world_size()}: random streams restart from the seed")
        if ckpt.get("epoch_done", True):
            return ResumePoint(ckpt["epoch"] + 1, 0, path)
        return ResumePoint(ckpt["epoch"], self._step_in_this_layout(ckpt, path), path)

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
        info(f"{path}: saved by {old[0]} process(es) x batch {old[1]} x update_freq {old[2]} at step "
             f"{ckpt['step']}; this launch continues at step {step} (same {samples} samples consumed)")
        return step


def resume_point(args, run_dir, tstate):
    """Resume from --resume, else (auto_resume) from the newest whole checkpoint in `run_dir`.
    Returns the ResumePoint (a fresh start at --start_epoch when there is nothing to resume)."""
    path, ckpt = None, None
    if args.resume:
        path, ckpt = args.resume, load_checkpoint(args.resume)
    elif args.auto_resume and run_dir:
        path, ckpt = find_resumable(run_dir)
    if ckpt is None:
        return ResumePoint(args.start_epoch)
    start = tstate.restore(ckpt, path)
    info(f"resumed from {path}: epoch {start.epoch} step {start.step}")
    return start


def save_release_weights(args, run_dir, tstate, epoch, is_best):
    """--save_safetensors: model.safetensors after the last epoch, model-best.safetensors at each
    new best; weights only, in the model's own names, of the model the best metric measures (the
    EMA with --model_ema_eval). Rank 0 only, atomic; independent of --save_ckpt."""
    if not (run_dir and args.save_safetensors and du.is_main_process()):
        return
    from models.weights import save_weights
    ema = tstate.ema is not None and str(tstate.best.get("name") or "").endswith("_ema")
    weights = (tstate.ema.module if ema else tstate.model).state_dict()
    names = ["model.safetensors"] if epoch + 1 == args.epochs else []
    names += ["model-best.safetensors"] if is_best else []
    for name in names:
        path = os.path.join(run_dir, name)
        try:
            save_weights(weights, path)
        except OSError as e:
            raise UserError(f"could not write {path} ({e.strerror or e}); free disk space or choose "
                            "another --output_dir") from None


def save_epoch_checkpoints(args, run_dir, tstate, epoch, updates_per_epoch, is_best):
    """checkpoint-<epoch>.pth (every save_ckpt_freq epochs and at the end), checkpoint-best.pth,
    and checkpoint-last.pth, keeping the newest save_ckpt_num epoch files."""
    save_release_weights(args, run_dir, tstate, epoch, is_best)
    if not (args.save_ckpt and run_dir):
        return
    state = tstate.state(epoch=epoch, step=0, updates_per_epoch=updates_per_epoch,
                         update_freq=args.update_freq, epoch_done=True)
    if du.is_main_process():
        if (epoch + 1) % args.save_ckpt_freq == 0 or epoch + 1 == args.epochs:
            save_checkpoint(state, os.path.join(run_dir, f"checkpoint-{epoch}.pth"))
            prune_epoch_checkpoints(run_dir, args.save_ckpt_num)
        else:  # resume picks the checkpoint with the highest global step, whichever file it is
            save_checkpoint(state, os.path.join(run_dir, "checkpoint-last.pth"))
        if is_best:
            save_checkpoint(state, os.path.join(run_dir, "checkpoint-best.pth"))
    du.barrier()

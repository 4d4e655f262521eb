"""One Trainer for every kind of training. A Task (engine_finetune.FinetuneTask,
engine_pretrain.PretrainTask) states what its kind does differently: the data and model, the
loss of a batch, evaluation, the best metric and its direction, what TensorBoard shows. The
Trainer does the rest, the same way for both: the run directory and record, the model's
placement and optimizer, the epoch loop, resume, checkpoints, preemption, the search's
per-epoch callback, --preflight and --eval.

    dist = start_process(args)                 # util/run_context.py
    task = FinetuneTask(args, dist)
    Trainer(args, task, dist).fit(train_one_epoch)
"""
import functools
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch

from models.errors import ModelError
from util import distributed as du
from util import flags
from util.console import info
from util.errors import UserError
from util.logger import TensorBoard, append_json_log
from util.optim import create_optimizer, effective_lr, global_batch, lr_schedule, updates_per_epoch
from util.preemption import Preempted, StopSignals
from util.run_context import RunContext, open_run, run_record
from util.train_loop import Amp, LoopState
from util.train_state import TrainingState, resume_point, save_epoch_checkpoints
from util.validate import check_inputs


def as_user_error(e, flags=None):
    """A ModelError (which names the argument it is about) as the UserError a script reports,
    with the argument's flag for it when `flags` ({argument: flag}) knows one."""
    message = str(e)
    for arg, flag in (flags or {}).items():
        if message.startswith(f"{arg} "):
            message = flag + message[len(arg):]
    return UserError(message)


def model_errors_as_user_errors(fn):
    """An entry point's ModelError is one line and exit 2, as any UserError (under the
    exit_on_user_error decorator, and for callers of `main.__wrapped__`)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ModelError as e:
            raise as_user_error(e) from None
    return wrapper


@dataclass
class Models:
    """The run's model in the forms each job needs, its EMA, and the autocast they run under."""
    model: torch.nn.Module            # evaluate with it (DDP-wrapped when distributed)
    train: torch.nn.Module            # train with it (compiled with --compile)
    unwrapped: torch.nn.Module        # save and show it (no DDP, no compile prefixes)
    ema: Optional[Any] = None         # timm ModelEmaV3
    amp: Optional[Amp] = None


class Task:
    """What one kind of training states; subclasses override what differs."""
    kind = None                       # "finetune" | "pretrain": the kind of run directory
    label = "model"                   # how the start line names the model
    best_name, lower_is_better = "train_loss", True

    def __init__(self, args, dist, train_set, val_set=None, nb_classes=None):
        self.args, self.dist = args, dist
        self.train_set, self.val_set, self.nb_classes = train_set, val_set, nb_classes

    @property
    def uint8(self):
        """Whether this run's loaders return uint8 images, finished on the device (--device_transforms)."""
        from util.data.device_batches import on_device
        return on_device(self.args, self.dist.device)

    def train_erasing(self):
        """Random erasing of training batches on the device (util/data/device_batches.py), or None."""
        return None

    def device_batches(self, loader, erasing=None):
        """`loader` itself, or (--device_transforms) its uint8 batches finished on the device."""
        if not self.uint8:
            return loader
        from util.data import mean_std
        from util.data.device_batches import DeviceBatches
        return DeviceBatches(loader, self.dist.device, *mean_std(self.args), self.args.channels_last, erasing)

    def optimizer_settings(self):
        """util/optim.create_optimizer's keywords for this task."""
        return {"weight_decay": self.args.weight_decay}

    def build_model(self):
        raise NotImplementedError

    def prepare(self, model):
        """Work on the new model before training (e.g. load weights); returns run.json fields."""
        return {}

    def make_ema(self, model):
        return None

    def wd_schedule(self, updates):
        """Per-update weight decay values, or None to keep --weight_decay."""
        return None

    def loss(self, model, batch):
        """The loss of one batch: a tensor, or a util.train_loop.Loss with scalars for the log."""
        raise NotImplementedError

    def evaluate(self, models, epoch):
        """Entries for the epoch's log line after training it, or None."""
        return None

    def show(self, tb, models, epoch):
        """What TensorBoard shows besides the scalars, after each epoch."""

    def final_eval(self, models):
        """--eval: the stats of one evaluation, for eval.json."""
        raise UserError(f"--eval is not a {self.kind} mode")

    def attach_bad_image_log(self, run_dir):
        """Unreadable images of an ImageFolder (train and val) are logged to <run_dir>/bad_images.txt.
        First rank 0 re-checks the list an earlier launch left (BadImageLog.recheck): images fixed
        since then no longer count, so relaunching after fixing them resumes."""
        if hasattr(self.train_set, "bad_log"):
            from util.data import BadImageLog
            path = os.path.join(run_dir, "bad_images.txt")
            if du.is_main_process():
                BadImageLog.recheck(path, self._still_unreadable)
            du.barrier()  # no rank reads or appends to the list before the re-check is done
            self.train_set.bad_log = BadImageLog(path, "train")
            if hasattr(self.val_set, "bad_log"):
                self.val_set.bad_log = BadImageLog(path, "val")

    def _still_unreadable(self, split, image):
        """An entry of an earlier launch's bad-image list, asked of the set it came from."""
        ds = self.val_set if split == "val" and hasattr(self.val_set, "still_unreadable") else self.train_set
        return ds.still_unreadable(image)

    def bad_image_summary(self):
        """"; N unreadable images replaced (...), listed in <list>" for a run's last line, or ""."""
        from util.data.bad_images import summary
        return summary(getattr(self.train_set, "bad_log", None))

    def bad_images(self):
        """{"bad_images": distinct unreadable images met (train and val), "bad_val_images": of
        which validation (with a validation set)}, the highest counts of any rank, so all ranks
        stop together; more than --max_bad_images stops the run with the list. Called at each
        log line and at the end of each epoch (after evaluation)."""
        log = getattr(self.train_set, "bad_log", None)
        if log is None:
            return {"bad_images": 0}
        found = log.found()  # (split, path) pairs: each epoch meets a bad file again
        n_val = sum(split == "val" for split, _ in found)
        count, n_val = (max(c) for c in zip(*du.all_gather_object((len(found), n_val))))
        limit = self.args.max_bad_images
        if count > limit:
            paths = [p + (" (validation)" if split == "val" else "") for split, p in found]
            more = f" and {len(paths) - 5} more" if len(paths) > 5 else ""
            raise UserError(f"{count} unreadable images (more than --max_bad_images {limit}): "
                            f"{', '.join(paths[:5])}{more}; full list in {log.path}; fix or remove them")
        return {"bad_images": count, **({"bad_val_images": n_val} if hasattr(self.val_set, "bad_log") else {})}


def place_model(model, ema, amp, args, dist):
    """Device, memory format, DDP and torch.compile: the Models of the run."""
    from util.speed import maybe_compile
    model.to(dist.device)
    if getattr(model, "channels_last_inside", False):
        # ours compute in channels_last whatever the input: conv weights in that layout get their
        # gradients in the layout DDP's buckets expect (no copy per step, no stride warning);
        # GRN's [1, 1, 1, C] parameters keep theirs, as their gradients do
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.to(memory_format=torch.channels_last)
    elif args.channels_last:
        model.to(memory_format=torch.channels_last)
    wrapped = model
    if dist.distributed:
        # gradient_as_bucket_view: the gradients are views into DDP's all-reduce buckets rather
        # than a second copy of them (one model's worth of gradient memory less per process)
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
            gradient_as_bucket_view=True)
    return Models(wrapped, maybe_compile(wrapped, args.compile), model, ema, amp)


class Trainer:
    """Builds a run of `task` from the parsed settings `args` and this process's DistInfo, then
    runs it: `fit(train_one_epoch)`, `preflight()` or `evaluate()` (--eval).
    `on_run_dir(run_dir)`: told the run directory on every rank once it is chosen."""

    def __init__(self, args, task, dist, on_run_dir=None):
        self.args, self.task = args, task
        check_inputs(args, task.train_set, dist.world_size, task.build_model)
        world = dist.world_size
        self.ctx = RunContext(dist, effective_lr(args, world), global_batch(args, world), task.nb_classes)
        self.record = None
        if not args.preflight:  # a preflight makes no run: it writes nothing
            self.ctx = open_run(args, task.kind, self.ctx)
            self.record = run_record(args, task.kind, self.ctx)
            if on_run_dir is not None:
                on_run_dir(self.ctx.run_dir)
            task.attach_bad_image_log(self.ctx.run_dir)
        self._build_model()
        self._build_loader()

    def _build_model(self):
        args, task, ctx = self.args, self.task, self.ctx
        model = task.build_model()
        self.extra = task.prepare(model)
        model.to(ctx.device)
        ema = task.make_ema(model)
        self.n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
        info(f"{task.label} {args.model}: {self.n_parameters / 1e6:.2f}M parameters; lr {ctx.lr:.3e}, "
             f"global batch {ctx.global_batch} ({args.batch_size} x {args.update_freq} x {ctx.dist.world_size})")
        self.optimizer = create_optimizer(model, ctx.lr, ctx.device, **task.optimizer_settings())
        self.models = place_model(model, ema, Amp.create(args.use_amp, ctx.device), args, ctx.dist)

    def _build_loader(self):
        from util.data import build_train_loader
        d = self.ctx.dist
        loader = build_train_loader(self.task.train_set, self.args, d.world_size, d.rank, with_seeds=self.task.uint8)
        self.train_loader = self.task.device_batches(loader, self.task.train_erasing())
        self.updates_per_epoch = updates_per_epoch(len(self.train_loader), self.args.update_freq)
        self.lr_schedule = lr_schedule(self.args, self.ctx.lr, self.updates_per_epoch)
        self.wd_schedule = self.task.wd_schedule(self.updates_per_epoch)

    def _loop_state(self, **kw):
        a, m = self.args, self.models
        return LoopState(amp=m.amp, update_freq=a.update_freq, clip_grad=a.clip_grad, lr_schedule=self.lr_schedule,
                         wd_schedule=self.wd_schedule, updates_per_epoch=self.updates_per_epoch, model_ema=m.ema,
                         print_freq=a.print_freq, skip_nonfinite=a.skip_nonfinite, channels_last=a.channels_last,
                         world_size=self.ctx.dist.world_size, **kw)

    def _training_state(self):
        """The TrainingState, restored from a checkpoint when there is one; and where to start."""
        from util.checkpoint import plain_args
        m = self.models
        self.state = TrainingState(self.args, plain_args(self.ctx.settings(self.args)), m.unwrapped,
                                   self.optimizer, m.amp.scaler, m.ema)
        self.state.extra.update(self.extra)
        self.state.extra["signature"] = self.record.signature
        return resume_point(self.args, self.ctx.run_dir, self.state)

    def preflight(self):
        """--preflight: the real training step on two batches, timed; nothing is written."""
        from util.preflight import preflight
        preflight(self.args, self.models.train, self.task.loss, self.train_loader, self.optimizer,
                  self.ctx.device, self._loop_state(), self.updates_per_epoch)
        du.cleanup()
        return None

    def evaluate(self):
        """--eval: the weights of --resume (or the run's newest checkpoint, or --finetune)
        evaluated once; the stats, with the checkpoint's path and epoch, go to eval.json next to
        that checkpoint (or in --output_dir), and are returned."""
        start = self._training_state()
        stats = self.task.final_eval(self.models)
        weights = start.path or flags.value(self.args, "finetune")
        # a checkpoint of ours: the epoch it holds (finished, or in progress at `step`)
        where = {} if start.path is None else {"epoch": start.epoch - 1} if start.step == 0 else \
            {"epoch": start.epoch, "step": start.step}
        stats = {"checkpoint": os.path.abspath(weights), **({"epoch": None} | where), **stats}
        out_dir = self.args.output_dir or (self.ctx.run_dir if start.path else os.path.dirname(weights) or ".")
        if du.is_main_process():
            from util.atomic import atomic_write_json, remove_empty_dirs
            path = os.path.join(out_dir, "eval.json")
            atomic_write_json(path, stats)
            if os.path.abspath(out_dir) != os.path.abspath(self.ctx.run_dir):
                remove_empty_dirs([self.ctx.run_dir])  # the settings' run folder, made for nothing
            info(f"evaluated {weights}: results in {path}{self.task.bad_image_summary()}")
        du.cleanup()
        return stats

    def fit(self, train_one_epoch, epoch_callback=None, record_extra=None):
        """Train from where the run stopped to --epochs with `train_one_epoch(model, loss_fn,
        loader, optimizer, device, epoch, loop_state, start_step=)` (util/train_loop.py).
        `epoch_callback(epoch, log)` runs after each epoch on every rank; `record_extra`: more
        run.json fields. Returns {"status", "run_dir"(, "best")}."""
        start = self._training_state()
        loop = self._epoch_loop_state(start)
        self.record.start(resumed=start.path is not None, start_epoch=start.epoch, start_step=start.step,
                          n_parameters=self.n_parameters, **{**self.extra, **(record_extra or {})})
        result = self._epochs(train_one_epoch, loop, start, epoch_callback)
        du.cleanup()
        return result

    def _epoch_loop_state(self, start):
        """The LoopState of training: TensorBoard, signal handling, the rolling-checkpoint hook."""
        args, run_dir, upe = self.args, self.ctx.run_dir, self.updates_per_epoch
        # the first step this run will log; TensorBoard drops what a stopped run logged from there on
        purge = start.epoch * upe + start.step // args.update_freq + 1 if start.path else None

        def save_last(epoch, step, tag):
            self.state.save(os.path.join(run_dir, "checkpoint-last.pth"), epoch=epoch, step=step,
                            updates_per_epoch=upe, update_freq=args.update_freq, epoch_done=False)
            self.record.update(epoch=epoch, step=step)

        checks = self.task.bad_images if hasattr(self.task.train_set, "bad_log") else None
        # skipped_steps: the same list as the checkpoint's, so a resumed run keeps counting skips
        return self._loop_state(tb=TensorBoard(self.ctx.log_dir, purge_step=purge), save_fn=save_last,
                                stop=StopSignals(args.save_ckpt_minutes, self.ctx.dist.rank).install(),
                                skipped_steps=self.state.extra.setdefault("skipped_steps", []), checks=checks)

    def _epochs(self, train_one_epoch, loop, start, epoch_callback):
        """The epochs; ends the record as completed, preempted or failed."""
        args, run_dir, record = self.args, self.ctx.run_dir, self.record
        info(f"run directory: {run_dir}")
        info(f"start training for {args.epochs} epochs from epoch {start.epoch} step {start.step}")
        t_start = time.time()
        try:
            for epoch in range(start.epoch, args.epochs):
                step0 = start.step if epoch == start.epoch else 0
                self._epoch(train_one_epoch, loop, epoch, step0, epoch_callback)
        except Preempted as p:
            record.finish("preempted", reason=str(p))
            info(f"preempted: state saved in {run_dir}; run the same command to resume{self.task.bad_image_summary()}")
            return {"status": "preempted", "run_dir": run_dir}
        except BaseException as e:  # an exception may name its own status (util/hpo/trial.py: "pruned")
            info(f"run directory: {run_dir}")
            try:
                record.finish(getattr(e, "run_status", "failed"), reason=f"{type(e).__name__}: {e}",
                              **({"skipped_steps": loop.skipped_steps} if loop.skipped_steps else {}))
            except UserError as unwritten:  # a full disk: the first error is the one to show
                print(f"warning: {unwritten}", file=sys.stderr, flush=True)
            raise
        finally:
            loop.tb.close()
            loop.stop.uninstall()
        self._final_state_as_last()
        record.finish("completed")
        best = self.state.best
        info(f"training time {time.time() - t_start:.0f} s; best {best['name']} {best['value']}")
        info(f"run directory: {run_dir}{self.task.bad_image_summary()}")
        return {"status": "completed", "best": best, "run_dir": run_dir}

    def _final_state_as_last(self):
        """A completed run's checkpoint-last.pth is its final state, the same as
        checkpoint-<last epoch>.pth (not an older rolling save): a second whole copy, which
        auto-resume falls back to should the epoch file be damaged. Every rank calls it."""
        a = self.args
        if a.save_ckpt:
            self.state.save(os.path.join(self.ctx.run_dir, "checkpoint-last.pth"), epoch=a.epochs - 1, step=0,
                            updates_per_epoch=self.updates_per_epoch, update_freq=a.update_freq, epoch_done=True)

    def _epoch(self, train_one_epoch, loop, epoch, step0, epoch_callback):
        """Train and evaluate one epoch, then the best, checkpoints, log.txt, TensorBoard, the
        run record and the callback."""
        args, task, m, state, run_dir = self.args, self.task, self.models, self.state, self.ctx.run_dir
        self.train_loader.sampler.set_epoch(epoch, start=step0 * args.batch_size)
        stats = train_one_epoch(m.train, task.loss, self.train_loader, self.optimizer, self.ctx.device, epoch,
                                loop, start_step=step0)
        log = {"epoch": epoch, **{f"train_{k}": v for k, v in stats.items()}}
        evaluated = task.evaluate(m, epoch) or {}
        task.show(loop.tb, m, epoch)
        log.update(evaluated)
        better = self._track_best(log, epoch)
        state.extra["skipped_steps"] = loop.skipped_steps
        save_epoch_checkpoints(args, run_dir, state, epoch, self.updates_per_epoch, better and bool(evaluated))
        stop_after_logging = None
        try:
            log.update({"n_parameters": self.n_parameters, **task.bad_images()})
        except UserError as e:  # e.g. too many bad images: the epoch still gets its log line
            stop_after_logging = e
        append_json_log(run_dir, log)
        loop.tb.scalars(epoch, prefix="epoch/", **{k: v for k, v in log.items()
                                                  if isinstance(v, (int, float)) and k != "epoch"})
        loop.tb.flush()
        self.record.update(epoch=epoch + 1, step=0, best_metric=state.best,
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

    def _track_best(self, log, epoch):
        """Is this epoch's value of the task's best metric a new best? Records it if so."""
        name, best = self.task.best_name, self.state.best["value"]
        value = log.get(name)
        better = value is not None and (best is None or (value < best if self.task.lower_is_better else value > best))
        if better:
            self.state.best = {"name": name, "value": value, "epoch": epoch}
        return better

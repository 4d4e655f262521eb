"""One Trainer for every kind of training. A Task (engine_finetune.FinetuneTask,
engine_pretrain.PretrainTask) states what its kind does differently: the data and model, the
loss of a batch, evaluation, the best metric and its direction, what TensorBoard shows. The
Trainer does the rest, the same way for both: the run directory and record, the model's
placement and optimizer, the epoch loop, resume, checkpoints, preemption, the search's
per-epoch callback, --preflight and --eval.

    dist = start_process(args)                 # util/run_context.py
    Trainer(args, FinetuneTask(args, dist), dist).fit()
"""
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch

from util import distributed as du
from util.console import info
from util.data.bad_images import attach_bad_image_log, bad_image_counts, bad_image_summary
from util.data.device_batches import device_loader, on_device
from util.errors import UserError
from util.logger import append_json_log
from util.optim import create_optimizer, effective_lr, global_batch, lr_schedule, updates_per_epoch
from util.preemption import Preempted, StopSignals, interruption
from util.run_context import RunContext, open_run, run_record
from util.train_loop import Amp, train_one_epoch
from util.tracking import Tracking
from util.train_state import TrainingState, resume_point, save_epoch_checkpoints
from util.validate import check_inputs


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
    train_erasing = None              # random erasing of training batches on the device (--device_transforms)

    def __init__(self, args, dist, train_set, val_set=None, nb_classes=None):
        self.args, self.dist = args, dist
        self.train_set, self.val_set, self.nb_classes = train_set, val_set, nb_classes

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
        """The loss of one batch (a scalar tensor)."""
        raise NotImplementedError

    def evaluate(self, models, epoch):
        """Entries for the epoch's log line after training it, or None."""
        return None

    def show(self, tb, models, epoch):
        """What TensorBoard shows besides the scalars, after each epoch."""

    def final_eval(self, models):
        """--eval: the stats of one evaluation, for eval.json."""
        raise UserError(f"--eval is not a {self.kind} mode")


def place_model(model, ema, amp, args, dist):
    """Device, memory format, DDP and torch.compile: the Models of the run."""
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
    # compiled as timm's train.py does; a platform it cannot compile on fails at the first step,
    # which says so in one line (util/train_loop.compile_failed). Checkpoints are saved from the
    # unwrapped model, never with the compiled wrapper's `_orig_mod.` prefix.
    return Models(wrapped, torch.compile(wrapped) if args.compile else wrapped, model, ema, amp)


class Trainer:
    """Builds a run of `task` from the parsed settings `args` and this process's DistInfo, then
    runs it: `fit()`, `preflight()` or `evaluate()` (--eval).
    `on_run_dir(run_dir)`: told the run directory on every rank once it is chosen."""

    def __init__(self, args, task, dist, on_run_dir=None):
        self.args, self.task = args, task
        check_inputs(args, task.train_set, dist.world_size, task.build_model)
        world = dist.world_size
        ctx = RunContext(dist, effective_lr(args, world), global_batch(args, world), task.nb_classes)
        self.record = None
        if not args.preflight:  # a preflight makes no run: it writes nothing
            ctx = open_run(args, task.kind, ctx)
            self.record = run_record(args, task.kind, ctx)
            if on_run_dir is not None:
                on_run_dir(ctx.run_dir)
            attach_bad_image_log(ctx.run_dir, task.train_set, task.val_set)
        self.ctx = ctx
        model = task.build_model()
        self.extra = task.prepare(model)
        model.to(ctx.device)
        ema = task.make_ema(model)
        self.n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)  # log.txt's, as the original's
        total = sum(p.numel() for p in model.parameters())  # a probe or --freeze_stages trains fewer
        trained = f" ({self.n_parameters:,} trained)" if total != self.n_parameters else ""
        info(f"{task.label} {args.model}: {total / 1e6:.2f}M parameters{trained}; lr {ctx.lr:.3e}, "
             f"global batch {ctx.global_batch} ({args.batch_size} x {args.update_freq} x {world})")
        self.optimizer = create_optimizer(model, ctx.lr, ctx.device, **task.optimizer_settings())
        self.models = place_model(model, ema, Amp.create(args.use_amp, ctx.device), args, dist)

        from util.data import build_train_loader
        uint8 = on_device(args, ctx.device)
        loader = build_train_loader(task.train_set, args, world, dist.rank, with_seeds=uint8)
        self.train_loader = device_loader(loader, args, ctx.device, task.train_erasing)
        self.updates_per_epoch = updates_per_epoch(len(self.train_loader), args.update_freq)
        self.lr_schedule = lr_schedule(args, ctx.lr, self.updates_per_epoch)
        self.wd_schedule = task.wd_schedule(self.updates_per_epoch)

    def _training_state(self):
        """The TrainingState, restored from a checkpoint when there is one; and where to start."""
        from util.checkpoint import plain_args
        m = self.models
        self.state = TrainingState(self.args, plain_args(self.ctx.settings(self.args)), m.unwrapped,
                                   self.optimizer, m.amp.scaler, m.ema)
        self.state.extra.update(self.extra)
        self.state.extra["signature"] = self.record.signature
        start = resume_point(self.args, self.ctx.run_dir, self.state)
        classes = getattr(self.task.train_set, "classes", None)
        if self.task.nb_classes and classes is not None and len(classes) == self.task.nb_classes:
            # the class names, in label order, for --predict; set after the restore, which brings
            # back the extra of a checkpoint written before checkpoints kept them
            self.state.extra["classes"] = [str(c) for c in classes]
        return start

    def preflight(self):
        """--preflight: the real training step on two batches, timed; nothing is written."""
        from util.preflight import preflight
        m = self.models
        preflight(self.args, m.train, self.task.loss, self.train_loader, self.optimizer, self.ctx.device,
                  m.amp, m.ema, self.lr_schedule, self.wd_schedule)
        du.cleanup()
        return None

    def evaluate(self):
        """--eval: the weights of --resume (or the run's newest checkpoint, or --finetune)
        evaluated once; the stats, with the checkpoint's path and epoch, go to eval.json next to
        that checkpoint (or in --output_dir), and are returned."""
        start = self._training_state()
        stats = self.task.final_eval(self.models)
        weights = start.path or self.args.finetune
        # a checkpoint of ours: the epoch it holds (finished, or in progress at `step`)
        where = {} if start.path is None else {"epoch": start.epoch - 1} if start.step == 0 else \
            {"epoch": start.epoch, "step": start.step}
        stats = {"checkpoint": os.path.abspath(weights), **({"epoch": None} | where), **stats}
        out_dir = self.args.output_dir or (self.ctx.run_dir if start.path else os.path.dirname(weights) or ".")
        if du.is_main_process():
            from models.atomic import atomic_write_json, remove_empty_dirs
            path = os.path.join(out_dir, "eval.json")
            atomic_write_json(path, stats)
            if os.path.abspath(out_dir) != os.path.abspath(self.ctx.run_dir):
                remove_empty_dirs([self.ctx.run_dir])  # the settings' run folder, made for nothing
            info(f"evaluated {weights}: results in {path}{bad_image_summary(self.task.train_set)}")
        du.cleanup()
        return stats

    def fit(self, epoch_callback=None, record_extra=None):
        """Train from where the run stopped to --epochs. After each epoch: evaluation, the best
        metric, checkpoints, log.txt, TensorBoard and trackers, run.json, then `epoch_callback(epoch,
        log)` on every rank (the search reports and prunes there). `record_extra`: more run.json fields.
        Ends the record completed, preempted, failed or interrupted; returns {"status", "run_dir"(, "best")}."""
        args, task, m, run_dir, record = self.args, self.task, self.models, self.ctx.run_dir, self.record
        start = self._training_state()
        state, upe = self.state, self.updates_per_epoch
        extra = {**self.extra, **(record_extra or {})}
        # TensorBoard, W&B, MLflow past the step resumed from; ids in run.json: one tracker run per run
        resumed_at = start.epoch * upe + start.step // args.update_freq if start.path else -1
        tb = Tracking(args, task.kind, self.ctx, record, extra.get("study"), upe, resumed_at)
        record.start(resumed=start.path is not None, start_epoch=start.epoch, start_step=start.step,
                     n_parameters=self.n_parameters, **extra, **tb.ids)
        stop = StopSignals(args.save_ckpt_minutes, self.ctx.dist.rank).install()
        # the same list as the checkpoint's, so a resumed run keeps counting skips
        skipped = state.extra.setdefault("skipped_steps", [])

        def save_last(epoch, step):  # the rolling checkpoint, at an update boundary
            state.save(os.path.join(run_dir, "checkpoint-last.pth"), epoch=epoch, step=step,
                       updates_per_epoch=upe, update_freq=args.update_freq, epoch_done=False)
            record.update(epoch=epoch, step=step)

        def check_bad_images():
            return bad_image_counts(task.train_set, task.val_set, args.max_bad_images)

        info(f"run directory: {run_dir}")
        info(f"start training for {args.epochs} epochs from epoch {start.epoch} step {start.step}")
        t_start = time.time()
        try:
            for epoch in range(start.epoch, args.epochs):
                step0 = start.step if epoch == start.epoch else 0
                self.train_loader.sampler.set_epoch(epoch, start=step0 * args.batch_size)
                stats = train_one_epoch(
                    m.train, task.loss, self.train_loader, self.optimizer, self.ctx.device, epoch, args, m.amp,
                    m.ema, self.lr_schedule, self.wd_schedule, start_step=step0, tb=tb, stop=stop,
                    save_fn=save_last, skipped_steps=skipped,
                    checks=check_bad_images if hasattr(task.train_set, "bad_log") else None)
                log = {"epoch": epoch, **{f"train_{k}": v for k, v in stats.items()}}
                evaluated = task.evaluate(m, epoch) or {}
                task.show(tb, m, epoch)
                log.update(evaluated)
                value, best = log.get(task.best_name), state.best["value"]
                better = value is not None and (best is None or (value < best if task.lower_is_better else value > best))
                if better:
                    state.best = {"name": task.best_name, "value": value, "epoch": epoch}
                save_epoch_checkpoints(args, run_dir, state, epoch, upe, better and bool(evaluated))
                stop_after_logging = None
                try:
                    log.update({"n_parameters": self.n_parameters, **check_bad_images()})
                except UserError as e:  # e.g. too many bad images: the epoch still gets its log line
                    stop_after_logging = e
                append_json_log(run_dir, log)
                tb.epoch(epoch, log)
                tb.flush()
                record.update(epoch=epoch + 1, step=0, best_metric=state.best,
                              **{k: v for k, v in log.items() if k in ("bad_images", "bad_val_images")},
                              **({"skipped_steps": skipped} if skipped else {}))
                if stop_after_logging is not None:
                    raise stop_after_logging
                if epoch_callback is not None:
                    epoch_callback(epoch, log)
                if args.save_ckpt and any(du.all_gather_object(bool(stop.requested))):
                    # a signal during the last step, the evaluation or the save: the epoch's
                    # checkpoint is written, so stop now rather than after the next epoch's first step
                    raise Preempted(f"stopped after epoch {epoch}")
            if args.save_ckpt:
                # checkpoint-last.pth of a completed run is its final state, the same as
                # checkpoint-<last epoch>.pth (not an older rolling save): a second whole copy, which
                # auto-resume falls back to should the epoch file be damaged. Every rank saves.
                state.save(os.path.join(run_dir, "checkpoint-last.pth"), epoch=args.epochs - 1, step=0,
                           updates_per_epoch=upe, update_freq=args.update_freq, epoch_done=True)
            record.finish("completed")
        except Preempted as p:
            record.finish("preempted", reason=str(p))
            info(f"preempted: state saved in {run_dir}; run the same command to resume"
                 f"{bad_image_summary(task.train_set)}")
            du.cleanup()
            return {"status": "preempted", "run_dir": run_dir}
        except BaseException as e:  # an exception may name its own status (util/hpo/trial.py: "pruned")
            cut = interruption(e, stop)
            if cut is not None:  # the group broke under this rank: a teardown, not this run's failure
                print(f"interrupted: {cut.reason}", file=sys.stderr, flush=True)  # every rank says it
                record.finish("interrupted", reason=cut.reason)
                raise cut from None
            info(f"run directory: {run_dir}")
            try:
                record.finish(getattr(e, "run_status", "failed"), reason=f"{type(e).__name__}: {e}",
                              **({"skipped_steps": skipped} if skipped else {}))
            except UserError as unwritten:  # a full disk: the first error is the one to show
                print(f"warning: {unwritten}", file=sys.stderr, flush=True)
            raise
        finally:
            tb.finish(record.data.get("status"), state.best)  # the trackers end as run.json says
            tb.close()
            stop.uninstall()
        info(f"training time {time.time() - t_start:.0f} s; best {state.best['name']} {state.best['value']}")
        info(f"run directory: {run_dir}{bad_image_summary(task.train_set)}")
        du.cleanup()
        return {"status": "completed", "best": state.best, "run_dir": run_dir}

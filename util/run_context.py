"""What a process learns while it starts, kept beside the settings instead of on them: where it
runs (util/distributed.DistInfo), the effective lr, the class count, the run directory. `args`
stays as parsed; `RunContext.settings(args)` gives the merged view the run's files record
(config.yaml, a checkpoint's "args"), with the same keys and values the original scripts had
written onto `args`.

Also the start of every process (seeds, allocator, process group) and of every run (the run
directory chosen on rank 0 for all ranks, config.yaml, the run record).
"""
import copy
import os
import random
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np
import torch

from util import distributed as du
from util import runs
from util.config import flag_dests, save_config
from util.console import info
from util.errors import UserError


@dataclass(frozen=True)
class RunContext:
    """What this process learned at run time, passed to whoever needs it."""
    dist: du.DistInfo
    lr: float                          # --lr, or blr * global batch / 256 (util/optim.effective_lr)
    global_batch: int                  # batch_size x update_freq x processes
    nb_classes: Optional[int] = None   # from the dataset (fine-tuning)
    run_dir: Optional[str] = None      # None until the run opened, and for --preflight (no run)
    log_dir: Optional[str] = None      # TensorBoard: --log_dir, or <run_dir>/tensorboard

    @property
    def device(self):
        return self.dist.device

    def learned(self):
        """The values the original scripts wrote onto `args`, under the names they used there."""
        d = self.dist
        out = {"rank": d.rank, "world_size": d.world_size, "gpu": d.local_rank,
               "distributed": d.distributed, "device": str(d.device), "lr": self.lr}
        if self.nb_classes is not None:
            out["nb_classes"] = self.nb_classes
        if self.run_dir is not None:
            out.update(output_dir=self.run_dir, log_dir=self.log_dir)
        return out

    def settings(self, args):
        """A copy of `args` with the learned values merged in (args itself is left as it is),
        without the values the flag table fixes for flags this script lacks (util/flags.Flag.fixed)."""
        merged = copy.copy(args)
        for name in set(vars(args)) - (flag_dests(args) or set(vars(args))):
            delattr(merged, name)
        vars(merged).update(self.learned())
        return merged


def start_process(args):
    """What every process does first: the process group and device (util/distributed.py), the
    allocator tuning on CPU runs, per-rank seeds, cudnn autotuning. Returns the DistInfo."""
    from util.speed import tune_allocator_for
    dist = du.init_distributed(args)
    tune_allocator_for(dist.device)  # CPU: keep activation buffers in the heap (2x faster steps here)
    seed_everything(args.seed, dist.rank)
    torch.backends.cudnn.benchmark = True
    return dist


def seed_everything(seed, rank):
    seed = seed + rank
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)


class AlreadyCompleted(SystemExit):
    """Exit 0: the run these settings name has completed. A caller that catches it (the
    hyperparameter search, util/hpo/) learns which run it was and reuses its result."""

    def __init__(self, run_dir):
        super().__init__(0)
        self.run_dir = run_dir


def open_run(args, kind, ctx):
    """Pick the run directory (rank 0 decides, all ranks agree; a refusal stops every rank) and
    write config.yaml (not for --eval). Returns `ctx` with run_dir and log_dir, or exits 0
    (AlreadyCompleted) when the run already completed."""
    decided = None
    if du.is_main_process():
        try:
            if args.eval and args.resume and not args.output_dir:
                # evaluating a given checkpoint: eval.json goes next to it, not into the run (or a
                # -rN sibling) the settings would name
                decided = os.path.dirname(args.resume) or "."
            else:
                decided = runs.prepare_run_dir(args, kind, ctx.dist.world_size)
        except (runs.RunCompleted, UserError) as stop:  # every rank stops with it, none waits for the others
            decided = stop
    decided = du.broadcast_object(decided)
    if isinstance(decided, runs.RunCompleted):
        info(str(decided))
        du.cleanup()
        raise AlreadyCompleted(decided.run_dir)
    if isinstance(decided, UserError):
        raise decided
    ctx = replace(ctx, run_dir=decided, log_dir=args.log_dir or os.path.join(decided, "tensorboard"))
    if du.is_main_process():
        os.makedirs(decided, exist_ok=True)
        if not args.eval:  # evaluating leaves the run's config as it is
            save_config(ctx.settings(args), os.path.join(decided, "config.yaml"))
    return ctx


def run_record(args, kind, ctx):
    """The run's record (run.json; rank 0 writes it), naming every host of the run."""
    hosts = du.all_gather_object(os.uname().nodename)
    return runs.RunRecord(ctx.run_dir, args, kind, world_size=ctx.dist.world_size,
                          is_main=du.is_main_process(), hostnames=sorted(set(hosts)))

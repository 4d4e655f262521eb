"""Stop at a step boundary on SIGTERM / SIGUSR2, the same step on every rank.

A signal only sets a flag. At each optimizer step every rank contributes its flag (and rank 0
its "time for a rolling checkpoint" wish) to an all-reduce launched asynchronously; the result
is read one step later, so all ranks act on the same step without a blocking host sync.

The flags are CPU tensors reduced over gloo: the default process group when its backend is
gloo, otherwise (NCCL) a gloo group of all ranks made for them at the first poll. A CUDA tensor
built from a Python list and read back with bool() would be a host-device copy and sync at
every optimizer step.
"""
import signal
import threading
import time

import torch
import torch.distributed as dist

from util.distributed import is_dist


class Preempted(Exception):
    """Raised after the state was saved because a stop was requested."""


class StopSignals:
    SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR2", None)) if s)

    def __init__(self, save_every_minutes=30.0, rank=0):
        self.requested = None          # name of the signal that asked us to stop
        self.rank = rank
        self.save_every = save_every_minutes * 60 if save_every_minutes and save_every_minutes > 0 else None
        self.last_save = time.time()
        self._pending = None           # (work, tensor) of the in-flight all-reduce
        self._group = None             # process group for the flags (None: the default one)
        self._group_ready = False
        self._previous = {}

    def install(self):
        if threading.current_thread() is not threading.main_thread():
            return self
        for s in self.SIGNALS:
            self._previous[s] = signal.signal(s, self._handler)
        return self

    def uninstall(self):
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    def _handler(self, signum, frame):
        if self.requested is None:
            self.requested = signal.Signals(signum).name
            print(f"received {self.requested}: saving at the next step boundary", flush=True)  # every rank

    def _local(self):
        save_due = self.save_every is not None and self.rank == 0 and time.time() - self.last_save > self.save_every
        return [1.0 if self.requested else 0.0, 1.0 if save_due else 0.0]

    def poll(self):
        """What every rank does after this optimizer step, the same on all ranks: (stop: save and
        stop, a signal reached some rank; save_rolling: save checkpoint-last.pth, rank 0's
        --save_ckpt_minutes timer)."""
        if not is_dist():
            stop, save = self._local()
            return bool(stop), bool(save)
        group = self._flags_group()
        decided = (False, False)
        if self._pending is not None:
            work, t = self._pending
            work.wait()
            decided = (bool(t[0] > 0), bool(t[1] > 0))
        t = torch.tensor(self._local())  # CPU: no device copy, no device sync
        self._pending = (dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group, async_op=True), t)
        return decided

    @staticmethod
    def _default_group_takes_cpu():
        return dist.get_backend() == "gloo"

    def _flags_group(self):
        """The gloo group the flags travel in. new_group is a collective over all ranks: every
        rank reaches its first poll at the same optimizer step (the loop polls at the same
        steps everywhere), so all create it there, in the same order."""
        if not self._group_ready:
            self._group = None if self._default_group_takes_cpu() else dist.new_group(backend="gloo")
            self._group_ready = True
        return self._group

    def saved(self):
        self.last_save = time.time()

    def drain(self):
        """Finish an in-flight all-reduce (before a collective of another kind)."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None

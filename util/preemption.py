"""Stop at a step boundary on SIGTERM / SIGUSR2, the same step on every rank.

A signal only sets a flag. At each optimizer step every rank contributes its flag (and rank 0
its "time for a rolling checkpoint" wish) to an all-reduce launched asynchronously; the result
is read one step later, so all ranks act on the same step without a blocking host sync.

The flags are CPU tensors reduced over gloo: the default process group when its backend is
gloo, otherwise (NCCL) a gloo group of all ranks made for them at the first poll. A CUDA tensor
built from a Python list and read back with bool() would be a host-device copy and sync at
every optimizer step.

A stop signal is also what torchrun's agent sends the survivors when a rank died: a teardown,
not a preemption. No stop can be agreed with a dead peer, so a rank that got a signal waits for
the flags' all-reduce at most PEER_WAIT_S; a collective that fails or does not complete, or any
error after the signal, ends the process as Interrupted (run.json `interrupted`, exit status 3)
without writing anything more: the restart resumes from the newest whole checkpoint. A real
preemption reaches every live rank, so the all-reduce completes and the run stops at a step
boundary as before.
"""
import datetime
import signal
import threading
import time

import torch
import torch.distributed as dist

from util.distributed import is_dist, is_group_failure, torchrun_attempt
from util.errors import UserError, first_line


class Preempted(Exception):
    """Raised after the state was saved because a stop was requested."""


EXIT_INTERRUPTED = 3
# How long a rank that got a stop signal waits for its peers' half of the flags' all-reduce. They
# launched it one optimizer step ago (the loop polls at the same steps everywhere), so in a whole
# group it is long done; well under the 30 s torchrun's agent grants before its SIGKILL.
PEER_WAIT_S = 10.0


class Interrupted(SystemExit):
    """The group broke under this rank (a peer died or stopped answering; the launcher is
    stopping the processes): exit status 3, run.json `interrupted`, nothing more written. A
    SystemExit, so that no caller (a search's trial loop) takes it for an ordinary failure."""
    run_status = "interrupted"

    def __init__(self, what):
        super().__init__(EXIT_INTERRUPTED)
        left = (torchrun_attempt() or {}).get("restarts_left", 0)
        then = f"torchrun restarts the group ({left} restarts left)" if left else "run the same command"
        self.reason = f"{what}; {then} to resume from the newest whole checkpoint"


def interruption(error, stop):
    """`error` as an Interrupted when it is a teardown of a multi-process run: an Interrupted
    already, an error after a stop signal reached this rank (a peer's death makes the next
    collective fail), or a failed collective (a peer died before the launcher's signal came).
    None otherwise: a UserError, a bug, a one-process run keep their own status."""
    if isinstance(error, Interrupted):
        return error
    if not is_dist() or not isinstance(error, Exception) or isinstance(error, UserError):
        return None
    if stop is not None and stop.requested:
        return Interrupted(f"{stop.requested} while a peer was gone ({type(error).__name__}: {_first_line(error)})")
    if is_group_failure(error):
        return Interrupted(f"a collective failed: a peer died or stopped answering "
                           f"({type(error).__name__}: {_first_line(error)})")
    return None


def _first_line(error):
    """The error's first sentence: the backends append advice ("This is typically caused by...")."""
    return first_line(error).split(". ")[0][:300]


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
            t = self._wait()
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

    def _wait(self):
        """The in-flight all-reduce's result. After a stop signal, PEER_WAIT_S at most: a peer
        that does not answer by then is gone (torchrun's agent stops the survivors of a dead
        rank with the same SIGTERM a preemption sends)."""
        work, t = self._pending
        if not self.requested:
            work.wait()
            return t
        try:
            if work.wait(datetime.timedelta(seconds=PEER_WAIT_S)) is False:
                raise RuntimeError(f"no answer within {PEER_WAIT_S:.0f} s")
        except RuntimeError as e:
            raise Interrupted(f"{self.requested} and a peer did not join the stop ({_first_line(e)})") from e
        return t

    def drain(self):
        """Finish an in-flight all-reduce (before a collective of another kind)."""
        if self._pending is not None:
            self._wait()
            self._pending = None

"""The one job wrapper: what runs in every task of a job, for the launcher's runs and for a
search's trials alike (docs/slurm.md, "Preemption").

Preemption: submitit's batch script asks Slurm for USR2 before the time limit and on
preemption. main() traps USR2 and SIGTERM itself (util/preemption.py) and saves
checkpoint-last.pth at the next optimizer step; the Trainer then hands over to submitit's own
USR2 handler, which pickles `Trainer.checkpoint()` and runs `scontrol requeue`. On SIGTERM alone
(`scontrol requeue`, `scancel`) Slurm decides what comes next; the state is saved either way.
"""
import copy
import importlib
import os
import signal
import subprocess
import sys

import submitit
from submitit.core.job_environment import SignalHandler

from util import runs
from util.errors import UserError


class Trainer:
    """What runs in every task of the job: torch.distributed from submitit's job environment,
    then the work: `<module>.main(args)`, or for a search trial `task()` (util/hpo/trial.py:
    the same main with the trial's epoch callback; it tells Optuna itself). Picklable: it holds
    the module name, the kind, the run's args (output_dir: the run directory) and the task."""

    def __init__(self, module, kind, args, task=None):
        self.module, self.kind, self.args, self.task = module, kind, args, task

    def __call__(self):
        env = job_environment()
        if env is not None and env.num_tasks > 1:
            # set_cuda_visible_devices=False: util/distributed.py picks cuda:<local_rank> itself
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False,
                                                                  overwrite=True)
        work = self._work()
        try:
            with _SignalLog() as log:
                result = work()
        except UserError as e:
            self._record_failure(env, f"UserError: {e}")
            print(f"error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        except Exception as e:
            self._record_failure(env, f"{type(e).__name__}: {e}")
            raise
        if _stopped_to_resume(result) and env is not None and env.cluster != "debug":
            _after_stop(env, log.received)
        return result

    def _work(self):
        if self.task is not None:
            return self.task
        main = importlib.import_module(self.module).main
        main = getattr(main, "__wrapped__", main)  # without exit_on_user_error: we record the error
        args = self.args
        return lambda: main(copy.deepcopy(args))

    def _record_failure(self, env, reason):
        """main() marks failures inside its training loop; this covers the ones before it
        (model, data, checkpoint), so run.json tells why the job ended."""
        if env is not None and env.global_rank != 0:
            return
        run_dir = self.args.output_dir
        try:
            record = runs.RunRecord.load(run_dir) or {}
        except UserError:
            record = {}
        if record.get("status") in ("failed", "completed"):
            return
        try:
            world = env.num_tasks if env is not None else 1
            runs.RunRecord(run_dir, self.args, self.kind, world_size=world).finish("failed", reason=reason)
        except Exception as e:  # never hide the job's own error behind the record's
            print(f"warning: could not mark {run_dir}/run.json failed ({e})", file=sys.stderr, flush=True)

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on USR2: requeue the same run (or trial); main() resumes it from
        checkpoint-last.pth (same output_dir, auto_resume)."""
        return submitit.helpers.DelayedSubmission(Trainer(self.module, self.kind, self.args, self.task))


def _stopped_to_resume(result):
    """main() returned {"status": "preempted"}; a trial task returns its Outcome."""
    if isinstance(result, dict):
        return result.get("status") == "preempted"
    return getattr(result, "state", None) == "preempted"


def job_environment():
    try:
        return submitit.JobEnvironment()
    except RuntimeError:  # not inside a submitit job (e.g. called directly)
        return None


def preemption_signal(env):
    """The signal submitit asks Slurm for before the time limit and on preemption (USR2 unless
    SUBMITIT_PREEMPT_SIGNAL names another); JobEnvironment.USR_SIG is its public name."""
    return signal.Signals["SIG" + env.USR_SIG]


def _after_stop(env, received):
    """main() saved and returned 'preempted'. After USR2 (time limit, preemption, or
    job._interrupt()) run submitit's own handler, which main() had replaced: rank 0 pickles
    checkpoint() and requeues, then exits. After SIGTERM alone, Slurm requeues or cancels
    the job itself. Either way leave no result file: the job is not over."""
    usr = preemption_signal(env)
    if usr in received:
        handler = signal.getsignal(usr)
        if isinstance(getattr(handler, "__self__", None), SignalHandler):
            try:
                handler(usr, None)  # rank 0: requeue + sys.exit; other ranks: returns
            except subprocess.CalledProcessError as e:  # Slurm is requeueing it already
                print(f"requeue not needed ({e}); Slurm requeues the job itself", flush=True)
    else:
        print("stopped by SIGTERM with the state saved; Slurm requeues (or cancels) the job; "
              "if it is cancelled, submit the same command again to resume", flush=True)
    raise SystemExit(0)


class _SignalLog:
    """Which signals reached this process while main() ran. Uses the interpreter's wakeup fd,
    which sees every signal with a Python handler whoever installed that handler (main() puts
    its own over submitit's)."""

    def __enter__(self):
        self.received = set()
        self._fds = None
        try:
            r, w = os.pipe()
            os.set_blocking(r, False)
            os.set_blocking(w, False)
            self._prev = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
            self._fds = (r, w)
        except (ValueError, OSError):  # not the main thread: no log
            pass
        return self

    def __exit__(self, *exc):
        if self._fds is None:
            return False
        r, w = self._fds
        signal.set_wakeup_fd(self._prev)
        try:
            while True:
                data = os.read(r, 4096)
                if not data:
                    break
                self.received.update(data)
        except BlockingIOError:
            pass
        os.close(r)
        os.close(w)
        return False

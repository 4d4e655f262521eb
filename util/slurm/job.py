"""The one job wrapper: what runs in every task of a job, for the launcher's runs and for a
search's trials alike (docs/slurm.md, "Preemption").

Preemption: submitit's batch script asks Slurm for USR2 before the time limit and on
preemption. main() traps USR2 and SIGTERM itself (util/preemption.py) and saves
checkpoint-last.pth at the next optimizer step; the Job then hands over to submitit's own USR2
handler, which pickles `Job.checkpoint()` and runs `scontrol requeue`. On SIGTERM alone
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


class Job:
    """What runs in every task of the job: torch.distributed from submitit's job environment,
    then the work: `<module>.main(args)`, or for a search trial `trial()` (util/hpo/trial.py:
    the same main with the trial's epoch callback; it tells Optuna itself). Picklable: it holds
    the module name, the kind, the run's args (output_dir: the run directory) and the trial."""

    def __init__(self, module, kind, args, trial=None):
        self.module, self.kind, self.args, self.trial = module, kind, args, trial

    def __call__(self):
        try:
            env = submitit.JobEnvironment()
        except RuntimeError:  # not inside a submitit job (e.g. called directly)
            env = None
        if env is not None and env.num_tasks > 1:
            # set_cuda_visible_devices=False: util/distributed.py picks cuda:<local_rank> itself
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False,
                                                                  overwrite=True)
        main = None if self.trial is not None else importlib.import_module(self.module).main
        try:
            with _SignalLog() as log:
                result = self.trial() if main is None else main(copy.deepcopy(self.args))
        except UserError as e:
            self._record_failure(env, f"UserError: {e}")
            print(f"error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        except Exception as e:
            self._record_failure(env, f"{type(e).__name__}: {e}")
            raise
        # main() returns {"status": "preempted"}, a trial its Outcome with state "preempted"
        status = result.get("status") if isinstance(result, dict) else getattr(result, "state", None)
        if status == "preempted" and env is not None and env.cluster != "debug":
            _after_stop(env, log.received)
        return result

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
        return submitit.helpers.DelayedSubmission(Job(self.module, self.kind, self.args, self.trial))


def _after_stop(env, received):
    """main() saved and returned 'preempted'. After USR2 (time limit, preemption, or
    job._interrupt()) run submitit's own handler, which main() had replaced: rank 0 pickles
    checkpoint() and requeues, then exits. After SIGTERM alone, Slurm requeues or cancels
    the job itself. Either way leave no result file: the job is not over."""
    # the signal submitit asks Slurm for (USR2 unless SUBMITIT_PREEMPT_SIGNAL names another)
    usr = signal.Signals["SIG" + env.USR_SIG]
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

"""One trial: an ordinary run of the main script with the trial's flags.

The process that trains the trial (rank 0 of it) reports the metric after each epoch, asks the
pruner, broadcasts the decision so every rank stops together, and tells Optuna the result
(`Trial`). The same Trial runs here (util/hpo/local.py) or as a Slurm job's work
(util/hpo/slurm.py, through util/slurm/job.Job).
"""
import copy
import dataclasses
import importlib
import json
import math
import os
import socket
import traceback

from util import distributed as du
from util.errors import UserError
from util.hpo.samplers import make_pruner
from util.hpo.spec import MODULES
from util.hpo.study import open_storage, wait_for_twins
from util.hpo.summary import fmt_params, write_hparams


class Pruned(Exception):
    """Stops a trial's run on every rank; run.json says `pruned` (its `run_status`)."""
    run_status = "pruned"


class MetricMissing(UserError):
    """The epoch log lacks the study's metric: every trial would fail alike, so the study stops."""


@dataclasses.dataclass
class Outcome:
    number: int
    state: str                  # COMPLETE | PRUNED | FAIL | preempted
    value: float = None
    epoch: int = None
    run_dir: str = None
    reason: str = None
    reused: bool = False


def trial_args(base, spec, params):
    """A copy of the launch's flags with the trial's values; no output_dir, so the run directory
    is named by the signature of these settings."""
    args = copy.deepcopy(base)
    for flag, v in params.items():
        if flag in spec.params:
            setattr(args, flag, spec.params[flag].value(v))
    args.output_dir, args.log_dir = "", None
    args.optimize_config = args.storage = None
    return args


def read_log(run_dir):
    path = os.path.join(run_dir or "", "log.txt")
    out = []
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass  # a line cut short by a kill: the run rewrites that epoch
    return out


def best_value(spec, run_dir):
    """(value, epoch): the best value of the metric over the run's epochs, or (None, None)."""
    best = (None, None)
    for entry in read_log(run_dir):
        v = entry.get(spec.metric)
        if isinstance(v, (int, float)) and math.isfinite(v) and (best[0] is None or spec.better(v, best[0])):
            best = (float(v), entry.get("epoch"))
    return best


class Trial:
    """Train one trial: callable on every rank of the process or group that trains it (here, or
    in a Slurm job); rank 0 talks to Optuna. Picklable: holds the flags, the spec, the job
    (util/hpo/study.next_trial) and where the study is (`storage`: the launch's --storage or None
    for the journal in the study folder).

    `run_dir`: the run directory chosen before submitting (Slurm), else the signature picks it.
    `stop_on_setup_error`: a UserError before the run opened means the launch's own flags
    cannot run (e.g. no such data): end the study instead of failing every trial alike."""

    def __init__(self, kind, args, spec, job, sdir, storage=None, run_dir=None, stop_on_setup_error=True):
        self.kind, self.args, self.spec, self.job, self.sdir, self.storage = kind, args, spec, job, sdir, storage
        self.run_dir, self.stop_on_setup_error = run_dir, stop_on_setup_error

    def study(self, storage=None):
        """A handle on the study for reporting and telling. Its sampler is never asked (the
        driver samples) and must not act after a trial (GridSampler would stop the study).
        `storage`: the driver's open storage, else this trial opens the study's."""
        import optuna
        return optuna.load_study(study_name=self.spec.study_name,
                                 storage=storage or open_storage(self.storage, self.sdir),
                                 sampler=optuna.samplers.RandomSampler(), pruner=make_pruner(self.spec))

    def __call__(self, storage=None):
        import optuna
        module = importlib.import_module(MODULES[self.kind])
        spec, job = self.spec, self.job
        trial = None
        if du.detect_launcher()[1] == 0:  # rank 0: the Optuna trial, marked with this worker
            study = self.study(storage)
            trial = optuna.trial.Trial(study, job["trial_id"])
            trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
            print(f"[study {spec.study_name}] trial {job['number']} {'resumed' if job['adopted'] else 'started'}: "
                  f"{fmt_params(job['params'])}", flush=True)
            if job["same_as"]:
                wait_for_twins(study, self.sdir, job["same_as"])
        targs = trial_args(self.args, spec, job["params"])
        if self.run_dir:
            targs.output_dir = self.run_dir
        outcome = Outcome(job["number"], "FAIL")
        try:
            module.validate_args(targs)
        except UserError as e:  # values the script refuses together: this trial fails, the study goes on
            outcome.reason = f"the script refuses these values: {e}"
        else:
            self._train(module, targs, trial, outcome)
        states = du.all_gather_object(outcome.state) if du.is_dist() else [outcome.state]
        if outcome.state == "COMPLETE" and "FAIL" in states:
            outcome.state, outcome.reason = "FAIL", "another rank failed"
        if outcome.state == "preempted":
            if trial is not None:
                print(f"[study {spec.study_name}] trial {job['number']} preempted: its run saved its state; "
                      "start the study again to resume it", flush=True)
            return outcome
        if outcome.state == "COMPLETE":
            outcome.value, outcome.epoch = best_value(spec, outcome.run_dir)
            if outcome.value is None:
                outcome.state, outcome.reason = "FAIL", f"the run's log.txt has no finite {spec.metric}"
        self._tell(trial, outcome)
        return outcome

    def _train(self, module, targs, trial, outcome):
        """main() of the script with the trial's flags; `outcome` says how it ended."""
        from util.run_context import AlreadyCompleted
        spec, number = self.spec, self.job["number"]

        def opened(run_dir):  # main()'s on_run_dir, on every rank
            self.run_dir = run_dir

        def report(epoch, log):
            """main()'s epoch_callback, on every rank: rank 0 reports the metric (and the earlier
            epochs of a resumed run) and asks the pruner; every rank gets the decision, so all
            stop together."""
            decision = None
            if trial is not None and spec.metric not in log:
                decision = ("missing", ", ".join(sorted(k for k in log if k != "epoch")))
            elif trial is not None:
                done = trial.study.get_trials(deepcopy=False)[number].intermediate_values
                entries = {e["epoch"]: e for e in read_log(self.run_dir) if "epoch" in e}
                entries[epoch] = log
                for e in sorted(entries):
                    v = entries[e].get(spec.metric)
                    if e not in done and isinstance(v, (int, float)):
                        trial.report(float(v), e)
                if trial.should_prune():
                    decision = ("prune", f"pruned by {spec.pruner[0]} after epoch {epoch} "
                                         f"({spec.metric} {log[spec.metric]:.4g})")
            decision = du.broadcast_object(decision)
            if decision and decision[0] == "missing":
                raise MetricMissing(f"metric {spec.metric} is not in the epoch log (it has: {decision[1]}); "
                                    f"fix metric in {spec.path}")
            if decision:
                raise Pruned(decision[1])
        extra = {"study": {"name": spec.study_name, "trial": number, "params": self.job["params"],
                           "dir": os.path.abspath(self.sdir)}}
        try:
            result = module.main(targs, epoch_callback=report, record_extra=extra, on_run_dir=opened) or {}
            outcome.run_dir = result.get("run_dir")
            outcome.state = "preempted" if result.get("status") == "preempted" else "COMPLETE"
        except Pruned as p:
            outcome.state, outcome.reason, outcome.run_dir = "PRUNED", str(p), self.run_dir
        except AlreadyCompleted as done:
            outcome.state, outcome.run_dir, outcome.reused = "COMPLETE", done.run_dir, True
        except UserError as e:
            outcome.reason, outcome.run_dir = str(e), self.run_dir
            # before its run opened, the launch's own flags cannot run at all: stop the study
            if isinstance(e, MetricMissing) or (self.stop_on_setup_error and not self.run_dir):
                self._tell(trial, outcome)
                raise UserError(f"trial {number}: {e}") from None
        except Exception as e:  # a failed trial keeps its run (status failed) and the study goes on
            outcome.reason, outcome.run_dir = f"{type(e).__name__}: {e}", self.run_dir
            traceback.print_exc()

    def tell(self, outcome, storage=None):
        """Tell an outcome decided outside the trial's run (by the driver: a reused run, a job
        that died without telling)."""
        import optuna
        self._tell(optuna.trial.Trial(self.study(storage), self.job["trial_id"]), outcome)
        return outcome

    def _tell(self, trial, o):
        if trial is None:
            return
        from optuna.trial import TrialState
        for key, value in (("run_dir", os.path.abspath(o.run_dir) if o.run_dir else None),
                           ("reason", o.reason), ("reused", o.reused), ("best_epoch", o.epoch)):
            if value is not None:
                trial.set_user_attr(key, value)
        study = trial.study
        if o.state == "COMPLETE":
            study.tell(trial, o.value, skip_if_finished=True)
        else:
            study.tell(trial, state=TrialState[o.state], skip_if_finished=True)
        frozen = study.get_trials(deepcopy=False)[o.number]
        if o.state == "PRUNED":
            o.value = frozen.value
        write_hparams(self.sdir, self.spec, o.number, frozen.params, o.state, o.value)
        what = o.reason
        if o.state == "COMPLETE":
            what = f"{self.spec.metric} {o.value:.6g}" + (f" (epoch {o.epoch})" if o.epoch is not None else "") \
                + (" reused from a completed run" if o.reused else "")
        print(f"[study {self.spec.study_name}] trial {o.number} {o.state}: {what}; run {o.run_dir}", flush=True)

"""A hyperparameter search on Slurm (docs/search.md): `submitit_<kind>.py --optimize_config FILE
--parallel K`. This process is the driver (util/hpo/driver.run_study, K threads); each trial is
its own job, submitted through the launcher's one job wrapper (util/slurm/job.Trainer), whose
rank 0 reports, prunes and tells the study itself (util/hpo/trial.TrialTask). On USR2 (time
limit, preemption) the run saves its state and submitit requeues the same wrapper: the job
resumes the same trial."""
import dataclasses
import os
import threading

from util import runs, slurm
from util.errors import UserError
from util.hpo.driver import run_study
from util.hpo.spec import MODULES, prepare
from util.hpo.study import study_dir, wait_for_twins
from util.hpo.summary import fmt_params, summarize
from util.hpo.trial import Outcome, TrialTask, best_value, trial_args

_SUBMIT = threading.Lock()


class SlurmTrials:
    """Launcher factory for run_study: each trial a job (`args`: the launcher's flags, `margs`:
    the main script's). `make(study, storage, stop)` is called once; the launcher it gives runs
    in each driver thread."""

    def __init__(self, kind, args, margs, spec, sdir, poll_s=2.0):
        self.kind, self.args, self.margs, self.spec, self.sdir, self.poll_s = kind, args, margs, spec, sdir, poll_s
        self.study = self.storage = self.stop = None

    def make(self, study, storage, stop=None):
        self.study, self.storage, self.stop = study, storage, stop  # the driver's open study and storage
        return self.launch

    def launch(self, job):
        """Submit the trial as a job and wait for it; its Outcome, or None when the search stops
        first (the job goes on and tells the study itself)."""
        if job.same_as:  # a running trial has these values: its run is ours; wait for it here
            wait_for_twins(self.study, self.sdir, job.same_as)
            job = dataclasses.replace(job, same_as=[])
        task = TrialTask(self.kind, self.margs, self.spec, job, self.sdir, self.margs.storage,
                         stop_on_setup_error=False)
        found = self._free_run(job, task)
        if not isinstance(found, tuple):
            return found  # an outcome (a reused run, or a job that ran it), or None
        targs, folder, undo_dirs = found
        handle = self._submit(job, task, targs, folder, undo_dirs)
        return self._wait(job, task, handle)

    def _free_run(self, job, task):
        """(trial args, job folder, undo_dirs) of the trial's run with no job on it, waiting for a
        job already there; else the Outcome of a completed run, or None when the search stops."""
        from optuna.trial import TrialState
        world = self.args.nodes * self.args.ngpus
        while True:
            targs = trial_args(self.margs, self.spec, job.params)
            try:  # undo_dirs: what to remove again if sbatch refuses the job
                run_dir, folder, undo_dirs = slurm.resolve_new_run(targs, self.args, self.kind, world)
            except runs.RunCompleted as done:  # these settings ran to the end before: reuse
                return self._reuse(job, task, done.run_dir)
            task.run_dir = run_dir
            busy = slurm.active_job(run_dir)
            if not busy:
                return targs, folder, undo_dirs
            # A job is already on this run: this trial's own, submitted by a driver that has
            # stopped since (the job reports and tells), or another study's.
            print(f"{self._prefix(job)}: its run is already job {busy[0]} ({busy[1]}); waiting for it", flush=True)
            if self._wait_until_over(busy[0]) is None:
                return None  # the search is ending; that job tells the study itself
            frozen = self.study.get_trials(deepcopy=False)[job.number]
            if frozen.state != TrialState.RUNNING:
                return _outcome(frozen, run_dir)

    def _reuse(self, job, task, run_dir):
        value, epoch = best_value(self.spec, run_dir)
        ok = value is not None
        return task.tell(Outcome(job.number, "COMPLETE" if ok else "FAIL", value, epoch, run_dir,
                                 None if ok else f"no finite {self.spec.metric} in its log", reused=True),
                         self.storage)

    def _submit(self, job, task, targs, folder, undo_dirs):
        """The trial's job through the launcher's job wrapper, recorded in job.json."""
        run_dir = targs.output_dir
        try:
            with _SUBMIT:  # slurm.submit swaps sys.stderr while sbatch runs: one thread at a time
                executor = slurm.make_executor(self.args, folder, f"{self.kind}-{self.spec.study_name}-trial{job.number}")
                trainer = slurm.Trainer(MODULES[self.kind], self.kind, targs, task=task)
                handle = slurm.submit(executor, trainer, run_dir, undo_dirs)
        except UserError as e:  # e.g. sbatch refused the job (a bad --slurm_extra): every trial
            # would be refused alike, so the trial fails with the reason and the search ends
            task.tell(Outcome(job.number, "FAIL", run_dir=run_dir if os.path.isdir(run_dir) else None,
                              reason=str(e)), self.storage)
            raise UserError(f"trial {job.number}: {e}") from None
        slurm.record_job(run_dir, self.args, handle, study=self.spec.study_name, trial=job.number)
        print(f"{self._prefix(job)} submitted as job {handle.job_id}: {fmt_params(job.params)}; run {run_dir}",
              flush=True)
        return handle

    def _wait(self, job, task, handle):
        from optuna.trial import TrialState
        job_id, run_dir = str(handle.job_id), task.run_dir
        state = self._wait_until_over(job_id, handle)
        if state is None:
            print(f"{self._prefix(job)}: the search stops; job {job_id} goes on and tells the study itself",
                  flush=True)
            return None
        frozen = self.study.get_trials(deepcopy=False)[job.number]
        if frozen.state == TrialState.RUNNING:  # the job ended without telling: it failed
            why = slurm.error_line(handle, run_dir)
            return task.tell(Outcome(job.number, "FAIL", run_dir=run_dir,
                                     reason=f"job {job_id} ended {state}: {why}"), self.storage)
        print(f"{self._prefix(job)} {frozen.state.name} (job {job_id})", flush=True)
        return _outcome(frozen, run_dir)

    def _wait_until_over(self, job_id, handle=None):
        return slurm.wait_until_over(self.args.cluster, job_id, handle, self.poll_s, self.stop,
                                     unknown_s=30 * self.poll_s)

    def _prefix(self, job):
        return f"[study {self.spec.study_name}] trial {job.number}"


def _outcome(frozen, run_dir):
    return Outcome(frozen.number, frozen.state.name, frozen.value, frozen.user_attrs.get("best_epoch"),
                   frozen.user_attrs.get("run_dir", run_dir), frozen.user_attrs.get("reason"),
                   bool(frozen.user_attrs.get("reused")))


def optimize_slurm(kind, args, margs):
    """`submitit_<kind>.py --optimize_config FILE [--parallel K]`: each trial a Slurm job (K at
    once); this process drives the study until it is done. Returns the exit code."""
    if args.parallel < 1:
        raise UserError(f"--parallel {args.parallel} must be >= 1")
    if args.cluster == "debug" and args.parallel > 1:
        raise UserError("--cluster debug runs each trial inside this process: use --parallel 1")
    if args.job_dir:
        raise UserError("--job_dir names one run; a study makes many (they go under --runs_root): leave it out")
    spec = prepare(margs, kind)
    sdir = os.path.abspath(study_dir(margs, spec))
    if args.dry_run:
        print(f"study {spec.study_name} in {sdir}: {spec.trials} trials, {args.parallel} at a time, each a "
              f"job of {args.nodes} node(s) x {args.ngpus} task(s); {spec.direction} {spec.metric} over "
              f"{', '.join(spec.params)}; nothing submitted")
        return 0
    study, _ = run_study(margs, kind, spec, SlurmTrials(kind, args, margs, spec, sdir).make,
                         parallel=args.parallel, sdir=sdir)
    summarize(study, spec, sdir)
    return 0

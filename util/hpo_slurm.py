"""A hyperparameter search on Slurm (docs/search.md): `submitit_<kind>.py --optimize_config FILE
--parallel K`. This process is the driver (util/hpo.run_study, K threads); each trial is its own
job, whose rank 0 reports, prunes and tells the study itself (util/hpo.TrialTask)."""
import dataclasses
import os
import threading
import time

from util.errors import UserError
from util.hpo import (Outcome, TrialTask, _fmt_params, best_value, prepare, run_study, study_dir, summarize,
                      trial_args, wait_for_twins)

_SUBMIT = threading.Lock()


class TrialJobTrainer:
    """What runs in every task of a trial's Slurm job (util/slurm.Trainer for a TrialTask): the
    job's rank 0 reports, prunes and tells itself. On USR2 (time limit, preemption) the run saves
    its state and submitit requeues this same object: the job resumes the same trial."""

    def __init__(self, task):
        self.task = task

    def __call__(self):
        import submitit
        from util import slurm
        env = slurm._job_environment()
        if env is not None and env.num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False,
                                                                  overwrite=True)
        with slurm._SignalLog() as log:
            outcome = self.task()
        if outcome.state == "preempted" and env is not None and env.cluster != "debug":
            slurm.Trainer._after_stop(env, log.received)
        return outcome

    def checkpoint(self, *args, **kwargs):
        import submitit
        return submitit.helpers.DelayedSubmission(TrialJobTrainer(self.task))


def _wait_for_job(cluster, job_id, job=None, poll_s=2.0, stop=None):
    """Block until the job is over (requeues included); its last state, or None when `stop`
    was set first (the search is ending: the job goes on and tells the study itself)."""
    from util import slurm

    def stopped():
        return stop is not None and stop.is_set()
    if cluster == "slurm":
        unknown = 0
        while True:
            state = slurm.slurm_state(job_id)
            unknown = unknown + 1 if state is None else 0
            if state in slurm.FINAL_STATES or unknown > 30:
                return state or "UNKNOWN"
            if stopped():
                return None
            time.sleep(poll_s)
    if job is not None:  # local / debug: submitit waits for the processes (or runs it now)
        if cluster != "debug":  # a debug job runs inside results()
            while not job.done():
                if stopped():
                    return None
                time.sleep(min(poll_s, 0.5))
        try:
            job.results()
            return "COMPLETED"
        except Exception:
            return "FAILED"
    while slurm._pid_alive(job_id):  # a local job that another driver started
        if stopped():
            return None
        time.sleep(poll_s)
    return "UNKNOWN"


def slurm_launcher(kind, args, margs, spec, sdir, poll_s=2.0):
    """Launcher factory for run_study: each trial a job (`args`: the launcher's flags, `margs`:
    the main script's)."""
    from optuna.trial import TrialState
    from util import runs, slurm
    world = args.nodes * args.ngpus

    def make(study, stop=None):
        storage = study._storage  # share the open journal with the tasks' handles

        def launch(job):
            prefix = f"[study {spec.study_name}] trial {job.number}"
            if job.same_as:  # a running trial has these values: its run is ours; wait for it here
                wait_for_twins(study, sdir, job.same_as)
                job = dataclasses.replace(job, same_as=[])
            task = TrialTask(kind, margs, spec, job, sdir, margs.storage, stop_on_setup_error=False)
            while True:
                targs = trial_args(margs, spec, job.params)
                try:  # undo_dirs: what to remove again if sbatch refuses the job
                    run_dir, folder, undo_dirs = slurm.resolve_new_run(targs, args, kind, world)
                except runs.RunCompleted as done:  # these settings ran to the end before: reuse
                    value, epoch = best_value(spec, done.run_dir)
                    ok = value is not None
                    return task.tell(Outcome(job.number, "COMPLETE" if ok else "FAIL", value, epoch, done.run_dir,
                                             None if ok else f"no finite {spec.metric} in its log", reused=True),
                                     storage)
                task.run_dir = run_dir
                busy = slurm.active_job(run_dir)
                if not busy:
                    break
                # A job is already on this run: this trial's own, submitted by a driver that has
                # stopped since (the job reports and tells), or another study's.
                print(f"{prefix}: its run is already job {busy[0]} ({busy[1]}); waiting for it", flush=True)
                if _wait_for_job(args.cluster, busy[0], None, poll_s, stop) is None:
                    return None  # the search is ending; that job tells the study itself
                frozen = study.get_trials(deepcopy=False)[job.number]
                if frozen.state != TrialState.RUNNING:
                    return _outcome(frozen, run_dir)
            try:
                with _SUBMIT:  # slurm.submit swaps sys.stderr while sbatch runs: one thread at a time
                    executor = slurm.make_executor(args, folder, f"{kind}-{spec.study_name}-trial{job.number}")
                    handle = slurm.submit(executor, TrialJobTrainer(task), run_dir, undo_dirs)
            except UserError as e:  # e.g. sbatch refused the job (a bad --slurm_extra): every trial
                # would be refused alike, so the trial fails with the reason and the search ends
                task.tell(Outcome(job.number, "FAIL", run_dir=run_dir if os.path.isdir(run_dir) else None,
                                  reason=str(e)), storage)
                raise UserError(f"trial {job.number}: {e}") from None
            job_id = str(handle.job_id)
            from util.atomic import atomic_write_json
            os.makedirs(os.path.dirname(slurm._job_record_path(run_dir)), exist_ok=True)
            atomic_write_json(slurm._job_record_path(run_dir), {
                "cluster": args.cluster, "job_id": job_id, "job_folder": str(handle.paths.folder),
                "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "study": spec.study_name,
                "trial": job.number, "nodes": args.nodes, "tasks_per_node": args.ngpus})
            print(f"{prefix} submitted as job {job_id}: {_fmt_params(job.params)}; run {run_dir}", flush=True)
            state = _wait_for_job(args.cluster, job_id, handle, poll_s, stop)
            if state is None:
                print(f"{prefix}: the search stops; job {job_id} goes on and tells the study itself", flush=True)
                return None
            frozen = study.get_trials(deepcopy=False)[job.number]
            if frozen.state == TrialState.RUNNING:  # the job ended without telling: it failed
                why = slurm._error_line(handle, run_dir)
                return task.tell(Outcome(job.number, "FAIL", run_dir=run_dir,
                                         reason=f"job {job_id} ended {state}: {why}"), storage)
            print(f"{prefix} {frozen.state.name} (job {job_id})", flush=True)
            return _outcome(frozen, run_dir)
        return launch
    return make


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
    study, _ = run_study(margs, kind, spec, slurm_launcher(kind, args, margs, spec, sdir),
                         parallel=args.parallel, sdir=sdir)
    summarize(study, spec, sdir)
    return 0


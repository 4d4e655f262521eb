"""A hyperparameter search on Slurm (docs/search.md): `submitit_<kind>.py --optimize_config FILE
--parallel K`. This process is the driver (util/hpo/driver.run_study, K threads); each trial is
its own job, submitted through the launcher's one job wrapper (util/slurm/job.Job), whose rank 0
reports, prunes and tells the study itself (util/hpo/trial.Trial). On USR2 (time limit,
preemption) the run saves its state and submitit requeues the same wrapper: the job resumes the
same trial."""
import functools
import os
import threading

from util import runs, slurm
from util.errors import UserError
from util.hpo.driver import run_study
from util.hpo.spec import MODULES, prepare
from util.hpo.study import study_dir, wait_for_twins
from util.hpo.summary import fmt_params, summarize
from util.hpo.trial import Outcome, Trial, best_value, trial_args

_SUBMIT = threading.Lock()
POLL_S = 2.0  # between two looks at a job's state


def run_trial_job(kind, args, margs, spec, sdir, job, study, storage, stop):
    """The launcher of run_study (in each driver thread; `args`: the launcher's flags, `margs`:
    the main script's): submit the trial as a job and wait for it. Its Outcome, or None when
    the search stops first (the job goes on and tells the study itself)."""
    from optuna.trial import TrialState
    prefix = f"[study {spec.study_name}] trial {job['number']}"

    def wait_until_over(job_id, handle=None):
        return slurm.wait_until_over(args.cluster, job_id, handle, POLL_S, stop, unknown_s=30 * POLL_S)

    def told(run_dir):
        """The Outcome the study holds for the trial, or None while it is running."""
        frozen = study.get_trials(deepcopy=False)[job["number"]]
        if frozen.state == TrialState.RUNNING:
            return None
        return Outcome(frozen.number, frozen.state.name, frozen.value, frozen.user_attrs.get("best_epoch"),
                       frozen.user_attrs.get("run_dir", run_dir), frozen.user_attrs.get("reason"),
                       bool(frozen.user_attrs.get("reused")))
    if job["same_as"]:  # a running trial has these values: its run is ours; wait for it here
        wait_for_twins(study, sdir, job["same_as"])
        job = {**job, "same_as": []}
    trial = Trial(kind, margs, spec, job, sdir, margs.storage, stop_on_setup_error=False)
    while True:  # until the trial's run has no job on it
        targs = trial_args(margs, spec, job["params"])
        try:  # undo_dirs: what to remove again if sbatch refuses the job
            run_dir, folder, undo_dirs = slurm.resolve_new_run(targs, args, kind, args.nodes * args.ngpus)
        except runs.RunCompleted as done:  # these settings ran to the end before: reuse
            value, epoch = best_value(spec, done.run_dir)
            ok = value is not None
            return trial.tell(Outcome(job["number"], "COMPLETE" if ok else "FAIL", value, epoch, done.run_dir,
                                      None if ok else f"no finite {spec.metric} in its log", reused=True), storage)
        trial.run_dir = run_dir
        busy = slurm.active_job(run_dir)
        if not busy:
            break
        # A job is already on this run: this trial's own, submitted by a driver that has
        # stopped since (the job reports and tells), or another study's.
        print(f"{prefix}: its run is already job {busy[0]} ({busy[1]}); waiting for it", flush=True)
        if wait_until_over(busy[0]) is None:
            return None  # the search is ending; that job tells the study itself
        outcome = told(run_dir)
        if outcome is not None:
            return outcome
    try:
        with _SUBMIT:  # slurm.submit swaps sys.stderr while sbatch runs: one thread at a time
            executor = slurm.make_executor(args, folder, f"{kind}-{spec.study_name}-trial{job['number']}")
            handle = slurm.submit(executor, slurm.Job(MODULES[kind], kind, targs, trial=trial), run_dir, undo_dirs)
    except UserError as e:  # e.g. sbatch refused the job (a bad --slurm_extra): every trial
        # would be refused alike, so the trial fails with the reason and the search ends
        trial.tell(Outcome(job["number"], "FAIL", run_dir=run_dir if os.path.isdir(run_dir) else None,
                           reason=str(e)), storage)
        raise UserError(f"trial {job['number']}: {e}") from None
    slurm.record_job(run_dir, args, handle, study=spec.study_name, trial=job["number"])
    print(f"{prefix} submitted as job {handle.job_id}: {fmt_params(job['params'])}; run {run_dir}", flush=True)
    job_id = str(handle.job_id)
    state = wait_until_over(job_id, handle)
    if state is None:
        print(f"{prefix}: the search stops; job {job_id} goes on and tells the study itself", flush=True)
        return None
    outcome = told(run_dir)
    if outcome is None:  # the job ended without telling: it failed
        return trial.tell(Outcome(job["number"], "FAIL", run_dir=run_dir,
                                  reason=f"job {job_id} ended {state}: {slurm.error_line(handle, run_dir)}"), storage)
    print(f"{prefix} {outcome.state} (job {job_id})", flush=True)
    return outcome


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
    study, _ = run_study(margs, kind, spec, functools.partial(run_trial_job, kind, args, margs, spec, sdir),
                         parallel=args.parallel, sdir=sdir)
    summarize(study, spec, sdir)
    return 0

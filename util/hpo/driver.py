"""The driver of a study: take the next trial under the study lock (orphans first) and hand it
to a launcher, until the study has `trials` finished or running ones."""
import contextlib
import threading

from util import distributed as du
from util.hpo.study import hold, next_trial, open_storage, open_study, study_dir


def run_study(args, kind, spec, launch, parallel=1, sdir=None):
    """The driver (every rank under torchrun calls it; rank 0 decides): open the study, then
    take trials (orphans first) and hand each to `launch(job, study, storage, stop) -> Outcome`
    (study and storage are None off rank 0) until the study has `trials` finished or running
    ones. The local launcher trains the trial on every rank of this group; the Slurm launcher
    submits it as a job that reports and tells itself, and waits for it, `parallel` of them at
    once (one thread each). `stop` (a threading.Event) is set when one thread fails (e.g.
    sbatch refused its job): the others take no new trial and stop waiting for their jobs
    (which still tell the study), and the error ends the search.
    Returns (study, "done" | "preempted")."""
    sdir = sdir or study_dir(args, spec)
    study = storage = None
    if du.is_main_process():
        with hold(sdir, "study"):
            storage = open_storage(args.storage, sdir)
            study = open_study(args, spec, sdir, kind, storage)
    stop = threading.Event()
    if parallel <= 1:
        return study, _drive(study, storage, spec, sdir, launch, stop)
    results, errors = [], []

    def worker():
        try:
            results.append(_drive(study, storage, spec, sdir, launch, stop))
        except BaseException as e:  # re-raised in the main thread
            errors.append(e)
            stop.set()
    threads = [threading.Thread(target=worker, daemon=True, name=f"trials-{i}") for i in range(parallel)]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(timeout=1.0)  # wakes up for Ctrl-C
    if errors:
        raise errors[0]
    return study, "preempted" if "preempted" in results else "done"


def _drive(study, storage, spec, sdir, launch, stop):
    """Take trials and launch them until there is none left to take (or `stop` is set: only
    by another driver thread, so no rank waits for a broadcast)."""
    while not stop.is_set():
        job, lease = next_trial(study, storage, spec, sdir) if du.is_main_process() else (None, None)
        job = du.broadcast_object(job)
        if job is None:
            return "done"
        with lease or contextlib.nullcontext():
            outcome = launch(job, study, storage, stop)
        if outcome is not None and outcome.state == "preempted":
            return "preempted"
    return "stopped"

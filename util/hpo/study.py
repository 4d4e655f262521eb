"""Where a study lives and who owns which trial.

A study lives in `<runs_root>/studies/<study_name>/`: the Optuna journal (unless --storage),
lock files, `best.yaml` and TensorBoard HParams. A trial is *owned* by whoever holds its lock
file (an flock: the kernel drops it when the holder dies, even by SIGKILL); a running trial
whose lock nobody holds was left by a process that died, and the next driver resumes it as the
same trial. Not Optuna's heartbeats: those need RDBStorage (the journal file has none) and fail
a stale trial, where this resumes it, run and trial number alike.
"""
import errno
import os
import time

import filelock

from util.errors import UserError
from util.hpo.samplers import make_pruner, make_sampler


def study_dir(args, spec):
    return os.path.join(args.runs_root or "runs", "studies", spec.study_name)


def open_storage(url, sdir):
    """The journal file in the study folder, or --storage: a journal file path or a database URL
    (sqlite:///..., postgresql://..., mysql://... need SQLAlchemy; redis://... needs redis)."""
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend
    try:
        if not url:
            os.makedirs(sdir, exist_ok=True)
            return JournalStorage(JournalFileBackend(os.path.join(sdir, "journal.log")))
        if "://" not in url:
            os.makedirs(os.path.dirname(os.path.abspath(url)), exist_ok=True)
            return JournalStorage(JournalFileBackend(url))
        if url.startswith("redis://"):
            from optuna.storages.journal import JournalRedisBackend
            return JournalStorage(JournalRedisBackend(url))
        return RDBStorage(url)
    except ImportError as e:
        raise UserError(f"--storage {url}: {e}; install the package it names") from None
    except OSError as e:
        raise UserError(f"cannot open the study's journal: {e}") from None
    except Exception as e:  # a bad URL or an unreachable database
        if type(e).__module__.split(".")[0] in ("sqlalchemy", "redis") or isinstance(e, ValueError):
            raise UserError(f"--storage {url}: {str(e).splitlines()[0]}") from None
        raise


def open_study(args, spec, sdir, kind, storage=None):
    """Create or (load_if_exists) continue the study; refuse one made for another metric.
    `storage`: one opened already (open_storage), else the launch's."""
    import optuna
    storage = storage or open_storage(args.storage, sdir)
    study = optuna.create_study(study_name=spec.study_name, storage=storage, direction=spec.direction,
                                load_if_exists=True, pruner=make_pruner(spec))
    if study.direction.name.lower() != spec.direction:
        raise UserError(f"study {spec.study_name} exists with direction {study.direction.name.lower()}; "
                        f"{spec.path} says {spec.direction}: use another study_name")
    attrs = study.user_attrs
    for key, value in (("metric", spec.metric), ("kind", kind)):
        if key not in attrs:
            study.set_user_attr(key, value)
        elif attrs[key] != value:
            raise UserError(f"study {spec.study_name} exists with {key} {attrs[key]}; {spec.path} says "
                            f"{value}: use another study_name")
    return study


def trial_id(storage, study_name, number):
    """Optuna's id of trial `number`, which `optuna.trial.Trial(study, id)` takes; the storage
    API is the public way to it (Trial and FrozenTrial keep it private)."""
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study_name), number)


def hold(sdir, name, blocking=True):
    """Take the lock file <sdir>/locks/<name>.lock; a context manager that lets it go (filelock's),
    or None when `blocking` is False and another process or thread holds it. An flock, never
    filelock's soft fallback: the kernel drops an flock when its holder dies, even by SIGKILL,
    which is how an orphaned trial is found. Needs a filesystem with working locks (local disks,
    NFS; Lustre mounted with -o flock)."""
    lock = filelock.FileLock(os.path.join(sdir, "locks", f"{name}.lock"), fallback_to_soft=False)
    try:
        return lock.acquire(blocking=blocking)
    except filelock.Timeout:
        return None
    except OSError as e:
        if e.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise UserError(f"file locks do not work in {os.path.join(sdir, 'locks')} ({e.strerror}); "
                            "put --runs_root on a filesystem that supports flock") from None
        raise


def next_trial(study, storage, spec, sdir):
    """Under the study lock: the oldest orphaned running trial, else a new one when the study
    has fewer than `trials` finished or running trials, else None. Returns (job, lease): the job
    is what a launcher needs (a picklable dict: number, trial_id, params; adopted: a running
    trial left by a process that died, to resume; same_as: the running trials with these
    params); the caller owns the trial while it holds the lease (let go after the trial is told)."""
    from optuna.trial import TrialState
    with hold(sdir, "study"):
        trials = study.get_trials(deepcopy=False)
        running = [t for t in trials if t.state == TrialState.RUNNING]
        for t in running:
            lease = hold(sdir, f"trial-{t.number}", blocking=False)
            if lease is not None:
                return dict(number=t.number, trial_id=trial_id(storage, study.study_name, t.number),
                            params=dict(t.params), adopted=True, same_as=[]), lease
        finished = sum(t.state.is_finished() for t in trials)
        if finished + len(running) >= spec.trials:
            return None, None
        study.sampler = make_sampler(spec, len(trials))
        trial = study.ask(spec.distributions())
        lease = hold(sdir, f"trial-{trial.number}")
        return dict(number=trial.number, trial_id=trial_id(storage, study.study_name, trial.number),
                    params=dict(trial.params), adopted=False,
                    same_as=[t.number for t in running if t.params == trial.params]), lease


def wait_for_twins(study, sdir, numbers, poll_s=10.0):
    """Wait until the running trials with the same parameters are over (their run directory is
    ours too: two processes must not train one run); then this trial reuses or resumes it."""
    from optuna.trial import TrialState
    for n in numbers:
        print(f"[study {study.study_name}] waiting for trial {n} (same parameters, same run)", flush=True)
        while study.get_trials(deepcopy=False)[n].state == TrialState.RUNNING:
            lease = hold(sdir, f"trial-{n}", blocking=False)
            if lease is not None:  # nobody holds it: its process died
                with lease:
                    break
            time.sleep(poll_s)

"""Where a study lives and who owns which trial.

A study lives in `<runs_root>/studies/<study_name>/`: the Optuna journal (unless --storage),
lock files, `best.yaml` and TensorBoard HParams. A trial is *owned* by whoever holds its lock
file (an flock: the kernel drops it when the holder dies, even by SIGKILL); a running trial
whose lock nobody holds was left by a process that died, and the next driver resumes it as the
same trial. Hand-written rather than Optuna's heartbeats: those need RDBStorage (the journal
file has none) and fail a stale trial, where this resumes it, run and trial number alike.
"""
import dataclasses
import errno
import fcntl
import os
import socket
import time

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


class FileLock:
    """An exclusive flock on a file; the kernel drops it when the holder dies, even by SIGKILL.
    Needs a filesystem with working locks (local disks, NFS; Lustre mounted with -o flock)."""

    def __init__(self, path):
        self.path, self.fd = path, None

    def acquire(self, blocking=True):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise UserError(f"file locks do not work in {os.path.dirname(self.path)} ({e.strerror}); "
                                "put --runs_root on a filesystem that supports flock") from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
        self.fd = fd
        return True

    def release(self):
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
        return False


def study_lock(sdir):
    return FileLock(os.path.join(sdir, "locks", "study.lock"))


def trial_lock(sdir, number):
    return FileLock(os.path.join(sdir, "locks", f"trial-{number}.lock"))


@dataclasses.dataclass
class TrialJob:
    """One trial to train: what a launcher needs (picklable)."""
    number: int
    trial_id: int
    params: dict
    adopted: bool = False           # a running trial left by a process that died: resume it
    same_as: list = dataclasses.field(default_factory=list)  # running trials with these params


def next_trial(study, storage, spec, sdir):
    """Under the study lock: the oldest orphaned running trial, else a new one when the study
    has fewer than `trials` finished or running trials, else None. Returns (job, lease): the
    caller owns the trial while it holds the lease (release it after the trial is told)."""
    from optuna.trial import TrialState
    with study_lock(sdir):
        trials = study.get_trials(deepcopy=False)
        running = [t for t in trials if t.state == TrialState.RUNNING]
        for t in running:
            lease = trial_lock(sdir, t.number)
            if lease.acquire(blocking=False):
                tid = trial_id(storage, study.study_name, t.number)
                return TrialJob(t.number, tid, dict(t.params), adopted=True), lease
        finished = sum(t.state.is_finished() for t in trials)
        if finished + len(running) >= spec.trials:
            return None, None
        study.sampler = make_sampler(spec, len(trials))
        trial = study.ask(spec.distributions())
        lease = trial_lock(sdir, trial.number)
        lease.acquire()
        same = [t.number for t in running if t.params == trial.params]
        tid = trial_id(storage, study.study_name, trial.number)
        return TrialJob(trial.number, tid, dict(trial.params), same_as=same), lease


def lease_free(sdir, number):
    lease = trial_lock(sdir, number)
    if lease.acquire(blocking=False):
        lease.release()
        return True
    return False


def wait_for_twins(study, sdir, numbers, poll_s=10.0):
    """Wait until the running trials with the same parameters are over (their run directory is
    ours too: two processes must not train one run); then this trial reuses or resumes it."""
    from optuna.trial import TrialState
    for n in numbers:
        print(f"[study {study.study_name}] waiting for trial {n} (same parameters, same run)", flush=True)
        while True:
            t = study.get_trials(deepcopy=False)[n]
            if t.state != TrialState.RUNNING or lease_free(sdir, n):
                break
            time.sleep(poll_s)

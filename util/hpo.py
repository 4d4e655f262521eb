"""Hyperparameter search with Optuna: every trial is an ordinary run (docs/search.md).

`main_*.py --optimize_config search.yaml` runs `optimize(args, kind)`: the search file is checked
whole before any trial starts, then trials run one after another in this process (or this
torchrun group) until the study holds `trials` finished ones. A study lives in
`<runs_root>/studies/<study_name>/`: the Optuna journal (unless --storage), lock files,
`best.yaml` and TensorBoard HParams. Each trial is `main(args)` with the sampled flags, so it
gets its own run directory named by its signature; a trial landing on a completed run reuses
its result.

Who does what: the *driver* (`run_study`) picks the next trial under the study lock and hands
it to a launcher; the process that trains the trial (rank 0) reports the metric after each
epoch, asks the pruner, broadcasts the decision so every rank stops together, and tells Optuna
the result (`TrialTask`). A trial is *owned* by whoever holds its lock file; a running trial
whose lock nobody holds was left by a process that died, and the next driver resumes it as the
same trial (its run resumes from its checkpoint).

The search file: util/hpo_spec.py. One Slurm job per trial: util/hpo_slurm.py.
"""
import copy
import dataclasses
import errno
import fcntl
import importlib
import json
import math
import os
import socket
import sys
import time
import traceback

from util import distributed as du
from util.errors import UserError, exit_on_user_error
from util.hpo_spec import Param, SearchSpec, _check_bounds, load_spec, make_pruner, make_sampler  # noqa: F401 (API)

MODULES = {"finetune": "main_finetune", "pretrain": "main_pretrain"}
# A launch of a study names many runs; these flags name one.
ONE_RUN_FLAGS = {"output_dir": "--output_dir names one run; a study makes many (they go under "
                               "--runs_root): leave it out",
                 "log_dir": "--log_dir would put every trial's TensorBoard events in one folder: leave it out",
                 "resume": "--resume names one checkpoint; trials resume their own runs: leave it out",
                 "force": "--force would fork a fresh run for every trial (and for a resumed one): leave it out",
                 "eval": "--eval only evaluates; a study trains: leave it out",
                 "preflight": "--preflight runs one step; run it without --optimize_config first"}
STATES = ("COMPLETE", "PRUNED", "FAIL")


# ---------------------------------------------------------------- study, storage, locks

def study_dir(args, spec):
    return os.path.join(getattr(args, "runs_root", None) or "runs", "studies", spec.study_name)


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


def open_study(args, spec, sdir, kind):
    """Create or (load_if_exists) continue the study; refuse one made for another metric."""
    import optuna
    storage = open_storage(getattr(args, "storage", None), sdir)
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


def _study_lock(sdir):
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


def next_trial(study, spec, sdir):
    """Under the study lock: the oldest orphaned running trial, else a new one when the study
    has fewer than `trials` finished or running trials, else None. Returns (job, lease): the
    caller owns the trial while it holds the lease (release it after the trial is told)."""
    from optuna.trial import TrialState
    with _study_lock(sdir):
        trials = study.get_trials(deepcopy=False)
        running = [t for t in trials if t.state == TrialState.RUNNING]
        for t in running:
            lease = trial_lock(sdir, t.number)
            if lease.acquire(blocking=False):
                return TrialJob(t.number, t._trial_id, dict(t.params), adopted=True), lease
        finished = sum(t.state.is_finished() for t in trials)
        if finished + len(running) >= spec.trials:
            return None, None
        study.sampler = make_sampler(spec, len(trials))
        trial = study.ask(spec.distributions())
        lease = trial_lock(sdir, trial.number)
        lease.acquire()
        same = [t.number for t in running if t.params == trial.params]
        return TrialJob(trial.number, trial._trial_id, dict(trial.params), same_as=same), lease


def lease_free(sdir, number):
    lease = trial_lock(sdir, number)
    if lease.acquire(blocking=False):
        lease.release()
        return True
    return False


# ---------------------------------------------------------------- one trial

class Pruned(Exception):
    """Stops a trial's run on every rank; run.json says `pruned` (util/run_context.run_epochs)."""
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


class Reporter:
    """epoch_callback of a trial's main(): rank 0 reports the metric (and any earlier epochs of a
    resumed run) and asks the pruner; every rank gets the decision, so all stop together."""

    def __init__(self, spec, trial, targs):
        self.spec, self.trial, self.targs = spec, trial, targs  # trial is None off rank 0

    def __call__(self, epoch, log):
        decision = self._decide(epoch, log) if self.trial is not None else None
        decision = du.broadcast_object(decision)
        if decision and decision[0] == "missing":
            raise MetricMissing(f"metric {self.spec.metric} is not in the epoch log (it has: {decision[1]}); "
                                f"fix metric in {self.spec.path}")
        if decision:
            raise Pruned(decision[1])

    def _decide(self, epoch, log):
        metric = self.spec.metric
        if metric not in log:
            return ("missing", ", ".join(sorted(k for k in log if k != "epoch")))
        done = self.trial.study.get_trials(deepcopy=False)[self.trial.number].intermediate_values
        entries = {e["epoch"]: e for e in read_log(self.targs.output_dir) if "epoch" in e}
        entries[epoch] = log
        for e in sorted(entries):
            v = entries[e].get(metric)
            if e not in done and isinstance(v, (int, float)):
                self.trial.report(float(v), e)
        if self.trial.should_prune():
            return ("prune", f"pruned by {self.spec.pruner[0]} after epoch {epoch} ({metric} {log[metric]:.4g})")
        return None


def _rank_from_env():
    return du.detect_launcher()[1]


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


class TrialTask:
    """Train one trial: callable on every rank of the process or group that trains it (here, or
    in a Slurm job); rank 0 talks to Optuna. Picklable: holds the flags, the spec and where the
    study is (`storage`: the launch's --storage or None for the journal in the study folder).

    `run_dir`: the run directory chosen before submitting (Slurm), else the signature picks it.
    `stop_on_setup_error`: a UserError before the run opened means the launch's own flags
    cannot run (e.g. no such data): end the study instead of failing every trial alike."""

    def __init__(self, kind, args, spec, job, sdir, storage=None, run_dir=None, stop_on_setup_error=True):
        self.kind, self.args, self.spec, self.job, self.sdir, self.storage = kind, args, spec, job, sdir, storage
        self.run_dir, self.stop_on_setup_error = run_dir, stop_on_setup_error

    def study(self, storage=None):
        """A handle on the study for reporting and telling. Its sampler is never asked (the
        driver samples) and must not act after a trial (GridSampler would stop the study)."""
        import optuna
        return optuna.load_study(study_name=self.spec.study_name,
                                 storage=storage or open_storage(self.storage, self.sdir),
                                 sampler=optuna.samplers.RandomSampler(), pruner=make_pruner(self.spec))

    def __call__(self, storage=None):
        import optuna
        module = importlib.import_module(MODULES[self.kind])
        spec, job = self.spec, self.job
        main_rank = _rank_from_env() == 0
        prefix = f"[study {spec.study_name}] trial {job.number}"
        trial = None
        if main_rank:
            study = self.study(storage)
            trial = optuna.trial.Trial(study, job.trial_id)
            trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
            print(f"{prefix} {'resumed' if job.adopted else 'started'}: {_fmt_params(job.params)}", flush=True)
            if job.same_as:
                wait_for_twins(study, self.sdir, job.same_as)
        targs = trial_args(self.args, spec, job.params)
        if self.run_dir:
            targs.output_dir = self.run_dir
        extra = {"study": {"name": spec.study_name, "trial": job.number, "params": job.params,
                           "dir": os.path.abspath(self.sdir)}}
        outcome = Outcome(job.number, "FAIL")
        try:
            module.validate_args(targs)
        except UserError as e:  # values the script refuses together: this trial fails, the study goes on
            outcome.reason = f"the script refuses these values: {e}"
        else:
            outcome = self._train(module, targs, trial, extra, outcome)
        states = du.all_gather_object(outcome.state) if du.is_dist() else [outcome.state]
        if outcome.state == "COMPLETE" and "FAIL" in states:
            outcome.state, outcome.reason = "FAIL", "another rank failed"
        if outcome.state == "preempted":
            if main_rank:
                print(f"{prefix} preempted: its run saved its state; start the study again to resume it",
                      flush=True)
            return outcome
        if outcome.state == "COMPLETE":
            outcome.value, outcome.epoch = best_value(spec, outcome.run_dir)
            if outcome.value is None:
                outcome.state, outcome.reason = "FAIL", f"the run's log.txt has no finite {spec.metric}"
        self._tell(trial, outcome)
        return outcome

    def _train(self, module, targs, trial, extra, outcome):
        """main() of the script with the trial's flags; the outcome says how it ended."""
        from util.run_context import AlreadyCompleted
        try:
            result = module.main.__wrapped__(targs, epoch_callback=Reporter(self.spec, trial, targs),
                                             record_extra=extra) or {}
            outcome.run_dir = result.get("run_dir")
            outcome.state = "preempted" if result.get("status") == "preempted" else "COMPLETE"
        except Pruned as p:
            outcome.state, outcome.reason, outcome.run_dir = "PRUNED", str(p), targs.output_dir
        except AlreadyCompleted as done:
            outcome.state, outcome.run_dir, outcome.reused = "COMPLETE", done.run_dir, True
        except UserError as e:
            outcome.reason, outcome.run_dir = str(e), targs.output_dir or None
            # before its run opened, the launch's own flags cannot run at all: stop the study
            if isinstance(e, MetricMissing) or (self.stop_on_setup_error and not targs.output_dir):
                self._tell(trial, outcome)
                raise UserError(f"trial {outcome.number}: {e}") from None
        except Exception as e:  # a failed trial keeps its run (status failed) and the study goes on
            outcome.reason, outcome.run_dir = f"{type(e).__name__}: {e}", targs.output_dir or None
            traceback.print_exc()
        return outcome

    def tell(self, outcome, storage=None):
        """Tell an outcome decided outside the trial's run (by the driver: a reused run, a job
        that died without telling)."""
        import optuna
        self._tell(optuna.trial.Trial(self.study(storage), self.job.trial_id), outcome)
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


def _fmt_params(params):
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(params.items()))


def write_hparams(sdir, spec, number, params, state, value):
    """One TensorBoard HParams session per finished trial: <study>/tensorboard/trial-NNNN."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams
    hp, discrete = {"trial_state": state}, {"trial_state": list(STATES)}
    for flag, v in params.items():
        p = spec.params.get(flag)
        if p is not None and p.type == "categorical":
            hp[flag], discrete[flag] = str(v), [str(c) for c in p.choices]
        else:
            hp[flag] = v
    metrics = {f"hparams/{spec.metric}": float(value)} if value is not None and math.isfinite(value) else {}
    exp, ssi, sei = hparams(hp, metrics, hparam_domain_discrete=discrete)
    with SummaryWriter(log_dir=os.path.join(sdir, "tensorboard", f"trial-{number:04d}")) as w:
        for summary in (exp, ssi, sei):
            w.file_writer.add_summary(summary)
        for k, v in metrics.items():
            w.add_scalar(k, v)


# ---------------------------------------------------------------- the study

def prepare(args, kind):
    """Everything checked before any trial: the launch's flags and the whole search file."""
    module = importlib.import_module(MODULES[kind])
    if not args.optimize_config:
        raise UserError("--storage is for a hyperparameter search: give --optimize_config search.yaml")
    for flag, msg in ONE_RUN_FLAGS.items():
        if getattr(args, flag, None):
            raise UserError(msg)
    spec = load_spec(args.optimize_config, module.get_args_parser(), kind, args)
    module.validate_args(args)
    _check_bounds(spec, args, module.validate_args)
    return spec


def local_launcher(kind, args, spec, sdir):
    """Launcher factory: train each trial here, on every rank of this process group."""
    def make(study, stop=None):
        storage = study._storage if study is not None else None  # share the open journal

        def launch(job):
            return TrialTask(kind, args, spec, job, sdir, args.storage)(storage)
        return launch
    return make


def run_study(args, kind, spec, make_launcher, parallel=1, sdir=None):
    """The driver (every rank under torchrun calls it; rank 0 decides): open the study, then
    take trials (orphans first) and hand each to `launch(job) -> Outcome` until the study has
    `trials` finished or running ones. `make_launcher(study, stop)` (study is None off rank 0)
    gives `launch`: the local launcher trains the trial on every rank of this group; the Slurm
    launcher submits it as a job that reports and tells itself, and waits for it, `parallel`
    of them at once (one thread each). `stop` (a threading.Event) is set when one thread fails
    (e.g. sbatch refused its job): the others take no new trial and stop waiting for their
    jobs (which still tell the study), and the error ends the search.
    Returns (study, "done" | "preempted")."""
    import threading
    sdir = sdir or study_dir(args, spec)
    study = None
    if du.is_main_process():
        with _study_lock(sdir):
            study = open_study(args, spec, sdir, kind)
    stop = threading.Event()
    launch = make_launcher(study, stop)
    if parallel <= 1:
        return study, _drive(study, spec, sdir, launch)
    results, errors = [], []

    def worker():
        try:
            results.append(_drive(study, spec, sdir, launch, stop))
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


def _drive(study, spec, sdir, launch, stop=None):
    """Take trials and launch them until there is none left to take (or `stop` is set: only
    with several driver threads, so no rank waits for a broadcast)."""
    while True:
        if stop is not None and stop.is_set():
            return "stopped"
        job, lease = next_trial(study, spec, sdir) if du.is_main_process() else (None, None)
        job = du.broadcast_object(job)
        if job is None:
            return "done"
        try:
            outcome = launch(job)
        finally:
            if lease is not None:
                lease.release()
        if outcome is not None and outcome.state == "preempted":
            return "preempted"


def summarize(study, spec, sdir, out=None):
    """Print the counts and the best trial; write best.yaml (the best run's config.yaml)."""
    out = out or sys.stdout
    from optuna.trial import TrialState
    trials = study.get_trials(deepcopy=False)
    counts = {s: sum(t.state.name == s for t in trials) for s in STATES}
    running = sum(t.state == TrialState.RUNNING for t in trials)
    line = ", ".join(f"{n} {w}" for w, n in zip(("complete", "pruned", "failed"), counts.values()))
    print(f"[study {spec.study_name}] {sum(counts.values())} finished trials ({line})"
          + (f", {running} still running elsewhere" if running else "") + f"; study folder {sdir}", file=out)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        print(f"[study {spec.study_name}] no completed trial yet: no best.yaml", file=out)
        return None
    best = study.best_trial
    run_dir = best.user_attrs.get("run_dir")
    print(f"[study {spec.study_name}] best trial {best.number}: {spec.metric} {best.value:.6g}; "
          f"params {_fmt_params(best.params)}; run {run_dir}", file=out)
    src = os.path.join(run_dir or "", "config.yaml")
    if os.path.isfile(src):
        from util.atomic import atomic_write_text
        with open(src, encoding="utf-8") as f:
            body = f.read()
        header = (f"# Best trial {best.number} of study {spec.study_name}: {spec.metric} {best.value:.6g} "
                  f"({spec.direction}); run {run_dir}\n# params: {json.dumps(best.params)}\n")
        atomic_write_text(os.path.join(sdir, "best.yaml"), header + body)
        print(f"[study {spec.study_name}] wrote {os.path.join(sdir, 'best.yaml')} (use it as --config)", file=out)
    return best


@exit_on_user_error
def optimize(args, kind):
    """`main_<kind>.py --optimize_config FILE`: run the study's trials here, one after another."""
    spec = prepare(args, kind)
    sdir = study_dir(args, spec)
    du.keep_process_group(True)  # main() would tear the group down after each trial
    du.init_distributed(args)
    try:
        study, how = run_study(args, kind, spec, local_launcher(kind, args, spec, sdir))
        if du.is_main_process() and how == "done":
            summarize(study, spec, sdir)
    finally:
        du.keep_process_group(False)
        du.cleanup()
    return 0


def optimize_slurm(kind, args, margs):
    """`submitit_<kind>.py --optimize_config`: see util/hpo_slurm.py (it imports this module)."""
    from util.hpo_slurm import optimize_slurm as run
    return run(kind, args, margs)

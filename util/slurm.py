"""Launch main_pretrain.py / main_finetune.py as Slurm jobs (or locally) with submitit.

One code path for both submitit_*.py scripts: they take every flag of their main script plus the
Slurm flags below, resolve the run directory *before* submitting (so a requeued or resubmitted
job finds the same run), refuse bad input before anything is queued, and submit a `Trainer`
that calls the script's own `main(args)`. See docs/slurm.md.

Preemption: submitit's batch script asks Slurm for USR2 before the time limit and on
preemption. main() traps USR2 and SIGTERM itself (util/preemption.py) and saves
checkpoint-last.pth at the next optimizer step; the Trainer then hands over to submitit's own
USR2 handler, which pickles `Trainer.checkpoint()` and runs `scontrol requeue`. On SIGTERM alone
(`scontrol requeue`, `scancel`) Slurm decides what comes next; the state is saved either way.
"""
import argparse
import copy
import importlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import submitit

from util.atomic import atomic_write_json, missing_dirs, remove_empty_dirs
from util.config import parse_args, str2bool
from util.errors import UserError, exit_on_user_error

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB_RECORD = "job.json"          # <run_dir>/slurm/job.json: the job last submitted for the run
MAX_NUM_TIMEOUT = 30             # requeues after a timeout or preemption (the original's value)
ACTIVE_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD",
                 "REQUEUE_FED", "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT",
                 "PREEMPTED"}
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT", "REVOKED"}


# ---------------------------------------------------------------- flags

def add_slurm_args(parser):
    """The original launcher flags plus ours; the main script's flags are already on `parser`."""
    g = parser.add_argument_group("Slurm / submitit (see docs/slurm.md)")
    a = g.add_argument
    a("--nodes", default=2, type=int, help="number of nodes")
    a("--ngpus", default=8, type=int,
      help="GPUs per node = processes (tasks) per node; on nodes without GPUs: tasks per node")
    a("--gpus_per_node", default=-1, type=int,
      help="GPUs to request per node; -1: same as --ngpus; 0: request none (CPU nodes)")
    a("--timeout", default=4320, type=int, help="job time limit in minutes")
    a("--job_dir", default="",
      help="results folder of the original command lines: the run directory unless --output_dir "
           "is given (then the submitit log folder); empty: <run_dir>/slurm/")
    a("--partition", default="", type=str, help="partition; empty: the cluster's default")
    a("--use_volta32", action="store_true", help="add the constraint volta32gb")
    a("--comment", default="", type=str, help="comment shown by squeue")
    a("--cpus_per_task", default=10, type=int)
    a("--mem_gb", default=None, type=float, help="memory per node in GB (default 40 * ngpus)")
    a("--account", default="", type=str)
    a("--qos", default="", type=str)
    a("--constraint", default="", type=str)
    a("--exclude", default="", type=str, help="nodes not to use")
    a("--slurm_extra", default=[], action="append", metavar="KEY=VALUE",
      help="any further sbatch option (repeatable), e.g. --slurm_extra mail-type=END")
    a("--signal_delay_s", default=120, type=int,
      help="seconds before the time limit at which Slurm sends USR2 (save, then requeue)")
    a("--cluster", default="slurm", choices=("slurm", "local", "debug"),
      help="slurm; local: the job's processes on this machine (no Slurm); debug: in this process")
    a("--dry_run", action="store_true", help="print the run directory and the batch script; submit nothing")
    a("--wait", type=str2bool, nargs="?", const=True, default=False,
      help="block until the job ends and show its result or error")
    a("--parallel", default=1, type=int,
      help="with --optimize_config: trials at once, each its own job (this process drives the study)")
    return parser


def _dests(parser):
    return {a.dest for a in parser._actions if a.dest != argparse.SUPPRESS}


def split_args(args, main_dests):
    """The main script's own Namespace (only its flags, as if it had parsed them itself), so its
    signature, config.yaml and run.json are those of a plain run with the same settings."""
    out = copy.copy(args)
    for k in list(vars(out)):
        if k not in main_dests:
            delattr(out, k)
    if hasattr(out, "_flag_dests"):
        out._flag_dests = frozenset(main_dests)
    return out


def parse_extra(items):
    extra = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            raise UserError(f"--slurm_extra {item!r}: write KEY=VALUE, e.g. --slurm_extra mail-type=END")
        extra[key] = value
    return extra


def check_launch_flags(args):
    checks = [
        (args.nodes >= 1, "--nodes must be >= 1"),
        (args.ngpus >= 1, "--ngpus (processes per node) must be >= 1"),
        (args.timeout >= 1, "--timeout (minutes) must be >= 1"),
        (args.cpus_per_task >= 1, "--cpus_per_task must be >= 1"),
        (args.mem_gb is None or args.mem_gb > 0, "--mem_gb must be > 0"),
        (args.signal_delay_s >= 0, "--signal_delay_s must be >= 0"),
        (args.gpus_per_node >= -1, "--gpus_per_node must be -1 (same as --ngpus), 0 or more"),
    ]
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)
    parse_extra(args.slurm_extra)
    if args.cluster == "local" and args.nodes != 1:
        raise UserError(f"--cluster local runs on this one machine: use --nodes 1 (got {args.nodes})")
    if args.cluster == "debug" and args.nodes * args.ngpus != 1:
        raise UserError("--cluster debug runs one process in this one: use --nodes 1 --ngpus 1")


def gpus_per_node(args):
    return args.ngpus if args.gpus_per_node < 0 else args.gpus_per_node


def mem_gb_per_node(args):
    return args.mem_gb if args.mem_gb else 40 * args.ngpus


# ---------------------------------------------------------------- checks before queueing

def check_data(args):
    """The cheap part of the main script's dataset checks (util/data.build_dataset), without
    listing a whole dataset on the submitting machine."""
    from util.data import DATA_SETS
    if args.data_set not in DATA_SETS:
        raise UserError(f"unknown --data_set {args.data_set!r}: choose one of {', '.join(DATA_SETS)}")
    if args.data_set == "synthetic":
        return
    if not args.data_path:
        raise UserError(f"--data_set {args.data_set} needs --data_path (a folder with train/ and val/); "
                        "or use --data_set synthetic")
    if not os.path.isdir(args.data_path):
        raise UserError(f"--data_path {args.data_path} does not exist (or is not a folder); "
                        "give the dataset root, reachable from the compute nodes")
    if args.data_set in ("image_folder", "IMNET"):
        train = os.path.join(args.data_path, "train")
        if not os.path.isdir(train):
            raise UserError(f"training folder {train} does not exist; --data_path must hold train/ "
                            "and val/ class folders")
        val = getattr(args, "eval_data_path", None) or os.path.join(args.data_path, "val")
        needs_val = not (getattr(args, "disable_eval", True) and not getattr(args, "eval", False))
        if needs_val and not os.path.isdir(val):
            raise UserError(f"validation folder {val} does not exist; give --eval_data_path or "
                            "--disable_eval True")
        if needs_val:  # the class folders' names only, no image listed
            from util.data import check_same_classes
            names = [sorted(e.name for e in os.scandir(d) if e.is_dir()) for d in (train, val)]
            check_same_classes(*(argparse.Namespace(classes=n) for n in names))


def check_checkpoints_fit(module, args):
    """--resume / --finetune fit the model (util/validate.check_checkpoints, shapes only), so a
    wrong file is found now and not after the job waited in the queue. The number of classes
    comes from the class folders' names (no image is listed); CIFAR has 100."""
    if not (args.resume or getattr(args, "finetune", "")) or not hasattr(module, "model_builder"):
        return
    from util.validate import check_checkpoints
    check_checkpoints(args, module.model_builder(args, _class_count(args)))


def _class_count(args):
    if args.data_set == "synthetic":
        return getattr(args, "synthetic_classes", 10)
    if args.data_set == "CIFAR":
        return 100
    train = os.path.join(args.data_path, "train")
    return sum(1 for e in os.scandir(train) if e.is_dir())


def _run(cmd, timeout=30):
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p


def parse_minutes(text):
    """Slurm time ('60', '1:00:00', '2-00:00:00', 'UNLIMITED') in minutes; None = unlimited."""
    text = (text or "").strip()
    if not text or text.upper() in ("UNLIMITED", "INFINITE", "NONE", "N/A"):
        return None
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
    parts = [int(p) for p in text.split(":")]
    if days:  # days-hours[:minutes[:seconds]]
        parts += [0] * (3 - len(parts))
        h, m, s = parts[:3]
    elif len(parts) == 1:
        h, m, s = 0, parts[0], 0
    elif len(parts) == 2:
        h, m, s = 0, parts[0], parts[1]
    else:
        h, m, s = parts[:3]
    return days * 1440 + h * 60 + m + s / 60


def partitions():
    """{name: {key: value}} from `scontrol show partition -o`, or None when it cannot be asked."""
    p = _run(["scontrol", "show", "partition", "-o"])
    if p is None or p.returncode != 0:
        return None
    out = {}
    for line in p.stdout.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if "PartitionName" in fields:
            out[fields["PartitionName"]] = fields
    return out


def _node_resources(partition):
    """(max CPUs, max memory in MB, any GPU gres) over the partition's nodes, from sinfo; None
    if unknown."""
    p = _run(["sinfo", "-h", "-p", partition, "-o", "%c|%m|%G"])
    if p is None or p.returncode != 0 or not p.stdout.strip():
        return None
    cpus, mem, gpus = 0, 0, False
    for line in p.stdout.splitlines():
        c, m, g = (line.split("|") + ["", "", ""])[:3]
        cpus = max(cpus, int(re.sub(r"\D", "", c) or 0))
        mem = max(mem, int(re.sub(r"\D", "", m) or 0))
        gpus = gpus or "gpu" in g
    return cpus, mem, gpus


def check_partition(args):
    """Refuse what the partition cannot give (nodes, time, CPUs, memory or GPUs per node) before
    queueing. Without --gpus_per_node, a partition whose nodes have no GPUs gets no GPU request.
    `--partition a,b` (Slurm's "any of these") passes when one of them fits. Returns the
    partition names checked, or None when Slurm cannot be asked (then sbatch decides)."""
    parts = partitions()
    if parts is None:
        return None
    if args.partition:
        names = [n.strip() for n in args.partition.split(",") if n.strip()]
        unknown = [n for n in names if n not in parts]
        if unknown:
            raise UserError(f"unknown partition {unknown[0]!r}; this cluster has: {', '.join(sorted(parts))}")
    else:
        names = [n for n, f in parts.items() if f.get("Default") == "YES"][:1]
        if not names:
            raise UserError(f"this cluster has no default partition; pass --partition "
                            f"({', '.join(sorted(parts))})")
    resources = {name: _node_resources(name) for name in names}  # sinfo, once per partition
    if args.gpus_per_node < 0:  # not given: CPU-only partitions get no GPU request
        if all(r is not None and not r[2] for r in resources.values()):
            args.gpus_per_node = 0
            print(f"note: partition {','.join(names)} has no GPUs: requesting none; --ngpus "
                  f"{args.ngpus} is the number of processes per node")
    problems = [_partition_problem(args, name, parts[name], resources[name]) for name in names]
    if all(problems):
        raise UserError(problems[0])
    return names


def _partition_problem(args, name, info, res):
    """Why the request does not fit partition `name` (scontrol's `info`, sinfo's `res`), or None."""
    total = int(info.get("TotalNodes", "0") or 0)
    max_nodes = info.get("MaxNodes", "UNLIMITED")
    limit = total if max_nodes in ("UNLIMITED", "") else min(total, int(max_nodes))
    if total and args.nodes > limit:
        return f"--nodes {args.nodes}: partition {name} allows at most {limit} node(s) per job"
    max_time = parse_minutes(info.get("MaxTime"))
    if max_time is not None and args.timeout > max_time:
        return (f"--timeout {args.timeout} min is above partition {name}'s MaxTime "
                f"{info.get('MaxTime')} ({max_time:g} min); ask for less time")
    if res is None:
        return None
    cpus, mem_mb, has_gpus = res
    if gpus_per_node(args) > 0 and not has_gpus:
        return (f"partition {name} has no GPUs: pass --gpus_per_node 0 (then --ngpus is "
                "the number of processes per node)")
    need = args.ngpus * args.cpus_per_task
    if cpus and need > cpus:
        return (f"{args.ngpus} task(s) per node x --cpus_per_task {args.cpus_per_task} = {need} "
                f"CPUs per node, but the nodes of partition {name} have {cpus}; lower them")
    mem_gb = mem_gb_per_node(args)
    if mem_mb and mem_gb * 1024 > mem_mb:
        return (f"--mem_gb {mem_gb:g} per node, but the nodes of partition {name} have "
                f"{mem_mb} MB; pass a smaller --mem_gb")
    return None


# ---------------------------------------------------------------- where the run lives

def resolve_run(margs, args, kind, world_size):
    """(run_dir, job_folder), with margs.output_dir set to the run directory; raises RunCompleted.

    --job_dir (the original scripts' results folder) is the run directory unless --output_dir
    is given, then it holds submitit's files (<job_dir>/%j); by default they go to
    <run_dir>/slurm/%j, so the run and its jobs live in one place.
    """
    from util import runs
    job_dir_is_logs = bool(margs.output_dir) and bool(args.job_dir)
    if not margs.output_dir and args.job_dir:
        if "%j" in args.job_dir:
            raise UserError("--job_dir with %j would give every submission its own run directory; "
                            "drop the %j (requeues and resubmissions must find the same run)")
        margs.output_dir = args.job_dir
    run_dir = os.path.abspath(runs.prepare_run_dir(margs, kind=kind, world_size=world_size))
    margs.output_dir = run_dir
    if job_dir_is_logs:
        return run_dir, os.path.join(os.path.abspath(args.job_dir), "%j")
    return run_dir, os.path.join(run_dir, "slurm", "%j")


def resolve_new_run(margs, args, kind, world_size):
    """resolve_run, plus the folders it made (deepest first, the run directory itself when it is
    empty): what to remove again when nothing gets submitted."""
    from util import runs
    made = missing_dirs(margs.output_dir or args.job_dir or
                        os.path.join(getattr(margs, "runs_root", None) or runs.DEFAULT_ROOT, kind))
    run_dir, folder = resolve_run(margs, args, kind, world_size)
    return run_dir, folder, ([] if os.listdir(run_dir) else [run_dir]) + made


def _job_record_path(run_dir):
    return os.path.join(run_dir, "slurm", JOB_RECORD)


def slurm_state(job_id):
    """The job's state word (PENDING, RUNNING, COMPLETED, ...) from squeue, else sacct; None if unknown."""
    p = _run(["squeue", "-h", "-t", "all", "-j", str(job_id), "-o", "%T"])
    if p is not None and p.returncode == 0 and p.stdout.strip():
        return p.stdout.split()[0]
    p = _run(["sacct", "-X", "-n", "-P", "-j", str(job_id), "-o", "State"])
    if p is not None and p.returncode == 0 and p.stdout.strip():
        return p.stdout.split()[0].rstrip("+")
    return None


def _pid_alive(pid):
    try:
        os.kill(int(pid), 0)
        return True
    except (OSError, ValueError):
        return False


def active_job(run_dir):
    """(job id, state) of a job queued or running for this run, else None. Looks at the job we
    recorded at submission and at the Slurm job id in run.json."""
    from util import runs
    candidates = []
    try:
        with open(_job_record_path(run_dir), encoding="utf-8") as f:
            rec = json.load(f)
        candidates.append((rec.get("cluster"), str(rec.get("job_id"))))
    except (OSError, ValueError):
        pass
    record = runs.RunRecord.load(run_dir) or {}
    slurm = record.get("slurm") or {}
    if record.get("status") == "running" and slurm.get("job_id"):
        candidates.append(("slurm", str(slurm["job_id"])))
    for cluster, job_id in candidates:
        if cluster == "local":
            if _pid_alive(job_id):
                return job_id, "RUNNING (local)"
        elif cluster == "slurm" and shutil.which("squeue"):
            state = slurm_state(job_id)
            if state in ACTIVE_STATES:
                return job_id, state
    return None


# ---------------------------------------------------------------- executor

def _mem(mem_gb):
    return f"{int(mem_gb)}GB" if float(mem_gb).is_integer() else f"{int(mem_gb * 1024)}MB"


def _pythonpath_line():
    """The job unpickles util.slurm.Trainer: make the suite importable wherever it starts."""
    return f"export PYTHONPATH={shlex.quote(REPO)}${{PYTHONPATH:+:$PYTHONPATH}}"


def slurm_parameters(args, name):
    """sbatch settings (submitit's SlurmExecutor names) from the flags."""
    constraint = "&".join(c for c in ("volta32gb" if args.use_volta32 else "", args.constraint) if c)
    params = {
        "job_name": name, "time": args.timeout, "nodes": args.nodes, "ntasks_per_node": args.ngpus,
        "cpus_per_task": args.cpus_per_task, "mem": _mem(mem_gb_per_node(args)),
        "signal_delay_s": args.signal_delay_s,
        "setup": [_pythonpath_line()],
    }
    if gpus_per_node(args) > 0:
        params["gpus_per_node"] = gpus_per_node(args)
    for key in ("partition", "comment", "account", "qos", "exclude"):
        if getattr(args, key):
            params[key] = getattr(args, key)
    if constraint:
        params["constraint"] = constraint
    extra = parse_extra(args.slurm_extra)
    if extra:
        params["additional_parameters"] = extra
    return params


def make_executor(args, folder, name, preview=False):
    """submitit executor for --cluster. preview: only to render the batch script (works on a
    machine without Slurm)."""
    if args.cluster == "debug":
        return submitit.DebugExecutor(folder)
    if args.cluster == "local":
        import torch
        ex = submitit.LocalExecutor(folder, max_num_timeout=MAX_NUM_TIMEOUT)
        ex.update_parameters(timeout_min=args.timeout, tasks_per_node=args.ngpus, nodes=1,
                             gpus_per_node=min(gpus_per_node(args), torch.cuda.device_count()),
                             signal_delay_s=args.signal_delay_s, setup=[_pythonpath_line()])
        return ex
    cls = _PreviewSlurmExecutor if preview and shutil.which("srun") is None else submitit.SlurmExecutor
    try:
        ex = cls(folder, max_num_timeout=MAX_NUM_TIMEOUT)
    except RuntimeError as e:  # submitit: no srun here
        raise UserError(f"Slurm is not available here ({e}); use --cluster local to run on this machine") from None
    try:
        ex.update_parameters(**slurm_parameters(args, name))
    except ValueError as e:
        raise UserError(f"invalid Slurm setting: {str(e).splitlines()[0]}") from None
    return ex


class _PreviewSlurmExecutor(submitit.SlurmExecutor):
    """Renders the batch script on a machine without srun (--dry_run); never submits."""

    @classmethod
    def affinity(cls):
        return 1

    def _submit_command(self, command):
        raise RuntimeError("the preview executor does not submit")


def batch_script(executor):
    """The sbatch file submitit writes for this executor (SlurmExecutor internals, 1.5.x)."""
    return executor._make_submission_file_text(executor._submitit_command_str, "dry-run")


# ---------------------------------------------------------------- the job

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


class Trainer:
    """What runs in every task of the job: torch.distributed from submitit's job environment,
    then `<module>.main(args)`. Picklable (it holds the module name, the kind and the args)."""

    def __init__(self, module, kind, args):
        self.module, self.kind, self.args = module, kind, args

    def __call__(self):
        env = _job_environment()
        if env is not None and env.num_tasks > 1:
            # set_cuda_visible_devices=False: util/distributed.py picks cuda:<local_rank> itself
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False,
                                                                  overwrite=True)
        main = importlib.import_module(self.module).main
        main = getattr(main, "__wrapped__", main)  # without exit_on_user_error: we record the error
        try:
            with _SignalLog() as log:
                result = main(copy.deepcopy(self.args))
        except UserError as e:
            self._record_failure(env, f"UserError: {e}")
            print(f"error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        except Exception as e:
            self._record_failure(env, f"{type(e).__name__}: {e}")
            raise
        if isinstance(result, dict) and result.get("status") == "preempted" and env is not None \
                and env.cluster != "debug":
            self._after_stop(env, log.received)
        return result

    def _record_failure(self, env, reason):
        """main() marks failures inside its training loop; this covers the ones before it
        (model, data, checkpoint), so run.json tells why the job ended."""
        from util import runs
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
        """Called by submitit on USR2: requeue the same run; main() resumes it from
        checkpoint-last.pth (same output_dir, auto_resume)."""
        return submitit.helpers.DelayedSubmission(Trainer(self.module, self.kind, self.args))

    @staticmethod
    def _after_stop(env, received):
        """main() saved and returned 'preempted'. After USR2 (time limit, preemption, or
        job._interrupt()) run submitit's own handler, which main() had replaced: rank 0 pickles
        checkpoint() and requeues, then exits. After SIGTERM alone, Slurm requeues or cancels
        the job itself. Either way leave no result file: the job is not over."""
        from submitit.core.job_environment import SignalHandler
        usr = env._usr_sig()
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


def _job_environment():
    try:
        return submitit.JobEnvironment()
    except RuntimeError:  # not inside a submitit job (e.g. called directly)
        return None


# ---------------------------------------------------------------- waiting

def _error_line(job, run_dir):
    """The most useful one line about why the job failed: run.json's reason (main and the
    Trainer record it), else an `error: ...` line or the exception in the job's log."""
    from util import runs
    try:
        record = runs.RunRecord.load(run_dir) or {}
    except UserError:
        record = {}
    if record.get("status") == "failed" and record.get("reason"):
        reason = record["reason"]
        return reason[len("UserError: "):] if reason.startswith("UserError: ") else reason
    lines = []
    try:
        if job.paths.stderr.exists():
            lines = job.paths.stderr.read_text(errors="replace").splitlines()
    except OSError:
        pass
    user = [ln for ln in lines if ln.startswith("error: ")]
    if user:
        return user[-1][len("error: "):]
    try:
        exc = job.exception()
    except Exception:  # no result file at all
        exc = None
    if exc is not None:
        found = [ln.strip() for ln in str(exc).splitlines()
                 if re.match(r"^[A-Za-z_.]*(Error|Exception|Interrupt)\b", ln.strip())]
        if found:
            return found[-1]
    tail = [ln for ln in lines if ln.strip()]
    return tail[-1] if tail else "no error message (see the job's logs)"


def wait_for(job, args, run_dir, poll_s=1.0, out=None):
    """Block until the job is over; print its outcome. Returns the exit code (0 = completed)."""
    from util import runs
    out = out or sys.stdout
    if args.cluster == "slurm":
        last, unknown_since = None, None
        while True:
            state = slurm_state(job.job_id) or "UNKNOWN"
            if state != last:
                print(f"job {job.job_id}: {state}", file=out, flush=True)
                last = state
            if state in FINAL_STATES:
                break
            unknown_since = (unknown_since or time.time()) if state == "UNKNOWN" else None
            if unknown_since and time.time() - unknown_since > 120:  # squeue forgot it, no sacct
                break
            time.sleep(poll_s)
    else:  # local: wait for the processes; debug: run it here, now
        try:
            job.results()
            state = "COMPLETED"
        except Exception:
            state = "FAILED"
    record = runs.RunRecord.load(run_dir) or {}
    status = record.get("status")
    if state in ("COMPLETED", "UNKNOWN") and status == "completed":
        best = (record.get("best_metric") or {})
        extra = f" (best {best.get('name')} {best['value']:.4g})" if best.get("value") is not None else ""
        print(f"job {job.job_id} completed: run {run_dir}{extra}", file=out, flush=True)
        return 0
    if status == "preempted":
        print(f"error: job {job.job_id} ended {state} with the run preempted at epoch "
              f"{record.get('epoch')} step {record.get('step')}; submit the same command to resume",
              file=sys.stderr, flush=True)
        return 1
    print(f"error: job {job.job_id} {state}: {_error_line(job, run_dir)} "
          f"(logs: {job.paths.stderr})", file=sys.stderr, flush=True)
    return 1


# ---------------------------------------------------------------- the launcher

def launcher_parser(module):
    parser = module.get_args_parser()
    parser.description = f"Submit {module.__name__}.py with submitit (Slurm, local or debug)"
    return add_slurm_args(parser)


def submit(executor, trainer, run_dir, undo_dirs=()):
    """executor.submit, with sbatch's refusal as one line (and its leftovers removed: its files
    and the folders in `undo_dirs`, deepest first, that are empty again)."""
    import contextlib
    import io
    from submitit.core.utils import FailedJobError, FailedSubmissionError
    folder = os.path.join(run_dir, "slurm")
    before = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):  # submitit prints sbatch's stderr itself
            job = executor.submit(trainer)
    except (FailedJobError, FailedSubmissionError) as e:
        for name in (set(os.listdir(folder)) - before) if os.path.isdir(folder) else ():
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                os.remove(path)
        remove_empty_dirs(([] if before else [folder]) + list(undo_dirs))
        msg = " ".join((str(e) or said.getvalue()).split())
        raise UserError(f"sbatch refused the job: {msg[-400:]}") from None
    sys.stderr.write(said.getvalue())
    return job


@exit_on_user_error
def launch(kind, module_name, argv=None):
    """Parse, check, resolve the run, submit (or print with --dry_run); returns an exit code."""
    from util import runs
    module = importlib.import_module(module_name)
    main_dests = _dests(module.get_args_parser())
    args = parse_args(launcher_parser(module), argv)
    check_launch_flags(args)
    margs = split_args(args, main_dests)
    if hasattr(module, "validate_args"):
        module.validate_args(margs)
    check_data(margs)
    check_checkpoints_fit(module, margs)
    world = args.nodes * args.ngpus
    if args.cluster == "slurm":
        if shutil.which("sbatch") is None and not args.dry_run:
            raise UserError("sbatch is not on PATH (no Slurm here); use --cluster local to run on this machine")
        check_partition(args)
    if margs.optimize_config or margs.storage:  # a search: each trial a job (util/hpo.py)
        from util.hpo import optimize_slurm
        return optimize_slurm(kind, args, margs)

    try:
        run_dir, folder, undo_dirs = resolve_new_run(margs, args, kind, world)
    except runs.RunCompleted as done:
        print(str(done))
        return 0
    busy = active_job(run_dir)
    if busy:
        how = "pass --force to start a fresh run beside it" if not (args.output_dir or args.job_dir) \
            else "cancel it first (scancel)"
        raise UserError(f"run {run_dir} is already queued or running as job {busy[0]} ({busy[1]}); "
                        f"wait for it or {how}")
    name = f"{kind}-{os.path.basename(run_dir)}"
    if args.dry_run:
        print(f"run directory: {run_dir}")
        print(f"job folder: {folder}")
        print(f"world size: {world} ({args.nodes} node(s) x {args.ngpus} task(s))")
        if args.cluster == "slurm":
            print(batch_script(make_executor(args, folder, name, preview=True)))
        else:
            print(f"--cluster {args.cluster}: no batch script; {args.ngpus} process(es) on this machine")
        remove_empty_dirs(undo_dirs)
        return 0

    job = submit(make_executor(args, folder, name), Trainer(module_name, kind, margs), run_dir, undo_dirs)
    os.makedirs(os.path.dirname(_job_record_path(run_dir)), exist_ok=True)
    atomic_write_json(_job_record_path(run_dir), {
        "cluster": args.cluster, "job_id": str(job.job_id), "job_folder": str(job.paths.folder),
        "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": shlex.join(sys.argv),
        "nodes": args.nodes, "tasks_per_node": args.ngpus})
    print(f"submitted job {job.job_id}: run {run_dir}")
    print(f"logs: {job.paths.stdout}  {job.paths.stderr}")
    if args.wait or args.cluster == "debug":
        return wait_for(job, args, run_dir)
    return 0


def run_launcher(kind, module_name):
    """Entry point of submitit_<kind>.py."""
    sys.exit(launch(kind, module_name, sys.argv[1:]))

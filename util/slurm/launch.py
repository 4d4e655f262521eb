"""One launch of submitit_<kind>.py: parse and check everything before queueing
(`check_launch`), then submit the run, or print it with --dry_run (`submit_run`). A search
(--optimize_config) takes the checked launch from the entry point instead (util/hpo/slurm.py)."""
import importlib
import os
import shutil

from util import runs
from util.config import parse_args
from util.errors import UserError
from util.slurm.executor import batch_script, make_executor, submit
from util.slurm.flags import check_launch_flags, launcher_parser, split_args
from util.slurm.inputs import check_inputs
from util.slurm.job import Job
from util.slurm.partition import check_partition
from util.slurm.rundir import record_job, resolve_new_run
from util.slurm.wait import active_job, wait_for
from util.validate import check_cheap


def check_launch(kind, module_name, argv=None):
    """Parse argv and refuse, in one line, what would fail after queueing: the launcher's flags,
    the main script's own checks, its data and checkpoints, and what the partition can give.
    Returns (args, margs): every flag, and the main script's own (util/slurm/flags.split_args)."""
    module = importlib.import_module(module_name)
    args = parse_args(launcher_parser(module), argv)
    check_launch_flags(args)
    margs = split_args(args)
    check_cheap(margs, kind)  # no torch yet: a mistake is one line at once
    module.validate_args(margs)
    check_inputs(module, margs)
    if args.cluster == "slurm":
        if shutil.which("sbatch") is None and not args.dry_run:
            raise UserError("sbatch is not on PATH (no Slurm here); use --cluster local to run on this machine")
        check_partition(args)
    return args, margs


def submit_run(kind, module_name, args, margs):
    """Resolve the run directory, refuse a run that a job works on already, then submit one job
    (or print it with --dry_run); returns the exit code."""
    world = args.nodes * args.ngpus
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
    if args.dry_run:  # where the run and its job would go, and the batch script
        print(f"run directory: {run_dir}")
        print(f"job folder: {folder}")
        print(f"world size: {world} ({args.nodes} node(s) x {args.ngpus} task(s))")
        if args.cluster == "slurm":
            print(batch_script(args, folder, name))
        else:
            print(f"--cluster {args.cluster}: no batch script; {args.ngpus} process(es) on this machine")
        from models.atomic import remove_empty_dirs  # not at import: the cheap checks load no models/
        remove_empty_dirs(undo_dirs)
        return 0
    job = submit(make_executor(args, folder, name), Job(module_name, kind, margs), run_dir, undo_dirs)
    record_job(run_dir, args, job)
    print(f"submitted job {job.job_id}: run {run_dir}")
    print(f"logs: {job.paths.stdout}  {job.paths.stderr}")
    if args.wait or args.cluster == "debug":
        return wait_for(job, args, run_dir)
    return 0

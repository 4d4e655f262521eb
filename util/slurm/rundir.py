"""Where a launch's run lives, resolved before submitting (so a requeued or resubmitted job
finds the same run), and the record of the job last submitted for it (<run_dir>/slurm/job.json)."""
import json
import os
import shlex
import sys
import time

from util import runs
from util.errors import UserError

JOB_RECORD = "job.json"


def resolve_run(margs, args, kind, world_size):
    """(run_dir, job_folder), with margs.output_dir set to the run directory; raises RunCompleted.

    --job_dir (the original scripts' results folder) is the run directory unless --output_dir
    is given, then it holds submitit's files (<job_dir>/%j); by default they go to
    <run_dir>/slurm/%j, so the run and its jobs live in one place.
    """
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
    from models.atomic import missing_dirs  # not at import: the cheap checks load no models/
    made = missing_dirs(margs.output_dir or args.job_dir or
                        os.path.join(margs.runs_root or runs.DEFAULT_ROOT, kind))
    run_dir, folder = resolve_run(margs, args, kind, world_size)
    return run_dir, folder, ([] if os.listdir(run_dir) else [run_dir]) + made


def job_record_path(run_dir):
    return os.path.join(run_dir, "slurm", JOB_RECORD)


def record_job(run_dir, args, job, **what):
    """Write job.json: which job now works on the run (`what`: the command, or the study and
    trial of a search)."""
    if not what:
        what = {"command": shlex.join(sys.argv)}
    os.makedirs(os.path.dirname(job_record_path(run_dir)), exist_ok=True)
    from models.atomic import atomic_write_json
    atomic_write_json(job_record_path(run_dir), {
        "cluster": args.cluster, "job_id": str(job.job_id), "job_folder": str(job.paths.folder),
        "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **what,
        "nodes": args.nodes, "tasks_per_node": args.ngpus})


def recorded_job(run_dir):
    """(cluster, job id) of job.json, or None."""
    try:
        with open(job_record_path(run_dir), encoding="utf-8") as f:
            rec = json.load(f)
        return rec.get("cluster"), str(rec.get("job_id"))
    except (OSError, ValueError):
        return None

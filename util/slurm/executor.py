"""The submitit executor for --cluster (slurm, local, debug), its sbatch settings from the
flags, the batch script --dry_run shows, and a submission whose refusal is one line."""
import contextlib
import io
import os
import shlex
import shutil
import sys

import submitit
from submitit.core.utils import FailedJobError, FailedSubmissionError

from util.errors import UserError
from util.slurm.flags import cpus_per_task, gpus_per_node, mem_gb_per_node, parse_extra

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAX_NUM_TIMEOUT = 30             # requeues after a timeout or preemption (the original's value)


def _pythonpath_line():
    """The job unpickles util.slurm.job.Job: make the suite importable wherever it starts."""
    return f"export PYTHONPATH={shlex.quote(REPO)}${{PYTHONPATH:+:$PYTHONPATH}}"


def slurm_parameters(args, name):
    """sbatch settings (submitit's SlurmExecutor names) from the flags."""
    constraint = "&".join(c for c in ("volta32gb" if args.use_volta32 else "", args.constraint) if c)
    mem_gb = mem_gb_per_node(args)
    params = {
        "job_name": name, "time": args.timeout, "nodes": args.nodes, "ntasks_per_node": args.ngpus,
        "cpus_per_task": cpus_per_task(args),
        "mem": f"{int(mem_gb)}GB" if float(mem_gb).is_integer() else f"{int(mem_gb * 1024)}MB",
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


def make_executor(args, folder, name):
    """submitit executor for --cluster."""
    if args.cluster == "debug":
        return submitit.DebugExecutor(folder)
    if args.cluster == "local":
        import torch
        ex = submitit.LocalExecutor(folder, max_num_timeout=MAX_NUM_TIMEOUT)
        ex.update_parameters(timeout_min=args.timeout, tasks_per_node=args.ngpus, nodes=1,
                             gpus_per_node=min(gpus_per_node(args), torch.cuda.device_count()),
                             signal_delay_s=args.signal_delay_s, setup=[_pythonpath_line()])
        return ex
    return _slurm_executor(submitit.SlurmExecutor, args, folder, name)


def _slurm_executor(cls, args, folder, name):
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
    """A SlurmExecutor that can be made on a machine without srun, only to render the batch
    script (`batch_script`); it never leaves this module."""

    @classmethod
    def affinity(cls):
        return 1


def batch_script(args, folder, name):
    """The sbatch file submitit would write for this job (--dry_run).

    submitit has no public way to render it without submitting: this is the one place that
    uses SlurmExecutor's internals (submitit 1.5.x)."""
    cls = _PreviewSlurmExecutor if shutil.which("srun") is None else submitit.SlurmExecutor
    ex = _slurm_executor(cls, args, folder, name)
    return ex._make_submission_file_text(ex._submitit_command_str, "dry-run")


def submit(executor, job, run_dir, undo_dirs=()):
    """executor.submit, with sbatch's refusal as one line (and its leftovers removed: its files
    and the folders in `undo_dirs`, deepest first, that are empty again)."""
    folder = os.path.join(run_dir, "slurm")
    before = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):  # submitit prints sbatch's stderr itself
            handle = executor.submit(job)
    except (FailedJobError, FailedSubmissionError) as e:
        for name in (set(os.listdir(folder)) - before) if os.path.isdir(folder) else ():
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                os.remove(path)
        from models.atomic import remove_empty_dirs  # not at import: the cheap checks load no models/
        remove_empty_dirs(([] if before else [folder]) + list(undo_dirs))
        msg = " ".join((str(e) or said.getvalue()).split())
        raise UserError(f"sbatch refused the job: {msg[-400:]}") from None
    sys.stderr.write(said.getvalue())
    return handle

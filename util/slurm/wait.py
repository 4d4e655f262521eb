"""A job's state: is one already working on a run, waiting until a job is over (requeues
included), and the one line that says why it failed."""
import os
import re
import shutil
import sys
import time

from util import runs
from util.errors import UserError
from util.slurm.cli import slurm_state
from util.slurm.rundir import recorded_job

ACTIVE_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD",
                 "REQUEUE_FED", "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT",
                 "PREEMPTED"}
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT", "REVOKED"}


def pid_alive(pid):
    try:
        os.kill(int(pid), 0)
        return True
    except (OSError, ValueError):
        return False


def active_job(run_dir):
    """(job id, state) of a job queued or running for this run, else None. Looks at the job we
    recorded at submission and at the Slurm job id in run.json."""
    recorded = recorded_job(run_dir)
    candidates = [recorded] if recorded else []
    record = runs.RunRecord.load(run_dir) or {}
    slurm = record.get("slurm") or {}
    if record.get("status") == "running" and slurm.get("job_id"):
        candidates.append(("slurm", str(slurm["job_id"])))
    for cluster, job_id in candidates:
        if cluster == "local":
            if pid_alive(job_id):
                return job_id, "RUNNING (local)"
        elif cluster == "slurm" and shutil.which("squeue"):
            state = slurm_state(job_id)
            if state in ACTIVE_STATES:
                return job_id, state
    return None


def wait_until_over(cluster, job_id, job=None, poll_s=1.0, stop=None, on_state=None, unknown_s=120.0):
    """Block until the job is over; its last state (UNKNOWN when Slurm forgot it for `unknown_s`
    seconds), or None when `stop` (a threading.Event) was set first. `job`: submitit's handle
    (local and debug jobs are waited for through it; a local job without one by its pid).
    `on_state(state)` hears each new Slurm state."""
    def stopped():
        return stop is not None and stop.is_set()
    if cluster == "slurm":  # squeue/sacct (util/slurm/cli.slurm_state says why not submitit's watcher)
        last, unknown_since = None, None
        while True:
            state = slurm_state(job_id) or "UNKNOWN"
            if on_state is not None and state != last:
                on_state(state)
            last = state
            if state in FINAL_STATES:
                return state
            unknown_since = (unknown_since or time.time()) if state == "UNKNOWN" else None
            if unknown_since and time.time() - unknown_since > unknown_s:  # squeue forgot it, no sacct
                return "UNKNOWN"
            if stopped():
                return None
            time.sleep(poll_s)
    if job is None:  # a local job that another process started
        while pid_alive(job_id):
            if stopped():
                return None
            time.sleep(poll_s)
        return "UNKNOWN"
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


def wait_for(job, args, run_dir, poll_s=1.0, out=None):
    """Block until the job is over; print its outcome. Returns the exit code (0 = completed)."""
    out = out or sys.stdout
    state = wait_until_over(args.cluster, job.job_id, job, poll_s,
                            on_state=lambda s: print(f"job {job.job_id}: {s}", file=out, flush=True))
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
    print(f"error: job {job.job_id} {state}: {error_line(job, run_dir)} "
          f"(logs: {job.paths.stderr})", file=sys.stderr, flush=True)
    return 1


def error_line(job, run_dir):
    """The most useful one line about why the job failed: run.json's reason (main and the
    Job record it), else an `error: ...` line or the exception in the job's log."""
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

"""Asking Slurm's own tools (scontrol, sinfo, squeue, sacct). A tool that is missing, fails or
hangs gives None: the launcher then leaves the decision to sbatch."""
import re
import subprocess


def run(cmd, timeout=30):
    """The finished process, or None when the command could not run or took too long."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None


def partitions():
    """{name: {key: value}} from `scontrol show partition -o`, or None when it cannot be asked."""
    p = run(["scontrol", "show", "partition", "-o"])
    if p is None or p.returncode != 0:
        return None
    out = {}
    for line in p.stdout.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if "PartitionName" in fields:
            out[fields["PartitionName"]] = fields
    return out


def node_resources(partition):
    """(max CPUs, max memory in MB, any GPU gres) over the partition's nodes, from sinfo; None
    if unknown."""
    p = run(["sinfo", "-h", "-p", partition, "-o", "%c|%m|%G"])
    if p is None or p.returncode != 0 or not p.stdout.strip():
        return None
    cpus, mem, gpus = 0, 0, False
    for line in p.stdout.splitlines():
        c, m, g = (line.split("|") + ["", "", ""])[:3]
        cpus = max(cpus, int(re.sub(r"\D", "", c) or 0))
        mem = max(mem, int(re.sub(r"\D", "", m) or 0))
        gpus = gpus or "gpu" in g
    return cpus, mem, gpus


def slurm_state(job_id):
    """The job's state word (PENDING, RUNNING, COMPLETED, ...) from squeue, else sacct; None if
    unknown. squeue first: it answers without accounting (slurmdbd), which sacct and submitit's
    own job watcher need."""
    p = run(["squeue", "-h", "-t", "all", "-j", str(job_id), "-o", "%T"])
    if p is not None and p.returncode == 0 and p.stdout.strip():
        return p.stdout.split()[0]
    p = run(["sacct", "-X", "-n", "-P", "-j", str(job_id), "-o", "State"])
    if p is not None and p.returncode == 0 and p.stdout.strip():
        return p.stdout.split()[0].rstrip("+")
    return None

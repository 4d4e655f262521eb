"""Does the request fit the partition? Checked before queueing, from what Slurm says
(util/slurm/cli.py), so a job that could never start is refused now in one line."""
from util.errors import UserError
from util.slurm import cli
from util.slurm.flags import cpus_per_task, gpus_per_node, mem_gb_per_node


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


def check_partition(args):
    """Refuse what the partition cannot give (nodes, time, CPUs, memory or GPUs per node) before
    queueing. Without --gpus_per_node, a partition whose nodes have no GPUs gets no GPU request.
    `--partition a,b` (Slurm's "any of these") passes when one of them fits. Returns the
    partition names checked, or None when Slurm cannot be asked (then sbatch decides)."""
    parts = cli.partitions()
    if parts is None:
        return None
    if args.partition:  # all of them known to Slurm
        names = [n.strip() for n in args.partition.split(",") if n.strip()]
        unknown = [n for n in names if n not in parts]
        if unknown:
            raise UserError(f"unknown partition {unknown[0]!r}; this cluster has: {', '.join(sorted(parts))}")
    else:  # the cluster's default one
        names = [n for n, f in parts.items() if f.get("Default") == "YES"][:1]
        if not names:
            raise UserError(f"this cluster has no default partition; pass --partition "
                            f"({', '.join(sorted(parts))})")
    resources = {name: cli.node_resources(name) for name in names}  # sinfo, once per partition
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
    per_task = cpus_per_task(args)
    need = args.ngpus * per_task
    if cpus and need > cpus:
        given = f"--cpus_per_task {per_task}" if args.cpus_per_task is not None else \
            f"{per_task} CPUs per task (--num_workers {args.num_workers} + 1)"
        return (f"{args.ngpus} task(s) per node x {given} = {need} CPUs per node, but the nodes of "
                f"partition {name} have {cpus}; lower them")
    mem_gb = mem_gb_per_node(args)
    if mem_mb and mem_gb * 1024 > mem_mb:
        return (f"--mem_gb {mem_gb:g} per node, but the nodes of partition {name} have "
                f"{mem_mb} MB; pass a smaller --mem_gb")
    return None

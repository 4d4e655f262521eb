"""The launcher's own flags and how a launch's flags split into the main script's and ours.

`add_slurm_args` is the one list of the Slurm flags; `SLURM_DESTS` is read off it.
"""
import argparse
import copy

from util.config import flag_dests, str2bool
from util.errors import UserError


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


# The dests of the flags above: what an empty command line gives a parser that has only them
# (argparse has no public list of a parser's actions).
SLURM_DESTS = frozenset(vars(add_slurm_args(argparse.ArgumentParser(add_help=False)).parse_args([])))


def launcher_parser(module):
    parser = module.get_args_parser()
    parser.description = f"Submit {module.__name__}.py with submitit (Slurm, local or debug)"
    return add_slurm_args(parser)


def split_args(args, main_dests=None):
    """The main script's own Namespace (only its flags, as if it had parsed them itself), so its
    signature, config.yaml and run.json are those of a plain run with the same settings.
    `main_dests`: the main script's flags; by default every parsed flag but the launcher's."""
    if main_dests is None:
        main_dests = frozenset(flag_dests(args) or vars(args)) - SLURM_DESTS
    out = copy.copy(args)
    for k in list(vars(out)):
        if k not in main_dests:
            delattr(out, k)
    if flag_dests(out) is not None:
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

"""The launcher's own flags and how a launch's flags split into the main script's and ours.

The Slurm flags are declared in the flag table (util/flags.py, scripts `slurm`) with the others.
"""
import copy

from util import flags
from util.config import flag_dests, set_flag_dests
from util.errors import UserError


# The dests of the launcher's own flags: the flag table's `slurm` flags.
SLURM_DESTS = flags.names(flags.SLURM)


def launcher_parser(module, prog=None):
    """The main script's parser plus the Slurm flags (the original launcher's plus ours); its
    usage line names the launcher (`prog`, by default submitit_<kind>.py for main_<kind>)."""
    parser = module.get_args_parser()
    parser.prog = prog or f"submitit_{module.__name__.rsplit('.', 1)[-1].removeprefix('main_')}.py"
    parser.description = f"Submit {module.__name__}.py with submitit (Slurm, local or debug)"
    flags.add_flags(parser, flags.SLURM, group=parser.add_argument_group("Slurm / submitit (see docs/slurm.md)"))
    return parser


def split_args(args):
    """The main script's own Namespace (without the launcher's flags, as if it had parsed them
    itself), so its signature, config.yaml and run.json are those of a plain run with the same
    settings."""
    out = copy.copy(args)
    for k in SLURM_DESTS & set(vars(out)):
        delattr(out, k)
    if flag_dests(args) is not None:
        set_flag_dests(out, flag_dests(args) - SLURM_DESTS)
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
    """The launcher flags' ranges (the flag table's), then what the chosen cluster allows."""
    msg = flags.first_failure(args, flags.SLURM)
    if msg:
        raise UserError(msg)
    parse_extra(args.slurm_extra)
    if args.cluster == "local" and args.nodes != 1:
        raise UserError(f"--cluster local runs on this one machine: use --nodes 1 (got {args.nodes})")
    if args.cluster == "debug" and args.nodes * args.ngpus != 1:
        raise UserError("--cluster debug runs one process in this one: use --nodes 1 --ngpus 1")


def gpus_per_node(args):
    return args.ngpus if args.gpus_per_node < 0 else args.gpus_per_node


def cpus_per_task(args):
    """--cpus_per_task, or by default what a task runs: its --num_workers loader workers and the
    training process itself."""
    if args.cpus_per_task is not None:
        return args.cpus_per_task
    return max(0, args.num_workers) + 1


def mem_gb_per_node(args):
    return args.mem_gb if args.mem_gb else 40 * args.ngpus

"""FCMAE pre-training on Slurm (or locally) through submitit: every flag of main_pretrain.py plus
the Slurm flags of util/slurm/flags.py (--nodes, --ngpus, --timeout, --partition, ...). See docs/slurm.md.

    python submitit_pretrain.py --nodes 8 --ngpus 8 --model convnextv2_base --batch_size 64 \\
        --blr 1.5e-4 --epochs 1600 --warmup_epochs 40 --data_path /path/to/imagenet-1k \\
        --job_dir /path/to/save_results
"""
import sys

import main_pretrain
from util import slurm
from util.errors import user_errors


def get_args_parser():
    return slurm.launcher_parser(main_pretrain)


@user_errors()
def main(argv=None):
    """Submit one run (or --dry_run), or with --optimize_config a search whose trials are jobs;
    returns the exit code."""
    args, margs = slurm.check_launch("pretrain", "main_pretrain", argv)
    if margs.optimize_config or margs.storage:
        from util.hpo.slurm import optimize_slurm  # torch (util.hpo): after the launch's checks
        return optimize_slurm("pretrain", args, margs)
    return slurm.submit_run("pretrain", "main_pretrain", args, margs)


if __name__ == "__main__":
    sys.exit(main())

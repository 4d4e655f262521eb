"""Fine-tune on Slurm (or locally) through submitit: every flag of main_finetune.py plus the
Slurm flags of util/slurm/flags.py (--nodes, --ngpus, --timeout, --partition, ...). See docs/slurm.md.

    python submitit_finetune.py --nodes 2 --ngpus 8 --model convnextv2_base --batch_size 32 \\
        --finetune /path/to/checkpoint --data_path /path/to/imagenet-1k --job_dir /path/to/save_results
"""
import sys

import main_finetune
from util import slurm
from util.errors import user_errors


def get_args_parser():
    return slurm.launcher_parser(main_finetune)


@user_errors()
def main(argv=None):
    """Submit one run (or --dry_run), or with --optimize_config a search whose trials are jobs;
    returns the exit code."""
    args, margs = slurm.check_launch("finetune", "main_finetune", argv)
    if margs.optimize_config or margs.storage:
        from util.hpo.slurm import optimize_slurm  # torch (util.hpo): after the launch's checks
        return optimize_slurm("finetune", args, margs)
    return slurm.submit_run("finetune", "main_finetune", args, margs)


if __name__ == "__main__":
    sys.exit(main())

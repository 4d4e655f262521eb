"""Fine-tune on Slurm (or locally) through submitit: every flag of main_finetune.py plus the
Slurm flags of util/slurm.py (--nodes, --ngpus, --timeout, --partition, ...). See docs/slurm.md.

    python submitit_finetune.py --nodes 2 --ngpus 8 --model convnextv2_base --batch_size 32 \\
        --finetune /path/to/checkpoint --data_path /path/to/imagenet-1k --job_dir /path/to/save_results
"""
import main_finetune
from util import slurm


def get_args_parser():
    return slurm.launcher_parser(main_finetune)


def main(argv=None):
    """Submit (or --dry_run) and return the exit code."""
    return slurm.launch("finetune", "main_finetune", argv)


if __name__ == "__main__":
    slurm.run_launcher("finetune", "main_finetune")

"""FCMAE pre-training on Slurm (or locally) through submitit: every flag of main_pretrain.py plus
the Slurm flags of util/slurm.py (--nodes, --ngpus, --timeout, --partition, ...). See docs/slurm.md.

    python submitit_pretrain.py --nodes 8 --ngpus 8 --model convnextv2_base --batch_size 64 \\
        --blr 1.5e-4 --epochs 1600 --warmup_epochs 40 --data_path /path/to/imagenet-1k \\
        --job_dir /path/to/save_results
"""
import main_pretrain
from util import slurm


def get_args_parser():
    return slurm.launcher_parser(main_pretrain)


def main(argv=None):
    """Submit (or --dry_run) and return the exit code."""
    return slurm.launch("pretrain", "main_pretrain", argv)


if __name__ == "__main__":
    slurm.run_launcher("pretrain", "main_pretrain")

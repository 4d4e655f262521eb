"""Pretrain a ConvNeXt V2 encoder with FCMAE (masked image modelling), no MinkowskiEngine.

Same code path as fine-tuning: one CPU process, `torchrun`, or Slurm (submitit_pretrain.py).
"""
import functools

from util.config import parse_args
from util.errors import user_errors
from util.flags import build_parser
from util.validate import check_args, check_cheap

# torch, timm and the models are imported inside the functions that need them: a mistyped flag,
# a missing path or a bad config value is one line before any of them is loaded (see __main__).


def get_args_parser():
    """The pretraining flags (util/flags.py holds every flag, its default, range and help)."""
    return build_parser("pretrain", "ConvNeXt V2 FCMAE pretraining")


def validate_args(args):
    """Flag ranges and choices (mask ratio, input size, decoder too), paths, output directory,
    model name (util/validate.py)."""
    check_args(args, "pretrain")


def model_builder(args, nb_classes=None):
    """A function that builds this run's FCMAE (the Slurm launcher's checkpoint check)."""
    from engine_pretrain import build_model
    return functools.partial(build_model, args)


def main(args, epoch_callback=None, record_extra=None, on_run_dir=None):
    """Pretrain. `epoch_callback(epoch, log)` runs after each epoch on every rank (the
    hyperparameter search reports and prunes there); `record_extra`: more fields for run.json;
    `on_run_dir(run_dir)`: told the run directory on every rank once it is chosen. `args` is
    read, never written."""
    from engine_pretrain import PretrainTask  # torch from here on
    from util.run_context import start_process
    from util.trainer import Trainer
    validate_args(args)
    dist = start_process(args)
    trainer = Trainer(args, PretrainTask(args, dist), dist, on_run_dir=on_run_dir)
    if args.preflight:
        return trainer.preflight()
    return trainer.fit(epoch_callback, record_extra)


if __name__ == "__main__":
    with user_errors():
        args = parse_args(get_args_parser())
        if args.optimize_config or args.storage:
            from util.hpo import optimize
            optimize(args, "pretrain")
        else:
            check_cheap(args, "pretrain")  # one line before torch is imported
            main(args)

"""Pretrain a ConvNeXt V2 encoder with FCMAE (masked image modelling), no MinkowskiEngine.

Same code path as fine-tuning: one CPU process, `torchrun`, or Slurm (submitit_pretrain.py).
"""
import functools

from util.config import parse_args
from util.errors import exit_on_user_error
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


@exit_on_user_error
def main(args, epoch_callback=None, record_extra=None, on_run_dir=None):
    """Pretrain. `epoch_callback(epoch, log)` runs after each epoch on every rank (the
    hyperparameter search reports and prunes there); `record_extra`: more fields for run.json;
    `on_run_dir(run_dir)`: told the run directory on every rank once it is chosen. `args` is
    read, never written."""
    from util.trainer import model_errors_as_user_errors  # torch from here on
    return model_errors_as_user_errors(_run)(args, epoch_callback, record_extra, on_run_dir)


def _run(args, epoch_callback, record_extra, on_run_dir):
    """main's work, its torch-importing modules imported now."""
    from engine_pretrain import PretrainTask
    from util.run_context import start_process
    from util.train_loop import train_one_epoch
    from util.trainer import Trainer
    validate_args(args)
    dist = start_process(args)
    task = PretrainTask(args, dist)
    trainer = Trainer(args, task, dist, on_run_dir=on_run_dir)
    if args.preflight:
        return trainer.preflight()
    return trainer.fit(train_one_epoch, epoch_callback, record_extra)


if __name__ == "__main__":
    args = exit_on_user_error(parse_args)(get_args_parser())
    if args.optimize_config or args.storage:
        from util.hpo import optimize
        optimize(args, "pretrain")
    else:
        exit_on_user_error(check_cheap)(args, "pretrain")  # one line before torch is imported
        main(args)

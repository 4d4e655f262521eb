"""Fine-tune a ConvNeXt V2 (or any timm) model for image classification.

The same code runs a single-process CPU debug run, `torchrun --nproc_per_node=N` and Slurm jobs
(submitit_finetune.py); only util/distributed.py knows which.
"""
import functools

from util.config import parse_args
from util.errors import user_errors
from util.flags import build_parser
from util.validate import check_args, check_cheap

# torch, timm and the models are imported inside the functions that need them: a mistyped flag,
# a missing path or a bad config value is one line before any of them is loaded (see __main__).


def get_args_parser():
    """The fine-tuning flags (util/flags.py holds every flag, its default, range and help)."""
    return build_parser("finetune", "ConvNeXt V2 fine-tuning and evaluation")


def validate_args(args):
    """Flag ranges and choices, paths, output directory, model name (util/validate.py)."""
    check_args(args, "finetune")


def model_builder(args, nb_classes):
    """A function that builds this run's model (the Slurm launcher's checkpoint check)."""
    from engine_finetune import build_model
    return functools.partial(build_model, args, nb_classes)


def main(args, epoch_callback=None, record_extra=None, on_run_dir=None):
    """Train (or with --eval only evaluate; with --predict PATH only label PATH's images).
    `epoch_callback(epoch, log)` runs after each epoch on every rank (the hyperparameter search
    reports and prunes there); `record_extra`: more fields for run.json (the search's study and
    trial); `on_run_dir(run_dir)`: told the run directory on every rank once it is chosen. `args`
    is read, never written. Raises UserError for a mistake the user can fix (the script's
    `user_errors()` boundary makes it one line)."""
    from engine_finetune import FinetuneTask, predict  # torch from here on
    from util.run_context import start_process
    from util.trainer import Trainer
    validate_args(args)
    dist = start_process(args)
    if args.predict:  # the checkpoint's classifier over new images: no training set, no run directory
        return predict(args, dist)
    trainer = Trainer(args, FinetuneTask(args, dist), dist, on_run_dir=on_run_dir)
    if args.preflight:
        return trainer.preflight()
    if args.eval:
        return trainer.evaluate()
    return trainer.fit(epoch_callback, record_extra)


if __name__ == "__main__":
    with user_errors():
        args = parse_args(get_args_parser())
        if args.optimize_config or args.storage:
            from util.hpo import optimize
            optimize(args, "finetune")
        else:
            check_cheap(args, "finetune")  # one line before torch is imported
            main(args)

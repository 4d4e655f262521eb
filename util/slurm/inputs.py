"""The main script's inputs checked on the submitting machine before anything is queued: the
dataset's cheap checks (util/data.check_data) and --resume / --finetune against the model."""
from util import data, flags


def check_inputs(module, args):
    """Data, then checkpoints; every mistake is a UserError (one line)."""
    data.check_data(args)
    check_checkpoints_fit(module, args)


def check_checkpoints_fit(module, args):
    """--resume / --finetune fit the model (util/validate.check_checkpoints, shapes only), so a
    wrong file is found now and not after the job waited in the queue. The number of classes
    comes from the dataset's registry entry without reading an image."""
    if not (args.resume or flags.value(args, "finetune")) or not hasattr(module, "model_builder"):
        return
    from util.validate import check_checkpoints
    check_checkpoints(args, module.model_builder(args, data.num_classes(args)))

"""The main script's inputs checked on the submitting machine before anything is queued: the
dataset's cheap checks (util/data.check_data) and --resume / --finetune against the model."""
from util import data


def check_inputs(module, args):
    """Data, then --resume / --finetune against the model (util/validate.check_checkpoints, shapes
    only), so a wrong file is found now and not after the job waited in the queue; every mistake
    is a UserError (one line). The number of classes comes from the dataset's registry entry
    without reading an image."""
    data.check_data(args)
    if args.resume or args.finetune:
        from util.validate import check_checkpoints
        check_checkpoints(args, module.model_builder(args, data.num_classes(args)))

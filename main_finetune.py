"""Fine-tune a ConvNeXt V2 (or any timm) model for image classification.

The same code runs a single-process CPU debug run, `torchrun --nproc_per_node=N` and Slurm jobs
(submitit_finetune.py); only util/distributed.py knows which.
"""
import argparse
import os

import torch

import util.distributed as du
from engine_finetune import evaluate, train_one_epoch
from util.config import parse_args
from util.flags import build_parser
from util.validate import check_args
from util.errors import UserError, exit_on_user_error
from util.train_loop import Amp


def get_args_parser():
    """The fine-tuning flags (util/flags.py holds every flag, its default, range and help)."""
    return build_parser("finetune", "ConvNeXt V2 fine-tuning and evaluation")


def validate_args(args):
    """Flag ranges and choices, paths, output directory, model name (util/validate.py)."""
    check_args(args, "finetune")


def build_mixup(args, nb_classes):
    if not (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None):
        return None
    from timm.data import Mixup
    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                 prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                 label_smoothing=args.smoothing, num_classes=nb_classes)


def build_criterion(args, mixup_fn):
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    if mixup_fn is not None:
        return SoftTargetCrossEntropy()
    if args.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return torch.nn.CrossEntropyLoss()


def load_finetune_weights(args, model):
    """Start from a checkpoint's weights: ours (fine-tune or FCMAE) or an official one into our
    ConvNeXt V2, or a timm model's own checkpoint into it (models.weights.load_into)."""
    from models.weights import load_into
    from util.checkpoint import load_checkpoint
    ckpt = load_checkpoint(args.finetune)
    missing, unexpected = load_into(model, finetune_state_dict(args, ckpt))
    print(f"loaded {args.finetune}: missing keys {missing or 'none'}, unexpected keys {unexpected or 'none'}")
    src = ckpt.get("args", {}) if isinstance(ckpt, dict) else {}
    src = vars(src) if isinstance(src, argparse.Namespace) else src  # official checkpoints
    src = src if isinstance(src, dict) else {}
    return {"finetune_from": os.path.abspath(args.finetune),
            "finetune_from_signature": (ckpt.get("extra") or {}).get("signature") if isinstance(ckpt, dict) else None,
            "finetune_from_model": src.get("model")}


def finetune_state_dict(args, ckpt):
    """The weights in a loaded --finetune checkpoint (--model_key, --model_prefix)."""
    sd = ckpt
    if isinstance(ckpt, dict):
        for key in args.model_key.split("|"):
            if key in ckpt:
                sd = ckpt[key]
                break
    if not isinstance(sd, dict):
        raise UserError(f"--finetune {args.finetune} holds no dict of weights; pass a checkpoint file")
    if args.model_prefix:
        sd = {k[len(args.model_prefix):]: v for k, v in sd.items() if k.startswith(args.model_prefix)}
    return sd


def model_builder(args, nb_classes):
    """A function that builds this run's model (main; the Slurm launcher's checkpoint check)."""
    from models import create_model
    return lambda: create_model(args.model, num_classes=nb_classes, drop_path_rate=args.drop_path,
                                head_init_scale=args.head_init_scale)


@exit_on_user_error
def main(args, epoch_callback=None, record_extra=None):
    """Train (or with --eval only evaluate). `epoch_callback(epoch, log)` runs after each epoch
    on every rank (the hyperparameter search reports and prunes there); `record_extra`: more
    fields for run.json (the search's study and trial)."""
    validate_args(args)
    from util.run_context import (TrainingState, attach_bad_image_log, lr_schedule_for, make_loop, open_run,
                                  place_model, resume_point, run_epochs, start_process)
    info = start_process(args)
    device, world = info.device, info.world_size

    from util.data import build_dataset, build_eval_loader, build_train_loader, check_same_classes
    train_set, nb_classes = build_dataset(True, args)
    val_set = None if args.disable_eval and not args.eval else build_dataset(False, args)[0]
    if val_set is not None:
        check_same_classes(train_set, val_set)
    args.nb_classes = nb_classes
    from models import create_model
    from util.validate import check_inputs

    build_model = model_builder(args, nb_classes)
    check_inputs(args, train_set, world, build_model)

    from util.optim import cosine_schedule, create_optimizer, resolve_lr
    eff_batch = resolve_lr(args, world)
    if not args.preflight:  # a preflight makes no run: it writes nothing
        run_dir, record = open_run(args, "finetune", world)
        attach_bad_image_log(train_set, run_dir, val_set)

    model = build_model()
    extra = {}
    if args.finetune:
        extra = load_finetune_weights(args, model)
    model.to(device)
    model_ema = None
    if args.model_ema:
        from timm.utils import ModelEmaV3
        model_ema = ModelEmaV3(model, decay=args.model_ema_decay,
                               device="cpu" if args.model_ema_force_cpu else None)
    model_without_ddp = model
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"model {args.model}: {n_parameters / 1e6:.2f}M parameters; lr {args.lr:.3e}, "
          f"global batch {eff_batch} ({args.batch_size} x {args.update_freq} x {world})")
    optimizer = create_optimizer(args, model_without_ddp)
    amp = Amp.create(args.use_amp, device)
    model, train_model = place_model(model, args, info)

    train_loader = build_train_loader(train_set, args, world, info.rank)
    val_loader = build_eval_loader(val_set, args, world, info.rank) if val_set is not None else None
    updates_per_epoch, lr_schedule = lr_schedule_for(args, train_loader)
    wd_end = args.weight_decay if args.weight_decay_end is None else args.weight_decay_end
    wd_schedule = cosine_schedule(args.weight_decay, wd_end, args.epochs, updates_per_epoch)
    mixup_fn = build_mixup(args, nb_classes)
    criterion = build_criterion(args, mixup_fn)

    if args.preflight:
        from util.preflight import preflight
        def loss_fn(m, batch):
            samples, targets = mixup_fn(*batch) if mixup_fn is not None else batch
            return criterion(m(samples), targets)
        preflight(args, train_model, loss_fn, train_loader, optimizer, device, amp, updates_per_epoch)
        du.cleanup()
        return None

    tstate = TrainingState(args, model_without_ddp, optimizer, amp.scaler, model_ema)
    tstate.extra.update(extra)
    tstate.extra["signature"] = record.signature
    resume_at = resume_point(args, tstate)

    def evaluate_models():
        """The model, and the EMA with --model_ema_eval (on its own device: --model_ema_force_cpu)."""
        stats = evaluate(val_loader, model, device, amp, reduce=args.dist_eval, channels_last=args.channels_last)
        if model_ema is not None and args.model_ema_eval:
            ema_device = next(model_ema.module.parameters()).device
            ema = evaluate(val_loader, model_ema.module, ema_device, amp if ema_device == device else None,
                           reduce=args.dist_eval, channels_last=args.channels_last)
            stats.update({f"{k}_ema": v for k, v in ema.items()})
        return stats

    if args.eval:
        stats = evaluate_models()
        stats.update(_bad_images(train_set, args, val_set))
        print(f"Accuracy of the network on the {stats['n']} test images: {stats['acc1']:.2f}%")
        if "acc1_ema" in stats:
            print(f"Accuracy of the EMA model: {stats['acc1_ema']:.2f}%")
        if du.is_main_process():
            from util.atomic import atomic_write_json
            atomic_write_json(os.path.join(run_dir, "eval.json"), stats)
        du.cleanup()
        return stats

    loop = make_loop(args, run_dir, record, tstate, amp, updates_per_epoch, lr_schedule, wd_schedule,
                     info.rank, world, resume_at, model_ema)
    if hasattr(train_set, "bad_log"):  # stop at the log line after too many unreadable images
        loop.checks = lambda: _bad_images(train_set, args, val_set)
    record.start(resumed=resume_at[2] is not None, start_epoch=resume_at[0], start_step=resume_at[1],
                 n_parameters=n_parameters, **{**extra, **(record_extra or {})})

    def train_fn(epoch, step0):
        return train_one_epoch(train_model, criterion, train_loader, optimizer, device, epoch, loop,
                               mixup_fn=mixup_fn, start_step=step0)

    def eval_fn(epoch):
        if val_loader is None:
            return None
        return {f"test_{k}": v for k, v in evaluate_models().items()}

    best_name = "test_acc1_ema" if (args.model_ema and args.model_ema_eval) else "test_acc1"
    result = run_epochs(args, run_dir, record, tstate, loop, train_loader, resume_at, train_fn, eval_fn,
                        best_name=best_name, epoch_callback=epoch_callback,
                        epoch_extra=lambda: {"n_parameters": n_parameters,
                                             **_bad_images(train_set, args, val_set)})
    du.cleanup()
    return result


def _bad_images(train_set, args, val_set=None):
    """{"bad_images": distinct unreadable images met (train and val), "bad_val_images": of which
    validation (with a validation set)}, the highest counts of any rank, so all ranks stop
    together; more than --max_bad_images stops the run with the list. Called at each log line
    and at the end of each epoch (after evaluation)."""
    log = getattr(train_set, "bad_log", None)
    if log is None:
        return {"bad_images": 0}
    found = log.found()  # (split, path) pairs: each epoch meets a bad file again
    n_val = sum(split == "val" for split, _ in found)
    count, n_val = (max(c) for c in zip(*du.all_gather_object((len(found), n_val))))
    if count > args.max_bad_images:
        paths = [p + (" (validation)" if split == "val" else "") for split, p in found]
        more = f" and {len(paths) - 5} more" if len(paths) > 5 else ""
        raise UserError(f"{count} unreadable images (more than --max_bad_images {args.max_bad_images}): "
                        f"{', '.join(paths[:5])}{more}; full list in {log.path}; fix or remove them")
    return {"bad_images": count, **({"bad_val_images": n_val} if hasattr(val_set, "bad_log") else {})}


if __name__ == "__main__":
    args = exit_on_user_error(parse_args)(get_args_parser())
    if args.optimize_config or args.storage:
        from util.hpo import optimize
        optimize(args, "finetune")
    else:
        main(args)

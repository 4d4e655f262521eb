"""Pretrain a ConvNeXt V2 encoder with FCMAE (masked image modelling), no MinkowskiEngine.

Same code path as fine-tuning: one CPU process, `torchrun`, or Slurm (submitit_pretrain.py).
"""
import argparse

import torch

import util.distributed as du
from engine_pretrain import reconstruction_grid, train_one_epoch
from main_finetune import _bad_images
from util.config import parse_args
from util.flags import build_parser
from util.validate import check_args
from util.errors import UserError, exit_on_user_error
from util.train_loop import Amp


def get_args_parser():
    """The pretraining flags (util/flags.py holds every flag, its default, range and help)."""
    return build_parser("pretrain", "ConvNeXt V2 FCMAE pretraining")


def validate_args(args):
    """Flag ranges and choices (mask ratio, input size, decoder too), paths, output directory,
    model name (util/validate.py)."""
    check_args(args, "pretrain")


def model_builder(args, nb_classes=None):
    """A function that builds this run's FCMAE (main; the Slurm launcher's checkpoint check)."""
    from models import create_fcmae
    return lambda: create_fcmae(args.model, mask_ratio=args.mask_ratio, decoder_depth=args.decoder_depth,
                                decoder_embed_dim=args.decoder_embed_dim, norm_pix_loss=args.norm_pix_loss,
                                img_size=args.input_size)


@exit_on_user_error
def main(args, epoch_callback=None, record_extra=None):
    """Pretrain. `epoch_callback(epoch, log)` runs after each epoch on every rank (the
    hyperparameter search reports and prunes there); `record_extra`: more fields for run.json."""
    validate_args(args)
    from models import create_fcmae
    from util.run_context import (TrainingState, attach_bad_image_log, lr_schedule_for, make_loop, open_run,
                                  place_model, resume_point, run_epochs, start_process)
    info = start_process(args)
    device, world = info.device, info.world_size

    from util.data import build_dataset, build_pretrain_transform, build_train_loader, mean_std
    train_set, _ = build_dataset(True, args, transform=build_pretrain_transform(args))
    from util.validate import check_inputs

    build_model = model_builder(args)
    check_inputs(args, train_set, world, build_model)
    from util.optim import create_optimizer, resolve_lr
    eff_batch = resolve_lr(args, world)
    if not args.preflight:  # a preflight makes no run: it writes nothing
        run_dir, record = open_run(args, "pretrain", world)
        attach_bad_image_log(train_set, run_dir)

    model = build_model()
    model.to(device)
    model_without_ddp = model
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"FCMAE {args.model}: {n_parameters / 1e6:.2f}M parameters; lr {args.lr:.3e}, "
          f"global batch {eff_batch} ({args.batch_size} x {args.update_freq} x {world})")
    optimizer = create_optimizer(args, model_without_ddp, betas=(0.9, 0.95))
    amp = Amp.create(args.use_amp, device)
    model, train_model = place_model(model, args, info)

    train_loader = build_train_loader(train_set, args, world, info.rank)
    updates_per_epoch, lr_schedule = lr_schedule_for(args, train_loader)
    if args.preflight:
        from util.preflight import preflight
        preflight(args, train_model, lambda m, b: m(b[0], mask_ratio=args.mask_ratio)[0], train_loader,
                  optimizer, device, amp, updates_per_epoch)
        du.cleanup()
        return None

    tstate = TrainingState(args, model_without_ddp, optimizer, amp.scaler)
    tstate.extra["signature"] = record.signature
    resume_at = resume_point(args, tstate)

    loop = make_loop(args, run_dir, record, tstate, amp, updates_per_epoch, lr_schedule, None,
                     info.rank, world, resume_at)
    if hasattr(train_set, "bad_log"):  # stop at the log line after too many unreadable images
        loop.checks = lambda: _bad_images(train_set, args)
    record.start(resumed=resume_at[2] is not None, start_epoch=resume_at[0], start_step=resume_at[1],
                 n_parameters=n_parameters, **(record_extra or {}))
    vis_images = None
    if du.is_main_process() and args.vis_freq > 0:
        vis_set, _ = build_dataset(True, args, transform=_vis_transform(args))
        vis_images = torch.stack([vis_set[i][0] for i in range(min(8, len(vis_set)))]).to(device)

    def train_fn(epoch, step0):
        return train_one_epoch(train_model, train_loader, optimizer, device, epoch, loop, args.mask_ratio,
                               start_step=step0)

    def eval_fn(epoch):
        if vis_images is not None and (epoch % args.vis_freq == 0 or epoch + 1 == args.epochs):
            with Amp.autocast(amp):
                grid = reconstruction_grid(model_without_ddp, vis_images, *mean_std(args), args.mask_ratio)
            loop.tb.image("reconstruction (original / masked / reconstructed)", grid, epoch)
        return None

    result = run_epochs(args, run_dir, record, tstate, loop, train_loader, resume_at, train_fn, eval_fn,
                        best_name="train_loss", lower_is_better=True, epoch_callback=epoch_callback,
                        epoch_extra=lambda: {"n_parameters": n_parameters,
                                             **_bad_images(train_set, args)})
    du.cleanup()
    return result


def _vis_transform(args):
    from torchvision import transforms
    from util.data import mean_std
    mean, std = mean_std(args)
    return transforms.Compose([transforms.Resize(args.input_size), transforms.CenterCrop(args.input_size),
                               transforms.ToTensor(), transforms.Normalize(mean, std)])


if __name__ == "__main__":
    args = exit_on_user_error(parse_args)(get_args_parser())
    if args.optimize_config or args.storage:
        from util.hpo import optimize
        optimize(args, "pretrain")
    else:
        main(args)

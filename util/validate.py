"""Checks both scripts run before any compute: every mistake a user can make in a launch ends
here with one line (UserError), before the model is built, a run directory is marked or a GPU
hour is spent.

`check_args(args, kind)`: flag values in range, paths that exist and can be read, an output
directory that can be written, a known model and, for `--resume` / `--finetune`, a file that
loads as data. `check_inputs(args, train_set, world_size, model_fn)`: needs the dataset (and
the launch's world size): the batch fits the dataset, and a checkpoint to resume or fine-tune
from fits the model, checked on a shape-only (meta device) copy of it.
"""
import errno
import os
import tempfile
import warnings

from util.errors import UserError


def _ranges(args, kind):
    """(ok, message) for every flag with a range; messages name the flag and a valid value."""
    g = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    checks = [
        (args.batch_size >= 1, f"--batch_size {args.batch_size} must be >= 1"),
        (args.update_freq >= 1, f"--update_freq {args.update_freq} must be >= 1"),
        (args.epochs >= 1, f"--epochs {args.epochs} must be >= 1"),
        (0 <= args.start_epoch < args.epochs, f"--start_epoch {args.start_epoch} must be in [0, --epochs)"),
        (args.lr is None or args.lr >= 0, f"--lr {args.lr} must be >= 0"),
        (args.blr >= 0, f"--blr {args.blr} must be >= 0"),
        (args.min_lr >= 0, f"--min_lr {args.min_lr} must be >= 0"),
        (args.weight_decay >= 0, f"--weight_decay {args.weight_decay} must be >= 0"),
        (args.warmup_epochs >= 0, f"--warmup_epochs {args.warmup_epochs} must be >= 0"),
        (args.clip_grad is None or args.clip_grad > 0, f"--clip_grad {args.clip_grad} must be > 0 (or left out)"),
        (args.num_workers >= 0, f"--num_workers {args.num_workers} must be >= 0"),
        (args.print_freq >= 1, f"--print_freq {args.print_freq} must be >= 1"),
        (args.save_ckpt_freq >= 1, f"--save_ckpt_freq {args.save_ckpt_freq} must be >= 1"),
        (args.save_ckpt_num >= 1, f"--save_ckpt_num {args.save_ckpt_num} must be >= 1"),
        (args.save_ckpt_minutes >= 0, f"--save_ckpt_minutes {args.save_ckpt_minutes} must be >= 0 (0: off)"),
        (args.max_bad_images >= 0, f"--max_bad_images {args.max_bad_images} must be >= 0"),
        (args.skip_nonfinite >= 0, f"--skip_nonfinite {args.skip_nonfinite} must be >= 0"),
        (args.dist_timeout > 0, f"--dist_timeout {args.dist_timeout} must be > 0 seconds"),
        (args.synthetic_train_samples >= 1 and args.synthetic_val_samples >= 1,
         "--synthetic_train_samples and --synthetic_val_samples must be >= 1"),
        (2 <= args.synthetic_classes <= 10, f"--synthetic_classes {args.synthetic_classes} must be between 2 and 10"),
        (g("crop_pct") is None or 0 < args.crop_pct <= 1, f"--crop_pct {g('crop_pct')} must be in (0, 1]"),
    ]
    if kind == "finetune":
        mixing = args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None
        checks += [
            (args.input_size >= 16, f"--input_size {args.input_size} must be >= 16"),
            (0 <= args.drop_path < 1, f"--drop_path {args.drop_path} must be in [0, 1), e.g. 0.1"),
            (0 < args.layer_decay <= 1, f"--layer_decay {args.layer_decay} must be in (0, 1]"),
            (0 <= args.smoothing < 1, f"--smoothing {args.smoothing} must be in [0, 1)"),
            (0 <= args.reprob <= 1, f"--reprob {args.reprob} must be in [0, 1]"),
            (args.recount >= 1, f"--recount {args.recount} must be >= 1 (random-erase regions per image)"),
            (args.color_jitter is None or args.color_jitter >= 0,
             f"--color_jitter {args.color_jitter} must be >= 0 (or left out)"),
            (_min_max_ok(args.scale, 0, 1), f"--scale {_show(args.scale)} must be MIN MAX with "
                                            "0 < MIN <= MAX <= 1 (fractions of the image area), e.g. 0.08 1.0"),
            (g("ratio") is None or _min_max_ok(args.ratio, 0, None),
             f"--ratio {_show(g('ratio'))} must be MIN MAX with 0 < MIN <= MAX, e.g. 0.75 1.3333"),
            (args.mixup >= 0 and args.cutmix >= 0, "--mixup and --cutmix must be >= 0"),
            (0 <= args.mixup_prob <= 1, f"--mixup_prob {args.mixup_prob} must be in [0, 1]"),
            (0 <= args.mixup_switch_prob <= 1, f"--mixup_switch_prob {args.mixup_switch_prob} must be in [0, 1]"),
            (_cutmix_minmax_error(args) is None, f"--cutmix_minmax {_show(args.cutmix_minmax)} "
                                                 f"{_cutmix_minmax_error(args)}"),
            (not mixing or args.eval or args.batch_size % 2 == 0,
             f"--batch_size {args.batch_size} must be even with --mixup/--cutmix (timm's Mixup mixes the "
             f"batch with its reverse), e.g. {args.batch_size + 1}"),
            (0 <= args.model_ema_decay < 1, f"--model_ema_decay {args.model_ema_decay} must be in [0, 1)"),
            (args.weight_decay_end is None or args.weight_decay_end >= 0, "--weight_decay_end must be >= 0"),
            (args.opt_eps is None or args.opt_eps >= 0, f"--opt_eps {args.opt_eps} must be >= 0"),
            (args.opt_betas is None or (len(args.opt_betas) == 2 and all(0 <= b < 1 for b in args.opt_betas)),
             f"--opt_betas {_show(args.opt_betas)} must be two values in [0, 1), e.g. 0.9 0.999"),
            (args.momentum >= 0, f"--momentum {args.momentum} must be >= 0"),
        ]
    return checks


def _show(values):
    return " ".join(str(v) for v in values) if isinstance(values, (list, tuple)) else str(values)


def _min_max_ok(pair, low, high):
    """A (MIN, MAX) pair with low < MIN <= MAX (<= high when high is given)."""
    return (isinstance(pair, (list, tuple)) and len(pair) == 2 and low < pair[0] <= pair[1]
            and (high is None or pair[1] <= high))


def _cutmix_minmax_error(args):
    """None, or what is wrong with --cutmix_minmax (timm draws the box side between MIN and MAX
    times the image side, rounded down, and needs MIN < MAX after rounding)."""
    mm = args.cutmix_minmax
    if mm is None:
        return None
    if len(mm) != 2:
        return "needs two values, MIN MAX (box side as a fraction of the image side), e.g. 0.2 0.8"
    if not 0 <= mm[0] < mm[1] <= 1:
        return "must be MIN MAX with 0 <= MIN < MAX <= 1, e.g. 0.2 0.8"
    if int(args.input_size * mm[0]) >= int(args.input_size * mm[1]):
        return (f"gives no range of box sides at --input_size {args.input_size} "
                f"({int(args.input_size * mm[0])} to {int(args.input_size * mm[1])} px); widen it, e.g. 0.2 0.8")
    return None


# Choices of flags that take a name: timm accepts only these (or fails with an AssertionError or
# KeyError deep inside, or, for Mixup's mode, silently uses "batch").
INTERPOLATIONS = ("random", "bicubic", "bilinear", "nearest", "box", "hamming", "lanczos")  # timm's train crop
REMODES = ("pixel", "rand", "const")  # timm's RandomErasing (case-insensitive there)
MIXUP_MODES = ("batch", "pair", "elem")  # timm's Mixup
DEVICES = "auto, cpu, cuda, cuda:N or mps"  # util/distributed.resolve_device


def _choices(args, kind):
    """(ok, message) for every flag that names one of a set: each message names the flag and
    the valid values. Callables are evaluated only when the cheaper checks before them passed."""
    checks = [
        (_device_ok(args.device), f"--device {args.device!r} is not a device; use {DEVICES}"),
    ]
    if kind == "finetune":
        checks += [
            (args.train_interpolation in INTERPOLATIONS,
             f"--train_interpolation {args.train_interpolation!r} is unknown; use one of "
             f"{', '.join(INTERPOLATIONS)}"),
            (str(args.remode).lower() in REMODES,
             f"--remode {args.remode!r} is unknown; use one of {', '.join(REMODES)}"),
            (args.mixup_mode in MIXUP_MODES, f"--mixup_mode {args.mixup_mode!r} is unknown; use one of "
                                             f"{', '.join(MIXUP_MODES)}"),
            (lambda: _opt_error(args.opt)),
            (lambda: _aa_error(args)),
        ]
    return checks


def _device_ok(name):
    import re
    return name in (None, "", "auto", "cpu", "cuda", "mps") or re.fullmatch(r"cuda:\d+", str(name)) is not None


def _opt_error(name):
    """None, or the message for an --opt that timm's optimizer factory does not know (it splits
    the name at '_' and takes the last part; a first part other than 'lookahead' is ignored)."""
    from timm.optim import list_optimizers
    known = list_optimizers()
    parts = str(name).lower().split("_")
    if parts[-1] in known and (len(parts) == 1 or parts[:-1] == ["lookahead"]):
        return None
    import difflib
    close = difflib.get_close_matches(parts[-1], known, n=3)
    hint = f"did you mean {', '.join(close)}?" if close else "e.g. adamw"
    return f"--opt {name!r} is not an optimizer timm knows ({hint}; lookahead_<name> adds Lookahead)"


def _aa_error(args):
    """None, or the message for an --aa policy that timm's parsers refuse. Parses it as
    timm.data.create_transform would (RandAugment, AugMix or AutoAugment by its prefix)."""
    aa = args.aa
    if aa in (None, "", "none", "None"):
        return None
    from timm.data.auto_augment import (augment_and_mix_transform, auto_augment_transform,
                                        rand_augment_transform)
    hparams = {"translate_const": 100, "img_mean": (124, 116, 104)}
    try:
        if aa.startswith("rand"):
            rand_augment_transform(aa, hparams)
        elif aa.startswith("augmix"):
            augment_and_mix_transform(aa, dict(hparams, translate_pct=0.3))
        else:
            auto_augment_transform(aa, hparams)
    except (AssertionError, ValueError, KeyError, IndexError, TypeError) as e:
        why = f" ({e})" if str(e) else ""
        return (f"--aa {aa!r} is not a timm augmentation policy{why}; use e.g. rand-m9-mstd0.5-inc1 "
                "(RandAugment), augmix-m5-w3, original, v0, 3a, or none")
    return None


def _check_train_transform(args):
    """Build the fine-tuning train transform once, as the dataset will: any other combination
    timm refuses ends here, before anything is written, naming the flags that shape it."""
    from util.data import build_transform
    try:
        with warnings.catch_warnings():  # the real build (data loading) warns once, not here
            warnings.simplefilter("ignore")
            build_transform(True, args)
    except (AssertionError, ValueError, KeyError, IndexError, TypeError) as e:
        raise UserError(f"timm cannot build the training transform from these flags ({type(e).__name__}: "
                        f"{e}); check --aa, --color_jitter, --scale, --train_interpolation, --reprob, "
                        "--remode and --recount") from None


def _failed(checks):
    """The message of the first failing check, or None. An entry is (ok, message) or a callable
    returning None (fine) or the message."""
    for check in checks:
        msg = check() if callable(check) else (None if check[0] else check[1])
        if msg:
            return msg
    return None


def check_args(args, kind):
    """Everything that can be checked from the flags and the file system alone."""
    msg = _failed(_ranges(args, kind)) or _failed(_choices(args, kind))
    if msg:
        raise UserError(msg)
    if kind == "finetune":
        _check_train_transform(args)
    check_model_name(args.model, kind)
    if args.data_set != "synthetic" and args.data_path:
        _readable_dir(args.data_path, "--data_path")
    if getattr(args, "eval_data_path", None):
        _readable_dir(args.eval_data_path, "--eval_data_path")
    for flag in ("resume", "finetune"):
        path = getattr(args, flag, "")
        if path:
            _readable_file(path, f"--{flag}")
    if getattr(args, "eval", False) and not (args.resume or getattr(args, "finetune", "")):
        raise UserError("--eval True needs --resume or --finetune to know which weights to evaluate")
    check_writable(args.output_dir or os.path.join(args.runs_root or "runs", kind),
                   "--output_dir" if args.output_dir else "--runs_root")
    if args.log_dir:  # TensorBoard events go there, not into the run folder
        check_writable(args.log_dir, "--log_dir")


def check_model_name(name, kind):
    """Unknown names end with the close matches (models.create_model's message)."""
    from models import create_fcmae, create_model, model_names
    if name in model_names():
        return
    if kind == "pretrain":
        create_fcmae(name)  # FCMAE needs one of ours: raises with the close names
    import timm
    if not timm.is_model(name):
        create_model(name)  # raises with the close names


def _readable_dir(path, flag):
    if not os.path.isdir(path):
        raise UserError(f"{flag} {path}: no such directory")
    try:
        os.listdir(path)
    except OSError as e:
        raise UserError(f"{flag} {path} cannot be read ({e.strerror}); check its permissions") from None


def _readable_file(path, flag):
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path}: no such file; give the path of a .pth checkpoint")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise UserError(f"{flag} {path} cannot be read ({e.strerror}); check its permissions") from None


def check_writable(folder, flag):
    """Probe the folder, or where it would be created (its nearest existing parent), with a
    temporary file: permissions, a file in the way or a read-only file system show up now, not
    at the first checkpoint. Creates no folder, so a refused run leaves nothing behind and
    processes starting side by side (search workers) cannot race on it."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    try:
        if not os.path.isdir(existing):
            raise NotADirectoryError(errno.ENOTDIR, f"{existing} is not a folder")
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{flag} {folder} is not a writable directory ({e.strerror or e}); "
                        "choose another one") from None


def check_inputs(args, train_set, world_size, model_fn):
    """Checks that need the dataset: the batch fits it, and --resume / --finetune fit the model
    that `model_fn()` builds (called on the meta device: shapes only, no memory, no init)."""
    n, global_batch = len(train_set), args.batch_size * world_size
    if n < global_batch:
        raise UserError(f"the training set has {n} images, fewer than one global batch "
                        f"({args.batch_size} x {world_size} processes); lower --batch_size")
    if n // global_batch < args.update_freq:
        raise UserError(f"one epoch has {n // global_batch} batches, fewer than --update_freq "
                        f"{args.update_freq}; lower --update_freq or --batch_size")
    if args.resume or getattr(args, "finetune", ""):
        check_checkpoints(args, model_fn)


def check_checkpoints(args, model_fn):
    import torch

    from util.checkpoint import check_state_dict_matches, load_checkpoint
    try:
        with torch.device("meta"):
            model = model_fn()
    except UserError:
        raise
    except Exception:  # a model that cannot be built shape-only: the real load checks it later
        model = None
    if args.resume:
        ckpt = load_checkpoint(args.resume, mmap=True)
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
            raise UserError(f"--resume {args.resume} is not a checkpoint of this suite (no 'model' "
                            "entry); to start from other weights use --finetune")
        if model is not None:
            check_state_dict_matches(model, ckpt["model"], f"--resume {args.resume}")
    if getattr(args, "finetune", ""):
        ckpt = load_checkpoint(args.finetune, mmap=True)
        if model is not None:
            from main_finetune import finetune_state_dict
            from models.weights import fit
            sd = finetune_state_dict(args, ckpt)
            with warnings.catch_warnings():  # the real load warns about a dropped head once
                warnings.simplefilter("ignore")
                try:
                    fit(model, sd)  # converts for our ConvNeXt V2 only, as the real load
                except UserError as e:
                    raise UserError(f"--finetune {args.finetune}: {e}") from None

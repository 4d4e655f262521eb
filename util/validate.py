"""Checks both scripts run before any compute: every mistake a user can make in a launch ends
here with one line (UserError), before the model is built, a run directory is marked or a GPU
hour is spent.

`check_args(args, kind)`: flag values in range (the checks of the flag table, util/flags.py),
paths that exist and can be read, an output directory that can be written, a known model and,
for `--resume` / `--finetune`, a file that loads as data. Its first part, `check_cheap`, imports no torch, timm or model (this module
imports them only inside the functions that need them), so the entry points run it before they
import those. `check_inputs(args, train_set, world_size, model_fn)`: needs the dataset (and
the launch's world size): one global batch and --update_freq batches fit the dataset (the one
place these are checked), and a checkpoint to resume or fine-tune
from fits the model, checked on a shape-only (meta device) copy of it.
"""
import errno
import os
import tempfile
import warnings

from util.errors import UserError
from util.data import check_paths
from util.data.base import readable_file
from util.flags import first_failure


def check_args(args, kind):
    """Everything that can be checked from the flags and the file system alone: the cheap checks
    first, then those that import torch, timm or the models."""
    check_cheap(args, kind)
    msg = first_failure(args, kind, needs_torch=True)  # e.g. --opt, --aa: names timm knows
    if msg:
        raise UserError(msg)
    if kind == "finetune":  # the train transform built once, as the dataset will: what timm refuses ends here
        from util.data import build_transform
        try:
            with warnings.catch_warnings():  # the real build (data loading) warns once, not here
                warnings.simplefilter("ignore")
                build_transform(True, args)
        except (AssertionError, ValueError, KeyError, IndexError, TypeError) as e:
            raise UserError(f"timm cannot build the training transform from these flags ({type(e).__name__}: "
                            f"{e}); check --aa, --color_jitter, --scale, --train_interpolation, --reprob, "
                            "--remode and --recount") from None
    check_model_name(args.model, kind)


def check_cheap(args, kind):
    """The checks that import no torch, timm or model (the entry points run them before importing
    those, so a mistake is one line at once): the flag table's ranges and choices, paths, and
    writable folders."""
    msg = first_failure(args, kind, needs_torch=False)
    if msg:
        raise UserError(msg)
    check_paths(args)  # --data_path / --eval_data_path: folders, or files for --data_set csv
    for flag, path in (("--resume", args.resume), ("--finetune", args.finetune)):
        if path and not (flag == "--finetune" and os.path.isdir(path)):  # a Hugging Face folder
            readable_file(path, flag, "give the path of a .pth checkpoint")
    if args.eval and not (args.resume or args.finetune):
        raise UserError("--eval True needs --resume or --finetune to know which weights to evaluate")
    if args.predict:  # predictions.csv goes into --output_dir or next to the checkpoint: nothing else is written
        if not args.resume or args.eval:
            raise UserError("--predict needs --resume CKPT, a checkpoint a fine-tuning run wrote (its settings name "
                            "the model, classes and image size), and no --eval True")
        if not os.path.exists(args.predict) and not any(c in args.predict for c in "*?["):  # a pattern: util/predict
            raise UserError(f"--predict {args.predict}: no such file or folder; give a folder of images, a CSV "
                            "file with a path column, or .tar shards")
        check_writable(args.output_dir or os.path.dirname(args.resume) or ".",
                       "--output_dir" if args.output_dir else "the --resume folder")
    else:
        check_writable(args.output_dir or os.path.join(args.runs_root or "runs", kind),
                       "--output_dir" if args.output_dir else "--runs_root")
    if args.log_dir:  # TensorBoard events go there, not into the run folder
        check_writable(args.log_dir, "--log_dir")
    check_trackers(args)


def check_trackers(args):
    """--log_wandb and --mlflow_uri: the package is installed (looked up, not imported: a plain run
    imports neither), and online W&B has a login (read from WANDB_API_KEY or ~/.netrc, checked with
    no network). What only starting them tells (a URI MLflow cannot open, a server that refuses)
    stops the run before its first step (util/tracking.start_trackers)."""
    import importlib.util
    for on, package, flag in ((args.log_wandb, "wandb", "--log_wandb"), (args.mlflow_uri, "mlflow", "--mlflow_uri")):
        try:
            found = on and importlib.util.find_spec(package) is not None
        except (ImportError, ValueError):  # a package present but broken
            found = False
        if on and not found:
            pip = "mlflow-skinny" if package == "mlflow" else package
            raise UserError(f"{flag} needs the {package} package: pip install {pip}")
    mode = os.environ.get("WANDB_MODE", "online").lower()
    if args.log_wandb and mode not in ("offline", "disabled", "dryrun"):
        import wandb
        if not wandb.login(verify=False, prompt=False):
            raise UserError("--log_wandb: no W&B login; run `wandb login` (or set WANDB_API_KEY), or set "
                            "WANDB_MODE=offline to log to local files and `wandb sync` them later")


def check_model_name(name, kind):
    """Unknown names end with the close matches (models.create_model's message)."""
    from models import ModelError, create_fcmae, create_model, model_names
    if name in model_names():
        return
    try:
        if kind == "pretrain":
            create_fcmae(name)  # FCMAE needs one of ours: raises with the close names
        import timm
        if not timm.is_model(name):
            create_model(name)  # raises with the close names
    except ModelError as e:
        raise UserError(str(e)) from None


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
    if args.resume or args.finetune:
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
        if not args.eval and "epoch" not in ckpt:  # e.g. `convert --to ours` output, an average of such
            raise UserError(f"--resume {args.resume} holds weights but no training state (no epoch); "
                            f"start a run from it with --finetune {args.resume}, or evaluate it with --eval True")
    if args.finetune:
        from models.errors import ModelError
        from models.weights import explain, fit, fit_fcmae, is_fcmae, read_folder_or_safetensors, select_state_dict
        try:  # a Hugging Face folder or a safetensors file; else a torch file
            ckpt = read_folder_or_safetensors(args.finetune)
        except ModelError as e:
            raise UserError(f"--finetune {args.finetune}: {e}") from None
        ckpt = load_checkpoint(args.finetune, mmap=True) if ckpt is None else ckpt
        if model is not None:
            with warnings.catch_warnings():  # the real load warns about a dropped head once
                warnings.simplefilter("ignore")
                try:  # converts for our ConvNeXt V2 only, as the real load; pretraining: its encoder
                    (fit_fcmae if is_fcmae(model) else fit)(
                        model, select_state_dict(ckpt, args.model_key, args.model_prefix))
                except ModelError as e:
                    raise UserError(f"--finetune {args.finetune}: {explain(e, '--model')}") from None

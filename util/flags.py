"""The flag table: every command-line flag of the suite, declared once.

A flag's name, type, default, help, range or choices and its *role* live here, and everything
else derives from this table: the parsers of main_finetune.py, main_pretrain.py and the Slurm
launchers (`add_flags`), the range and choice checks (`checks`, run by util/validate.py), what
config.yaml leaves out (`per_launch`), what the run signature and a search space leave out
(`not_outcome`), what a study's command line refuses (`study_refusals`) and the table of checks
in docs/errors.md (`python scripts/flag_docs.py` writes it). Names, defaults and meanings of the
original ConvNeXt V2 flags are kept (see docs/runs.md for the few differences).

Roles:
- OUTCOME: changes what a run computes: part of the run signature, saved in config.yaml,
  searchable.
- SETTING: how a run goes, not what it computes (workers, logging, checkpoint cadence, speed):
  saved in config.yaml, left out of the signature, not searchable.
- LAUNCH: one launch only (where the run lives, resume, evaluate, preflight): left out of
  config.yaml and of the signature.
- LAUNCHER: set by the launcher (torchrun, mpirun, Slurm): as LAUNCH.
"""
import argparse
import functools
from dataclasses import dataclass

from util import flag_checks as fc

OUTCOME, SETTING, LAUNCH, LAUNCHER = "outcome", "setting", "launch", "launcher"
FT, PT, SLURM = "finetune", "pretrain", "slurm"
BOTH = (FT, PT)
SCRIPTS = (FT, PT, SLURM)


_TRUE = {"true", "1", "yes", "y", "t", "on"}
_FALSE = {"false", "0", "no", "n", "f", "off"}


def str2bool(v):
    """argparse type for the original boolean flags (`--model_ema True`)."""
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in _TRUE:
        return True
    if s in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (True/False, 1/0, yes/no), got {v!r}")


@dataclass(frozen=True)
class Flag:
    name: str
    default: object = None       # a dict {script: value} where the scripts differ (the original recipes')
    type: object = None          # argparse type (None: text)
    help: str = ""               # a dict {script: text} where the flag means more in one script
    role: str = OUTCOME
    scripts: tuple = BOTH        # which parsers have it (SLURM: the launchers add it)
    checks: tuple = ()           # fc.Range / fc.Rule, run after parsing (one line each)
    choices: tuple = None        # the valid values, checked after parsing (one line)
    parse_choices: bool = False  # let argparse refuse other values itself (usage + error)
    ignore_case: bool = False    # choices compared in lower case (as timm does for that flag)
    nargs: object = None
    const: object = None
    action: str = None
    aliases: tuple = ()
    metavar: object = None
    study: str = None            # why a search refuses the flag on its own command line
    fixed: dict = None           # {script: value} in a script without the flag, for the code both
                                 # scripts share (args.eval): not settable there, not shown, not saved

    def default_for(self, kind):
        return self.default.get(kind) if isinstance(self.default, dict) else self.default

    def help_for(self, kind):
        return self.help.get(kind) if isinstance(self.help, dict) else self.help


def _flag(name, default=None, type=None, help="", **kw):
    return Flag(name, default, type, help, **kw)


R, Rule = fc.Range, fc.Rule
_ft = dict(scripts=(FT,))
_pt = dict(scripts=(PT,))
_sl = dict(scripts=(SLURM,), role=LAUNCH)

TABLE = (
    # ------------------------------------------------------------ what a step computes
    _flag("batch_size", 64, int, "per-device batch size (global batch = batch_size x update_freq x processes)",
          checks=(R(1),)),
    _flag("epochs", {FT: 100, PT: 800}, int, "epochs to train", checks=(R(1),)),
    _flag("update_freq", 1, int, "gradient accumulation steps per optimizer update", checks=(R(1),)),
    _flag("model", "convnextv2_base", str, {
        FT: "model name: convnextv2_atto ... convnextv2_huge, or any timm model",
        PT: "the ConvNeXt V2 encoder to pretrain: convnextv2_atto ... convnextv2_huge (FCMAE pretrains our "
            "ConvNeXt V2 encoders only)"}),
    _flag("input_size", 224, int, "image input size (pixels)",
          checks=(R(16, kinds=(FT,)), Rule(fc.multiple_of_32, kinds=(PT,)))),
    _flag("weight_decay", 0.05, float, "weight decay (AdamW)", checks=(R(0),)),
    _flag("lr", None, float, "absolute learning rate; default: blr x global batch / 256", checks=(R(0),)),
    _flag("blr", {FT: 5e-4, PT: 1.5e-4}, float, "base learning rate: lr = blr x global batch / 256",
          checks=(R(0),)),
    _flag("min_lr", {FT: 1e-6, PT: 0.0}, float, "lower lr bound of the cosine schedule", checks=(R(0),)),
    _flag("warmup_epochs", {FT: 20, PT: 40}, int, "epochs of linear lr warmup", checks=(R(0),)),
    _flag("warmup_steps", -1, int, "warmup in optimizer steps; wins over --warmup_epochs when > 0"),
    _flag("clip_grad", None, float, "clip the gradient norm to this value (default: no clipping)",
          checks=(R(0, low_open=True, hint=" (or left out)"),)),
    _flag("use_amp", False, str2bool, "autocast: bf16 where supported, fp16 with a loss scaler otherwise"),
    # ------------------------------------------------------------ data
    _flag("data_path", "", str, "dataset: a folder with train/ and val/ class folders (image_folder, IMNET, "
                                "CIFAR), a folder of tar shards and classes.json (wds) or the training CSV (csv)"),
    _flag("data_set", "IMNET", str, "the kind of dataset: {data_sets} (synthetic is built in)"),
    _flag("imagenet_default_mean_and_std", True, str2bool, "normalise 3-band images with ImageNet's mean and "
                                                            "std (False: 0.5)"),
    _flag("in_chans", 3, int, "bands per image: 1 grayscale, 3 RGB, 4 to 13 multispectral (files: images, "
                              ".npy, .tif)", checks=(R(1),)),
    _flag("mean", None, float, "per-band mean of the 0-1 data, one per --in_chans band (default: ImageNet's "
                               "for 3 bands as --imagenet_default_mean_and_std says, 0.5 per band otherwise)",
          nargs="+", metavar="M", checks=(Rule(fc.mean_std),)),
    _flag("std", None, float, "per-band standard deviation of the 0-1 data, one per --in_chans band "
                              "(default: as for --mean)", nargs="+", metavar="S"),
    _flag("vflip", 0.0, float, "probability of flipping a training image upside down (aerial and many "
                               "medical images have no up)", checks=(R(0, 1),)),
    _flag("crop_pct", None, float, {FT: "evaluation centre-crop fraction (default 224/256 below 384 px)",
                                    PT: "evaluation centre-crop fraction; not used by pretraining, which "
                                        "does not evaluate (default: none)"},
          checks=(R(0, 1, low_open=True),)),
    _flag("num_workers", 10, int, "data loading worker processes per rank", role=SETTING, checks=(R(0),)),
    _flag("device_transforms", "auto", str, "where batches are finished: true: loader workers return uint8 images "
          "and normalisation and random erasing run on the training device (timm's prefetcher); false: all in "
          "the workers, as float; auto: true on CUDA, false on CPU (where the device is the loader's CPU)",
          choices=("auto", "true", "false"), ignore_case=True),
    _flag("jpeg_draft", False, str2bool, "fast decoding: a JPEG whose random or centre crop is shrunk at least "
          "2x is decoded at 1/2, 1/4 or 1/8 size (libjpeg's DCT scaling, Pillow's draft), and the crop is "
          "resized by torch's SIMD uint8 kernel: faster loaders, slightly different pixels than a full "
          "decode (False: the original's pixels; docs/benchmarks.md)"),
    _flag("pin_mem", True, str2bool, "pin host memory of batches (faster copies to the GPU)", role=SETTING),
    _flag("synthetic_train_samples", 5000, int, "built-in dataset: training images",
          checks=(R(1, message="--synthetic_train_samples and --synthetic_val_samples must be >= 1"),)),
    _flag("synthetic_val_samples", 1000, int, {FT: "built-in dataset: validation images",
                                               PT: "built-in dataset: validation images (not used by "
                                                   "pretraining, which does not evaluate)"},
          checks=(R(1, message="--synthetic_train_samples and --synthetic_val_samples must be >= 1"),)),
    _flag("synthetic_classes", 10, int, "built-in dataset: classes (2-10)",
          checks=(R(2, 10, text="between 2 and 10"),)),
    _flag("synthetic_seed", 0, int, "built-in dataset: which images are drawn"),
    _flag("max_bad_images", 100, int, "stop after this many unreadable images (train and val)", role=SETTING,
          checks=(R(0),)),
    # ------------------------------------------------------------ output, checkpoints, runs
    _flag("output_dir", "", str, "run directory; empty: <runs_root>/<kind>/<model>-<signature>/", role=LAUNCH,
          study="--output_dir names one run; a study makes many (they go under --runs_root): leave it out"),
    _flag("runs_root", "runs", str, "where runs without --output_dir live", role=SETTING),
    _flag("log_dir", None, str, "TensorBoard folder (default: <output_dir>/tensorboard)", role=LAUNCH,
          study="--log_dir would put every trial's TensorBoard events in one folder: leave it out"),
    _flag("device", "auto", str, "auto (CUDA when present, else CPU) | cpu | cuda | cuda:N | mps", role=LAUNCH,
          checks=(Rule(fc.device),)),
    _flag("seed", 0, int, "random seed (data order, augmentation, initialisation)"),
    _flag("resume", "", str, "checkpoint to resume from", role=LAUNCH,
          study="--resume names one checkpoint; trials resume their own runs: leave it out"),
    _flag("auto_resume", True, str2bool, "resume the newest whole checkpoint of the run", role=SETTING),
    _flag("force", False, None, "start a fresh run even if this one exists or completed", role=LAUNCH,
          action="store_true",
          study="--force would fork a fresh run for every trial (and for a resumed one): leave it out"),
    _flag("save_ckpt", True, str2bool, "save checkpoints", role=SETTING),
    _flag("save_ckpt_freq", 1, int, "checkpoint-<epoch>.pth every N epochs", role=SETTING, checks=(R(1),)),
    _flag("save_ckpt_num", 3, int, "keep the newest N epoch checkpoints", role=SETTING, checks=(R(1),)),
    _flag("save_ckpt_minutes", 30.0, float, "rolling checkpoint-last.pth every N minutes (0: off)", role=SETTING,
          checks=(R(0, hint=" (0: off)"),)),
    _flag("start_epoch", 0, int, "epoch to start at (a resume sets it itself)", role=LAUNCH,
          checks=(Rule(fc.start_epoch),)),
    _flag("print_freq", 20, int, "console and TensorBoard line every N steps", role=SETTING, checks=(R(1),)),
    _flag("skip_nonfinite", 0, int, "skip up to N steps with a non-finite loss (0: stop at the first)",
          role=SETTING, checks=(R(0),)),
    # ------------------------------------------------------------ trackers (util/tracking.py): mirror a run
    _flag("log_wandb", False, str2bool, "also log to Weights & Biases (WANDB_MODE=offline: to local files, "
                                        "`wandb sync` later)", role=SETTING),
    _flag("wandb_project", "convnextv2", str, "with --log_wandb: the W&B project", role=SETTING),
    _flag("wandb_entity", None, str, "with --log_wandb: the W&B team or user (default: your W&B default)",
          role=SETTING),
    _flag("wandb_tags", None, str, "with --log_wandb: tags of the W&B run", nargs="+", metavar="TAG",
          role=SETTING),
    _flag("mlflow_uri", None, str, "also log to MLflow at this tracking URI (sqlite:///mlflow.db: a local "
                                   "file; http://host:5000: a server)", role=SETTING, metavar="URI"),
    _flag("mlflow_experiment", "convnextv2", str, "with --mlflow_uri: the MLflow experiment", role=SETTING),
    _flag("upload_checkpoints", False, str2bool, "with --log_wandb or --mlflow_uri: upload checkpoint-best.pth "
                                                 "and checkpoint-last.pth when the run completes", role=SETTING),
    # ------------------------------------------------------------ speed
    _flag("channels_last", False, str2bool, "channels_last memory format for timm models (ours use it inside)",
          role=SETTING, nargs="?", const=True),
    _flag("compile", False, str2bool, "torch.compile the model (where it cannot compile, the first step "
                                      "stops with one line)",
          role=SETTING, nargs="?", const=True),
    _flag("grad_checkpointing", False, str2bool, "recompute the model's blocks in backward instead of keeping "
                                                 "their activations: less memory, more time per step, the same "
                                                 "gradients (ours, and timm models that support it)",
          role=SETTING, nargs="?", const=True, checks=(Rule(fc.grad_checkpointing, kinds=(FT,), needs_torch=True),)),
    # ------------------------------------------------------------ distributed
    _flag("world_size", 1, int, "number of processes (set by the launcher)", role=LAUNCHER),
    _flag("local_rank", -1, int, "local rank (set by torch.distributed.launch)", role=LAUNCHER,
          aliases=("--local-rank",)),
    _flag("dist_on_itp", False, str2bool, "launched by Open MPI's mpirun: ranks from OMPI_COMM_WORLD_*; set "
                                          "MASTER_ADDR and MASTER_PORT", role=LAUNCHER),
    _flag("dist_url", "env://", str, "torch.distributed init method", role=LAUNCHER),
    _flag("dist_timeout", 600.0, float, "seconds a rank waits for the others", role=SETTING,
          checks=(R(0, low_open=True, hint=" seconds"),)),
    _flag("preflight", False, None, "two real training steps with the real model and data, then exit; "
                                    "prints time and memory per step, saves nothing", role=LAUNCH,
          action="store_true", study="--preflight runs one step; run it without --optimize_config first"),
    _flag("config", None, str, "YAML file of flag values (keys = flag names); command-line flags win",
          role=LAUNCH, metavar="FILE", study=None),
    # ------------------------------------------------------------ hyperparameter search
    _flag("optimize_config", None, str, "run an Optuna study described by this file; every trial is a run "
                                        "with the sampled flags", role=SETTING, metavar="SEARCH_YAML"),
    _flag("storage", None, str, "the study's Optuna storage: a journal file path or a database URL (default: "
                                "<runs_root>/studies/<study_name>/journal.log)", role=SETTING, metavar="URL"),
    # ------------------------------------------------------------ fine-tuning
    _flag("drop_path", 0.0, float, "stochastic depth rate", checks=(R(0, 1, high_open=True, hint=", e.g. 0.1"),),
          **_ft),
    _flag("freeze_stages", 0, int, "freeze the stem and the first N stages: no gradients, weights kept as "
                                   "loaded", checks=(R(0, 4),), **_ft),
    _flag("linear_probe", False, str2bool, "linear probe: freeze the whole network and train only a new head on "
          "its pooled features, BatchNorm without affine parameters then Linear (MAE's main_linprobe.py); the "
          "frozen network runs as in evaluation (no --drop_path) and records no autograd graph; the recipe: "
          "configs/linprobe.yaml", **_ft),
    _flag("layer_decay_type", "single", str, "single: one decay per block; group: per group of 3 blocks",
          choices=("single", "group"), parse_choices=True, **_ft),
    _flag("layer_decay", 1.0, float, "layer-wise lr decay (1: none)", checks=(R(0, 1, low_open=True),), **_ft),
    _flag("model_ema", False, str2bool, "keep an exponential moving average of the weights", **_ft),
    _flag("model_ema_decay", 0.9999, float, "EMA decay", checks=(R(0, 1, high_open=True),), **_ft),
    _flag("model_ema_force_cpu", False, str2bool, "keep the EMA on the CPU", role=SETTING, **_ft),
    _flag("model_ema_eval", False, str2bool, "also evaluate (and pick the best by) the EMA model", **_ft),
    _flag("weight_decay_end", None, float, "final weight decay of a cosine wd schedule (default: constant)",
          checks=(R(0, message="--weight_decay_end must be >= 0"),), **_ft),
    _flag("opt", "adamw", str, "optimizer (timm's names; lookahead_<name> adds Lookahead)",
          checks=(Rule(fc.optimizer, needs_torch=True),), **_ft),
    _flag("opt_eps", 1e-8, float, "optimizer epsilon", checks=(R(0),), **_ft),
    _flag("opt_betas", None, float, "optimizer betas (default: the optimizer's own)", nargs="+",
          checks=(Rule(fc.opt_betas),), **_ft),
    _flag("momentum", 0.9, float, "SGD momentum", checks=(R(0),), **_ft),
    _flag("color_jitter", None, float, "colour jitter factor (default: none)",
          checks=(R(0, hint=" (or left out)"),), **_ft),
    _flag("aa", "rand-m9-mstd0.5-inc1", str, "RandAugment policy (timm); none to disable",
          checks=(Rule(fc.rgb_augment), Rule(fc.augment_policy, needs_torch=True)), **_ft),
    _flag("smoothing", 0.1, float, "label smoothing", checks=(R(0, 1, high_open=True),), **_ft),
    _flag("bce_loss", False, str2bool, "binary cross-entropy per class instead of softmax cross-entropy "
                                       "(timm's BinaryCrossEntropy; with mixup, cutmix and --smoothing)", **_ft),
    _flag("bce_target_thresh", None, float, "with --bce_loss: targets above it become 1, the rest 0",
          checks=(R(0, 1),), **_ft),
    _flag("train_interpolation", "bicubic", str, "interpolation of the training crop",
          choices=fc.INTERPOLATIONS, **_ft),
    _flag("scale", [0.08, 1.0], float, "RandomResizedCrop area range of the training transform (timm's --scale)",
          nargs=2, metavar=("MIN", "MAX"), checks=(Rule(fc.scale),), **_ft),
    _flag("reprob", 0.25, float, "random erase probability", checks=(R(0, 1),), **_ft),
    _flag("remode", "pixel", str, "random erase mode", choices=fc.REMODES, ignore_case=True, **_ft),
    _flag("recount", 1, int, "random erase count", checks=(R(1, hint=" (random-erase regions per image)"),),
          **_ft),
    _flag("resplit", False, str2bool, "do not random-erase the first augmentation split", **_ft),
    _flag("mixup", 0, float, "mixup alpha (0: off)",
          checks=(R(0, message="--mixup and --cutmix must be >= 0"), Rule(fc.even_batch_for_mixing)), **_ft),
    _flag("cutmix", 0, float, "cutmix alpha (0: off)", checks=(R(0, message="--mixup and --cutmix must be >= 0"),),
          **_ft),
    _flag("cutmix_minmax", None, float, "cutmix box side range MIN MAX (overrides --cutmix's alpha)", nargs="+",
          checks=(Rule(fc.cutmix_minmax),), **_ft),
    _flag("mixup_prob", 1.0, float, "probability of mixup or cutmix per batch", checks=(R(0, 1),), **_ft),
    _flag("mixup_switch_prob", 0.5, float, "probability of cutmix instead of mixup when both are on",
          checks=(R(0, 1),), **_ft),
    _flag("mixup_mode", "batch", str, "mix per batch, pair or element", choices=fc.MIXUP_MODES, **_ft),
    _flag("finetune", "", str, {
        FT: "weights to start from: a .pth/.pt/.bin/.safetensors file (ours, FCMAE, official, timm, Hugging Face) "
            "or a Hugging Face folder",
        PT: "weights to start a new pretraining run from (epoch 0, its own schedule): a .pth/.pt/.bin/.safetensors "
            "file (ours, FCMAE, official, timm, Hugging Face) or a Hugging Face folder; the encoder from any, the "
            "decoder and mask token too when the file has them (else fresh)"}, scripts=BOTH),
    _flag("head_init_scale", 0.001, float, "scale of the classifier's initial weights", **_ft),
    _flag("model_key", "model|module", str, "where the weights are in a --finetune checkpoint (first found)",
          scripts=BOTH),
    _flag("model_prefix", "", str, "key prefix to strip from the --finetune weights", scripts=BOTH),
    _flag("save_safetensors", False, str2bool, "also write the final and best weights as model.safetensors "
          "and model-best.safetensors (weights only, for release)", role=SETTING, fixed={PT: False}, **_ft),
    _flag("nb_classes", 1000, int, "number of classes (set from the dataset)", role=SETTING, **_ft),
    _flag("eval_data_path", None, str, "validation data (default: <data_path>/val; the val CSV for csv)",
          fixed={PT: None}, **_ft),
    _flag("eval", False, str2bool, "only evaluate (with --resume or --finetune)", role=LAUNCH,
          study="--eval only evaluates; a study trains: leave it out", fixed={PT: False}, **_ft),
    _flag("predict", None, str, "only label images: run the --resume checkpoint's classifier over PATH (a folder "
          "of images at any depth, a CSV file with a path column, or .tar shards) and write predictions.csv (top-5 "
          "classes per file) next to the checkpoint or into --output_dir", role=LAUNCH, metavar="PATH",
          study="--predict labels images; a study trains: leave it out", fixed={PT: None}, **_ft),
    _flag("dist_eval", True, str2bool, "shard evaluation over the ranks (exact counts either way)", role=SETTING,
          **_ft),
    _flag("disable_eval", False, str2bool, "no evaluation during training", fixed={PT: True}, **_ft),
    # ------------------------------------------------------------ pretraining
    _flag("mask_ratio", 0.6, float, "fraction of patches removed",
          checks=(R(0, 1, low_open=True, high_open=True, hint=", e.g. 0.6"), Rule(fc.mask_keeps_a_patch)), **_pt),
    _flag("norm_pix_loss", True, str2bool, "normalise each target patch (default on; --norm_pix_loss False "
                                           "turns it off)", nargs="?", const=True, **_pt),
    _flag("decoder_depth", 1, int, "decoder blocks",
          checks=(R(0, message="--decoder_depth must be >= 0 and --decoder_embed_dim >= 1"),), **_pt),
    _flag("decoder_embed_dim", 512, int, "decoder width",
          checks=(R(1, message="--decoder_depth must be >= 0 and --decoder_embed_dim >= 1"),), **_pt),
    _flag("vis_freq", 5, int, "reconstruction grid in TensorBoard every N epochs (0: never)", role=SETTING,
          **_pt),
    # ------------------------------------------------------------ Slurm launchers (submitit_*.py)
    _flag("nodes", 2, int, "number of nodes", checks=(R(1, message="--nodes must be >= 1"),), **_sl),
    _flag("ngpus", 8, int, "GPUs per node = processes (tasks) per node; on nodes without GPUs: tasks per node",
          checks=(R(1, message="--ngpus (processes per node) must be >= 1"),), **_sl),
    _flag("gpus_per_node", -1, int, "GPUs to request per node; -1: same as --ngpus; 0: request none (CPU nodes)",
          checks=(R(-1, message="--gpus_per_node must be -1 (same as --ngpus), 0 or more"),), **_sl),
    _flag("timeout", 4320, int, "job time limit in minutes",
          checks=(R(1, message="--timeout (minutes) must be >= 1"),), **_sl),
    _flag("job_dir", "", str, "results folder of the original command lines: the run directory unless "
                              "--output_dir is given (then the submitit log folder); empty: <run_dir>/slurm/",
          **_sl),
    _flag("partition", "", str, "partition; empty: the cluster's default", **_sl),
    _flag("use_volta32", False, None, "add the constraint volta32gb", action="store_true", **_sl),
    _flag("comment", "", str, "comment shown by squeue", **_sl),
    _flag("cpus_per_task", None, int, "CPUs per task (default: --num_workers + 1, the loader workers and the "
                                      "training process)", checks=(R(1, message="--cpus_per_task must be >= 1"),),
          **_sl),
    _flag("mem_gb", None, float, "memory per node in GB (default 40 * ngpus)",
          checks=(R(0, low_open=True, message="--mem_gb must be > 0"),), **_sl),
    _flag("account", "", str, "Slurm account", **_sl),
    _flag("qos", "", str, "Slurm quality of service", **_sl),
    _flag("constraint", "", str, "node features to require", **_sl),
    _flag("exclude", "", str, "nodes not to use", **_sl),
    _flag("slurm_extra", [], str, "any further sbatch option (repeatable), e.g. --slurm_extra mail-type=END",
          action="append", metavar="KEY=VALUE", **_sl),
    _flag("signal_delay_s", 120, int, "seconds before the time limit at which Slurm sends USR2 (save, then "
                                      "requeue)", checks=(R(0, message="--signal_delay_s must be >= 0"),), **_sl),
    _flag("cluster", "slurm", str, "slurm; local: the job's processes on this machine (no Slurm); debug: in "
                                   "this process", choices=("slurm", "local", "debug"), parse_choices=True, **_sl),
    _flag("dry_run", False, None, "print the run directory and the batch script; submit nothing",
          action="store_true", **_sl),
    _flag("wait", False, str2bool, "block until the job ends and show its result or error", nargs="?",
          const=True, **_sl),
    _flag("parallel", 1, int, "with --optimize_config: trials at once, each its own job (this process drives "
                              "the study)", **_sl),
)

BY_NAME = {f.name: f for f in TABLE}
assert len(BY_NAME) == len(TABLE), "a flag is declared twice"


def flags_of(kind):
    """The flags of one script (finetune, pretrain) or of the launchers' own (slurm)."""
    return [f for f in TABLE if kind in f.scripts]


def names(kind):
    return frozenset(f.name for f in flags_of(kind))


def not_outcome():
    """Flags that do not change what a run computes: left out of the run signature, and a search
    space may not name them."""
    return frozenset(f.name for f in TABLE if f.role != OUTCOME)


def per_launch():
    """Flags of one launch: left out of config.yaml (listed in its header comment instead)."""
    return frozenset(f.name for f in TABLE if f.role in (LAUNCH, LAUNCHER))


def study_refusals():
    """{flag: why a study's own command line may not set it}."""
    return {f.name: f.study for f in TABLE if f.study}


def canonical(v):
    """Equal settings give equal JSON: 0 == 0.0 (a float flag's int default), tuple == list."""
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, (list, tuple)):
        return [canonical(i) for i in v]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def add_flags(parser, kind, group=None):
    """Add the flags of `kind` to an argparse parser (or to `group` of it), each help text ending
    with the flag's default in this script, and the `fixed` values of the flags it lacks. Returns
    the parser."""
    for f in flags_of(kind):
        text, value = f.help_for(kind), f.default_for(kind)
        if "{data_sets}" in text:
            from util.data import DATA_SETS  # the dataset registry names the kinds
            text = text.format(data_sets=" | ".join(DATA_SETS))
        if "default" not in text.lower():
            shown = ("off" if f.action == "store_true" else
                     "none" if value in (None, []) else
                     "empty" if value == "" else
                     " ".join(map(str, value)) if isinstance(value, (list, tuple)) else value)
            text += f" (default: {shown})"
        kw = dict(default=value, help=text.replace("%", "%%"))  # argparse %-formats help texts
        if f.action:
            kw["action"] = f.action
        if f.type is not None and f.action != "store_true":
            kw["type"] = f.type
        for key in ("nargs", "const", "metavar"):
            if getattr(f, key) is not None:
                kw[key] = getattr(f, key)
        if f.type is str2bool and f.metavar is None:
            kw["metavar"] = "BOOL"  # explained once, in the epilog (BOOL_HELP)
        if f.parse_choices:
            kw["choices"] = f.choices
        (group or parser).add_argument(f"--{f.name}", *f.aliases, **kw)
    # set on the parsed args without an action: not on the command line, in --help, --config,
    # config.yaml or the signature (util/config.flag_dests lists the actions only)
    parser.set_defaults(**{f.name: f.fixed[kind] for f in TABLE if kind in (f.fixed or {})})
    return parser


BOOL_HELP = ("BOOL: True or False (also 1/0, yes/no, on/off), as in the original scripts, e.g. --model_ema "
             "True; [BOOL]: the flag alone means True. Flags without a value (--force) are off unless given. "
             "Any flag can also come from a YAML --config FILE (the command line wins). Every flag, its "
             "default and its checks: util/flags.py; what each mistake says: docs/errors.md.")


def build_parser(kind, description, prog=None):
    """The parser of main_finetune.py or main_pretrain.py (`prog`: the script its usage line
    names, main_<kind>.py unless given)."""
    parser = argparse.ArgumentParser(prog=prog or f"main_{kind}.py", description=description, epilog=BOOL_HELP,
                                     allow_abbrev=False)
    return add_flags(parser, kind)


def checks(kind, needs_torch=None):
    """[(key, check)] of every range and choice check of script `kind`, in table order: `check(args)`
    returns None (fine) or the one-line message. A key, `<flag>:<n>`, names one check of the table
    (a check both scripts share has the same key in both). `needs_torch` True or False: only the
    checks that import torch, timm or the models, or only those that do not."""
    out = []
    for f in flags_of(kind):
        for i, c in enumerate(_choice_checks(f) + list(f.checks)):
            if kind in c.kinds and needs_torch in (None, getattr(c, "needs_torch", False)):
                out.append((f"{f.name}:{i}", functools.partial(c, f.name)))
    return out


def _choice_checks(f, documented=False):
    if not f.choices or (f.parse_choices and not documented):
        return []
    return [fc.Choice(f.choices, ignore_case=f.ignore_case)]


def first_failure(args, kind, needs_torch=None):
    """The message of the first check `args` fails, or None (`needs_torch`: as for `checks`)."""
    for _key, check in checks(kind, needs_torch):
        msg = check(args)
        if msg:
            return msg
    return None


_SHORT = {FT: "F", PT: "P", SLURM: "S"}


def markdown():
    """The table of flags with checks, for docs/errors.md (between its `flag-checks` markers)."""
    rows = ["| Flag | Scripts | Default | Valid values |", "|---|---|---|---|"]
    for f in TABLE:
        shown = []
        for c in _choice_checks(f, documented=True) + list(f.checks):
            only = [s for s in f.scripts if s in c.kinds]  # a check some of the flag's scripts make
            shown.append(c.describe() + ("" if only == list(f.scripts) else f" ({', '.join(_SHORT[s] for s in only)})"))
        if not shown:
            continue
        scripts = ", ".join(_SHORT[s] for s in f.scripts)
        dflt = ", ".join(f"{v} ({_SHORT[k]})" for k, v in f.default.items()) if isinstance(f.default, dict) \
            else f.default
        rows.append(f"| `--{f.name}` | {scripts} | `{dflt}` | {'; '.join(shown)} |")
    return "\n".join(rows) + "\n"


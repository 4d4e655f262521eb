"""Flags both scripts share (data, output, checkpointing, distributed, speed, run management).
Names, defaults and meanings of the original ConvNeXt V2 flags are kept."""
from util.config import str2bool


def add_common_args(parser, epochs, blr, min_lr, warmup_epochs):
    a = parser.add_argument
    a("--batch_size", default=64, type=int, help="per-device batch size")
    a("--epochs", default=epochs, type=int)
    a("--update_freq", default=1, type=int, help="gradient accumulation steps")
    a("--model", default="convnextv2_base", type=str, help="model name (ours or any timm model)")
    a("--input_size", default=224, type=int, help="image input size")
    # optimizer / schedule
    a("--weight_decay", type=float, default=0.05)
    a("--lr", type=float, default=None, help="absolute lr; default blr * global batch / 256")
    a("--blr", type=float, default=blr, help="base lr: lr = blr * global batch / 256")
    a("--min_lr", type=float, default=min_lr, help="lower lr bound of the cosine schedule")
    a("--warmup_epochs", type=int, default=warmup_epochs)
    a("--warmup_steps", type=int, default=-1, help="warmup in optimizer steps; wins over --warmup_epochs when > 0")
    a("--clip_grad", type=float, default=None, help="clip gradient norm (None: no clipping)")
    a("--use_amp", type=str2bool, default=False, help="autocast: bf16 where supported, fp16 + scaler otherwise")
    # data
    a("--data_path", default="", type=str, help="dataset root with train/ and val/")
    a("--data_set", default="IMNET", type=str, help="synthetic | image_folder | IMNET | CIFAR")
    a("--imagenet_default_mean_and_std", type=str2bool, default=True)
    a("--crop_pct", type=float, default=None)
    a("--num_workers", default=10, type=int)
    a("--pin_mem", type=str2bool, default=True)
    a("--synthetic_train_samples", default=5000, type=int, help="built-in dataset: training images")
    a("--synthetic_val_samples", default=1000, type=int, help="built-in dataset: validation images")
    a("--synthetic_classes", default=10, type=int, help="built-in dataset: classes (2-10)")
    a("--synthetic_seed", default=0, type=int, help="built-in dataset: which images are drawn")
    a("--max_bad_images", default=100, type=int, help="stop after this many unreadable images")
    # output / checkpoints / runs
    a("--output_dir", default="", help="run directory; empty: runs/<kind>/<model>-<signature>/")
    a("--runs_root", default="runs", help="where runs without --output_dir live")
    a("--log_dir", default=None, help="TensorBoard folder (default: <output_dir>/tensorboard)")
    a("--device", default="auto", help="auto (CUDA when present, else CPU) | cpu | cuda | cuda:N")
    a("--seed", default=0, type=int)
    a("--resume", default="", help="checkpoint to resume from")
    a("--auto_resume", type=str2bool, default=True, help="resume the newest whole checkpoint of the run")
    a("--force", action="store_true", help="start a fresh run even if this one exists or completed")
    a("--save_ckpt", type=str2bool, default=True)
    a("--save_ckpt_freq", default=1, type=int)
    a("--save_ckpt_num", default=3, type=int)
    a("--save_ckpt_minutes", default=30.0, type=float, help="rolling checkpoint-last.pth every N minutes")
    a("--start_epoch", default=0, type=int)
    a("--print_freq", default=20, type=int, help="console/TensorBoard line every N steps")
    a("--skip_nonfinite", default=0, type=int, help="skip up to N steps with a non-finite loss")
    # speed
    a("--channels_last", type=str2bool, nargs="?", const=True, default=False)
    a("--compile", type=str2bool, nargs="?", const=True, default=False, help="torch.compile the model")
    # distributed
    a("--world_size", default=1, type=int, help="set by the launcher")
    a("--local_rank", "--local-rank", dest="local_rank", default=-1, type=int)
    a("--dist_on_itp", type=str2bool, default=False,
      help="launched by Open MPI's mpirun: ranks from OMPI_COMM_WORLD_*; set MASTER_ADDR and MASTER_PORT")
    a("--dist_url", default="env://")
    a("--dist_timeout", default=600.0, type=float, help="seconds a rank waits for the others")
    a("--preflight", action="store_true", help="one step with the real model and data, then exit")
    # hyperparameter search (util/hpo.py, docs/search.md)
    a("--optimize_config", default=None, metavar="SEARCH_YAML",
      help="run an Optuna study described by this file; every trial is a run with the sampled flags")
    a("--storage", default=None, metavar="URL",
      help="the study's Optuna storage: a journal file path or a database URL "
           "(default: <runs_root>/studies/<study_name>/journal.log)")
    return parser

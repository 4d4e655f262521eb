"""The run signature of the code before signature version 3, so that an upgrade does not make
the same command start its run over.

Version 2 hashed every outcome-changing flag the script had, default or not, so each new flag
changed every signature. Version 3 (util/runs.py) hashes only the settings that differ from
their defaults. A run directory made by version 2 is still found: its signature is computed
here from the flags version 2 knew (frozen below), as long as every flag added since then is at
its default (otherwise version 2 could not have made the run).
"""
import hashlib
import json

from util import flags

VERSION = 2

# The outcome-changing flags of each script when version 2 was current (batch_size, update_freq,
# lr and blr enter as global_batch and the effective lr, as in version 3).
V2_FLAGS = {
    "finetune": frozenset((
        "aa", "batch_size", "blr", "clip_grad", "color_jitter", "crop_pct", "cutmix", "cutmix_minmax",
        "data_path", "data_set", "disable_eval", "drop_path", "epochs", "eval_data_path", "finetune",
        "head_init_scale", "imagenet_default_mean_and_std", "input_size", "layer_decay",
        "layer_decay_type", "lr", "min_lr", "mixup", "mixup_mode", "mixup_prob", "mixup_switch_prob",
        "model", "model_ema", "model_ema_decay", "model_ema_eval", "model_key", "model_prefix",
        "momentum", "opt", "opt_betas", "opt_eps", "recount", "remode", "reprob", "resplit", "scale",
        "seed", "smoothing", "synthetic_classes", "synthetic_seed", "synthetic_train_samples",
        "synthetic_val_samples", "train_interpolation", "update_freq", "use_amp", "warmup_epochs",
        "warmup_steps", "weight_decay", "weight_decay_end")),
    "pretrain": frozenset((
        "batch_size", "blr", "clip_grad", "crop_pct", "data_path", "data_set", "decoder_depth",
        "decoder_embed_dim", "epochs", "imagenet_default_mean_and_std", "input_size", "lr",
        "mask_ratio", "min_lr", "model", "norm_pix_loss", "seed", "synthetic_classes",
        "synthetic_seed", "synthetic_train_samples", "synthetic_val_samples", "update_freq",
        "use_amp", "warmup_epochs", "warmup_steps", "weight_decay")),
}
_DERIVED = {"global_batch", "lr", "blr"}


def _at_default(name, value, kind):
    flag = flags.BY_NAME.get(name)
    return flag is not None and flags.canonical(flag.default_for(kind)) == value


def legacy_signature(args, world_size, kind, outcome):
    """The version-2 signature of these settings, or None when version 2 could not have made
    the run (a flag it did not have is set away from its default, or one it had is gone).
    `outcome`: util/runs.outcome_settings(args, world_size)."""
    known = V2_FLAGS.get(kind)
    if known is None:
        return None
    hashed = {}
    for name, value in outcome.items():
        if name in known or name in _DERIVED:
            hashed[name] = value
        elif not _at_default(name, value, kind):
            return None
    if any(name not in hashed for name in known - {"batch_size", "update_freq", "lr", "blr"}):
        return None
    blob = json.dumps({"kind": kind, "settings": hashed, "version": VERSION},
                      sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()

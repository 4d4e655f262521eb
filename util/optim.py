"""Parameter groups (layer-wise lr decay, no weight decay on biases and 1-D params), the
optimizer (timm's factory), the effective lr and the per-iteration lr / weight-decay schedules.

The schedules stay our own: timm's schedulers warm up to `lr * (warmup_t - 1) / warmup_t`
and count the cosine otherwise, so they would change every run's lr values (and the resume of
runs made so far)."""
import math

import numpy as np

from util.errors import UserError


def layer_id_convnext(name, depths, decay_type="single"):
    """Layer id of a ConvNeXt (V2) parameter, as in the original recipe.

    single: every block its own id; group: 12 groups with stage-3 blocks in threes.
    """
    if decay_type == "group":
        if name.startswith("downsample_layers"):
            stage = int(name.split(".")[1])
            return {0: 0, 1: 2, 2: 3, 3: 12}[stage]
        if name.startswith("stages"):
            stage, block = int(name.split(".")[1]), int(name.split(".")[2])
            return {0: 1, 1: 2, 3: 12}.get(stage, 3 + block // 3)
        return 13
    if name.startswith("downsample_layers"):
        return sum(depths[: int(name.split(".")[1])]) + 1
    if name.startswith("stages"):
        stage, block = int(name.split(".")[1]), int(name.split(".")[2])
        return sum(depths[:stage]) + block + 1
    return sum(depths) + 1


def param_groups(model, weight_decay, layer_decay=1.0, layer_decay_type="single"):
    """Groups carry `lr_scale` (layer decay) and `weight_decay` (0 for biases and 1-D tensors)."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    depths = getattr(model, "depths", None)
    if layer_decay < 1.0 and depths is None:  # another architecture: timm knows its layers
        from timm.optim import param_groups_layer_decay
        return param_groups_layer_decay(model, weight_decay, list(skip), layer_decay)
    num_layers = 12 if layer_decay_type == "group" else (sum(depths) if depths else 0)
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_wd = p.ndim <= 1 or name.endswith(".bias") or name in skip
        lid = layer_id_convnext(name, depths, layer_decay_type) if depths and layer_decay < 1.0 else 0
        scale = layer_decay ** (num_layers + 1 - lid) if layer_decay < 1.0 else 1.0
        key = (lid, no_wd)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": 0.0 if no_wd else weight_decay,
                           "lr_scale": scale, "layer_id": lid}
        groups[key]["params"].append(p)
    return list(groups.values())


def create_optimizer(model, lr, device, weight_decay, opt="adamw", opt_eps=None, betas=None, momentum=0.9,
                     layer_decay=1.0, layer_decay_type="single"):
    """timm's optimizer `opt` over `param_groups`, at learning rate `lr` (effective_lr), fused
    AdamW on CUDA `device`s. The keywords are the fine-tuning flags of those names (`betas`:
    --opt_betas; None: the optimizer's own), which each Task hands over (Task.optimizer_settings);
    pretraining has none of them and uses AdamW with the original's betas."""
    from timm.optim import create_optimizer_v2
    groups = param_groups(model, weight_decay, layer_decay, layer_decay_type)
    kw = {"eps": opt_eps} if opt_eps is not None else {}
    if betas:
        kw["betas"] = tuple(betas)
    opt_name = opt.lower()
    if opt_name == "adamw" and str(device).startswith("cuda"):
        kw["fused"] = True
    try:
        optimizer = create_optimizer_v2(groups, opt=opt_name, lr=lr, weight_decay=weight_decay, momentum=momentum,
                                        **kw)
    except (ValueError, AssertionError, KeyError) as e:
        raise UserError(f"cannot create optimizer --opt {opt_name!r} ({e}); try --opt adamw") from None
    for g in optimizer.param_groups:  # which groups the weight-decay schedule may touch
        g.setdefault("apply_wd", g["weight_decay"] > 0)
        if "always_adapt" in g:  # timm's LARS: the trust ratio for weight matrices at any weight decay, none
            # for biases and norms, as MAE's LARS (timm's adapts groups with weight decay only: none at 0, the
            # linear-probe recipe's; with weight decay the same groups adapt as before)
            g["always_adapt"] = all(p.ndim > 1 for p in g["params"])
    return optimizer


def cosine_schedule(base, final, epochs, iters_per_epoch, warmup_epochs=0, warmup_steps=-1,
                    start_warmup=0.0):
    """Per-iteration values: linear warmup from start_warmup, then cosine from base to final.
    `warmup_steps` > 0 wins over `warmup_epochs`."""
    warmup_iters = warmup_steps if warmup_steps > 0 else int(warmup_epochs * iters_per_epoch)
    total = int(epochs * iters_per_epoch)
    warmup_iters = min(warmup_iters, total)
    warm = np.linspace(start_warmup, base, warmup_iters) if warmup_iters > 0 else np.array([])
    t = np.arange(total - warmup_iters)
    cos = final + 0.5 * (base - final) * (1 + np.cos(math.pi * t / max(len(t), 1)))
    return np.concatenate((warm, cos))


def apply_schedule(optimizer, lr, wd=None):
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
        if wd is not None and g.get("apply_wd", True):
            g["weight_decay"] = wd


def global_batch(args, world_size):
    """Images per optimizer update: batch_size x update_freq x processes."""
    return args.batch_size * args.update_freq * world_size


def effective_lr(args, world_size):
    """--lr, or blr * global batch / 256 when --lr is not given (the original rule)."""
    return args.lr if args.lr is not None else args.blr * global_batch(args, world_size) / 256


def updates_per_epoch(batches, update_freq):
    """Optimizer updates in an epoch of `batches` micro-batches (whole updates only; at least one,
    util/validate.check_inputs made sure)."""
    return batches // update_freq


def lr_schedule(args, lr, updates):
    """Per-update lr values: linear warmup to `lr`, then cosine to --min_lr."""
    return cosine_schedule(lr, args.min_lr, args.epochs, updates, args.warmup_epochs, args.warmup_steps)


def wd_schedule(args, updates):
    """Per-update weight decay: cosine from --weight_decay to --weight_decay_end (flat without)."""
    end = args.weight_decay if args.weight_decay_end is None else args.weight_decay_end
    return cosine_schedule(args.weight_decay, end, args.epochs, updates)

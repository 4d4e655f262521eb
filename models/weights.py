"""Checkpoint keys for the fine-tuning hand-off, and conversion to timm's naming.

Takes, and turns into `ConvNeXtV2` names and shapes:
- a plain ConvNeXtV2 state dict (ours, or an official fine-tuned one);
- our FCMAE state dict (`encoder.*`; decoder parts dropped);
- an official sparse (MinkowskiEngine) FCMAE state dict: `kernel` tensors, `.ln.`/`.linear.`
  name parts, GRN and biases as [1, dim];
- an official dense `*_fcmae.pt` (dense names, maybe under `encoder.`, GRN [1, dim]).
Anything it cannot place is an error, not a silently skipped key. These conversions apply to
our `ConvNeXtV2` only: a timm model (`--model resnet18`, timm's own `convnextv2_*`) already uses
its own names, so its checkpoints only lose wrapper prefixes (see `state_dict_for`).

`select_state_dict` picks the weights out of a checkpoint as fine-tuning does (key, prefix).
Errors are `ModelError`s naming the arguments, not the scripts' flags (models/errors.py).

CLI: python -m models.weights to_timm IN OUT [--model-key model|module]
"""
import argparse
import math
import os
import re
import sys
import warnings
from typing import NamedTuple

import torch

from models.errors import ModelError

DECODER_PREFIXES = ("proj.", "decoder.", "pred.", "mask_token")
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")  # DDP, torch.compile, a wrapping module
DEFAULT_MODEL_KEY = "model|module"


def pick_state_dict(checkpoint, model_key=DEFAULT_MODEL_KEY):
    """The weights in a loaded checkpoint: the first of `model_key` ('a|b') present, or the
    object itself when it already is a state dict."""
    if not isinstance(checkpoint, dict):
        raise ModelError(f"checkpoint holds a {type(checkpoint).__name__}, not a dict of "
                         "weights; pass a ConvNeXt V2 checkpoint file")
    for key in model_key.split("|"):
        if key in checkpoint and isinstance(checkpoint[key], dict):
            return checkpoint[key]
    if checkpoint and all(torch.is_tensor(v) for v in checkpoint.values()):
        return checkpoint
    raise ModelError(f"checkpoint has none of the keys {model_key!r} (it has "
                     f"{', '.join(map(str, list(checkpoint)[:8]))}); name the key of the weights as model_key")


def load_file(path, model_key=DEFAULT_MODEL_KEY):
    """The state dict stored in a checkpoint file (weights-only load, on CPU)."""
    if not os.path.isfile(path):
        raise ModelError(f"checkpoint file {path} does not exist; check the path")
    try:
        # official checkpoints carry their argparse.Namespace under "args": allow just that
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated files, non-weights objects
        raise ModelError(f"cannot read checkpoint {path} with weights_only=True "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                        "pass a checkpoint saved by this suite or an official release") from None
    return pick_state_dict(checkpoint, model_key)


def select_state_dict(checkpoint, model_key=DEFAULT_MODEL_KEY, prefix=""):
    """The weights fine-tuning takes from a loaded checkpoint: the entry under the first of
    `model_key` ('a|b') present, else the checkpoint itself; with `prefix`, only the keys that
    start with it, without it."""
    sd = checkpoint
    if isinstance(checkpoint, dict):
        for key in model_key.split("|"):
            if key in checkpoint:
                sd = checkpoint[key]
                break
    if not isinstance(sd, dict):
        raise ModelError(f"the checkpoint holds no dict of weights (under {model_key!r} or at its top); "
                         "pass a checkpoint file")
    if prefix:
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def _strip_wrappers(sd, own=()):
    """Remove a prefix every key carries, unless the model's own keys (`own`) use it too."""
    for prefix in WRAPPER_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd) and \
                not any(k.startswith(prefix) for k in own):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _kernel_to_weight(kernel):
    """MinkowskiEngine kernel -> Conv2d weight: [k*k, in, out] (dense) or [k*k, dim]
    (depthwise); the kernel offsets run with the spatial axes transposed."""
    ks = math.isqrt(kernel.shape[0])
    if ks * ks != kernel.shape[0]:
        raise ModelError(f"sparse kernel of shape {tuple(kernel.shape)} is not square; "
                        "the checkpoint is not a ConvNeXt V2 FCMAE checkpoint")
    if kernel.dim() == 3:
        _, cin, cout = kernel.shape
        return kernel.permute(2, 1, 0).reshape(cout, cin, ks, ks).transpose(2, 3).contiguous()
    if kernel.dim() == 2:
        dim = kernel.shape[1]
        return kernel.permute(1, 0).reshape(dim, 1, ks, ks).transpose(2, 3).contiguous()
    raise ModelError(f"sparse kernel of shape {tuple(kernel.shape)} cannot be placed; "
                    "the checkpoint is not a ConvNeXt V2 FCMAE checkpoint")


def encoder_state_dict(sd):
    """Any supported ConvNeXt V2 / FCMAE state dict -> ConvNeXtV2 names and shapes."""
    sd = _strip_wrappers(dict(sd))
    is_pretrain = any(k.startswith("encoder.") for k in sd)
    out = {}
    for key, value in sd.items():
        if is_pretrain:
            if key.startswith(DECODER_PREFIXES):
                continue
            if key.startswith("encoder."):
                key = key[len("encoder."):]
        parts = key.split(".")
        if parts[-1] == "kernel":
            parts[-1] = "weight"
            value = _kernel_to_weight(value)
        parts = [p for p in parts if p not in ("ln", "linear")]
        key = ".".join(parts)
        if ".grn." in key:
            value = value.reshape(1, 1, 1, -1)
        elif key.endswith(".bias") and value.dim() == 2 and value.shape[0] == 1:
            value = value.reshape(-1)
        out[key] = value
    return out


def _describe(problems):
    more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
    return "; ".join(problems[:3]) + more


def is_ours(model):
    """True for our ConvNeXtV2 (models/convnextv2.py), the only model the conversions are for."""
    from models.convnextv2 import ConvNeXtV2
    return isinstance(model, ConvNeXtV2)


def classifier_prefixes(model):
    """Key prefixes of the model's classifier, the part a checkpoint for another number of
    classes cannot fill: `head.` for ours; for a timm model its `pretrained_cfg['classifier']`
    (`fc` for ResNets, `head.fc` for ConvNeXt, ...) or else the module `get_classifier()` is."""
    if is_ours(model):
        return ("head.",)
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    if not names and hasattr(model, "get_classifier"):
        head = model.get_classifier()
        names = [n for n, m in model.named_modules() if m is head and n]
    names = [names] if isinstance(names, str) else list(names or ["head"])
    return tuple(f"{n}." for n in names)


def check_fit(own, sd, head=("head.",), allowed_missing=("head.", "norm.")):
    """Which entries of the converted `sd` fit `own` (a model's state dict, meta tensors are
    fine). Keys under the `head` prefixes (the classifier) that the model lacks or has in
    another shape are dropped with a warning; any other key or shape that does not fit, or a
    missing key outside `allowed_missing` and `head`, raises ModelError."""
    problems, placed, dropped = [], {}, []
    for key, value in sd.items():
        in_head = key.startswith(tuple(head))
        if key not in own:
            if in_head:
                dropped.append(f"{key} {tuple(value.shape)}, the model has none")
                continue
            problems.append(f"unknown key {key}")
        elif tuple(value.shape) != tuple(own[key].shape):
            if in_head:
                dropped.append(f"{key} {tuple(value.shape)} vs {tuple(own[key].shape)}")
                continue
            problems.append(f"{key} has shape {tuple(value.shape)}, "
                            f"the model {tuple(own[key].shape)}")
        else:
            placed[key] = value
    if dropped:
        warnings.warn(f"dropping the checkpoint's classifier head ({'; '.join(dropped)}): the "
                      "model has another number of classes, its head stays freshly initialised")
    if not placed:
        raise ModelError("the checkpoint is neither a ConvNeXt V2 checkpoint (ours or official) "
                         "nor one of this model (no key fits); pass a matching checkpoint")
    missing = [k for k in own if k not in sd]
    bad_missing = [k for k in missing if not k.startswith(tuple(allowed_missing) + tuple(head))]
    if bad_missing:
        problems.append(f"missing {len(bad_missing)} keys, e.g. {', '.join(bad_missing[:3])}")
    if problems:
        raise ModelError(f"checkpoint does not fit the model: {_describe(problems)}; "
                         "pass a checkpoint of the same model")
    return placed


def state_dict_for(model, sd):
    """`sd` in `model`'s names. Ours: every format `encoder_state_dict` takes. Any other model:
    only wrapper prefixes come off; the ConvNeXt V2 renames would break keys that are already
    right (timm's `mlp.grn.weight` is [dim], LeViT's `.linear.` is a real module name)."""
    if is_ours(model):
        return encoder_state_dict(sd)
    return _strip_wrappers(dict(sd), own=model.state_dict())


def fit(model, sd):
    """The entries of checkpoint state dict `sd` that go into `model` (see `check_fit`): ours
    may lack its head and final norm (a FCMAE encoder has neither), any model its classifier."""
    allowed = ("head.", "norm.") if is_ours(model) else ()
    return check_fit(model.state_dict(), state_dict_for(model, sd),
                     classifier_prefixes(model), allowed)


class Loaded(NamedTuple):
    """What `load_into` left: the model's keys the checkpoint did not fill, and the reverse."""
    missing: list
    unexpected: list


def load_into(model, sd):
    """Load `sd` into `model`, non-strictly, after `fit`. Returns Loaded(missing, unexpected)."""
    result = model.load_state_dict(fit(model, sd), strict=False)
    return Loaded(list(result.missing_keys), list(result.unexpected_keys))


def variant_of(sd):
    """Our model name whose depths and dims match a ConvNeXtV2 state dict."""
    from models.convnextv2 import VARIANTS
    depths, dims = [], []
    for i in range(4):
        blocks = {m.group(1) for m in (re.match(rf"stages\.{i}\.(\d+)\.", k) for k in sd) if m}
        depths.append(len(blocks))
        w = sd.get(f"stages.{i}.0.dwconv.weight")
        dims.append(None if w is None else w.shape[0])
    for name, (d, c) in VARIANTS.items():
        if tuple(depths) == d and tuple(dims) == c:
            return name
    raise ModelError(f"weights with depths {depths} and dims {dims} match none of our "
                     "ConvNeXt V2 variants; pass a ConvNeXt V2 checkpoint")


class TimmWeights(NamedTuple):
    """A checkpoint in timm's names, with the timm model name and class count it is for."""
    state_dict: dict
    name: str
    num_classes: int


def to_timm_state_dict(sd):
    """Any supported checkpoint state dict -> TimmWeights(timm-named state dict, name, classes)."""
    import timm
    from timm.models.convnext import checkpoint_filter_fn

    from models.convnextv2 import VARIANTS, ConvNeXtV2
    dense = encoder_state_dict(sd)
    if "stages.0.0.dwconv.weight" not in dense:
        raise ModelError("the checkpoint is neither ours nor an official ConvNeXt V2 one "
                         "(no stages.0.0.dwconv weight); pass a ConvNeXt V2 checkpoint")
    name = variant_of(dense)
    num_classes = dense["head.weight"].shape[0] if "head.weight" in dense else 0
    depths, dims = VARIANTS[name]
    with torch.device("meta"):  # shapes only, no memory, no init cost
        ours = ConvNeXtV2(depths=depths, dims=dims, num_classes=num_classes)
        reference = timm.create_model(name, num_classes=num_classes)
    check_fit(ours.state_dict(), dense, head=())
    return TimmWeights(checkpoint_filter_fn(dense, reference), name, num_classes)


def _save_atomic(obj, path):
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def to_timm(src, dst, model_key=DEFAULT_MODEL_KEY):
    sd, name, num_classes = to_timm_state_dict(load_file(src, model_key))
    _save_atomic({k: v.contiguous() for k, v in sd.items()}, dst)
    if num_classes:
        how = (f"num_classes={num_classes}, pretrained_cfg_overlay=dict(file={str(dst)!r}, "
               f"num_classes={num_classes})")
    else:  # encoder only: timm loads non-strictly (head and final norm fresh) when the model's
        # num_classes differs from the file's; N=0 (features only): leave out the overlay's 0
        how = (f"num_classes=<yours, 1 or more>, pretrained_cfg_overlay=dict(file={str(dst)!r}, "
               "num_classes=0)")
    print(f"wrote {dst}; load it with timm.create_model({name!r}, pretrained=True, {how})")


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m models.weights",
                                     description="Convert ConvNeXt V2 checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("to_timm", help="ours or official (fine-tune or FCMAE) -> timm names")
    p.add_argument("src", metavar="IN")
    p.add_argument("dst", metavar="OUT")
    p.add_argument("--model-key", "--model_key", dest="model_key", default=DEFAULT_MODEL_KEY,
                   help="checkpoint key(s) holding the weights, first present wins "
                        f"(default {DEFAULT_MODEL_KEY})")
    return parser


def main(argv=None):
    """The CLI; a ModelError is one line `error: ...` on stderr and exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "to_timm":
            to_timm(args.src, args.dst, args.model_key)
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()

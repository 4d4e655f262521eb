"""Weights in and out: every ConvNeXt V2 format we read, and the ones we write.

Takes, and turns into `ConvNeXtV2` names and shapes (`encoder_state_dict`):
- a plain ConvNeXtV2 state dict (ours, or an official fine-tuned one);
- our FCMAE state dict (`encoder.*`; decoder parts dropped);
- an official sparse (MinkowskiEngine) FCMAE state dict: `kernel` tensors, `.ln.`/`.linear.`
  name parts, GRN and biases as [1, dim];
- an official dense `*_fcmae.pt` (dense names, maybe under `encoder.`, GRN [1, dim]);
- timm's convnextv2 (`stem.0.weight`, `stages.0.blocks.0.mlp.grn.weight` [dim], ...);
- Hugging Face transformers' ConvNextV2ForImageClassification / ConvNextV2Model
  (`convnextv2.embeddings...`, `convnextv2.encoder.stages...`, `classifier.*`).
A linear probe's checkpoint (a frozen network under a new head: a BatchNorm without affine
parameters, then a Linear) converts with that head folded into one Linear (`fold_probe_head`).
Files: torch (`.pth`, `.pt`, `.bin`; `read_torch_file`, the suite's one weights-only load),
`.safetensors`, or a Hugging Face folder (`config.json` + `model.safetensors`, sharded or
`pytorch_model.bin`).
Anything it cannot place is an error, not a silently skipped key. These conversions apply to
our `ConvNeXtV2` only: a timm model (`--model resnet18`, timm's own `convnextv2_*`) already uses
its own names, so its checkpoints only lose wrapper prefixes (see `fit`). A stem for another
number of bands (3-band weights, a 4-band model) is adapted with timm's `adapt_input_conv`.

Out (`convert --to`): ours (`{"model": ...}`), timm, hf (a folder `from_pretrained` loads) and
official (a FCMAE encoder in the released layout, GRN [1, dim], that the original fine-tuning
code maps back without loss); OUT ending in `.safetensors` writes safetensors. The number of
bands travels (the stem's shape; timm's `in_chans`, Hugging Face's `num_channels`). `--to onnx`:
an ONNX file checked by onnxruntime against torch before it is written (models/onnx_export.py).

`average_checkpoints`: the mean of checkpoints' weights (and EMA weights), as a checkpoint.

`select_state_dict` picks the weights out of a checkpoint as fine-tuning does (key, prefix).
Errors are `ModelError`s naming the arguments, not the scripts' flags (models/errors.py).

CLI: python -m models.weights convert IN OUT --to ours|timm|hf|official|onnx [--model-key K]
     python -m models.weights to_timm IN OUT [--model-key K]   (= convert --to timm)
     python -m models.weights average OUT IN [IN ...] [--model-key K]
"""
import argparse
import json
import math
import os
import pickle
import re
import sys
import warnings
from typing import NamedTuple

import torch

from models.atomic import atomic_file, atomic_torch_save, atomic_write_text
from models.errors import ModelError

DECODER_PREFIXES = ("proj.", "decoder.", "pred.", "mask_token")
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")  # DDP, torch.compile, a wrapping module
DEFAULT_MODEL_KEY = "model|module"


def select_state_dict(checkpoint, model_key=DEFAULT_MODEL_KEY, prefix=""):
    """The weights in a loaded checkpoint: the entry under the first of `model_key` ('a|b')
    present, else the checkpoint itself (a bare state dict); with `prefix`, only the keys that
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


def read_torch_file(path, mmap=False):
    """A torch checkpoint file read as data, on CPU: weights-only, allowing argparse.Namespace
    (the original code stores its arguments as one under "args"; a Namespace only holds
    attributes, unpickled under the same rules) and no other object, so a file carrying pickled
    code is refused and nothing runs. `mmap`: map the file instead of reading it (a cheap look
    at a big checkpoint)."""
    if not os.path.isfile(path):
        raise ModelError(f"checkpoint {path} does not exist; check the path")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError:
                if not mmap:  # mmap needs the zip format: read older files the ordinary way
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated files, not a torch file
        lines = str(e).splitlines()
        what = ([ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln] or lines or [""])[0].strip()[:160]
        if isinstance(e, pickle.UnpicklingError) and "GLOBAL" in what:
            raise ModelError(f"refusing to load {path}: it holds pickled Python objects that could run code "
                             f"({what}); nothing was run; re-save it as plain tensors") from None
        raise ModelError(f"checkpoint {path} is damaged or not a torch file (cannot read it: {what}); "
                         "use another checkpoint") from None


HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
              "pytorch_model.bin.index.json")


def is_safetensors(path):
    """A safetensors file: by its name, or by its header (8-byte length, then a JSON object)."""
    if str(path).endswith(".safetensors"):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 1 << 32


def read_safetensors(path):
    """All tensors of a safetensors file (on CPU). A truncated or foreign file is a ModelError."""
    from safetensors.torch import load_file as load_safetensors
    if not os.path.isfile(path):
        raise ModelError(f"weights file {path} does not exist; check the path")
    try:
        return load_safetensors(path)
    except Exception as e:  # SafetensorError: truncated, bad header; OSError
        raise ModelError(f"cannot read safetensors file {path} ({str(e).splitlines()[0][:120]}); "
                         "it is truncated or not a safetensors file: download or write it again") from None


def read_hf_config(folder):
    """A Hugging Face folder's config.json, checked: model_type convnextv2, depths and hidden
    sizes of one of our variants. Returns (config dict, variant name)."""
    from models.convnextv2 import VARIANTS
    path = os.path.join(folder, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {path} ({e}); a Hugging Face folder needs its config.json") from None
    kind = config.get("model_type") if isinstance(config, dict) else None
    if kind != "convnextv2":
        raise ModelError(f"{path} describes a {kind!r} model, not ConvNeXt V2 (model_type "
                         "'convnextv2'); pass a ConvNeXt V2 folder")
    shape = (tuple(config.get("depths") or ()), tuple(config.get("hidden_sizes") or ()))
    for name, variant in VARIANTS.items():
        if shape == variant:
            return config, name
    raise ModelError(f"{path}: depths {list(shape[0])} and hidden_sizes {list(shape[1])} match none "
                     f"of our ConvNeXt V2 variants ({', '.join(VARIANTS)}); pass a released variant")


def read_hf_folder(folder):
    """The state dict of a Hugging Face ConvNeXt V2 folder (one file or shards) and its config."""
    config = read_hf_config(folder)[0] if os.path.exists(os.path.join(folder, "config.json")) else None
    found = [n for n in HF_WEIGHTS if os.path.isfile(os.path.join(folder, n))]
    if not found:
        raise ModelError(f"folder {folder} holds no weights (none of {', '.join(HF_WEIGHTS)}); "
                         "download the model's weights file into it")
    path = os.path.join(folder, found[0])
    if not path.endswith(".index.json"):
        return read_weights(path), config
    try:
        with open(path, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    except (OSError, ValueError, KeyError, AttributeError) as e:
        raise ModelError(f"cannot read the shard index {path} ({e}); download it again") from None
    sd = {}
    for shard in shards:
        sd.update(read_weights(os.path.join(folder, shard)))
    return sd, config


def read_folder_or_safetensors(path):
    """The weights of a Hugging Face folder or a safetensors file; None for a torch file (read it
    with `read_torch_file`: the caller picks its weights and reports its errors)."""
    if os.path.isdir(path):
        return read_hf_folder(path)[0]
    if is_safetensors(path):
        return read_safetensors(path)
    return None


def read_weights(path, model_key=DEFAULT_MODEL_KEY):
    """The state dict in any file or folder we read (see the module's docstring)."""
    sd = read_folder_or_safetensors(path)
    return select_state_dict(read_torch_file(path), model_key) if sd is None else sd


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


_B = r"stages\.(\d+)\.blocks\.(\d+)\."  # a timm block
_L = r"(?:convnextv2\.)?encoder\.stages\.(\d+)\.layers\.(\d+)\."  # a Hugging Face block
# (pattern at the start of a key, replacement): timm's / Hugging Face's names -> ours
FROM_TIMM = ((r"stem\.0\.", "downsample_layers.0.0."), (r"stem\.1\.", "downsample_layers.0.1."),
             (r"stages\.(\d+)\.downsample\.(\d)\.", r"downsample_layers.\1.\2."),
             (_B + r"conv_dw\.", r"stages.\1.\2.dwconv."), (_B + r"norm\.", r"stages.\1.\2.norm."),
             (_B + r"mlp\.fc1\.", r"stages.\1.\2.pwconv1."), (_B + r"mlp\.fc2\.", r"stages.\1.\2.pwconv2."),
             (_B + r"mlp\.grn\.weight$", r"stages.\1.\2.grn.gamma"),
             (_B + r"mlp\.grn\.bias$", r"stages.\1.\2.grn.beta"),
             (r"head\.norm\.", "norm."), (r"head\.fc\.", "head."))
FROM_HF = ((r"(?:convnextv2\.)?embeddings\.patch_embeddings\.", "downsample_layers.0.0."),
           (r"(?:convnextv2\.)?embeddings\.layernorm\.", "downsample_layers.0.1."),
           (r"(?:convnextv2\.)?encoder\.stages\.(\d+)\.downsampling_layer\.(\d)\.", r"downsample_layers.\1.\2."),
           (_L + r"layernorm\.", r"stages.\1.\2.norm."), (_L + r"grn\.weight$", r"stages.\1.\2.grn.gamma"),
           (_L + r"grn\.bias$", r"stages.\1.\2.grn.beta"), (_L, r"stages.\1.\2."),
           (r"(?:convnextv2\.)?layernorm\.", "norm."), (r"classifier\.", "head."))
# ours -> Hugging Face (ConvNextV2Model names; the classifier model adds `convnextv2.`)
TO_HF = ((r"downsample_layers\.0\.0\.", "embeddings.patch_embeddings."),
         (r"downsample_layers\.0\.1\.", "embeddings.layernorm."),
         (r"downsample_layers\.(\d)\.(\d)\.", r"encoder.stages.\1.downsampling_layer.\2."),
         (r"stages\.(\d+)\.(\d+)\.norm\.", r"encoder.stages.\1.layers.\2.layernorm."),
         (r"stages\.(\d+)\.(\d+)\.grn\.gamma$", r"encoder.stages.\1.layers.\2.grn.weight"),
         (r"stages\.(\d+)\.(\d+)\.grn\.beta$", r"encoder.stages.\1.layers.\2.grn.bias"),
         (r"stages\.(\d+)\.(\d+)\.", r"encoder.stages.\1.layers.\2."),
         (r"norm\.", "layernorm."), (r"head\.", "classifier."))
_HF_KEY = re.compile(r"(?:convnextv2\.)?(?:embeddings\.patch_embeddings\.|"
                     r"encoder\.stages\.\d+\.(?:layers|downsampling_layer)\.)")
_TIMM_KEY = re.compile(r"stem\.[01]\.|stages\.\d+\.(?:blocks|downsample)\.")


def source_format(sd):
    """'hf', 'timm' or 'official' (ours, official fine-tuned, any FCMAE layout) by the keys."""
    if any(_HF_KEY.match(k) for k in sd):
        return "hf"
    if any(_TIMM_KEY.match(k) for k in sd):
        return "timm"
    return "official"


def rename(key, rules):
    """`key` after the first rule whose pattern matches its start; unchanged if none does (so
    a key of another architecture stays visible to the fit check)."""
    for pattern, replacement in rules:
        new, n = re.subn("^" + pattern, replacement, key, count=1)
        if n:
            return new
    return key


def _from_named(sd, rules):
    """timm's or Hugging Face's names -> ours; 1x1-conv MLP weights (timm) become Linear ones,
    GRN [dim] / [1, 1, 1, dim] becomes [1, 1, 1, dim]."""
    out = {}
    for key, value in sd.items():
        key = rename(key, rules)
        if re.search(r"\.pwconv[12]\.weight$", key) and value.dim() == 4:
            value = value.flatten(1)
        elif ".grn." in key:
            value = value.reshape(1, 1, 1, -1)
        out[key] = value
    return out


def encoder_state_dict(sd):
    """Any supported ConvNeXt V2 / FCMAE state dict (ours, official, timm, Hugging Face) ->
    ConvNeXtV2 names and shapes."""
    sd = _strip_wrappers(dict(sd))
    fmt = source_format(sd)
    if fmt != "official":
        return _from_named(sd, FROM_HF if fmt == "hf" else FROM_TIMM)
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


def _describe(problems, n=3):
    more = f" (+{len(problems) - n} more)" if len(problems) > n else ""
    return "; ".join(problems[:n]) + more


class VariantMismatch(ModelError):
    """Weights of one ConvNeXt V2 variant for a model of another: names both. `message(arg)`
    names the model's argument as the caller calls it (a script: its flag)."""

    def __init__(self, found, wanted, detail):
        self.found, self.wanted, self.detail = found, wanted, detail
        super().__init__(self.message())

    def message(self, model_arg="model"):
        return (f"checkpoint does not fit the model: {self.detail}: the checkpoint is {self.found}, "
                f"{model_arg} is {self.wanted}; pass a {self.wanted} checkpoint or use {model_arg} "
                f"{self.found}")


def explain(e, model_arg="model"):
    """The message of ModelError `e`, with the model's argument called `model_arg`."""
    return e.message(model_arg) if isinstance(e, VariantMismatch) else str(e)


def _variant_or_none(sd):
    try:
        return variant_of(sd)
    except ModelError:
        return None


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


def check_fit(own, sd, head=("head.",), allowed_missing=("head.", "norm."), variants=False):
    """Which entries of the converted `sd` fit `own` (a model's state dict, meta tensors are
    fine). Keys under the `head` prefixes (the classifier) that the model lacks or has in
    another shape are dropped with a warning; any other key or shape that does not fit, or a
    missing key outside `allowed_missing` and `head`, raises ModelError. `variants` (both in
    ConvNeXtV2 names): weights of another of our variants raise VariantMismatch."""
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
    found, wanted = (_variant_or_none(sd), _variant_or_none(own)) if variants else (None, None)
    if problems and found and wanted and found != wanted:
        raise VariantMismatch(found, wanted, _describe(problems, 1))
    if not placed:
        raise ModelError("the checkpoint is neither a ConvNeXt V2 checkpoint (ours, official, timm or "
                         "Hugging Face) nor one of this model (no key fits); pass a matching checkpoint")
    missing = [k for k in own if k not in sd]
    bad_missing = [k for k in missing if not k.startswith(tuple(allowed_missing) + tuple(head))]
    if bad_missing:
        problems.append(f"missing {len(bad_missing)} keys, e.g. {', '.join(bad_missing[:3])}")
    if problems:
        raise ModelError(f"checkpoint does not fit the model: {_describe(problems)}; "
                         "pass a checkpoint of the same model")
    return placed


def first_conv_keys(model):
    """The weight names of the model's input convolution: ours `downsample_layers.0.0.weight`,
    a timm model's as its `pretrained_cfg['first_conv']` names it (`stem.0`, `conv1`, ...)."""
    if is_ours(model):
        return ("downsample_layers.0.0.weight",)
    names = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    names = [names] if isinstance(names, str) else list(names or ())
    return tuple(f"{n}.weight" for n in names)


def adapt_stem(own, sd, keys, note=None):
    """`sd` with its input convolution (`keys`) made to take the model's (`own`) number of bands
    when only that differs (3-band weights into a 4-band stem, or into a 1-band one): timm's
    `adapt_input_conv`, as timm's own pretrained loading does (the bands' weights repeated and
    scaled by old / new; for one band, summed). `note(line)` is told each adaptation."""
    sd = dict(sd)
    for key in keys:
        w, mine = sd.get(key), own.get(key)
        if w is None or mine is None or w.dim() != 4 or mine.dim() != 4 or w.shape[1] == mine.shape[1] \
                or w.shape[0] != mine.shape[0] or w.shape[2:] != mine.shape[2:]:
            continue
        from timm.models import adapt_input_conv  # timm only here (a slow import)
        old, new = w.shape[1], mine.shape[1]
        sd[key] = adapt_input_conv(new, w, base_chans=old)
        if note is not None:
            how = "summed over its bands" if new == 1 else f"its bands repeated and scaled by {old}/{new}"
            note(f"the checkpoint's stem {key} takes {old} bands, the model {new}: adapted with timm's "
                 f"adapt_input_conv ({how})")
    return sd


def fit(model, sd, note=None):
    """The entries of checkpoint state dict `sd` that go into `model` (see `check_fit`): ours
    may lack its head and final norm (a FCMAE encoder has neither), any model its classifier.
    Ours takes every format `encoder_state_dict` does; from any other model's checkpoint only
    wrapper prefixes come off: the ConvNeXt V2 renames would break keys that are already right
    (timm's `mlp.grn.weight` is [dim], LeViT's `.linear.` is a real module name). A stem for
    another number of bands is adapted (`adapt_stem`; `note(line)` is told)."""
    ours, own = is_ours(model), model.state_dict()
    sd = encoder_state_dict(sd) if ours else _strip_wrappers(dict(sd), own=own)
    sd = adapt_stem(own, sd, first_conv_keys(model), note)
    return check_fit(own, sd, classifier_prefixes(model), ("head.", "norm.") if ours else (), variants=ours)


def load_into(model, sd, note=None):
    """Load `sd` into `model`, non-strictly, after `fit` (`note(line)`: told of an adapted stem).
    Returns (missing, unexpected): the model's keys the checkpoint did not fill, and the reverse."""
    result = model.load_state_dict(fit(model, sd, note), strict=False)
    return list(result.missing_keys), list(result.unexpected_keys)


def is_fcmae(model):
    """True for our FCMAE pretraining model (models/fcmae.py)."""
    from models.fcmae import FCMAE
    return isinstance(model, FCMAE)


class FcmaeStart(NamedTuple):
    """What a checkpoint gives a FCMAE model (`fit_fcmae`): the weights to load, in the model's
    names, and in words what they are and what starts fresh."""
    state_dict: dict
    loaded: tuple       # "encoder", "decoder", "mask token"
    fresh: tuple        # "decoder", "mask token" or "prediction layer": the model's own init
    why_fresh: str      # why those start fresh ("" when nothing does); names the model's arguments
    unused: tuple       # parts of the file a FCMAE has no place for: "classifier head", "final norm"
    adapted: str        # how the stem was adapted to the model's bands ("" when it was not)


def _decoder_shape(sd, patch_size):
    """(width, blocks, bands predicted) of the FCMAE decoder in `sd` (None where unknown)."""
    width = next((v.shape[k] for key, k in (("mask_token", 1), ("proj.weight", 0)) if (v := sd.get(key)) is not None),
                 None)
    blocks = len({m.group(1) for m in (re.match(r"decoder\.(\d+)\.", k) for k in sd) if m})
    pred = sd.get("pred.weight")
    bands = None if pred is None or pred.shape[0] % (patch_size ** 2) else pred.shape[0] // patch_size ** 2
    return width, blocks, bands


def _fits(own, sd, prefixes):
    """The first reason the entries of `sd` under `prefixes` do not fill exactly the model's
    (`own`) entries under them, or None when they do."""
    mine = {k for k in own if k.startswith(prefixes)}
    theirs = {k for k in sd if k.startswith(prefixes)}
    if theirs - mine:
        return f"unknown key {sorted(theirs - mine)[0]}"
    if mine - theirs:
        return f"missing {sorted(mine - theirs)[0]}"
    bad = [k for k in sorted(mine) if tuple(sd[k].shape) != tuple(own[k].shape)]
    return f"{bad[0]} has shape {tuple(sd[bad[0]].shape)}, the model {tuple(own[bad[0]].shape)}" if bad else None


def fit_fcmae(model, sd, note=None):
    """A checkpoint's state dict `sd` for a FCMAE `model` (meta tensors are fine), as a
    FcmaeStart. The encoder from any format `encoder_state_dict` takes (ours, fine-tuned or
    FCMAE; official sparse or dense; timm; Hugging Face), whole: a classifier head and final norm
    are left unused, a stem for another number of bands is adapted (`adapt_stem`, `note(line)` is
    told), anything else that does not fit raises ModelError (VariantMismatch for another
    variant). The decoder (projection, blocks, prediction layer) and the mask token are taken
    when the file has them in the model's shapes (our FCMAE checkpoints; an official file with
    its decoder); when only the bands predicted differ (a stem adapted to other bands), all but
    the prediction layer; otherwise they start fresh, and `why_fresh` says why."""
    sd = _strip_wrappers(dict(sd))
    decoder = {k: v for k, v in sd.items() if k.startswith(DECODER_PREFIXES)}
    rest = {k: v for k, v in sd.items() if not k.startswith(DECODER_PREFIXES)}
    if not rest:
        what = f"only FCMAE decoder parts, e.g. {', '.join(sorted(decoder)[:2])}" if decoder else "no weights at all"
        raise ModelError(f"the checkpoint holds no encoder weights ({what}); pass a checkpoint with a "
                         "ConvNeXt V2 encoder (ours, official, timm or Hugging Face)")
    encoder = encoder_state_dict(rest)
    unused = tuple(name for prefix, name in (("head.", "classifier head"), ("norm.", "final norm"))
                   if any(k.startswith(prefix) for k in encoder))
    encoder = {k: v for k, v in encoder.items() if not k.startswith(("head.", "norm."))}
    own_encoder = model.encoder.state_dict()
    adapted = []
    encoder = adapt_stem(own_encoder, encoder, first_conv_keys(model.encoder),
                         lambda line: (adapted.append(line), note and note(line)))
    placed = {"encoder." + k: v for k, v in
              check_fit(own_encoder, encoder, head=(), allowed_missing=(), variants=True).items()}
    own = model.state_dict()
    for key, value in list(decoder.items()):  # a GRN kept as [1, dim] (as the encoder's may be)
        if ".grn." in key and key in own and value.numel() == own[key].numel():
            decoder[key] = value.reshape(own[key].shape)
    loaded, fresh, why = ("encoder",), ("decoder", "mask token"), ""
    body = ("proj.", "decoder.", "mask_token")
    if not decoder:
        why = "the file has none"
    elif _fits(own, decoder, body) is None:
        placed.update({k: v for k, v in decoder.items() if k.startswith(body)})
        loaded, fresh = ("encoder", "decoder", "mask token"), ()
        if _fits(own, decoder, ("pred.",)) is None:
            placed.update({k: v for k, v in decoder.items() if k.startswith("pred.")})
        else:
            fresh = ("prediction layer",)
            theirs, mine = _decoder_shape(decoder, model.patch_size)[2], model.in_chans
            why = (f"the file's prediction layer predicts {theirs} bands per pixel, in_chans is {mine}" if theirs
                   else f"the file's does not fit: {_fits(own, decoder, ('pred.',))}")
    else:
        (w, b, _), (mw, mb, _) = _decoder_shape(decoder, model.patch_size), _decoder_shape(own, model.patch_size)
        if (w, b) != (mw, mb) and w is not None:
            why = (f"the file's decoder is {w} wide with {b} block{'s' * (b != 1)}, decoder_embed_dim is {mw} "
                   f"and decoder_depth {mb}")
        else:
            why = f"the file's decoder does not fit: {_fits(own, decoder, body)}"
    return FcmaeStart(placed, loaded, fresh, why, unused, "; ".join(adapted))


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


class Ours(NamedTuple):
    """Checked weights in ConvNeXtV2 names: the variant, classes (0: an encoder), channels."""
    state_dict: dict
    name: str
    num_classes: int
    in_chans: int


PROBE_BN_EPS = 1e-6  # the linear probe's BatchNorm eps (engine_finetune builds it so; a state dict holds no eps)


def fold_probe_head(sd):
    """A linear probe's head (`head.0.*` a BatchNorm1d without affine parameters, eps
    PROBE_BN_EPS; `head.1.*` a Linear) folded into one Linear, `head.weight` and `head.bias`, so
    the weights are a plain ConvNeXt V2 classifier: in evaluation the BatchNorm is
    x -> (x - mean) / s, s = sqrt(var + eps), so W' = W / s and b' = b - W' mean (computed in
    float64). Any other state dict (ConvNeXtV2 names) is returned as it is."""
    if "head.0.running_var" not in sd or "head.0.weight" in sd or "head.1.weight" not in sd:
        return sd
    out = {k: v for k, v in sd.items() if not k.startswith(("head.0.", "head.1."))}
    w, b = sd["head.1.weight"], sd["head.1.bias"]
    folded = w.double() * (sd["head.0.running_var"].double() + PROBE_BN_EPS).rsqrt()
    out["head.weight"] = folded.to(w.dtype)
    out["head.bias"] = (b.double() - folded @ sd["head.0.running_mean"].double()).to(b.dtype)
    return out


def checked_ours(sd):
    """Any supported state dict -> Ours: converted (a linear probe's head folded into one Linear,
    `fold_probe_head`), its variant found, every key placed (only the head and final norm may be
    missing, as in a FCMAE encoder)."""
    from models.convnextv2 import VARIANTS, ConvNeXtV2
    dense = fold_probe_head(encoder_state_dict(sd))
    if "stages.0.0.dwconv.weight" not in dense:
        raise ModelError("the checkpoint is neither ours nor an official, timm or Hugging Face "
                         "ConvNeXt V2 one (no weights of a first block); pass a ConvNeXt V2 checkpoint")
    name = variant_of(dense)
    num_classes = dense["head.weight"].shape[0] if "head.weight" in dense else 0
    stem = dense.get("downsample_layers.0.0.weight")
    in_chans = 3 if stem is None else stem.shape[1]
    depths, dims = VARIANTS[name]
    with torch.device("meta"):  # shapes only, no memory, no init cost
        model = ConvNeXtV2(in_chans=in_chans, depths=depths, dims=dims, num_classes=num_classes)
    check_fit(model.state_dict(), dense, head=())
    return Ours(dense, name, num_classes, in_chans)


def to_timm_state_dict(ours):
    """timm's names for `ours` (the same model name, classes and bands in timm)."""
    import timm
    from timm.models.convnext import checkpoint_filter_fn
    with torch.device("meta"):
        reference = timm.create_model(ours.name, num_classes=ours.num_classes, in_chans=ours.in_chans)
    return checkpoint_filter_fn(ours.state_dict, reference)


def to_official_state_dict(ours):
    """The released FCMAE layout: dense names under `encoder.`, GRN [1, dim], no head or final
    norm. The original fine-tuning code maps this back whole; a GRN of [1, 1, 1, dim] it would
    make 6-d and its lenient loader would leave at zero."""
    return {"encoder." + k: (v.reshape(1, -1) if ".grn." in k else v)
            for k, v in ours.state_dict.items() if not k.startswith(("head.", "norm."))}


def to_hf_state_dict(ours):
    """Hugging Face names: ConvNextV2ForImageClassification's with a head, else ConvNextV2Model's."""
    prefix = "convnextv2." if ours.num_classes else ""
    out = {}
    for key, value in ours.state_dict.items():
        key = rename(key, TO_HF)
        out[key if key.startswith("classifier.") else prefix + key] = value
    return out


def hf_config(ours, labels=None):
    """config.json for `ours`: depths, hidden sizes, classes and their labels (LABEL_i unless
    given). layer_norm_eps 1e-6 as in the original (transformers' default is 1e-12)."""
    from models.convnextv2 import VARIANTS
    depths, dims = VARIANTS[ours.name]
    config = {"architectures": ["ConvNextV2ForImageClassification" if ours.num_classes else "ConvNextV2Model"],
              "model_type": "convnextv2", "depths": list(depths), "hidden_sizes": list(dims),
              "num_channels": int(ours.in_chans), "num_stages": 4, "patch_size": 4, "hidden_act": "gelu",
              "layer_norm_eps": 1e-6, "drop_path_rate": 0.0, "initializer_range": 0.02, "image_size": 224}
    if ours.num_classes:
        labels = list(labels or [f"LABEL_{i}" for i in range(ours.num_classes)])
        if len(labels) != ours.num_classes:
            raise ModelError(f"labels has {len(labels)} names, the checkpoint {ours.num_classes} "
                             "classes; give one label per class, in class order")
        config["id2label"] = {str(i): str(label) for i, label in enumerate(labels)}
        config["label2id"] = {str(label): i for i, label in enumerate(labels)}
    return config


def save_weights(sd, path, key=None):
    """Write state dict `sd` atomically: safetensors when `path` ends in `.safetensors` (flat,
    metadata format "pt"), else a torch file, under `key` when given."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file
        tensors, seen = {}, set()  # contiguous CPU tensors sharing no memory (what safetensors stores)
        for k, v in sd.items():
            v = v.detach().cpu().contiguous()
            ptr = v.untyped_storage().data_ptr()
            tensors[k] = v.clone() if ptr in seen else v
            seen.add(ptr)
        with atomic_file(path) as f:
            save_file(tensors, f.name, metadata={"format": "pt"})  # streams into the temporary, by its path
    else:
        obj = {k: v.contiguous() for k, v in sd.items()}
        atomic_torch_save({key: obj} if key else obj, path)


FORMATS_OUT = ("ours", "timm", "hf", "official", "onnx")


def convert(src, dst, to, model_key=DEFAULT_MODEL_KEY, labels_file=None, image_size=224):
    """Read `src` (any format we read), check it whole, then write `dst` in format `to`
    (ours, timm, hf, official, onnx: checked by onnxruntime at `image_size`, see
    models/onnx_export.py). Returns the line telling how to load the result."""
    sd, source_config = read_hf_folder(src) if os.path.isdir(src) else (read_weights(src, model_key), None)
    try:
        ours = checked_ours(sd)
    except ModelError as e:
        if to != "onnx":
            raise
        # the export's check is against our ConvNeXt V2 (its GRN made fp16-safe): any other model is
        # one we cannot stand behind
        raise ModelError(f"{e}; the ONNX export exports and checks ConvNeXt V2 only (ours, official, timm's "
                         "convnextv2_* or Hugging Face): export another timm model with timm's "
                         "onnx_export.py") from None
    if to == "onnx":
        from models.onnx_export import export_onnx
        return export_onnx(ours, dst, image_size)
    flat = str(dst).endswith(".safetensors")
    if to == "ours":
        save_weights(ours.state_dict, dst, key="model")
        how = (f"safetensors.torch.load_file({str(dst)!r})" if flat
               else f"torch.load({str(dst)!r}, weights_only=True)['model']")
        return f"load it with ConvNeXtV2.load_state_dict({how}), or fine-tune from it"
    if to == "official":
        save_weights(to_official_state_dict(ours), dst, key="model")
        if flat:
            return "the original release's code reads torch files: for it, write OUT as .pt"
        bands = "" if ours.in_chans == 3 else f", its model built with in_chans={ours.in_chans}"
        return f"the original release's fine-tuning code takes it (head and final norm start fresh{bands})"
    if to == "timm":
        save_weights(to_timm_state_dict(ours), dst)
        n, c = ours.num_classes, ours.in_chans
        # bands other than 3: the model's in_chans, and the file's in the overlay's input_size
        # (else timm would take the file for a 3-band one and warn, or adapt it)
        chans, size = ("", "") if c == 3 else (f"in_chans={c}, ", f", input_size=({c}, 224, 224)")
        if n:
            how = f"num_classes={n}, {chans}pretrained_cfg_overlay=dict(file={str(dst)!r}, num_classes={n}{size})"
        else:  # encoder only: timm loads non-strictly (head and final norm fresh) when the model's
            # num_classes differs from the file's; N=0 (features only): leave out the overlay's 0
            how = (f"num_classes=<yours, 1 or more>, {chans}pretrained_cfg_overlay=dict(file={str(dst)!r}, "
                   f"num_classes=0{size})")
        return f"load it with timm.create_model({ours.name!r}, pretrained=True, {how})"
    if to != "hf":
        raise ModelError(f"unknown format to={to!r}; choose one of {', '.join(FORMATS_OUT)}")
    if labels_file:
        try:
            with open(labels_file, encoding="utf-8") as f:
                labels = [line.strip() for line in f if line.strip()]
        except (OSError, UnicodeError) as e:
            raise ModelError(f"cannot read labels file {labels_file} ({e}); give a text file, one label "
                             "a line") from None
    else:  # the source's own labels, when it names every class
        id2label = (source_config or {}).get("id2label") or {}
        labels = [id2label.get(str(i), id2label.get(i)) for i in range(ours.num_classes)]
        labels = labels if ours.num_classes and None not in labels else None
    if os.path.isfile(dst) or flat:
        raise ModelError(f"{dst}: the Hugging Face format is a folder (config.json and "
                         "model.safetensors); give the path of a folder as dst")
    config = hf_config(ours, labels)
    sd = to_hf_state_dict(ours)
    os.makedirs(dst, exist_ok=True)
    atomic_write_text(os.path.join(dst, "config.json"), json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_weights(sd, os.path.join(dst, "model.safetensors"))
    return f"load it with transformers.{config['architectures'][0]}.from_pretrained({str(dst)!r})"


# what a checkpoint holds of one run's training (ours: util/train_state.py), not of its weights: an
# average leaves these out (so --resume of it restarts the optimizer, and auto-resume never prefers it)
TRAINING_STATE = ("optimizer", "scaler", "rng", "step", "global_step", "world_size", "best", "epoch_done")
EMA_KEY = "model_ema"


def average_checkpoints(srcs, dst, model_key=DEFAULT_MODEL_KEY):
    """Write to `dst` the mean of the weights of the checkpoints `srcs` (timm's avg_checkpoints.py:
    floating tensors summed in float64, then cast back; integer buffers, e.g. BatchNorm's
    counter, are the first's), and the mean of their EMA weights (`model_ema`) when every one
    has them. Every input must hold the same model: for ConvNeXt V2 the same variant, classes and
    bands (named in the error), for any model the same keys and shapes. `dst` is a checkpoint
    of the first input with the averaged weights under "model" (and "model_ema"): its other
    entries (args, extra: the settings and class names --eval, --predict and --finetune read) are
    kept, the training state is left out (TRAINING_STATE), "epoch" is the newest input's and
    "averaged_from" lists the inputs. Inputs are read one at a time, memory-mapped. Returns
    the line telling how to use it."""
    if len(srcs) < 2:
        raise ModelError(f"average needs two or more checkpoints, got {len(srcs)}; list every checkpoint "
                         "to average (e.g. checkpoint-9*.pth)")
    if any(os.path.abspath(s) == os.path.abspath(dst) for s in srcs):
        raise ModelError(f"{dst} is also one of the inputs; give a new OUT file")
    if str(dst).endswith(".safetensors"):
        raise ModelError(f"{dst}: average writes a checkpoint (.pth), the kind a run resumes from; write OUT "
                         "as .pth, then convert it into our names in a .safetensors file (the convert command)")
    first, first_sd, what, shapes, epochs = None, None, None, None, []
    sums, ema_sums = {}, {}
    for i, path in enumerate(srcs):
        ckpt = read_folder_or_safetensors(path)  # a bare weights file or folder: no EMA, no epoch
        ckpt = read_torch_file(path, mmap=True) if ckpt is None else ckpt
        sd = select_state_dict(ckpt, model_key)
        wrapper = ckpt if sd is not ckpt else {}  # a checkpoint around the weights (args, epoch, EMA)
        if not sd or not all(torch.is_tensor(v) for v in sd.values()):
            raise ModelError(f"{path} holds no weights under {model_key!r} (or at its top); average "
                             "checkpoints of the suite or weight files")
        try:  # our ConvNeXt V2 in any layout: what it is, in words
            o = checked_ours(sd)
            this = f"{o.name} with {o.num_classes} classes and {o.in_chans} bands"
        except ModelError:  # another model (a timm one): its keys and shapes must match
            this = None
        this_shapes = {k: (tuple(v.shape), v.is_floating_point()) for k, v in sd.items()}
        if i == 0:
            first, first_sd, what, shapes = wrapper, sd, this, this_shapes
        elif this != what and this and what:
            raise ModelError(f"{path} is a {this}, {srcs[0]} a {what}; average checkpoints of one model "
                             "(the same variant, classes and bands)")
        elif this_shapes != shapes:
            odd = sorted(set(shapes) ^ set(this_shapes)) or [k for k in shapes if shapes[k] != this_shapes[k]]
            raise ModelError(f"{path} does not hold the weights of {srcs[0]}'s model (e.g. {odd[0]}: "
                             f"{this_shapes.get(odd[0], 'absent')} vs {shapes.get(odd[0], 'absent')}); average "
                             "checkpoints of one model")
        ema = wrapper.get(EMA_KEY)
        if isinstance(ema, dict) and {k: (tuple(v.shape), v.is_floating_point()) for k, v in ema.items()} != shapes:
            raise ModelError(f"{path}: its {EMA_KEY} does not hold the weights of its model; the checkpoint is "
                             "damaged, leave it out")
        if ema_sums is not None and not isinstance(ema, dict):
            ema_sums = None  # one input without EMA weights: no averaged EMA
        for total, weights in ((sums, sd), (ema_sums, ema if ema_sums is not None else {})):
            for k, v in weights.items():
                if v.is_floating_point():
                    total[k] = v.double() if i == 0 else total[k].add_(v.double())
        if isinstance(wrapper.get("epoch"), int):
            epochs.append(wrapper["epoch"])
    n = len(srcs)
    out = {k: v for k, v in first.items() if k not in TRAINING_STATE + (EMA_KEY,) + tuple(model_key.split("|"))}
    out["model"] = {k: (sums[k] / n).to(v.dtype) if k in sums else v for k, v in first_sd.items()}
    if ema_sums:  # the first's integer buffers in the EMA too (they are not averaged)
        out[EMA_KEY] = {k: (ema_sums[k] / n).to(v.dtype) if k in ema_sums else v for k, v in first[EMA_KEY].items()}
    if epochs:  # what --eval reports and --resume continues after (a finished epoch)
        out.update(epoch=max(epochs), epoch_done=True)
    out["averaged_from"] = [os.path.abspath(s) for s in srcs]
    atomic_torch_save(out, dst)
    ema_note = f"with their EMA weights ({EMA_KEY})" if ema_sums else "(EMA weights: not every input has them)"
    use = (f"main_finetune.py --eval True --resume {dst}" if epochs
           else f"main_finetune.py --eval True --finetune {dst}")
    return (f"the mean of {n} checkpoints' weights {ema_note}; evaluate it with {use}, or start from it with "
            f"--finetune {dst}")


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m models.weights",
                                     description="Convert ConvNeXt V2 checkpoints, average them, export them to ONNX.")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="any format we read (ours, official, timm, Hugging Face; .pth, "
                                       ".pt, .bin, .safetensors or a folder) -> --to's format")
    c.add_argument("--to", required=True, choices=FORMATS_OUT,
                   help="ours: {'model': ConvNeXtV2 names}; timm: timm's names; hf: a folder "
                        "from_pretrained loads; official: a FCMAE encoder in the released layout; onnx: "
                        "OUT.onnx (batch and image size dynamic), written only when onnxruntime's outputs "
                        "match torch's (needs pip install onnx onnxscript onnxruntime)")
    c.add_argument("--labels", default=None, metavar="FILE",
                   help="hf: class names, one a line in class order (default: the source's, else LABEL_i)")
    c.add_argument("--input_size", "--input-size", dest="image_size", type=int, default=224, metavar="PX",
                   help="onnx: the image size onnxruntime is checked at, and that + 32 (default 224; at least 64)")
    p = sub.add_parser("to_timm", help="ours or official (fine-tune or FCMAE) -> timm names "
                                       "(= convert --to timm)")
    p.set_defaults(to="timm", labels=None, image_size=224)
    a = sub.add_parser("average", help="the mean of checkpoints' weights, and of their EMA weights when "
                                       "every one has them -> a checkpoint that --eval True --resume "
                                       "evaluates and --finetune starts from")
    a.add_argument("dst", metavar="OUT",
                   help="the averaged checkpoint (.pth): the first IN's args and extra (settings, class "
                        "names), the newest IN's epoch, no optimizer, scaler or RNG state (to train on "
                        "from it, use --finetune OUT)")
    a.add_argument("src", metavar="IN", nargs="+",
                   help="two or more checkpoints of one model (same variant, classes and bands), e.g. a "
                        "run's last epoch checkpoints; integer buffers are the first IN's")
    for q in (c, p):
        q.add_argument("src", metavar="IN")
        q.add_argument("dst", metavar="OUT", help="ending in .safetensors: a safetensors file")
    for q in (c, p, a):
        q.add_argument("--model-key", "--model_key", dest="model_key", default=DEFAULT_MODEL_KEY,
                       help="checkpoint key(s) holding the weights, first present wins "
                            f"(default {DEFAULT_MODEL_KEY})")
    return parser


def main(argv=None):
    """The CLI; a ModelError or a failed write is one line `error: ...` on stderr and exit 2."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "average":
            done = average_checkpoints(args.src, args.dst, args.model_key)
        else:
            done = convert(args.src, args.dst, args.to, args.model_key, args.labels, args.image_size)
        print(f"wrote {args.dst}; {done}")
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except OSError as e:
        print(f"error: cannot write {args.dst} ({e.strerror or e}); choose another OUT", file=sys.stderr,
              flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()

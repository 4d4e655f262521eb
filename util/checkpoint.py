"""Checkpoints: atomic save, weights-only load, newest-whole-checkpoint discovery, RNG capture.

A checkpoint we write holds only tensors and plain Python values (no argparse.Namespace, no numpy
objects), so the one weights-only loader, `models.weights.read_torch_file`, reads it.
"""
import argparse
import glob
import os
import random
import re
import sys

import numpy as np
import torch

from models.atomic import atomic_torch_save
from models.errors import ModelError
from models.weights import read_torch_file
from util.errors import UserError


def load_checkpoint(path, mmap=False):
    """`read_torch_file` (weights-only; `mmap`: map the file instead of reading it), its
    ModelError as the UserError a script reports."""
    try:
        return read_torch_file(path, mmap)
    except ModelError as e:
        raise UserError(str(e)) from None


def save_checkpoint(state, path):
    """Atomic: a crash or a full disk leaves the previous file at `path` whole. First deletes the
    half-written temporaries a killed process left (only one process writes a run's checkpoints)."""
    for tmp in glob.glob(os.path.join(os.path.dirname(os.path.abspath(path)), ".checkpoint-*.pth.*.tmp")):
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
    try:
        atomic_torch_save(state, path)
    except OSError as e:
        raise UserError(f"could not write checkpoint {path} ({e.strerror or e}); free disk space or "
                        "choose another --output_dir; the previous checkpoint is intact") from None


def _epoch_of(path):
    m = re.search(r"checkpoint-(\d+)\.pth$", path)
    return int(m.group(1)) if m else -1


def find_resumable(output_dir):
    """Return (path, checkpoint) of the newest whole checkpoint-last.pth or checkpoint-<epoch>.pth
    (newest first by modification time), skipping damaged ones. Read memory-mapped: weighing the candidates holds none of them in
    memory (8 ranks x a huge model)."""
    files = glob.glob(os.path.join(output_dir, "checkpoint-last.pth"))
    files += [f for f in glob.glob(os.path.join(output_dir, "checkpoint-*.pth")) if _epoch_of(f) >= 0]
    best = None
    for path in sorted(files, key=lambda f: (os.path.getmtime(f), _epoch_of(f)), reverse=True):
        try:
            ckpt = load_checkpoint(path, mmap=True)
        except UserError as e:
            print(f"warning: skipping {path}: {e}", file=sys.stderr)
            continue
        if not isinstance(ckpt, dict) or "model" not in ckpt:
            continue
        pos = (ckpt.get("global_step", -1), os.path.getmtime(path))
        if best is None or pos > best[0]:
            best = (pos, path, ckpt)
    return (best[1], best[2]) if best else (None, None)


def prune_epoch_checkpoints(output_dir, keep):
    files = sorted((f for f in glob.glob(os.path.join(output_dir, "checkpoint-*.pth")) if _epoch_of(f) >= 0),
                   key=_epoch_of)
    for f in files[:-keep] if keep > 0 else []:
        os.remove(f)


def rng_state():
    """This process's RNG streams as plain tensors and ints."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(_tuplify(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def plain_args(args):
    """argparse.Namespace -> dict of plain values (storable with weights_only loading)."""
    out = {}
    for k, v in vars(args).items():
        if v is None or isinstance(v, (bool, int, float, str)):
            out[k] = v
        elif isinstance(v, (list, tuple)) and all(isinstance(i, (bool, int, float, str)) for i in v):
            out[k] = list(v)
        else:
            out[k] = str(v)
    return out


def check_state_dict_matches(model, state_dict, source):
    """Name the first key or shape that does not fit, instead of a page of torch's message."""
    own = model.state_dict()
    for k, v in state_dict.items():
        if k not in own:
            raise UserError(f"{source} does not match --model: unexpected key {k!r}; was it saved "
                            "for another model?")
        if tuple(own[k].shape) != tuple(v.shape):
            raise UserError(f"{source} does not match --model: {k} has shape {tuple(v.shape)}, the model "
                            f"expects {tuple(own[k].shape)}; was it saved for another model?")
    missing = [k for k in own if k not in state_dict]
    if missing:
        raise UserError(f"{source} does not match --model: missing key {missing[0]!r} "
                        f"({len(missing)} missing); was it saved for another model?")


def source_fields(path, ckpt):
    """The run.json fields naming where a run's weights came from: the file, the signature and
    model of the run that wrote it (ours; an official checkpoint's args name its model)."""
    src = ckpt.get("args", {}) if isinstance(ckpt, dict) else {}
    src = vars(src) if isinstance(src, argparse.Namespace) else src
    src = src if isinstance(src, dict) else {}
    extra = ckpt.get("extra") if isinstance(ckpt, dict) else None
    return {"finetune_from": os.path.abspath(path),
            "finetune_from_signature": extra.get("signature") if isinstance(extra, dict) else None,
            "finetune_from_model": src.get("model")}

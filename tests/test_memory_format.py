"""No memory-format cliff: every convolution of both scripts' models, as the scripts place them
(util/trainer.place_model), sees channels_last input, weight and output gradient on CPU, in
training (dense, keep-mask path, FCMAE decoder), evaluation and gradient checkpointing.

An NCHW tensor reaching a depthwise conv costs 3x on a quiet CPU and up to 250x when another
process shares the cores (issue 21); this test makes such a change fail here, not in a benchmark.
"""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from models import create_fcmae, create_model
from util.distributed import DistInfo
from util.trainer import place_model

CL = torch.channels_last


class ConvFormats(TorchFunctionMode):
    """Records every conv2d whose input, weight or (in backward) output gradient is not
    channels_last. Catches the module convs and the functional 1x1 convs alike."""

    def __init__(self):
        super().__init__()
        self.bad, self.seen, self.grads_seen = [], 0, 0

    def _check(self, what, t):
        if not t.is_contiguous(memory_format=CL):
            self.bad.append((what, tuple(t.shape), t.stride()))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (F.conv2d, torch.conv2d):
            self.seen += 1
            x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            self._check("input", x)
            self._check("weight", w)
            if out.requires_grad:
                def on_grad(g, shape=tuple(out.shape)):
                    self.grads_seen += 1
                    self._check(f"grad_output of the conv giving {shape}", g)
                out.register_hook(on_grad)
        return out


def _placed(model):
    args = SimpleNamespace(channels_last=False, compile=False)
    return place_model(model, None, None, args, DistInfo()).unwrapped


@pytest.mark.parametrize("checkpointing", [False, True])
def test_finetune_model_convs_are_channels_last(checkpointing):
    torch.manual_seed(0)
    model = _placed(create_model("convnextv2_atto", num_classes=10, drop_path_rate=0.1,
                                 grad_checkpointing=checkpointing))
    x = torch.randn(2, 3, 64, 64)  # NCHW, as the loader gives it
    with ConvFormats() as fmt:
        model(x).logsumexp(1).sum().backward()
    assert fmt.seen > 0 and fmt.grads_seen > 0
    assert fmt.bad == []
    model.eval()
    with torch.no_grad(), ConvFormats() as fmt:
        model(x)
    assert fmt.seen > 0 and fmt.bad == []


@pytest.mark.parametrize("checkpointing", [False, True])
def test_pretrain_model_convs_are_channels_last(checkpointing):
    torch.manual_seed(0)
    model = _placed(create_fcmae("convnextv2_atto", decoder_embed_dim=64,
                                 grad_checkpointing=checkpointing))
    x = torch.randn(2, 3, 64, 96)
    mask = torch.tensor([[1.0, 0, 1, 0, 1, 1], [0, 1, 1, 1, 0, 0]])  # ragged kept counts too
    for kwargs in ({"mask_ratio": 0.6}, {"mask": mask}):
        with ConvFormats() as fmt:
            model(x, **kwargs)[0].backward()
        assert fmt.seen > 0 and fmt.grads_seen > 0
        assert fmt.bad == []

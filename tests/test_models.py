"""ConvNeXt V2 model: sizes, official names, timm as a witness, factory, keep-mask block."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from models import create_fcmae, create_model
from models.convnextv2 import VARIANTS, Block, ConvNeXtV2, KeepIndex
from models.errors import ModelError

# params at 1000 classes, rounded as in the facts table
PARAMS = {
    "convnextv2_atto": "3.7M", "convnextv2_femto": "5.2M", "convnextv2_pico": "9.1M",
    "convnextv2_nano": "15.6M", "convnextv2_tiny": "28.6M", "convnextv2_base": "89M",
    "convnextv2_large": "198M", "convnextv2_huge": "660M",
}


def _round_like(count, ref):
    digits = len(ref[:-1].split(".")[1]) if "." in ref else 0
    return f"{count / 1e6:.{digits}f}M"


def _randomise(model, seed=0):
    """Non-trivial GRN and norm parameters, so every term of the block is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "grn" in name or "norm" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


@pytest.mark.parametrize("name", list(VARIANTS))
def test_param_counts_match_the_paper(name):
    with torch.device("meta"):
        model = create_model(name)
    count = sum(p.numel() for p in model.parameters())
    assert _round_like(count, PARAMS[name]) == PARAMS[name]


def _official_names(depths):
    names = ["downsample_layers.0.0.weight", "downsample_layers.0.0.bias",
             "downsample_layers.0.1.weight", "downsample_layers.0.1.bias"]
    for i in range(1, 4):
        names += [f"downsample_layers.{i}.{j}.{t}" for j in (0, 1) for t in ("weight", "bias")]
    for i, depth in enumerate(depths):
        for j in range(depth):
            for part in ("dwconv", "norm", "pwconv1", "pwconv2"):
                names += [f"stages.{i}.{j}.{part}.weight", f"stages.{i}.{j}.{part}.bias"]
            names += [f"stages.{i}.{j}.grn.gamma", f"stages.{i}.{j}.grn.beta"]
    return names + ["norm.weight", "norm.bias", "head.weight", "head.bias"]


def test_state_dict_uses_official_names_and_shapes():
    model = create_model("convnextv2_atto")
    sd = model.state_dict()
    assert sorted(sd) == sorted(_official_names([2, 2, 6, 2]))
    assert sd["stages.0.0.grn.gamma"].shape == (1, 1, 1, 160)
    assert sd["stages.0.0.pwconv1.weight"].shape == (160, 40)
    assert sd["stages.0.0.dwconv.weight"].shape == (40, 1, 7, 7)
    assert sd["downsample_layers.1.1.weight"].shape == (80, 40, 2, 2)
    ConvNeXtV2(depths=(2, 2, 6, 2), dims=(40, 80, 160, 320)).load_state_dict(sd, strict=True)
    assert model.depths == [2, 2, 6, 2]


@pytest.mark.parametrize("name", ["convnextv2_atto", "convnextv2_tiny"])
def test_timm_witness_same_outputs(name):
    import timm
    from timm.models.convnext import checkpoint_filter_fn
    torch.manual_seed(0)
    ours = _randomise(create_model(name, num_classes=10)).eval()
    theirs = timm.create_model(name, num_classes=10).eval()
    theirs.load_state_dict(checkpoint_filter_fn(ours.state_dict(), theirs), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=0)


def test_init_and_head_init_scale():
    torch.manual_seed(0)
    a = create_model("convnextv2_atto", num_classes=10)
    torch.manual_seed(0)
    b = create_model("convnextv2_atto", num_classes=10, head_init_scale=0.001)
    torch.testing.assert_close(b.head.weight, a.head.weight * 0.001)
    w = a.stages[2][0].pwconv1.weight
    assert 0.015 < w.std().item() < 0.025 and a.stages[2][0].pwconv1.bias.abs().max() == 0
    assert a.stages[0][0].grn.gamma.abs().max() == 0


def test_training_with_drop_path_runs_and_backprops():
    model = create_model("convnextv2_atto", num_classes=5, drop_path_rate=0.5).train()
    out = model(torch.randn(3, 3, 32, 32))
    out.sum().backward()
    assert out.shape == (3, 5)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with pytest.raises(ModelError, match="drop_path"):
        create_model("convnextv2_atto", drop_path_rate=1.5)


def test_create_model_timm_fallback_and_unknown_name():
    resnet = create_model("resnet18", num_classes=7, head_init_scale=0.5)
    assert type(resnet).__name__ == "ResNet" and resnet.fc.out_features == 7
    assert isinstance(create_model("convnextv2_pico"), ConvNeXtV2)
    with pytest.raises(ModelError, match="convnextv2_atto"):
        create_model("convnextv2_attoo")
    with pytest.raises(ModelError, match="convnextv2_nano"):
        create_fcmae("convnextv2_nan")


def test_importing_models_does_not_import_timm():
    code = "import sys, models, models.fcmae, models.weights; print('timm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    assert out.stdout.strip() == "False"


def test_models_know_nothing_of_the_run_machinery():
    """models/ imports no module of util/ (nor the scripts), and its messages name arguments,
    not command-line flags: the scripts add those (issue 12, strict layers)."""
    import ast
    import pathlib
    code = ("import sys, models, models.fcmae, models.weights, models.errors; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('util', 'main_finetune', 'main_pretrain')))")
    root = pathlib.Path(__file__).parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=str(root))
    assert out.stdout.strip() == "[]"
    for path in (root / "models").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and node.exc is not None:
                text = ast.unparse(node.exc)
                assert " --" not in text and "pass --" not in text, (path.name, text)
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n.split(".")[0] == "util" for n in names), (path.name, names)


def reference_block(block, x, keep):
    """Masked dense block written out plainly: keep [N, 1, H, W] float, 1 = kept."""
    c = x.shape[1]
    x = x * keep
    y = F.conv2d(x, block.dwconv.weight, block.dwconv.bias, padding=3, groups=c) * keep
    y = y.permute(0, 2, 3, 1)
    k = keep.permute(0, 2, 3, 1)
    y = F.layer_norm(y, (c,), block.norm.weight, block.norm.bias, 1e-6)
    y = F.gelu(F.linear(y, block.pwconv1.weight, block.pwconv1.bias)) * k
    gx = y.pow(2).sum(dim=(1, 2), keepdim=True).sqrt()
    nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
    y = block.grn.gamma * (y * nx) + block.grn.beta + y
    y = F.linear(y, block.pwconv2.weight, block.pwconv2.bias) * k
    return x + y.permute(0, 3, 1, 2)


@pytest.mark.parametrize("ragged", [False, True])
def test_block_keep_mask_matches_masked_dense_reference(ragged):
    torch.manual_seed(0)
    block = _randomise(Block(16)).eval()
    x = torch.randn(2, 16, 8, 8)
    keep = (torch.rand(2, 1, 8, 8) > 0.5).float()
    if not ragged:
        keep[1] = keep[0]
    out = block(x, keep)
    torch.testing.assert_close(out, reference_block(block, x, keep), atol=1e-5, rtol=0)
    assert out.mul(1 - keep).abs().max() == 0
    # all kept == the plain dense path
    torch.testing.assert_close(block(x, torch.ones(2, 1, 8, 8)), block(x), atol=1e-5, rtol=0)


def test_keep_index_layout():
    keep = torch.tensor([[[1, 0], [1, 1]], [[0, 0], [0, 1]]])
    idx = KeepIndex(keep)
    assert idx.rows.tolist() == [0, 2, 3, 7] and idx.per_image is None
    assert idx.image.tolist() == [0, 0, 0, 1]
    assert KeepIndex(keep[:1].repeat(2, 1, 1)).per_image == 3


def test_grn_gradients_match_autograd_reference():
    torch.manual_seed(0)
    block = _randomise(Block(8)).double()
    x = torch.randn(2, 5, 5, 32, dtype=torch.double, requires_grad=True)
    x.data[1, :, :, 3] = 0.0  # a zero-norm channel

    def reference(x):  # vector_norm: subgradient 0 at a zero norm, like ours
        gx = torch.linalg.vector_norm(x, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return block.grn.gamma * (x * nx) + block.grn.beta + x

    params = [x, block.grn.gamma, block.grn.beta]
    dy = torch.randn(2, 5, 5, 32, dtype=torch.double)
    ours = torch.autograd.grad(block.grn(x), params, dy)
    ref = torch.autograd.grad(reference(x), params, dy)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("ragged", [False, True])
def test_block_keep_mask_gradients_match_reference(ragged):
    torch.manual_seed(1)
    block = _randomise(Block(8)).double()
    x = torch.randn(2, 8, 6, 6, dtype=torch.double, requires_grad=True)
    keep = (torch.rand(2, 1, 6, 6) > 0.4).double()
    if not ragged:
        keep[1] = keep[0]
    dy = torch.randn(2, 8, 6, 6, dtype=torch.double)
    params = [x] + list(block.parameters())
    ours = torch.autograd.grad(block(x, keep), params, dy)
    ref = torch.autograd.grad(reference_block(block, x, keep), params, dy)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)

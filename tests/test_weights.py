"""Checkpoint hand-off: official sparse / dense FCMAE formats, ours, timm models' own
checkpoints, and conversion to timm."""
import argparse
import ast
import os
import re
import types

import pytest
import torch

from models import create_fcmae, create_model
from models.errors import ModelError
from models.weights import (classifier_prefixes, encoder_state_dict, load_into, main, read_torch_file,
                            select_state_dict)
from tests import forkrun
from tests.helpers import ROOT, TINY, run_record, weights
from tests.test_errors import Evil
from tests.test_models import _randomise
from util.checkpoint import load_checkpoint
from util.errors import UserError

FT = TINY + ["--batch_size", "8", "--epochs", "1"]


def to_official_sparse(dense):
    """Inverse of the loader: dense ConvNeXtV2 names -> MinkowskiEngine FCMAE encoder."""
    out = {}
    for key, v in dense.items():
        if key.startswith(("head.", "norm.")):
            continue
        parts = key.split(".")
        is_stem = key.startswith("downsample_layers.0.")
        if key.startswith("downsample_layers.") and not is_stem:
            if parts[2] == "0":  # sparse LayerNorm
                parts.insert(3, "ln")
            elif parts[-1] == "weight":  # sparse conv [out, in, k, k] -> [k*k, in, out]
                o, i, k, _ = v.shape
                parts[-1], v = "kernel", v.transpose(2, 3).reshape(o, i, k * k).permute(2, 1, 0)
            else:
                v = v.reshape(1, -1)
        elif key.startswith("stages."):
            part = parts[3]
            if part == "dwconv" and parts[-1] == "weight":  # [dim, 1, k, k] -> [k*k, dim]
                d, _, k, _ = v.shape
                parts[-1], v = "kernel", v.transpose(2, 3).reshape(d, k * k).permute(1, 0)
            elif part == "dwconv":
                v = v.reshape(1, -1)
            elif part == "norm":
                parts.insert(4, "ln")
            elif part in ("pwconv1", "pwconv2"):
                parts.insert(4, "linear")
            elif part == "grn":
                v = v.reshape(1, -1)
        out["encoder." + ".".join(parts)] = v.contiguous()
    out["mask_token"] = torch.zeros(1, 512, 1, 1)
    out["proj.weight"] = torch.zeros(512, 320, 1, 1)
    out["decoder.0.dwconv.weight"] = torch.zeros(512, 1, 7, 7)
    out["pred.weight"] = torch.zeros(3072, 512, 1, 1)
    return out


def to_official_dense(dense, grn_shape):
    """The released `*_fcmae.pt` layout: dense names under `encoder.`, GRN as given."""
    return {"encoder." + k: (v.reshape(grn_shape(v)) if ".grn." in k else v)
            for k, v in dense.items() if not k.startswith(("head.", "norm."))}


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(0)
    model = _randomise(create_model("convnextv2_atto", num_classes=10)).eval()
    return model


def _features(model, x):
    with torch.no_grad():
        for down, stage in zip(model.downsample_layers, model.stages):
            x = stage(down(x))
    return x


@pytest.mark.parametrize("fmt", ["sparse", "dense_grn_1d", "dense_grn_4d", "ours_fcmae"])
def test_pretrain_formats_load_to_the_same_network(source, fmt):
    sd = source.state_dict()
    if fmt == "sparse":
        ckpt = to_official_sparse(sd)
    elif fmt == "dense_grn_1d":
        ckpt = to_official_dense(sd, lambda v: (1, v.numel()))
    elif fmt == "dense_grn_4d":
        ckpt = to_official_dense(sd, lambda v: (1, 1, 1, v.numel()))
    else:
        fcmae = create_fcmae("convnextv2_atto", decoder_embed_dim=32)
        fcmae.encoder.load_state_dict(
            {k: v for k, v in sd.items() if not k.startswith(("head.", "norm."))})
        ckpt = {"model": fcmae.state_dict()}
    target = create_model("convnextv2_atto", num_classes=100)
    missing, unexpected = load_into(target, select_state_dict(ckpt))
    assert sorted(missing) == ["head.bias", "head.weight", "norm.bias", "norm.weight"]
    assert unexpected == []
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(_features(target.eval(), x), _features(source, x),
                               atol=1e-5, rtol=0)


def test_finetune_checkpoint_and_head_handling(source):
    sd = {"module." + k: v for k, v in source.state_dict().items()}  # DDP-wrapped
    same = create_model("convnextv2_atto", num_classes=10).eval()
    assert load_into(same, sd) == ([], [])
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(same(x), source(x), atol=1e-5, rtol=0)
    other = create_model("convnextv2_atto", num_classes=3)
    with pytest.warns(UserWarning, match="head"):
        missing, _ = load_into(other, sd)
    assert sorted(missing) == ["head.bias", "head.weight"]


def test_unplaceable_keys_and_shapes_raise(source):
    sd = dict(source.state_dict())
    with pytest.raises(ModelError, match="unknown key stages.0.0.extra"):
        load_into(create_model("convnextv2_atto", num_classes=10),
                  dict(sd, **{"stages.0.0.extra": torch.zeros(1)}))
    with pytest.raises(ModelError, match="shape"), pytest.warns(UserWarning, match="head"):
        load_into(create_model("convnextv2_femto", num_classes=10), sd)
    with pytest.raises(ModelError, match="missing"):
        load_into(create_model("convnextv2_atto", num_classes=10),
                  {k: v for k, v in sd.items() if not k.startswith("stages.3")})
    with pytest.raises(ModelError, match="neither"):
        load_into(create_model("convnextv2_atto"), create_model("resnet18").state_dict())
    with pytest.raises(ModelError):
        encoder_state_dict({"encoder.stages.0.0.dwconv.kernel": torch.zeros(3, 40)})


def test_to_timm_round_trip(source, tmp_path):
    import timm
    src, dst = tmp_path / "ckpt.pth", tmp_path / "timm.pth"
    # like an official checkpoint: an argparse.Namespace rides along
    torch.save({"model": source.state_dict(), "epoch": 3, "args": argparse.Namespace(lr=1.0)}, src)
    main(["to_timm", str(src), str(dst)])
    theirs = timm.create_model("convnextv2_atto", pretrained=True, num_classes=10,
                               pretrained_cfg_overlay=dict(file=str(dst), num_classes=10)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), source(x), atol=1e-5, rtol=0)


def test_to_timm_from_official_sparse_fcmae(source, tmp_path):
    import timm
    src, dst = tmp_path / "fcmae.pt", tmp_path / "timm.pth"
    torch.save({"model": to_official_sparse(source.state_dict())}, src)
    main(["to_timm", str(src), str(dst), "--model-key", "model"])
    theirs = timm.create_model("convnextv2_atto", pretrained=True, num_classes=0,
                               pretrained_cfg_overlay=dict(file=str(dst))).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(theirs.forward_features(x), _features(source, x),
                                   atol=1e-5, rtol=0)


def test_to_timm_rejects_foreign_files(tmp_path, capsys):
    src = tmp_path / "resnet.pth"
    torch.save({"model": create_model("resnet18").state_dict()}, src)
    with pytest.raises(SystemExit) as exit_info:
        main(["to_timm", str(src), str(tmp_path / "out.pth")])
    assert exit_info.value.code == 2 and "neither" in capsys.readouterr().err
    assert not (tmp_path / "out.pth").exists()
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot read"):
        read_torch_file(str(tmp_path / "junk.pth"))
    with pytest.raises(ModelError, match="does not exist"):
        read_torch_file(str(tmp_path / "nothing.pth"))


def _readme_timm_calls():
    """The `timm.create_model` statements of the README's timm hand-off block, as code."""
    with open(os.path.join(ROOT, "README.md")) as f:
        block = re.search(r"```python\n(import timm\n.*?)```", f.read(), re.S).group(1)
    return [ast.unparse(st) for st in ast.parse(block).body if isinstance(st, ast.Assign)]


def test_readme_timm_calls_load_the_converted_files(source, tmp_path):
    """Each form the README gives, run as written, with the files `to_timm` writes."""
    import timm
    head_call, fcmae_call, features_call = _readme_timm_calls()
    ft, fcmae = tmp_path / "ft.pth", tmp_path / "fcmae.pth"
    torch.save({"model": source.state_dict()}, tmp_path / "ours.pth")
    torch.save({"model": to_official_sparse(source.state_dict())}, tmp_path / "official.pth")
    main(["to_timm", str(tmp_path / "ours.pth"), str(ft)])
    main(["to_timm", str(tmp_path / "official.pth"), str(fcmae)])
    x = torch.randn(2, 3, 64, 64)

    def build(call, out, **names):
        env = {"timm": timm, "OUT": str(out), **names}
        exec(call, env)
        return env["model"].eval()

    with torch.no_grad():
        for n in (10, 1000, 0):  # 10: everything loads; else the body, with a fresh head
            model = build(head_call, ft, N=n, K=10)
            torch.testing.assert_close(model.forward_features(x), _features(source, x),
                                       atol=1e-5, rtol=0)
            if n == 10:
                torch.testing.assert_close(model(x), source(x), atol=1e-5, rtol=0)
        for n in (1000,):
            torch.testing.assert_close(build(fcmae_call, fcmae, N=n).forward_features(x),
                                       _features(source, x), atol=1e-5, rtol=0)
        model = build(features_call, fcmae)
        assert model.num_classes == 0
        torch.testing.assert_close(model.forward_features(x), _features(source, x),
                                   atol=1e-5, rtol=0)


def test_select_state_dict_takes_the_first_key_and_the_prefix():
    """What --model_key and --model_prefix choose in a --finetune checkpoint."""
    w = {"enc.a": torch.ones(1), "enc.b": torch.zeros(1), "dec.c": torch.ones(2)}
    assert select_state_dict({"module": w, "model": {}}, "model|module") == {}  # the first key present
    assert select_state_dict({"module": w}, "model|module") is w
    assert select_state_dict(w, "model|module") is w                            # a bare state dict
    assert select_state_dict({"model": w}, "model", prefix="enc.") == {"a": w["enc.a"], "b": w["enc.b"]}
    with pytest.raises(ModelError, match="holds no dict of weights"):
        select_state_dict({"model": torch.ones(1)}, "model|module")


def test_load_checkpoint_allows_argparse_namespace_and_nothing_else(tmp_path):
    path, marker = tmp_path / "ckpt.pth", tmp_path / "CODE-RAN"
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(model="x", lr=1.0)}, path)
    assert load_checkpoint(str(path))["args"].model == "x"
    torch.save({"args": argparse.Namespace(cmd=Evil(marker))}, path)  # code inside a Namespace
    with pytest.raises(UserError, match="refusing to load"):
        load_checkpoint(str(path))
    torch.save({"args": types.SimpleNamespace(model="x")}, path)  # a look-alike is not allowed
    with pytest.raises(UserError, match="refusing to load"):
        load_checkpoint(str(path), mmap=True)
    assert not marker.exists()


@pytest.mark.slow
def test_finetune_script_takes_official_sparse_fcmae_with_namespace_args(source, tmp_path):
    """An official FCMAE checkpoint as the original code writes it: sparse encoder weights,
    decoder, and the run's argparse.Namespace under "args"."""
    ckpt = tmp_path / "convnextv2_atto_1k_fcmae.pt"
    torch.save({"model": to_official_sparse(source.state_dict()), "epoch": 799,
                "args": argparse.Namespace(model="convnextv2_atto", mask_ratio=0.6, norm_pix_loss=True,
                                           input_size=224, data_path="/datasets/imagenet")}, ckpt)
    out = tmp_path / "run"
    r = forkrun.run("main_finetune.py", FT + ["--finetune", ckpt, "--output_dir", out], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "missing keys ['norm.weight', 'norm.bias', 'head.weight', 'head.bias']" in r.stdout
    record = run_record(out)
    assert record["status"] == "completed" and record["finetune_from_model"] == "convnextv2_atto"


def test_classifier_prefixes():
    import timm
    assert classifier_prefixes(create_model("convnextv2_atto")) == ("head.",)
    with torch.device("meta"):
        assert classifier_prefixes(create_model("resnet18")) == ("fc.",)
        assert classifier_prefixes(timm.create_model("convnextv2_atto")) == ("head.fc.",)
        assert classifier_prefixes(timm.create_model("deit_tiny_distilled_patch16_224")) == \
            ("head.", "head_dist.")
        model = create_model("resnet18")
        model.pretrained_cfg = {}  # no config: the module get_classifier() returns
        assert classifier_prefixes(model) == ("fc.",)


def test_timm_checkpoint_keeps_its_names_and_drops_another_head():
    import timm
    # timm's own ConvNeXt V2 (not ours): GRN [dim] and `mlp.` names stay as they are
    src = timm.create_model("convnextv2_atto", num_classes=10).eval()
    same = timm.create_model("convnextv2_atto", num_classes=10).eval()
    assert load_into(same, {"module." + k: v for k, v in src.state_dict().items()}) == ([], [])
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(same(x), src(x), atol=0, rtol=0)
    # a 1000-class ResNet into a 10-class one: `fc` (not `head`) is the classifier
    resnet = create_model("resnet18").state_dict()
    target = create_model("resnet18", num_classes=10)
    with pytest.warns(UserWarning, match=r"dropping the checkpoint's classifier head \(fc.weight"):
        missing, unexpected = load_into(target, {"model." + k: v for k, v in resnet.items()})
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    assert torch.equal(target.conv1.weight, resnet["conv1.weight"])
    # anything else of another shape is still an error
    with pytest.raises(ModelError, match="layer1.0.conv1.weight has shape"), \
            pytest.warns(UserWarning, match="classifier head"):
        load_into(target, dict(resnet, **{"layer1.0.conv1.weight": torch.zeros(1)}))


def test_check_checkpoints_does_not_convert_timm_models(tmp_path):
    import timm

    from util.validate import check_checkpoints
    path = tmp_path / "timm_convnextv2.pth"
    torch.save({"model": timm.create_model("convnextv2_atto", num_classes=10).state_dict()}, path)
    args = argparse.Namespace(resume="", finetune=str(path), model_key="model|module",
                              model_prefix="")
    check_checkpoints(args, lambda: timm.create_model("convnextv2_atto", num_classes=3))
    # into our ConvNeXt V2 it is converted from timm's names
    check_checkpoints(args, lambda: create_model("convnextv2_atto"))
    torch.save({"model": create_model("resnet18").state_dict()}, path)
    with pytest.raises(UserError, match="--finetune .*: the checkpoint is neither"):
        check_checkpoints(args, lambda: create_model("convnextv2_atto"))


@pytest.mark.slow
def test_finetune_script_timm_resnet_from_1000_classes(tmp_path):
    ckpt = tmp_path / "resnet18_in1k.pth"
    torch.save({"model": create_model("resnet18").state_dict()}, ckpt)
    out = tmp_path / "run"
    r = forkrun.run("main_finetune.py", FT + ["--model", "resnet18", "--finetune", ckpt,
                                              "--output_dir", out], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "dropping the checkpoint's classifier head (fc.weight (1000, 512) vs (10, 512)" in r.stderr
    assert "missing keys ['fc.weight', 'fc.bias']" in r.stdout
    assert run_record(out)["status"] == "completed"


@pytest.mark.slow
def test_finetune_script_timm_convnext_own_checkpoint(tmp_path):
    """A timm-only model (timm's ConvNeXt, which has `stages` too) takes its own checkpoint
    unchanged: with lr 0 the run's weights are the checkpoint's, so are its outputs."""
    import timm
    torch.manual_seed(0)
    src = _randomise(timm.create_model("convnext_atto", num_classes=10)).eval()
    ckpt = tmp_path / "convnext_atto.pth"
    torch.save({"model": src.state_dict()}, ckpt)
    out = tmp_path / "run"
    r = forkrun.run("main_finetune.py", FT + ["--model", "convnext_atto", "--finetune", ckpt,
                                              "--lr", "0", "--min_lr", "0", "--drop_path", "0",
                                              "--output_dir", out], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "missing keys none, unexpected keys none" in r.stdout
    tuned = timm.create_model("convnext_atto", num_classes=10).eval()
    tuned.load_state_dict(weights(out / "checkpoint-0.pth"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(tuned(x), src(x), atol=0, rtol=0)


def test_fcmae_refuses_timm_models_saying_so():
    with pytest.raises(ModelError) as info:
        create_fcmae("resnet18")
    message = str(info.value)
    assert "unknown FCMAE model 'resnet18'" in message and "convnextv2_atto" in message
    assert "takes no timm models" in message and "or a timm model name" not in message

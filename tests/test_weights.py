"""Checkpoint hand-off: official sparse / dense FCMAE formats, ours, and conversion to timm."""
import argparse

import pytest
import torch

from models import create_fcmae, create_model
from models.weights import encoder_state_dict, load_file, load_into, main, pick_state_dict
from tests.test_models import _randomise
from util.errors import UserError


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
    missing, unexpected = load_into(target, pick_state_dict(ckpt))
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
    with pytest.raises(UserError, match="unknown key stages.0.0.extra"):
        load_into(create_model("convnextv2_atto", num_classes=10),
                  dict(sd, **{"stages.0.0.extra": torch.zeros(1)}))
    with pytest.raises(UserError, match="shape"), pytest.warns(UserWarning, match="head"):
        load_into(create_model("convnextv2_femto", num_classes=10), sd)
    with pytest.raises(UserError, match="missing"):
        load_into(create_model("convnextv2_atto", num_classes=10),
                  {k: v for k, v in sd.items() if not k.startswith("stages.3")})
    with pytest.raises(UserError, match="neither"):
        load_into(create_model("convnextv2_atto"), create_model("resnet18").state_dict())
    with pytest.raises(UserError):
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
    with pytest.raises(UserError, match="cannot read"):
        load_file(str(tmp_path / "junk.pth"))
    with pytest.raises(UserError, match="does not exist"):
        load_file(str(tmp_path / "nothing.pth"))

"""Weights in and out with timm and Hugging Face transformers as witnesses (issue 14): their
models are built locally from their configs (no download), weights go through our converters
both ways, and the outputs agree in fp32 within 1e-4; the released FCMAE layout goes through
the original fine-tuning code's own key mapping. Plus the bad inputs: one line, exit 2,
nothing written."""
import argparse
import json
import math
import os
import re
import shlex
import types

import pytest
import torch

from models import create_fcmae, create_model
from models.convnextv2 import VARIANTS
from models.errors import ModelError
from models.weights import encoder_state_dict, main, read_weights, save_weights
from tests import forkrun
from tests.helpers import ROOT, TINY, run_record
from tests.test_errors import one_line
from util.errors import UserError

VARIANT_NAMES = ["convnextv2_atto", "convnextv2_femto"]
TOL = dict(atol=1e-4, rtol=0)
FT = TINY + ["--batch_size", "8", "--epochs", "1"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Nothing of the hub: a from_pretrained that tried to download would fail."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def randomise(model, seed=0):
    """Every parameter moved off its init (GRN and norms well away from 0 and 1), so a
    misplaced or misshaped tensor shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.5 if ("grn" in name or "norm" in name) else 0.02
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def ours(name, num_classes=10):
    torch.manual_seed(0)
    return randomise(create_model(name, num_classes=num_classes))


def features(model, x):
    """Our ConvNeXtV2's last feature map (what a FCMAE encoder gives)."""
    for down, stage in zip(model.downsample_layers, model.stages):
        x = stage(down(x))
    return x


def hf_config(name, num_classes=10):
    from transformers import ConvNextV2Config
    depths, dims = VARIANTS[name]
    return ConvNextV2Config(depths=list(depths), hidden_sizes=list(dims), num_labels=num_classes,
                            layer_norm_eps=1e-6)


def convert(src, dst, to, *extra):
    main(["convert", str(src), str(dst), "--to", to, *extra])


def x_in():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", VARIANT_NAMES)
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_both_ways(name, suffix, tmp_path):
    """ours -> timm file -> timm's model; timm's model -> its file -> ours."""
    import timm
    src, x = ours(name), x_in()
    torch.save({"model": src.state_dict()}, tmp_path / "ours.pth")
    convert(tmp_path / "ours.pth", tmp_path / f"timm{suffix}", "timm")
    theirs = timm.create_model(name, pretrained=False, num_classes=10).eval()
    theirs.load_state_dict(read_weights(str(tmp_path / f"timm{suffix}")), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), src(x), **TOL)
    # the other way: a timm model's own weights, as the hub ships them
    witness = randomise(timm.create_model(name, pretrained=False, num_classes=10), seed=3)
    save_weights(witness.state_dict(), str(tmp_path / f"hub{suffix}"))
    convert(tmp_path / f"hub{suffix}", tmp_path / "back.pth", "ours")
    back = create_model(name, num_classes=10).eval()
    back.load_state_dict(torch.load(tmp_path / "back.pth", weights_only=True)["model"], strict=True)
    with torch.no_grad():
        torch.testing.assert_close(back(x), witness(x), **TOL)


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_hugging_face_both_ways(name, tmp_path):
    """ours -> hf folder -> ConvNextV2ForImageClassification.from_pretrained; a transformers
    model's save_pretrained folder -> ours (convert, and --finetune's load)."""
    from transformers import ConvNextV2ForImageClassification
    from models.weights import load_into
    src, x = ours(name), x_in()
    torch.save({"model": src.state_dict()}, tmp_path / "ours.pth")
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"class{i}\n" for i in range(10)))
    convert(tmp_path / "ours.pth", tmp_path / "hf", "hf", "--labels", str(labels))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["depths"] == list(VARIANTS[name][0]) and config["hidden_sizes"] == list(VARIANTS[name][1])
    assert config["id2label"]["3"] == "class3" and config["architectures"] == ["ConvNextV2ForImageClassification"]
    theirs = ConvNextV2ForImageClassification.from_pretrained(str(tmp_path / "hf")).eval()
    assert theirs.config.num_labels == 10
    with torch.no_grad():
        torch.testing.assert_close(theirs(pixel_values=x).logits, src(x), **TOL)
    # the other way
    witness = randomise(ConvNextV2ForImageClassification(hf_config(name)), seed=5)
    witness.save_pretrained(str(tmp_path / "witness"))
    convert(tmp_path / "witness", tmp_path / "back.safetensors", "ours")
    back = create_model(name, num_classes=10).eval()
    back.load_state_dict(read_weights(str(tmp_path / "back.safetensors")), strict=True)
    tuned = create_model(name, num_classes=10).eval()
    assert load_into(tuned, read_weights(str(tmp_path / "witness"))) == ([], [])
    with torch.no_grad():
        expected = witness(pixel_values=x).logits
        torch.testing.assert_close(back(x), expected, **TOL)
        torch.testing.assert_close(tuned(x), expected, **TOL)
    # hf -> hf keeps the labels
    convert(tmp_path / "witness", tmp_path / "again", "hf")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["id2label"] == \
        {str(k): v for k, v in witness.config.id2label.items()}


def test_fcmae_encoder_to_hugging_face_model_and_timm(tmp_path):
    """Our FCMAE checkpoint -> ConvNextV2Model (no head, no final norm) and timm features."""
    import timm
    from transformers import ConvNextV2Model
    torch.manual_seed(0)
    fcmae = randomise(create_fcmae("convnextv2_atto", decoder_embed_dim=32))
    torch.save({"model": fcmae.state_dict()}, tmp_path / "fcmae.pth")
    convert(tmp_path / "fcmae.pth", tmp_path / "hf", "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["ConvNextV2Model"]
    theirs = ConvNextV2Model.from_pretrained(str(tmp_path / "hf")).eval()
    convert(tmp_path / "fcmae.pth", tmp_path / "timm.safetensors", "timm")
    timm_model = timm.create_model("convnextv2_atto", pretrained=True, num_classes=0,
                                   pretrained_cfg_overlay=dict(file=str(tmp_path / "timm.safetensors"))).eval()
    encoder = create_model("convnextv2_atto", num_classes=0).eval()
    encoder.load_state_dict(fcmae.encoder.state_dict(), strict=False)
    x = x_in()
    with torch.no_grad():
        expected = features(encoder, x)
        torch.testing.assert_close(theirs(pixel_values=x).last_hidden_state, expected, **TOL)
        torch.testing.assert_close(timm_model.forward_features(x), expected, **TOL)


def test_four_bands_travel_to_timm_and_hugging_face_and_back(tmp_path, capsys, caplog):
    """A 4-band model (issue 23): --to timm loads into timm's model built as the printed line
    says (in_chans=4: pretrained=True, nothing adapted), --to hf into transformers' with
    num_channels 4; their 4-band models come back into ours; a 4-band FCMAE encoder too."""
    import logging

    import timm
    from transformers import ConvNextV2ForImageClassification, ConvNextV2Model
    name, x = "convnextv2_atto", torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    src = randomise(create_model(name, num_classes=10, in_chans=4))
    torch.save({"model": src.state_dict()}, tmp_path / "ours.pth")
    convert(tmp_path / "ours.pth", tmp_path / "timm.safetensors", "timm")
    line = capsys.readouterr().out.strip()
    assert "in_chans=4" in line and "input_size=(4, 224, 224)" in line
    with caplog.at_level(logging.INFO, logger="timm"):
        theirs = eval(re.search(r"load it with (timm\.create_model\(.*\))$", line).group(1), {"timm": timm}).eval()
    assert not [r for r in caplog.records if "input conv" in r.getMessage() or "channel" in r.getMessage()]
    convert(tmp_path / "ours.pth", tmp_path / "hf", "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_channels"] == 4
    hf = ConvNextV2ForImageClassification.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), src(x), **TOL)
        torch.testing.assert_close(hf(pixel_values=x).logits, src(x), **TOL)
    # the other way: timm's and transformers' 4-band models
    config = hf_config(name)
    config.num_channels = 4
    witnesses = {"timm": randomise(timm.create_model(name, num_classes=10, in_chans=4), seed=3),
                 "hf": randomise(ConvNextV2ForImageClassification(config), seed=5)}
    save_weights(witnesses["timm"].state_dict(), str(tmp_path / "hub.safetensors"))
    witnesses["hf"].save_pretrained(str(tmp_path / "witness"))
    for kind, path in (("timm", tmp_path / "hub.safetensors"), ("hf", tmp_path / "witness")):
        convert(path, tmp_path / f"back-{kind}.pth", "ours")
        back = create_model(name, num_classes=10, in_chans=4).eval()
        back.load_state_dict(torch.load(tmp_path / f"back-{kind}.pth", weights_only=True)["model"], strict=True)
        with torch.no_grad():
            want = witnesses[kind](x) if kind == "timm" else witnesses[kind](pixel_values=x).logits
            torch.testing.assert_close(back(x), want, **TOL)
    # a 4-band FCMAE encoder -> ConvNextV2Model
    fcmae = randomise(create_fcmae(name, decoder_embed_dim=32, in_chans=4))
    torch.save({"model": fcmae.state_dict()}, tmp_path / "fcmae.pth")
    convert(tmp_path / "fcmae.pth", tmp_path / "hf_encoder", "hf")
    encoder = create_model(name, num_classes=0, in_chans=4).eval()
    encoder.load_state_dict(fcmae.encoder.state_dict(), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(ConvNextV2Model.from_pretrained(str(tmp_path / "hf_encoder")).eval()(
            pixel_values=x).last_hidden_state, features(encoder, x), **TOL)


def original_remap(ckpt):
    """The original release's fine-tuning key mapping (remap_checkpoint_keys, rewritten from its
    description in ../shared/reference/convnextv2-facts.md), then its lenient load: a tensor of
    another shape is skipped, as the original's loader does."""
    out = {}
    for k, v in ckpt.items():
        if any(part in k for part in ("decoder", "mask_token", "proj", "pred")):
            continue
        k = k[len("encoder."):] if k.startswith("encoder") else k
        if k.endswith("kernel"):
            ks = math.isqrt(v.shape[0])
            k = k[:-len("kernel")] + "weight"
            v = (v.permute(2, 1, 0).reshape(v.shape[2], v.shape[1], ks, ks) if v.dim() == 3
                 else v.permute(1, 0).reshape(v.shape[1], 1, ks, ks)).transpose(3, 2)
        elif "ln" in k or "linear" in k:
            parts = k.split(".")
            parts.pop(-2)
            k = ".".join(parts)
        out[k] = v
    for k, v in list(out.items()):
        if k.endswith("bias") and v.dim() != 1:
            out[k] = v.reshape(-1)
        elif "grn" in k:
            out[k] = v.unsqueeze(0).unsqueeze(1)
    return out


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_official_layout_survives_the_original_loader(name, tmp_path):
    """--to official: the original's mapping puts every encoder tensor back (GRN included: a
    [1, 1, 1, dim] GRN would come out 6-d and be skipped, staying at zero)."""
    src = ours(name)
    torch.save({"model": src.state_dict()}, tmp_path / "ours.pth")
    convert(tmp_path / "ours.pth", tmp_path / "official.pt", "official")
    ckpt = torch.load(tmp_path / "official.pt", weights_only=True)["model"]
    assert all(k.startswith("encoder.") for k in ckpt)
    assert all(v.shape == (1, v.numel()) for k, v in ckpt.items() if ".grn." in k)
    target = create_model(name, num_classes=10).eval()
    own = target.state_dict()
    remapped = original_remap(ckpt)
    fits = {k: v for k, v in remapped.items() if k in own and v.shape == own[k].shape}
    assert sorted(fits) == sorted(remapped)  # nothing skipped
    result = target.load_state_dict(fits, strict=False)
    assert sorted(result.missing_keys) == ["head.bias", "head.weight", "norm.bias", "norm.weight"]
    x = x_in()
    with torch.no_grad():
        torch.testing.assert_close(features(target, x), features(src, x), **TOL)
    # and we read it back
    convert(tmp_path / "official.pt", tmp_path / "again.pth", "ours")
    again = torch.load(tmp_path / "again.pth", weights_only=True)["model"]
    assert all(torch.equal(again[k], v) for k, v in src.state_dict().items() if not k.startswith(("head.", "norm.")))


def test_ours_to_ours_loads_strictly_and_to_timm_still_works(tmp_path, capsys):
    src = ours("convnextv2_atto")
    torch.save({"model": src.state_dict(), "args": argparse.Namespace(lr=1.0)}, tmp_path / "ckpt.pth")
    convert(tmp_path / "ckpt.pth", tmp_path / "same.safetensors", "ours")
    create_model("convnextv2_atto", num_classes=10).load_state_dict(
        read_weights(str(tmp_path / "same.safetensors")), strict=True)
    main(["to_timm", str(tmp_path / "ckpt.pth"), str(tmp_path / "timm.pth")])
    assert "timm.create_model('convnextv2_atto', pretrained=True" in capsys.readouterr().out


# ---- bad input: one line, exit 2, nothing written

def _bad_inputs(d):
    """{id: path} of the four bad inputs of the issue, written under `d`."""
    import timm
    save_weights(timm.create_model("resnet18", pretrained=False).state_dict(), str(d / "resnet.safetensors"))
    save_weights(ours("convnextv2_atto").state_dict(), str(d / "atto.safetensors"))
    data = (d / "atto.safetensors").read_bytes()
    (d / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (d / "hf_empty").mkdir()
    (d / "hf_empty" / "config.json").write_text(hf_config("convnextv2_atto").to_json_string())
    (d / "hf_depths").mkdir()
    odd = hf_config("convnextv2_atto")
    odd.depths = [2, 2, 7, 2]
    (d / "hf_depths" / "config.json").write_text(odd.to_json_string())
    save_weights({}, str(d / "hf_depths" / "model.safetensors"))
    (d / "hf_convnext").mkdir()  # ConvNeXt V1 in transformers: another architecture
    (d / "hf_convnext" / "config.json").write_text(json.dumps({"model_type": "convnext"}))
    save_weights({}, str(d / "hf_convnext" / "model.safetensors"))
    return {"other_architecture": (d / "resnet.safetensors", "neither"),
            "hf_folder_without_weights": (d / "hf_empty", "holds no weights"),
            "truncated_safetensors": (d / "truncated.safetensors", "cannot read safetensors file"),
            "config_depths_match_no_variant": (d / "hf_depths", "depths [2, 2, 7, 2] and hidden_sizes"),
            "hf_folder_of_another_model": (d / "hf_convnext", "describes a 'convnext' model, not ConvNeXt V2")}


BAD = ["other_architecture", "hf_folder_without_weights", "truncated_safetensors",
       "config_depths_match_no_variant", "hf_folder_of_another_model"]


@pytest.mark.parametrize("bad", BAD)
def test_convert_refuses_bad_input_in_one_line(bad, tmp_path, capsys):
    path, fragment = _bad_inputs(tmp_path)[bad]
    for to, out in (("ours", "out.pth"), ("hf", "out_hf")):
        with pytest.raises(SystemExit) as info:
            main(["convert", str(path), str(tmp_path / out), "--to", to])
        err = capsys.readouterr().err.strip().splitlines()
        assert info.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
        assert not (tmp_path / out).exists()


def test_check_checkpoints_names_both_variants_and_reads_folders(tmp_path):
    from util.validate import check_checkpoints
    save_weights(ours("convnextv2_femto").state_dict(), str(tmp_path / "femto.safetensors"))
    args = argparse.Namespace(resume="", finetune=str(tmp_path / "femto.safetensors"),
                              model_key="model|module", model_prefix="")
    with pytest.raises(UserError, match="the checkpoint is convnextv2_femto, --model is convnextv2_atto"):
        check_checkpoints(args, lambda: create_model("convnextv2_atto", num_classes=10))
    with pytest.raises(ModelError, match="the checkpoint is convnextv2_femto, model is convnextv2_atto"):
        from models.weights import load_into
        load_into(create_model("convnextv2_atto", num_classes=10), read_weights(args.finetune))
    check_checkpoints(args, lambda: create_model("convnextv2_femto", num_classes=3))  # head dropped
    paths = _bad_inputs(tmp_path)
    for bad in BAD:
        path, fragment = paths[bad]
        args.finetune = str(path)
        with pytest.raises(UserError, match=f"--finetune {path}: .*{fragment.replace('[', '.').replace(']', '.')}"):
            check_checkpoints(args, lambda: create_model("convnextv2_atto", num_classes=10))


@pytest.mark.slow
def test_finetune_script_refuses_bad_input_in_one_line(tmp_path):
    paths = _bad_inputs(tmp_path)
    for bad in BAD:
        path, fragment = paths[bad]
        out = tmp_path / f"run-{bad}"
        r = forkrun.run("main_finetune.py", FT + ["--finetune", path, "--output_dir", out], tmp_path)
        one_line(r, fragment)
        assert not out.exists(), bad


@pytest.mark.slow
def test_finetune_script_from_hf_folder_writes_safetensors(tmp_path):
    """--finetune a transformers save_pretrained folder (10 labels: everything loads), and
    --save_safetensors True: model.safetensors and model-best.safetensors, our names."""
    from transformers import ConvNextV2ForImageClassification
    witness = randomise(ConvNextV2ForImageClassification(hf_config("convnextv2_atto")), seed=7)
    witness.save_pretrained(str(tmp_path / "hf"))
    out = tmp_path / "run"
    r = forkrun.run("main_finetune.py", FT + ["--finetune", tmp_path / "hf", "--save_safetensors", "True",
                                              "--output_dir", out], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "missing keys none, unexpected keys none" in r.stdout
    assert run_record(out)["status"] == "completed"
    for name in ("model.safetensors", "model-best.safetensors"):
        create_model("convnextv2_atto", num_classes=10).load_state_dict(
            read_weights(str(out / name)), strict=True)
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def _readme_section():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read().split("## Start from released weights")[1].split("\n## ")[0]


def test_readme_convert_commands_run_as_written(tmp_path, monkeypatch):
    """The section's `convert` lines, run in a folder holding the files they name, and its
    transformers snippet on what they wrote."""
    from transformers import ConvNextV2ForImageClassification
    section = _readme_section()
    lines = [ln for ln in re.search(r"```bash\n(.*?)```", section, re.S).group(1).splitlines()
             if ln.startswith("python -m models.weights ")]
    assert {shlex.split(ln)[6] for ln in lines} == {"--to"} and len(lines) == 4
    monkeypatch.chdir(tmp_path)
    for kind in ("finetune", "pretrain"):
        os.makedirs(f"runs/{kind}/RUN")
    src = ours("convnextv2_atto")
    torch.save({"model": src.state_dict(), "model_ema": src.state_dict()}, "runs/finetune/RUN/checkpoint-best.pth")
    torch.save({"model": create_fcmae("convnextv2_atto", decoder_embed_dim=32).state_dict()},
               "runs/pretrain/RUN/checkpoint-1599.pth")
    ConvNextV2ForImageClassification(hf_config("convnextv2_atto")).save_pretrained("convnextv2-atto-1k-224")
    with open("classes.txt", "w") as f:
        f.write("".join(f"c{i}\n" for i in range(10)))
    for ln in lines:
        main(shlex.split(ln)[3:])
        assert os.path.exists(shlex.split(ln)[5])
    env = {}
    exec(re.search(r"```python\n(from transformers.*?)```", section, re.S).group(1), env)
    x = x_in()
    with torch.no_grad():
        torch.testing.assert_close(env["model"].eval()(pixel_values=x).logits, src(x), **TOL)


def test_sharded_hugging_face_folder(tmp_path):
    from transformers import ConvNextV2ForImageClassification
    witness = randomise(ConvNextV2ForImageClassification(hf_config("convnextv2_atto")), seed=9)
    witness.save_pretrained(str(tmp_path / "hf"), max_shard_size="500KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    model = create_model("convnextv2_atto", num_classes=10).eval()
    model.load_state_dict(encoder_state_dict(read_weights(str(tmp_path / "hf"))), strict=True)
    x = x_in()
    with torch.no_grad():
        torch.testing.assert_close(model(x), witness(pixel_values=x).logits, **TOL)


def test_release_weights_final_and_best(tmp_path):
    """--save_safetensors: model-best at a new best, model after the last epoch; the EMA's
    weights when the best metric is the EMA's; nothing for a run without the flag."""
    from util.train_state import save_release_weights
    model, ema = ours("convnextv2_atto"), ours("convnextv2_atto")
    with torch.no_grad():
        ema.head.bias.fill_(1.0)
    tstate = types.SimpleNamespace(model=model, ema=types.SimpleNamespace(module=ema),
                                   best={"name": "test_acc1_ema"})
    args = argparse.Namespace(save_safetensors=True, epochs=2)
    save_release_weights(args, str(tmp_path), tstate, 0, True)
    assert sorted(os.listdir(tmp_path)) == ["model-best.safetensors"]
    save_release_weights(args, str(tmp_path), tstate, 1, False)
    assert sorted(os.listdir(tmp_path)) == ["model-best.safetensors", "model.safetensors"]
    assert torch.equal(read_weights(str(tmp_path / "model.safetensors"))["head.bias"], ema.head.bias)
    tstate.best = {"name": "test_acc1"}
    save_release_weights(args, str(tmp_path), tstate, 1, True)
    assert torch.equal(read_weights(str(tmp_path / "model-best.safetensors"))["head.bias"], model.head.bias)
    pretraining = argparse.Namespace(epochs=2, save_safetensors=False)  # as main_pretrain.py's parser fixes it
    save_release_weights(pretraining, str(tmp_path / "pre"), tstate, 1, True)
    assert not (tmp_path / "pre").exists()

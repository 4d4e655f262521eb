"""main_pretrain.py --finetune: a new pretraining run started from weights (ours, official,
timm, Hugging Face): the encoder from any of them, the decoder and mask token when the file has
them, one line saying which; the source in run.json and the signature; its bad input."""
import argparse
import os

import pytest
import torch

from models import create_fcmae, create_model
from models.weights import fit_fcmae, main as weights_main
from tests.helpers import read_log, run, run_record
from tests.test_models import _randomise
from tests.test_weights import to_official_sparse
from util.errors import UserError

PRE = ["--model", "convnextv2_atto", "--data_set", "synthetic", "--input_size", "64",
       "--synthetic_train_samples", "64", "--batch_size", "16", "--num_workers", "0",
       "--device", "cpu", "--print_freq", "4", "--warmup_epochs", "0", "--blr", "2e-2",
       "--decoder_embed_dim", "64", "--vis_freq", "0"]
FRESH_DECODER = "encoder loaded; decoder and mask token start fresh (the file has none)"


def args_for(path, **kw):
    """The Namespace engine_pretrain reads (build_model, load_start_weights)."""
    a = dict(model="convnextv2_atto", mask_ratio=0.6, decoder_depth=1, decoder_embed_dim=64, norm_pix_loss=True,
             input_size=64, grad_checkpointing=False, in_chans=3, finetune=str(path), model_key="model|module",
             model_prefix="")
    return argparse.Namespace(**{**a, **kw})


def start(args, capsys):
    """A FCMAE for `args`, started from args.finetune; (model, run.json fields, the lines said)."""
    import engine_pretrain
    capsys.readouterr()
    model = engine_pretrain.build_model(args)
    fields = engine_pretrain.load_start_weights(args, model)
    return model, fields, capsys.readouterr().out.splitlines()


def encoder_equals(model, dense):
    """Every encoder tensor of the FCMAE `model` equals `dense`'s (ConvNeXtV2 names)."""
    own = model.encoder.state_dict()
    return own.keys() <= dense.keys() and all(torch.equal(own[k], dense[k].reshape(own[k].shape)) for k in own)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A fine-tuned convnextv2_atto (10 classes, non-trivial GRN and norms) and its file."""
    torch.manual_seed(0)
    model = _randomise(create_model("convnextv2_atto", num_classes=10))
    path = tmp_path_factory.mktemp("ft") / "finetuned.pth"
    torch.save({"model": model.state_dict()}, path)
    return path, model.state_dict()


# ---------------------------------------------------------------- the weights, in process

def test_every_format_gives_the_encoder(finetuned, tmp_path, capsys):
    """Ours (fine-tuned), official (convert --to official), timm and a Hugging Face folder: the
    same encoder, the decoder fresh, one line; run.json names the source."""
    path, dense = finetuned
    for to, out in (("official", "official.pth"), ("timm", "timm.safetensors"), ("hf", "hf")):
        weights_main(["convert", str(path), str(tmp_path / out), "--to", to])
    capsys.readouterr()
    for src in (path, tmp_path / "official.pth", tmp_path / "timm.safetensors", tmp_path / "hf"):
        model, fields, said = start(args_for(src), capsys)
        assert encoder_equals(model, dense), src
        assert said == [f"--finetune {src}: {FRESH_DECODER}"
                        + ("" if src.name == "official.pth" else
                           "; the file's classifier head and final norm are not used")], said
        assert fields == {"finetune_from": os.path.abspath(src), "finetune_from_signature": None,
                          "finetune_from_model": None}


def test_our_fcmae_checkpoint_gives_encoder_decoder_and_mask_token(tmp_path, capsys):
    torch.manual_seed(1)
    src = _randomise(create_fcmae("convnextv2_atto", decoder_embed_dim=64))
    path = tmp_path / "checkpoint-799.pth"
    torch.save({"model": src.state_dict(), "epoch": 799, "args": {"model": "convnextv2_atto"},
                "extra": {"signature": "abc"}}, path)
    model, fields, said = start(args_for(path), capsys)
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in src.state_dict().items())
    assert said == [f"--finetune {path}: encoder, decoder and mask token loaded; nothing starts fresh"]
    assert fields["finetune_from_signature"] == "abc" and fields["finetune_from_model"] == "convnextv2_atto"


def test_official_sparse_file_with_its_decoder(finetuned, capsys, tmp_path):
    """The released layout: a sparse (MinkowskiEngine) encoder and a dense decoder under the
    same names as ours: all of it is taken; a decoder of another width starts fresh, saying
    which flags differ; a partial one starts fresh, saying what is missing."""
    path, dense = finetuned
    torch.manual_seed(2)
    decoder = {k: v for k, v in create_fcmae("convnextv2_atto", decoder_embed_dim=64).state_dict().items()
               if not k.startswith("encoder.")}
    sparse = {k: v for k, v in to_official_sparse(dense).items() if k.startswith("encoder.")}
    full = tmp_path / "convnextv2_atto_1k_224_fcmae.pt"
    torch.save({"model": {**sparse, **decoder}, "args": argparse.Namespace(model="convnextv2_atto")}, full)
    model, fields, said = start(args_for(full), capsys)
    assert encoder_equals(model, dense) and fields["finetune_from_model"] == "convnextv2_atto"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in decoder.items())
    assert said == [f"--finetune {full}: encoder, decoder and mask token loaded; nothing starts fresh"]
    _, _, said = start(args_for(full, decoder_embed_dim=32), capsys)
    assert said == [f"--finetune {full}: encoder loaded; decoder and mask token start fresh (the file's decoder "
                    "is 64 wide with 1 block, --decoder_embed_dim is 32 and --decoder_depth 1)"]
    partial = tmp_path / "partial.pt"  # tests/test_weights.py's: a few zero decoder tensors, 512 wide
    torch.save({"model": to_official_sparse(dense)}, partial)
    model, _, said = start(args_for(partial, decoder_embed_dim=512), capsys)
    assert encoder_equals(model, dense) and model.mask_token.abs().sum() > 0  # its own init, not the zeros
    assert said == [f"--finetune {partial}: encoder loaded; decoder and mask token start fresh (the file's "
                    "decoder does not fit: missing decoder.0.dwconv.bias)"]


def test_another_band_count_adapts_the_stem_and_starts_the_prediction_layer_fresh(tmp_path, capsys):
    """3-band FCMAE weights for --in_chans 4: the stem adapted as fine-tuning does (timm's
    adapt_input_conv), the decoder and mask token taken, the prediction layer (which predicts
    every band) fresh; one line says all of it."""
    torch.manual_seed(3)
    src = create_fcmae("convnextv2_atto", decoder_embed_dim=64)
    path = tmp_path / "three.pth"
    torch.save({"model": src.state_dict()}, path)
    torch.manual_seed(4)
    model, _, said = start(args_for(path, in_chans=4), capsys)
    own, theirs = model.state_dict(), src.state_dict()
    w3 = theirs["encoder.downsample_layers.0.0.weight"]
    torch.testing.assert_close(own["encoder.downsample_layers.0.0.weight"], torch.cat([w3, w3[:, :1]], 1) * 0.75)
    assert all(torch.equal(own[k], v) for k, v in theirs.items()
               if k.startswith(("decoder.", "proj.", "mask_token", "encoder.stages.")))
    assert own["pred.weight"].shape == (32 * 32 * 4, 64, 1, 1)
    assert said == [f"--finetune {path}: encoder, decoder and mask token loaded; prediction layer starts fresh "
                    "(the file's prediction layer predicts 3 bands per pixel, --in_chans is 4); the checkpoint's "
                    "stem downsample_layers.0.0.weight takes 3 bands, the model 4: adapted with timm's "
                    "adapt_input_conv (its bands repeated and scaled by 3/4)"]


def test_bad_weights_are_refused_before_compute(tmp_path):
    """The check before any compute (util/validate.check_checkpoints, on a shape-only model)
    refuses what the real load would: another variant, a file with no encoder weights."""
    import engine_pretrain
    from util.validate import check_checkpoints
    femto, decoder_only = tmp_path / "femto.pth", tmp_path / "decoder.pth"
    torch.save({"model": create_model("convnextv2_femto").state_dict()}, femto)
    torch.save({"model": {k: v for k, v in create_fcmae("convnextv2_atto", decoder_embed_dim=64).state_dict().items()
                          if not k.startswith("encoder.")}}, decoder_only)
    for path, fragment in ((femto, "the checkpoint is convnextv2_femto, --model is convnextv2_atto; pass a "
                                   "convnextv2_atto checkpoint or use --model convnextv2_femto"),
                           (decoder_only, "the checkpoint holds no encoder weights (only FCMAE decoder parts")):
        args = args_for(path, resume="")
        with pytest.raises(UserError, match="^--finetune ") as e:
            check_checkpoints(args, lambda: engine_pretrain.build_model(args))
        assert fragment in str(e.value) and "\n" not in str(e.value)


def test_fit_fcmae_works_on_a_shape_only_model(finetuned):
    with torch.device("meta"):
        model = create_fcmae("convnextv2_atto", decoder_embed_dim=64)
    got = fit_fcmae(model, torch.load(finetuned[0], weights_only=True)["model"])
    assert got.loaded == ("encoder",) and got.fresh == ("decoder", "mask token")
    assert got.unused == ("classifier head", "final norm") and not got.adapted


# ---------------------------------------------------------------- real runs

@pytest.fixture(scope="module")
def runs(tmp_path_factory, finetuned):
    """Under one --runs_root: `fresh`, a new run; `ours`, the same run continued from a
    pretraining run's checkpoint; `official`, the same from an official-layout encoder (convert
    --to official of a fine-tuned checkpoint). Each: (run directory, stdout)."""
    tmp = tmp_path_factory.mktemp("pre")
    pretrained = tmp / "pretrained"
    run("main_pretrain.py", PRE + ["--epochs", "3", "--output_dir", pretrained])
    official = tmp / "official.pth"
    weights_main(["convert", str(finetuned[0]), str(official), "--to", "official"])
    root = tmp / "runs"
    out = {"pretrained": (pretrained, None)}
    for name, extra in (("fresh", []), ("ours", ["--finetune", pretrained / "checkpoint-2.pth"]),
                        ("official", ["--finetune", official])):
        p = run("main_pretrain.py", PRE + ["--epochs", "1", "--runs_root", root] + extra)
        (line,) = [ln for ln in p.stdout.splitlines() if ln.startswith("run directory: ")][-1:]
        out[name] = (line[len("run directory: "):], p.stdout)
    return out


@pytest.mark.slow
def test_continued_pretraining_starts_lower_than_a_fresh_start(runs):
    fresh, ours = read_log(runs["fresh"][0]), read_log(runs["ours"][0])
    assert [e["epoch"] for e in ours] == [0]  # a new run: epoch 0, its own schedule
    assert ours[0]["train_lr"] == fresh[0]["train_lr"]
    assert ours[0]["train_loss"] < fresh[0]["train_loss"] - 0.01, (ours[0], fresh[0])
    source = runs["pretrained"][0] / "checkpoint-2.pth"
    assert f"--finetune {source}: encoder, decoder and mask token loaded; nothing starts fresh" in runs["ours"][1]


@pytest.mark.slow
def test_official_encoder_starts_a_fresh_decoder_and_completes(runs):
    run_dir, stdout = runs["official"]
    assert FRESH_DECODER in stdout
    assert [ln for ln in stdout.splitlines() if "--finetune" in ln] == \
        [ln for ln in stdout.splitlines() if FRESH_DECODER in ln]  # the one line
    assert run_record(run_dir)["status"] == "completed"


@pytest.mark.slow
def test_run_json_names_the_source_and_the_signature_counts_it(runs):
    dirs = {name: runs[name][0] for name in ("fresh", "ours", "official")}
    assert len(set(dirs.values())) == 3  # other weights, another run
    records = {name: run_record(d) for name, d in dirs.items()}
    source = str(runs["pretrained"][0] / "checkpoint-2.pth")
    assert records["ours"]["finetune_from"] == source
    assert records["ours"]["finetune_from_signature"] == run_record(runs["pretrained"][0])["signature"]
    assert records["ours"]["finetune_from_model"] == "convnextv2_atto"
    assert records["official"]["finetune_from"].endswith("official.pth")
    assert "finetune_from" not in records["fresh"]
    assert all(os.path.basename(d) == f"convnextv2_atto-{records[n]['signature'][:10]}" for n, d in dirs.items())


@pytest.mark.slow
@pytest.mark.parametrize("case", ["other_variant", "no_encoder", "other_architecture"])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, case):
    path = tmp_path / f"{case}.pth"
    if case == "other_variant":
        sd = create_model("convnextv2_femto", num_classes=10).state_dict()
        fragment = "checkpoint does not fit the model: "
        end = "the checkpoint is convnextv2_femto, --model is convnextv2_atto; pass a convnextv2_atto " \
              "checkpoint or use --model convnextv2_femto"
    elif case == "no_encoder":
        sd = {k: v for k, v in create_fcmae("convnextv2_atto", decoder_embed_dim=64).state_dict().items()
              if not k.startswith("encoder.")}
        fragment = "the checkpoint holds no encoder weights (only FCMAE decoder parts, e.g. decoder.0."
        end = "pass a checkpoint with a ConvNeXt V2 encoder (ours, official, timm or Hugging Face)"
    else:
        import timm
        sd = timm.create_model("resnet10t", num_classes=10).state_dict()
        fragment = "the checkpoint is neither a ConvNeXt V2 checkpoint (ours, official, timm or Hugging Face)"
        end = "pass a matching checkpoint"
    torch.save({"model": sd}, path)
    out = tmp_path / "run"
    p = run("main_pretrain.py", PRE + ["--epochs", "1", "--finetune", path, "--output_dir", out], check=False)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --finetune {path}: {fragment}"), lines
    assert lines[0].endswith(end), lines
    assert not out.exists() and sorted(os.listdir(tmp_path)) == [path.name]


def test_readme_section_shows_the_lines_and_flags_the_scripts_have():
    """README "Continue pretraining on your data": its example lines are the code's wording (as
    the tests above get them), and its commands parse with the scripts' own parsers."""
    import re
    import shlex

    import main_finetune
    import main_pretrain
    from tests.helpers import ROOT
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        section = f.read().split("## Continue pretraining on your data")[1].split("\n## ")[0]
    assert f"--finetune convnextv2_atto_1k_224_fcmae.pt: {FRESH_DECODER}`" in section
    assert ": encoder, decoder and mask token loaded; nothing starts fresh`" in section
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1).replace("\\\n", " ")
    commands = [shlex.split(ln) for ln in block.splitlines() if ln.startswith("python main_")]
    assert [c[1] for c in commands] == ["main_pretrain.py", "main_finetune.py"]
    for (_, script, *argv), module in zip(commands, (main_pretrain, main_finetune)):
        module.get_args_parser().parse_args(argv)

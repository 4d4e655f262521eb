"""FCMAE pretraining end to end, its bad input, and the hand-off to fine-tuning."""
import argparse
import os

import pytest
import torch

from tests.helpers import read_log, run, run_record

pytestmark = pytest.mark.slow

PRE = ["--model", "convnextv2_atto", "--data_set", "synthetic", "--input_size", "64",
       "--synthetic_train_samples", "128", "--batch_size", "16", "--num_workers", "0",
       "--device", "cpu", "--print_freq", "4", "--warmup_epochs", "0", "--blr", "2e-2",
       "--decoder_embed_dim", "128"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pre") / "run"
    run("main_pretrain.py", PRE + ["--epochs", "4", "--vis_freq", "2", "--output_dir", str(out)])
    return out


def test_pretraining_loss_falls_and_outputs_exist(pretrained):
    log = read_log(pretrained)
    assert [e["epoch"] for e in log] == [0, 1, 2, 3]
    assert {"train_loss", "train_lr", "train_img_per_s", "train_data_wait", "epoch"} <= set(log[0])
    assert all(0 <= e["train_data_wait"] < 1 for e in log)  # the share of the epoch spent waiting for batches
    assert log[-1]["train_loss"] < log[0]["train_loss"] - 0.02
    assert run_record(pretrained)["status"] == "completed"
    assert os.path.exists(pretrained / "checkpoint-3.pth")


def test_reconstruction_grid_in_tensorboard(pretrained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(pretrained / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    tags = acc.Tags()["images"]
    assert len(tags) == 1 and "reconstruction" in tags[0]
    assert [e.step for e in acc.Images(tags[0])] == [0, 2, 3]


def test_finetune_from_our_pretrain_checkpoint(pretrained):
    from engine_finetune import load_finetune_weights
    from models import create_model
    ckpt = torch.load(pretrained / "checkpoint-3.pth", weights_only=True)["model"]
    model = create_model("convnextv2_atto", num_classes=10)
    args = argparse.Namespace(finetune=str(pretrained / "checkpoint-3.pth"), model_key="model|module",
                              model_prefix="", linear_probe=False)
    load_finetune_weights(args, model)
    own = model.state_dict()
    enc = {k[len("encoder."):]: v for k, v in ckpt.items() if k.startswith("encoder.")}
    assert enc and all(torch.equal(own[k], v) for k, v in enc.items())
    p = run("main_finetune.py", ["--model", "convnextv2_atto", "--data_set", "synthetic", "--input_size", "64",
                                 "--synthetic_val_samples", "20", "--batch_size", "10", "--num_workers", "0",
                                 "--eval", "True", "--finetune", str(pretrained / "checkpoint-3.pth"),
                                 "--output_dir", str(pretrained.parent / "ev")])
    assert "missing keys ['norm.weight', 'norm.bias', 'head.weight', 'head.bias']" in p.stdout
    assert os.path.exists(pretrained.parent / "ev" / "eval.json")


def test_finetune_run_records_its_source_and_lives_where_its_settings_say(pretrained, tmp_path):
    """A fine-tuning run from the pretraining checkpoint, without --output_dir: it lives in
    <runs_root>/finetune/<model>-<signature[:10]>/, its run.json names the checkpoint and the
    pretraining run's signature, and --config <run>/config.yaml names the same run again."""
    root = tmp_path / "runs"
    flags = ["--model", "convnextv2_atto", "--data_set", "synthetic", "--input_size", "64",
             "--synthetic_train_samples", "20", "--synthetic_val_samples", "20", "--batch_size", "10",
             "--num_workers", "0", "--epochs", "1", "--aa", "none", "--reprob", "0", "--warmup_epochs", "0",
             "--finetune", str(pretrained / "checkpoint-3.pth")]
    run("main_finetune.py", flags + ["--runs_root", str(root)])
    (run_dir,) = (root / "finetune").iterdir()
    rec = run_record(run_dir)
    assert run_dir.name == f"convnextv2_atto-{rec['signature'][:10]}" and rec["status"] == "completed"
    assert rec["finetune_from"] == str(pretrained / "checkpoint-3.pth")
    assert rec["finetune_from_signature"] == run_record(pretrained)["signature"]
    again = run("main_finetune.py", ["--config", str(run_dir / "config.yaml"), "--runs_root", str(root)])
    assert f"run already completed: {run_dir}" in again.stdout


@pytest.mark.parametrize("flags,message", [
    (["--input_size", "48"], "multiple of 32"),
    (["--mask_ratio", "1.0"], "--mask_ratio"),
    (["--model", "convnextv2_tinny"], "convnextv2_tiny"),
    (["--model", "resnet18"], "FCMAE"),
])
def test_bad_input_is_one_line(tmp_path, flags, message):
    p = run("main_pretrain.py", PRE + ["--epochs", "1", "--output_dir", str(tmp_path / "x")] + flags, check=False)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], p.stderr
    assert "Traceback" not in p.stderr

"""What fine-tuning computes (engine_finetune.FinetuneTask): the loss of a batch and its
options, evaluation and its metrics, what is trained. A new option's test belongs here; the
recipes in docs/architecture.md were made this way."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

import engine_finetune
from main_finetune import get_args_parser
from tests.helpers import TINY, read_log, run, weights
from util import runs
from util.config import parse_args


def _args(*argv):
    return parse_args(get_args_parser(), list(argv))


def test_default_losses_are_timms_as_the_original_picks_them():
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    assert isinstance(engine_finetune.build_criterion(_args(), None), LabelSmoothingCrossEntropy)
    assert isinstance(engine_finetune.build_criterion(_args("--smoothing", "0"), None), torch.nn.CrossEntropyLoss)
    mixup = engine_finetune.build_mixup(_args("--mixup", "0.8"), 10)
    assert isinstance(engine_finetune.build_criterion(_args("--mixup", "0.8"), mixup), SoftTargetCrossEntropy)


@pytest.mark.parametrize("argv,thresh", [([], None), (["--bce_target_thresh", "0.2"], 0.2)])
def test_bce_loss_is_binary_cross_entropy_per_class(argv, thresh):
    """--bce_loss: one sigmoid per class against the (smoothed) one-hot target, as timm's
    train.py offers it; under mixup the mixed targets, made 0/1 above --bce_target_thresh.
    torch's binary_cross_entropy_with_logits is the witness."""
    torch.manual_seed(0)
    logits, labels = torch.randn(4, 5), torch.tensor([0, 3, 1, 3])
    args = _args("--bce_loss", "True", "--smoothing", "0.1", *argv)
    loss = engine_finetune.build_criterion(args, None)(logits, labels)
    target = torch.full((4, 5), 0.1 / 5).scatter_(1, labels[:, None], 1 - 0.1 + 0.1 / 5)
    if thresh is not None:
        target = (target > thresh).float()
    assert float(loss) == pytest.approx(float(F.binary_cross_entropy_with_logits(logits, target)), rel=1e-6)

    mixed = torch.softmax(torch.randn(4, 5), dim=1)  # what Mixup hands the loss
    loss = engine_finetune.build_criterion(_args("--bce_loss", "True", *argv), object())(logits, mixed)
    target = mixed if thresh is None else (mixed > thresh).float()
    assert float(loss) == pytest.approx(float(F.binary_cross_entropy_with_logits(logits, target)), rel=1e-6)


def test_bce_loss_is_an_outcome_flag_a_search_may_tune():
    from util.hpo.spec import NOT_SEARCHABLE
    base = runs.signature(_args(), 1, "finetune")
    assert runs.signature(_args("--bce_loss", "True"), 1, "finetune") != base
    assert runs.signature(_args("--bce_loss", "False"), 1, "finetune") == base  # the default: no new run
    assert {"bce_loss", "bce_target_thresh", "freeze_stages"}.isdisjoint(NOT_SEARCHABLE)


def test_evaluation_counts_top1_per_class():
    """acc1_per_class[c]: the share of class c's images whose top-1 is c (None: no image of c)."""
    logits = torch.tensor([[9., 0, 0, 0], [9., 0, 0, 0], [0, 9., 0, 0], [0, 0, 9., 0], [0, 0, 9., 0]])
    targets = torch.tensor([0, 0, 1, 1, 2])

    class Scores(torch.nn.Module):
        def forward(self, x):
            return logits[x.flatten().long()]
    loader = [(torch.arange(5, dtype=torch.float32).view(5, 1, 1, 1), targets)]
    stats = engine_finetune.evaluate(loader, Scores(), torch.device("cpu"), num_classes=4, reduce=False)
    assert stats["acc1_per_class"] == [100.0, 50.0, 100.0, None]
    assert stats["acc1"] == pytest.approx(80.0)


def test_frozen_stages_keep_their_weights_and_the_per_class_metric_is_logged(tmp_path):
    """--freeze_stages 2: the stem and the first two stages (and their downsampling) get no
    gradients and end bit-equal to where they started; the rest trains. The per-class top-1
    is in each epoch's log line and in eval.json (--eval needs no --freeze_stages; resuming
    training without it is one line)."""
    out = tmp_path / "run"
    common = [*TINY, "--batch_size", "16", "--save_ckpt_freq", "1"]
    run("main_finetune.py", [*common, "--epochs", "1", "--freeze_stages", "2", "--output_dir", str(out)])
    torch.manual_seed(0)
    start = engine_finetune.build_model(_args(*common, "--freeze_stages", "2"), 10).state_dict()
    end = weights(out / "checkpoint-0.pth")
    frozen = ("downsample_layers.0.", "downsample_layers.1.", "stages.0.", "stages.1.")
    for name, tensor in end.items():
        if name.startswith(frozen):
            assert torch.equal(tensor, start[name]), name
    assert not torch.equal(end["stages.2.0.pwconv1.weight"], start["stages.2.0.pwconv1.weight"])
    assert not torch.equal(end["head.weight"], start["head.weight"])
    assert len(read_log(out)[-1]["test_acc1_per_class"]) == 10
    run("main_finetune.py", [*common, "--eval", "True", "--resume", str(out / "checkpoint-0.pth")])
    with open(os.path.join(out, "eval.json")) as f:
        assert len(json.load(f)["acc1_per_class"]) == 10
    p = run("main_finetune.py", [*common, "--epochs", "2", "--resume", str(out / "checkpoint-0.pth"),
                                 "--output_dir", str(tmp_path / "other")], check=False)
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode == 2 and len(errors) == 1 and "resume it with the flags it was trained with" in errors[0]

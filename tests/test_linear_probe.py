"""Linear probe (--linear_probe, configs/linprobe.yaml): the whole network frozen under a new head
(BatchNorm without affine parameters, then Linear, as MAE's main_linprobe.py). The frozen part
records no autograd graph and runs as in evaluation; only the head is in the optimizer; a probe's
checkpoint holds the whole model, so --eval, exact --resume and `convert` work on it."""
import json
import os
import signal

import pytest
import torch

import engine_finetune
from main_finetune import get_args_parser
from tests.helpers import ROOT, TINY, assert_same_weights, run, run_record, stop_and_resume, weights
from util.config import parse_args

# the recipe (LARS, no weight decay, no augmentation but the crop) on the built-in set, tiny
ARGS = TINY + ["--config", os.path.join(ROOT, "configs", "linprobe.yaml"), "--input_size", "32",
               "--synthetic_train_samples", "96", "--batch_size", "8", "--update_freq", "1", "--epochs", "2",
               "--warmup_epochs", "1", "--use_amp", "False", "--blr", "1.0"]
STEPS = 96 // 8


def _args(*argv):
    return parse_args(get_args_parser(), list(argv))


def _saved_bytes(fn):
    """Bytes autograd saves for the backward while fn() runs (and fn's result)."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(saved), out


def test_frozen_part_records_no_graph_and_only_the_head_is_optimized():
    """The probe's head is MAE's (BatchNorm1d(affine=False, eps=1e-6), then the Linear); every other
    parameter has requires_grad False, so the pooled features come out of a forward that saved
    nothing for a backward (the head saves its one input); the optimizer's groups hold the
    head's weight and bias only."""
    from util.optim import create_optimizer
    torch.manual_seed(0)
    model = engine_finetune.build_model(_args("--model", "convnextv2_atto", "--linear_probe", "True"), 10)
    bn, linear = model.head
    assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.affine and bn.eps == 1e-6
    assert isinstance(linear, torch.nn.Linear) and linear.in_features == 320
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.1.weight", "head.1.bias"]
    frozen = engine_finetune.frozen_parts(model, model.head)
    model.train()
    engine_finetune.keep_frozen_in_eval(frozen)
    assert model.head.training and not any(m.training for part in frozen for m in part.modules())
    x = torch.randn(4, 3, 32, 32)
    saved, feats = _saved_bytes(lambda: model.forward_features(x))
    assert saved == 0 and not feats.requires_grad and feats.grad_fn is None
    saved, out = _saved_bytes(lambda: model(x))
    assert saved == 4 * 320 * 4 and out.requires_grad  # the BatchNorm's output, for the Linear's gradient
    full, _ = _saved_bytes(lambda: engine_finetune.build_model(_args("--model", "convnextv2_atto"), 10)(x))
    assert full > 100 * saved  # fine-tuning keeps every block's activations
    optimizer = create_optimizer(model, 0.1, "cpu", weight_decay=0.0, opt="lars")
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(linear.weight), id(linear.bias)}


def test_a_timm_model_is_probed_with_its_batchnorm_statistics_kept():
    """A timm model's classifier (get_classifier) becomes the probe's head; its BatchNorms run
    as in evaluation through the Task's loss, so their statistics do not move. A classifier that
    is not a Linear (ResNetV2's 1x1 conv) is refused in one line."""
    torch.manual_seed(0)
    args = _args("--model", "resnet18", "--linear_probe", "True", "--smoothing", "0")
    model = engine_finetune.build_model(args, 10)
    assert engine_finetune.classifier_name(model) == "fc" and isinstance(model.fc[0], torch.nn.BatchNorm1d)
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("fc.")}
    task = engine_finetune.FinetuneTask.__new__(engine_finetune.FinetuneTask)
    task.args, task.mixup_fn, task.criterion = args, None, torch.nn.CrossEntropyLoss()
    task.frozen = engine_finetune.frozen_parts(model, model.fc)
    model.train()
    task.loss(model, (torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))).backward()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert int(model.fc[0].num_batches_tracked) == 1 and model.fc[1].weight.grad is not None
    from util.errors import UserError
    with pytest.raises(UserError, match="the classifier of resnetv2_18 is Conv2d, not a Linear layer"), \
            torch.device("meta"):
        engine_finetune.build_model(_args("--model", "resnetv2_18", "--linear_probe", "True"), 10)


def test_lars_adapts_the_weight_matrix_at_zero_weight_decay():
    """--opt lars (timm's Lars) as MAE's LARS: the trust ratio 0.001 |w| / |g| scales the weight
    matrix's step even at --weight_decay 0 (timm's own default adapts only groups with weight
    decay), and not the bias's."""
    from util.optim import create_optimizer
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 3)
    optimizer = create_optimizer(head, 0.5, "cpu", weight_decay=0.0, opt="lars")
    w0, b0 = head.weight.detach().clone(), head.bias.detach().clone()
    head(torch.randn(5, 8)).square().sum().backward()
    gw, gb = head.weight.grad.clone(), head.bias.grad.clone()
    optimizer.step()
    torch.testing.assert_close(w0 - head.weight.detach(), 0.5 * 0.001 * w0.norm() / gw.norm() * gw)
    torch.testing.assert_close(b0 - head.bias.detach(), 0.5 * gb)


def test_folded_head_is_the_probe_in_evaluation():
    """convert's fold: BatchNorm (evaluation: (x - mean) / sqrt(var + eps)) into the Linear after
    it; the plain classifier's outputs equal the probe's."""
    from models import create_model
    from models.weights import fold_probe_head
    torch.manual_seed(0)
    probe = engine_finetune.build_model(_args("--model", "convnextv2_atto", "--linear_probe", "True"), 5)
    probe.head[0].running_mean.normal_(0, 3)
    probe.head[0].running_var.uniform_(0.01, 5)
    plain = create_model("convnextv2_atto", num_classes=5)
    plain.load_state_dict(fold_probe_head(probe.state_dict()))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), probe.eval()(x), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The weights probed: a convnextv2_atto classifier of another class count, saved as ours."""
    from models import create_model
    torch.manual_seed(7)
    path = tmp_path_factory.mktemp("source") / "source.pth"
    torch.save({"model": create_model("convnextv2_atto", num_classes=7).state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def probe(tmp_path_factory, source):
    """A probe of `source` that ran to its end, two epochs (the reference of the resume test)."""
    out = tmp_path_factory.mktemp("probe") / "run"
    r = run("main_finetune.py", ARGS + ["--finetune", str(source), "--output_dir", str(out)])
    assert f"linear probe: {source} frozen whole; only the head" in r.stdout
    return out


@pytest.mark.slow
def test_probe_keeps_every_encoder_tensor_and_optimizes_only_the_head(probe, source):
    """After the probe every tensor but the head's is bit-equal to the --finetune file's; the
    checkpoint's optimizer state (LARS momentum) covers the head's weight and bias alone."""
    src, ck = weights(source), torch.load(probe / "checkpoint-1.pth", map_location="cpu", weights_only=True)
    end = ck["model"]
    encoder = [k for k in end if not k.startswith("head.")]
    assert len(encoder) == len([k for k in src if not k.startswith("head.")]) > 100
    assert all(torch.equal(end[k], src[k]) for k in encoder)
    assert sorted(k for k in end if k.startswith("head.")) == [
        "head.0.num_batches_tracked", "head.0.running_mean", "head.0.running_var", "head.1.bias", "head.1.weight"]
    assert int(end["head.0.num_batches_tracked"]) == 2 * STEPS
    assert not torch.equal(weights(probe / "checkpoint-0.pth")["head.1.weight"], end["head.1.weight"])
    groups = ck["optimizer"]["param_groups"]
    assert sum(len(g["params"]) for g in groups) == 2
    shapes = sorted(tuple(s["momentum_buffer"].shape) for s in ck["optimizer"]["state"].values())
    assert shapes == [(10,), (10, 320)]
    assert run_record(probe)["n_parameters"] == 10 * 320 + 10


@pytest.mark.slow
def test_probe_resumes_bit_identical(tmp_path, probe, source):
    """Stopped by SIGTERM inside epoch 0 and started again, the probe ends where the one that
    never stopped ends, bit for bit: weights, the head's BatchNorm statistics, LARS's momentum."""
    cut = tmp_path / "cut"
    stop_and_resume(ARGS + ["--finetune", str(source)], cut, 1, STEPS, signal.SIGTERM)
    assert_same_weights(probe / "checkpoint-1.pth", cut / "checkpoint-1.pth")
    a, b = (torch.load(p / "checkpoint-1.pth", map_location="cpu", weights_only=True)["optimizer"]["state"]
            for p in (probe, cut))
    assert a.keys() == b.keys() and all(torch.equal(a[k]["momentum_buffer"], b[k]["momentum_buffer"]) for k in a)


def _one_line(tmp_path, args, fragment):
    """The launch ends with one error line holding `fragment`, exit 2, and writes no run folder."""
    out = tmp_path / "refused"
    r = run("main_finetune.py", args + ["--output_dir", str(out)], check=False)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and fragment in errors[0], r.stderr[-2000:]
    assert not out.exists()


@pytest.mark.slow
def test_eval_of_a_probe_checkpoint_and_the_flag_it_needs(tmp_path, probe, source):
    """--eval of a probe's checkpoint with --linear_probe (--resume, or --finetune) gives the
    accuracy its epoch logged. Without the flag, or with it for a plain checkpoint, or for a
    timm model whose classifier is no Linear, the launch is one line, exit 2, nothing written."""
    ck = probe / "checkpoint-1.pth"
    logged = [json.loads(line) for line in (probe / "log.txt").read_text().splitlines()][-1]
    for flag in ("--resume", "--finetune"):
        out = tmp_path / f"eval{flag}"
        run("main_finetune.py", ARGS + ["--eval", "True", flag, str(ck), "--output_dir", str(out)])
        stats = json.loads((out / "eval.json").read_text())
        assert stats["n"] == 30 and stats["acc1"] == pytest.approx(logged["test_acc1"]), flag
    plain = [a for a in ARGS if a not in (os.path.join(ROOT, "configs", "linprobe.yaml"), "--config")]
    _one_line(tmp_path, plain + ["--eval", "True", "--resume", str(ck)],
              f"--resume {ck} is a linear probe's checkpoint (its head: BatchNorm, then Linear); "
              "pass --linear_probe True")
    _one_line(tmp_path, plain + ["--eval", "True", "--finetune", str(ck)],
              f"--finetune {ck} is a linear probe's checkpoint; evaluating it needs --linear_probe True")
    _one_line(tmp_path, ARGS + ["--resume", str(source)], f"--resume {source} is not a linear probe's checkpoint")
    _one_line(tmp_path, ARGS + ["--model", "resnetv2_18"],
              "--linear_probe: the classifier of resnetv2_18 is Conv2d, not a Linear layer")


@pytest.mark.slow
def test_convert_of_a_probe_checkpoint_loads_in_timm_with_equal_outputs(tmp_path, probe):
    """`convert --to timm` folds the probe's head into one Linear: timm's convnextv2_atto loads the
    file as a plain classifier (strictly, through pretrained_cfg_overlay) and gives the probe's
    outputs in evaluation."""
    import timm

    from models.weights import main as weights_main
    weights_main(["convert", str(probe / "checkpoint-1.pth"), str(tmp_path / "atto.safetensors"), "--to", "timm"])
    theirs = timm.create_model("convnextv2_atto", pretrained=True, num_classes=10, pretrained_cfg_overlay=dict(
        file=str(tmp_path / "atto.safetensors"), num_classes=10)).eval()
    mine = engine_finetune.build_model(_args("--model", "convnextv2_atto", "--linear_probe", "True"), 10)
    mine.load_state_dict(weights(probe / "checkpoint-1.pth"))
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), mine.eval()(x), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_probe_without_finetune_says_it_probes_random_weights(tmp_path):
    """--linear_probe without --finetune goes on (a random-features baseline) and says so."""
    r = run("main_finetune.py", TINY + ["--linear_probe", "True", "--batch_size", "8", "--preflight"])
    assert ("note: --linear_probe without --finetune probes randomly initialised weights (a random-features "
            "baseline); pass --finetune FILE to probe pretrained ones") in r.stdout
    assert "--head_init_scale" not in r.stdout


def test_memory_benchmark_compares_the_probe_with_fine_tuning():
    """`benchmarks/bench_train.py --linear_probe` (the figures of docs/benchmarks.md), smallest run."""
    import argparse
    import sys
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import bench_train
    finally:
        sys.path.pop(0)
    a = argparse.Namespace(model="convnextv2_atto", input_size=32, batch_size=2, steps=1, rounds=1, use_amp=False,
                           channels_last=False, compile=False, no_malloc_tuning=True)
    out = bench_train.bench_linear_probe(a)
    assert (out["finetune_trainable_params"], out["linear_probe_trainable_params"]) == (3708400, 320 * 1000 + 1000)
    assert out["linear_probe_step_s"] > 0 and out["finetune_step_s"] > 0 and out["linear_probe_time_ratio"] > 0

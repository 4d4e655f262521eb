"""`python -m models.weights average OUT IN [IN ...]`: the mean of checkpoints' weights (and of
their EMA weights), as a checkpoint that --eval --resume evaluates and --finetune starts from."""
import functools
import json
import os
import re
import shlex
import subprocess

import pytest
import timm
import torch

from models import create_model
from models.weights import main, read_torch_file
from tests.helpers import ROOT, TINY, run
from tests.test_models import _randomise


@functools.lru_cache(maxsize=None)  # shared by the tests, which do not change them
def _checkpoint(seed, epoch, ema=True, model="convnextv2_atto", **kw):
    """A checkpoint as training writes it (util/train_state.py), of random weights."""
    torch.manual_seed(seed)
    sd = _randomise(create_model(model, **kw), seed).state_dict()
    ck = {"model": sd, "optimizer": {"state": {}, "param_groups": []}, "scaler": {}, "epoch": epoch, "step": 0,
          "epoch_done": True, "global_step": 10 * (epoch + 1), "rng": [], "world_size": 1,
          "best": {"name": "test_acc1", "value": 50.0, "epoch": epoch},
          "args": {"model": model, "seed": seed}, "extra": {"signature": f"sig{seed}", "classes": ["a", "b"]}}
    if ema:
        ck["model_ema"] = {k: v * 0.5 if v.is_floating_point() else v for k, v in sd.items()}
    return ck


def _average(tmp_path, *checkpoints, out="avg.pth"):
    paths = []
    for i, ck in enumerate(checkpoints):
        paths.append(str(tmp_path / f"in{i}.pth"))
        torch.save(ck, paths[-1])
    main(["average", str(tmp_path / out), *paths])
    return paths, read_torch_file(str(tmp_path / out))


def test_average_is_the_mean_tensor_by_tensor_with_the_first_inputs_settings(tmp_path, capsys):
    """Three checkpoints: every weight and EMA weight of OUT is their mean (summed in float64, as
    timm's avg_checkpoints.py), tensor by tensor; args and extra are the first's, the epoch the newest; no optimizer,
    scaler, RNG or best (an average was not trained); the inputs are named."""
    cks = [_checkpoint(0, 7, num_classes=2), _checkpoint(1, 9, num_classes=2), _checkpoint(2, 8, num_classes=2)]
    paths, avg = _average(tmp_path, *cks)
    assert "the mean of 3 checkpoints' weights with their EMA weights" in capsys.readouterr().out
    for key in ("model", "model_ema"):
        assert avg[key].keys() == cks[0][key].keys()
        for k, v in avg[key].items():
            hand = ((cks[0][key][k].double() + cks[1][key][k].double() + cks[2][key][k].double()) / 3).float()
            assert v.dtype == torch.float32 and torch.equal(v, hand), (key, k)
    assert avg["args"] == cks[0]["args"] and avg["extra"] == cks[0]["extra"]
    assert avg["epoch"] == 9 and avg["epoch_done"] is True and avg["averaged_from"] == paths
    assert not {"optimizer", "scaler", "rng", "best", "global_step", "step", "world_size"} & set(avg)

    # two inputs, one without EMA weights: the model's mean is (a + b) / 2 as float32 computes it
    # (exact: a + b rounded once, halved without rounding), and no EMA
    a, b = _checkpoint(0, 7, num_classes=2), _checkpoint(1, 8, ema=False, num_classes=2)
    _, avg = _average(tmp_path, a, b, out="avg2.pth")
    assert all(torch.equal(v, (a["model"][k] + b["model"][k]) / 2) for k, v in avg["model"].items())
    assert "model_ema" not in avg and "not every input has them" in capsys.readouterr().out


def test_integer_buffers_are_the_first_inputs(tmp_path):
    """A timm model's BatchNorm counts its batches: the count is not averaged; the running
    statistics (floats) are."""
    cks = []
    for seed, batches in ((0, 5), (1, 9)):
        torch.manual_seed(seed)
        sd = timm.create_model("resnet10t", num_classes=3).state_dict()
        sd = {k: (torch.full_like(v, batches) if k.endswith("num_batches_tracked") else v + seed)
              for k, v in sd.items()}
        cks.append({"model": sd, "epoch": seed})
    _, avg = _average(tmp_path, *cks)
    for k, v in avg["model"].items():
        if k.endswith("num_batches_tracked"):
            assert v.dtype == torch.int64 and v.item() == 5
        else:
            assert torch.equal(v, ((cks[0]["model"][k].double() + cks[1]["model"][k].double()) / 2).float()), k


@pytest.mark.parametrize("bad", ["variant", "classes", "bands", "other_model", "one_input", "out_is_input",
                                 "not_weights", "safetensors_out"])
def test_bad_inputs_are_one_line_and_write_nothing(bad, tmp_path, capsys):
    base = _checkpoint(0, 1, ema=False, num_classes=2)
    other, fragment = {
        "variant": (_checkpoint(1, 2, model="convnextv2_femto", num_classes=2),
                    "is a convnextv2_femto with 2 classes and 3 bands, "),
        "classes": (_checkpoint(1, 2, num_classes=5), "is a convnextv2_atto with 5 classes and 3 bands"),
        "bands": (_checkpoint(1, 2, num_classes=2, in_chans=4), "is a convnextv2_atto with 2 classes and 4 bands"),
        "other_model": ({"model": timm.create_model("resnet10t", num_classes=2).state_dict()},
                        "does not hold the weights of"),
        "one_input": (None, "average needs two or more checkpoints, got 1"),
        "out_is_input": (base, "is also one of the inputs; give a new OUT file"),
        "not_weights": ({"optimizer": {"state": {}}, "epoch": 3}, "holds no weights under 'model|module'"),
        "safetensors_out": (base, "average writes a checkpoint (.pth), the kind a run resumes from"),
    }[bad]
    paths = [str(tmp_path / "a.pth")] + ([str(tmp_path / "b.pth")] if other is not None else [])
    for path, ck in zip(paths, (base, other)):
        torch.save(ck, path)
    out = {"out_is_input": paths[0], "safetensors_out": str(tmp_path / "avg.safetensors")}.get(
        bad, str(tmp_path / "avg.pth"))
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SystemExit) as info:
        main(["average", out, *paths])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no temporary left


def test_a_runs_last_checkpoints_averaged_evaluate_with_resume_and_start_a_finetune(tmp_path):
    """The README's recipe on a real run: its last two epoch checkpoints (kept by --save_ckpt_num),
    averaged with their EMA; `--eval True --resume AVG` evaluates the mean weights and the mean
    EMA and names the newest epoch; `--finetune AVG` loads the mean weights whole."""
    args = TINY + ["--synthetic_train_samples", "8", "--batch_size", "8", "--model_ema", "True",
                   "--model_ema_eval", "True"]
    run_dir = tmp_path / "run"
    run("main_finetune.py", args + ["--epochs", "3", "--save_ckpt_num", "2", "--output_dir", str(run_dir)])
    assert sorted(p.name for p in run_dir.glob("checkpoint-[0-9]*.pth")) == ["checkpoint-1.pth", "checkpoint-2.pth"]
    avg = tmp_path / "avg.pth"
    main(["average", str(avg), str(run_dir / "checkpoint-1.pth"), str(run_dir / "checkpoint-2.pth")])
    mean = read_torch_file(str(avg))
    one, two = (read_torch_file(str(run_dir / f"checkpoint-{e}.pth")) for e in (1, 2))
    w = "head.weight"
    assert torch.equal(mean["model"][w], ((one["model"][w].double() + two["model"][w].double()) / 2).float())
    assert not torch.equal(mean["model"][w], two["model"][w])

    run("main_finetune.py", args + ["--eval", "True", "--resume", str(avg), "--output_dir", str(tmp_path / "eval")])
    stats = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert stats["checkpoint"] == str(avg) and stats["epoch"] == 2 and stats["n"] == 30
    assert 0 <= stats["acc1"] <= 100 and 0 <= stats["acc1_ema"] <= 100

    # --finetune's own load (engine_finetune), in this process: the averaged weights, whole
    import engine_finetune
    from main_finetune import get_args_parser
    from util.config import parse_args
    ft = parse_args(get_args_parser(), args + ["--finetune", str(avg)])
    model = engine_finetune.build_model(ft, 10)
    assert engine_finetune.load_finetune_weights(ft, model)["finetune_from"] == str(avg)
    assert all(torch.equal(v, mean["model"][k]) for k, v in model.state_dict().items())


def test_readme_line_averages_a_runs_last_five_epoch_checkpoints(tmp_path, monkeypatch):
    """The README's `average` line, its file list made by the shell as written, in a run folder of
    epochs 0 to 11 (10 and 11 sort after 9 only numerically) beside checkpoint-last.pth and
    checkpoint-best.pth: OUT is the mean of epochs 7 to 11."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        section = f.read().split("## Average checkpoints, export to ONNX")[1].split("\n## ")[0]
    line = next(ln for ln in section.splitlines() if ln.startswith("python -m models.weights average "))
    listing = re.search(r"\$\((.*)\)", line).group(1)
    monkeypatch.chdir(tmp_path)
    os.makedirs("runs/finetune/RUN")
    for name, epoch in [(f"checkpoint-{e}.pth", e) for e in range(12)] + [("checkpoint-last.pth", 11),
                                                                         ("checkpoint-best.pth", 3)]:
        torch.save({"model": {"w": torch.full((2,), float(epoch))}, "epoch": epoch}, f"runs/finetune/RUN/{name}")
    files = subprocess.run(["bash", "-c", listing], capture_output=True, text=True, check=True).stdout.split()
    out = shlex.split(line[:line.index("$(")])[4]
    main(["average", out, *files])
    avg = read_torch_file(out)
    assert [os.path.basename(p) for p in avg["averaged_from"]] == [f"checkpoint-{e}.pth" for e in range(7, 12)]
    assert torch.equal(avg["model"]["w"], torch.full((2,), 9.0)) and avg["epoch"] == 11

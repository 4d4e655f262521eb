"""Fine-tuning end to end: torchrun on gloo, DDP and accumulation equivalence, resume, the full recipe."""
import json
import math
import os

import pytest
import torch

from tests.helpers import TINY, read_log, run, run_record, weights

pytestmark = pytest.mark.slow


def _close(a, b, atol=1e-5):
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=1e-4), k


def test_settings_stay_as_parsed():
    """Nothing writes onto `args`: what a process learns (rank, device, lr, classes, run
    directory) is a RunContext, and `builtins.print` stays the interpreter's own."""
    import builtins
    import copy

    from main_finetune import get_args_parser
    from util.config import parse_args
    from util.distributed import init_distributed
    from util.run_context import RunContext
    own_print = builtins.print
    args = parse_args(get_args_parser(), TINY + ["--batch_size", "8", "--update_freq", "2"])
    parsed = copy.deepcopy(vars(args))
    dist = init_distributed(args)
    ctx = RunContext(dist, lr=4e-3 * 16 / 256, global_batch=16, nb_classes=10, run_dir="/r", log_dir="/r/tb")
    merged = ctx.settings(args)
    assert vars(args) == parsed and builtins.print is own_print
    assert {k: vars(merged)[k] for k in ctx.learned()} == {
        "rank": 0, "world_size": 1, "gpu": 0, "distributed": False, "device": "cpu", "lr": 4e-3 * 16 / 256,
        "nb_classes": 10, "output_dir": "/r", "log_dir": "/r/tb"}
    assert list(vars(merged))[-3:] == ["rank", "gpu", "distributed"]  # where the old writes put them
    assert merged._flag_dests == args._flag_dests


def test_run_files_hold_the_learned_values(tmp_path):
    """config.yaml and a checkpoint's "args" keep what the scripts used to write onto `args`:
    the resolved lr, the class count, the device, the run and TensorBoard directories."""
    import yaml
    out = tmp_path / "run"
    run("main_finetune.py", TINY + ["--batch_size", "16", "--epochs", "1", "--output_dir", str(out)])
    saved = torch.load(out / "checkpoint-0.pth", weights_only=True)["args"]
    assert {k: saved[k] for k in ("lr", "nb_classes", "device", "rank", "world_size", "gpu", "distributed",
                                  "output_dir", "log_dir")} == {
        "lr": 4e-3 * 16 / 256, "nb_classes": 10, "device": "cpu", "rank": 0, "world_size": 1, "gpu": 0,
        "distributed": False, "output_dir": str(out), "log_dir": str(out / "tensorboard")}
    text = (out / "config.yaml").read_text()
    config = yaml.safe_load(text)
    assert config["lr"] == 4e-3 * 16 / 256 and config["nb_classes"] == 10
    assert f'"output_dir": "{out}"' in text.splitlines()[1]  # the per-launch comment line


def test_torchrun_two_processes(tmp_path):
    out = tmp_path / "ddp"
    run("main_finetune.py", TINY + ["--batch_size", "8", "--epochs", "2", "--output_dir", str(out)], nproc=2)
    rec = run_record(out)
    assert rec["status"] == "completed" and rec["world_size"] == 2
    log = read_log(out)
    assert [e["epoch"] for e in log] == [0, 1]
    assert log[-1]["test_n"] == 30  # every val image counted once, none padded
    assert os.path.exists(out / "checkpoint-1.pth") and os.path.exists(out / "checkpoint-best.pth")


def test_ddp_with_accumulation_equals_single_process_with_big_batch(tmp_path):
    """2 processes x batch 4 x update_freq 2 (DDP's no_sync on the first micro-step, the
    all-reduce on the second) reach the weights of 1 process x batch 16."""
    # SGD, not AdamW: Adam divides by |g|, so float noise in near-zero gradients (reduction order)
    # would show up as lr-sized differences that say nothing about DDP.
    common = TINY + ["--epochs", "1", "--disable_eval", "True", "--opt", "sgd", "--blr", "0.5"]
    r = run("main_finetune.py", common + ["--batch_size", "4", "--update_freq", "2",
                                          "--output_dir", str(tmp_path / "two")], nproc=2)
    assert "Grad strides do not match" not in r.stderr  # weights laid out as the gradients come
    run("main_finetune.py", common + ["--batch_size", "16", "--output_dir", str(tmp_path / "one")])
    _close(weights(tmp_path / "two" / "checkpoint-0.pth"), weights(tmp_path / "one" / "checkpoint-0.pth"))


def test_accumulation_equals_double_batch(tmp_path):
    common = TINY + ["--epochs", "1", "--disable_eval", "True", "--opt", "sgd", "--blr", "0.5"]
    run("main_finetune.py", common + ["--batch_size", "8", "--update_freq", "2", "--output_dir", str(tmp_path / "acc")])
    run("main_finetune.py", common + ["--batch_size", "16", "--output_dir", str(tmp_path / "big")])
    _close(weights(tmp_path / "acc" / "checkpoint-0.pth"), weights(tmp_path / "big" / "checkpoint-0.pth"))


def test_resume_from_epoch_checkpoint_continues_epochs_and_schedule(tmp_path):
    common = TINY + ["--epochs", "3", "--batch_size", "16", "--warmup_epochs", "1"]
    full = tmp_path / "full"
    run("main_finetune.py", common + ["--output_dir", str(full)])
    part = tmp_path / "part"
    run("main_finetune.py", common + ["--output_dir", str(part), "--resume", str(full / "checkpoint-0.pth")])
    log_full, log_part = read_log(full), read_log(part)
    assert [e["epoch"] for e in log_part] == [1, 2]
    for a, b in zip(log_full[1:], log_part):
        assert a["train_lr"] == b["train_lr"]
    a, b = weights(full / "checkpoint-2.pth"), weights(part / "checkpoint-2.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_full_recipe_flags_train_and_the_ema_is_evaluated(tmp_path):
    """The paper's fine-tuning recipe in miniature (bf16 autocast, mixup + cutmix with soft
    targets, label smoothing, clipping, layer decay, weight-decay schedule, EMA picked as best),
    then --eval of the best checkpoint reports the EMA too."""
    out = tmp_path / "recipe"
    recipe = ["--use_amp", "True", "--mixup", "0.8", "--cutmix", "1.0", "--smoothing", "0.1",
              "--clip_grad", "1.0", "--layer_decay", "0.9", "--weight_decay_end", "0.1",
              "--model_ema", "True", "--model_ema_decay", "0.9", "--model_ema_eval", "True"]
    run("main_finetune.py", TINY + recipe + ["--batch_size", "16", "--epochs", "2", "--output_dir", str(out)])
    log = read_log(out)
    assert all(math.isfinite(e["train_loss"]) and "test_acc1_ema" in e for e in log)
    assert run_record(out)["best_metric"]["name"] == "test_acc1_ema"
    ev = tmp_path / "ev"
    r = run("main_finetune.py", TINY + recipe + ["--batch_size", "16", "--eval", "True", "--resume",
                                                 str(out / "checkpoint-best.pth"), "--output_dir", str(ev)])
    stats = json.loads((ev / "eval.json").read_text())
    assert stats["n"] == 30 and stats["n_ema"] == 30 and "Accuracy of the EMA model" in r.stdout
    best = max(log, key=lambda e: e["test_acc1_ema"])
    assert (stats["checkpoint"], stats["epoch"]) == (str(out / "checkpoint-best.pth"), best["epoch"])
    assert f"evaluated {out / 'checkpoint-best.pth'}: results in {ev / 'eval.json'}" in r.stdout
    assert abs(stats["acc1_ema"] - best["test_acc1_ema"]) < 1e-6


@pytest.mark.parametrize("scale,finetune,said", [(0.001, "", True), (1.0, "", False), (0.001, "w.pth", False)])
def test_head_init_scale_below_1_from_scratch_says_what_it_is_for(capsys, monkeypatch, scale, finetune, said):
    """A run from scratch with the fine-tuning default --head_init_scale 0.001 (kept, as in the
    original) prints one line saying what it is for and how to change it; a start from
    --finetune weights, or a scale of 1, says nothing."""
    import argparse

    import engine_finetune
    monkeypatch.setattr(engine_finetune, "load_finetune_weights", lambda args, model: {})
    task = engine_finetune.FinetuneTask.__new__(engine_finetune.FinetuneTask)
    task.args = argparse.Namespace(head_init_scale=scale, finetune=finetune, freeze_stages=0,
                                   linear_probe=False)
    task.prepare(None)
    out = capsys.readouterr().out.splitlines()
    assert out == ([f"note: --head_init_scale {scale:g} shrinks the new classifier's initial weights, as meant "
                    "for a start from pretrained weights (--finetune); training from scratch, pass "
                    "--head_init_scale 1.0 for a head initialised like the rest of the model"] if said else [])


def test_run_says_where_it_is_and_eval_writes_next_to_its_checkpoint(tmp_path):
    """A run prints its run directory at its start and at its end; a completed run's
    checkpoint-last.pth (rolling saves every step here) is its final state; `--eval True --resume <run>/checkpoint-best.pth` (no --output_dir)
    writes eval.json next to that checkpoint, not into the newest --force sibling (-r2), says
    where, and names the checkpoint and its epoch."""
    common = TINY + ["--epochs", "2", "--batch_size", "16", "--runs_root", str(tmp_path / "runs"),
                     "--save_ckpt_minutes", "0.00001"]
    first = run("main_finetune.py", common)
    run_dir = next(line for line in first.stdout.splitlines() if line.startswith("run directory: "))[15:]
    assert [line for line in first.stdout.splitlines() if line.startswith("run directory: ")] == [f"run directory: {run_dir}"] * 2
    assert first.stdout.strip().splitlines()[-1] == f"run directory: {run_dir}"
    final, last = (torch.load(os.path.join(run_dir, f"checkpoint-{n}.pth"), weights_only=True) for n in ("1", "last"))
    assert (last["epoch"], last["step"], last["epoch_done"], last["global_step"]) == (1, 0, True, final["global_step"])
    assert all(torch.equal(last["model"][k], v) for k, v in final["model"].items())  # the final state, not older
    run("main_finetune.py", common + ["--force"])
    sibling = run_dir + "-r2"
    assert os.path.isdir(sibling)
    best = os.path.join(run_dir, "checkpoint-best.pth")
    r = run("main_finetune.py", common + ["--eval", "True", "--resume", best])
    stats = json.loads(open(os.path.join(run_dir, "eval.json")).read())
    assert stats["checkpoint"] == os.path.abspath(best) and stats["epoch"] == run_record(run_dir)["best_metric"]["epoch"]
    assert not os.path.exists(os.path.join(sibling, "eval.json"))
    assert f"results in {os.path.join(run_dir, 'eval.json')}" in r.stdout

"""Fine-tuning end to end: torchrun on gloo, DDP and accumulation equivalence, resume."""
import os

import pytest
import torch

from tests.helpers import TINY, read_log, run, run_record, weights

pytestmark = pytest.mark.slow


def _close(a, b, atol=1e-5):
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=1e-4), k


def test_torchrun_two_processes(tmp_path):
    out = tmp_path / "ddp"
    run("main_finetune.py", TINY + ["--batch_size", "8", "--epochs", "2", "--output_dir", str(out)], nproc=2)
    rec = run_record(out)
    assert rec["status"] == "completed" and rec["world_size"] == 2
    log = read_log(out)
    assert [e["epoch"] for e in log] == [0, 1]
    assert log[-1]["test_n"] == 30  # every val image counted once, none padded
    assert os.path.exists(out / "checkpoint-1.pth") and os.path.exists(out / "checkpoint-best.pth")


def test_ddp_equals_single_process_with_double_batch(tmp_path):
    # SGD, not AdamW: Adam divides by |g|, so float noise in near-zero gradients (reduction order)
    # would show up as lr-sized differences that say nothing about DDP.
    common = TINY + ["--epochs", "1", "--disable_eval", "True", "--opt", "sgd", "--blr", "0.5"]
    run("main_finetune.py", common + ["--batch_size", "8", "--output_dir", str(tmp_path / "two")], nproc=2)
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

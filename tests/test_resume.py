"""Exact resume: a run stopped by SIGTERM mid-epoch and started again ends with the same
weights, bit for bit, as a run that never stopped (CPU; 1 and 2 processes, the latter SIGTERM
to torchrun; RGB and 4 bands; with and without loader workers)."""
import signal

import pytest
import torch

from tests.helpers import (TINY, assert_same_weights, read_log, run, run_record, stop_and_resume, stop_midway,
                           weights)

pytestmark = pytest.mark.slow

ARGS = TINY + ["--synthetic_train_samples", "192", "--epochs", "2", "--batch_size", "8",
               "--drop_path", "0.1", "--warmup_epochs", "1", "--model_ema", "True", "--model_ema_decay", "0.9"]
# batches finished on the device (uint8 from the workers), with what is random there: erasing, mixup
DEVICE = ["--device_transforms", "true", "--reprob", "0.5", "--mixup", "0.8", "--cutmix", "1.0"]
# four bands of float data (the built-in set's, only the last band carrying the class), flipped both ways
BANDS = ["--in_chans", "4", "--vflip", "0.5", "--reprob", "0.5"]
# a loader worker per rank: torchrun passes its SIGTERM to each rank's whole process group, Slurm
# to every process of the job, and the workers must leave the stop to their rank
# (util/data/loaders.py), or the preemption is a failure
WORKERS = ["--num_workers", "1"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """reference(nproc, extra): the run that never stopped, made once per process count and flags."""
    made = {}

    def get(nproc, extra=()):
        key = (nproc, tuple(extra))
        if key not in made:
            made[key] = tmp_path_factory.mktemp(f"ref{nproc}") / "run"
            run("main_finetune.py", ARGS + list(extra) + ["--output_dir", str(made[key])], nproc=nproc)
        return made[key]
    return get


@pytest.mark.parametrize("nproc,sig,extra,workers,every_process", [
    (1, signal.SIGUSR2, BANDS, False, False), (1, signal.SIGTERM, DEVICE, False, False),
    (2, signal.SIGTERM, DEVICE + BANDS, True, False),
    (1, signal.SIGTERM, [], True, True)],  # as Slurm preempts: SIGTERM to every process, workers too
    ids=["1proc-usr2-bands", "1proc-device", "2proc-device-bands-workers", "1proc-workers-sigterm-to-all"])
def test_preempted_run_resumes_bit_identical(tmp_path, reference, nproc, sig, extra, workers, every_process):
    ref = reference(nproc, extra)  # without loader workers: they change nothing
    args = ARGS + extra + (WORKERS if workers else [])
    cut = tmp_path / "cut"
    stop_and_resume(args, cut, nproc, 192 // (8 * nproc), sig, every_process=every_process)
    assert_same_weights(ref / "checkpoint-1.pth", cut / "checkpoint-1.pth")
    assert_same_weights(ref / "checkpoint-1.pth", cut / "checkpoint-1.pth", "model_ema")
    assert [e["epoch"] for e in read_log(cut)] == [0, 1]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tb = EventAccumulator(str(cut / "tensorboard"))
    tb.Reload()
    steps = [e.step for e in tb.Scalars("train/loss")]
    assert steps == sorted(set(steps)) and len(steps) == 2 * 192 // (8 * nproc)  # no step twice, none lost


def test_resume_mid_epoch_with_another_batch_split(tmp_path):
    """Stopped at batch 8 x 1, resumed as batch 4 x update_freq 2 (the same global batch, as on
    a machine with half the memory): it continues after the samples already used, neither
    replaying nor skipping any, and ends where a run that never stopped ends (float tolerance)."""
    common = TINY + ["--synthetic_train_samples", "96", "--epochs", "1", "--disable_eval", "True",
                     "--opt", "sgd", "--blr", "0.5"]
    ref = tmp_path / "ref"
    run("main_finetune.py", common + ["--batch_size", "8", "--output_dir", str(ref)])
    cut = tmp_path / "cut"
    out = stop_midway(common + ["--batch_size", "8", "--output_dir", str(cut)], 1, signal.SIGTERM)
    step = torch.load(cut / "checkpoint-last.pth", map_location="cpu", weights_only=True)["step"]
    assert run_record(cut)["status"] == "preempted" and 5 <= step < 12, out[-2000:]
    r = run("main_finetune.py", common + ["--batch_size", "4", "--update_freq", "2", "--output_dir", str(cut)])
    assert f"continues at step {2 * step} (same {8 * step} samples consumed)" in r.stdout
    a, b = weights(ref / "checkpoint-0.pth"), weights(cut / "checkpoint-0.pth")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k


def test_signal_after_the_last_step_stops_at_the_epoch_end(tmp_path):
    """SIGTERM once the epoch's last step is logged (during the evaluation): the run saves the
    epoch, stops before the next one and is marked preempted; started again, it goes on with
    the next epoch."""
    args = ARGS + ["--synthetic_train_samples", "64", "--synthetic_val_samples", "1024",
                   "--output_dir", str(tmp_path / "run")]
    out = stop_midway(args, 1, signal.SIGTERM, at_step=8)
    rec = run_record(tmp_path / "run")
    assert (rec["status"], rec["reason"]) == ("preempted", "stopped after epoch 0"), out[-2000:]
    assert [e["epoch"] for e in read_log(tmp_path / "run")] == [0]
    r = run("main_finetune.py", args)
    assert "from epoch 1 step 0" in r.stdout and run_record(tmp_path / "run")["status"] == "completed"

"""Faults, and what each costs (docs/errors.md, "Faults"): SIGKILL at 20 moments, a full disk
during a save, a truncated checkpoint, non-finite losses, corrupt images, a rank that dies or
hangs in a 2-process run.

Launches run in processes forked from a server with the imports done (tests/forkrun.py), so a
run can be killed and restarted 20 times in well under a minute; the torchrun test uses the
real launcher.
"""
import os
import random
import re
import shutil
import signal
import subprocess
import time

import pytest
import torch
from PIL import Image

from tests import forkrun
from tests.helpers import ROOT, TINY, _free_port, children, command, read_log, run_record, script_env

pytestmark = pytest.mark.slow

FT = TINY + ["--batch_size", "8"]            # 64 synthetic images: 8 steps an epoch
PROGRESS = re.compile(r"train epoch (\d+) \[(\d+)/(\d+)\]")
RESUMED = re.compile(r"resumed from (\S+): epoch (\d+) step (\d+)")


def _ckpts(run_dir):
    return sorted(p for p in os.listdir(run_dir) if re.fullmatch(r"checkpoint-(\d+|last|best)\.pth", p))


def _position(path, steps_per_epoch=8):
    ck = torch.load(path, map_location="cpu", weights_only=True)  # raises if not whole
    return ck["epoch"] * steps_per_epoch + (steps_per_epoch if ck["epoch_done"] else ck["step"])


def _watch(p, fifo, kill_after=None):
    """Read the child's output as it comes; SIGKILL it after the `kill_after`-th progress line.
    Returns (lines, last progress position, resumed position or 0)."""
    lines, reached, resumed, seen = [], None, 0, 0
    with open(fifo) as f:
        for line in f:
            lines.append(line)
            m = RESUMED.search(line)
            if m:
                resumed = int(m.group(2)) * 8 + int(m.group(3))
            m = PROGRESS.search(line)
            if m:
                reached = int(m.group(1)) * 8 + int(m.group(2))
                seen += 1
                if seen == kill_after:
                    os.kill(p.pid, signal.SIGKILL)
                    break
    p.join(120)
    return lines, reached, resumed


def test_sigkill_at_20_moments_always_resumes_from_a_whole_checkpoint(tmp_path):
    """One run, killed with SIGKILL 20 times and started again each time: after a progress line
    (random k; the kill lands in the step's checkpoint write or the next step) or halfway
    through the n-th checkpoint write (the process kills itself there: tests/kill_in_write.py).
    Checkpoints are written at every step, so writes are always close. Each restart must resume
    from the newest whole checkpoint, never see a damaged one, and lose at most the steps since
    that checkpoint."""
    run_dir = tmp_path / "run"
    args = FT + ["--epochs", "50", "--disable_eval", "True", "--save_ckpt_minutes", "0.00001",
                 "--save_ckpt_num", "2", "--output_dir", run_dir]
    rng = random.Random(1)  # 8 of the 20 kills halfway through a checkpoint write
    report, prev_reached, newest = [], None, None
    for trial in range(21):
        fifo = tmp_path / f"out{trial}"
        os.mkfifo(fifo)
        last = trial == 20
        in_write = not last and rng.random() < 0.4
        k, n = rng.randint(1, 5), rng.randint(1, 4)
        if in_write:  # the same run, through the wrapper that kills it in its n-th checkpoint write
            p = forkrun.start("tests/kill_in_write.py", [n, "main_finetune.py", *args], fifo)
        else:
            p = forkrun.start("main_finetune.py", args, fifo)
        lines, reached, resumed = _watch(p, fifo, kill_after=None if in_write else (1 if last else k))
        text = "".join(lines)
        assert "warning: skipping" not in text and "Traceback" not in text, text[-3000:]
        if trial:
            assert resumed == newest, (trial, resumed, newest, text[-2000:])  # the newest whole one
            report[-1]["lost"] = prev_reached - resumed
        assert p.exitcode == -signal.SIGKILL, (p.exitcode, text[-3000:])
        if in_write:
            assert "test: killing this process halfway through writing" in text, text[-3000:]
        mid_write = bool(list(run_dir.glob(".checkpoint-*.tmp")))  # killed while a write was under way
        # every checkpoint left is whole; the next start must pick the newest of them
        newest = max((_position(run_dir / c) for c in _ckpts(run_dir) if c != "checkpoint-best.pth"), default=0)
        report.append({"trial": trial, "kill": f"in write {n}" if in_write else f"after line {k}",
                       "reached": reached, "newest_checkpoint": newest, "mid_write": mid_write})
        prev_reached = reached if reached is not None else resumed
    report.pop()
    assert len(report) == 20 and all(r["lost"] <= 1 for r in report), report
    in_write = [r for r in report if r["kill"].startswith("in write")]
    assert len(in_write) == 8 and all(r["mid_write"] for r in in_write), report
    assert len(list(run_dir.glob(".checkpoint-*.tmp"))) <= 1  # killed writes are cleaned up
    print("\nSIGKILL trials (positions in steps; lost = steps since the newest whole checkpoint):")
    for r in report:
        print(f"  {r['trial']:2d}  {r['kill']:<13} reached {r['reached']:3d}  resumed {r['newest_checkpoint']:3d}"
              f"  lost {r['lost']}  {'(mid-write)' if r['mid_write'] else ''}")
    # and the run finishes: the epoch in progress is its last one
    e = newest // 8 + 1
    _checkpoints_only(run_dir)  # shortened to end here: another --epochs than the folder's config
    r = forkrun.run("main_finetune.py", [a if a != "50" else str(e) for a in args], tmp_path)
    assert r.returncode == 0 and run_record(run_dir)["status"] == "completed", r.stderr[-2000:]


@pytest.fixture(scope="module")
def rolling_run(tmp_path_factory):
    """One epoch with checkpoint-last.pth written at each step: leaves checkpoint-0.pth and
    checkpoint-last.pth, both epoch 0 done (a completed run's checkpoint-last.pth is its final
    state)."""
    d = tmp_path_factory.mktemp("rolling")
    r = forkrun.run("main_finetune.py", FT + ["--epochs", "1", "--disable_eval", "True",
                                             "--save_ckpt_minutes", "0.00001", "--output_dir", d / "run"], d)
    assert r.returncode == 0, r.stderr[-2000:]
    return d / "run"


def _checkpoints_only(run_dir):
    """Leave the folder's checkpoints, drop its config.yaml and run.json: a launch with other
    settings (more epochs) may then continue from them (otherwise it is refused, and a completed
    run is only reported)."""
    for name in ("config.yaml", "run.json"):
        (run_dir / name).unlink(missing_ok=True)
    return run_dir


def _tmpfs(path, size):
    os.makedirs(path)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return p.returncode == 0


def test_full_disk_during_a_save_keeps_the_previous_checkpoint(rolling_run, tmp_path):
    """The disk fills up while checkpoint-last.pth is rewritten: the run ends with one line,
    exit 2, the previous checkpoints are byte for byte intact and no temporary is left. A real
    full tmpfs where mounting is allowed; otherwise RLIMIT_FSIZE (the write fails with EFBIG
    instead of ENOSPC, through the same code)."""
    size = os.path.getsize(rolling_run / "checkpoint-0.pth")
    used = sum(os.path.getsize(p) for p in rolling_run.rglob("*") if p.is_file())
    disk = tmp_path / "disk"
    mounted = _tmpfs(disk, used + size // 2)
    try:
        run_dir = disk / "run" if mounted else tmp_path / "run"
        _checkpoints_only(shutil.copytree(rolling_run, run_dir))
        before = {c: (run_dir / c).read_bytes() for c in _ckpts(run_dir)}
        r = forkrun.run("main_finetune.py", FT + ["--epochs", "2", "--disable_eval", "True", "--save_ckpt_minutes",
                                                 "0.00001", "--output_dir", run_dir], tmp_path,
                        fsize_limit=None if mounted else size // 2)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
        why = "No space left on device" if mounted else "File too large"
        assert lines[0] == (f"error: could not write checkpoint {run_dir}/checkpoint-last.pth ({why}); free disk "
                            "space or choose another --output_dir; the previous checkpoint is intact"), lines[0]
        assert {c: (run_dir / c).read_bytes() for c in _ckpts(run_dir)} == before
        assert not list(run_dir.glob(".*.tmp"))
        assert run_record(run_dir)["status"] == "failed"
        assert _position(run_dir / "checkpoint-0.pth") == 8
        print(f"\nfull disk simulated with {'a full tmpfs' if mounted else 'RLIMIT_FSIZE'}")
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=False)


def test_truncated_checkpoint_is_skipped_by_auto_resume(rolling_run, tmp_path):
    run_dir = _checkpoints_only(shutil.copytree(rolling_run, tmp_path / "run"))
    newest = run_dir / "checkpoint-0.pth"
    newest.write_bytes(newest.read_bytes()[: os.path.getsize(newest) // 2])
    r = forkrun.run("main_finetune.py", FT + ["--epochs", "2", "--disable_eval", "True", "--output_dir", run_dir],
                    tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"warning: skipping {newest}: checkpoint {newest} is damaged" in r.stderr, r.stderr
    assert f"resumed from {run_dir}/checkpoint-last.pth: epoch 1 step 0" in r.stdout, r.stdout
    assert _position(run_dir / "checkpoint-1.pth") == 16 and run_record(run_dir)["status"] == "completed"


# ---------------------------------------------------------------- non-finite losses

def poison_samples():
    """forkrun setup: the synthetic images SUITE_TEST_NAN_INDICES come out as NaN (bad data)."""
    from util.data import SyntheticShapes
    bad = {int(i) for i in os.environ["SUITE_TEST_NAN_INDICES"].split(",")}
    original = SyntheticShapes.__getitem__

    def getitem(self, index):
        img, label = original(self, index)
        return (torch.full_like(img, float("nan")) if self.split == "train" and index in bad else img), label
    SyntheticShapes.__getitem__ = getitem


def _steps_holding(indices, epoch, world=1, batch=8, n=64):
    """[(rank, step)] of the epoch's batches that hold `indices` (the sampler's own order)."""
    from util.data import TrainSampler
    out = set()
    for rank in range(world):
        s = TrainSampler(n, world, rank, seed=0)
        s.set_epoch(epoch)
        for pos, i in enumerate(s.order()):
            if i in indices:
                out.add((rank, pos // batch))
    return sorted(out)


def test_skip_nonfinite_skips_and_records_the_steps(tmp_path):
    bad = {3, 40}
    steps = sorted({s for _, s in _steps_holding(bad, 0)})
    env = {"SUITE_TEST_NAN_INDICES": ",".join(map(str, bad))}
    setup = "tests.test_faults:poison_samples"
    common = FT + ["--epochs", "1", "--disable_eval", "True"]
    r = forkrun.run("main_finetune.py", common + ["--output_dir", tmp_path / "stop"], tmp_path, env=env, setup=setup)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: loss is not finite at epoch 0 step {steps[0]}; lower --lr/--blr, set --clip_grad or "
        "--skip_nonfinite N, or check the data; the last good checkpoint is untouched"], r.stderr
    r = forkrun.run("main_finetune.py", common + ["--skip_nonfinite", str(len(steps)), "--output_dir", tmp_path / "skip"],
                    tmp_path, env=env, setup=setup)
    assert r.returncode == 0, r.stderr[-3000:]
    for s in steps:
        assert f"warning: non-finite loss at epoch 0 step {s}; step skipped" in r.stdout + r.stderr
    want = [[0, s] for s in steps]
    assert run_record(tmp_path / "skip")["skipped_steps"] == want
    ck = torch.load(tmp_path / "skip" / "checkpoint-0.pth", weights_only=True)
    assert ck["extra"]["skipped_steps"] == want
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    if len(steps) > 1:
        r = forkrun.run("main_finetune.py", common + ["--skip_nonfinite", "1", "--output_dir", tmp_path / "few"],
                        tmp_path, env=env, setup=setup)
        assert r.returncode == 2 and "more than --skip_nonfinite 1 non-finite losses" in r.stderr.splitlines()[-1]
        assert run_record(tmp_path / "few")["skipped_steps"] == want[:2]


def _pair(tmp_path, args, name, env=None, setup=None):
    """Two ranks of one run (gloo, no launcher): forked processes with torchrun's variables."""
    port = str(_free_port())
    procs, fifos = [], []
    for rank in range(2):
        out = tmp_path / f"{name}{rank}.out"
        e = dict(env or {}, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=port)
        procs.append(forkrun.start("main_finetune.py", args, out, env=e, setup=setup))
        fifos.append(out)
    return procs, fifos


def _wait_for(path, pattern, timeout=120):
    """Poll `path` until it holds `pattern` (the output file of a child)."""
    end = time.time() + timeout
    while time.time() < end:
        if path.exists() and re.search(pattern, path.read_text()):
            return
        time.sleep(0.05)
    raise AssertionError(f"{pattern!r} not in {path} after {timeout} s:\n{path.read_text()[-3000:]}")


def test_skip_nonfinite_two_ranks_skip_together(tmp_path):
    """A NaN sample on one rank only: both ranks skip that step (before the fix, one rank
    skipped its backward and the other waited in DDP's all-reduce)."""
    bad = {5}
    where = _steps_holding(bad, 0, world=2, batch=4)
    procs, outs = _pair(tmp_path, FT + ["--batch_size", "4", "--epochs", "1", "--disable_eval", "True",
                                        "--skip_nonfinite", "1", "--dist_timeout", "60",
                                        "--output_dir", tmp_path / "run"], "skip",
                        env={"SUITE_TEST_NAN_INDICES": "5"}, setup="tests.test_faults:poison_samples")
    for p in procs:
        p.join(180)
    assert [p.exitcode for p in procs] == [0, 0], [o.read_text()[-2000:] for o in outs]
    assert run_record(tmp_path / "run")["skipped_steps"] == [[0, where[0][1]]]


# ---------------------------------------------------------------- corrupt images

@pytest.fixture(scope="module")
def corrupt_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("corrupt")
    for split, n in (("train", 12), ("val", 3)):
        for c in ("a", "b"):
            os.makedirs(d / split / c)
            for i in range(n):
                Image.new("RGB", (40, 40), (i * 20, 100, 50 if c == "a" else 200)).save(d / split / c / f"{i}.jpg")
    bad = [d / "train" / "a" / "1.jpg", d / "train" / "b" / "4.jpg", d / "train" / "b" / "7.jpg"]
    for p in bad + [d / "val" / "b" / "2.jpg"]:  # and one validation image: bad_val_images
        p.write_bytes(os.urandom(300))
    return d, sorted(map(str, bad))


def _image_args(d, out, workers):
    return TINY + ["--data_set", "image_folder", "--data_path", d, "--batch_size", "4", "--num_workers",
                   str(workers), "--output_dir", out]


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_images_are_replaced_reported_and_counted(corrupt_data, tmp_path, workers):
    d, bad = corrupt_data
    out = tmp_path / "run"
    epochs = 2 if workers == 0 else 1
    r = forkrun.run("main_finetune.py", _image_args(d, out, workers) + ["--epochs", str(epochs)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    val_bad = str(d / "val" / "b" / "2.jpg")
    for p in bad + [val_bad]:  # one warning per image for the run, whatever the epochs and workers
        assert r.stderr.count(f"warning: unreadable image {p} (") == 1, r.stderr[-3000:]
    # distinct files, not sightings; a replaced validation image counts too, and apart
    assert [(e["bad_images"], e["bad_val_images"]) for e in read_log(out)] == [(4, 1)] * epochs
    assert (run_record(out)["bad_images"], run_record(out)["bad_val_images"]) == (4, 1)
    logged = [line.split("\t") for line in (out / "bad_images.txt").read_text().splitlines()]
    assert sorted((split, path) for split, path, _ in logged) == [("train", p) for p in bad] + [("val", val_bad)]
    assert r.stdout.strip().splitlines()[-1] == (f"run directory: {out}; 4 unreadable images replaced "
                                                 f"(1 in validation), listed in {out}/bad_images.txt")


def test_pretraining_counts_corrupt_images_too(corrupt_data, tmp_path):
    d, bad = corrupt_data
    out = tmp_path / "run"
    r = forkrun.run("main_pretrain.py", ["--model", "convnextv2_atto", "--data_set", "image_folder", "--data_path", d,
                                         "--input_size", "64", "--batch_size", "4", "--num_workers", "0",
                                         "--device", "cpu", "--epochs", "1", "--decoder_embed_dim", "64",
                                         "--vis_freq", "0", "--output_dir", out], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert read_log(out)[0]["bad_images"] == 3 and run_record(out)["bad_images"] == 3


@pytest.mark.parametrize("workers", [0, 1])
def test_too_many_corrupt_images_stop_with_the_list(corrupt_data, tmp_path, workers):
    d, bad = corrupt_data
    out = tmp_path / "run"
    r = forkrun.run("main_finetune.py", _image_args(d, out, workers) + ["--epochs", "2", "--max_bad_images", "1",
                                                                          "--print_freq", "100"], tmp_path)
    lines = r.stderr.strip().splitlines()
    errors = [line for line in lines if not line.startswith("warning: unreadable image")]
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(errors) == 1, r.stderr[-3000:]
    assert errors[0] == (f"error: 3 unreadable images (more than --max_bad_images 1): {', '.join(bad)}; "
                         f"full list in {out}/bad_images.txt; fix or remove them"), errors[0]
    assert run_record(out)["status"] == "failed" and not (out / "checkpoint-0.pth").exists()


def test_relaunch_after_fixing_bad_images_resumes(corrupt_data, tmp_path):
    """The error's advice works: fix the images, run the same command, and the run goes on. Only
    images still unreadable count (the list is re-checked at launch); validation images count."""
    src, bad = corrupt_data
    d = tmp_path / "data"
    shutil.copytree(src, d)
    out = tmp_path / "run"
    cmd = _image_args(d, out, 0) + ["--epochs", "2", "--max_bad_images", "1", "--print_freq", "100"]

    def launch():
        r = forkrun.run("main_finetune.py", cmd, tmp_path)
        errors = [line for line in r.stderr.strip().splitlines() if not line.startswith("warning: unreadable image")]
        return r, errors

    def fix(*paths):
        for p in paths:
            Image.new("RGB", (40, 40), (90, 100, 50)).save(p)

    r, errors = launch()  # 3 bad training images: stops in epoch 0, before any checkpoint
    assert r.returncode == 2 and len(errors) == 1 and errors[0].startswith("error: 3 unreadable images"), r.stderr[-3000:]
    fix(d / "train" / "a" / "1.jpg", d / "train" / "b" / "4.jpg")  # one still bad: within the limit
    r, errors = launch()  # ... but with the bad validation image, 2: stops after epoch 0's checkpoint
    assert r.returncode == 2 and len(errors) == 1, r.stderr[-3000:]
    assert errors[0] == (f"error: 2 unreadable images (more than --max_bad_images 1): {d}/train/b/7.jpg, "
                         f"{d}/val/b/2.jpg (validation); full list in {out}/bad_images.txt; fix or remove them")
    assert (out / "checkpoint-0.pth").exists() and run_record(out)["status"] == "failed"
    previous = {tuple(line.split("\t")[:2]) for line in (out / "bad_images.previous.txt").read_text().splitlines()}
    assert sorted(previous) == [("train", p.replace(str(src), str(d))) for p in bad]  # the first launch's list
    fix(d / "val" / "b" / "2.jpg")
    r, errors = launch()
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {out}/checkpoint-0.pth: epoch 1 step 0" in r.stdout, r.stdout[-2000:]
    assert run_record(out)["status"] == "completed"
    log = read_log(out)  # the stopped epoch 0 kept its log line
    assert [e["epoch"] for e in log] == [0, 1] and "train_loss" in log[0]
    assert (log[1]["bad_images"], log[1]["bad_val_images"]) == (1, 0)
    assert [line.split("\t")[:2] for line in (out / "bad_images.txt").read_text().splitlines()
            ] == [["train", f"{d}/train/b/7.jpg"]]  # re-checked at launch; met again in epoch 1, listed once
    assert f"warning: unreadable image {d}/train/b/7.jpg" not in r.stderr  # warned about in this run already


# ---------------------------------------------------------------- a rank dies or hangs

def _rank_of(pid):
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
    return int(env[b"RANK"]) if b"RANK" in env else None


DIST = FT + ["--batch_size", "4", "--epochs", "50", "--disable_eval", "True", "--dist_timeout", "5"]


def test_torchrun_run_ends_when_a_rank_is_killed(tmp_path):
    """SIGKILL rank 1 of a torchrun run without --max-restarts: the whole run ends within a bound
    (rank 0's next collective fails, torchrun tears the group down) and run.json says interrupted:
    the group broke under the run, which the same command resumes (test_torchrun_restarts.py
    restarts it with --max-restarts)."""
    out = tmp_path / "run"
    p = subprocess.Popen(command("main_finetune.py", [str(a) for a in DIST + ["--output_dir", out]], nproc=2),
                         env=script_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if "train epoch 0 [2/" in line:
            break
    workers = {_rank_of(c): c for c in children(p.pid)}
    os.kill(workers[1], signal.SIGKILL)
    t0 = time.time()
    lines += p.stdout.readlines()
    p.wait(120)
    took = time.time() - t0
    assert p.returncode != 0 and took < 60, (took, "".join(lines)[-3000:])
    rec = run_record(out)
    assert rec["status"] == "interrupted" and "run the same command to resume" in rec["reason"], rec
    print(f"\ntorchrun with rank 1 killed ended in {took:.1f} s; run.json: interrupted ({rec['reason'][:100]})")


@pytest.mark.parametrize("fault", ["hang_rank1", "kill_rank0"])
def test_other_rank_exits_within_dist_timeout(tmp_path, fault):
    """No launcher to tear the group down: rank 1 stops answering (SIGSTOP) and rank 0 gives up
    after --dist_timeout (5 s) with run.json interrupted; or rank 0 (the one that writes run.json)
    is killed and rank 1 exits at its next collective, leaving run.json 'running' (the next
    start resumes the run as usual)."""
    procs, outs = _pair(tmp_path, DIST + ["--output_dir", tmp_path / "run"], fault)
    _wait_for(outs[0], r"train epoch 0 \[2/")
    victim, survivor = (procs[1], procs[0]) if fault == "hang_rank1" else (procs[0], procs[1])
    os.kill(victim.pid, signal.SIGSTOP if fault == "hang_rank1" else signal.SIGKILL)
    t0 = time.time()
    survivor.join(120)
    took = time.time() - t0
    try:
        assert survivor.exitcode not in (None, 0), outs[1].read_text()[-2000:]
        assert took < 5 + 30, took
        status = run_record(tmp_path / "run")["status"]
        assert status == ("interrupted" if fault == "hang_rank1" else "running"), status
        print(f"\n{fault}: the other rank exited after {took:.1f} s (exit {survivor.exitcode}); run.json {status}")
    finally:
        victim.kill()
        victim.join(30)

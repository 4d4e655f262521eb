"""submitit_finetune.py on a real Slurm cluster (tests/slurm_cluster.py starts it): multi-node
and multi-task jobs, preemption by a higher-priority partition and `scontrol requeue` that
resume at the saved step with the weights of a run never stopped, --dry_run, refusals.
CPU, gloo, the built-in dataset, tiny settings."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from util import slurm as sl

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(ROOT, "submitit_finetune.py")
# tiny CPU jobs: one CPU per task, no GPU request, 1 GB
# every job of this session carries TAG as its comment: the tests find (and clean up) their own
TAG = f"convnextv2-pytest-{os.getpid()}"
SLURM = ["--gpus_per_node", "0", "--cpus_per_task", "1", "--mem_gb", "1", "--timeout", "10", "--comment", TAG]
TINY = ["--model", "convnextv2_atto", "--data_set", "synthetic", "--input_size", "32",
        "--synthetic_val_samples", "32", "--batch_size", "16", "--num_workers", "0", "--aa", "none",
        "--reprob", "0", "--warmup_epochs", "0", "--print_freq", "1", "--device", "cpu"]
SHORT = TINY + ["--synthetic_train_samples", "128", "--epochs", "1"]
PRETRAIN = ["--model", "convnextv2_atto", "--data_set", "synthetic", "--input_size", "64",
            "--synthetic_train_samples", "64", "--batch_size", "16", "--num_workers", "0", "--epochs", "1",
            "--warmup_epochs", "0", "--device", "cpu"]
# long enough to be stopped twice mid-epoch: 3 epochs of 40 steps
EPOCHS, STEPS = 3, 40
LONG = TINY + ["--synthetic_train_samples", str(STEPS * 16), "--epochs", str(EPOCHS)]


def env():
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")  # sbatch passes it to the job
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def record(run_dir):
    with open(os.path.join(run_dir, "run.json")) as f:
        return json.load(f)


def job_id(run_dir):
    with open(os.path.join(run_dir, "slurm", "job.json")) as f:
        return json.load(f)["job_id"]


def job_log(run_dir, task=0, ext="out"):
    """What task `task` of the run's job printed (all attempts: submitit appends)."""
    jid = job_id(run_dir)
    path = os.path.join(run_dir, "slurm", jid, f"{jid}_{task}_log.{ext}")
    return open(path).read() if os.path.exists(path) else ""


def wait_for_log(run_dir, text, until=None, timeout=120):
    """Block until rank 0 of the run's job has printed `text` (and `until(log)` holds); return
    the log."""
    end = time.time() + timeout
    while time.time() < end:
        if os.path.exists(os.path.join(run_dir, "slurm", "job.json")):
            log = job_log(run_dir)
            if text in log and (until is None or until(log)):
                return log
        time.sleep(0.1)
    raise AssertionError(f"the job never printed {text!r}:\n{job_log(run_dir)[-3000:]}")


def position(log):
    """The furthest step a log shows, counted from the start of the run (epoch * STEPS + step)."""
    found = re.findall(r"^train epoch (\d+) \[(\d+)/", log, re.M)
    return max((int(e) * STEPS + int(s) for e, s in found), default=0)


def at(restart):
    return restart["start_epoch"] * STEPS + restart["start_step"]


def resumed_at(log):
    """Where the last 'resumed from ...: epoch E step S' line of a log says training went on."""
    e, s = re.findall(r"^resumed from .*: epoch (\d+) step (\d+)$", log, re.M)[-1]
    return int(e) * STEPS + int(s)


def since_resume(log):
    """The furthest step the log shows after its last resume."""
    return position(log.rsplit("resumed from", 1)[-1])


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    diff = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:3]}"


def our_jobs():
    """Ids of this session's jobs still queued or running."""
    out = subprocess.run(["squeue", "-h", "-o", "%A|%k"], capture_output=True, text=True).stdout
    return [line.split("|")[0] for line in out.splitlines() if line.endswith("|" + TAG)]


@pytest.fixture(autouse=True)
def _no_jobs_left(slurm_cluster):
    """No job of a test outlives it (whatever else runs on the cluster)."""
    yield
    ids = our_jobs()
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True)


class Reference:
    """LONG, never stopped, run on this machine without Slurm (--cluster local), beside the
    Slurm job it is compared with (one thread each)."""

    def __init__(self, out):
        self.out = out
        self.proc = subprocess.Popen(
            [sys.executable, LAUNCHER, "--cluster", "local", "--nodes", "1", "--ngpus", "1",
             "--gpus_per_node", "0", "--timeout", "10", *LONG, "--output_dir", str(out), "--wait"],
            env=env(), cwd=str(out.parent), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True)  # its own process group: the local job's processes are in it

    def weights_file(self):
        if self.proc.returncode is None:
            out, err = self.proc.communicate(timeout=300)
            assert self.proc.returncode == 0, out[-2000:] + err[-3000:]
        return self.out / f"checkpoint-{EPOCHS - 1}.pth"

    def stop(self):
        """Ends the launcher and the job processes it started (a test that failed midway)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def run_inprocess(argv, capsys, script="submitit_finetune"):
    """The launcher in this process (no 5 s of imports per launch); (exit code, stdout, stderr)."""
    import importlib
    try:
        code = importlib.import_module(script).main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def one_thread(monkeypatch):
    """sbatch passes the submitting environment to the job."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)


# ---------------------------------------------------------------- before anything is queued

def test_dry_run_shows_nodes_tasks_and_time(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, out, err = run_inprocess(["--nodes", "2", "--ngpus", "1", *SLURM, "--timeout", "7", *SHORT,
                                    "--output_dir", str(run_dir), "--dry_run"], capsys)
    assert code == 0, err
    assert f"run directory: {run_dir}" in out
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --time=7",
                 "#SBATCH --cpus-per-task=1", "#SBATCH --signal=USR2@120", "srun "):
        assert line in out, out
    assert "gpus" not in out  # --gpus_per_node 0: no GPU request on a CPU cluster
    assert not run_dir.exists()  # nothing created, nothing submitted
    assert our_jobs() == []


def test_dry_run_on_cpu_nodes_asks_no_gpus_and_leaves_nothing(tmp_path, capsys):
    """Without --gpus_per_node, a partition without GPUs gets no GPU request; a dry run into the
    default run tree creates no folder."""
    flags = [f for f in SLURM if f not in ("--gpus_per_node", "0")]
    code, out, err = run_inprocess(["--nodes", "1", "--ngpus", "2", *flags, *SHORT,
                                    "--runs_root", str(tmp_path / "runs"), "--dry_run"], capsys)
    assert code == 0, err
    assert "has no GPUs: requesting none; --ngpus 2 is the number of processes per node" in out
    assert "#SBATCH --ntasks-per-node=2" in out and "gpus" not in out.split("#SBATCH", 1)[1]
    assert not (tmp_path / "runs").exists() and our_jobs() == []


@pytest.mark.parametrize("extra,message", [
    (["--partition", "nosuch", "--nodes", "1"], "unknown partition 'nosuch'"),
    (["--nodes", "3"], "--nodes 3: partition debug allows at most 2 node(s)"),
    (["--nodes", "1", "--partition", "urgent", "--timeout", "90"], "above partition urgent's MaxTime"),
    (["--nodes", "1", "--ngpus", "3"], "CPUs per node"),
    (["--nodes", "1", "--gpus_per_node", "1"], "has no GPUs: pass --gpus_per_node 0"),
    (["--nodes", "1", "--mem_gb", "100"], "--mem_gb 100 per node, but the nodes of partition debug have"),
    (["--nodes", "1", "--data_set", "IMNET", "--data_path", "/no/such/imagenet"], "/no/such/imagenet"),
    (["--nodes", "1", "--slurm_extra", "no-such-option=1"], "sbatch refused the job: sbatch: unrecognized option"),
])
def test_bad_input_refused_before_queueing(tmp_path, capsys, extra, message):
    code, out, err = run_inprocess([*SLURM, *SHORT, "--ngpus", "1", *extra, "--output_dir",
                                    str(tmp_path / "run")], capsys)
    assert code not in (0, None)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert our_jobs() == [] and not (tmp_path / "run" / "slurm").exists()  # nothing submitted


# ---------------------------------------------------------------- jobs

def test_two_nodes_and_two_tasks_per_node_complete(tmp_path, capsys, one_thread):
    """Fine-tuning with --nodes 2 --ngpus 1 and with --nodes 1 --ngpus 2 side by side (they fill
    the 4 CPUs), then pretraining with --nodes 2 --ngpus 1 (queued until they are done)."""
    jobs = {"finetune 2x1": ("submitit_finetune", ["--nodes", "2", "--ngpus", "1", *SHORT]),
            "pretrain 2x1": ("submitit_pretrain", ["--nodes", "2", "--ngpus", "1", *PRETRAIN]),
            "finetune 1x2": ("submitit_finetune", ["--nodes", "1", "--ngpus", "2", *SHORT])}
    dirs = {name: tmp_path / name.replace(" ", "-") for name in jobs}
    argv = {name: [*SLURM, *flags, "--output_dir", str(dirs[name])] for name, (_, flags) in jobs.items()}
    for name in ("finetune 2x1", "pretrain 2x1"):
        code, out, err = run_inprocess(argv[name], capsys, jobs[name][0])
        assert code == 0 and "submitted job" in out, err
    code, out, err = run_inprocess([*argv["finetune 1x2"], "--wait"], capsys, jobs["finetune 1x2"][0])
    assert code == 0 and "completed" in out.splitlines()[-1], out + err
    end = time.time() + 180
    while any(sl.slurm_state(job_id(d)) not in sl.FINAL_STATES for d in dirs.values()) and time.time() < end:
        time.sleep(0.5)
    for name, run_dir in dirs.items():
        rec = record(run_dir)
        assert rec["status"] == "completed" and rec["world_size"] == 2, (name, rec.get("reason"))
        assert rec["kind"] == name.split()[0] and rec["slurm"]["job_id"] == job_id(run_dir)
        assert sl.slurm_state(job_id(run_dir)) == "COMPLETED"
        assert os.path.exists(run_dir / "checkpoint-0.pth")
    # the same submission again: reported, not redone
    code, out, err = run_inprocess(argv["finetune 2x1"], capsys)
    assert code == 0 and "already completed" in out, out + err


def test_failing_job_shows_its_error(tmp_path, capsys, one_thread):
    """A mistake only the compute node can see (it has no MPS device): the job fails, --wait
    prints why, run.json says why."""
    run_dir = tmp_path / "run"
    code, out, err = run_inprocess(["--nodes", "1", "--ngpus", "1", *SLURM, *SHORT, "--device", "mps",
                                    "--output_dir", str(run_dir), "--wait"], capsys)
    assert code == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: job ") and "FAILED" in last and "--device mps" in last, err
    rec = record(run_dir)
    assert rec["status"] == "failed" and "--device mps" in rec["reason"]


def test_preempted_and_requeued_run_resumes_exactly(tmp_path, capsys):
    """A job of the higher-priority partition `urgent` that needs every CPU preempts the run
    mid-epoch (USR2: save at the step boundary, submitit requeues); later `scontrol requeue`
    (SIGTERM only: save, Slurm requeues) stops the resumed run. Each time it resumes at the
    saved step, losing at most the step in flight, and it ends with the weights of a run that
    never stopped."""
    reference = Reference(tmp_path / "reference")
    run_dir = tmp_path / "run"
    args = ["--nodes", "1", "--ngpus", "1", *SLURM, *LONG, "--output_dir", str(run_dir)]
    waiter = subprocess.Popen([sys.executable, LAUNCHER, *args, "--wait"], env=env(), cwd=str(tmp_path),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_log(run_dir, "train epoch 0 [3/")
        urgent = subprocess.run(["sbatch", "--parsable", "-p", "urgent", "-N", "2", "--ntasks-per-node", "2",
                                 "--comment", TAG, "-o", str(tmp_path / "urgent.out"), "--wrap", "echo urgent ran"],
                                capture_output=True, text=True, check=True).stdout.strip()
        # a second submission of the run, queued or running (or being requeued), is refused
        code, out, err = run_inprocess(args, capsys)
        assert code == 2 and f"as job {job_id(run_dir)}" in err, err
        resumed = resumed_at(wait_for_log(run_dir, "resumed from", timeout=180))
        # let the resumed run take 5 more steps, then requeue it from outside
        log = wait_for_log(run_dir, "", until=lambda log: since_resume(log) >= resumed + 5, timeout=120)
        before_term = since_resume(log)
        subprocess.run(["scontrol", "requeue", job_id(run_dir)], check=True, capture_output=True)
        out, err = waiter.communicate(timeout=240)
        ref_weights = reference.weights_file()
    finally:
        reference.stop()
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()
    assert waiter.returncode == 0, out[-2000:] + err[-3000:]
    assert out.count(": RUNNING") >= 3, out  # --wait followed the job through both requeues
    assert sl.slurm_state(urgent) == "COMPLETED"
    rec = record(run_dir)
    assert rec["status"] == "completed" and len(rec["restarts"]) == 3, rec["restarts"]
    fresh, after_usr2, after_term = rec["restarts"]
    assert not fresh["resumed"] and after_usr2["resumed"] and after_term["resumed"]
    assert {r["slurm"]["job_id"] for r in rec["restarts"]} == {job_id(run_dir)}
    assert [r["slurm"].get("restart_count", 0) for r in rec["restarts"]] == [0, 1, 2]
    log = job_log(run_dir)
    attempt1, rest = log.split("received SIGUSR2", 1)
    attempt2, attempt3 = rest.split("received SIGTERM", 1)
    assert "Requeued job" in log + job_log(run_dir, ext="err")  # submitit's requeue after USR2
    # preempted mid-epoch, resumed after every step the first attempt logged
    assert 0 < after_usr2["start_step"] <= STEPS and after_usr2["start_epoch"] < EPOCHS - 1, after_usr2
    assert 3 <= position(attempt1) <= at(after_usr2) == resumed
    assert f"resumed from {run_dir}/checkpoint-last.pth: epoch {after_usr2['start_epoch']} " \
           f"step {after_usr2['start_step']}" in attempt2
    # scontrol requeue: every step finished before the signal is kept
    assert before_term <= position(attempt2) <= at(after_term) and 0 < after_term["start_step"] <= STEPS
    assert resumed_at(attempt3) == at(after_term)
    assert_same_weights(ref_weights, run_dir / f"checkpoint-{EPOCHS - 1}.pth")

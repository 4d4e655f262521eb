"""submitit_finetune.py on a real Slurm cluster (tests/slurm_cluster.py starts it): multi-node
and multi-task jobs, preemption by a higher-priority partition and `scontrol requeue` that
resume at the saved step with the weights of a run never stopped, --dry_run, refusals.
CPU, gloo, the built-in dataset, tiny settings."""
import json
import os
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
SLURM = ["--gpus_per_node", "0", "--cpus_per_task", "1", "--mem_gb", "1", "--timeout", "10"]
TINY = ["--model", "convnextv2_atto", "--data_set", "synthetic", "--input_size", "32",
        "--synthetic_val_samples", "32", "--batch_size", "16", "--num_workers", "0", "--aa", "none",
        "--reprob", "0", "--warmup_epochs", "0", "--print_freq", "1", "--device", "cpu"]
SHORT = TINY + ["--synthetic_train_samples", "128", "--epochs", "1"]
# long enough to be stopped mid-epoch: 2 epochs of 40 steps
LONG = TINY + ["--synthetic_train_samples", "640", "--epochs", "2"]


def env():
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")  # sbatch passes it to the job
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def launch(args, cwd, timeout=300):
    return subprocess.run([sys.executable, LAUNCHER, *args], env=env(), cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


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


def wait_for_step(run_dir, step, timeout=120):
    """Block until the job's rank 0 has logged `step` of epoch 0; return the log."""
    end = time.time() + timeout
    while time.time() < end:
        if os.path.exists(os.path.join(run_dir, "slurm", "job.json")):
            log = job_log(run_dir)
            if f"train epoch 0 [{step}/" in log:
                return log
        time.sleep(0.1)
    raise AssertionError(f"the job never reached step {step}:\n{job_log(run_dir)[-3000:]}")


def last_step(log, epoch=0):
    steps = [int(line.split("[")[1].split("/")[0]) for line in log.splitlines()
             if line.startswith(f"train epoch {epoch} [")]
    return max(steps) if steps else 0


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    diff = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:3]}"


@pytest.fixture(autouse=True)
def _no_jobs_left(slurm_cluster):
    """Each test starts and ends with an empty queue on the private cluster."""
    yield
    ids = subprocess.run(["squeue", "-h", "-o", "%A"], capture_output=True, text=True).stdout.split()
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True)


class Reference:
    """LONG, never stopped, run on this machine without Slurm (--cluster local). Started when a
    test first asks for it and run beside that test's Slurm job (one thread each)."""

    def __init__(self, out):
        self.out = out
        self.proc = subprocess.Popen(
            [sys.executable, LAUNCHER, "--cluster", "local", "--nodes", "1", "--ngpus", "1",
             "--gpus_per_node", "0", "--timeout", "10", *LONG, "--output_dir", str(out), "--wait"],
            env=env(), cwd=str(out.parent), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def weights_file(self):
        if self.proc.returncode is None:
            out, err = self.proc.communicate(timeout=300)
            assert self.proc.returncode == 0, out[-2000:] + err[-3000:]
        return self.out / "checkpoint-1.pth"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    ref = Reference(tmp_path_factory.mktemp("reference") / "run")
    yield ref
    if ref.proc.poll() is None:
        ref.proc.kill()
        ref.proc.wait()


# ---------------------------------------------------------------- before anything is queued

def run_inprocess(argv, capsys):
    import submitit_finetune
    try:
        code = submitit_finetune.main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


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
    assert subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip() == ""


@pytest.mark.parametrize("extra,message", [
    (["--partition", "nosuch", "--nodes", "1"], "unknown partition 'nosuch'"),
    (["--nodes", "3"], "--nodes 3: partition debug allows at most 2 node(s)"),
    (["--nodes", "1", "--partition", "urgent", "--timeout", "90"], "above partition urgent's MaxTime"),
    (["--nodes", "1", "--ngpus", "3"], "CPUs per node"),
    (["--nodes", "1", "--data_set", "IMNET", "--data_path", "/no/such/imagenet"], "/no/such/imagenet"),
])
def test_bad_input_refused_before_queueing(tmp_path, capsys, extra, message):
    code, out, err = run_inprocess([*SLURM, *SHORT, "--ngpus", "1", *extra, "--output_dir",
                                    str(tmp_path / "run")], capsys)
    assert code not in (0, None)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip() == ""


# ---------------------------------------------------------------- jobs

@pytest.mark.parametrize("nodes,ngpus", [(2, 1), (1, 2)])
def test_two_processes_complete(tmp_path, capsys, nodes, ngpus):
    run_dir = tmp_path / "run"
    args = ["--nodes", str(nodes), "--ngpus", str(ngpus), *SLURM, *SHORT, "--output_dir", str(run_dir)]
    p = launch([*args, "--wait"], cwd=str(tmp_path))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "completed" in p.stdout.splitlines()[-1]
    rec = record(run_dir)
    assert rec["status"] == "completed" and rec["world_size"] == 2
    assert rec["slurm"]["job_id"] == job_id(run_dir)
    assert os.path.exists(run_dir / "checkpoint-0.pth")
    # the same submission again: reported, not redone
    code, out, err = run_inprocess(args, capsys)
    assert code == 0 and "already completed" in out, out + err


def test_failing_job_shows_its_error(tmp_path):
    run_dir = tmp_path / "run"
    p = launch(["--nodes", "1", "--ngpus", "1", *SLURM, *SHORT, "--model", "no_such_model",
                "--output_dir", str(run_dir), "--wait"], cwd=str(tmp_path))
    assert p.returncode != 0
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: job ") and "FAILED" in last and "no_such_model" in last, p.stderr
    rec = record(run_dir)
    assert rec["status"] == "failed" and "no_such_model" in rec["reason"]


def test_preempted_by_urgent_job_resumes_exactly(tmp_path, capsys, reference):
    """A job of the higher-priority partition `urgent` that needs every CPU preempts the run
    mid-epoch: USR2, save at the step boundary, requeue, resume at that step, same weights."""
    run_dir = tmp_path / "run"
    args = ["--nodes", "1", "--ngpus", "1", *SLURM, *LONG, "--output_dir", str(run_dir)]
    waiter = subprocess.Popen([sys.executable, LAUNCHER, *args, "--wait"], env=env(), cwd=str(tmp_path),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_step(run_dir, 5)
        # a second submission of the running run is refused with its job id
        code, out, err = run_inprocess(args, capsys)
        assert code == 2 and f"as job {job_id(run_dir)}" in err, err
        urgent = subprocess.run(["sbatch", "--parsable", "-p", "urgent", "-N", "2", "--ntasks-per-node", "2",
                                 "-o", str(tmp_path / "urgent.out"), "--wrap", "echo urgent ran"],
                                capture_output=True, text=True, check=True).stdout.strip()
        out, err = waiter.communicate(timeout=240)
    finally:
        if waiter.poll() is None:
            waiter.kill()
    assert waiter.returncode == 0, out[-2000:] + err[-3000:]
    assert sl.slurm_state(urgent) == "COMPLETED"
    rec = record(run_dir)
    assert rec["status"] == "completed"
    first, again = rec["restarts"][0], rec["restarts"][-1]
    assert len(rec["restarts"]) == 2 and again["resumed"] and again["slurm"]["restart_count"] >= 1
    assert again["slurm"]["job_id"] == first["slurm"]["job_id"]
    log = job_log(run_dir)
    assert "received SIGUSR2" in log and "Requeued job" in log + job_log(run_dir, ext="err")
    stopped_at = log.split("received SIGUSR2")[0]
    # resumed mid-epoch, after every step the first attempt logged (at most the step in flight
    # was redone: none is lost)
    assert again["start_epoch"] == 0 and 5 <= last_step(stopped_at) <= again["start_step"] < 40, again
    assert f"resumed from {run_dir}/checkpoint-last.pth: epoch 0 step {again['start_step']}" in log
    assert_same_weights(reference.weights_file(), run_dir / "checkpoint-1.pth")


def test_scontrol_requeue_loses_at_most_the_current_step(tmp_path, reference):
    """`scontrol requeue` sends SIGTERM only (no USR2): the run saves at the step boundary and
    Slurm itself requeues it."""
    run_dir = tmp_path / "run"
    args = ["--nodes", "1", "--ngpus", "1", *SLURM, *LONG, "--output_dir", str(run_dir)]
    waiter = subprocess.Popen([sys.executable, LAUNCHER, *args, "--wait"], env=env(), cwd=str(tmp_path),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        log = wait_for_step(run_dir, 5)
        done_before = last_step(log)
        subprocess.run(["scontrol", "requeue", job_id(run_dir)], check=True, capture_output=True)
        out, err = waiter.communicate(timeout=240)
    finally:
        if waiter.poll() is None:
            waiter.kill()
    assert waiter.returncode == 0, out[-2000:] + err[-3000:]
    rec = record(run_dir)
    assert rec["status"] == "completed"
    again = rec["restarts"][-1]
    assert len(rec["restarts"]) == 2 and again["resumed"], rec["restarts"]
    log = job_log(run_dir)
    assert "received SIGTERM" in log
    # every step finished before the signal is kept (at most the one in flight is redone)
    assert again["start_epoch"] == 0 and 5 <= done_before <= again["start_step"] < 40, (done_before, again)
    assert last_step(log.split("received SIGTERM")[0]) <= again["start_step"]
    assert_same_weights(reference.weights_file(), run_dir / "checkpoint-1.pth")

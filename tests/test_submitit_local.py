"""The submitit launchers without Slurm: --cluster local and debug run a tiny job to the end,
--dry_run renders the batch script on a machine without Slurm, and the pieces the Slurm path
relies on (flag split, sbatch settings, the Trainer's pickling and requeue hand-off)."""
import json
import os
import pickle
import signal
import subprocess
import sys

import pytest

from util import runs
from util import slurm as sl
from util.errors import UserError
from util.slurm import cli as slurm_cli
from util.slurm.job import _SignalLog

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(ROOT, "submitit_finetune.py")
TINY = ["--model", "convnextv2_atto", "--data_set", "synthetic", "--input_size", "32",
        "--synthetic_train_samples", "64", "--synthetic_val_samples", "16", "--batch_size", "16",
        "--epochs", "1", "--num_workers", "0", "--aa", "none", "--reprob", "0", "--warmup_epochs", "0",
        "--device", "cpu"]


def env():
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def launch(args, cwd, timeout=300):
    """The launcher in its own process group, so that nothing it started outlives a timeout."""
    p = subprocess.Popen([sys.executable, LAUNCHER, *args], env=env(), cwd=cwd, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # the local job's processes, if any are left
        except ProcessLookupError:
            pass
        p.wait()
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def parse(*argv):
    import main_finetune
    from util.config import parse_args
    return parse_args(sl.launcher_parser(main_finetune), list(argv))


# ---------------------------------------------------------------- whole jobs, no Slurm

@pytest.mark.slow
def test_local_cluster_runs_two_processes_to_completion(tmp_path):
    """--cluster local: submitit starts the processes on this machine; gloo between them."""
    run_dir = tmp_path / "run"
    args = ["--cluster", "local", "--nodes", "1", "--ngpus", "2", "--gpus_per_node", "0", *TINY,
            "--output_dir", str(run_dir)]
    p = launch([*args, "--wait"], cwd=str(tmp_path))  # not the repo: the job must still import it
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "completed" in p.stdout.splitlines()[-1]
    rec = json.loads((run_dir / "run.json").read_text())
    assert rec["status"] == "completed" and rec["world_size"] == 2
    job = json.loads((run_dir / "slurm" / "job.json").read_text())
    assert job["cluster"] == "local" and (run_dir / "slurm" / job["job_id"]).is_dir()
    p = launch(args, cwd=str(tmp_path))
    assert p.returncode == 0 and "already completed" in p.stdout, p.stdout + p.stderr


@pytest.mark.slow
def test_debug_cluster_runs_in_the_launcher(tmp_path):
    run_dir = tmp_path / "run"
    p = launch(["--cluster", "debug", "--nodes", "1", "--ngpus", "1", *TINY, "--output_dir", str(run_dir)],
               cwd=str(tmp_path))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"


def test_dry_run_without_slurm_prints_the_batch_script(tmp_path, monkeypatch, capsys):
    import submitit_finetune
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable))  # no sbatch, srun, scontrol
    run_dir = tmp_path / "run"
    code = submitit_finetune.main(["--nodes", "8", "--ngpus", "8", "--model", "convnextv2_base",
                                   "--data_set", "synthetic", "--timeout", "4320", "--partition", "big",
                                   "--use_volta32", "--comment", "paper run", "--slurm_extra", "mail-type=END",
                                   "--output_dir", str(run_dir), "--dry_run"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"run directory: {run_dir}" in out and "world size: 64 (8 node(s) x 8 task(s))" in out
    for line in ("#SBATCH --nodes=8", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --time=4320", "#SBATCH --mem=320GB", "#SBATCH --cpus-per-task=11",
                 "#SBATCH --partition=big", "#SBATCH --constraint=volta32gb", "#SBATCH --comment='paper run'",
                 "#SBATCH --mail-type=END", "#SBATCH --signal=USR2@120", f"{run_dir}/slurm/%j/%j_0_log.out"):
        assert line in out, line
    assert not run_dir.exists()


def test_original_pretrain_command_line_dry_run(tmp_path, monkeypatch, capsys):
    """TRAINING.md's line, as is: --job_dir is where the run (results) goes."""
    import submitit_pretrain
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable))
    (tmp_path / "imagenet-1k" / "train").mkdir(parents=True)
    results = tmp_path / "save_results"
    code = submitit_pretrain.main([
        "--nodes", "8", "--ngpus", "8", "--model", "convnextv2_base", "--batch_size", "64", "--blr", "1.5e-4",
        "--epochs", "1600", "--warmup_epochs", "40", "--data_path", str(tmp_path / "imagenet-1k"),
        "--job_dir", str(results), "--dry_run"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"run directory: {results}" in out and "#SBATCH --job-name=pretrain-save_results" in out
    assert "#SBATCH --nodes=8" in out and "#SBATCH --ntasks-per-node=8" in out and "#SBATCH --time=4320" in out


def test_sbatch_refused_where_there_is_no_slurm(tmp_path, monkeypatch, capsys):
    import submitit_finetune
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable))
    with pytest.raises(SystemExit) as e:
        submitit_finetune.main(["--nodes", "1", "--ngpus", "1", *TINY, "--output_dir", str(tmp_path / "r")])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == \
        "error: sbatch is not on PATH (no Slurm here); use --cluster local to run on this machine"


@pytest.mark.parametrize("argv,message", [
    (["--cluster", "local", "--nodes", "2"], "--cluster local runs on this one machine: use --nodes 1"),
    (["--cluster", "debug", "--nodes", "1", "--ngpus", "2"], "--cluster debug runs one process"),
    (["--slurm_extra", "novalue"], "--slurm_extra 'novalue': write KEY=VALUE"),
    (["--job_dir", "/tmp/x/%j"], "drop the %j"),
    (["--data_set", "image_folder", "--data_path", "/no/such/dir"], "/no/such/dir"),
    (["--finetune", "/no/such.pth"], "/no/such.pth"),  # main's own checks
    (["--resume", "{tmp}/femto.pth"], "does not match --model: downsample_layers.0.0.weight"),
    (["--finetune", "{tmp}/femto.pth"], "checkpoint does not fit the model"),
    (["--data_set", "image_folder", "--data_path", "{tmp}/tree"], "train and val have different classes"),
])
def test_bad_input_one_line(argv, message, tmp_path, monkeypatch, capsys):
    """Refused before anything is queued, checkpoints against the model and the class folders
    included."""
    import torch

    import submitit_finetune
    from models import create_model
    torch.save({"model": create_model("convnextv2_femto", num_classes=10).state_dict()}, tmp_path / "femto.pth")
    for split, cls in (("train", "a"), ("train", "b"), ("val", "a"), ("val", "c")):
        os.makedirs(tmp_path / "tree" / split / cls)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        submitit_finetune.main(["--cluster", "local", "--nodes", "1", "--ngpus", "1", "--dry_run", *TINY, *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and message in err[0], err


# ---------------------------------------------------------------- pieces

def test_main_gets_only_its_own_flags_and_the_same_signature():
    import main_finetune
    from util.config import parse_args
    argv = ["--model", "convnextv2_atto", "--batch_size", "32", "--data_set", "synthetic"]
    args = parse("--nodes", "2", "--ngpus", "4", "--partition", "p", "--slurm_extra", "a=b", *argv)
    main_parser = main_finetune.get_args_parser()
    margs = sl.split_args(args)
    plain = parse_args(main_parser, argv)
    assert vars(margs) == vars(plain)
    assert runs.signature(margs, 8, "finetune") == runs.signature(plain, 8, "finetune")


def test_run_dir_resolved_before_submission(tmp_path):
    args = parse("--nodes", "2", "--ngpus", "2", "--model", "convnextv2_atto", "--data_set", "synthetic",
                 "--runs_root", str(tmp_path))
    margs = sl.split_args(args)
    run_dir, folder = sl.resolve_run(margs, args, "finetune", 4)
    assert run_dir == str(tmp_path / "finetune" / runs.run_name(margs, 4, "finetune"))
    assert margs.output_dir == run_dir and folder == os.path.join(run_dir, "slurm", "%j")
    # the original command lines' --job_dir is where results go
    args = parse("--job_dir", str(tmp_path / "results"), "--data_set", "synthetic")
    margs = sl.split_args(args)
    assert sl.resolve_run(margs, args, "finetune", 16) == (
        str(tmp_path / "results"), str(tmp_path / "results" / "slurm" / "%j"))


def test_sbatch_settings():
    p = sl.slurm_parameters(parse("--nodes", "2", "--ngpus", "4", "--timeout", "30"), "x")
    assert (p["nodes"], p["ntasks_per_node"], p["gpus_per_node"], p["time"], p["mem"]) == (2, 4, 4, 30, "160GB")
    assert p["cpus_per_task"] == 11 and p["signal_delay_s"] == 120  # --num_workers 10 + the training process
    assert sl.slurm_parameters(parse("--num_workers", "3"), "x")["cpus_per_task"] == 4
    assert sl.slurm_parameters(parse("--num_workers", "3", "--cpus_per_task", "2"), "x")["cpus_per_task"] == 2
    p = sl.slurm_parameters(parse("--ngpus", "2", "--gpus_per_node", "0", "--mem_gb", "1.5",
                                  "--constraint", "a100", "--use_volta32", "--slurm_extra", "mail-type=END",
                                  "--account", "acc", "--qos", "high", "--exclude", "n3"), "x")
    assert "gpus_per_node" not in p and p["mem"] == "1536MB" and p["constraint"] == "volta32gb&a100"
    assert p["additional_parameters"] == {"mail-type": "END"}
    assert (p["account"], p["qos"], p["exclude"]) == ("acc", "high", "n3")


def test_slurm_time_parsing():
    assert sl.parse_minutes("UNLIMITED") is None
    assert sl.parse_minutes("60") == 60
    assert sl.parse_minutes("01:00:00") == 60
    assert sl.parse_minutes("1-00:00:00") == 1440
    assert sl.parse_minutes("2-12") == 2 * 1440 + 720


def test_job_pickles_and_requeues_the_same_run(tmp_path):
    import cloudpickle
    args = parse("--model", "convnextv2_atto", "--data_set", "synthetic", "--output_dir", str(tmp_path))
    t = sl.Job("main_finetune", "finetune", args)
    back = pickle.loads(cloudpickle.dumps(t))
    assert back.module == "main_finetune" and vars(back.args) == vars(args)
    again = t.checkpoint()
    assert isinstance(again.function, sl.Job) and again.function.args.output_dir == str(tmp_path)


def test_signal_log_sees_signals_whoever_handles_them():
    seen = []
    old = signal.signal(signal.SIGUSR2, lambda s, f: seen.append(s))
    try:
        with _SignalLog() as log:
            signal.signal(signal.SIGUSR2, lambda s, f: seen.append(-s))  # like main() replacing it
            os.kill(os.getpid(), signal.SIGUSR2)
        assert seen == [-signal.SIGUSR2] and signal.SIGUSR2 in log.received
    finally:
        signal.signal(signal.SIGUSR2, old)


def test_partition_limits_from_what_slurm_says(monkeypatch):
    """check_partition on a made-up cluster (what `scontrol show partition -o` and sinfo give)."""
    fake = {"gpu": {"PartitionName": "gpu", "Default": "YES", "TotalNodes": "16", "MaxNodes": "8",
                    "MaxTime": "3-00:00:00"},
            "cpu": {"PartitionName": "cpu", "Default": "NO", "TotalNodes": "4", "MaxNodes": "UNLIMITED",
                    "MaxTime": "UNLIMITED"}}
    monkeypatch.setattr(slurm_cli, "partitions", lambda: fake)
    monkeypatch.setattr(slurm_cli, "node_resources",
                        lambda name: (96, 512000, True) if name == "gpu" else (32, 64000, False))

    def problem(*argv):
        try:
            sl.check_partition(parse(*argv))
        except UserError as e:
            return str(e)
        return None

    assert problem("--nodes", "8", "--ngpus", "8") is None  # the default partition, 4320 min
    assert "allows at most 8 node(s)" in problem("--nodes", "9")
    assert "MaxTime 3-00:00:00 (4320 min)" in problem("--nodes", "1", "--timeout", "4321")
    assert "have 96" in problem("--nodes", "1", "--ngpus", "10")
    assert "9 task(s) per node x 11 CPUs per task (--num_workers 10 + 1) = 99 CPUs per node" in \
        problem("--nodes", "1", "--ngpus", "9")
    assert problem("--nodes", "1", "--ngpus", "9", "--num_workers", "9") is None  # 9 x 10 fits in 96
    assert "has no GPUs" in problem("--partition", "cpu", "--nodes", "1", "--ngpus", "2", "--gpus_per_node", "2")
    cpu_default = parse("--partition", "cpu", "--nodes", "1", "--ngpus", "2", "--mem_gb", "60")
    sl.check_partition(cpu_default)  # no --gpus_per_node on a CPU partition: ask for none
    assert sl.gpus_per_node(cpu_default) == 0
    assert "gpus_per_node" not in sl.slurm_parameters(cpu_default, "x")
    assert problem("--partition", "cpu", "--nodes", "1", "--ngpus", "2", "--gpus_per_node", "0",
                   "--cpus_per_task", "16", "--mem_gb", "60") is None
    assert "64000 MB" in problem("--partition", "cpu", "--nodes", "1", "--ngpus", "1", "--gpus_per_node", "0",
                                 "--mem_gb", "63")
    assert problem("--partition", "cpu,gpu", "--nodes", "6", "--ngpus", "1") is None  # fits gpu
    assert "unknown partition 'big'" in problem("--partition", "gpu,big")

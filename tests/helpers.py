"""Running the real scripts in subprocesses (1 process, or torchrun with N gloo processes)."""
import json
import os
import signal
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = ["--model", "convnextv2_atto", "--data_set", "synthetic", "--input_size", "32",
        "--synthetic_train_samples", "64", "--synthetic_val_samples", "30", "--num_workers", "0",
        "--aa", "none", "--reprob", "0", "--smoothing", "0", "--warmup_epochs", "0",
        "--print_freq", "1", "--device", "cpu", "--head_init_scale", "1.0", "--blr", "4e-3"]


def script_env(threads=1):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def command(script, args, nproc=1):
    if nproc == 1:
        return [sys.executable, os.path.join(ROOT, script), *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(_free_port()), os.path.join(ROOT, script), *args]


def run(script, args, nproc=1, check=True, timeout=300, cwd=None, fresh=False):
    """Run a script to the end. One process: forked from tests/forkrun.py's server (imports
    done, ~5 s less per launch) unless `fresh` asks for a new interpreter; several: torchrun."""
    if nproc == 1 and not fresh:
        import pathlib
        import tempfile

        from tests import forkrun
        with tempfile.TemporaryDirectory(prefix="run-") as logs:
            p = forkrun.run(script, [str(a) for a in args], pathlib.Path(logs), cwd=cwd or ROOT, timeout=timeout)
    else:
        p = subprocess.run(command(script, args, nproc), env=script_env(), capture_output=True, text=True,
                           timeout=timeout, cwd=cwd or ROOT)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def read_log(run_dir):
    with open(os.path.join(run_dir, "log.txt")) as f:
        return [json.loads(line) for line in f]


def run_record(run_dir):
    with open(os.path.join(run_dir, "run.json")) as f:
        return json.load(f)


def children(pid):
    """The pids of `pid`'s child processes (Linux /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return out


def stop_midway(args, nproc, sig, at_step=5, every_process=False):
    """Start the run, send `sig` once it has logged step `at_step` of epoch 0, wait for it to end.
    `every_process`: to the launched process and all its descendants (loader workers too), as
    Slurm signals every process of a job; else to the launched process alone."""
    p = subprocess.Popen(command("main_finetune.py", args, nproc), env=script_env(), cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if f"train epoch 0 [{at_step}/" in line:
            pids, i = [p.pid], 0
            while every_process and i < len(pids):
                pids += children(pids[i])
                i += 1
            for pid in pids:
                os.kill(pid, sig)
            break
    lines += p.stdout.readlines()
    p.wait(timeout=120)
    return "".join(lines)


def stop_and_resume(args, cut, nproc, steps_per_epoch, sig=signal.SIGTERM, at_step=5, every_process=False):
    """The run in `cut` stopped by `sig` after step `at_step` of epoch 0 (recorded preempted,
    its last checkpoint inside epoch 0, at or after that step), then started again and run to
    its end (recorded completed)."""
    args = args + ["--output_dir", str(cut)]
    out = stop_midway(args, nproc, sig, at_step, every_process)
    assert run_record(cut)["status"] == "preempted", out[-2000:]
    ck = torch.load(os.path.join(cut, "checkpoint-last.pth"), map_location="cpu", weights_only=True)
    assert ck["epoch"] == 0 and at_step <= ck["step"] < steps_per_epoch, ck["step"]
    run("main_finetune.py", args, nproc=nproc)
    assert run_record(cut)["status"] == "completed"


def assert_same_weights(a_path, b_path, key="model"):
    """The checkpoints' `key` state dicts are equal, bit for bit."""
    a = torch.load(a_path, map_location="cpu", weights_only=True)[key]
    b = torch.load(b_path, map_location="cpu", weights_only=True)[key]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

"""Who launched us: rank, world size and local rank from torchrun, torch.distributed.launch's
--local_rank, plain srun, Open MPI's mpirun (--dist_on_itp) or nothing; and a real 2-process
run started the way mpirun starts one."""
import subprocess
import sys

import pytest

from tests.helpers import ROOT, TINY, _free_port, run_record, script_env
from util import distributed as du
from util.errors import UserError

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID",
               "SLURM_JOB_ID", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
               "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def env(monkeypatch):
    for k in LAUNCH_VARS:
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def test_single_process_without_a_launcher(env):
    assert du.detect_launcher() == ("none", 0, 1, 0)


def test_torchrun_variables(env):
    for k, v in dict(RANK="3", WORLD_SIZE="8", LOCAL_RANK="1").items():
        env.setenv(k, v)
    assert du.detect_launcher() == ("torchrun", 3, 8, 1)


def test_legacy_launch_passes_local_rank_as_a_flag(env):
    env.setenv("RANK", "1")
    env.setenv("WORLD_SIZE", "2")
    assert du.detect_launcher(local_rank_flag=1) == ("torchrun", 1, 2, 1)


def test_plain_srun_variables(env):
    for k, v in dict(SLURM_PROCID="5", SLURM_NTASKS="8", SLURM_LOCALID="1", SLURM_JOB_ID="77").items():
        env.setenv(k, v)
    assert du.detect_launcher() == ("slurm", 5, 8, 1)


def test_mpirun_variables_with_dist_on_itp(env):
    for k, v in dict(OMPI_COMM_WORLD_RANK="2", OMPI_COMM_WORLD_SIZE="4", OMPI_COMM_WORLD_LOCAL_RANK="0",
                     MASTER_ADDR="127.0.0.1", MASTER_PORT="29511").items():
        env.setenv(k, v)
    assert du.detect_launcher() == ("none", 0, 1, 0)  # without the flag, as in the original
    assert du.detect_launcher(dist_on_itp=True) == ("mpirun", 2, 4, 0)


def test_dist_on_itp_outside_mpirun_is_one_line(env):
    with pytest.raises(UserError, match="needs a launch by Open MPI's mpirun"):
        du.detect_launcher(dist_on_itp=True)
    env.setenv("OMPI_COMM_WORLD_RANK", "0")
    env.setenv("OMPI_COMM_WORLD_SIZE", "2")
    with pytest.raises(UserError, match="needs MASTER_ADDR and MASTER_PORT"):
        du.detect_launcher(dist_on_itp=True)


@pytest.mark.slow
def test_two_processes_started_like_mpirun(tmp_path):
    """Two processes with only Open MPI's variables (and MASTER_*) form one gloo group."""
    out, port = tmp_path / "run", str(_free_port())
    procs = []
    for rank in range(2):
        e = script_env()
        for k in LAUNCH_VARS:
            e.pop(k, None)
        e.update(OMPI_COMM_WORLD_RANK=str(rank), OMPI_COMM_WORLD_SIZE="2", OMPI_COMM_WORLD_LOCAL_RANK=str(rank),
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "main_finetune.py", *TINY, "--batch_size", "8", "--epochs", "1",
                                       "--dist_on_itp", "True", "--output_dir", str(out)], cwd=ROOT, env=e,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:]
    rec = run_record(out)
    assert rec["status"] == "completed" and rec["world_size"] == 2

"""Where am I running? Rank, world size, local rank and device from torchrun,
`torch.distributed.launch`, Slurm (srun / submitit) or nothing (one process).

This is the only module that knows about launchers; everything else asks `get_rank()` and
`get_world_size()`. NCCL on CUDA, gloo on CPU.
"""
import datetime
import os
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

from util.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    """Where this process runs; what the original scripts wrote onto `args` (rank, world_size,
    gpu = local_rank, distributed, device) lives here instead."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    distributed: bool = False
    launcher: str = "none"

    @property
    def is_main(self):
        return self.rank == 0


def _slurm_master_addr():
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, check=True).stdout.split()
        return out[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "127.0.0.1"


def detect_launcher(local_rank_flag=-1, dist_on_itp=False):
    """Return (launcher, rank, world_size, local_rank) from the environment. `dist_on_itp`
    (the original flag): Open MPI's mpirun, whose OMPI_COMM_WORLD_* variables name the ranks;
    MASTER_ADDR and MASTER_PORT must be set, as with the original code."""
    env = os.environ
    if dist_on_itp:
        if "OMPI_COMM_WORLD_RANK" not in env:
            raise UserError("--dist_on_itp True needs a launch by Open MPI's mpirun "
                            "(OMPI_COMM_WORLD_RANK is not set); drop the flag or launch with mpirun")
        if not (env.get("MASTER_ADDR") and env.get("MASTER_PORT")):
            raise UserError("--dist_on_itp True needs MASTER_ADDR and MASTER_PORT in the environment "
                            "(the address and a free port of rank 0's host)")
        rank, world = int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"])
        local = int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0"))
        env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))
        return ("mpirun", rank, world, local)
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, torch.distributed.launch, submitit export
        local = int(env.get("LOCAL_RANK", local_rank_flag if local_rank_flag >= 0 else 0))
        return ("torchrun", int(env["RANK"]), int(env["WORLD_SIZE"]), local)
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:  # plain srun
        env.setdefault("MASTER_ADDR", _slurm_master_addr())
        env.setdefault("MASTER_PORT", str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        return ("slurm", int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", "0")))
    return ("none", 0, 1, max(local_rank_flag, 0))


def resolve_device(name, local_rank=0):
    if name in ("auto", "", None):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} asked for CUDA but none is available; "
                            "use --device cpu or --device auto")
        return torch.device("cuda", local_rank if name == "cuda" else int(name.split(":")[1]))
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps is not available here; use --device auto")
    return torch.device(name)


def init_distributed(args):
    """Set up the process group (when launched with several processes) and the device; returns
    the DistInfo. Reads the launch flags of `args` and writes nothing onto it."""
    launcher, rank, world, local = detect_launcher(args.local_rank,
                                                   bool(args.dist_on_itp))
    device = resolve_device(args.device, local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    distributed = world > 1
    if distributed and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=float(args.dist_timeout))
        if launcher == "slurm":
            os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))
        store = None
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and args.dist_url == "env://":
            # torchrun's agent serves the store at MASTER_ADDR:MASTER_PORT and keeps the same one
            # across `--max-restarts` attempts, and torch's env:// adds no per-attempt prefix: each
            # rank's gloo address from the attempt before stays under the same key, so a rank that
            # reads a peer's key before the restarted peer rewrote it connects to a dead process
            # (connectFullMesh refused) or pairs wrongly and hangs. One key space per attempt.
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            store = dist.PrefixStore(f"attempt-{attempt}", dist.TCPStore(
                os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                timeout=timeout))
        dist.init_process_group(backend=backend, init_method=None if store else args.dist_url, store=store,
                                world_size=world, rank=rank, timeout=timeout)
    return DistInfo(rank, world, local, device, distributed, launcher)


def is_dist():
    return dist.is_available() and dist.is_initialized()


def torchrun_attempt():
    """This process's attempt of a `torchrun --max-restarts N` group, from the variables torchrun's
    agent sets: {"restart_count" (TORCHELASTIC_RESTART_COUNT, 0 for the first attempt),
    "max_restarts", "restarts_left", "run_id"}; None when torchrun's agent did not start it."""
    env = os.environ
    if not env.get("TORCHELASTIC_RESTART_COUNT", "").isdigit():
        return None
    count, most = int(env["TORCHELASTIC_RESTART_COUNT"]), int(env.get("TORCHELASTIC_MAX_RESTARTS") or 0)
    return {"restart_count": count, "max_restarts": most, "restarts_left": max(most - count, 0),
            "run_id": env.get("TORCHELASTIC_RUN_ID")}


def is_group_failure(error):
    """Did `error` (or an error it was raised from) come out of the process group's communication:
    a peer died or stopped answering? A collective torch runs for us raises a DistError; DDP's
    all-reduce inside backward reaches us through autograd as a plain RuntimeError that carries
    the backend's message (gloo's names its transport source file, NCCL's names NCCL)."""
    while error is not None:
        if isinstance(error, dist.DistError) or (
                isinstance(error, RuntimeError) and any(m in str(error) for m in ("gloo/transport", "NCCL"))):
            return True
        error = error.__cause__ or error.__context__
    return False


def get_rank():
    return dist.get_rank() if is_dist() else 0


def get_world_size():
    return dist.get_world_size() if is_dist() else 1


def is_main_process():
    return get_rank() == 0


def barrier():
    if is_dist():
        dist.barrier()


def broadcast_object(obj, src=0):
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj):
    if not is_dist():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


_keep_group = False


def keep_process_group(keep=True):
    """While set, cleanup() leaves the process group up: a hyperparameter search runs main()
    once per trial in one torchrun group and talks between trials (util/hpo/)."""
    global _keep_group
    _keep_group = bool(keep)


def cleanup():
    if is_dist() and not _keep_group:
        dist.destroy_process_group()

"""Rank-aware console output, without replacing `builtins.print`.

`info(...)` prints on rank 0 only (every process prints before the process group exists, as
one process does); a plain `print(...)` still prints on every rank, for what each rank must say
(a signal received, a skipped step, a warning of its own).
"""
import sys


def _is_rank0():
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is always installed with the suite
        return True
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def info(*args, file=None, flush=True, **kwargs):
    """print() on rank 0 only; flushed, so the lines of a job's log keep their order."""
    if _is_rank0():
        print(*args, file=file or sys.stdout, flush=flush, **kwargs)

"""Rank-aware console output, without replacing `builtins.print`.

`info(...)` prints on rank 0 only (every process prints before the process group exists, as
one process does); a plain `print(...)` still prints on every rank, for what each rank must say
(a signal received, a skipped step, a warning of its own).
"""
import sys


def info(*args, file=None, flush=True, **kwargs):
    """print() on rank 0 only; flushed, so the lines of a job's log keep their order."""
    from util.distributed import is_main_process  # torch: imported when something is said
    if is_main_process():
        print(*args, file=file or sys.stdout, flush=flush, **kwargs)

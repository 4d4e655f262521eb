"""Run a script so that it SIGKILLs itself halfway through writing its N-th checkpoint file: a
kill at the worst moment, on purpose rather than by chance (tests/test_faults.py).

    python tests/kill_in_write.py N main_finetune.py ARGS...

(or forkrun.start("tests/kill_in_write.py", [N, "main_finetune.py", *ARGS], ...)). Under
`torchrun --max-restarts`, `N:RANK:ATTEMPT` arms it in one process only: rank RANK of the attempt
whose TORCHELASTIC_RESTART_COUNT is ATTEMPT; every other process runs the script as it is. The fault
lives here, in the test's child process only: atomic.atomic_file is wrapped so that the
N-th checkpoint-*.pth save writes the first half of its bytes into the real temporary file,
fsyncs it and kills the process, leaving what a kill mid-write leaves.
"""
import contextlib
import io
import os
import runpy
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def install(n):
    """Wrap models.atomic.atomic_file in this process: its n-th checkpoint file dies half-written."""
    import models.atomic as atomic
    real = atomic.atomic_file
    writes = 0

    @contextlib.contextmanager
    def atomic_file(path):
        nonlocal writes
        checkpoint = os.path.basename(os.fspath(path)).startswith("checkpoint")
        writes += checkpoint
        with real(path) as f:
            if not checkpoint or writes != n:
                yield f
                return
            whole = io.BytesIO()  # the whole file first, to know where its half is
            yield whole
            data = whole.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            print(f"test: killing this process halfway through writing {path}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    atomic.atomic_file = atomic_file


def main(argv):
    n, *where = argv[0].split(":")
    script, args = argv[1], argv[2:]
    script = script if os.path.isabs(script) else os.path.join(ROOT, script)
    if not where or where == [os.environ.get("RANK"), os.environ.get("TORCHELASTIC_RESTART_COUNT")]:
        install(int(n))
    sys.argv = [script, *args]  # what `python script ARGS` would see
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    main(sys.argv[1:])

"""Atomic file writes: temporary file in the same folder, fsync, rename.

A reader (or a run resumed after SIGKILL) sees either the old file or the new one, never half.
"""
import io
import json
import os
import stat
import tempfile
import threading


def atomic_write_bytes(path, data: bytes):
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.fchmod(fd, _open_mode(path))  # mkstemp makes 0600: colleagues could not read the file
        with os.fdopen(fd, "wb") as f:
            _test_kill_midway(f, path, data)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _open_mode(path):
    """The mode a plain open(path, "w") would leave: an existing file keeps its own, a new one
    gets 0o666 less the umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~_umask()


_umask_lock = threading.Lock()


def _umask():
    """The process umask, read without changing it where Linux allows (/proc, kernel >= 4.7):
    os.umask can only read it by setting it, which races with other threads creating files."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:
        mask = os.umask(0o077)  # if another thread creates a file meanwhile: private, not public
        os.umask(mask)
    return mask


_checkpoint_writes = 0


def _test_kill_midway(f, path, data):
    """Tests only (tests/test_faults.py): with SUITE_TEST_KILL_IN_WRITE=N in the environment,
    this process SIGKILLs itself halfway through writing its N-th checkpoint file: a kill at
    the worst moment, on purpose rather than by chance."""
    n = os.environ.get("SUITE_TEST_KILL_IN_WRITE")
    if not n or not os.path.basename(path).startswith("checkpoint"):
        return
    global _checkpoint_writes
    _checkpoint_writes += 1
    if _checkpoint_writes == int(n):
        import signal
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        print(f"test: killing this process halfway through writing {path}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def atomic_write_text(path, text: str):
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_torch_save(obj, path):
    import torch
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def missing_dirs(path):
    """The folders of `path` (itself and its parents) that do not exist yet, deepest first:
    what `os.makedirs(path)` would create, so that `remove_empty_dirs` can undo it."""
    missing, p = [], os.path.abspath(path)
    while not os.path.exists(p):
        missing.append(p)
        p = os.path.dirname(p)
    return missing


def remove_empty_dirs(dirs):
    """rmdir each folder (deepest first) that is still empty; leave the others alone."""
    for d in dirs:
        try:
            os.rmdir(d)
        except OSError:
            pass

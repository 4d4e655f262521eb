"""Atomic file writes: temporary file in the same folder, fsync, rename.

A reader (or a run resumed after SIGKILL) sees either the old file or the new one, never half.
A save streams into its temporary file: no copy of the whole content is built in memory first.
"""
import contextlib
import json
import os
import stat
import tempfile
import threading


@contextlib.contextmanager
def atomic_file(path):
    """Yield a binary file open on a new temporary next to `path`; when the block ends without
    an exception, flush, fsync and rename it over `path`, then fsync the folder. On any failure
    (a full disk, an exception, KeyboardInterrupt) the temporary is removed and `path` is left
    as it was."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.fchmod(fd, _open_mode(path))  # mkstemp makes 0600: colleagues could not read the file
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_folder(folder)


def _fsync_folder(folder):
    """Make the rename itself durable (where the file system allows a folder to be fsynced)."""
    try:
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def atomic_write_bytes(path, data: bytes):
    with atomic_file(path) as f:
        f.write(data)


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


def atomic_write_text(path, text: str):
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_torch_save(obj, path):
    """torch.save straight into the temporary file: the checkpoint is never held whole in host
    memory (a BytesIO and its getvalue() were two extra copies, ~20 GB for convnextv2_huge with
    AdamW and EMA). A failed write raises its OSError (ENOSPC, EFBIG), as a write of bytes does."""
    import torch
    with atomic_file(path) as f:
        try:
            torch.save(obj, f)
        except RuntimeError as e:
            # torch's zip writer, closed after a failed write, fails again with a RuntimeError
            # ("unexpected pos") that hides the OSError which caused it
            cause = _os_error_in(e)
            if cause is None:
                raise
            raise cause from None


def _os_error_in(e):
    """The first OSError among the exceptions `e` was raised while handling, if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__context__
    return None


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

"""Atomic file writes: temporary file in the same folder, fsync, rename.

A reader (or a run resumed after SIGKILL) sees either the old file or the new one, never half.
A save streams into its temporary file: no copy of the whole content is built in memory first.
"""
# the one writer of models/ and util/: at the bottom layer, as weight export (models/weights.py) writes
# files too; `import models` stays cheap (no torch), so the cheap checks may write with it
import contextlib
import json
import os
import stat
import tempfile
import threading


@contextlib.contextmanager
def atomic_file(path):
    """Yield a binary file open on a new temporary next to `path` (its `name` is the temporary's
    path, for writers that take a path); when the block ends without an exception, flush, fsync
    and rename it over `path`, then fsync the folder. On any failure (a full disk, an exception,
    KeyboardInterrupt) the temporary is removed and `path` is left as it was."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        try:  # the mode a plain open(path, "w") leaves, not mkstemp's 0600: an existing file's own
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except OSError:  # a new file: 0o666 less the umask
            mode = 0o666 & ~_umask()
        os.fchmod(fd, mode)
        os.close(fd)
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # also what a writer given f.name wrote: same file
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable, where the file system allows a folder to be fsynced
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
    memory (~20 GB for convnextv2_huge with AdamW and EMA). A failed write raises its OSError
    (ENOSPC, EFBIG), as a write of bytes does."""
    import torch
    with atomic_file(path) as f:
        try:
            torch.save(obj, f)
        except RuntimeError as e:
            # torch's zip writer, closed after a failed write, fails again with a RuntimeError
            # ("unexpected pos") that hides the OSError which caused it
            cause = e.__context__
            while cause is not None and not isinstance(cause, OSError):
                cause = cause.__context__
            if cause is None:
                raise
            raise cause from None


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

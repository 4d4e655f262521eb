"""Atomic writes (atomic.py) leave the file as a plain open() would: same content, same mode;
checkpoint saves stream into their temporary file and a failed one leaves the old file whole."""
import contextlib
import io
import os
import re
import resource
import signal
import stat
import tracemalloc

import pytest
import torch

from models.atomic import atomic_torch_save, atomic_write_bytes, atomic_write_text
from util.checkpoint import save_checkpoint
from util.errors import UserError


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077], ids=oct)
def test_atomic_write_gets_the_mode_of_a_plain_open(tmp_path, umask):
    old = os.umask(umask)
    try:
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
        atomic_write_text(tmp_path / "atomic.txt", "x")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "atomic.txt") == _mode(tmp_path / "plain.txt") == 0o666 & ~umask
    assert (tmp_path / "atomic.txt").read_text() == "x"
    assert sorted(os.listdir(tmp_path)) == ["atomic.txt", "plain.txt"]  # no temporary file left


def test_overwriting_keeps_the_files_mode(tmp_path):
    """open(path, "w") on an existing file keeps its mode (a colleague's chmod stays)."""
    path = tmp_path / "run.json"
    atomic_write_text(path, "1")
    os.chmod(path, 0o640)
    atomic_write_text(path, "2")
    assert _mode(path) == 0o640 and path.read_text() == "2"


# ---------------------------------------------------------------- checkpoint saves stream

def _state(mb=32):
    return {"model": {"w": torch.randn(mb << 18)}, "epoch": 3}  # mb MB of float32


def test_a_save_writes_straight_into_its_temporary_file(tmp_path, monkeypatch):
    """torch.save is handed the temporary file itself (next to the checkpoint), and the bytes are
    on disk there before the rename: no in-memory buffer stands between them."""
    path, seen, real_save = tmp_path / "checkpoint-last.pth", [], torch.save

    def spy(obj, f, *a, **kw):
        real_save(obj, f, *a, **kw)
        f.flush()
        target = os.readlink(f"/proc/self/fd/{f.fileno()}")
        seen.append((type(f), target, os.fstat(f.fileno()).st_size, path.exists()))
    monkeypatch.setattr(torch, "save", spy)
    state = _state(4)
    atomic_torch_save(state, path)
    [(kind, target, size, renamed)] = seen
    assert issubclass(kind, io.BufferedWriter) and not renamed
    assert os.path.dirname(target) == str(tmp_path)
    assert re.fullmatch(r"\.checkpoint-last\.pth\..+\.tmp", os.path.basename(target)), target
    assert size == os.path.getsize(path) > 4 << 20
    assert torch.equal(torch.load(path, weights_only=True)["model"]["w"], state["model"]["w"])
    assert os.listdir(tmp_path) == ["checkpoint-last.pth"]


def test_a_save_holds_no_copy_of_the_checkpoint_in_memory(tmp_path):
    """Python-level memory allocated during a 32 MB save stays far below its size, where a
    save through an io.BytesIO allocates the whole checkpoint again."""
    state, size = _state(32), 32 << 20

    def peak(save):
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            save()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    def through_bytes():
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(tmp_path / "checkpoint-old.pth", buf.getvalue())
    assert peak(through_bytes) > size  # the measurement sees a copy where there is one
    assert peak(lambda: atomic_torch_save(state, tmp_path / "checkpoint-new.pth")) < size // 16
    assert (tmp_path / "checkpoint-new.pth").read_bytes() == (tmp_path / "checkpoint-old.pth").read_bytes()


@contextlib.contextmanager
def _file_size_limit(limit):
    """Files of this process cannot grow past `limit` bytes (the write fails with EFBIG, as a
    full disk fails with ENOSPC)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_a_save_failing_halfway_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "checkpoint-last.pth"
    save_checkpoint(_state(1), path)
    before = path.read_bytes()
    with _file_size_limit(2 << 20), pytest.raises(UserError) as e:
        save_checkpoint(_state(4), path)  # 4 MB: the write fails after 2 MB
    assert str(e.value) == (f"could not write checkpoint {path} (File too large); free disk space or choose "
                            "another --output_dir; the previous checkpoint is intact")
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["checkpoint-last.pth"]


def test_a_save_interrupted_by_an_exception_keeps_the_old_file(tmp_path, monkeypatch):
    """Not only OSError: any exception in the middle of torch.save (here KeyboardInterrupt after
    some bytes were written) removes the temporary and propagates unchanged."""
    path = tmp_path / "checkpoint-last.pth"
    atomic_torch_save(_state(1), path)
    before = path.read_bytes()

    def interrupted(obj, f, *a, **kw):
        f.write(b"PK\x03\x04" + bytes(1 << 20))
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save(_state(1), path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["checkpoint-last.pth"]

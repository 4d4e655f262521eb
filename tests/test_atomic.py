"""Atomic writes (util/atomic.py) leave the file as a plain open() would: same content, same mode."""
import os
import stat

import pytest

from util.atomic import atomic_write_text


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

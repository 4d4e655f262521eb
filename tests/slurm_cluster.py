"""The `slurm_cluster` session fixture: a real, private Slurm cluster for tests/test_slurm.py.

It runs scripts/slurm/start_slurm.sh (which installs Debian's Slurm when missing) once per
session where that is possible (Linux, root, and Slurm or apt-get present), and
scripts/slurm/stop_slurm.sh when the last test session using it ends. A cluster that was up
before any test session started it (somebody's, by hand) is left running. Elsewhere the Slurm
tests skip with the reason; under CI (CI=true) a cluster that cannot start is a failure, not a
skip.
"""
import contextlib
import fcntl
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts", "slurm")
CLUSTER_DIR = os.environ.get("SLURM_CI_DIR", "/tmp/convnextv2_slurm")


def _in_ci():
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def why_not():
    """None when this machine can host the test cluster, else the reason."""
    if os.environ.get("SLURM_TESTS", "1") == "0":
        return "Slurm tests disabled by SLURM_TESTS=0"
    if not sys.platform.startswith("linux"):
        return "the Slurm test cluster needs Linux"
    if os.geteuid() != 0:
        return "the Slurm test cluster needs root (it starts munged, slurmctld, slurmd, slurmdbd)"
    if not shutil.which("sbatch") and not shutil.which("apt-get"):
        return "Slurm is not installed and there is no apt-get to install it"
    return None


def _controller_up():
    pidfile = os.path.join(CLUSTER_DIR, "run", "slurmctld.bgpid")
    try:
        pid = int(open(pidfile).read().strip())
        os.kill(pid, 0)
        return True
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _locked():
    """One session at a time starts, joins or stops the cluster."""
    os.makedirs(os.path.join(CLUSTER_DIR, "run", "sessions"), exist_ok=True)
    with open(os.path.join(CLUSTER_DIR, "run", "sessions.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _live_sessions():
    """Pids of the test sessions using the cluster (their files; dead ones are dropped)."""
    folder = os.path.join(CLUSTER_DIR, "run", "sessions")
    live = []
    for name in os.listdir(folder):
        try:
            os.kill(int(name), 0)
            live.append(int(name))
        except (OSError, ValueError):
            os.remove(os.path.join(folder, name))
    return live


def _script(name, env, timeout):
    return subprocess.run(["bash", os.path.join(SCRIPTS, name)], env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="session")
def slurm_cluster():
    """Yields the cluster's folder; SLURM_CONF points at its config while the session runs."""
    reason = why_not()
    if reason:
        if _in_ci():
            pytest.fail(f"CI must run the Slurm tests, but: {reason}")
        pytest.skip(reason)
    env = dict(os.environ, SLURM_CI_DIR=CLUSTER_DIR)
    marker = os.path.join(CLUSTER_DIR, "run", "started_by_tests")
    me = os.path.join(CLUSTER_DIR, "run", "sessions", str(os.getpid()))
    with _locked():
        if not _controller_up():
            open(marker, "w").close()  # ours: the last session out stops it
        p = _script("start_slurm.sh", env, timeout=900)
        if p.returncode != 0:
            if not _live_sessions() and os.path.exists(marker):
                _script("stop_slurm.sh", env, timeout=300)
                os.remove(marker)
            msg = f"could not start the Slurm test cluster:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
            if _in_ci():
                pytest.fail(msg)
            pytest.skip(msg)
        open(me, "w").close()
    old_conf = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = os.path.join(CLUSTER_DIR, "etc", "slurm.conf")
    try:
        yield CLUSTER_DIR
    finally:
        if old_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old_conf
        with _locked():
            os.remove(me)
            if not _live_sessions() and os.path.exists(marker):
                _script("stop_slurm.sh", env, timeout=300)
                os.remove(marker)

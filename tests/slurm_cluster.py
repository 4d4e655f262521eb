"""The `slurm_cluster` session fixture: a real, private Slurm cluster for tests/test_slurm.py.

It runs scripts/slurm/start_slurm.sh (which installs Debian's Slurm when missing) once per
session where that is possible (Linux, root, and Slurm or apt-get present), and
scripts/slurm/stop_slurm.sh at the end, unless the cluster was already up before the session
(then it is somebody's and stays). Elsewhere the Slurm tests skip with the reason; under CI
(CI=true) a cluster that cannot start is a failure, not a skip.
"""
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


@pytest.fixture(scope="session")
def slurm_cluster():
    """Yields the cluster's folder; SLURM_CONF points at its config while the session runs."""
    reason = why_not()
    if reason:
        if _in_ci():
            pytest.fail(f"CI must run the Slurm tests, but: {reason}")
        pytest.skip(reason)
    env = dict(os.environ, SLURM_CI_DIR=CLUSTER_DIR)
    was_up = _controller_up()
    p = subprocess.run(["bash", os.path.join(SCRIPTS, "start_slurm.sh")], env=env,
                       capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        subprocess.run(["bash", os.path.join(SCRIPTS, "stop_slurm.sh")], env=env,
                       capture_output=True, timeout=300)
        msg = f"could not start the Slurm test cluster:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        if _in_ci():
            pytest.fail(msg)
        pytest.skip(msg)
    old_conf = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = os.path.join(CLUSTER_DIR, "etc", "slurm.conf")
    try:
        yield CLUSTER_DIR
    finally:
        if old_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old_conf
        if not was_up:
            subprocess.run(["bash", os.path.join(SCRIPTS, "stop_slurm.sh")], env=env,
                           capture_output=True, timeout=300)

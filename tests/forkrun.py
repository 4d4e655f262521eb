"""Run the real scripts as `__main__` in processes forked from a server that has torch, timm and
the scripts imported already.

The child is what `python main_x.py ARGS` would be (same `__main__` code, argv, cwd, environment,
exit status, stdout/stderr), minus ~5 s of imports per launch, so tests can launch a script
dozens of times (every user mistake; a run killed and restarted 20 times). A child killed with
SIGKILL dies as abruptly as any process. Tests that need the interpreter's own behaviour (an
uncaught exception's traceback, torchrun) use tests/helpers.run instead.
"""
import multiprocessing
import os
import runpy
import sys
from dataclasses import dataclass

from tests.helpers import ROOT, script_env

PRELOAD = ["torch", "torchvision", "timm", "timm.data", "timm.loss", "timm.utils", "numpy", "yaml",
           "PIL.Image", "torch.utils.tensorboard", "main_finetune", "main_pretrain", "models",
           "models.weights", "util.run_context", "util.data", "util.logger", "util.optim",
           "util.checkpoint", "tests.forkrun"]
_ctx = None


def context():
    global _ctx
    if _ctx is None:
        if ROOT not in sys.path:
            sys.path.insert(0, ROOT)
        _ctx = multiprocessing.get_context("forkserver")
        _ctx.set_forkserver_preload(PRELOAD)
    return _ctx


def _child(script, args, cwd, env, out, err, setup, fsize_limit):
    fo = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND)  # first: a FIFO's reader waits for it
    fe = fo if err == out else os.open(err, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fo, 1)
    os.dup2(fe, 2)
    sys.stdout.reconfigure(line_buffering=True)  # as PYTHONUNBUFFERED in script_env
    import torch
    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))
    sys.argv = [script, *args]
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    if fsize_limit is not None:  # files cannot grow past this: a write fails (EFBIG) as on a full disk
        import resource
        import signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, fsize_limit))
    if setup:
        import importlib
        module, fn = setup.split(":")
        getattr(importlib.import_module(module), fn)()
    runpy.run_path(script, run_name="__main__")


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def start(script, args, out, err=None, env=None, cwd=ROOT, setup=None, fsize_limit=None):
    """Start `script ARGS` with stdout to `out` and stderr to `err` (default: `out`; either may
    be a FIFO). `setup`: "module:function" called in the child first (tests inject faults
    there); `fsize_limit`: RLIMIT_FSIZE in bytes. Returns the multiprocessing Process (.pid,
    .kill(), .join(), .exitcode)."""
    env = dict(script_env(), **(env or {}))
    p = context().Process(target=_child, args=(os.path.join(ROOT, script), list(map(str, args)),
                                               str(cwd), env, str(out), str(err or out), setup,
                                               fsize_limit))
    p.start()
    return p


def run(script, args, tmp_path, env=None, cwd=ROOT, timeout=300, **kw):
    """Run to the end; returns Result(returncode, stdout, stderr)."""
    n = len(list(tmp_path.glob("forkrun-*.out")))
    out, err = tmp_path / f"forkrun-{n}.out", tmp_path / f"forkrun-{n}.err"
    p = start(script, args, out, err, env=env, cwd=cwd, **kw)
    p.join(timeout)
    if p.exitcode is None:
        p.kill()
        p.join()
        raise AssertionError(f"{script} {args} did not end within {timeout} s")
    return Result(p.exitcode, out.read_text() if out.exists() else "", err.read_text() if err.exists() else "")

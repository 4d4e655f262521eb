"""A worker killed under `torchrun --max-restarts`: every restart resumes from the newest whole
checkpoint and the run ends with the weights of a run that was never killed (docs/errors.md,
"A rank that dies"). The survivors of each kill stop on their own within seconds as
`interrupted` (not preempted, not failed); no restart attempt fails or hangs.

Real torchrun, 2 gloo processes with a loader worker each. One run takes three kills, one per
attempt, each triggered by what the test reads from the run's output: rank 1 mid-step, rank 1
when the epoch's evaluation starts, and rank 0 halfway through a checkpoint write
(tests/kill_in_write.py, armed in that rank of that attempt only).
"""
import os
import re
import signal
import subprocess
import threading
import time

import pytest

from tests.helpers import ROOT, TINY, _free_port, assert_same_weights, children, run, run_record, script_env
from tests.test_faults import _ckpts, _position, _rank_of

pytestmark = pytest.mark.slow

STEPS = 8  # 128 samples, batch 8, 2 processes
ARGS = TINY + ["--synthetic_train_samples", "128", "--synthetic_val_samples", "100", "--batch_size", "8",
               "--epochs", "3", "--num_workers", "1", "--save_ckpt_minutes", "0.00001"]  # a rolling save each step
# per attempt: the kill, the output line that triggers it, the rank it kills
KILLS = [("mid-step", r"train epoch 0 \[5/8\]", 1),
         ("evaluation", r"train epoch 1 \[8/8\]", 1),   # the epoch's last step logged: its evaluation follows
         ("checkpoint write", None, 0)]                  # rank 0 kills itself halfway through its 2nd write
FAILED = re.compile(r"failed \(exitcode: (-?\d+)\) local_rank: (\d+)")
RESUMED = re.compile(r"resumed from (\S+): epoch (\d+) step (\d+)")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    ref = tmp_path_factory.mktemp("ref") / "run"
    run("main_finetune.py", ARGS + ["--output_dir", str(ref)], nproc=2)
    return ref


def _newest_whole(run_dir):
    return max((_position(run_dir / c, STEPS) for c in _ckpts(run_dir) if c != "checkpoint-best.pth"), default=0)


def test_sigkill_under_torchrun_restarts_resumes_exactly(tmp_path, reference):
    run_dir = tmp_path / "run"
    cmd = ["python", "-m", "torch.distributed.run", "--max-restarts", str(len(KILLS)), "--nproc_per_node", "2",
           "--master_port", str(_free_port()), "tests/kill_in_write.py", f"2:0:{len(KILLS) - 1}", "main_finetune.py",
           *ARGS, "--output_dir", str(run_dir)]
    p = subprocess.Popen(cmd, env=script_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    hung = threading.Timer(240, os.killpg, (p.pid, signal.SIGKILL))  # a hung attempt ends the test
    hung.start()
    lines, attempts = [], [{}]
    try:
        for line in p.stdout:
            lines.append(line)
            now, attempt = time.monotonic(), attempts[-1]
            if line.startswith("interrupted: "):
                attempt["interrupted"] = attempt.get("interrupted", 0) + 1
            m = RESUMED.search(line)
            if m:
                attempt["resumed"] = int(m.group(2)) * STEPS + int(m.group(3))
            k = len(attempts) - 1
            if "test: killing this process halfway through writing" in line:
                attempt.update(killed=now, file=os.path.basename(line.split()[-1]))
            elif k < len(KILLS) and KILLS[k][1] and "killed" not in attempt and re.search(KILLS[k][1], line):
                workers = {_rank_of(c): c for c in children(p.pid)}
                os.kill(workers[KILLS[k][2]], signal.SIGKILL)
                attempt["killed"] = now
            m = FAILED.search(line)
            if m:  # the agent has stopped every process of the attempt; the next one starts after this line
                attempt.update(failed=(int(m.group(1)), int(m.group(2))), stopped_s=now - attempt.get("killed", now),
                               newest=_newest_whole(run_dir))
                attempts.append({})
        p.wait(60)
    finally:
        hung.cancel()
    out = "".join(lines)
    assert p.returncode == 0, out[-4000:]
    for bad in ("connectFullMesh", "Connection refused", "forcefully exiting", "Traceback", "preempted"):
        assert bad not in out, (bad, out[-4000:])  # no attempt failed on its own; no survivor needed a SIGKILL
    assert len(attempts) == len(KILLS) + 1, out[-4000:]
    for k, (what, _, rank) in enumerate(KILLS):
        a, after = attempts[k], attempts[k + 1]
        assert a["failed"] == (-signal.SIGKILL, rank), (what, a, out[-4000:])  # the kill, no other failure
        assert a.get("interrupted") == 1, (what, a, out[-4000:])  # the survivor said so and stopped
        assert after["resumed"] == a["newest"], (what, a, after)  # from the newest whole checkpoint
    print("\nkill                 group stopped after  newest whole checkpoint  resumed at (steps)")
    for k, (what, _, _) in enumerate(KILLS):
        a = attempts[k]
        what += f" ({a['file']})" if "file" in a else ""
        print(f"  {what:<34} {a['stopped_s']:4.1f} s  {a['newest']:8d}  {attempts[k + 1]['resumed']:12d}")
    assert_same_weights(reference / "checkpoint-2.pth", run_dir / "checkpoint-2.pth")
    rec = run_record(run_dir)
    assert rec["status"] == "completed"
    assert [r["torchrun"]["restart_count"] for r in rec["restarts"]] == [0, 1, 2, 3]
    # how each launch before ended: the survivor rank 0 wrote interrupted; a killed rank 0 wrote nothing
    assert [(r["previous"] or {}).get("status") for r in rec["restarts"]] == [None, "interrupted", "interrupted",
                                                                              "running"]

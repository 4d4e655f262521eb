"""The training step within reach (issue 22): from a script's `main` to `optimizer.step()` the
stack holds four frames of the suite's code, main -> Trainer.fit -> train_one_epoch ->
train_step, as a reader follows it (the script's top level makes five)."""
import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT, TINY, script_env

PRE = ["--model", "convnextv2_atto", "--data_set", "synthetic", "--input_size", "64", "--synthetic_train_samples",
       "32", "--num_workers", "0", "--device", "cpu", "--warmup_epochs", "0", "--decoder_embed_dim", "64"]

_WORKER = r"""
import json, os, sys, traceback
from torch.optim.optimizer import register_optimizer_step_pre_hook
import {script}
from util.config import parse_args

root = os.getcwd() + os.sep
seen = []


def hook(optimizer, args, kwargs):
    if not seen:
        seen.append([f.name for f in traceback.extract_stack()[:-1]
                     if f.filename.startswith(root) and os.sep + "tests" + os.sep not in f.filename])


register_optimizer_step_pre_hook(hook)
{script}.main(parse_args({script}.get_args_parser(), sys.argv[1:]))
print("FRAMES " + json.dumps(seen[0]))
"""


@pytest.mark.parametrize("script", ["main_finetune", "main_pretrain"])
def test_the_step_is_four_frames_under_main(tmp_path, script):
    argv = [*(TINY if script == "main_finetune" else PRE), "--epochs", "1", "--batch_size", "16",
            "--output_dir", str(tmp_path / "run")]
    p = subprocess.run([sys.executable, "-c", _WORKER.format(script=script), *argv], cwd=ROOT, env=script_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    frames = json.loads(p.stdout.split("FRAMES ", 1)[1])
    assert frames == ["main", "fit", "train_one_epoch", "train_step"]

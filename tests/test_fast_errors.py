"""Mistakes found before any compute end in one line without importing torch, timm or the models
(issue 16, item 10): every entry point parses its flags and config and runs the cheap checks
(util/validate.check_cheap) first. Each case runs the real script under `python -X importtime`,
whose stderr lists every module the process imported."""
import os
import subprocess
import sys

import pytest

from helpers import ROOT, script_env

SCRIPTS = ["main_finetune.py", "main_pretrain.py", "submitit_finetune.py", "submitit_pretrain.py"]
HEAVY = ("torch", "timm", "torchvision", "models")  # top-level packages the cheap path must not load


def _cases(tmp):
    bad_value = tmp / "bad_value.yaml"
    bad_value.write_text("batch_size: 0\n")
    bad_type = tmp / "bad_type.yaml"
    bad_type.write_text("batch_size: many\n")
    unknown_key = tmp / "unknown_key.yaml"
    unknown_key.write_text("epochz: 3\n")
    return {
        "mistyped_flag": (["--lrr", "1e-3"], "unknown flag --lrr; did you mean --lr?"),
        "missing_data_path": (["--data_set", "image_folder", "--data_path", str(tmp / "nonexistent")],
                              f"--data_path {tmp / 'nonexistent'}: no such directory"),
        "config_value_out_of_range": (["--config", str(bad_value)], "--batch_size 0 must be >= 1"),
        "config_value_wrong_type": (["--config", str(bad_type)], "batch_size: invalid value 'many'"),
        "config_unknown_key": (["--config", str(unknown_key)], "unknown key 'epochz' (did you mean epochs?)"),
        "missing_resume_file": (["--resume", str(tmp / "nope.pth")], f"--resume {tmp / 'nope.pth'}: no such file"),
        "missing_csv_list": (["--data_set", "csv", "--data_path", str(tmp / "train.csv")],
                             f"--data_path {tmp / 'train.csv'}: no such file; give the path of the training CSV"),
    }


def _imported(stderr):
    """The top-level packages of the modules `-X importtime` lists."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":  # the header line
                names.add(name.split(".")[0])
    return names


def _run(script, argv, tmp):
    return subprocess.run([sys.executable, "-X", "importtime", os.path.join(ROOT, script), *argv,
                           "--output_dir", str(tmp / "out")], cwd=ROOT, env=script_env(),
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case", ["mistyped_flag", "missing_data_path", "config_value_out_of_range",
                                  "config_value_wrong_type", "config_unknown_key", "missing_resume_file",
                                  "missing_csv_list"])
@pytest.mark.parametrize("script", SCRIPTS)
def test_error_line_without_torch(tmp_path, script, case):
    argv, fragment = _cases(tmp_path)[case]
    r = _run(script, argv, tmp_path)
    lines = [ln for ln in r.stderr.splitlines() if not ln.startswith("import time:")]
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert fragment in lines[0], lines[0]
    loaded = _imported(r.stderr)
    assert "util" in loaded, "-X importtime listed no module: the check below would prove nothing"
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))
    assert not (tmp_path / "out").exists()


def test_heavy_checks_still_run_after_the_cheap_ones(tmp_path):
    """An unknown model needs the model zoo (and timm's names): still one line, exit 2."""
    r = _run("main_finetune.py", ["--model", "convnextv2_tinny"], tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if not ln.startswith("import time:")]
    assert lines == [lines[0]] and "unknown model 'convnextv2_tinny'" in lines[0], lines


def test_cheap_path_modules_import_no_torch():
    """What the entry points import at module level, and the data registry's cheap check, load
    no torch: the registry imports a kind's file only when the kind is used."""
    code = ("import sys, argparse, main_finetune, main_pretrain, submitit_finetune, submitit_pretrain\n"
            "import util.data\n"
            "util.data.check_paths(argparse.Namespace(data_set='csv', data_path='', eval_data_path=None))\n"
            "assert util.data.DATA_SETS == ('synthetic', 'image_folder', 'IMNET', 'CIFAR', 'csv', 'wds')\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in %r))\n" % (HEAVY,))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=script_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "[]", r.stdout


def test_registry_builds_kinds_on_use():
    """The lazy registry gives each --data_set name its kind: a file of util/data, imported once."""
    import util.data
    kinds = util.data.KINDS
    assert set(kinds) == set(util.data.DATA_SETS)
    assert kinds["IMNET"] is kinds["image_folder"] and kinds["IMNET"].__name__ == "util.data.folder"
    assert util.data.KINDS["wds"] is kinds["wds"]
    assert util.data.build_transform.__module__ == "util.data.transforms"

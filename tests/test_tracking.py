"""Weights & Biases and MLflow (util/tracking.py) against the real packages, read back through
their own readers: MLflow's MlflowClient, and for W&B `wandb leet inspect --json`, W&B's reader
of an offline run's .wandb transaction log (wandb 0.31 ships no Python reader of it; the CLI
prints each record as JSON). Nothing reaches the network: W&B offline (an online check points
at a closed local port), MLflow in a SQLite file.

One run across a SIGTERM and a resume, under a 2-process torchrun: one tracker run each, logged
by rank 0 only, every optimizer step once, the epoch metrics those of log.txt; a pretraining
run's reconstruction grid; a study's trials grouped, the pruned ones marked; a tracker that
cannot start is one line (exit 2); a plain run imports neither package (but for timm's own
import of wandb)."""
import glob
import json
import os
import signal
import subprocess
import sys

import pytest
import yaml

from tests import forkrun
from tests.helpers import ROOT, TINY, command, read_log, run_record, script_env, stop_and_resume

pytestmark = pytest.mark.slow
BOTH = ["--log_wandb", "True"]


@pytest.fixture
def stores(tmp_path, monkeypatch):
    """W&B offline with its own folders in tmp_path (its run files go into the run directory);
    the MLflow SQLite URI to give."""
    for var, sub in (("WANDB_CACHE_DIR", "wandb-cache"), ("WANDB_CONFIG_DIR", "wandb-config"),
                     ("WANDB_DATA_DIR", "wandb-data"), ("WANDB_ARTIFACT_DIR", "wandb-artifacts")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_API_KEY", "WANDB_DIR", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def wandb_launches(run_dir):
    """The records of each launch's offline W&B run, oldest first (folders are named by start time)."""
    out = []
    for folder in sorted(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*"))):
        p = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", folder],
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, check=True)
        out.append([json.loads(line) for line in p.stdout.splitlines() if line.strip()])
    return out


def of_type(records, kind):
    return [r[kind] for r in records if r["type"] == kind]


def mlflow_runs(uri, experiment="convnextv2"):
    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id])


def numbers(entry):
    return {k: v for k, v in entry.items() if isinstance(v, (int, float)) and k != "epoch"}


def test_one_tracker_run_across_sigterm_and_resume_under_torchrun(tmp_path, stores):
    # 64 images, 8 per process and step, 2 processes: 4 optimizer steps per epoch, 8 in all
    args = TINY + ["--epochs", "2", "--batch_size", "8",
                   *BOTH, "--mlflow_uri", stores, "--wandb_tags", "smoke"]
    cut = tmp_path / "cut"
    stop_and_resume(args, cut, 2, 4, signal.SIGTERM, at_step=2)
    rec, log = run_record(cut), read_log(cut)
    assert [r["resumed"] for r in rec["restarts"]] == [False, True]
    resumed_at = rec["restarts"][1]["start_step"]  # epoch 0: the optimizer step it resumed from
    ids = rec["trackers"]

    # MLflow: one run (rank 0 alone), finished; every step once; the epochs as log.txt has them
    client, found = mlflow_runs(stores)
    assert [r.info.run_id for r in found] == [ids["mlflow"]["run_id"]]
    run = found[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "cut"
    assert run.data.params["signature"] == rec["signature"] and run.data.params["batch_size"] == "8"
    assert run.data.tags["status"] == "completed" and run.data.tags["run_dir"] == str(cut)
    assert run.data.tags["checkpoint_last"] == str(cut / "checkpoint-last.pth")
    assert run.data.metrics[f"best/{rec['best_metric']['name']}"] == pytest.approx(rec["best_metric"]["value"])
    for key in ("train/loss", "train/lr", "train/grad_norm", "train/img_per_s", "train/data_wait"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == list(range(1, 9)), key
    for key in numbers(log[0]):
        history = client.get_metric_history(run.info.run_id, f"epoch/{key}")
        assert [(m.step, m.value) for m in history] == [(4 * (e + 1), pytest.approx(log[e][key])) for e in (0, 1)]

    # W&B: two launches (not four: rank 0 alone) of the same run; their steps follow on, none twice
    launches = wandb_launches(cut)
    assert len(launches) == 2
    assert {r["run_id"] for records in launches for r in of_type(records, "run")} == {ids["wandb"]["id"]}
    steps = [[h["step"]["num"] for h in of_type(records, "history")] for records in launches]
    assert steps == [list(range(1, resumed_at + 1)), list(range(resumed_at + 1, 9))]
    rows = {h["step"]["num"]: h["item"] for records in launches for h in of_type(records, "history")}
    for e in (0, 1):
        assert rows[4 * (e + 1)]["epoch"] == e
        assert {k: rows[4 * (e + 1)][f"epoch/{k}"] for k in numbers(log[e])} == pytest.approx(numbers(log[e]))
    first, last = of_type(launches[0], "run")[0], of_type(launches[1], "run")[0]
    assert first["tags"] == ["smoke"] and last["display_name"] == "cut"
    config = {k: v for records in launches for c in of_type(records, "config") for k, v in c["update"].items()}
    assert config["signature"] == rec["signature"] and config["run_dir"] == str(cut)
    summary = {k: v for records in launches for s in of_type(records, "summary") for k, v in s["update"].items()}
    assert summary["status"] == "completed" and summary["checkpoint_best"] == str(cut / "checkpoint-best.pth")
    assert [of_type(records, "exit")[0].get("exit_code", 0) for records in launches] == [0, 0]


def test_pretraining_logs_its_reconstruction_grid(tmp_path, stores):
    args = ["--model", "convnextv2_atto", "--data_set", "synthetic", "--input_size", "64",
            "--synthetic_train_samples", "32", "--batch_size", "16", "--epochs", "1", "--num_workers", "0",
            "--device", "cpu", "--print_freq", "1", "--warmup_epochs", "0", "--decoder_embed_dim", "64",
            "--vis_freq", "1", "--output_dir", str(tmp_path / "pre"), *BOTH, "--mlflow_uri", stores]
    p = forkrun.run("main_pretrain.py", args, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    client, (run,) = mlflow_runs(stores)
    images = client.list_artifacts(run.info.run_id, "images")
    assert images and all("reconstruction" in a.path for a in images)
    # beside the database, not in the folder the run started in
    assert os.path.isdir(tmp_path / "mlartifacts") and not os.path.exists(os.path.join(ROOT, "mlruns"))
    (records,) = wandb_launches(tmp_path / "pre")
    grid = [h["item"] for h in of_type(records, "history") if any(k.startswith("reconstruction") for k in h["item"])]
    assert len(grid) == 1 and json.dumps(grid).count('"image-file"') == 1


def test_study_trials_are_grouped_and_pruned_ones_marked(tmp_path, stores):
    # every trial's first test_loss is above 0.5: the ThresholdPruner stops each after epoch 0
    spec = tmp_path / "search.yaml"
    spec.write_text(yaml.safe_dump({
        "study_name": "s", "trials": 2, "seed": 0, "metric": "test_loss", "direction": "minimize",
        "sampler": {"name": "RandomSampler"}, "pruner": {"name": "ThresholdPruner", "kwargs": {"upper": 0.5}},
        "search_space": {"blr": {"type": "float", "min": 1e-3, "max": 1e-2, "log": True}}}))
    args = TINY + ["--batch_size", "16", "--epochs", "2", "--runs_root", str(tmp_path / "runs"),
                   "--optimize_config", str(spec), *BOTH, "--mlflow_uri", stores]
    p = forkrun.run("main_finetune.py", args, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    _, found = mlflow_runs(stores)
    assert len(found) == 2 and {r.data.tags["study"] for r in found} == {"s"}
    assert sorted(r.data.tags["study_trial"] for r in found) == ["0", "1"]
    assert len({r.data.params["blr"] for r in found}) == 2
    assert all(r.info.status == "KILLED" and r.data.tags["status"] == "pruned" for r in found)
    for r in found:
        (records,) = wandb_launches(r.data.tags["run_dir"])
        assert of_type(records, "run")[0]["run_group"] == "s"
        summary = {k: v for s in of_type(records, "summary") for k, v in s["update"].items()}
        assert summary["status"] == "pruned"


def _no_mlflow():
    """forkrun setup: the child cannot import mlflow, as where it is not installed."""
    sys.modules["mlflow"] = None


@pytest.mark.parametrize("case", ["no_package", "file_store", "wandb_online_no_login"])
def test_a_tracker_that_cannot_start_is_one_line(tmp_path, stores, case):
    args = TINY + ["--batch_size", "16", "--epochs", "1", "--output_dir", str(tmp_path / "run")]
    env, setup = {}, None
    if case == "wandb_online_no_login":  # no key anywhere; a W&B server address nothing listens on
        args += BOTH
        env = {"WANDB_MODE": "online", "HOME": str(tmp_path), "NETRC": str(tmp_path / "netrc"),
               "WANDB_BASE_URL": "http://127.0.0.1:9"}
        expected = "error: --log_wandb: no W&B login; run `wandb login`"
    elif case == "no_package":
        args += ["--mlflow_uri", stores]
        setup, expected = "tests.test_tracking:_no_mlflow", "error: --mlflow_uri needs the mlflow package"
    else:
        uri = f"file://{tmp_path}/mlruns"  # MLflow 3 refuses its old file store
        args += ["--mlflow_uri", uri]
        expected = f"error: --mlflow_uri {uri}: MLflow could not start ("
    p = forkrun.run("main_finetune.py", args, tmp_path, env=env, setup=setup)
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode == 2 and len(errors) == 1 and errors[0].startswith(expected), p.stderr[-2000:]
    assert "Traceback" not in p.stderr and "train epoch" not in p.stdout


def test_a_plain_run_imports_neither_tracker(tmp_path):
    # the real script under -X importtime, whose stderr lists every module the process imported
    args = TINY + ["--synthetic_train_samples", "32", "--batch_size", "16", "--epochs", "1",
                   "--output_dir", str(tmp_path / "run")]
    cmd = command("main_finetune.py", args)
    p = subprocess.run([cmd[0], "-X", "importtime", *cmd[1:]], env=script_env(), capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert p.returncode == 0 and "import time:" in p.stderr, p.stderr[-3000:]
    tree = [line.split("|")[-1] for line in p.stderr.splitlines() if line.startswith("import time:")]
    names = [m.strip() for m in tree]
    assert "torch" in names and not any(m.split(".")[0] == "mlflow" for m in names)
    # timm imports wandb itself when it is installed (timm/utils/summary.py: `try: import wandb`);
    # none of ours does. -X importtime lists a module before the one that imported it, less indented.
    for i in [i for i, m in enumerate(names) if m == "wandb"]:
        depth = len(tree[i]) - len(tree[i].lstrip())
        importer = next(m for line, m in zip(tree[i + 1:], names[i + 1:]) if len(line) - len(line.lstrip()) < depth)
        assert importer == "timm.utils.summary", importer
    assert "trackers" not in run_record(tmp_path / "run")

"""Hyperparameter search (util/hpo/): trials are ordinary runs on the built-in data; pruning,
reuse of completed runs, a pretraining study, a failed trial, a study in a database, TensorBoard
HParams read back, a study killed and started again, two workers on one journal, a torchrun study
whose pruned trial stops every rank, a Slurm submission sbatch refuses, and search files refused
before any trial."""
import argparse
import json
import os
import re
import signal
import subprocess

import optuna
import pytest
import torch
import yaml

import main_finetune
import main_pretrain
import submitit_finetune
from tests.helpers import TINY, command, read_log, run, run_record, script_env
from util import hpo, runs, slurm
from util.config import parse_args
from util.errors import UserError

pytestmark = pytest.mark.slow
optuna.logging.set_verbosity(optuna.logging.WARNING)

BASE = TINY + ["--batch_size", "16", "--epochs", "2"]


def write_spec(path, **over):
    spec = {"study_name": "s", "trials": 2, "seed": 0, "metric": "test_loss", "direction": "minimize",
            "sampler": {"name": "RandomSampler"}, "pruner": {"name": "NopPruner"},
            "search_space": {"blr": {"type": "float", "min": 1e-3, "max": 1e-2, "log": True}}}
    spec.update(over)
    with open(path, "w") as f:
        yaml.safe_dump(spec, f)
    return str(path)


def flags(tmp_path, spec, extra=()):
    return BASE + ["--runs_root", str(tmp_path / "runs"), "--optimize_config", spec, *extra]


PRE = ["--model", "convnextv2_atto", "--data_set", "synthetic", "--input_size", "64",
       "--synthetic_train_samples", "32", "--batch_size", "16", "--epochs", "2", "--num_workers", "0",
       "--device", "cpu", "--print_freq", "1", "--warmup_epochs", "0", "--decoder_embed_dim", "64"]


def optimize_here(argv, kind="finetune"):
    """The study in this process (faster than a subprocess: no imports to repeat); one thread,
    as the subprocesses (tests/helpers.script_env) on these shared cores."""
    module = main_finetune if kind == "finetune" else main_pretrain
    args = parse_args(module.get_args_parser(), argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return hpo.optimize(args, kind)
    finally:
        torch.set_num_threads(threads)


def load(tmp_path, name="s", storage=None):
    sdir = tmp_path / "runs" / "studies" / name
    return optuna.load_study(study_name=name, storage=hpo.open_storage(storage, str(sdir))), sdir


def hparams_sessions(sdir):
    """What TensorBoard's HParams tab shows for the study: {trial number: (hparams, metrics)},
    read back from the event files (tensorboard's own reader and hparams metadata parser)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata
    out = {}
    for name in sorted(os.listdir(sdir / "tensorboard")):
        acc = EventAccumulator(str(sdir / "tensorboard" / name))
        acc.Reload()
        content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
        start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
        hp = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
        metrics = {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
        out[int(name.split("-")[1])] = (hp, metrics)
    return out


def test_study_prunes_and_reuses(tmp_path, capsys):
    # Two of six learning rates are absurd: their test loss explodes after one epoch and the
    # ThresholdPruner stops them; the grid makes the six trials exactly these six values.
    grid = [1e-3, 2e-3, 4e-3, 8e-3, 40.0, 80.0]
    spec = write_spec(tmp_path / "search.yaml", trials=6, sampler={"name": "GridSampler"},
                      pruner={"name": "ThresholdPruner", "kwargs": {"upper": 10.0}},
                      search_space={"blr": {"type": "categorical", "choices": grid}})
    assert optimize_here(flags(tmp_path, spec)) == 0
    study, sdir = load(tmp_path)
    trials = study.get_trials()
    assert [t.number for t in trials] == list(range(6))
    by_blr = {t.params["blr"]: t for t in trials}
    assert sorted(by_blr) == sorted(grid)
    for blr in (40.0, 80.0):
        t = by_blr[blr]
        assert t.state.name == "PRUNED" and list(t.intermediate_values) == [0]
        rec = run_record(t.user_attrs["run_dir"])
        assert rec["status"] == "pruned" and "ThresholdPruner" in rec["reason"]
        assert rec["study"] == {"name": "s", "trial": t.number, "params": {"blr": blr}, "dir": str(sdir)}
    done = [by_blr[b] for b in grid[:4]]
    assert all(t.state.name == "COMPLETE" and sorted(t.intermediate_values) == [0, 1] for t in done)
    assert len({t.user_attrs["run_dir"] for t in trials}) == 6  # one run each
    out = capsys.readouterr().out
    best = study.best_trial
    assert f"best trial {best.number}: test_loss {best.value:.6g}" in out
    # best.yaml is the best run's config: as --config it names that very run
    again = parse_args(main_finetune.get_args_parser(), ["--config", str(sdir / "best.yaml")])
    assert again.blr == best.params["blr"] and again.epochs == 2
    assert sorted(os.listdir(sdir / "tensorboard")) == [f"trial-{n:04d}" for n in range(6)]

    # A second study over two of the completed settings trains nothing: both trials reuse.
    spec2 = write_spec(tmp_path / "again.yaml", study_name="s2", trials=2, sampler={"name": "GridSampler"},
                       search_space={"blr": {"type": "categorical", "choices": grid[:2]}})
    assert optimize_here(flags(tmp_path, spec2)) == 0
    study2, _ = load(tmp_path, "s2")
    for t in study2.get_trials():
        first = by_blr[t.params["blr"]]
        assert t.state.name == "COMPLETE" and t.user_attrs["reused"] is True
        assert t.value == pytest.approx(first.value)
        assert t.user_attrs["run_dir"] == first.user_attrs["run_dir"]
        assert len(run_record(t.user_attrs["run_dir"])["restarts"]) == 1  # not trained again


def test_pretrain_study_writes_best_yaml_and_hparams(tmp_path, capsys):
    # Pretraining has no evaluation: the metric is the epoch's train loss (docs/search.md).
    spec = write_spec(tmp_path / "search.yaml", metric="train_loss", search_space={
        "blr": {"type": "float", "min": 1e-3, "max": 1e-2, "log": True},
        "mask_ratio": {"type": "categorical", "choices": [0.5, 0.7]}})
    assert optimize_here(PRE + ["--runs_root", str(tmp_path / "runs"), "--optimize_config", spec],
                         "pretrain") == 0
    study, sdir = load(tmp_path)
    trials = study.get_trials()
    assert [(t.number, t.state.name) for t in trials] == [(0, "COMPLETE"), (1, "COMPLETE")]
    for t in trials:  # a trial's value: the best train_loss over its run's epochs
        run_dir = t.user_attrs["run_dir"]
        assert os.path.dirname(run_dir) == str(tmp_path / "runs" / "pretrain")
        assert t.value == pytest.approx(min(e["train_loss"] for e in read_log(run_dir)))
        assert run_record(run_dir)["study"]["params"] == t.params
    best = study.best_trial
    out = capsys.readouterr().out
    assert "2 finished trials (2 complete, 0 pruned, 0 failed)" in out
    assert f"best trial {best.number}: train_loss {best.value:.6g}" in out
    # best.yaml as --config names that very run (floats are rounded to 12 digits for the flags)
    again = parse_args(main_pretrain.get_args_parser(), ["--config", str(sdir / "best.yaml")])
    assert again.blr == pytest.approx(best.params["blr"], rel=1e-11) and again.mask_ratio == best.params["mask_ratio"]
    assert runs.run_name(again, 1, "pretrain") == os.path.basename(best.user_attrs["run_dir"])
    # the HParams tab: every trial with its sampled values, its state and its value
    sessions = hparams_sessions(sdir)
    assert sorted(sessions) == [0, 1]
    for t in trials:
        hp, metrics = sessions[t.number]
        assert hp["blr"] == pytest.approx(t.params["blr"])
        assert hp["mask_ratio"] == str(t.params["mask_ratio"])  # categorical: shown as text
        assert hp["trial_state"] == "COMPLETE"
        assert metrics == {"hparams/train_loss": [pytest.approx(t.value)]}


def test_failed_trial_keeps_its_run_and_the_study_goes_on(tmp_path, capsys):
    # blr 1e30 makes the first step's loss non-finite: that trial (trial 0 with seed 0) fails,
    # keeps its run with the reason, and the study trains the next one.
    spec = write_spec(tmp_path / "search.yaml", sampler={"name": "GridSampler"},
                      search_space={"blr": {"type": "categorical", "choices": [2e-3, 1e30]}})
    assert optimize_here(flags(tmp_path, spec, ["--epochs", "1"])) == 0
    study, sdir = load(tmp_path)
    failed, done = study.get_trials()
    assert (failed.state.name, failed.params, done.state.name) == ("FAIL", {"blr": 1e30}, "COMPLETE"), \
        "expected the grid to try blr 1e30 first (GridSampler, seed 0)"
    rec = run_record(failed.user_attrs["run_dir"])
    assert rec["status"] == "failed" and "loss is not finite" in rec["reason"]
    assert rec["study"]["trial"] == 0 and "loss is not finite" in failed.user_attrs["reason"]
    assert run_record(done.user_attrs["run_dir"])["status"] == "completed"
    out = capsys.readouterr().out
    assert "2 finished trials (1 complete, 0 pruned, 1 failed)" in out
    assert f"best trial 1: test_loss {done.value:.6g}" in out
    sessions = hparams_sessions(sdir)  # a failed trial is in the HParams tab too, without a value
    assert sessions[0] == ({"blr": "1e+30", "trial_state": "FAIL"}, {})  # categorical: as text
    assert sessions[1][0]["trial_state"] == "COMPLETE"
    assert sessions[1][1] == {"hparams/test_loss": [pytest.approx(done.value)]}


def test_database_storage_continues_the_study(tmp_path, capsys):
    # --storage sqlite:///... (Optuna's RDB storage): the study is in the database, not in a
    # journal file; started again with more trials it runs only the new one.
    url = f"sqlite:///{tmp_path}/s.db"
    spec = write_spec(tmp_path / "search.yaml", trials=1)
    argv = flags(tmp_path, spec, ["--epochs", "1", "--storage", url])
    assert optimize_here(argv) == 0
    write_spec(tmp_path / "search.yaml", trials=2)
    capsys.readouterr()
    assert optimize_here(argv) == 0
    out = capsys.readouterr().out
    assert "trial 0 started" not in out and "trial 1 started" in out
    assert "2 finished trials (2 complete, 0 pruned, 0 failed)" in out
    study, sdir = load(tmp_path, storage=url)
    assert [(t.number, t.state.name) for t in study.get_trials()] == [(0, "COMPLETE"), (1, "COMPLETE")]
    assert not (sdir / "journal.log").exists() and (sdir / "best.yaml").exists()


class _QueuedJob:
    """A submitted job that stays in the queue."""
    job_id = "4242"
    paths = argparse.Namespace(folder="/nonexistent")

    def done(self):
        return False


class _RefusingExecutor:
    """Takes the first job; then sbatch refuses (say a bad --slurm_extra): what submitit raises."""
    submitted = 0

    def submit(self, fn):
        from submitit.core.utils import FailedSubmissionError
        _RefusingExecutor.submitted += 1
        if _RefusingExecutor.submitted > 1:
            raise FailedSubmissionError("sbatch: error: Invalid --mail-type specification")
        return _QueuedJob()


def test_refused_trial_job_ends_the_search_in_one_line(tmp_path, capsys, monkeypatch):
    # Two trials in flight: the first is queued, sbatch refuses the second. The search ends at
    # once with sbatch's reason in one line (exit 2): the refused trial is FAIL with that reason
    # and leaves no run directory; the queued one is left to its job, which tells the study.
    monkeypatch.setattr(slurm, "make_executor", lambda *a, **k: _RefusingExecutor())
    monkeypatch.setattr(_RefusingExecutor, "submitted", 0)
    spec = write_spec(tmp_path / "search.yaml", trials=4)
    launch = ["--cluster", "local", "--nodes", "1", "--ngpus", "1", "--parallel", "2"]
    with pytest.raises(SystemExit) as e:
        submitit_finetune.main(launch + flags(tmp_path, spec))
    assert e.value.code == 2
    out, err = capsys.readouterr()
    err = err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: trial ") and \
        "sbatch refused the job: sbatch: error: Invalid --mail-type specification" in err[0], err
    study, _ = load(tmp_path)
    states = {t.state.name: t for t in study.get_trials()}
    assert sorted(states) == ["FAIL", "RUNNING"]  # no third trial was taken
    refused, queued = states["FAIL"], states["RUNNING"]
    assert "Invalid --mail-type" in refused.user_attrs["reason"]
    assert f"trial {queued.number}: the search stops; job 4242 goes on" in out
    left = os.listdir(tmp_path / "runs" / "finetune")
    assert len(left) == 1 and os.path.isfile(tmp_path / "runs" / "finetune" / left[0] / "slurm" / "job.json")


def _wait_for_line(proc, needle, seen):
    for line in proc.stdout:
        seen.append(line)
        if needle in line:
            return
    raise AssertionError(f"the study ended before {needle!r}:\n{''.join(seen[-40:])}")


def test_killed_study_continues_with_the_same_trials(tmp_path):
    spec = write_spec(tmp_path / "search.yaml", trials=4)
    proc = subprocess.Popen(command("main_finetune.py", flags(tmp_path, spec)), env=script_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    try:
        _wait_for_line(proc, "trial 1 COMPLETE", seen)
        _wait_for_line(proc, "trial 2 started", seen)
        _wait_for_line(proc, "train epoch 1 ", seen)  # trial 2's epoch 0 is checkpointed
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    study, _ = load(tmp_path)
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE", "COMPLETE", "RUNNING"]

    p = run("main_finetune.py", flags(tmp_path, spec))
    assert "trial 2 resumed" in p.stdout and "checkpoint-0.pth: epoch 1" in p.stdout
    study, _ = load(tmp_path)
    trials = study.get_trials()
    assert [(t.number, t.state.name) for t in trials] == [(n, "COMPLETE") for n in range(4)]
    resumed = run_record(trials[2].user_attrs["run_dir"])
    assert [r["resumed"] for r in resumed["restarts"]] == [False, True]
    assert sorted(trials[2].intermediate_values) == [0, 1]
    # started again once complete: nothing more to do
    p = run("main_finetune.py", flags(tmp_path, spec))
    assert "started" not in p.stdout and "4 finished trials (4 complete, 0 pruned, 0 failed)" in p.stdout


def test_two_workers_share_one_journal(tmp_path):
    spec = write_spec(tmp_path / "search.yaml", trials=5, search_space={
        "blr": {"type": "float", "min": 1e-3, "max": 1e-2, "log": True},
        "drop_path": {"type": "float", "min": 0.0, "max": 0.3}})
    argv = flags(tmp_path, spec, ["--epochs", "1"])
    procs = [subprocess.Popen(command("main_finetune.py", argv), env=script_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    study, _ = load(tmp_path)
    trials = study.get_trials()
    assert sorted(t.number for t in trials) == list(range(5))
    assert all(t.state.name == "COMPLETE" for t in trials)
    runs_ = [t.user_attrs["run_dir"] for t in trials]
    assert len(set(runs_)) == 5
    for t in trials:
        assert run_record(t.user_attrs["run_dir"])["study"]["trial"] == t.number
    started = [sum(f"trial {n} started" in out for out in outs) for n in range(5)]
    assert started == [1] * 5  # each trial trained by exactly one worker
    assert len({t.user_attrs["worker"] for t in trials}) == 2, outs  # both took part


def test_torchrun_study_prunes_on_every_rank(tmp_path):
    spec = write_spec(tmp_path / "search.yaml", trials=2, sampler={"name": "GridSampler"},
                      pruner={"name": "ThresholdPruner", "kwargs": {"upper": 10.0}},
                      search_space={"blr": {"type": "categorical", "choices": [80.0, 2e-3]}})
    p = run("main_finetune.py", flags(tmp_path, spec, ["--batch_size", "8"]), nproc=2)
    study, _ = load(tmp_path)
    states = {t.params["blr"]: t.state.name for t in study.get_trials()}
    assert states == {80.0: "PRUNED", 2e-3: "COMPLETE"}, p.stdout
    for t in study.get_trials():
        assert run_record(t.user_attrs["run_dir"])["world_size"] == 2


BAD = [
    ({"trails": 3}, "unknown key 'trails' (did you mean trials?)"),
    ({"search_space": {"blrr": {"type": "float", "min": 1, "max": 2}}}, "'blrr' is not a flag of this script"),
    ({"search_space": {"blr": {"type": "real", "min": 1, "max": 2}}}, "type must be int, float or categorical"),
    ({"search_space": {"blr": {"type": "float", "min": 2, "max": 1}}}, "min 2.0 is above max 1.0"),
    ({"search_space": {"blr": {"type": "float", "min": 0, "max": 1, "log": True}}}, "log: true needs min > 0"),
    ({"search_space": {"blr": {"type": "float", "min": 1, "max": 2, "choices": [1]}}}, "unknown key 'choices'"),
    ({"search_space": {"epochs": {"type": "float", "min": 1, "max": 2}}}, "takes a whole number; use type: int"),
    ({"search_space": {"num_workers": {"type": "int", "min": 1, "max": 2}}}, "not part of the run signature"),
    ({"search_space": {"drop_path": {"type": "float", "min": 0, "max": 1.5}}}, "drop_path = 1.5 is refused"),
    ({"search_space": {"model_ema": {"type": "categorical", "choices": [True, "maybe"]}}}, "expected a boolean"),
    ({"sampler": {"name": "TPESamplr"}}, "unknown optuna.samplers class 'TPESamplr'"),
    ({"pruner": {"name": "MedianPruner", "kwargs": {"n_startup": 1}}}, "pruner MedianPruner:"),
    ({"metric": "test_acc"}, "metric 'test_acc' is not in the per-epoch log"),
    ({"direction": "max"}, "direction must be maximize or minimize"),
    ({"trials": 0}, "trials must be >= 1"),
]


@pytest.mark.parametrize("over,message", BAD, ids=[m[:30] for _, m in BAD])
def test_bad_search_file_fails_before_any_trial(tmp_path, capsys, over, message):
    spec = write_spec(tmp_path / "search.yaml", **over)
    with pytest.raises(SystemExit) as e:
        optimize_here(flags(tmp_path, spec))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "runs" / "studies").exists()  # no study, no run
    assert not os.listdir(tmp_path / "runs" / "finetune") if (tmp_path / "runs").exists() else True


@pytest.mark.parametrize("extra,message", [
    (["--output_dir", "x"], "--output_dir names one run"),
    (["--lr", "0.1"], "blr has no effect while --lr"),
])
def test_launch_flags_that_name_one_run_are_refused(tmp_path, capsys, extra, message):
    spec = write_spec(tmp_path / "search.yaml")
    with pytest.raises(SystemExit) as e:
        optimize_here(flags(tmp_path, spec, extra))
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_bad_search_file_from_the_command_line(tmp_path):
    spec = write_spec(tmp_path / "search.yaml", search_space={"blr": {"type": "float", "min": 2, "max": 1}})
    p = run("main_finetune.py", flags(tmp_path, spec), check=False)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [f"error: {spec}: search_space.blr: min 2.0 is above max 1.0"]
    assert not (tmp_path / "runs" / "studies").exists()


def test_sampler_seeding_and_study_conflicts(tmp_path):
    path = write_spec(tmp_path / "search.yaml", sampler={"name": "TPESampler"})
    args = parse_args(main_finetune.get_args_parser(), flags(tmp_path, path))
    spec = hpo.prepare(args, "finetune")
    assert hpo.make_sampler(spec, 3)._rng.rng.randint(1 << 30) == \
        optuna.samplers.TPESampler(seed=3)._rng.rng.randint(1 << 30)
    grid = hpo.make_sampler(hpo.SearchSpec(**{**spec.__dict__, "sampler": ("GridSampler", {}),
                                              "params": {"drop_path": hpo.Param("drop_path", "categorical",
                                                                                choices=[0.0, 0.1])}}), 5)
    assert grid._search_space == {"drop_path": [0.0, 0.1]}
    sdir = hpo.study_dir(args, spec)
    hpo.open_study(args, spec, sdir, "finetune")
    other = hpo.SearchSpec(**{**spec.__dict__, "metric": "test_acc1", "direction": "minimize"})
    with pytest.raises(UserError, match="exists with metric test_loss"):
        hpo.open_study(args, other, sdir, "finetune")
    flipped = hpo.SearchSpec(**{**spec.__dict__, "direction": "maximize"})
    with pytest.raises(UserError, match="exists with direction minimize"):
        hpo.open_study(args, flipped, sdir, "finetune")
    with open(os.path.join(sdir, "journal.log")) as f:
        assert all(json.loads(line) for line in f)


def test_sampler_and_pruner_by_name_or_dotted_path():
    """`optuna.samplers.TPESampler` is the class `TPESampler` names, seeded the same way."""
    import types
    from util.hpo.samplers import make_pruner, make_sampler

    def spec(sampler, pruner="NopPruner"):
        return types.SimpleNamespace(path="s.yaml", seed=1, sampler=(sampler, {}), pruner=(pruner, {}), params={})
    for name in ("TPESampler", "optuna.samplers.TPESampler"):
        s = make_sampler(spec(name), 3)
        assert type(s) is optuna.samplers.TPESampler
        assert s._rng.rng.randint(1 << 30) == optuna.samplers.TPESampler(seed=4)._rng.rng.randint(1 << 30)
    assert type(make_pruner(spec("RandomSampler", "optuna.pruners.MedianPruner"))) is optuna.pruners.MedianPruner
    for name, message in (("optuna.samplers.TPESamplr", "unknown optuna.samplers class 'TPESamplr'; choose one of"),
                          ("optuna.pruners.MedianPruner", "'optuna.pruners.MedianPruner' is no optuna.samplers class (a "
                                                          "subclass of BaseSampler); choose one of"),
                          ("no_such_module.MySampler", "cannot import 'no_such_module' for 'no_such_module.MySampler'")):
        with pytest.raises(UserError, match=re.escape(message)):
            make_sampler(spec(name))


@pytest.mark.slurm
def test_parallel_study_on_slurm(tmp_path, slurm_cluster):
    """submitit_finetune.py --optimize_config --parallel 2 on the test cluster: each trial a job,
    two in flight at once, one of them pruned inside its job."""
    spec = write_spec(tmp_path / "search.yaml", trials=3, sampler={"name": "GridSampler"},
                      pruner={"name": "ThresholdPruner", "kwargs": {"upper": 10.0}},
                      search_space={"blr": {"type": "categorical", "choices": [1e-3, 80.0, 2e-3]}})
    slurm_flags = ["--nodes", "1", "--ngpus", "1", "--gpus_per_node", "0", "--cpus_per_task", "1",
                   "--mem_gb", "1", "--timeout", "10", "--parallel", "2"]
    p = subprocess.run(command("submitit_finetune.py", slurm_flags + flags(tmp_path, spec)), env=script_env(),
                       cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    study, sdir = load(tmp_path)
    trials = study.get_trials()
    assert {t.params["blr"]: t.state.name for t in trials} == {1e-3: "COMPLETE", 80.0: "PRUNED", 2e-3: "COMPLETE"}
    jobs = [run_record(t.user_attrs["run_dir"])["slurm"]["job_id"] for t in trials]
    assert len(set(jobs)) == 3
    lines = p.stdout.splitlines()
    first_done = min(i for i, ln in enumerate(lines) if ln.endswith(")") and ("COMPLETE (job" in ln or "PRUNED (job" in ln))
    assert sum("submitted as job" in ln for ln in lines[:first_done]) == 2, p.stdout  # two in flight
    acct = subprocess.run(["sacct", "-X", "-n", "-P", "-j", ",".join(jobs), "-o", "JobID,State,Start,End"],
                          capture_output=True, text=True).stdout.split()
    acct = {row.split("|")[0]: row.split("|")[1:] for row in acct}
    assert all(acct[j][0] == "COMPLETED" for j in jobs), acct  # a pruned trial's job ends well too
    (_, s0, e0), (_, s1, e1) = acct[jobs[0]], acct[jobs[1]]
    assert s0 <= e1 and s1 <= e0, acct  # the first two jobs ran at the same time
    assert (sdir / "best.yaml").exists()

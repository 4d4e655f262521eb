"""util/runs.py: signatures, run directories, run.json and `python -m util.runs`."""
import argparse
import json
import os
import subprocess
import sys

import pytest

from util import runs
from util.config import add_config_args, parse_args, save_config, str2bool

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_parser():
    """Shaped like the real scripts' parser (a few original flags, run-management flags)."""
    p = argparse.ArgumentParser()
    a = p.add_argument
    a("--batch_size", default=64, type=int)
    a("--update_freq", default=1, type=int)
    a("--epochs", default=10, type=int)
    a("--model", default="convnextv2_atto")
    a("--lr", type=float, default=None)
    a("--blr", type=float, default=5e-4)
    a("--mixup", type=float, default=0)
    a("--model_ema", type=str2bool, default=False)
    a("--num_workers", default=10, type=int)
    a("--pin_mem", type=str2bool, default=True)
    a("--device", default="auto")
    a("--output_dir", default="")
    a("--runs_root", default="runs")
    a("--world_size", default=1, type=int)
    a("--local_rank", "--local-rank", dest="local_rank", default=-1, type=int)
    a("--force", action="store_true")
    a("--channels_last", type=str2bool, nargs="?", const=True, default=False)
    p.set_defaults(eval=False)  # as pretraining's parser fixes a flag it lacks (util/flags.Flag.fixed)
    add_config_args(p)
    return p


def args_of(*argv):
    return parse_args(make_parser(), list(argv))


def sig(*argv, world_size=1, kind="finetune"):
    return runs.signature(args_of(*argv), world_size, kind)


# ---------------------------------------------------------------- signature

def test_global_batch_rule():
    one = sig("--batch_size", "64")
    assert one == sig("--batch_size", "32", world_size=2)
    assert one == sig("--batch_size", "32", "--update_freq", "2")
    assert one == sig("--batch_size", "16", "--update_freq", "2", world_size=2)
    assert one != sig("--batch_size", "32")
    assert runs.settings(args_of("--batch_size", "32"), 4, "finetune")["global_batch"] == 128


def test_outcome_neutral_flags_keep_signature():
    base = sig()
    for argv in (["--num_workers", "2"], ["--output_dir", "/x"], ["--device", "cpu"],
                 ["--pin_mem", "False"], ["--runs_root", "elsewhere"], ["--force"],
                 ["--channels_last"], ["--world_size", "8"], ["--local-rank", "3"]):
        assert sig(*argv) == base, argv
    a = args_of()
    a.rank, a.gpu, a.distributed, a.device = 1, 1, True, "cuda:1"  # util/distributed.py's
    assert runs.signature(a, 1, "finetune") == base
    assert sig("--mixup", "0") == sig("--mixup", "0.0") == base  # int default vs float value


def test_outcome_flags_change_signature():
    base = sig()
    for argv in (["--lr", "1e-3"], ["--blr", "1e-3"], ["--model", "convnextv2_tiny"],
                 ["--epochs", "11"], ["--model_ema", "True"], ["--mixup", "0.8"]):
        assert sig(*argv) != base, argv
    assert sig(kind="pretrain") != base


def test_only_the_effective_lr_counts():
    base = sig()  # blr 5e-4, global batch 64: lr 1.25e-4
    assert sig("--lr", "1.25e-4") == base
    assert sig("--lr", "1.25e-4", "--blr", "9") == base  # blr is unused when lr is given
    assert sig("--blr", "1e-3") == sig("--lr", "2.5e-4") != base
    assert sig("--blr", "1e-3", "--batch_size", "32", "--update_freq", "2") == sig("--blr", "1e-3")
    a = args_of("--batch_size", "32")
    s = runs.signature(a, 2, "finetune")
    a.lr = a.blr * a.batch_size * a.update_freq * 2 / 256  # what util/optim.resolve_lr does
    assert runs.signature(a, 2, "finetune") == s == base


def test_unknown_flags_count():
    p = make_parser()
    p.add_argument("--brand_new", default=1, type=int)
    a, b = parse_args(p, []), parse_args(p, ["--brand_new", "2"])
    assert runs.signature(a, 1, "finetune") != runs.signature(b, 1, "finetune")


def test_plain_namespace_signature_skips_runtime_attrs():
    ns = argparse.Namespace(**vars(args_of()))  # no record of the parser's flags
    ns.rank, ns.gpu = 0, 0
    assert runs.signature(ns, 1, "finetune") == sig()


def test_signature_shape():
    s = sig()
    assert len(s) == 64 and int(s, 16) >= 0
    assert runs.run_name(args_of("--model", "hf-hub:x/y"), 1, "finetune").startswith("hf-hub_x_y-")
    with pytest.raises(ValueError):
        runs.signature(args_of(), 1, "train")


def test_saved_config_gives_same_signature(tmp_path):
    a = args_of("--lr", "1.5e-4", "--mixup", "0.8", "--output_dir", str(tmp_path / "r"))
    save_config(a, str(tmp_path / "config.yaml"))
    again = args_of("--config", str(tmp_path / "config.yaml"))
    assert runs.signature(again, 1, "finetune") == runs.signature(a, 1, "finetune")


# ---------------------------------------------------------------- run directories

def test_run_dir_naming(tmp_path):
    a = args_of("--runs_root", str(tmp_path))
    d = runs.prepare_run_dir(a, "finetune", 1)
    s = runs.signature(a, 1, "finetune")
    assert d == os.path.join(str(tmp_path), "finetune", f"convnextv2_atto-{s[:10]}")
    assert os.path.isdir(d)
    assert runs.prepare_run_dir(a, "finetune", 1) == d  # same settings: same place, to resume


def test_default_root_is_relative_to_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = argparse.Namespace(model="m", batch_size=8, epochs=1, output_dir="", runs_root="", force=False,
                            eval=False)  # no runs_root
    d = runs.prepare_run_dir(ns, "pretrain", 1)
    assert d.startswith(os.path.join("runs", "pretrain", "m-")) and os.path.isdir(tmp_path / d)


def test_explicit_output_dir_used_as_is(tmp_path):
    out = str(tmp_path / "mine" / "here")
    assert runs.prepare_run_dir(args_of("--output_dir", out), "finetune", 1) == out
    assert os.path.isdir(out)


def complete(run_dir, args, best=84.9):
    r = runs.RunRecord(run_dir, args, "finetune")
    r.start()
    r.update(epoch=10, step=0, best_metric=best)
    r.finish("completed")


def test_completed_run_refused_then_force(tmp_path):
    a = args_of("--runs_root", str(tmp_path))
    d = runs.prepare_run_dir(a, "finetune", 1)
    complete(d, a)
    with pytest.raises(runs.RunCompleted) as e:
        runs.prepare_run_dir(a, "finetune", 1)
    msg = str(e.value)
    assert d in msg and "complete" in msg and "acc1 84.9" in msg and "--force" in msg
    assert e.value.run_dir == d and e.value.record["status"] == "completed"
    assert isinstance(e.value, Exception)

    forced = args_of("--runs_root", str(tmp_path), "--force")
    d2 = runs.prepare_run_dir(forced, "finetune", 1)
    assert d2 == d + "-r2" and os.path.isdir(d2)
    # relaunching without --force finds the newest sibling, to resume it
    assert runs.prepare_run_dir(a, "finetune", 1) == d2
    complete(d2, a, best=85.0)
    with pytest.raises(runs.RunCompleted, match="-r2"):
        runs.prepare_run_dir(a, "finetune", 1)
    assert runs.prepare_run_dir(forced, "finetune", 1) == d + "-r3"


def test_completed_run_can_be_evaluated(tmp_path):
    p = make_parser()
    p.add_argument("--eval", type=str2bool, default=False)
    a = parse_args(p, ["--runs_root", str(tmp_path)])
    d = runs.prepare_run_dir(a, "finetune", 1)
    complete(d, a)
    e = parse_args(p, ["--runs_root", str(tmp_path), "--eval", "True"])
    assert runs.prepare_run_dir(e, "finetune", 1) == d


def test_unfinished_run_is_resumed_not_refused(tmp_path):
    a = args_of("--runs_root", str(tmp_path))
    d = runs.prepare_run_dir(a, "finetune", 1)
    r = runs.RunRecord(d, a, "finetune")
    r.start()
    r.finish("preempted")
    assert runs.prepare_run_dir(a, "finetune", 1) == d


# ---------------------------------------------------------------- run.json

def test_record_fields(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    a = args_of("--batch_size", "32")
    d = str(tmp_path / "run")
    r = runs.RunRecord(d, a, "finetune", world_size=2, hostnames=["n1", "n2"])
    r.start(resumed=False, start_epoch=0, start_step=0, finetune="ckpt.pth", study="s1")
    j = runs.RunRecord.load(d)
    assert j["status"] == "running" and j["kind"] == "finetune" and j["name"] == "run"
    assert j["signature"] == runs.signature(a, 2, "finetune")
    assert j["world_size"] == 2 and j["hostnames"] == ["n1", "n2"]
    assert j["slurm"] == {"job_id": "123", "restart_count": 2}
    assert set(j["versions"]) == {"python", "torch", "timm", "cuda", "cudnn"}
    assert j["versions"]["python"] and j["total_epochs"] == 10
    assert "git_commit" in j and "git_dirty" in j and j["command"]
    assert j["finetune"] == "ckpt.pth" and j["study"] == "s1"
    assert j["started"] and j["updated"] and j["ended"] is None
    assert len(j["restarts"]) == 1 and j["restarts"][0]["resumed"] is False

    assert r.signature == j["signature"]
    r.update(epoch=3, step=40, best_metric=71.5, bad_images=2)
    j = runs.RunRecord.load(d)
    assert j["epoch"] == 3 and j["step"] == 40 and j["bad_images"] == 2
    assert j["best_metric"] == {"name": "acc1", "value": 71.5}
    r.update(best_metric={"name": None, "value": None, "epoch": None})  # nothing known yet
    assert runs.RunRecord.load(d)["best_metric"] == {"name": "acc1", "value": 71.5}
    r.update(best_metric={"name": "test_acc1_ema", "value": 72, "epoch": 3})
    assert runs.RunRecord.load(d)["best_metric"] == {"name": "test_acc1_ema", "value": 72.0,
                                                     "epoch": 3}
    r.finish("failed", reason="RuntimeError: boom")
    j = runs.RunRecord.load(d)
    assert j["status"] == "failed" and j["reason"] == "RuntimeError: boom" and j["ended"]
    assert [f for f in os.listdir(d) if f != "run.json"] == []  # no temporary files left


def test_restart_keeps_earlier_fields(tmp_path):
    a, d = args_of(), str(tmp_path / "run")
    r = runs.RunRecord(d, a, "pretrain")
    r.start(finetune_signature="abc")
    r.update(epoch=4, step=7, best_metric=0.31)
    r.finish("preempted")
    first = runs.RunRecord.load(d)

    r2 = runs.RunRecord(d, a, "pretrain", world_size=1)
    r2.start(resumed=True, start_epoch=4, start_step=7)
    j = runs.RunRecord.load(d)
    assert j["status"] == "running" and j["started"] == first["started"]
    assert j["best_metric"] == {"name": "loss", "value": 0.31}
    assert j["finetune_signature"] == "abc" and j["ended"] is None
    assert [(s["resumed"], s["start_epoch"], s["start_step"]) for s in j["restarts"]] == \
        [(False, 0, 0), (True, 4, 7)]
    r2.update(best_metric=0.30)
    assert runs.RunRecord.load(d)["best_metric"]["name"] == "loss"


def test_record_misuse(tmp_path):
    r = runs.RunRecord(str(tmp_path), args_of(), "finetune")
    with pytest.raises(ValueError):
        r.start(status="completed")  # reserved field
    with pytest.raises(ValueError):
        r.finish("done")


def test_only_main_writes(tmp_path):
    r = runs.RunRecord(str(tmp_path / "run"), args_of(), "finetune", is_main=False)
    r.start()
    r.update(epoch=1)
    r.finish("completed")
    assert not os.path.exists(tmp_path / "run" / "run.json")
    assert runs.RunRecord.load(str(tmp_path / "run")) is None


def test_unreadable_record_is_a_user_error(tmp_path):
    (tmp_path / "run.json").write_text("{half")
    from util.errors import UserError
    with pytest.raises(UserError, match="run.json"):
        runs.RunRecord.load(str(tmp_path))


# ---------------------------------------------------------------- CLI

def cli(*argv, cwd=REPO):
    p = subprocess.run([sys.executable, "-m", "util.runs", *argv], cwd=cwd,
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": REPO})
    return p.returncode, p.stdout, p.stderr


@pytest.fixture
def three_runs(tmp_path):
    root = tmp_path / "runs"
    made = {}
    for model, status, epoch in (("convnextv2_atto", "completed", 10),
                                 ("convnextv2_tiny", "running", 2),
                                 ("convnextv2_nano", "failed", 0)):
        a = args_of("--runs_root", str(root), "--model", model)
        d = runs.prepare_run_dir(a, "finetune", 1)
        save_config(a, os.path.join(d, "config.yaml"))
        r = runs.RunRecord(d, a, "finetune")
        r.start()
        r.update(epoch=epoch, best_metric=50.0 + epoch)
        if status != "running":
            r.finish(status, reason="boom" if status == "failed" else None)
        made[model] = d
    return str(root), made


def test_cli_list_and_filter(three_runs):
    root, made = three_runs
    rc, out, err = cli(root)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "SIGNATURE", "KIND", "STATUS", "PROGRESS", "BEST", "UPDATED"]
    assert len(lines) == 4
    row = next(line for line in lines if "convnextv2_atto" in line)
    assert "completed" in row and "10/10" in row and "acc1=60" in row
    assert os.path.basename(made["convnextv2_atto"]).split("-")[-1] in row  # 10 hex signature
    assert "2/10" in next(line for line in lines if "convnextv2_tiny" in line)
    rc, out, _ = cli(root, "--status", "failed")
    assert rc == 0 and "convnextv2_nano" in out and "convnextv2_tiny" not in out
    rc, out, _ = cli(root, "--status", "preempted")
    assert rc == 0 and "no runs" in out


def test_cli_show(three_runs):
    root, made = three_runs
    d = made["convnextv2_tiny"]
    rc, out, err = cli("show", "convnextv2_tiny", "--root", root)
    assert rc == 0, err
    assert '"status": "running"' in out and "model: convnextv2_tiny" in out
    sig10 = os.path.basename(d).split("-")[-1]
    rc, out2, _ = cli("show", sig10[:6], "--root", root)
    assert rc == 0 and out2 == out
    rc, out3, _ = cli("show", d)
    assert rc == 0 and out3 == out


def test_cli_errors(three_runs, tmp_path):
    root, _ = three_runs
    rc, out, err = cli("show", "nosuchrun", "--root", root)
    assert rc == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    rc, out, err = cli("show", "convnextv2", "--root", root)  # ambiguous prefix
    assert rc == 2 and "matches 3 runs" in err
    rc, out, err = cli(str(tmp_path / "missing"))
    assert rc == 2 and err.startswith("error: no such directory")


@pytest.mark.parametrize("argv", [["show", "convnextv2_tiny", "--root"], []])
def test_cli_output_cut_off_ends_quietly(three_runs, argv):
    """`python -m util.runs [show RUN] | head`: the reader gone (here before the first write),
    the listing stops without a BrokenPipeError traceback."""
    root, _ = three_runs
    read, write = os.pipe()
    os.close(read)  # every write of the child meets a closed pipe
    try:
        p = subprocess.run([sys.executable, "-m", "util.runs", *argv, root], cwd=REPO, stdout=write,
                           stderr=subprocess.PIPE, text=True, timeout=60, env={**os.environ, "PYTHONPATH": REPO})
    finally:
        os.close(write)
    assert p.returncode == 1 and p.stderr == "", p.stderr


def test_writes_that_fail_end_in_one_line(tmp_path):
    """run.json, config.yaml and log.txt that cannot be written (a full disk, a folder in the
    way) are user errors with the path and the fix, not tracebacks."""
    from util.errors import UserError
    from util.logger import append_json_log
    rec = runs.RunRecord(tmp_path, args_of("--runs_root", str(tmp_path)), "finetune")
    os.makedirs(tmp_path / "run.json")  # the rename onto it fails like a full disk would
    with pytest.raises(UserError, match=r"could not write .*run\.json \(.*\); free disk space"):
        rec.start()
    os.makedirs(tmp_path / "config.yaml")
    with pytest.raises(UserError, match=r"could not write .*config\.yaml"):
        save_config(args_of(), str(tmp_path / "config.yaml"))
    os.makedirs(tmp_path / "log.txt")
    with pytest.raises(UserError, match=r"could not write .*log\.txt"):
        append_json_log(str(tmp_path), {"epoch": 0})


# ---------------------------------------------------------------- signatures across upgrades

FIXTURES = os.path.join(REPO, "tests", "fixtures")


def test_version_2_signatures_are_still_computed():
    """The signatures the code before version 3 gave these command lines (recorded with that
    code in tests/fixtures/signatures_v2.json) come out of util/runs.legacy_signature."""
    import json

    import main_finetune
    import main_pretrain
    with open(os.path.join(FIXTURES, "signatures_v2.json")) as f:
        recorded = json.load(f)
    for kind, module in (("finetune", main_finetune), ("pretrain", main_pretrain)):
        for case in recorded[kind]:
            a = parse_args(module.get_args_parser(), case["argv"])
            w = case["world_size"]
            assert runs.legacy_signature(a, w, kind) == case["signature"], case
            assert runs.signature(a, w, kind) != case["signature"]  # version 3 hashes otherwise


@pytest.mark.parametrize("kind", ["finetune", "pretrain"])
def test_run_made_by_version_2_is_found_by_the_same_command(tmp_path, kind):
    """A run directory written by the code before version 3 (kept as a fixture: its run.json,
    config.yaml and log.txt) is found by the command that made it: completed, so reported and
    left as it was, not started over beside it."""
    import json
    import shlex
    import shutil

    from tests import forkrun
    (src,) = [os.path.join(FIXTURES, "runs_v2", kind, d) for d in os.listdir(os.path.join(FIXTURES, "runs_v2", kind))]
    run_dir = tmp_path / "runs" / kind / os.path.basename(src)
    shutil.copytree(src, run_dir)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    with open(os.path.join(src, "run.json")) as f:
        argv = shlex.split(json.load(f)["command"])
    i = argv.index("--runs_root")
    argv[i + 1] = str(tmp_path / "runs")
    r = forkrun.run(argv[0], argv[1:], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"run already completed: {run_dir}" in r.stdout + r.stderr
    assert sorted(os.listdir(tmp_path / "runs" / kind)) == [run_dir.name]
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before


def test_a_new_flag_at_its_default_changes_no_signature(monkeypatch):
    """Adding a flag to the table (with a default that keeps today's behaviour) leaves every
    signature as it was; setting it away from its default makes another run."""
    import main_finetune
    from util import flags
    base = runs.signature(parse_args(main_finetune.get_args_parser(), ["--mixup", "0.8"]), 1, "finetune")
    new = flags.Flag("brand_new_knob", 3, int, "a flag added by an upgrade", scripts=("finetune",))
    monkeypatch.setattr(flags, "TABLE", flags.TABLE + (new,))
    monkeypatch.setitem(flags.BY_NAME, new.name, new)
    p = main_finetune.get_args_parser()
    assert runs.signature(parse_args(p, ["--mixup", "0.8"]), 1, "finetune") == base
    assert runs.signature(parse_args(p, ["--mixup", "0.8", "--brand_new_knob", "4"]), 1, "finetune") != base


RECORDED_DEFAULTS = os.path.join(os.path.dirname(__file__), "fixtures", f"outcome_defaults_v{runs.SIGNATURE_VERSION}.json")


def _recorded_defaults():
    with open(RECORDED_DEFAULTS) as f:
        return json.load(f)


def test_changing_a_default_needs_a_signature_version_bump():
    """A signature hashes what differs from the defaults, so a changed default silently changes
    what a signature means. If this fails: bump SIGNATURE_VERSION in util/runs.py, record the
    new version's defaults (python scripts/flag_docs.py into tests/fixtures/outcome_defaults_v<N>.json)
    and say so in docs/runs.md."""
    now = runs.outcome_defaults()
    changed = {k: (v, now[k]) for k, v in _recorded_defaults().items() if k in now and now[k] != v}
    assert not changed, f"defaults changed (recorded, now): {changed}; bump SIGNATURE_VERSION"


def test_a_new_outcome_flag_is_recorded_with_its_default():
    """Adding a flag whose default keeps today's behaviour changes no signature (no bump), but
    its default joins the record, so that changing it later is caught by the test above."""
    missing = sorted(set(runs.outcome_defaults()) - set(_recorded_defaults()))
    assert not missing, f"{missing}: record them with their defaults: python scripts/flag_docs.py"

"""Every user mistake of docs/errors.md, one test each: the real script ends with exactly one
stderr line `error: ...` naming the problem and the fix, exit code 2, no traceback, and nothing
lost (an existing run directory, checkpoints included, is byte for byte unchanged; a file that
would run code on loading runs nothing). An internal fault keeps its traceback (exit 1).

The launches run in processes forked from a server with the imports done (tests/forkrun.py);
a few rows also run through a fresh interpreter to show the same line there.
"""
import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from tests import forkrun
from tests.helpers import ROOT, TINY, run, run_record, script_env

FT = TINY + ["--batch_size", "8", "--epochs", "1"]
PRE = ["--model", "convnextv2_atto", "--data_set", "synthetic", "--input_size", "64",
       "--synthetic_train_samples", "64", "--batch_size", "8", "--num_workers", "0", "--device", "cpu",
       "--print_freq", "1", "--warmup_epochs", "0", "--decoder_embed_dim", "64", "--epochs", "1"]


def _tree(root, classes, n=3):
    for c in classes:
        os.makedirs(root / c, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (40, 40), (i * 60, 10, 200)).save(root / c / f"{i}.jpg")


class Evil:
    """Unpickling this runs `touch <marker>`: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """Data folders, checkpoints and configs for the rows, and a completed run (`base`) that
    every row points --output_dir at: a mistake must leave it as it was."""
    d = tmp_path_factory.mktemp("errors")
    _tree(d / "good" / "train", ["a", "b"])
    _tree(d / "good" / "val", ["a", "b"])
    _tree(d / "diff" / "train", ["a", "b"])
    _tree(d / "diff" / "val", ["a", "c"])
    _tree(d / "empty" / "train", ["a", "b"])
    _tree(d / "empty" / "val", ["a", "b"])
    os.makedirs(d / "empty" / "train" / "c")
    _tree(d / "noval" / "train", ["a", "b"])
    _tree(d / "notrain" / "val", ["a", "b"])
    from models import create_fcmae, create_model
    torch.save({"model": create_model("convnextv2_femto", num_classes=10).state_dict()}, d / "femto.pth")
    torch.save({"model": create_fcmae("convnextv2_femto", decoder_embed_dim=64).state_dict()},
               d / "femto_fcmae.pth")
    marker = d / "CODE-RAN"
    torch.save({"model": Evil(marker)}, d / "evil.pth")
    data = (d / "femto.pth").read_bytes()
    (d / "truncated.pth").write_bytes(data[: len(data) // 3])
    (d / "unknown_key.yaml").write_text("epochz: 3\n")
    (d / "bad_value.yaml").write_text("batch_size: many\n")
    (d / "python_tag.yaml").write_text(f"model: !!python/object/apply:os.system ['touch {marker}']\n")
    (d / "a_file").write_text("not a folder\n")
    (d / "latin1.yaml").write_bytes(b"model: convnextv2_atto  # caf\xe9\n")  # Latin-1, not UTF-8
    base = d / "base"
    r = forkrun.run("main_finetune.py", FT + ["--output_dir", base], d)
    assert r.returncode == 0, r.stderr
    return {"d": d, "base": base, "marker": marker}


def snapshot(folder):
    """{path: (sha256, mtime_ns)} of every file under `folder`."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = (hashlib.sha256(fh.read()).hexdigest(), os.stat(p).st_mtime_ns)
    return out


def one_line(r, fragment):
    """Exactly one stderr line, `error: ...` holding `fragment`; exit 2; no traceback."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    assert fragment in lines[0], lines[0]
    return lines[0]


# (id, script, flags -- {d}: the fixture folder, {base}: the completed run --, fragment of the line)
ROWS = [
    ("data_path_missing", "main_finetune.py", ["--data_set", "image_folder"], "needs --data_path"),
    ("data_path_not_found", "main_finetune.py", ["--data_set", "image_folder", "--data_path", "{d}/nowhere"],
     "--data_path {d}/nowhere: no such directory"),
    ("no_train_folder", "main_finetune.py", ["--data_set", "image_folder", "--data_path", "{d}/notrain"],
     "training folder {d}/notrain/train does not exist"),
    ("no_val_folder", "main_finetune.py", ["--data_set", "image_folder", "--data_path", "{d}/noval"],
     "validation folder {d}/noval/val does not exist"),
    ("empty_class_folder", "main_finetune.py", ["--data_set", "image_folder", "--data_path", "{d}/empty"],
     "every class folder needs at least one image"),
    ("different_classes", "main_finetune.py", ["--data_set", "image_folder", "--data_path", "{d}/diff"],
     "only in train: ['b'], only in val: ['c']"),
    ("unknown_model", "main_finetune.py", ["--model", "convnextv2_tinny"],
     "unknown model 'convnextv2_tinny'; did you mean convnextv2_tiny, convnext_tiny"),
    ("unknown_fcmae_model", "main_pretrain.py", ["--model", "resnet18"], "unknown FCMAE model 'resnet18'"),
    ("unknown_data_set", "main_finetune.py", ["--data_set", "synthetc"], "did you mean synthetic?"),
    ("resume_other_architecture", "main_finetune.py", ["--resume", "{d}/femto.pth"],
     "--resume {d}/femto.pth does not match --model: downsample_layers.0.0.weight has shape (48, 3, 4, 4)"),
    ("finetune_other_architecture", "main_finetune.py", ["--finetune", "{d}/femto.pth"],
     "--finetune {d}/femto.pth: checkpoint does not fit the model: downsample_layers.0.0.weight"),
    ("pretrain_resume_other_architecture", "main_pretrain.py", ["--resume", "{d}/femto_fcmae.pth"],
     "does not match --model: encoder.downsample_layers.0.0.weight"),
    ("resume_weights_only", "main_finetune.py", ["--model", "convnextv2_femto", "--resume", "{d}/femto.pth"],
     "--resume {d}/femto.pth holds weights but no training state (no epoch); start a run from it with --finetune"),
    ("resume_missing_file", "main_finetune.py", ["--resume", "{d}/nope.pth"], "--resume {d}/nope.pth: no such file"),
    ("finetune_missing_file", "main_finetune.py", ["--finetune", "{d}/nope.pth"], "--finetune {d}/nope.pth: no such file"),
    ("resume_damaged_file", "main_finetune.py", ["--resume", "{d}/truncated.pth"], "is damaged or not a torch file"),
    ("resume_pickled_code", "main_finetune.py", ["--resume", "{d}/evil.pth"],
     "refusing to load {d}/evil.pth: it holds pickled Python objects that could run code"),
    ("finetune_pickled_code", "main_finetune.py", ["--finetune", "{d}/evil.pth"], "refusing to load {d}/evil.pth"),
    ("pretrain_resume_pickled_code", "main_pretrain.py", ["--resume", "{d}/evil.pth"], "refusing to load"),
    ("config_unknown_key", "main_finetune.py", ["--config", "{d}/unknown_key.yaml"],
     "unknown key 'epochz' (did you mean epochs?)"),
    ("config_bad_value", "main_finetune.py", ["--config", "{d}/bad_value.yaml"], "batch_size: invalid value 'many'"),
    ("config_python_tag", "main_finetune.py", ["--config", "{d}/python_tag.yaml"], "Python tags"),
    ("pretrain_config_python_tag", "main_pretrain.py", ["--config", "{d}/python_tag.yaml"], "Python tags"),
    ("config_missing", "main_finetune.py", ["--config", "{d}/nope.yaml"], "config file not found"),
    ("mask_ratio_out_of_range", "main_pretrain.py", ["--mask_ratio", "1.0"], "--mask_ratio 1.0 must be in (0, 1)"),
    ("input_size_not_multiple_of_32", "main_pretrain.py", ["--input_size", "48"],
     "--input_size 48 must be a multiple of 32 (the encoder's stride), e.g. 96"),
    ("mask_keeps_no_patch", "main_pretrain.py", ["--input_size", "32"],
     "--input_size 32 has 1 patch(es) of 32 px and --mask_ratio 0.6 keeps none of them; use a larger "
     "--input_size (e.g. 96) or a lower --mask_ratio"),
    ("input_size_too_small", "main_finetune.py", ["--input_size", "8"], "--input_size 8 must be >= 16"),
    ("drop_path_out_of_range", "main_finetune.py", ["--drop_path", "1.5"], "--drop_path 1.5 must be in [0, 1)"),
    ("update_freq_zero", "main_finetune.py", ["--update_freq", "0"], "--update_freq 0 must be >= 1"),
    ("negative_lr", "main_finetune.py", ["--lr", "-1"], "--lr -1.0 must be >= 0"),
    ("batch_larger_than_dataset", "main_finetune.py", ["--batch_size", "100"],
     "the training set has 64 images, fewer than one global batch"),
    ("update_freq_larger_than_epoch", "main_finetune.py", ["--update_freq", "20"], "fewer than --update_freq 20"),
    ("pretrain_batch_larger_than_dataset", "main_pretrain.py", ["--batch_size", "100"], "fewer than one global batch"),
    ("unwritable_output_dir", "main_finetune.py", ["--output_dir", "{d}/a_file/run"],
     "--output_dir {d}/a_file/run is not a writable directory"),
    ("output_dir_holds_another_run", "main_finetune.py", ["--model", "convnextv2_femto"],
     "--output_dir {base} holds a run with other settings (model 'convnextv2_atto' -> 'convnextv2_femto')"),
    ("output_dir_holds_a_finetune_run", "main_pretrain.py", [], "--output_dir {base} holds a finetune run"),
    ("force_with_output_dir", "main_finetune.py", ["--force"], "with --output_dir, give a new folder"),
    ("eval_without_weights", "main_finetune.py", ["--eval", "True"], "--eval True needs --resume or --finetune"),
    ("cuda_without_cuda", "main_finetune.py", ["--device", "cuda"], "asked for CUDA but none is available"),
    ("pretrain_data_path_missing", "main_pretrain.py", ["--data_set", "image_folder"], "needs --data_path"),
    ("finetune_damaged_file", "main_finetune.py", ["--finetune", "{d}/truncated.pth"],
     "is damaged or not a torch file"),
    ("unwritable_log_dir", "main_finetune.py", ["--log_dir", "{d}/a_file/tb"],
     "--log_dir {d}/a_file/tb is not a writable directory"),
    ("pretrain_unwritable_log_dir", "main_pretrain.py", ["--log_dir", "/proc/x"],
     "--log_dir /proc/x is not a writable directory"),
    ("config_not_utf8", "main_finetune.py", ["--config", "{d}/latin1.yaml"],
     "config {d}/latin1.yaml (line 1): not UTF-8 text (byte 0xe9); save it as UTF-8"),
    ("config_is_a_directory", "main_finetune.py", ["--config", "{d}"], "config {d} is a directory"),
]


def _fill(items, w):
    return [str(x).format(d=w["d"], base=w["base"]) for x in items]


@pytest.mark.parametrize("name,script,flags,fragment", ROWS, ids=[r[0] for r in ROWS])
def test_mistake_is_one_line_and_loses_nothing(w, tmp_path, name, script, flags, fragment):
    if name == "cuda_without_cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    before = snapshot(w["base"])
    common = FT if script == "main_finetune.py" else PRE
    r = forkrun.run(script, common + ["--output_dir", str(w["base"])] + _fill(flags, w), tmp_path)
    one_line(r, _fill([fragment], w)[0])
    assert snapshot(w["base"]) == before
    assert not os.path.exists(w["marker"]), "a checkpoint or config ran code"


# Every range and choice check of the flag table (util/flags.py), one
# launch each: (id, script, flags, fragment of the line). The checks shared by both scripts
# alternate between them; `test_range_rows_cover_every_check` keeps this table complete.
F, P = "main_finetune.py", "main_pretrain.py"
RANGE_ROWS = [
    ("batch_size", F, ["--batch_size", "0"], "--batch_size 0 must be >= 1"),
    ("update_freq", P, ["--update_freq", "0"], "--update_freq 0 must be >= 1"),
    ("epochs", F, ["--epochs", "0"], "--epochs 0 must be >= 1"),
    ("freeze_stages", F, ["--freeze_stages", "5"], "--freeze_stages 5 must be in [0, 4]"),
    ("in_chans", P, ["--in_chans", "0"], "--in_chans 0 must be >= 1"),
    ("vflip", P, ["--vflip", "2"], "--vflip 2.0 must be in [0, 1]"),
    ("mean_per_band", F, ["--mean", "0.5", "0.5"], "--mean 0.5 0.5 gives 2 values for --in_chans 3; give one per band"),
    ("rgb_augment_off_rgb", F, ["--in_chans", "4", "--aa", "rand-m9-mstd0.5-inc1"],
     "--aa rand-m9-mstd0.5-inc1 work on RGB images only, not on --in_chans 4 bands; pass --aa none --color_jitter 0"),
    ("bce_target_thresh", F, ["--bce_target_thresh", "2"], "--bce_target_thresh 2.0 must be in [0, 1]"),
    ("start_epoch", P, ["--start_epoch", "1"], "--start_epoch 1 must be in [0, --epochs)"),
    ("lr", P, ["--lr", "-1"], "--lr -1.0 must be >= 0"),
    ("blr", F, ["--blr", "-1"], "--blr -1.0 must be >= 0"),
    ("min_lr", P, ["--min_lr", "-1"], "--min_lr -1.0 must be >= 0"),
    ("weight_decay", F, ["--weight_decay", "-0.1"], "--weight_decay -0.1 must be >= 0"),
    ("warmup_epochs", P, ["--warmup_epochs", "-1"], "--warmup_epochs -1 must be >= 0"),
    ("clip_grad", F, ["--clip_grad", "0"], "--clip_grad 0.0 must be > 0"),
    ("num_workers", P, ["--num_workers", "-1"], "--num_workers -1 must be >= 0"),
    ("print_freq", F, ["--print_freq", "0"], "--print_freq 0 must be >= 1"),
    ("save_ckpt_freq", P, ["--save_ckpt_freq", "0"], "--save_ckpt_freq 0 must be >= 1"),
    ("save_ckpt_num", F, ["--save_ckpt_num", "0"], "--save_ckpt_num 0 must be >= 1"),
    ("save_ckpt_minutes", P, ["--save_ckpt_minutes", "-1"], "--save_ckpt_minutes -1.0 must be >= 0"),
    ("max_bad_images", F, ["--max_bad_images", "-1"], "--max_bad_images -1 must be >= 0"),
    ("skip_nonfinite", P, ["--skip_nonfinite", "-1"], "--skip_nonfinite -1 must be >= 0"),
    ("dist_timeout", F, ["--dist_timeout", "0"], "--dist_timeout 0.0 must be > 0 seconds"),
    ("synthetic_train_samples", P, ["--synthetic_train_samples", "0"], "--synthetic_train_samples and"),
    ("synthetic_val_samples", F, ["--synthetic_val_samples", "0"], "--synthetic_val_samples must be >= 1"),
    ("synthetic_classes", F, ["--synthetic_classes", "11"], "--synthetic_classes 11 must be between 2 and 10"),
    ("crop_pct", P, ["--crop_pct", "1.5"], "--crop_pct 1.5 must be in (0, 1]"),
    ("device", F, ["--device", "foo"], "--device 'foo' is not a device; use auto, cpu, cuda, cuda:N or mps"),
    ("pretrain_device", P, ["--device", "cuda:x"], "--device 'cuda:x' is not a device"),
    # fine-tuning only
    ("input_size", F, ["--input_size", "8"], "--input_size 8 must be >= 16"),
    ("drop_path", F, ["--drop_path", "-0.1"], "--drop_path -0.1 must be in [0, 1)"),
    ("layer_decay", F, ["--layer_decay", "0"], "--layer_decay 0.0 must be in (0, 1]"),
    ("smoothing", F, ["--smoothing", "1"], "--smoothing 1.0 must be in [0, 1)"),
    ("reprob", F, ["--reprob", "1.5"], "--reprob 1.5 must be in [0, 1]"),
    ("recount", F, ["--recount", "0"], "--recount 0 must be >= 1"),
    ("color_jitter", F, ["--color_jitter", "-0.4"], "--color_jitter -0.4 must be >= 0"),
    ("scale_min_above_max", F, ["--scale", "0.9", "0.1"], "--scale 0.9 0.1 must be MIN MAX with 0 < MIN <= MAX <= 1"),
    ("mixup", F, ["--mixup", "-1"], "--mixup and --cutmix must be >= 0"),
    ("cutmix", F, ["--cutmix", "-1"], "--mixup and --cutmix must be >= 0"),
    ("mixup_prob", F, ["--mixup_prob", "1.5"], "--mixup_prob 1.5 must be in [0, 1]"),
    ("mixup_switch_prob", F, ["--mixup_switch_prob", "-1"], "--mixup_switch_prob -1.0 must be in [0, 1]"),
    ("cutmix_minmax_one_value", F, ["--cutmix", "1", "--cutmix_minmax", "0.5"],
     "--cutmix_minmax 0.5 needs two values, MIN MAX"),
    ("cutmix_minmax_reversed", F, ["--cutmix_minmax", "0.8", "0.2"], "--cutmix_minmax 0.8 0.2 must be MIN MAX"),
    ("cutmix_minmax_empty_at_size", F, ["--cutmix_minmax", "0.5", "0.51"],
     "--cutmix_minmax 0.5 0.51 gives no range of box sides at --input_size 32 (16 to 16 px)"),
    ("mixup_odd_batch", F, ["--mixup", "0.8", "--batch_size", "7"],
     "--batch_size 7 must be even with --mixup/--cutmix"),
    ("model_ema_decay", F, ["--model_ema_decay", "1"], "--model_ema_decay 1.0 must be in [0, 1)"),
    ("weight_decay_end", F, ["--weight_decay_end", "-1"], "--weight_decay_end must be >= 0"),
    ("opt_eps", F, ["--opt_eps", "-1"], "--opt_eps -1.0 must be >= 0"),
    ("opt_betas_one_value", F, ["--opt_betas", "0.9"], "--opt_betas 0.9 must be two values in [0, 1)"),
    ("opt_betas_out_of_range", F, ["--opt_betas", "0.9", "1.5"], "--opt_betas 0.9 1.5 must be two values"),
    ("momentum", F, ["--momentum", "-0.9"], "--momentum -0.9 must be >= 0"),
    ("train_interpolation", F, ["--train_interpolation", "foo"],
     "--train_interpolation 'foo' is unknown; use one of random, bicubic, bilinear"),
    ("remode", F, ["--remode", "foo", "--reprob", "0.5"], "--remode 'foo' is unknown; use one of pixel, rand, const"),
    ("mixup_mode", F, ["--mixup_mode", "foo"], "--mixup_mode 'foo' is unknown; use one of batch, pair, elem"),
    ("device_transforms", F, ["--device_transforms", "gpu"],
     "--device_transforms 'gpu' is unknown; use one of auto, true, false"),
    ("opt", F, ["--opt", "adamx"], "--opt 'adamx' is not an optimizer timm knows (did you mean adamax"),
    ("aa", F, ["--aa", "bogus-policy"], "--aa 'bogus-policy' is not a timm augmentation policy"),
    ("aa_bad_section", F, ["--aa", "rand-m9-x3"], "--aa 'rand-m9-x3' is not a timm augmentation policy"),
    ("grad_checkpointing_unsupported", F, ["--model", "dla46_c", "--grad_checkpointing", "True"],
     "--grad_checkpointing is not supported by the timm model 'dla46_c' (gradient checkpointing not supported)"),
    # pretraining only (main_pretrain.validate_args)
    ("mask_ratio", P, ["--mask_ratio", "0"], "--mask_ratio 0.0 must be in (0, 1)"),
    ("pretrain_input_size", P, ["--input_size", "48"], "--input_size 48 must be a multiple of 32"),
    ("decoder_depth", P, ["--decoder_depth", "-1"], "--decoder_depth must be >= 0"),
    ("decoder_embed_dim", P, ["--decoder_embed_dim", "0"], "--decoder_embed_dim >= 1"),
]


@pytest.mark.parametrize("name,script,flags,fragment", RANGE_ROWS, ids=[r[0] for r in RANGE_ROWS])
def test_range_or_choice_is_one_line_and_writes_nothing(tmp_path, name, script, flags, fragment):
    """A value out of range or not among the choices: one line naming the flag, exit 2, and
    no folder, config.yaml or run.json made for the run."""
    out = tmp_path / "new" / "run"
    common = FT if script == F else PRE
    r = forkrun.run(script, common + ["--output_dir", str(out)] + flags, tmp_path)
    one_line(r, fragment)
    assert not (tmp_path / "new").exists()


def _failing_checks(script, flags):
    """The keys of the flag table's checks (util/flags.checks) that `flags` fail, the keys of
    all checks of the script, and the parsed args."""
    from util import flags as flag_table
    from util.config import parse_args
    kind, common = ("finetune", FT) if script == F else ("pretrain", PRE)
    args = parse_args(flag_table.build_parser(kind, "test"), common + ["--output_dir", "unused"] + flags)
    entries = flag_table.checks(kind)
    return {key for key, check in entries if check(args)}, {key for key, _ in entries}, args


def test_range_rows_cover_every_check():
    """Each range or choice check of the flag table fails for at least one row of RANGE_ROWS or
    ROWS (a check both scripts share, with either script), so a check added to the table without
    a row here fails this test."""
    covered = {"finetune": set(), "pretrain": set()}
    for _id, script, flags, _fragment in RANGE_ROWS + ROWS:
        if not any("{" in f for f in flags):
            failing = _failing_checks(script, flags)[0]
            covered["finetune"] |= failing
            covered["pretrain"] |= failing
    for script, kind in ((F, "finetune"), (P, "pretrain")):
        failing, keys, _args = _failing_checks(script, [])
        assert not failing, "the common flags of the rows must pass every check"
        assert keys - covered[kind] == set(), script


@pytest.mark.parametrize("size,ratio", [(50, 0.6), (48, 0.6), (32, 0.6), (33, 0.1), (100, 0.6), (250, 0.95)])
def test_pretrain_input_size_suggestion_works(size, ratio):
    """The size an input-size error suggests passes both checks and keeps at least 2 patches."""
    from util import flag_checks as fc
    args = argparse.Namespace(input_size=size, mask_ratio=ratio)
    msg = fc.multiple_of_32(args) or fc.mask_keeps_a_patch(args)
    suggested = int(re.search(r"e\.g\. (\d+)", msg).group(1))
    ok = argparse.Namespace(input_size=suggested, mask_ratio=ratio)
    assert fc.multiple_of_32(ok) is None and fc.mask_keeps_a_patch(ok) is None, msg
    assert int((suggested // 32) ** 2 * (1 - ratio)) >= 2, msg


def test_train_transform_is_built_in_validation(monkeypatch):
    """A flag combination timm refuses that no explicit check knows ends as one line too."""
    import util.data
    from util.errors import UserError
    from util.validate import check_args

    def refuse(is_train, args):
        raise AssertionError("timm says no")
    monkeypatch.setattr(util.data, "build_transform", refuse)
    _, _, args = _failing_checks(F, [])
    with pytest.raises(UserError, match=r"timm cannot build the training transform from these flags "
                                        r"\(AssertionError: timm says no\); check --aa"):
        check_args(args, "finetune")


def test_unreadable_config_is_one_line(tmp_path, monkeypatch):
    """Permissions cannot be taken away from root, so the read fails on purpose here."""
    import builtins

    from util.config import load_yaml
    from util.errors import UserError
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 3\n")
    real_open = builtins.open

    def no_read(file, *a, **k):
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *a, **k)
    monkeypatch.setattr(builtins, "open", no_read)
    with pytest.raises(UserError, match=r"cannot be read \(Permission denied\); check its permissions"):
        load_yaml(str(path))


def test_mistake_leaves_no_new_run_folder(w, tmp_path):
    """A mistake found after the output folder was checked (here: the batch does not fit the
    data) leaves no empty run folder behind, nor the parents made for it."""
    out = tmp_path / "new" / "run"
    r = forkrun.run("main_finetune.py", FT + ["--output_dir", str(out), "--batch_size", "100"], tmp_path)
    one_line(r, "fewer than one global batch")
    assert not (tmp_path / "new").exists()


def test_completed_run_in_output_dir_is_reported_not_redone(w, tmp_path):
    before = snapshot(w["base"])
    r = forkrun.run("main_finetune.py", FT + ["--output_dir", str(w["base"])], tmp_path)
    assert r.returncode == 0 and f"run already completed: {w['base']}" in r.stdout, r.stderr[-3000:]
    assert snapshot(w["base"]) == before


def test_unknown_model_names_each_match_once(w, tmp_path):
    r = forkrun.run("main_finetune.py", FT + ["--model", "convnextv2_tinny"], tmp_path)
    line = one_line(r, "did you mean")
    names = line.split("did you mean ")[1].rstrip("?").split(", ")
    assert len(names) == len(set(names)), line


def test_argparse_errors_exit_2_without_traceback(w, tmp_path):
    """argparse's own error: usage lines, then `prog: error: ...`; exit 2, no traceback."""
    r = forkrun.run("main_finetune.py", FT + ["--batch_size", "abc"], tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "error: argument --batch_size: invalid int value: 'abc'" in r.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("script,flags,line", [
    ("main_finetune.py", ["--lrr", "1e-3"], "error: unknown flag --lrr; did you mean --lr?"),
    ("main_pretrain.py", ["--mask-ratio=0.5"], "error: unknown flag --mask-ratio; did you mean --mask_ratio?"),
    ("main_finetune.py", ["--config", "{tmp}/good.yaml", "--epochz", "3"],
     "error: unknown flag --epochz; did you mean --epochs?"),
    ("main_finetune.py", ["--zzzzzz", "3"], "error: unknown flag --zzzzzz; see --help for the flags"),
    ("main_finetune.py", ["stray"], "error: unexpected argument 'stray': flags start with --, e.g. --epochs 10 "
                                    "(see --help)"),
])
def test_mistyped_flag_is_one_line_with_the_closest_flags(w, tmp_path, script, flags, line):
    """Not argparse's usage and "unrecognized arguments": one line naming the closest flags,
    exit 2, nothing written (also with a --config file, whose keys are checked after the flags)."""
    common = FT if script == "main_finetune.py" else PRE
    (tmp_path / "good.yaml").write_text("epochs: 2\n")
    flags = [f.format(tmp=tmp_path) for f in flags]
    r = forkrun.run(script, common + ["--output_dir", str(tmp_path / "new")] + flags, tmp_path)
    assert one_line(r, "") == line
    assert not (tmp_path / "new").exists()


def test_fresh_interpreter_same_line(w):
    before = snapshot(w["base"])
    r = run("main_pretrain.py", PRE + ["--output_dir", str(w["base"]), "--config", str(w["d"] / "python_tag.yaml")],
            check=False, fresh=True)
    one_line(r, "Python tags")
    assert snapshot(w["base"]) == before and not os.path.exists(w["marker"])


def test_internal_fault_keeps_its_traceback(w, tmp_path):
    """Not a user mistake: a fault inside the code is not turned into one line."""
    out = tmp_path / "run"
    code = ("import sys, main_finetune, util.train_loop\n"
            "from util.config import parse_args\n"
            "def broken(*a, **k):\n"
            "    raise RuntimeError('an internal fault')\n"
            "util.train_loop.train_one_epoch = broken\n"  # main_finetune imports it when it runs
            "main_finetune.main(parse_args(main_finetune.get_args_parser(), sys.argv[1:]))\n")
    p = subprocess.run([sys.executable, "-c", code, *FT, "--output_dir", str(out)], cwd=ROOT,
                       env=script_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stderr[-2000:]
    assert "Traceback (most recent call last)" in p.stderr and "RuntimeError: an internal fault" in p.stderr
    assert not any(line.startswith("error:") for line in p.stderr.splitlines())
    rec = run_record(out)
    assert rec["status"] == "failed" and rec["reason"] == "RuntimeError: an internal fault"


def _finite(path):
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return all(torch.isfinite(v).all() for v in sd["model"].values() if v.is_floating_point()), sd


def _checkpoints_of_base(w, tmp_path):
    """The base run's checkpoints and log in a folder without its config.yaml and run.json (a
    folder that holds a run of other settings is refused), so a launch with a far too high lr
    auto-resumes from its epoch 0."""
    run_dir = tmp_path / "run"
    shutil.copytree(w["base"], run_dir)
    (run_dir / "config.yaml").unlink()
    (run_dir / "run.json").unlink()
    return run_dir


def test_nonfinite_loss_names_the_step_and_keeps_checkpoints(w, tmp_path):
    """A far too high lr: the run resumed from epoch 0's checkpoint stops at the first
    non-finite loss with the epoch and step, and leaves every checkpoint as it was."""
    run_dir = _checkpoints_of_base(w, tmp_path)
    before = snapshot(run_dir)
    r = forkrun.run("main_finetune.py", FT + ["--output_dir", run_dir, "--epochs", "2", "--lr", "1e30"], tmp_path)
    one_line(r, "loss is not finite at epoch 1 step 1;")
    after = snapshot(run_dir)
    for name in ("checkpoint-0.pth", "checkpoint-best.pth", "checkpoint-last.pth", "log.txt"):  # last: the base's final state
        assert after[name] == before[name], name
    assert not (run_dir / "checkpoint-1.pth").exists()
    rec = run_record(run_dir)
    assert rec["status"] == "failed" and "epoch 1 step 1" in rec["reason"]


def test_nonfinite_loss_is_never_saved_by_a_rolling_checkpoint(w, tmp_path):
    """Rolling checkpoints every step, log lines rarely: the step after the loss went
    non-finite is not saved; checkpoint-last.pth holds the last finite state."""
    run_dir = _checkpoints_of_base(w, tmp_path)
    r = forkrun.run("main_finetune.py", FT + ["--output_dir", run_dir, "--epochs", "2", "--lr", "1e30",
                                             "--save_ckpt_minutes", "0.00001", "--print_freq", "100"], tmp_path)
    one_line(r, "loss is not finite at epoch 1 step 1;")
    ok, ck = _finite(run_dir / "checkpoint-last.pth")
    assert ok and (ck["epoch"], ck["step"]) == (1, 1)



@pytest.mark.parametrize("script", ["main_finetune.py", "main_pretrain.py"])
def test_preflight_runs_real_steps_and_saves_nothing(tmp_path, script):
    out = tmp_path / "run"
    common = FT if script == "main_finetune.py" else PRE
    r = forkrun.run(script, common + ["--epochs", "3", "--output_dir", out, "--preflight"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(line for line in r.stdout.splitlines() if line.startswith("preflight: "))
    for words in (" s per step of 8 images", "peak memory", "MiB (process RSS)", "one epoch = 8 steps = about",
                  "3 epochs about", "Nothing was saved."):
        assert words in line, line
    assert not out.exists()  # no run folder, no config.yaml, no checkpoint


def test_preflight_of_a_completed_run_runs_and_changes_nothing(w, tmp_path):
    before = snapshot(w["base"])
    r = forkrun.run("main_finetune.py", FT + ["--output_dir", w["base"], "--preflight"], tmp_path)
    assert r.returncode == 0 and "Nothing was saved." in r.stdout, r.stderr[-3000:]
    assert snapshot(w["base"]) == before

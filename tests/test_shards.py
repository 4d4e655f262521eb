"""--data_set wds: shards written by util.make_shards read back as the image folder they came
from; exact mid-epoch resume (1 and 2 processes); every validation sample counted once; a
corrupt sample replaced and counted; bad shard folders refused in one line, nothing written."""
import argparse
import io
import json
import os
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from tests import forkrun
from tests.helpers import TINY, assert_same_weights, read_log, run, stop_and_resume
from tests.test_errors import one_line, snapshot
from util.data import KINDS, BadImageLog, build_dataset, check_data
from util.data.folder import SafeImageFolder
from util.data.wds import read_classes, shard_paths
from util.errors import UserError
from util.make_shards import main as make_shards_main
from util.make_shards import make_shards

CLASSES = ("ant", "bee", "cat")


def _images(root, n_per_class, seed):
    rng = np.random.default_rng(seed)
    for c, name in enumerate(CLASSES):
        os.makedirs(root / name)
        for i in range(n_per_class):
            px = rng.integers(0, 255, (36, 40, 3), dtype=np.uint8)
            px[..., c] = 255  # the class in a colour: a tiny model can learn it
            Image.fromarray(px).save(root / name / f"{i}.{'png' if i % 2 else 'jpg'}", quality=95)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    _images(d / "src" / "train", 43, 0)  # 129 training images, 21 validation
    _images(d / "src" / "val", 7, 1)
    make_shards(str(d / "src"), str(d / "out"), 16)
    return d


def _args(path, **kw):
    a = dict(data_set="wds", data_path=str(path), eval_data_path=None, input_size=32, disable_eval=False, eval=False,
             in_chans=3, jpeg_draft=False)
    return argparse.Namespace(**{**a, **kw})


def _tar_members(path):
    with tarfile.open(path) as t:
        return t.getnames()


def test_layout(shards):
    out = shards / "out"
    assert read_classes(str(out)) == list(CLASSES)
    train, val = shard_paths(str(out), "train"), shard_paths(str(out), "val")
    assert [os.path.basename(p) for p in train] == [f"train-{i:06d}.tar" for i in range(9)]
    assert len(val) == 2
    names = _tar_members(train[0])
    assert len(names) == 32 and names[0].endswith((".jpg", ".png")) and names[1] == names[0].split(".")[0] + ".cls"


def test_samples_are_the_folders(shards):
    """Every image of the folder, with its label, exactly once (the pixels of the png ones too)."""
    folder = SafeImageFolder(str(shards / "src" / "train"))
    ds, n = build_dataset(True, _args(shards / "out"), transform=lambda im: np.asarray(im).tobytes())
    assert n == 3 and len(ds) == len(folder) == 129
    want = sorted((np.asarray(folder[i][0]).tobytes(), folder[i][1]) for i in range(len(folder))
                  if folder.samples[i][0].endswith(".png"))
    got = [ds[i] for i in range(len(ds))]
    assert sorted(t for _, t in got) == sorted(folder.targets)
    assert [g for g in sorted(got) if g in set(want)] == want


def test_launcher_check_and_class_count(shards):
    check_data(_args(shards / "out"))
    assert KINDS["wds"].num_classes(_args(shards / "out")) == 3
    with pytest.raises(UserError, match=r"holds no val shards \(val-\*\.tar\); give --eval_data_path"):
        check_data(_args(shards / "out", eval_data_path=str(shards / "src")))


def _copy(shards, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(shards / "out", out)
    return out


def _rewrite(path, keep=lambda name: True, label=None):
    """Write shard `path` again with only the members `keep` accepts, labels replaced by `label`."""
    buf = io.BytesIO()
    with tarfile.open(path) as src, tarfile.open(fileobj=buf, mode="w") as dst:
        for m in src:
            if keep(m.name):
                data = src.extractfile(m).read()
                if label is not None and m.name.endswith(".cls"):
                    data = str(label).encode()
                    m.size = len(data)
                dst.addfile(m, io.BytesIO(data))
    path.write_bytes(buf.getvalue())


def test_corrupt_sample_is_replaced_and_counted(shards, tmp_path):
    out = _copy(shards, tmp_path)
    shard = out / "train-000002.tar"
    with tarfile.open(shard) as t:
        m = next(m for m in t if m.name.endswith((".jpg", ".png")))
    with open(shard, "r+b") as f:  # the image's bytes garbled in place: the tar itself is intact
        f.seek(m.offset_data)
        f.write(b"\0" * m.size)
    ds, _ = build_dataset(True, _args(out), transform=lambda im: im.size)
    ds.bad_log = BadImageLog(str(tmp_path / "bad.txt"))
    bad = ds.keys.index(m.name.split(".")[0])
    assert ds[bad] == ds[bad + 1]  # the next readable sample in its place
    assert ds.bad_log.found() == [("train", f"{shard}:{ds.keys[bad]}")]
    # a relaunch keeps the sample on the list while it is still corrupt (the count carries over)
    assert BadImageLog.recheck(ds.bad_log.path, lambda split, name: ds.still_unreadable(name)) == \
        [("train", f"{shard}:{ds.keys[bad]}")]
    assert not ds.still_unreadable(f"{shard}:{ds.keys[bad + 1]}")      # a good sample
    assert not ds.still_unreadable(f"{out}/train-999999.tar:{ds.keys[bad]}")  # shards written anew


@pytest.mark.parametrize("case,fragment", [
    ("no_train", "holds no train shards (train-*.tar); write them with python -m util.make_shards SRC OUT"),
    ("no_label", "has no label ("),
    ("label_out_of_range", "has label 5, but classes.json lists 3 classes"),
    ("class_without_sample",
     "classes.json lists 4 classes but the training shards hold no sample of 1 of them ('dog')"),
])
def test_bad_shard_folder_is_one_line(shards, tmp_path, case, fragment):
    """A launch on a bad shard folder: one line, exit 2, nothing written (no run folder)."""
    out = _copy(shards, tmp_path)
    if case == "no_train":
        for p in out.glob("train-*.tar"):
            p.unlink()
    elif case == "no_label":
        _rewrite(out / "train-000001.tar", keep=lambda n: n != _tar_members(out / "train-000001.tar")[3])
    elif case == "label_out_of_range":
        _rewrite(out / "train-000004.tar", label=5)
    else:
        (out / "classes.json").write_text(json.dumps(list(CLASSES) + ["dog"]))
    with pytest.raises(UserError, match=None) as e:
        check_data(_args(out)) if case == "no_train" else build_dataset(True, _args(out), transform=str)
    assert fragment in str(e.value) and "\n" not in str(e.value)
    run_dir = tmp_path / "new" / "run"
    r = forkrun.run("main_finetune.py", _common(out) + ["--output_dir", str(run_dir)], tmp_path)
    one_line(r, fragment)
    assert not (tmp_path / "new").exists()


def test_make_shards_refuses_in_one_line(shards, tmp_path, capsys):
    before = snapshot(shards / "out")
    for argv, fragment in (([str(tmp_path), str(tmp_path / "o")], "has no train/ folder"),
                           ([str(shards / "src"), str(shards / "out")], "already holds shards"),
                           ([str(shards / "src"), str(tmp_path / "o"), "--shard_size", "0"], "--shard_size 0 must be")):
        with pytest.raises(SystemExit) as e:
            make_shards_main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and fragment in err[0], err
    assert not (tmp_path / "o").exists() and snapshot(shards / "out") == before


def _common(out):
    flags = dict(zip(TINY[::2], TINY[1::2]))
    flags.update({"--data_set": "wds", "--data_path": str(out), "--batch_size": "8"})
    for k in ("--synthetic_train_samples", "--synthetic_val_samples"):
        flags.pop(k)
    return [x for kv in flags.items() for x in kv]


RESUME = ["--epochs", "2", "--drop_path", "0.1", "--warmup_epochs", "1", "--model_ema", "True",
          "--model_ema_decay", "0.9"]


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_preempted_sharded_run_resumes_bit_identical(shards, tmp_path, nproc):
    args = _common(shards / "out") + RESUME
    ref = tmp_path / "ref"
    run("main_finetune.py", args + ["--output_dir", str(ref)], nproc=nproc)
    cut = tmp_path / "cut"
    stop_and_resume(args, cut, nproc, 129 // (8 * nproc), at_step=3)
    assert_same_weights(ref / "checkpoint-1.pth", cut / "checkpoint-1.pth")
    assert [e["test_n"] for e in read_log(ref)] == [e["test_n"] for e in read_log(cut)] == [21, 21]  # each once


def test_workers_read_each_sample_once_per_epoch(shards):
    """Two loader workers (each opens its own shards), two ranks: every sample once per epoch,
    in the order of the seeded permutation."""
    from util.data import build_train_loader
    ds, _ = build_dataset(True, _args(shards / "out"), transform=lambda im: torch.tensor(0))
    ds.targets = list(range(len(ds)))  # the sample's index as its target, to see which came
    seen = []
    for rank in (0, 1):
        a = argparse.Namespace(seed=3, batch_size=4, num_workers=2, pin_mem=False)
        loader = build_train_loader(ds, a, 2, rank)
        loader.sampler.set_epoch(1)
        seen += [int(t) for _, y in loader for t in y]
    assert len(seen) == 128 and len(set(seen)) == 128  # 129 samples: the last partial global batch dropped


def test_index_files_stand_for_the_headers_until_a_shard_changes(shards, tmp_path):
    """make_shards' <shard>.idx.json gives what reading the headers gives; a shard written
    again (new size or time) is read from its headers, not from the stale index."""
    from util.data.wds import read_shard, scan_shard
    out = _copy(shards, tmp_path)
    for p in shard_paths(str(out), "train"):
        assert os.path.exists(p + ".idx.json") and read_shard(p, 3) == scan_shard(p, 3)
    shard = out / "train-000003.tar"
    _rewrite(shard, label=2)
    assert {lb for *_, lb in read_shard(str(shard), 3)} == {2}

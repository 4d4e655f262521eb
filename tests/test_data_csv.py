"""--data_set csv: images listed in CSV files (util/data/csv.py), from the lists to a real
fine-tuning run, and every bad list refused in one line before anything is written."""
import argparse
import os
import re

import numpy as np
import pytest
import torch

from tests import forkrun
from tests.helpers import TINY, read_log, run_record, weights
from util.data import BadImageLog, SyntheticShapes, build_dataset, check_data, check_same_classes, num_classes
from util.errors import UserError

NAMES = ("zebra", "apple", "mango")  # synthetic label i is class NAMES[i]; sorted: apple, mango, zebra
SORTED = sorted(NAMES)


def _write_images(folder, split, n):
    """n synthetic images of 32 px under folder/<class>/<i>.png; [(path, class)]."""
    ds = SyntheticShapes(split, n, 32, num_classes=len(NAMES))
    out = []
    for i in range(n):
        path = folder / NAMES[ds.label(i)] / f"{i}.png"
        os.makedirs(path.parent, exist_ok=True)
        ds.image(i).save(path)
        out.append((path, NAMES[ds.label(i)]))
    return out


def _write_csv(path, header, rows):
    path.write_text(",".join(header) + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def lists(tmp_path_factory):
    """lists/train.csv (columns label,path,note; paths relative to lists/, every other one
    absolute; one unreadable image) and lists/val.csv (path,label; absolute paths)."""
    d = tmp_path_factory.mktemp("csv")
    (d / "lists").mkdir()
    train = _write_images(d / "images", "train", 24)
    broken = d / "images" / "apple" / "broken.png"
    broken.write_bytes(b"not a png")
    train.append((broken, "apple"))
    rows = [(label, p if i % 2 else os.path.relpath(p, d / "lists"), "any note") for i, (p, label) in enumerate(train)]
    _write_csv(d / "lists" / "train.csv", ("label", "path", "note"), rows)
    val = _write_images(d / "val_images", "val", 6)
    _write_csv(d / "lists" / "val.csv", ("path", "label"), val)
    return d, train, val, str(broken)


def _args(d, **kw):
    base = dict(data_set="csv", data_path=str(d / "lists" / "train.csv"),
                eval_data_path=str(d / "lists" / "val.csv"), disable_eval=False, eval=False, jpeg_draft=False,
                in_chans=3)
    base.update(kw)
    return argparse.Namespace(**base)


def test_lists_build_like_an_image_folder(lists, tmp_path):
    d, train, val, broken = lists
    args = _args(d)
    to_tensor = lambda img: torch.as_tensor(np.array(img))  # noqa: E731
    tr, n = build_dataset(True, args, transform=to_tensor)
    va, n_val = build_dataset(False, args, transform=to_tensor)
    assert n == n_val == num_classes(args) == 3 and tr.classes == va.classes == SORTED
    check_same_classes(tr, va)
    check_data(args)  # what a launcher checks before queueing: no complaint
    assert [p for p, _ in tr.samples] == [str(p) for p, _ in train]  # relative to the CSV's folder
    assert tr.targets == [SORTED.index(label) for _, label in train]
    assert [p for p, _ in va.samples] == [str(p) for p, _ in val] and len(va) == 6
    # an unreadable image is replaced by the next readable one and logged, as in an image folder
    tr.bad_log = BadImageLog(str(tmp_path / "bad.txt"))
    last = len(tr) - 1
    assert tr.samples[last][0] == broken
    x, y = tr[last]  # wraps around to the first image
    assert torch.equal(x, tr[0][0]) and y == tr.targets[0]
    assert tr.bad_log.found() == [("train", broken)]


def test_fine_tuning_from_csv_files(lists, tmp_path):
    """A real run from the two lists, launched from another folder: the unreadable image is
    replaced, reported and counted; the model has one output per class."""
    d, _, _, broken = lists
    out = tmp_path / "run"
    flags = TINY + ["--data_set", "csv", "--data_path", d / "lists" / "train.csv", "--eval_data_path",
                    d / "lists" / "val.csv", "--batch_size", "4", "--epochs", "1", "--output_dir", out]
    r = forkrun.run("main_finetune.py", flags, tmp_path, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"warning: unreadable image {broken} (" in r.stderr
    log = read_log(out)
    assert len(log) == 1 and log[0]["test_n"] == 6
    assert (log[0]["bad_images"], log[0]["bad_val_images"]) == (1, 0)
    assert run_record(out)["status"] == "completed" and run_record(out)["bad_images"] == 1
    assert [line.split("\t")[:2] for line in (out / "bad_images.txt").read_text().splitlines()] == [["train", broken]]
    assert weights(out / "checkpoint-0.pth")["head.weight"].shape[0] == 3


def test_header_is_read_leniently(lists, tmp_path):
    """A spreadsheet's export: byte-order mark, spaces after the commas, quoted paths."""
    d, train, _, _ = lists
    (p0, c0), (p1, c1) = train[:2]
    (tmp_path / "t.csv").write_text(f'\ufeff label , path\n{c0}, "{p0}"\n{c1},{p1}\n', encoding="utf-8")
    ds, n = build_dataset(True, _args(d, data_path=str(tmp_path / "t.csv"), eval_data_path=None),
                          transform=lambda img: img)
    assert ds.samples == [(str(p0), sorted({c0, c1}).index(c0)), (str(p1), sorted({c0, c1}).index(c1))]
    assert n == len({c0, c1}) == len(ds.classes)


@pytest.mark.parametrize("text,fragment", [
    ("", "has no 'path' or 'label' column (header row: none)"),
    ("path,label\n", "lists no images; add rows path,label below its header row"),
    ("path,label\na.png\n", "line 2: empty path or label; every row needs both"),
])
def test_empty_lists_are_refused(lists, tmp_path, text, fragment):
    (tmp_path / "t.csv").write_text(text)
    with pytest.raises(UserError, match=re.escape(fragment)):
        check_data(_args(lists[0], data_path=str(tmp_path / "t.csv")))


def _bad_inputs(d):
    """(id, flag changes, fragment of the one line); the files are written in d."""
    _write_csv(d / "no_label.csv", ("path", "class"), [("a.png", "apple")])
    _write_csv(d / "unknown_class.csv", ("path", "label"), [(d / "a.png", "apple"), (d / "b.png", "kiwi")])
    train = str(d / "lists" / "train.csv")
    return [
        ("missing_column", {"data_path": str(d / "no_label.csv")},
         f"--data_path {d}/no_label.csv has no 'label' column (header row: path, class); its first row must "
         "name the columns path,label"),
        ("unknown_val_class", {"eval_data_path": str(d / "unknown_class.csv")},
         f"--eval_data_path {d}/unknown_class.csv line 3: class 'kiwi' is not in the training CSV {train} "
         "(its classes: apple, mango, zebra)"),
        ("missing_train_list", {"data_path": str(d / "nowhere.csv")},
         f"--data_path {d}/nowhere.csv: no such file; give the path of the training CSV"),
        ("missing_val_list", {"eval_data_path": str(d / "nowhere.csv")},
         f"--eval_data_path {d}/nowhere.csv: no such file; give the path of the validation CSV"),
        ("no_val_list_given", {"eval_data_path": None},
         "--data_set csv needs --eval_data_path (the validation CSV file"),
        ("no_train_list_given", {"data_path": ""}, "--data_set csv needs --data_path (the training CSV file"),
    ]


BAD_IDS = ["missing_column", "unknown_val_class", "missing_train_list", "missing_val_list", "no_val_list_given",
           "no_train_list_given"]


def _case(d, name):
    return next((changes, fragment) for n, changes, fragment in _bad_inputs(d) if n == name)


@pytest.mark.parametrize("name", BAD_IDS)
def test_bad_list_is_caught_before_queueing(lists, name):
    """check_data (what a launcher checks, reading the lists but no image) refuses each bad
    input with the script's line."""
    d = lists[0]
    changes, fragment = _case(d, name)
    with pytest.raises(UserError) as e:
        check_data(_args(d, **changes))
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_no_val_list_needed_without_evaluation(lists):
    d = lists[0]
    check_data(_args(d, eval_data_path=None, disable_eval=True))
    check_data(_args(d, eval_data_path=str(d / "nowhere.csv"), disable_eval=True))


@pytest.mark.parametrize("name", BAD_IDS)
def test_bad_list_is_one_line_and_writes_nothing(lists, tmp_path, name):
    """The real script: exit 2, one `error:` line, no traceback, no run directory."""
    d = lists[0]
    changes, fragment = _case(d, name)
    args = _args(d, **changes)
    flags = TINY + ["--data_set", "csv", "--data_path", args.data_path, "--batch_size", "4", "--epochs", "1",
                    "--output_dir", tmp_path / "new" / "run"]
    if args.eval_data_path:
        flags += ["--eval_data_path", args.eval_data_path]
    r = forkrun.run("main_finetune.py", flags, tmp_path, cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], r.stderr[-3000:]
    assert not (tmp_path / "new").exists() and not (tmp_path / "runs").exists()

"""--predict PATH --resume CKPT (engine_finetune.predict, util/predict.py): a tiny run trained
on an image folder labels the folder's val/ images, and the accuracy computed from
predictions.csv is --eval's top-1 on the same folder (the EMA's with --model_ema_eval); nested
folders, a CSV list with unreadable rows, tar shards without labels, a checkpoint without class
names, two processes under torchrun; and the mistakes, one line each with nothing written."""
import csv
import json
import os
import shutil
import tarfile

import pytest
import torch
from PIL import Image

from tests import forkrun
from tests.helpers import TINY, run
from tests.test_errors import one_line, snapshot

# the image folder's settings; --num_workers 0, batch 8 as TINY's other runs
RUN = TINY + ["--data_set", "image_folder", "--batch_size", "8"]


def rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def predict(w, tmp, *flags, ckpt=None, nproc=1):
    """Predictions of `ckpt` (default: the run's best) written into `tmp`; returns its rows."""
    out = tmp / "out"
    p = run("main_finetune.py", ["--predict", *flags, "--resume", ckpt or w["ckpt"], "--output_dir", out,
                                 "--num_workers", "0", "--batch_size", "8", "--device", "cpu"], nproc=nproc)
    assert f"{out / 'predictions.csv'}" in p.stdout + p.stderr  # it says where
    return rows(out / "predictions.csv")


def accuracy(predictions, val):
    """Top-1 from predictions.csv: the truth is a file's class folder under `val`."""
    hits = [r["prediction"] == os.path.relpath(r["path"], val).split(os.sep)[0] for r in predictions]
    return 100 * sum(hits) / len(hits)


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """A 3-class image folder of the built-in shapes (a quarter of val/ one folder deeper), a
    2-epoch run on it with an EMA (not used for the best), and its predictions over val/."""
    from util.data.synthetic import SyntheticShapes
    d = tmp_path_factory.mktemp("predict")
    for split, n in (("train", 48), ("val", 18)):
        ds = SyntheticShapes(split, n, 32, num_classes=3)
        for i in range(n):
            folder = d / "data" / split / ds.classes[ds.label(i)] / ("more" if split == "val" and i % 4 == 0 else "")
            os.makedirs(folder, exist_ok=True)
            ds.image(i).save(folder / f"{i:03d}.png")
    run("main_finetune.py", RUN + ["--data_path", d / "data", "--epochs", "2", "--model_ema", "True",
                                   "--model_ema_decay", "0.5", "--output_dir", d / "run"])
    w = {"d": d, "val": str(d / "data" / "val"), "ckpt": str(d / "run" / "checkpoint-best.pth")}
    w["rows"] = predict(w, d / "folder", w["val"])
    return w


def eval_top1(w, tmp, ckpt, *flags):
    out = tmp / "eval"
    run("main_finetune.py", RUN + ["--data_path", w["d"] / "data", "--eval", "True", "--resume", ckpt,
                                   "--output_dir", out, *flags])
    return json.loads((out / "eval.json").read_text())


def test_accuracy_from_predictions_is_evals_top1(w, tmp_path):
    """The witness: --eval's top-1 on the folder's val/ equals the accuracy of predictions.csv
    over the same folder, its class folders the truth; one row per image at any depth, in the
    order an image folder lists them, the class names (the folders') from the checkpoint,
    top-3 (3 classes) with probabilities best first."""
    predictions = w["rows"]
    stats = eval_top1(w, tmp_path, w["ckpt"])
    assert stats["n"] == len(predictions) == 18
    assert accuracy(predictions, w["val"]) == stats["acc1"]
    walk = [os.path.join(f, n) for f, _, names in sorted(os.walk(w["val"])) for n in sorted(names)]
    assert [r["path"] for r in predictions] == walk and any("/more/" in p for p in walk)
    assert list(predictions[0]) == ["path", "prediction", "probability", "prediction_2", "probability_2",
                                    "prediction_3", "probability_3", "error"]
    assert torch.load(w["ckpt"], weights_only=True)["extra"]["classes"] == ["disc", "square", "triangle"]
    for r in predictions:
        assert {r["prediction"], r["prediction_2"], r["prediction_3"]} == {"disc", "square", "triangle"}
        p = [float(r[k]) for k in ("probability", "probability_2", "probability_3")]
        assert p == sorted(p, reverse=True) and abs(sum(p) - 1) < 1e-4 and r["error"] == ""
    assert len({r["prediction"] for r in predictions}) > 1  # the model tells images apart


def test_ema_predicts_when_the_run_judged_itself_by_it(w, tmp_path):
    """A checkpoint whose run had --model_ema_eval predicts with its EMA weights: the accuracy
    is --eval's acc1_ema, and the probabilities are not the model's."""
    ck = torch.load(w["ckpt"], weights_only=True)
    ck["args"]["model_ema_eval"] = True
    path = tmp_path / "ema.pth"
    torch.save(ck, path)
    predictions = predict(w, tmp_path, w["val"], ckpt=str(path))
    stats = eval_top1(w, tmp_path, path, "--model_ema", "True", "--model_ema_eval", "True")
    assert accuracy(predictions, w["val"]) == stats["acc1_ema"]
    assert [r["probability"] for r in predictions] != [r["probability"] for r in w["rows"]]


def test_checkpoint_without_class_names_names_classes_by_index(w, tmp_path):
    """A checkpoint written before class names were kept: the same predictions, as indices."""
    ck = torch.load(w["ckpt"], weights_only=True)
    del ck["extra"]["classes"]
    torch.save(ck, tmp_path / "old.pth")
    predictions = predict(w, tmp_path, w["val"], ckpt=str(tmp_path / "old.pth"))
    names = ["disc", "square", "triangle"]
    assert [names[int(r["prediction"])] for r in predictions] == [r["prediction"] for r in w["rows"]]


def test_bce_model_gives_each_class_its_sigmoid(w, tmp_path):
    """A --bce_loss model's probabilities are its sigmoids (independent per class), computed here
    from the model the checkpoint's settings build, for the first image."""
    import engine_finetune
    from main_finetune import get_args_parser
    from util.config import parse_args
    from util.data.transforms import build_transform
    ck = torch.load(w["ckpt"], weights_only=True)
    ck["args"]["bce_loss"] = True
    torch.save(ck, tmp_path / "bce.pth")
    first = predict(w, tmp_path, w["val"], ckpt=str(tmp_path / "bce.pth"))[0]
    args = parse_args(get_args_parser(), ["--predict", w["val"], "--resume", str(tmp_path / "bce.pth")])
    model, settings, classes = engine_finetune.prediction_model(args)
    image = build_transform(False, settings)(Image.open(first["path"]).convert("RGB"))
    with torch.no_grad():
        p = model.eval()(image[None])[0].sigmoid()
    assert first["prediction"] == classes[int(p.argmax())] == w["rows"][0]["prediction"]
    assert [float(first[k]) for k in ("probability", "probability_2", "probability_3")] == \
        pytest.approx(sorted(p.tolist(), reverse=True), abs=1e-5)


def test_csv_list_keeps_its_rows_and_reports_unreadable_files(w, tmp_path):
    """A CSV list (a `path` column among others, paths relative to the CSV): a row per line in
    its order, the path as written; a corrupt and a missing file are rows with an empty
    prediction and their error, and the readable rows get the folder's predictions."""
    (tmp_path / "broken.png").write_bytes(b"not an image")
    shutil.copytree(w["val"], tmp_path / "val")
    good = [os.path.relpath(r["path"], os.path.dirname(w["val"])) for r in w["rows"]][::-1]
    listed = good[:3] + ["broken.png", "gone.png"] + good[3:]
    (tmp_path / "list.csv").write_text("label,path\n" + "".join(f"x,{p}\n" for p in listed))
    predictions = predict(w, tmp_path, tmp_path / "list.csv")
    assert [r["path"] for r in predictions] == listed
    bad = {r["path"]: r for r in predictions if r["error"]}
    assert set(bad) == {"broken.png", "gone.png"}
    assert "UnidentifiedImageError" in bad["broken.png"]["error"] and "gone.png" in bad["gone.png"]["error"]
    assert all(r["prediction"] == r["probability"] == r["prediction_3"] == "" for r in bad.values())
    by_file = {os.path.relpath(r["path"], os.path.dirname(w["val"])): r for r in w["rows"]}
    for r in predictions:
        if not r["error"]:
            assert r["prediction"] == by_file[r["path"]]["prediction"]
            assert float(r["probability"]) == pytest.approx(float(by_file[r["path"]]["probability"]), abs=1e-5)


def test_shards_without_labels(w, tmp_path):
    """Tar shards (a folder of them, or a pattern): `<shard>:<key>` rows in stored order, keys
    at any depth, no `.cls` needed; the folder's predictions, in one batch order."""
    files = [r["path"] for r in w["rows"]]
    shards = tmp_path / "shards"
    os.makedirs(shards)
    keys = []
    for n, part in enumerate((files[:10], files[10:])):
        with tarfile.open(shards / f"val-{n:06d}.tar", "w") as tar:
            for i, f in enumerate(part):
                keys.append(f"{shards / f'val-{n:06d}.tar'}:{'sub/' if i % 3 else ''}{n}-{i}")
                tar.add(f, arcname=keys[-1].rpartition(":")[2] + ".png")
    for path in (shards, str(shards / "val-*.tar")):
        predictions = predict(w, tmp_path, path)
        assert [r["path"] for r in predictions] == keys
        assert [{k: v for k, v in r.items() if k != "path"} for r in predictions] == \
            [{k: v for k, v in r.items() if k != "path"} for r in w["rows"]]


def test_two_processes_each_predict_their_share(w, tmp_path):
    """Under torchrun (2 gloo processes) each rank predicts every other input; rank 0 writes one
    file in input order, with the single process's predictions."""
    predictions = predict(w, tmp_path, w["val"], nproc=2)
    assert [r["path"] for r in predictions] == [r["path"] for r in w["rows"]]
    assert [r["prediction"] for r in predictions] == [r["prediction"] for r in w["rows"]]
    for a, b in zip(predictions, w["rows"]):
        assert float(a["probability"]) == pytest.approx(float(b["probability"]), abs=1e-5)


def _no_head_checkpoints(w, d):
    """An FCMAE pretraining checkpoint, an encoder's weights alone, and a fine-tuning
    checkpoint whose head was taken out."""
    from models import create_fcmae
    ck = torch.load(w["ckpt"], weights_only=True)
    pretrain_args = {k: v for k, v in ck["args"].items() if k != "nb_classes"}
    torch.save({"model": create_fcmae("convnextv2_atto", decoder_embed_dim=64).state_dict(),
                "args": pretrain_args}, d / "fcmae.pth")
    encoder = {k: v for k, v in ck["model"].items() if not k.startswith("head.")}
    torch.save({"model": encoder}, d / "encoder.pth")
    torch.save({**ck, "model": encoder}, d / "headless.pth")


BAD = [  # (id, flags -- {d}: a folder of the test, {ckpt}: the run's best --, fragment of the line)
    ("empty_folder", ["--predict", "{d}/empty", "--resume", "{ckpt}"], "--predict {d}/empty holds no images"),
    ("no_path_column", ["--predict", "{d}/nopath.csv", "--resume", "{ckpt}"],
     "--predict {d}/nopath.csv has no 'path' column (header row: file, label)"),
    ("empty_csv_row", ["--predict", "{d}/blank.csv", "--resume", "{ckpt}"], "{d}/blank.csv line 3: empty path"),
    ("no_such_path", ["--predict", "{d}/nowhere", "--resume", "{ckpt}"],
     "--predict {d}/nowhere: no such file or folder"),
    ("not_a_list", ["--predict", "{d}/notes.txt", "--resume", "{ckpt}"],
     "--predict {d}/notes.txt: give a folder of images"),
    ("without_resume", ["--predict", "{d}/nopath.csv"], "--predict needs --resume CKPT"),
    ("fcmae_checkpoint", ["--predict", "{val}", "--resume", "{d}/fcmae.pth"],
     "--resume {d}/fcmae.pth holds no classifier to predict with"),
    ("encoder_weights", ["--predict", "{val}", "--resume", "{d}/encoder.pth"], "holds no classifier to predict with"),
    ("headless_checkpoint", ["--predict", "{val}", "--resume", "{d}/headless.pth"],
     "holds no classifier to predict with"),
]


@pytest.mark.parametrize("name,flags,fragment", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_and_writes_nothing(w, tmp_path, name, flags, fragment):
    d = w["d"] / "bad"
    if not d.exists():
        os.makedirs(d / "empty" / "a" / "b")
        (d / "empty" / "a" / "notes.txt").write_text("no image here\n")
        (d / "nopath.csv").write_text("file,label\nx.png,a\n")
        (d / "blank.csv").write_text("path,label\nx.png,a\n,b\n")
        (d / "notes.txt").write_text("path\n")
        _no_head_checkpoints(w, d)
    before = snapshot(w["d"])
    fill = {"d": d, "ckpt": w["ckpt"], "val": w["val"]}
    r = forkrun.run("main_finetune.py", [str(f).format(**fill) for f in flags] + ["--device", "cpu"], tmp_path)
    one_line(r, fragment.format(**fill))
    assert snapshot(w["d"]) == before and not os.path.exists(w["d"] / "run" / "predictions.csv")

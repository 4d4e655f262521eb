"""The built-in dataset, transforms, samplers, ImageFolder error handling and the registry's
checks (util/data/)."""
import argparse
import os

import numpy as np
import pytest
import torch
from PIL import Image

from util.data import (SeededTransform, SyntheticShapes, TrainSampler, build_dataset, build_transform,
                       check_same_classes, eval_indices, posterize_zero_bits_safe)
from util.errors import UserError


def make_args(**kw):
    base = dict(data_set="synthetic", data_path="", eval_data_path=None, input_size=32, aa="none",
                color_jitter=None, train_interpolation="bicubic", reprob=0.0, remode="pixel", recount=1,
                crop_pct=None, imagenet_default_mean_and_std=True, synthetic_train_samples=40,
                synthetic_val_samples=20, synthetic_classes=10, synthetic_seed=0, jpeg_draft=False,
                scale=[0.08, 1.0], in_chans=3, mean=None, std=None, vflip=0.0)
    base.update(kw)
    return argparse.Namespace(**base)


def test_synthetic_is_deterministic_and_splits_are_disjoint():
    a = SyntheticShapes("train", 50, 40, seed=3)
    b = SyntheticShapes("train", 50, 40, seed=3)
    v = SyntheticShapes("val", 50, 40, seed=3)
    for i in range(10):
        assert np.array_equal(np.asarray(a.image(i)), np.asarray(b.image(i)))
        assert not np.array_equal(np.asarray(a.image(i)), np.asarray(v.image(i)))
    assert {a.label(i) for i in range(50)} == set(range(10))


@pytest.mark.parametrize("size", [24, 64, 100])
def test_synthetic_any_size(size):
    img = SyntheticShapes("val", 5, size).image(2)
    assert img.size == (size, size) and img.mode == "RGB"


def test_mean_colour_does_not_give_the_class():
    """Nearest class-mean on the mean RGB of an image must stay near chance (10 %)."""
    tr, va = SyntheticShapes("train", 600, 32), SyntheticShapes("val", 300, 32)
    feat = lambda ds, i: np.asarray(ds.image(i), dtype=np.float32).mean((0, 1))
    xs = np.stack([feat(tr, i) for i in range(len(tr))])
    ys = np.array([tr.label(i) for i in range(len(tr))])
    centroids = np.stack([xs[ys == c].mean(0) for c in range(10)])
    xv = np.stack([feat(va, i) for i in range(len(va))])
    yv = np.array([va.label(i) for i in range(len(va))])
    pred = ((xv[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (pred == yv).mean() < 0.2


def test_two_ranks_see_the_batches_of_one():
    n, world, b = 37, 2, 4
    one = TrainSampler(n, 1, 0, seed=5)
    ranks = [TrainSampler(n, world, r, seed=5) for r in range(world)]
    for s in [one, *ranks]:
        s.set_epoch(2)
    full = list(one)
    per_rank = [list(s) for s in ranks]
    for k in range(len(per_rank[0]) // b):
        union = sorted(x for r in range(world) for x in per_rank[r][k * b:(k + 1) * b])
        assert union == sorted(full[k * world * b:(k + 1) * world * b])
    one.set_epoch(3)
    assert list(one) != full  # a new order each epoch


def test_sampler_resumes_mid_epoch():
    s = TrainSampler(20, 1, 0, seed=1)
    s.set_epoch(4)
    full = list(s)
    s.set_epoch(4, start=8)
    assert list(s) == full[8:] and len(s) == 12


def test_eval_indices_partition_exactly():
    parts = [list(eval_indices(11, 3, r)) for r in range(3)]
    assert sorted(sum(parts, [])) == list(range(11))


def test_augmentation_is_seeded_per_sample_not_per_process():
    args = make_args(aa="rand-m9-mstd0.5-inc1", reprob=0.25)
    ds, _ = build_dataset(True, args)
    wrapped = SeededTransform(ds)
    torch.manual_seed(0)
    x1, _ = wrapped[(3, 1234)]
    state = torch.get_rng_state()
    torch.manual_seed(99)
    x2, _ = wrapped[(3, 1234)]
    assert torch.equal(x1, x2)
    torch.manual_seed(99)
    wrapped[(3, 1234)]
    assert torch.equal(torch.get_rng_state(), torch.random.manual_seed(99).get_state())
    del state


def test_default_randaugment_survives_many_samples():
    """timm's increasing posterize can ask for 0 bits, which Pillow 13 rejects."""
    args = make_args(aa="rand-m9-mstd0.5-inc1", reprob=0.25, input_size=32)
    t = build_transform(True, args)
    img = SyntheticShapes("train", 1, 32).image(0)
    for i in range(400):
        torch.manual_seed(i)
        import random
        random.seed(i)
        assert t(img).shape == (3, 32, 32)
    black = posterize_zero_bits_safe(img, 0)  # as Pillow < 13 did; Pillow 13 raises
    assert np.asarray(black).max() == 0


@pytest.mark.parametrize("policy", ["rand-m9-mstd0.5-inc1", "original", "augmix-m5-w3"])
def test_posterize_is_guarded_without_patching_timm(policy):
    """The built transform's posterize ops are ours; timm's module is left as it was."""
    import timm.data.auto_augment as aa

    from util.data.transforms import _augment_ops
    before, table = aa.posterize, dict(aa.NAME_TO_OP)
    t = build_transform(True, make_args(aa=policy))
    assert aa.posterize is before and aa.NAME_TO_OP == table
    assert aa.NAME_TO_OP["PosterizeIncreasing"] is before and before.__module__ == "timm.data.auto_augment"
    posterize = [op for op in _augment_ops(t) if op.name.startswith("Posterize")]
    assert posterize and all(op.aug_fn is posterize_zero_bits_safe for op in posterize)


def _default_finetune_args():
    from main_finetune import get_args_parser
    return get_args_parser().parse_args([])


def test_default_train_transform_pickles():
    """DataLoader workers started with spawn or forkserver receive the transform pickled; the
    posterize guard above must not make it a local closure."""
    import pickle
    args = _default_finetune_args()
    t = pickle.loads(pickle.dumps(build_transform(True, args)))
    assert t(SyntheticShapes("train", 1, 64).image(0)).shape == (3, args.input_size, args.input_size)


@pytest.mark.slow
def test_randaugment_in_spawned_workers():
    """The default RandAugment in a worker process that never ran the patch itself (spawn)."""
    args = make_args(aa="rand-m9-mstd0.5-inc1", input_size=32)
    ds = SeededTransform(SyntheticShapes("train", 8, 32, transform=build_transform(True, args)))
    loader = torch.utils.data.DataLoader(ds, sampler=TrainSampler(8, seed=0), batch_size=8, num_workers=1,
                                         multiprocessing_context="spawn")
    x, y = next(iter(loader))
    assert x.shape == (8, 3, 32, 32)


def _tree(root, classes, n=2, size=12):
    for c in classes:
        os.makedirs(root / c, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (size, size), (i * 40, 10, 200)).save(root / c / f"{i}.png")


def test_image_folder_errors(tmp_path):
    args = make_args(data_set="image_folder", data_path=str(tmp_path / "missing"))
    with pytest.raises(UserError, match="does not exist"):
        build_dataset(True, args)
    args = make_args(data_set="image_folder", data_path="")
    with pytest.raises(UserError, match="needs --data_path"):
        build_dataset(True, args)
    _tree(tmp_path / "d" / "train", ["a", "b"])
    os.makedirs(tmp_path / "d" / "train" / "empty")
    args = make_args(data_set="image_folder", data_path=str(tmp_path / "d"))
    with pytest.raises(UserError, match="at least one image"):
        build_dataset(True, args)
    with pytest.raises(UserError, match="did you mean synthetic"):
        build_dataset(True, make_args(data_set="synthetc"))


def test_class_mismatch_and_corrupt_image(tmp_path):
    _tree(tmp_path / "train", ["a", "b"])
    _tree(tmp_path / "val", ["a", "c"])
    args = make_args(data_set="image_folder", data_path=str(tmp_path))
    tr, n = build_dataset(True, args)
    va, _ = build_dataset(False, args)
    assert n == 2
    with pytest.raises(UserError, match="different classes"):
        check_same_classes(tr, va)
    (tmp_path / "train" / "a" / "0.png").write_bytes(b"not a png")
    from util.data import BadImageLog
    tr.bad_log = BadImageLog(str(tmp_path / "bad.txt"))
    x, y = tr[0]
    assert x.shape == (3, 32, 32)
    assert len(tr.bad_log.entries()) == 1 and "0.png" in tr.bad_log.entries()[0]
    assert tr.bad_log.found() == [("train", str(tmp_path / "train" / "a" / "0.png"))]


def test_bad_image_list_is_rechecked_at_launch(tmp_path):
    """A relaunch counts only the listed images that are still unreadable; the old list is kept."""
    from util.data import BadImageLog
    _tree(tmp_path / "train", ["a"], n=4)
    _tree(tmp_path / "val", ["a"], n=2)
    img = {(s, i): str(tmp_path / s / "a" / f"{i}.png") for s in ("train", "val") for i in range(4)}
    for key in [("train", 0), ("train", 1), ("train", 2), ("val", 0), ("val", 1)]:
        with open(img[key], "wb") as f:
            f.write(b"not a png")
    listed = tmp_path / "bad_images.txt"
    train, val = BadImageLog(str(listed), "train"), BadImageLog(str(listed), "val")
    for epoch in range(2):  # each epoch meets them again: listed once, by this log or another process's
        for key in [("train", 0), ("train", 1), ("train", 2)]:
            (train if epoch == 0 else BadImageLog(str(listed), "train")).add(img[key], OSError("bad\tfile\nhere"))
    for key in [("val", 0), ("val", 1)]:
        val.add(img[key], OSError("bad"))
    with open(listed, "a") as f:  # a line from before the split column: train
        f.write(f"{img['train', 3]}\tOSError: old\n")
    assert len(train.entries()) == 6 and all(len(e.split("\t")) == 3 for e in train.entries()[:-1])  # once each
    assert train.found() == sorted([("train", img["train", i]) for i in range(4)] + [("val", img["val", 0]),
                                                                                      ("val", img["val", 1])])
    before = listed.read_text()
    _tree(tmp_path / "train", ["a"], n=1)  # fixed
    os.remove(img["train", 1])  # removed
    _tree(tmp_path / "val", ["a"], n=1)  # fixed
    still = BadImageLog.recheck(str(listed))
    assert still == [("train", img["train", 2]), ("val", img["val", 1])]  # train 3 was readable all along
    assert (tmp_path / "bad_images.previous.txt").read_text() == before
    assert train.found() == still and len(train.entries()) == 2
    _tree(tmp_path / "train", ["a"], n=3)
    _tree(tmp_path / "val", ["a"], n=2)
    assert BadImageLog.recheck(str(listed)) == [] and not listed.exists()
    assert BadImageLog.recheck(str(listed)) == []  # nothing listed: nothing to do

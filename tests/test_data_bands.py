"""Files of any number of bands (issue 23, items 2, 6 and 7): 16-bit grayscale PNG, `.npy` and
(multi-page) TIFF folders, a CSV list and shards of such files read back as [N, H, W] float
tensors equal to what NumPy and tifffile say the files hold; a NaN sample or one of another band
count met during a run is replaced and counted; a split's first sample of the wrong kind is one
line before any compute (the real script: exit 2, nothing written); the synthetic set with
N bands carries its class in the last band only.

The datasets are built without a transform (the sample as the reader gives it), so these tests
see the files, not the augmentation."""
import argparse
import hashlib
import os

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from tests.helpers import TINY, run
from tests.test_errors import one_line
from util.data import BadImageLog, check_data
from util.data import csv as csv_kind
from util.data import folder as folder_kind
from util.data import wds as wds_kind
from util.data.bands import BadSample, FormatError, load_bands
from util.data.synthetic import SyntheticShapes
from util.errors import UserError
from util.make_shards import make_shards

H, W = 12, 10


def _args(data_path, in_chans, **kw):
    base = dict(data_set="image_folder", data_path=str(data_path), eval_data_path=None, disable_eval=True,
                eval=False, jpeg_draft=False, in_chans=in_chans)
    base.update(kw)
    return argparse.Namespace(**base)


def _scaled(a):
    """What the reader must give for the stored array `a` ([C, H, W]): NumPy's own arithmetic."""
    if a.dtype == np.uint8:
        return a.astype(np.float32) / np.float32(255)
    if a.dtype == np.uint16:
        return a.astype(np.float32) / np.float32(65535)
    return a.astype(np.float32)


def _random(rng, dtype, shape):
    if dtype == np.float32:
        return rng.normal(0, 3, shape).astype(np.float32)  # float data as stored: any range
    return rng.integers(0, np.iinfo(dtype).max + 1, shape, dtype=dtype)


def _items(ds):
    return [ds[i] for i in range(len(ds))]


def test_16_bit_grayscale_png_folder_keeps_its_range(tmp_path):
    rng = np.random.default_rng(0)
    truth = {}
    for c in ("a", "b"):
        os.makedirs(tmp_path / "train" / c)
        for i in range(3):
            px = rng.integers(0, 65536, (H, W), dtype=np.uint16)
            px[0, 0] = 65535 - i  # values far above 8 bits
            path = tmp_path / "train" / c / f"{i}.png"
            Image.fromarray(px).save(path)
            truth[str(path)] = px
    assert Image.open(path).mode == "I;16"  # Pillow's 16-bit grayscale
    ds, n = folder_kind.build(True, _args(tmp_path, 1), None)
    assert n == 2 and len(ds) == 6
    for (x, label), (path, target) in zip(_items(ds), ds.samples):
        assert label == target and x.dtype == torch.float32 and x.shape == (1, H, W)
        assert torch.equal(x[0], torch.from_numpy(_scaled(truth[path])))
        assert x.max() > 0.99  # not clipped to 8 bits
    with pytest.raises(UserError, match=r"has 1 band, but --in_chans is 3; pass --in_chans 1"):
        folder_kind.build(True, _args(tmp_path, 3), None)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_npy_folder_chw_and_hwc(tmp_path, dtype):
    rng = np.random.default_rng(1)
    truth = {}
    for c in ("a", "b"):
        os.makedirs(tmp_path / "train" / c)
        for i, layout in enumerate(("chw", "hwc", "chw", "hwc")):
            a = _random(rng, dtype, (4, H, W))
            path = tmp_path / "train" / c / f"{i}.npy"
            np.save(path, a if layout == "chw" else a.transpose(1, 2, 0))
            truth[str(path)] = a
    ds, _ = folder_kind.build(True, _args(tmp_path, 4), None)
    assert len(ds) == 8
    for (x, _), (path, _) in zip(_items(ds), ds.samples):
        assert x.dtype == torch.float32 and x.shape == (4, H, W)
        assert torch.equal(x, torch.from_numpy(_scaled(truth[path])))


def test_three_band_uint8_arrays_stay_rgb_images_and_pillow_images_keep_their_bands(tmp_path):
    """The contract with the transforms: 8-bit 3-band data with --in_chans 3 is an RGB image (a);
    Pillow images keep their bands when --in_chans asks (L one, RGBA four), and with 3 an L or
    RGBA image becomes RGB as it always did."""
    rng = np.random.default_rng(2)
    a = rng.integers(0, 256, (3, H, W), dtype=np.uint8)
    np.save(tmp_path / "rgb.npy", a)
    img = load_bands(str(tmp_path / "rgb.npy"), 3)
    assert isinstance(img, Image.Image) and img.mode == "RGB"
    assert np.array_equal(np.asarray(img), a.transpose(1, 2, 0))
    rgba = rng.integers(0, 256, (H, W, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    x = load_bands(str(tmp_path / "rgba.png"), 4)
    assert torch.equal(x, torch.from_numpy(_scaled(rgba.transpose(2, 0, 1))))
    as_rgb = load_bands(str(tmp_path / "rgba.png"), 3)
    assert as_rgb.mode == "RGB" and np.array_equal(np.asarray(as_rgb), rgba[..., :3])
    Image.fromarray(rgba[..., 0], "L").save(tmp_path / "gray.png")
    assert torch.equal(load_bands(str(tmp_path / "gray.png"), 1)[0], torch.from_numpy(_scaled(rgba[..., 0])))
    gray_rgb = load_bands(str(tmp_path / "gray.png"), 3)
    assert gray_rgb.mode == "RGB" and np.array_equal(np.asarray(gray_rgb)[..., 1], rgba[..., 0])


def _write_tiffs(folder, rng):
    """Three layouts of 5 bands: one page per band (uint16), one planar page (float32), one
    page of interleaved samples (uint8): {path: [C, H, W] as written}."""
    os.makedirs(folder)
    bands = _random(rng, np.uint16, (5, H, W))
    with tifffile.TiffWriter(folder / "pages.tif") as t:
        for b in bands:
            t.write(b, photometric="minisblack")
    planar = _random(rng, np.float32, (5, H, W))
    tifffile.imwrite(folder / "planar.tiff", planar, photometric="minisblack", planarconfig="separate")
    inter = _random(rng, np.uint8, (H, W, 5))
    tifffile.imwrite(folder / "samples.tif", inter, photometric="minisblack", planarconfig="contig")
    return {str(folder / "pages.tif"): bands, str(folder / "planar.tiff"): planar,
            str(folder / "samples.tif"): inter.transpose(2, 0, 1)}


def test_multi_band_tiff_folder(tmp_path):
    rng = np.random.default_rng(3)
    truth = {**_write_tiffs(tmp_path / "train" / "a", rng), **_write_tiffs(tmp_path / "train" / "b", rng)}
    for path, a in truth.items():  # tifffile, the witness, reads what was written
        with tifffile.TiffFile(path) as t:
            pages = [p.asarray() for p in t.pages]
        assert sum(p.size for p in pages) == a.size
    ds, _ = folder_kind.build(True, _args(tmp_path, 5), None)
    assert len(ds) == 6
    for (x, _), (path, _) in zip(_items(ds), ds.samples):
        assert x.shape == (5, H, W) and torch.equal(x, torch.from_numpy(_scaled(truth[path])))


def test_csv_list_of_npy(tmp_path):
    rng = np.random.default_rng(4)
    os.makedirs(tmp_path / "arrays")
    rows, truth = [], {}
    for i in range(6):
        a = _random(rng, np.uint16, (H, W, 2))
        path = tmp_path / "arrays" / f"{i}.npy"
        np.save(path, a)
        rows.append(f"arrays/{i}.npy,{'wet' if i % 2 else 'dry'}")
        truth[str(path)] = a.transpose(2, 0, 1)
    (tmp_path / "train.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    args = _args(tmp_path / "train.csv", 2, data_set="csv")
    check_data(args)
    ds, n = csv_kind.build(True, args, None)
    assert n == 2 and ds.classes == ["dry", "wet"]
    for (x, label), (path, target) in zip(_items(ds), ds.samples):
        assert label == target == int(os.path.basename(path)[0]) % 2
        assert torch.equal(x, torch.from_numpy(_scaled(truth[path])))


def test_shards_of_npy_and_tiff_read_back_equal(tmp_path):
    """util.make_shards packs .npy (and TIFF) files; --data_set wds reads them back bit-equal."""
    rng = np.random.default_rng(5)
    truth = []
    for split, n in (("train", 5), ("val", 2)):
        for c in ("x", "y"):
            os.makedirs(tmp_path / "src" / split / c)
            for i in range(n):
                a = _random(rng, np.float32 if i % 2 else np.uint16, (3, H, W))
                if i == 0:
                    tifffile.imwrite(tmp_path / "src" / split / c / f"{i}.tif", a, photometric="minisblack",
                                     planarconfig="separate")
                else:
                    np.save(tmp_path / "src" / split / c / f"{i}.npy", a)
                if split == "train":
                    truth.append((c == "y", _scaled(a).tobytes()))
    made = make_shards(str(tmp_path / "src"), str(tmp_path / "out"), 3)
    assert made == {"train": (4, 10), "val": (2, 4)}
    args = _args(tmp_path / "out", 3, data_set="wds", disable_eval=False)
    check_data(args)
    ds, n = wds_kind.build(True, args, None)
    got = []
    for x, label in _items(ds):
        assert x.dtype == torch.float32 and x.shape == (3, H, W)
        got.append((bool(label), x.numpy().tobytes()))
    assert sorted(got) == sorted(truth)
    with pytest.raises(UserError, match=r"the first training sample: .*train-000000.tar:\d+ has 3 bands"):
        wds_kind.check(_args(tmp_path / "out", 4, data_set="wds"))


def test_nan_and_wrong_band_count_mid_run_are_replaced_and_counted(tmp_path):
    rng = np.random.default_rng(6)
    os.makedirs(tmp_path / "train" / "a")
    for i in range(6):
        np.save(tmp_path / "train" / "a" / f"{i}.npy", rng.random((2, H, W), dtype=np.float32))
    nan = tmp_path / "train" / "a" / "2.npy"
    bad = rng.random((2, H, W), dtype=np.float32)
    bad[1, 3, 4] = np.nan
    np.save(nan, bad)
    inf = tmp_path / "train" / "a" / "3.npy"
    np.save(inf, np.full((2, H, W), np.inf, dtype=np.float32))
    three = tmp_path / "train" / "a" / "4.npy"
    np.save(three, rng.random((3, H, W), dtype=np.float32))  # another band count, not the first sample
    damaged = tmp_path / "train" / "a" / "5.npy"
    damaged.write_bytes(np.lib.format.MAGIC_PREFIX + b"\x01\x00garbage")
    with pytest.raises(BadSample, match="NaN or infinite"):
        load_bands(str(nan), 2)
    ds, _ = folder_kind.build(True, _args(tmp_path, 2), None)  # the first sample is fine: no error
    ds.bad_log = BadImageLog(str(tmp_path / "bad_images.txt"))
    xs = _items(ds)
    assert all(torch.isfinite(x).all() and x.shape == (2, H, W) for x, _ in xs)
    assert torch.equal(xs[2][0], xs[0][0]) and torch.equal(xs[5][0], xs[0][0])  # 2 to 5 unusable: sample 0
    assert ds.bad_log.found() == [("train", str(p)) for p in (nan, inf, three, damaged)]
    assert ds.still_unreadable(str(nan)) and ds.still_unreadable(str(three))
    np.save(nan, np.zeros((2, H, W), dtype=np.float32))  # fixed: a relaunch takes it off the list
    assert not ds.still_unreadable(str(nan))
    assert BadImageLog.recheck(ds.bad_log.path, lambda split, name: ds.still_unreadable(name)) == \
        [("train", str(inf)), ("train", str(three)), ("train", str(damaged))]


def _rgb_folder(root):
    for split in ("train", "val"):
        for c in ("a", "b"):
            os.makedirs(root / split / c)
            for i in range(2):
                Image.new("RGB", (W, H), (i * 90, 10, 200)).save(root / split / c / f"{i}.png")


def _bad_first(tmp_path, case):
    """(args, fragment of the line) of a data folder whose first sample cannot serve the run."""
    d = tmp_path / case
    if case == "rgb_at_4_bands":
        _rgb_folder(d)
        return _args(d, 4, disable_eval=False), "has 3 bands, but --in_chans is 4; pass --in_chans 3"
    os.makedirs(d / "train" / "a")
    first = d / "train" / "a" / "0"
    if case == "npy_2d":
        np.save(f"{first}.npy", np.zeros((H, W), np.uint16))
        return _args(d, 4), "is a 2-D array (12, 10) (one band), but --in_chans is 4"
    if case == "npy_int16":
        np.save(f"{first}.npy", np.zeros((2, H, W), np.int16))
        return _args(d, 2), "holds int16 data; save uint8, uint16 or float32"
    if case == "tiff_pages_differ":
        with tifffile.TiffWriter(f"{first}.tif") as t:
            t.write(np.zeros((H, W), np.uint16), photometric="minisblack")
            t.write(np.zeros((H, W + 1), np.uint16), photometric="minisblack")
        return _args(d, 2), "its pages differ in size (12x10, 12x11)"
    if case == "unknown_type":
        (d / "data.h9").write_bytes(b"\x89HDF\r\n")
        (d / "train.csv").write_text("path,label\ndata.h9,a\n")
        return _args(d / "train.csv", 3, data_set="csv"), "data.h9: no reader for .h9 files"
    assert case == "cifar_at_4_bands"
    return _args(d, 4, data_set="CIFAR"), "CIFAR-100 images have 3 bands (RGB), but --in_chans is 4"


@pytest.mark.parametrize("case", ["rgb_at_4_bands", "npy_2d", "npy_int16", "tiff_pages_differ", "unknown_type",
                                  "cifar_at_4_bands"])
def test_first_sample_is_checked_before_compute(tmp_path, case):
    """Both the launcher's check (check_data, before queueing) and the dataset build refuse a
    first sample that cannot serve the run, in one line naming the file and the fix."""
    args, fragment = _bad_first(tmp_path, case)
    with pytest.raises(UserError) as e:
        check_data(args)
    assert fragment in str(e.value) and "\n" not in str(e.value)
    if case != "cifar_at_4_bands":  # no CIFAR files here: build stops at its own check
        kind = {"image_folder": folder_kind, "csv": csv_kind}[args.data_set]
        with pytest.raises(UserError, match="the first training sample: ") as e:
            kind.build(True, args, None)
        assert fragment in str(e.value)


def test_format_errors_are_bad_samples():
    """Mid-run, a FormatError is a bad sample like a NaN: replaced and counted, not a crash."""
    assert issubclass(FormatError, BadSample) and issubclass(BadSample, ValueError)


def test_first_sample_band_mismatch_is_one_line_and_writes_nothing(tmp_path):
    """The real script on an RGB folder with --in_chans 4: one `error:` line, exit 2, no run folder."""
    _rgb_folder(tmp_path / "data")
    out = tmp_path / "out"
    r = run("main_finetune.py", TINY + ["--data_set", "image_folder", "--data_path", str(tmp_path / "data"),
                                        "--in_chans", "4", "--color_jitter", "0", "--batch_size", "2",
                                        "--epochs", "1", "--output_dir", str(out)], check=False)
    line = one_line(r, "has 3 bands, but --in_chans is 4; pass --in_chans 3")
    assert "data/train/a/0.png" in line
    assert not out.exists()


def test_synthetic_bands_last_carries_the_class():
    """N = 4: the last band shows the label's pattern; bands 0-2 show random classes that say
    nothing of the label. A nearest-centroid classifier on translation-invariant features (FFT
    magnitudes) learns the class from band 3 and stays at chance on bands 0-2 together."""
    train, val = SyntheticShapes("train", 300, 32, in_chans=4), SyntheticShapes("val", 150, 32, in_chans=4)
    x = train.image(0)
    assert x.dtype == torch.float32 and x.shape == (4, 32, 32) and 0 <= x.min() and x.max() <= 1
    assert all(train.band_classes(i)[-1] == train.label(i) for i in range(len(train)))
    hits = [c == train.label(i) for i in range(len(train)) for c in train.band_classes(i)[:3]]
    assert abs(np.mean(hits) - 0.1) < 0.05  # the other bands' classes are drawn apart from the label

    def features(ds, bands):
        out = []
        for i in range(len(ds)):
            b = ds.image(i).numpy()[bands]
            f = np.abs(np.fft.fft2(b - b.mean((1, 2), keepdims=True)))
            out.append((f / (np.linalg.norm(f, axis=(1, 2), keepdims=True) + 1e-6)).reshape(-1))
        return np.array(out)

    y_tr = np.array([train.label(i) for i in range(len(train))])
    y_va = np.array([val.label(i) for i in range(len(val))])

    def accuracy(bands):
        f_tr, f_va = features(train, bands), features(val, bands)
        centroids = np.stack([f_tr[y_tr == c].mean(0) for c in range(10)])
        return (((f_va[:, None] - centroids[None]) ** 2).sum(-1).argmin(1) == y_va).mean()

    assert accuracy([3]) > 0.8
    assert accuracy([0, 1, 2]) < 0.2  # chance is 0.1


def test_synthetic_rgb_is_unchanged():
    """N = 3: the images of before the bands existed, byte for byte (a hash of 24 of them)."""
    h = hashlib.sha256()
    for split in ("train", "val"):
        ds = SyntheticShapes(split, 12, 40, seed=5, in_chans=3)
        for i in range(12):
            img = ds.image(i)
            assert isinstance(img, Image.Image) and img.mode == "RGB"
            h.update(img.tobytes())
    assert h.hexdigest() == "fd3f57d4dabebe8882f8441fc8d02f06d99f1e356acf997fb5157e204ec27e6d"

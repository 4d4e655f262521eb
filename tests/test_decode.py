"""--jpeg_draft (util/data/decode.py): reduced-size JPEG decoding under the crop, the same random
draws as timm's and torchvision's crops, the bad-image path, and a short run."""
import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation as RRC
from torchvision import transforms
from torchvision.transforms import functional as F

from benchmarks.bench_data import counting_drafts
from tests.helpers import TINY, run
from util.data.decode import (decode_rgb, drafted, drafting, open_lazily, reduction, resize_size, resized_box,
                              simd_resized_crop)

MAD_BOUND = 6.0  # 0-255 units; measured about 1-3 on benchmarks/make_bench_images.py images
ROUNDING_MAD = 0.05  # torch's uint8 kernel against Pillow's: about 0.02 on bench images


def _jpeg(path, size=(1000, 750), seed=0):
    from benchmarks.make_bench_images import bench_image
    img = bench_image(np.random.default_rng(seed), 1.0).resize(size)
    img.save(path, quality=90)
    return str(path)


def test_reduction_only_when_shrunk_twice_and_never_below_the_crop(tmp_path):
    img = Image.open(_jpeg(tmp_path / "a.jpg"))
    assert reduction(img, 1.99)[0] == 1
    assert reduction(img, 2.0)[0] == 2 and reduction(img, 3.9)[0] == 2
    assert reduction(img, 4.0)[0] == 4 and reduction(img, 100)[0] == 8
    png = tmp_path / "a.png"
    Image.open(tmp_path / "a.jpg").save(png)
    assert reduction(Image.open(png), 8)[0] == 1  # not a JPEG
    loaded = Image.open(tmp_path / "a.jpg")
    loaded.load()
    assert reduction(loaded, 8)[0] == 1  # decoded already
    for shrink in (2.0, 2.7, 4.3, 9.0):
        dec, ratio = drafted(Image.open(tmp_path / "a.jpg"), shrink)
        assert ratio == 1 / reduction(Image.open(tmp_path / "a.jpg"), shrink)[0]
        assert dec.size[0] >= 1000 * ratio and dec.size[1] >= 750 * ratio and dec.mode == "RGB"


@pytest.mark.parametrize("size", [224, 64, 32])
def test_same_draws_as_timm_and_a_crop_close_to_the_full_decode(tmp_path, size):
    path = _jpeg(tmp_path / "a.jpg")
    plain = RRC(size, interpolation="bicubic")
    ours = drafting(plain)
    fired = 0
    for seed in range(12):
        random.seed(seed)
        want = plain(decode_rgb(Image.open(path)))
        state = random.getstate()
        random.seed(seed)
        with counting_drafts() as counts:
            got = ours(open_lazily(path))
        assert random.getstate() == state  # the same draws, in the same number
        assert got.size == want.size == (size, size) and got.mode == "RGB"
        diff = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)).mean()
        if counts["hits"]:
            fired += 1
            assert diff < MAD_BOUND
        else:
            assert diff < ROUNDING_MAD  # not drafted: timm's pixels up to the SIMD kernel's rounding
    if size <= 64:
        assert fired > 0


@pytest.mark.parametrize("interpolation", [Image.BILINEAR, Image.BICUBIC, transforms.InterpolationMode.BICUBIC])
def test_simd_resize_is_pillows_up_to_rounding(tmp_path, interpolation):
    img = decode_rgb(Image.open(_jpeg(tmp_path / "a.jpg", size=(400, 300))))
    for box, size in (((10, 20, 310, 270), (224, 224)), ((0, 0, 400, 300), (96, 64)),  # down, w != h
                      ((50, 40, 110, 130), (224, 160)), ((0, 0, 224, 224), (224, 224))):  # up, same size
        want = F.resized_crop(img, box[1], box[0], box[3] - box[1], box[2] - box[0], [size[1], size[0]],
                              interpolation)
        got = simd_resized_crop(img, box, size, interpolation)
        assert got.size == want.size == size and got.mode == "RGB"
        diff = np.abs(np.asarray(got, np.int16) - np.asarray(want, np.int16))
        assert diff.mean() < ROUNDING_MAD and diff.max() <= 16, (box, size)


def test_simd_resize_falls_back_to_pillow_where_torch_differs(tmp_path):
    img = decode_rgb(Image.open(_jpeg(tmp_path / "a.jpg", size=(200, 150))))
    for interpolation, box in ((Image.NEAREST, (0, 0, 100, 100)), (Image.LANCZOS, (0, 0, 100, 100)),
                               (Image.BICUBIC, (150, 100, 250, 200))):  # a box reaching outside: Pillow pads
        want = F.resized_crop(img, box[1], box[0], box[3] - box[1], box[2] - box[0], [32, 32], interpolation)
        assert np.array_equal(np.asarray(simd_resized_crop(img, box, (32, 32), interpolation)), np.asarray(want))
    gray = img.convert("L")
    want = F.resized_crop(gray, 0, 0, 100, 100, [32, 32], Image.BICUBIC)
    assert np.array_equal(np.asarray(simd_resized_crop(gray, (0, 0, 100, 100), (32, 32), Image.BICUBIC)),
                          np.asarray(want))


def test_same_box_on_the_full_image(tmp_path):
    path = _jpeg(tmp_path / "a.jpg")
    random.seed(3)
    want = RRC.get_params(decode_rgb(Image.open(path)), (0.08, 1.0), (3 / 4, 4 / 3))
    random.seed(3)
    got = RRC.get_params(open_lazily(path), (0.08, 1.0), (3 / 4, 4 / 3))  # the header's size only
    assert got == want


def test_pretrain_crop_draws_torch_rng_as_torchvision(tmp_path):
    path = _jpeg(tmp_path / "a.jpg")
    plain = transforms.RandomResizedCrop(48, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC)
    ours = drafting(plain)
    torch.manual_seed(0)
    want = plain(decode_rgb(Image.open(path)))
    torch.manual_seed(0)
    got = ours(open_lazily(path))
    assert got.size == want.size == (48, 48)
    assert np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)).mean() < MAD_BOUND


def test_eval_resize_same_size_as_torchvision(tmp_path):
    path = _jpeg(tmp_path / "a.jpg", size=(1000, 700))
    for size in (64, (40, 40), 256):
        plain = transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC)
        want = plain(decode_rgb(Image.open(path)))
        got = drafting(plain)(open_lazily(path))
        assert got.size == want.size == resize_size(1000, 700, size)
        assert np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)).mean() < MAD_BOUND


def test_png_unaffected(tmp_path):
    Image.open(_jpeg(tmp_path / "a.jpg")).convert("L").save(tmp_path / "a.png")
    plain = RRC(32, interpolation="bicubic")
    random.seed(1)
    want = plain(Image.open(tmp_path / "a.png").convert("RGB"))
    random.seed(1)
    got = drafting(plain)(open_lazily(str(tmp_path / "a.png")))
    assert np.array_equal(np.asarray(got), np.asarray(want))
    assert resized_box(want, 1.0, (0, 0, 32, 32), (16, 16), plain.interpolation).size == (16, 16)


def _folder(root, n=6, size=(200, 150)):
    for split in ("train", "val"):
        for i in range(n):
            d = root / split / f"c{i % 2}"
            d.mkdir(parents=True, exist_ok=True)
            _jpeg(d / f"{i}.jpg", size=size, seed=i)
    return root


def test_truncated_jpeg_is_counted_and_replaced(tmp_path):
    from tests.test_data import make_args
    from util.data import BadImageLog, build_dataset
    root = _folder(tmp_path / "d")
    bad = root / "train" / "c0" / "0.jpg"
    bad.write_bytes(bad.read_bytes()[:800])  # the header is whole, the scan data cut off
    for draft in (True, False):
        args = make_args(data_set="image_folder", data_path=str(root), input_size=32, jpeg_draft=draft)
        ds, _ = build_dataset(True, args)
        ds.bad_log = BadImageLog(str(tmp_path / f"bad{draft}.txt"))
        x, _ = ds[0]
        assert x.shape == (3, 32, 32)
        assert ds.bad_log.found() == [("train", str(bad))]
    args = make_args(data_set="image_folder", data_path=str(root), input_size=32, jpeg_draft=True)
    va, _ = build_dataset(False, args)
    va.bad_log = BadImageLog(str(tmp_path / "badval.txt"), "val")
    assert va[0][0].shape == (3, 32, 32) and len(va.bad_log.found()) == 0


def test_finetune_run_with_draft_and_uint8_batches(tmp_path):
    root = _folder(tmp_path / "d", n=8)
    args = [a for a in TINY]
    i = args.index("--data_set")
    args[i + 1] = "image_folder"
    run("main_finetune.py", args + ["--data_path", str(root), "--jpeg_draft", "True", "--device_transforms", "true",
                                    "--epochs", "1", "--batch_size", "4", "--aa", "rand-m9-mstd0.5-inc1",
                                    "--reprob", "0.25", "--output_dir", str(tmp_path / "out")])
    assert (tmp_path / "out" / "log.txt").exists()


def test_shards_open_lazily_and_a_truncated_jpeg_is_replaced(tmp_path):
    import tarfile

    from tests.test_data import make_args
    from util.data import BadImageLog, build_dataset
    from util.make_shards import make_shards
    make_shards(str(_folder(tmp_path / "src", n=8, size=(400, 300))), str(tmp_path / "out"), 4)
    shard = tmp_path / "out" / "train-000000.tar"
    with tarfile.open(shard) as t:
        m = next(m for m in t if m.name.endswith(".jpg"))
    with open(shard, "r+b") as f:  # the header kept, the scan data zeroed: opens, fails to decode
        f.seek(m.offset_data + 700)
        f.write(b"\0" * (m.size - 700))
    args = make_args(data_set="wds", data_path=str(tmp_path / "out"), input_size=64, jpeg_draft=True,
                     disable_eval=False, eval=False)
    ds, _ = build_dataset(True, args)
    ds.bad_log = BadImageLog(str(tmp_path / "bad.txt"))
    random.seed(0)
    with counting_drafts() as counts:
        xs = [ds[i][0] for i in range(len(ds))]
    assert all(x.shape == (3, 64, 64) for x in xs)
    assert counts["calls"] >= len(ds) and counts["hits"] > 0
    assert len(ds.bad_log.found()) == 1


def test_csv_lists_open_lazily_so_the_draft_fires(tmp_path):
    """--data_set csv decodes under the crop too, and a truncated JPEG is replaced and counted."""
    from tests.test_data import make_args
    from util.data import BadImageLog, build_dataset
    root = _folder(tmp_path / "d", n=6, size=(400, 300))
    images = sorted((root / "train").rglob("*.jpg"))
    images[0].write_bytes(images[0].read_bytes()[:800])
    csv = tmp_path / "train.csv"
    csv.write_text("path,label\n" + "".join(f"{p},{p.parent.name}\n" for p in images))
    args = make_args(data_set="csv", data_path=str(csv), input_size=64, jpeg_draft=True)
    ds, _ = build_dataset(True, args)
    ds.bad_log = BadImageLog(str(tmp_path / "bad.txt"))
    random.seed(0)
    with counting_drafts() as counts:
        assert all(ds[i][0].shape == (3, 64, 64) for i in range(len(ds)))
    assert counts["hits"] > 0
    assert ds.bad_log.found() == [("train", str(images[0]))]

"""--device_transforms: uint8 batches from the workers, finished on the device (normalisation,
random erasing seeded per sample). Runs on the CPU, the same code path as on CUDA."""
import argparse

import pytest
import torch
from torch.utils.data import DataLoader

from main_finetune import get_args_parser
from util.config import parse_args
from util.data import SeededTransform, SyntheticShapes, TrainSampler, build_transform, mean_std
from util.data.device_batches import DeviceBatches, RandomErasingBySample, on_device


def _args(*extra):
    return parse_args(get_args_parser(), ["--data_set", "synthetic", "--input_size", "64", *extra])


def _loader(args, uint8, is_train=True, n=12, batch=4):
    ds = SyntheticShapes("train", n, 80, transform=build_transform(is_train, args, uint8))
    sampler = TrainSampler(n, seed=3)
    return DataLoader(SeededTransform(ds, with_seed=uint8), sampler=sampler, batch_size=batch)


@pytest.mark.parametrize("is_train", [True, False], ids=["train", "eval"])
def test_device_path_gives_the_worker_paths_batches(is_train):
    """Without erasing, uint8 batches normalised on the device equal the float batches the
    workers make today (the same crops and RandAugment ops, the same normalisation)."""
    args = _args("--reprob", "0")
    cpu = torch.device("cpu")
    floats = list(_loader(args, False, is_train))
    finished = list(DeviceBatches(_loader(args, True, is_train), cpu, *mean_std(args)))
    assert len(floats) == len(finished) == 3
    for (x, y), (u, v) in zip(floats, finished):
        assert u.dtype == torch.float32 and torch.equal(y, v)
        torch.testing.assert_close(u, x, atol=1e-5, rtol=0)


def test_loader_workers_return_uint8_and_the_sample_seed():
    images, targets, seeds = next(iter(_loader(_args(), True)))
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 64, 64)
    assert seeds.dtype == torch.int64 and len(set(seeds.tolist())) == 4


def test_erasing_follows_each_images_seed_not_the_batch_or_global_rng():
    """An image is erased the same way whichever batch it is in and whatever the process-wide
    generators hold: the basis of exact resume and of 1-vs-2-process equality."""
    erase = RandomErasingBySample(1.0, "pixel", max_count=2)
    base = torch.zeros(6, 3, 32, 32)
    seeds = torch.arange(100, 106)
    a = erase(base.clone(), seeds)
    torch.manual_seed(123)
    b = erase(base[[4, 1]].clone(), seeds[[4, 1]])  # other batch, other global RNG state
    assert torch.equal(a[[4, 1]], b)
    assert all((img != 0).any() for img in a)                # probability 1: every image erased
    assert not torch.equal(a[0], a[1])                       # other seeds, other boxes and noise
    assert torch.equal(erase(base.clone(), seeds), a)        # the same seeds, the same result


def test_erasing_probability_and_box_sizes_follow_timms_recipe():
    erase = RandomErasingBySample(0.25, "const")
    imgs = erase(torch.ones(400, 3, 40, 40), torch.arange(400))
    erased = (imgs == 0).all(dim=1).flatten(1).float().mean(1)  # fraction of each image erased
    hit = erased > 0
    assert 0.17 < hit.float().mean() < 0.33                  # about 25 % of the images
    assert erased[hit].min() >= 0.015 and erased[hit].max() <= 0.34  # 2 % to 1/3 of the image


def test_erasing_modes():
    img = torch.ones(1, 3, 40, 40)
    rand = RandomErasingBySample(1.0, "rand")(img.clone(), torch.tensor([7]))[0]
    box = rand[:, (rand != 1).any(0).any(1)][:, :, (rand != 1).any(0).any(0)]
    assert box.numel() and all(len(torch.unique(ch)) == 1 for ch in box)  # one colour per channel
    const = RandomErasingBySample(1.0, "const")(img.clone(), torch.tensor([7]))[0]
    assert (const == 0).any() and set(torch.unique(const).tolist()) <= {0.0, 1.0}


def test_auto_means_on_cuda_only():
    ns = argparse.Namespace
    assert on_device(ns(device_transforms="auto"), torch.device("cuda")) is True
    assert on_device(ns(device_transforms="auto"), torch.device("cpu")) is False
    assert on_device(ns(device_transforms="True"), torch.device("cpu")) is True
    assert on_device(ns(device_transforms="false"), torch.device("cuda")) is False


def test_erasing_without_seeds_is_refused():
    loader = [(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(2, dtype=torch.long))]
    batches = DeviceBatches(loader, torch.device("cpu"), (0.5,) * 3, (0.5,) * 3,
                            erasing=RandomErasingBySample(1.0))
    with pytest.raises(ValueError, match="sample seeds"):
        next(iter(batches))

"""Batches finished on the training device (--device_transforms), as timm's PrefetchLoader does.

Loader workers then return uint8 images (decode, crop, flip, RandAugment: no float work on the
CPU), or float 0-1 ones for data that is not 8-bit RGB (16-bit, float or multi-band files: any
number of bands); `DeviceBatches` copies each batch to the device (`non_blocking`, from pinned memory on
CUDA, on a side stream one batch ahead), converts and normalises it there and applies random
erasing. Mixup / cutmix already run on the device, in the task's loss. Whatever is random here is drawn from each image's own
sample seed (util/data/loaders.TrainSampler), not from a process-wide generator, so a batch's
erased boxes and noise do not depend on the number of processes or on where a run was resumed.
"""
import math
import random

import torch

# A sample seed is also what seeds the worker's augmentation (SeededTransform); the erasing
# stream is derived from it (an LCG step) so the two streams are not the same numbers.
_MUL, _ADD = 6364136223846793005, 1442695040888963407


def on_device(args, device):
    """Whether this run finishes its batches on the device: `auto` means on CUDA (on a CPU the
    "device" is the loader's own CPU, where the workers do that work in parallel)."""
    choice = str(args.device_transforms).lower()
    return device.type == "cuda" if choice == "auto" else choice == "true"


def erasing_seed(sample_seed):
    return (int(sample_seed) * _MUL + _ADD) % 2 ** 63


class RandomErasingBySample:
    """timm's RandomErasing (timm.data.RandomErasing: applied after normalisation, modes const,
    rand and pixel, 1 to `max_count` boxes each of 2-33 % of the image over the box count, aspect
    0.3-3.3, ten tries per box) with each image's draws seeded by its sample seed: its own
    `random.Random` for the boxes and one reused device generator, re-seeded per image, for
    the noise."""

    def __init__(self, probability, mode="pixel", max_count=1, min_area=0.02, max_area=1 / 3, min_aspect=0.3):
        self.probability, self.mode = float(probability), mode.lower()
        self.max_count = max(1, int(max_count or 1))
        self.min_area, self.max_area = min_area, max_area
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
        self.generators = {}

    def _generator(self, device):
        if device not in self.generators:
            self.generators[device] = torch.Generator(device=device)
        return self.generators[device]

    def __call__(self, images, seeds):
        """Erase in place: `images` [N, C, H, W] normalised, `seeds` the N sample seeds."""
        if self.probability <= 0:
            return images
        for img, seed in zip(images, seeds.tolist()):
            self.erase(img, erasing_seed(seed))
        return images

    def erase(self, img, seed):
        rng = random.Random(seed)
        if rng.random() > self.probability:
            return
        chan, h_img, w_img = img.shape
        area = h_img * w_img
        count = 1 if self.max_count == 1 else rng.randint(1, self.max_count)
        gen = self._generator(img.device)
        gen.manual_seed(seed)
        for _ in range(count):
            for _attempt in range(10):
                target = rng.uniform(self.min_area, self.max_area) * area / count
                aspect = math.exp(rng.uniform(*self.log_aspect))
                h = int(round(math.sqrt(target * aspect)))
                w = int(round(math.sqrt(target / aspect)))
                if w < w_img and h < h_img:
                    top, left = rng.randint(0, h_img - h), rng.randint(0, w_img - w)
                    img[:, top:top + h, left:left + w] = self._fill((chan, h, w), img, gen)
                    break

    def _fill(self, shape, img, gen):
        if self.mode == "pixel":
            return torch.randn(shape, generator=gen, device=img.device, dtype=img.dtype)
        if self.mode == "rand":
            return torch.randn((shape[0], 1, 1), generator=gen, device=img.device, dtype=img.dtype)
        return torch.zeros((shape[0], 1, 1), device=img.device, dtype=img.dtype)


def _per_band(values, scale, device):
    """[1, bands, 1, 1] float32 on `device`: `values` times `scale` (computed in Python's double)."""
    return torch.tensor([scale * v for v in values], dtype=torch.float32, device=device).view(1, -1, 1, 1)


class DeviceBatches:
    """Iterates a DataLoader of uint8 (0-255) or float (0-1) batches `(images, targets[, sample
    seeds])` of any number of bands and yields `[images, targets]` on `device`: images float32,
    normalised with the per-band `mean`/`std` (0-1 units), erased by `erasing` (which needs the
    seeds). Everything else (len, sampler, batch_size) is the loader's."""

    def __init__(self, loader, device, mean, std, channels_last=False, erasing=None):
        self.loader, self.device, self.erasing = loader, device, erasing
        self.mean, self.std = _per_band(mean, 1, device), _per_band(std, 1, device)  # float batches, 0-1
        self.mean255, self.std255 = _per_band(mean, 255, device), _per_band(std, 255, device)  # uint8, 0-255
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __iter__(self):
        if self.device.type != "cuda":
            for batch in self.loader:
                yield self.finish(batch)
            return
        yield from self._prefetched()

    def _prefetched(self):
        """CUDA: batch i+1 is copied and finished on a side stream while the model computes on
        batch i (timm's PrefetchLoader); the compute stream waits for it before using it."""
        side, ahead = torch.cuda.Stream(device=self.device), None
        for batch in self.loader:
            with torch.cuda.stream(side):
                nxt = self.finish(batch)
            if ahead is not None:
                yield ahead
            main = torch.cuda.current_stream(self.device)
            main.wait_stream(side)
            for t in nxt:
                t.record_stream(main)  # the side stream's allocations are now used on the main one
            ahead = nxt
        if ahead is not None:
            yield ahead

    def finish(self, batch):
        images, targets, *seeds = batch
        x = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
        if x.dtype == torch.uint8:
            x = x.float().sub_(self.mean255).div_(self.std255)
        else:  # float 0-1 bands: a new tensor (on the CPU `to` may hand back the loader's own)
            x = torch.sub(x.float(), self.mean).div_(self.std)
        if self.erasing is not None:
            if not seeds:
                raise ValueError("random erasing on the device needs the loader's sample seeds")
            self.erasing(x, seeds[0])
        return [x, targets.to(self.device, non_blocking=True)]


def device_loader(loader, args, device, erasing=None):
    """`loader` itself, or (--device_transforms) its uint8 batches finished on `device`, erased
    there by `erasing` (a RandomErasingBySample, training batches only)."""
    if not on_device(args, device):
        return loader
    from util.data import mean_std
    return DeviceBatches(loader, device, *mean_std(args), args.channels_last, erasing)

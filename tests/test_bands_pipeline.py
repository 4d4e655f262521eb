"""Any number of bands through the transforms, the device batches, FCMAE and --finetune's stem
(issue 23): a float tensor [N, H, W] in 0-1 units (16-bit and multi-band files) goes through
the same timm / torchvision ops as an 8-bit RGB PIL image, whose path stays exactly as it was."""
import argparse
import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from main_finetune import get_args_parser
from main_pretrain import get_args_parser as get_pretrain_parser
from util.config import parse_args
from util.data import SeededTransform, TrainSampler, mean_std
from util.data.device_batches import DeviceBatches, RandomErasingBySample
from util.data.transforms import build_pretrain_transform, build_transform, build_vis_transform

S = 32
MEAN4, STD4 = (0.1, 0.2, 0.3, 0.4), (0.5, 0.25, 0.2, 0.1)


def ft_args(*extra):
    return parse_args(get_args_parser(), ["--data_set", "synthetic", "--input_size", str(S), *extra])


def pt_args(*extra):
    return parse_args(get_pretrain_parser(), ["--data_set", "synthetic", "--input_size", str(S), *extra])


def bands_args(n, parser=ft_args, *extra):
    """N bands with their own statistics (4) or the default 0.5 per band (1)."""
    stats = ["--mean", *map(str, MEAN4), "--std", *map(str, STD4)] if n == 4 else []
    rgb_only = ["--aa", "none"] if parser is ft_args else []
    return parser("--in_chans", str(n), *rgb_only, *stats, *extra)


def seed_all(seed):
    """Python's, numpy's (RandAugment picks its ops with it) and torch's generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def constant_bands(n, h=48, w=56):
    """Each band one value (0.2, 0.4, ...): a crop, resize or flip leaves it as it is, so the
    output shows the normalisation alone."""
    return torch.stack([torch.full((h, w), 0.2 * (c + 1) % 1.0) for c in range(n)])


def expected(x, args):
    mean, std = mean_std(args)
    values = x[:, 0, 0]
    return torch.stack([(values[c] - mean[c]) / std[c] for c in range(len(values))])


def transforms_of(args, pretrain):
    """(float, uint8) transforms: fine-tuning train / eval, or pretraining."""
    if pretrain:
        return [build_pretrain_transform(args), build_pretrain_transform(args, uint8=True)]
    return [build_transform(True, args), build_transform(False, args),
            build_transform(True, args, uint8=True), build_transform(False, args, uint8=True)]


@pytest.mark.parametrize("n", [4, 1])
@pytest.mark.parametrize("pretrain", [False, True], ids=["finetune", "pretrain"])
def test_a_float_tensor_of_n_bands_comes_out_n_x_s_x_s_normalised(n, pretrain):
    args = bands_args(n, pt_args) if pretrain else bands_args(n, ft_args, "--reprob", "0")
    assert mean_std(args)[0] == (MEAN4 if n == 4 else (0.5,))
    x = constant_bands(n)
    built = transforms_of(args, pretrain)
    half = len(built) // 2
    for i, t in enumerate(built):
        out = t(x.clone())
        assert out.shape == (n, S, S) and out.dtype == torch.float32
        if i < half:  # normalised per band in the workers
            want = expected(x, args)
        else:  # uint8 (--device_transforms): a tensor sample stays float 0-1, unnormalised
            want = x[:, 0, 0]
        torch.testing.assert_close(out, want[:, None, None].expand(n, S, S), atol=1e-5, rtol=0)


@pytest.mark.parametrize("pretrain", [False, True], ids=["finetune", "pretrain"])
def test_vflip_flips_upside_down(pretrain):
    """--vflip 1: the same draws (crop, horizontal flip) as without it, the result upside
    down; the default 0 adds no op."""
    build = (lambda a: build_pretrain_transform(a)) if pretrain else (lambda a: build_transform(True, a))
    parser = pt_args if pretrain else ft_args
    extra = [] if pretrain else ["--reprob", "0", "--scale", "1", "1"]
    rows = torch.linspace(0, 1, 40)[:, None].expand(40, 40)  # varies top to bottom only
    x = torch.stack([rows, 1 - rows, rows ** 2, rows.sqrt()])
    outs = []
    for vflip in ("0", "1"):
        t = build(bands_args(4, parser, *extra, "--vflip", vflip))
        assert any(isinstance(op, transforms.RandomVerticalFlip) for op in t.transforms) == (vflip == "1")
        seed_all(5)
        outs.append(t(x.clone()))
    torch.testing.assert_close(outs[1], outs[0].flip(-2), atol=1e-6, rtol=0)
    assert not torch.allclose(outs[1], outs[0])


def rgb_image(seed=0, size=(60, 48)):
    g = torch.Generator().manual_seed(seed)
    px = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
    return Image.fromarray(px, "RGB")


def old_transforms(args, uint8, pretrain=False):
    """The transforms as they were built before bands (timm's create_transform without vflip,
    ToTensor / PILToTensor): what an 8-bit RGB image must still give, bit for bit. Fine-tuning's
    (train, eval), or pretraining's."""
    from timm.data import create_transform

    from util.data.transforms import _guard_posterize
    mean, std = mean_std(args)
    last = [transforms.PILToTensor()] if uint8 else [transforms.ToTensor(), transforms.Normalize(mean, std)]
    bicubic = transforms.InterpolationMode.BICUBIC
    if pretrain:
        return transforms.Compose([transforms.RandomResizedCrop(S, scale=(0.2, 1.0), interpolation=bicubic),
                                   transforms.RandomHorizontalFlip()] + last)
    aa = args.aa if args.aa not in (None, "", "none", "None") else None
    train = _guard_posterize(create_transform(
        input_size=S, is_training=True, color_jitter=args.color_jitter, auto_augment=aa, scale=tuple(args.scale),
        interpolation=args.train_interpolation, re_prob=args.reprob, re_mode=args.remode, re_count=args.recount,
        mean=mean, std=std, use_prefetcher=uint8))
    evaluation = transforms.Compose([transforms.Resize(int(S / (224 / 256)), interpolation=bicubic),
                                     transforms.CenterCrop(S)] + last)
    return train, evaluation


@pytest.mark.parametrize("uint8", [False, True], ids=["float", "uint8"])
def test_an_8_bit_rgb_image_gives_exactly_what_it_gave_before(uint8):
    """Default flags (RandAugment, random erasing, ImageNet statistics): the same ops, the same
    draws, the same tensors."""
    args, pargs = ft_args(), pt_args()
    new = (build_transform(True, args, uint8), build_transform(False, args, uint8),
           build_pretrain_transform(pargs, uint8))
    old = (*old_transforms(args, uint8), old_transforms(pargs, uint8, pretrain=True))
    for a, b in zip(new, old):
        assert len(a.transforms) == len(b.transforms)  # no flip added by the default --vflip 0
        for seed in range(4):
            img = rgb_image(seed)
            outs = []
            for t in (a, b):
                seed_all(seed)
                outs.append(t(img.copy()))
            assert outs[0].dtype == (torch.uint8 if uint8 else torch.float32)
            assert torch.equal(outs[0], outs[1])


def test_jpeg_draft_still_drafts_a_jpeg_and_passes_a_tensor_through(tmp_path):
    """--jpeg_draft: a lazily opened JPEG is decoded by the drafting op as before; a tensor of
    bands (nothing to decode) goes through the plain op."""
    from util.data.decode import draft_first, open_lazily
    rgb_image(1, (200, 160)).save(tmp_path / "a.jpg", quality=90)
    args = ft_args("--jpeg_draft", "true", "--reprob", "0")
    t = build_transform(True, args)
    assert getattr(t, "decodes", False)
    old = draft_first(old_transforms(args, False)[0])
    outs = []
    for tr in (t, old):
        seed_all(2)
        outs.append(tr(open_lazily(tmp_path / "a.jpg")))
    assert torch.equal(*outs)
    bands = bands_args(4, ft_args, "--jpeg_draft", "true", "--reprob", "0")
    for tr in (build_transform(True, bands), build_transform(False, bands), build_pretrain_transform(
            bands_args(4, pt_args, "--jpeg_draft", "true"))):
        assert pickle.loads(pickle.dumps(tr))(constant_bands(4)).shape == (4, S, S)  # pickles: workers


def test_random_erasing_in_the_workers_erases_every_band():
    """timm's RandomErasing after the normalisation: one box through all 4 bands."""
    args = bands_args(4, ft_args, "--reprob", "1", "--remode", "const")
    x = constant_bands(4)
    out = build_transform(True, args)(x)
    box = out == 0  # const mode: zeros; the normalised constants are not 0
    assert box.any() and all(torch.equal(box[0], box[c]) for c in range(4))
    rest = ~box[0]
    for c in range(4):
        torch.testing.assert_close(out[c][rest], expected(x, args)[c].expand(int(rest.sum())), atol=1e-5, rtol=0)


def test_mixup_cutmix_and_the_loss_on_4_bands():
    """timm's Mixup / cutmix (the task's loss) mixes 4-band batches; the 4-band model's loss
    goes backward into every band of its stem."""
    import engine_finetune
    args = bands_args(4, ft_args, "--model", "convnextv2_atto", "--mixup", "0.8", "--cutmix", "1.0")
    torch.manual_seed(0)
    model = engine_finetune.build_model(args, 10)
    mixup = engine_finetune.build_mixup(args, 10)
    criterion = engine_finetune.build_criterion(args, mixup)
    x, y = torch.randn(4, 4, S, S), torch.arange(4)
    mixed, soft = mixup(x.clone(), y)
    assert mixed.shape == x.shape and soft.shape == (4, 10) and not torch.equal(mixed, x)
    engine_finetune.classification_loss(model, (x, y), criterion, mixup).backward()
    assert model.downsample_layers[0][0].weight.grad[:, 3].abs().sum() > 0


class Bands(Dataset):
    """Float 0-1 samples of 4 bands, as util/data's readers give 16-bit and multi-band files."""

    def __init__(self, transform, n=8):
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 4, 40, 44, generator=g)
        self.transform = transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i]), i % 2


@pytest.mark.parametrize("is_train", [True, False], ids=["train", "eval"])
def test_device_batches_normalise_float_batches_as_the_workers_do(is_train):
    """--device_transforms with float samples: the workers' unnormalised 0-1 batches, normalised
    on the device per band (no 255 factor), equal the workers' own normalised batches."""
    args = bands_args(4, ft_args, "--reprob", "0")

    def loader(uint8):
        ds = SeededTransform(Bands(build_transform(is_train, args, uint8)), with_seed=uint8)
        return DataLoader(ds, sampler=TrainSampler(len(ds), seed=3), batch_size=4)

    floats = list(loader(False))
    finished = list(DeviceBatches(loader(True), torch.device("cpu"), *mean_std(args)))
    assert len(floats) == len(finished) == 2
    for (x, y), (u, v) in zip(floats, finished):
        assert u.shape == (4, 4, S, S) and u.dtype == torch.float32 and torch.equal(y, v)
        torch.testing.assert_close(u, x, atol=1e-5, rtol=0)


def test_device_batches_float_and_uint8_normalisation():
    mean, std = MEAN4, STD4
    batches = DeviceBatches(None, torch.device("cpu"), mean, std)
    x = torch.rand(2, 4, 8, 8)
    kept = x.clone()
    out, _ = batches.finish((x, torch.zeros(2, dtype=torch.long)))
    m, s = torch.tensor(mean).view(1, 4, 1, 1), torch.tensor(std).view(1, 4, 1, 1)
    torch.testing.assert_close(out, (x - m) / s, atol=1e-6, rtol=0)
    assert torch.equal(x, kept)  # the loader's batch untouched
    u = torch.randint(0, 256, (2, 4, 8, 8), dtype=torch.uint8)
    out, _ = batches.finish((u, torch.zeros(2, dtype=torch.long)))
    want = u.float().sub_(torch.tensor([255 * v for v in mean]).view(1, 4, 1, 1)).div_(
        torch.tensor([255 * v for v in std]).view(1, 4, 1, 1))
    assert torch.equal(out, want)  # bit for bit as before bands


def test_random_erasing_on_the_device_erases_every_band():
    erase = RandomErasingBySample(1.0, "pixel")
    out = erase(torch.zeros(3, 5, 32, 32), torch.arange(3))
    for img in out:
        box = img != 0
        assert box.any() and all(torch.equal(box[0], box[c]) for c in range(5))  # one box, all bands


def test_fcmae_at_4_bands_predicts_p_p_4_and_normalises_its_target_over_all_bands():
    import engine_pretrain
    args = argparse.Namespace(model="convnextv2_atto", mask_ratio=0.6, decoder_depth=1, decoder_embed_dim=32,
                              norm_pix_loss=True, input_size=64, grad_checkpointing=False, in_chans=4)
    torch.manual_seed(0)
    model = engine_pretrain.build_model(args)
    p = model.patch_size
    x = torch.randn(2, 4, 64, 64)
    loss, pred, mask = model(x)
    assert pred.shape == (2, (64 // p) ** 2, p * p * 4) and model.pred.out_channels == p * p * 4
    assert torch.equal(model.unpatchify(model.patchify(x)), x)
    # the target: each removed patch's p*p*4 values normalised together
    target = model.patchify(x)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    m = mask.bool()
    torch.testing.assert_close(loss, (pred[m] - target[m]).pow(2).mean(-1).mean(), atol=1e-5, rtol=1e-5)
    loss.backward()
    stem = model.encoder.downsample_layers[0][0].weight
    assert stem.shape[1] == 4 and stem.grad is not None and stem.grad[:, 3].abs().sum() > 0


@pytest.mark.parametrize("n", [4, 1])
def test_reconstruction_grid_shows_bands_1_to_3_or_band_1(n):
    from engine_pretrain import reconstruction_grid
    from models import create_fcmae
    torch.manual_seed(0)
    model = create_fcmae("convnextv2_atto", decoder_embed_dim=32, in_chans=n)
    args = bands_args(n, pt_args)
    mean, std = mean_std(args)
    images = torch.randn(2, n, 64, 64) * 0.3
    grid = reconstruction_grid(model, images, mean, std, 0.6)
    assert grid.shape == (3, 3 * 66 + 2, 2 * 66 + 2) and 0 <= grid.min() and grid.max() <= 1
    shown = min(n, 3)
    first = (images[0, :shown] * torch.tensor(std[:shown]).view(-1, 1, 1)
             + torch.tensor(mean[:shown]).view(-1, 1, 1)).clamp(0, 1)
    torch.testing.assert_close(grid[:, 2:66, 2:66], first.expand(3, 64, 64), atol=1e-6, rtol=0)
    assert build_vis_transform(args)(constant_bands(n)).shape == (n, S, S)


def three_band_checkpoint(tmp_path, fcmae=False):
    from models import create_fcmae, create_model
    torch.manual_seed(0)
    model = create_fcmae("convnextv2_atto", decoder_embed_dim=32) if fcmae else create_model(
        "convnextv2_atto", num_classes=10)
    path = tmp_path / "three.pth"
    torch.save({"model": model.state_dict()}, path)
    stem = model.encoder.downsample_layers[0][0] if fcmae else model.downsample_layers[0][0]
    return path, stem.weight.detach().clone(), model


@pytest.mark.parametrize("fcmae", [False, True], ids=["finetuned", "fcmae"])
@pytest.mark.parametrize("n", [4, 1])
def test_finetune_adapts_a_3_channel_stem_to_n_bands_in_one_line(fcmae, n, tmp_path, capsys):
    import engine_finetune
    from models.weights import fit
    path, w3, src = three_band_checkpoint(tmp_path, fcmae)
    args = argparse.Namespace(model="convnextv2_atto", drop_path=0.0, head_init_scale=1.0, grad_checkpointing=False,
                              in_chans=n, finetune=str(path), model_key="model|module", model_prefix="",
                              linear_probe=False)
    model = engine_finetune.build_model(args, 10)
    with torch.device("meta"):  # the check before any compute: the same fit, silent
        fit(engine_finetune.build_model(args, 10), torch.load(path, weights_only=True)["model"])
    assert capsys.readouterr().out == ""
    engine_finetune.load_finetune_weights(args, model)
    said = [line for line in capsys.readouterr().out.splitlines() if "adapt_input_conv" in line]
    assert len(said) == 1 and f"takes 3 bands, the model {n}" in said[0] and str(path) in said[0]
    w = model.downsample_layers[0][0].weight.detach()
    if n == 4:  # timm's adapt_input_conv: the bands repeated, scaled by 3/4
        torch.testing.assert_close(w, torch.cat([w3, w3[:, :1]], 1) * 0.75)
    else:  # one band: their sum
        torch.testing.assert_close(w, w3.sum(1, keepdim=True))
    block = "encoder.stages.0.0.dwconv.weight" if fcmae else "stages.0.0.dwconv.weight"
    assert torch.equal(model.state_dict()["stages.0.0.dwconv.weight"], src.state_dict()[block])


def test_a_timm_models_stem_is_adapted_too(tmp_path, capsys):
    import timm

    import engine_finetune
    torch.manual_seed(0)
    src = timm.create_model("convnext_atto", num_classes=10)
    torch.save({"model": src.state_dict()}, tmp_path / "timm.pth")
    args = argparse.Namespace(model="convnext_atto", drop_path=0.0, head_init_scale=1.0, grad_checkpointing=False,
                              in_chans=4, finetune=str(tmp_path / "timm.pth"), model_key="model|module",
                              model_prefix="", linear_probe=False)
    model = engine_finetune.build_model(args, 10)
    assert model.stem[0].weight.shape[1] == 4
    engine_finetune.load_finetune_weights(args, model)
    assert "stem.0.weight takes 3 bands, the model 4" in capsys.readouterr().out
    w3 = src.stem[0].weight.detach()
    torch.testing.assert_close(model.stem[0].weight.detach(), torch.cat([w3, w3[:, :1]], 1) * 0.75)

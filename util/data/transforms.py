"""Image transforms: timm's create_transform for fine-tuning, FCMAE's crop + flip for
pretraining, resize + centre crop for evaluation.

A sample is either a PIL image in RGB (8-bit files, --in_chans 3) or a float32 tensor
[in_chans, H, W] in 0-1 units (16-bit and multi-band files, util/data's readers): every op here
(timm's and torchvision's crops, resizes, flips, MaybeToTensor, Normalize, RandomErasing) takes
both, so a tensor keeps its bands and its precision; RandAugment and colour jitter are
refused off 3 bands (util/flag_checks.py). With `uint8` (--device_transforms) a PIL image ends
in a uint8 tensor and a tensor sample stays float 0-1: normalisation and random erasing then
run on the device (util/data/device_batches.py)."""
import functools

from PIL import Image
from torchvision import transforms

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def posterize_zero_bits_safe(img, bits_to_keep, **kw):
    """timm's posterize, but 0 bits gives a black image (as Pillow < 13 did) instead of Pillow
    13's ValueError: timm's RandAugment 'increasing' posterize can ask for 0 bits. Module-level,
    so the train transform pickles (DataLoader workers started with spawn or forkserver)."""
    if bits_to_keep <= 0:
        from PIL import Image
        return Image.new(img.mode, img.size)
    from timm.data.auto_augment import posterize
    return posterize(img, bits_to_keep, **kw)


def _augment_ops(t):
    """timm's AugmentOp objects inside a built transform: Compose holds `transforms`,
    RandAugment and AugMix `ops`, AutoAugment `policy` (lists of ops)."""
    from timm.data.auto_augment import AugmentOp
    if isinstance(t, AugmentOp):
        yield t
    elif isinstance(t, (list, tuple)):
        for x in t:
            yield from _augment_ops(x)
    else:
        for attr in ("transforms", "ops", "policy"):
            yield from _augment_ops(getattr(t, attr, ()))


def _guard_posterize(transform):
    """This transform's posterize ops use our guarded op; timm's module stays as it is."""
    from timm.data.auto_augment import posterize
    for op in _augment_ops(transform):
        if op.aug_fn is posterize:
            op.aug_fn = posterize_zero_bits_safe
    return transform


def _pil_drafted(drafting, plain, img):
    """A PIL image through the drafting op; any other sample (a tensor of bands) through the
    plain op. Module-level, so it pickles (DataLoader workers)."""
    return drafting(img) if isinstance(img, Image.Image) else plain(img)


def _draft(transform, args):
    """--jpeg_draft: the first op (random resized crop or resize) decodes a lazily opened JPEG at
    reduced size when its output is that much smaller anyway (util/data/decode.py); a tensor
    sample (nothing to decode) goes through the op itself."""
    if not args.jpeg_draft:
        return transform
    from util.data.decode import draft_first
    ops = getattr(transform, "transforms", None)
    plain = ops[0] if ops else None
    transform = draft_first(transform)
    if getattr(transform, "decodes", False):
        ops[0] = functools.partial(_pil_drafted, ops[0], plain)
    return transform


def mean_std(args):
    """Per-band (mean, std) of the 0-1 data: --mean/--std, else ImageNet's (or 0.5) for 3 bands
    as --imagenet_default_mean_and_std says, else 0.5 per band."""
    mean, std = (0.5,) * args.in_chans, (0.5,) * args.in_chans
    if args.in_chans == 3 and args.imagenet_default_mean_and_std:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    return tuple(args.mean or mean), tuple(args.std or std)


def to_tensor(uint8, mean, std):
    """The last steps: a PIL image to a uint8 tensor (`uint8`) or to a normalised float one; a
    tensor sample (already float 0-1) is left as it is, then normalised unless `uint8`."""
    from timm.data.transforms import MaybePILToTensor, MaybeToTensor
    if uint8:
        return [MaybePILToTensor()]
    return [MaybeToTensor(), transforms.Normalize(mean, std)]


def _flips(args):
    """The horizontal flip (p 0.5) and, with --vflip P, a vertical one."""
    flips = [transforms.RandomHorizontalFlip()]
    if args.vflip > 0:
        flips.append(transforms.RandomVerticalFlip(p=args.vflip))
    return flips


def build_transform(is_train, args, uint8=False):
    """Fine-tuning transforms: timm's create_transform for training, resize + centre crop for eval.
    `uint8`: no normalisation nor random erasing here (timm's prefetcher layout)."""
    mean, std = mean_std(args)
    size = args.input_size
    if is_train:
        from timm.data import create_transform
        aa = args.aa if args.aa not in (None, "", "none", "None") else None
        return _draft(_guard_posterize(create_transform(
            input_size=size, is_training=True, color_jitter=args.color_jitter, auto_augment=aa,
            scale=tuple(args.scale),
            interpolation=args.train_interpolation, re_prob=args.reprob, re_mode=args.remode,
            re_count=args.recount, mean=mean, std=std, use_prefetcher=uint8, vflip=args.vflip)), args)
    steps = []
    if size >= 384:  # as in the original: no crop at large sizes
        steps.append(transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BICUBIC))
    else:
        crop_pct = args.crop_pct if args.crop_pct else 224 / 256
        steps += [transforms.Resize(int(size / crop_pct), interpolation=transforms.InterpolationMode.BICUBIC),
                  transforms.CenterCrop(size)]
    return _draft(transforms.Compose(steps + to_tensor(uint8, mean, std)), args)


def build_pretrain_transform(args, uint8=False):
    """The original FCMAE augmentation: RandomResizedCrop(0.2-1, bicubic) + horizontal flip
    (+ --vflip's vertical one)."""
    mean, std = mean_std(args)
    return _draft(transforms.Compose([
        transforms.RandomResizedCrop(args.input_size, scale=(0.2, 1.0),
                                     interpolation=transforms.InterpolationMode.BICUBIC),
        *_flips(args)] + to_tensor(uint8, mean, std)), args)


def build_vis_transform(args):
    """The reconstruction grid's images (pretraining's TensorBoard): resize + centre crop to
    --input_size, normalised."""
    mean, std = mean_std(args)
    return transforms.Compose([transforms.Resize(args.input_size), transforms.CenterCrop(args.input_size),
                               *to_tensor(False, mean, std)])

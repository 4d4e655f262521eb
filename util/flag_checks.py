"""The kinds of check a flag of the table (util/flags.py) can carry, and the checks that need
more than a range: each returns None (fine) or the one-line message, naming the flag and a
valid value. They read only the parsed flags (no files, no dataset: util/validate.py does that).
"""
import difflib
import re
from dataclasses import dataclass

_ALL = ("finetune", "pretrain", "slurm")

# Names timm accepts (or fails deep inside with an AssertionError or KeyError, or, for Mixup's
# mode, silently takes as "batch").
INTERPOLATIONS = ("random", "bicubic", "bilinear", "nearest", "box", "hamming", "lanczos")  # timm's train crop
REMODES = ("pixel", "rand", "const")  # timm's RandomErasing (case-insensitive there)
MIXUP_MODES = ("batch", "pair", "elem")  # timm's Mixup
DEVICES = "auto, cpu, cuda, cuda:N or mps"  # util/distributed.resolve_device


def _show(values):
    return " ".join(str(v) for v in values) if isinstance(values, (list, tuple)) else str(values)


@dataclass(frozen=True)
class Range:
    """low <= value <= high (open ends with low_open / high_open); None passes (a flag whose
    default None means "off"). `message` replaces the whole line where it names two flags."""
    low: float = None
    high: float = None
    low_open: bool = False
    high_open: bool = False
    text: str = None
    hint: str = ""
    message: str = None
    kinds: tuple = _ALL

    def ok(self, v):
        if v is None:
            return True
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            return False
        return self.high is None or (v < self.high if self.high_open else v <= self.high)

    def describe(self):
        if self.text:
            return self.text
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low}"
        return f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"

    def __call__(self, name, args):
        value = getattr(args, name)
        if self.ok(value):
            return None
        return self.message or f"--{name} {value} must be {self.describe()}{self.hint}"


@dataclass(frozen=True)
class Choice:
    """One of a set of names (checked after parsing, so the message is one line)."""
    choices: tuple
    ignore_case: bool = False
    kinds: tuple = _ALL

    def describe(self):
        return "one of " + ", ".join(self.choices)

    def __call__(self, name, args):
        value = getattr(args, name)
        if (str(value).lower() if self.ignore_case else value) in self.choices:
            return None
        return f"--{name} {value!r} is unknown; use one of {', '.join(self.choices)}"


@dataclass(frozen=True)
class Rule:
    """A check of its own: `fn(args)` -> None or the message (may look at other flags).
    `needs_torch`: `fn` imports torch, timm or the models (the checks after the cheap ones)."""
    fn: object
    kinds: tuple = _ALL
    needs_torch: bool = False

    def describe(self):
        return (self.fn.__doc__ or self.fn.__name__).strip().splitlines()[0].rstrip(".")

    def __call__(self, name, args):
        return self.fn(args)


def _kept_patches(size, mask_ratio):
    """32-px patches an image of `size` keeps under `mask_ratio` (as models/fcmae.py counts them)."""
    return int((size // 32) ** 2 * (1 - mask_ratio))


def working_size(size, mask_ratio):
    """The multiple of 32 nearest `size` (the larger on a tie) whose images keep at least 2
    patches under `mask_ratio`, else the next larger one that does: a size to suggest. A ratio
    outside (0, 1), which its own check refuses, counts as the default 0.6."""
    ratio = mask_ratio if isinstance(mask_ratio, (int, float)) and 0 < mask_ratio < 1 else 0.6
    s = max(32, (size + 16) // 32 * 32)
    while _kept_patches(s, ratio) < 2:
        s += 32
    return s


def multiple_of_32(args):
    """a multiple of 32, at least 32 (the encoder's stride)"""
    s = args.input_size
    if s % 32 == 0 and s >= 32:
        return None
    return (f"--input_size {s} must be a multiple of 32 (the encoder's stride), e.g. "
            f"{working_size(s, args.mask_ratio)}")


def mask_keeps_a_patch(args):
    """keeps at least one 32-px patch of --input_size"""
    patches = (args.input_size // 32) ** 2
    if _kept_patches(args.input_size, args.mask_ratio) >= 1:
        return None
    return (f"--input_size {args.input_size} has {patches} patch(es) of 32 px and --mask_ratio "
            f"{args.mask_ratio} keeps none of them; use a larger --input_size (e.g. "
            f"{working_size(args.input_size, args.mask_ratio)}) or a lower --mask_ratio")


def start_epoch(args):
    """in [0, --epochs)"""
    if 0 <= args.start_epoch < args.epochs:
        return None
    return f"--start_epoch {args.start_epoch} must be in [0, --epochs)"


def device(args):
    """auto, cpu, cuda, cuda:N or mps"""
    name = args.device
    if name in (None, "", "auto", "cpu", "cuda", "mps") or re.fullmatch(r"cuda:\d+", str(name)):
        return None
    return f"--device {name!r} is not a device; use {DEVICES}"


def scale(args):
    """MIN MAX with 0 < MIN <= MAX <= 1 (fractions of the image area)"""
    s = args.scale
    if isinstance(s, (list, tuple)) and len(s) == 2 and 0 < s[0] <= s[1] <= 1:
        return None
    return (f"--scale {_show(args.scale)} must be MIN MAX with 0 < MIN <= MAX <= 1 (fractions of the "
            "image area), e.g. 0.08 1.0")


def opt_betas(args):
    """two values in [0, 1)"""
    b = args.opt_betas
    if b is None or (len(b) == 2 and all(0 <= v < 1 for v in b)):
        return None
    return f"--opt_betas {_show(b)} must be two values in [0, 1), e.g. 0.9 0.999"


def even_batch_for_mixing(args):
    """with mixup or cutmix, an even --batch_size (timm's Mixup mixes the batch with its reverse)"""
    mixing = args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None
    if not mixing or args.eval or args.batch_size % 2 == 0:
        return None
    return (f"--batch_size {args.batch_size} must be even with --mixup/--cutmix (timm's Mixup mixes the batch "
            f"with its reverse), e.g. {args.batch_size + 1}")


def cutmix_minmax(args):
    """MIN MAX with 0 <= MIN < MAX <= 1 that leaves a range of box sides at --input_size"""
    mm = args.cutmix_minmax
    if mm is None:
        return None
    if len(mm) != 2:
        why = "needs two values, MIN MAX (box side as a fraction of the image side), e.g. 0.2 0.8"
    elif not 0 <= mm[0] < mm[1] <= 1:
        why = "must be MIN MAX with 0 <= MIN < MAX <= 1, e.g. 0.2 0.8"
    elif int(args.input_size * mm[0]) >= int(args.input_size * mm[1]):
        # timm draws the box side between MIN and MAX times the image side, rounded down
        why = (f"gives no range of box sides at --input_size {args.input_size} "
               f"({int(args.input_size * mm[0])} to {int(args.input_size * mm[1])} px); widen it, e.g. 0.2 0.8")
    else:
        return None
    return f"--cutmix_minmax {_show(mm)} {why}"


def optimizer(args):
    """an optimizer timm knows (lookahead_<name> adds Lookahead)"""
    # timm's factory splits the name at '_' and takes the last part; a first part other than
    # 'lookahead' is ignored
    from timm.optim import list_optimizers
    known = list_optimizers()
    parts = str(args.opt).lower().split("_")
    if parts[-1] in known and (len(parts) == 1 or parts[:-1] == ["lookahead"]):
        return None
    close = difflib.get_close_matches(parts[-1], known, n=3)
    hint = f"did you mean {', '.join(close)}?" if close else "e.g. adamw"
    return f"--opt {args.opt!r} is not an optimizer timm knows ({hint}; lookahead_<name> adds Lookahead)"


def mean_std(args):
    """one value per --in_chans band each (--std above 0), or left out"""
    for name in ("mean", "std"):
        values = getattr(args, name)
        if values is not None and len(values) != args.in_chans:
            return (f"--{name} {_show(values)} gives {len(values)} values for --in_chans {args.in_chans}; give one "
                    f"per band (or leave --mean and --std out: 0.5 per band)")
    if args.std is not None and min(args.std) <= 0:
        return f"--std {_show(args.std)} must be above 0 for every band"
    return None


def rgb_augment(args):
    """RandAugment and colour jitter with --in_chans 3 only (they are defined on RGB images)"""
    aa = args.aa not in (None, "", "none", "None")
    if args.in_chans == 3 or not (aa or args.color_jitter):
        return None
    what = " and ".join(w for w, on in (("--aa " + str(args.aa), aa), ("--color_jitter", args.color_jitter)) if on)
    return (f"{what} work on RGB images only, not on --in_chans {args.in_chans} bands; "
            "pass --aa none --color_jitter 0")


def augment_policy(args):
    """a timm augmentation policy (RandAugment, AugMix, AutoAugment) or none"""
    aa = args.aa
    if aa in (None, "", "none", "None"):
        return None
    from timm.data.auto_augment import (augment_and_mix_transform, auto_augment_transform,
                                        rand_augment_transform)
    hparams = {"translate_const": 100, "img_mean": (124, 116, 104)}
    try:  # parsed as timm.data.create_transform would, by the policy's prefix
        if aa.startswith("rand"):
            rand_augment_transform(aa, hparams)
        elif aa.startswith("augmix"):
            augment_and_mix_transform(aa, dict(hparams, translate_pct=0.3))
        else:
            auto_augment_transform(aa, hparams)
    except (AssertionError, ValueError, KeyError, IndexError, TypeError) as e:
        why = f" ({e})" if str(e) else ""
        return (f"--aa {aa!r} is not a timm augmentation policy{why}; use e.g. rand-m9-mstd0.5-inc1 "
                "(RandAugment), augmix-m5-w3, original, v0, 3a, or none")
    return None


def grad_checkpointing(args):
    """a model that can recompute its blocks: ours, or a timm model with set_grad_checkpointing"""
    if not args.grad_checkpointing:
        return None
    from models import ModelError, create_model, model_names
    if args.model in model_names():
        return None
    import timm
    import torch
    if not timm.is_model(args.model):
        return None  # the model check names the close matches
    try:
        with torch.device("meta"):  # shapes only: no memory, no init
            create_model(args.model, grad_checkpointing=True)
    except ModelError as e:  # it names its argument, grad_checkpointing: name the flag instead
        return "--" + str(e)
    except Exception:  # a model that cannot be built shape-only: the real build decides
        return None
    return None

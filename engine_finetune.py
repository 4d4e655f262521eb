"""Fine-tuning as a Task (util/trainer.py): the classes and model (ours or any timm model, from
--finetune weights, the first stages frozen with --freeze_stages, or all of it under a new head
with --linear_probe), the loss of a batch (mixup / cutmix, label smoothing, --bce_loss),
evaluation (top-1, top-5, top-1 per class, loss with exact distributed counts, the EMA too) and
the best metric."""
import warnings

import torch

from models.errors import ModelError
from util.console import info
from util.data.bad_images import bad_image_counts
from util.data.device_batches import device_loader, on_device
from util.distributed import is_dist
from util.errors import UserError, as_user_error
from util.trainer import Task


def build_model(args, nb_classes):
    """This run's classifier (also what the Slurm launcher's checkpoint check builds), its stem
    taking --in_chans bands (a timm model gets in_chans too)."""
    from models import create_model
    try:
        model = create_model(args.model, num_classes=nb_classes, drop_path_rate=args.drop_path,
                             head_init_scale=args.head_init_scale, grad_checkpointing=args.grad_checkpointing,
                             in_chans=args.in_chans)
    except ModelError as e:
        raise as_user_error(e, {"drop_path_rate": "--drop_path", "in_chans": "--in_chans"}) from None
    if args.linear_probe:
        add_probe_head(model, args.model)
    return model


def classifier_name(model):
    """The name of the model's classifier module: ours `head`, a timm model's get_classifier()."""
    from models.weights import is_ours
    if is_ours(model):
        return "head"
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    return next((n for n, m in model.named_modules() if n and m is head), None)


def add_probe_head(model, model_name):
    """--linear_probe, as MAE's main_linprobe.py: the classifier (a Linear) becomes
    Sequential(BatchNorm1d(in_features, affine=False, eps=1e-6), that Linear), the only part that
    trains; every other parameter gets no gradient (so no optimizer state, no decay)."""
    from models.weights import PROBE_BN_EPS
    name = classifier_name(model)
    head = model.get_submodule(name) if name else getattr(model, "get_classifier", lambda: None)()
    if name is None or not isinstance(head, torch.nn.Linear):
        raise UserError(f"--linear_probe: the classifier of {model_name} is {type(head).__name__}, not a Linear "
                        "layer; probe one of our ConvNeXt V2 models or a timm model with a Linear classifier")
    parent, _, attr = name.rpartition(".")
    model.requires_grad_(False)
    probe = torch.nn.Sequential(torch.nn.BatchNorm1d(head.in_features, affine=False, eps=PROBE_BN_EPS), head)
    probe.requires_grad_(True)
    setattr(model.get_submodule(parent), attr, probe)


def frozen_parts(module, head):
    """The largest submodules of `module` that do not hold `head`: the frozen part of a probe."""
    out = []
    for child in module.children():
        if child is head:
            continue
        if any(m is head for m in child.modules()):
            out += frozen_parts(child, head)
        else:
            out.append(child)
    return out


def keep_frozen_in_eval(frozen):
    """`model.train()` (each epoch's start) puts every module in training mode: the probe's frozen
    parts go back to evaluation (no drop_path; a timm model's BatchNorm statistics stay as
    loaded); only the head trains. Costs one attribute read per step."""
    if frozen and frozen[0].training:
        for part in frozen:
            part.eval()


def is_probe_state_dict(sd):
    """A linear probe's weights: a classifier `<name>.0` BatchNorm without affine parameters
    (running statistics, no weight) then `<name>.1` a Linear."""
    return any(k.endswith(".0.running_var") and f"{k[:-14]}.1.weight" in sd and f"{k[:-14]}.0.weight" not in sd
               for k in sd)


def check_probe_checkpoint(args):
    """A --resume checkpoint is a probe's exactly when --linear_probe is given; --eval of a
    --finetune probe file needs --linear_probe (its head would otherwise start fresh). One line
    before anything is written."""
    from models.errors import ModelError
    from models.weights import read_folder_or_safetensors, select_state_dict
    from util.checkpoint import load_checkpoint
    if args.resume:
        sd = load_checkpoint(args.resume, mmap=True)
        sd = sd.get("model") if isinstance(sd, dict) else None
        if not isinstance(sd, dict):
            return  # util/validate says what it is
        if is_probe_state_dict(sd) and not args.linear_probe:
            raise UserError(f"--resume {args.resume} is a linear probe's checkpoint (its head: BatchNorm, then "
                            "Linear); pass --linear_probe True to resume or evaluate it (python -m models.weights "
                            "convert makes it a plain classifier)")
        if args.linear_probe and not is_probe_state_dict(sd):
            raise UserError(f"--resume {args.resume} is not a linear probe's checkpoint; leave out --linear_probe "
                            "to resume it, or probe its weights with --finetune")
    elif args.eval and args.finetune and not args.linear_probe:
        try:
            ckpt = read_folder_or_safetensors(args.finetune)
            ckpt = load_checkpoint(args.finetune, mmap=True) if ckpt is None else ckpt
            sd = select_state_dict(ckpt, args.model_key, args.model_prefix)
        except (ModelError, UserError):
            return  # util/validate says what is wrong with it
        if is_probe_state_dict(sd):
            raise UserError(f"--finetune {args.finetune} is a linear probe's checkpoint; evaluating it needs "
                            "--linear_probe True (without it, its head would start fresh)")


def build_mixup(args, nb_classes):
    if not (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None):
        return None
    from timm.data import Mixup
    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                 prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                 label_smoothing=args.smoothing, num_classes=nb_classes)


def build_criterion(args, mixup_fn):
    """The training loss, as timm's train.py picks it: soft targets under mixup / cutmix (which
    smooth the labels themselves), label smoothing, or plain cross-entropy; with --bce_loss
    timm's BinaryCrossEntropy in each case."""
    from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    if args.bce_loss:
        smoothing = 0.0 if mixup_fn is not None else args.smoothing
        return BinaryCrossEntropy(smoothing=smoothing, target_threshold=args.bce_target_thresh)
    if mixup_fn is not None:
        return SoftTargetCrossEntropy()
    if args.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return torch.nn.CrossEntropyLoss()


def classification_loss(model, batch, criterion, mixup_fn=None):
    """The loss of one fine-tuning batch: mixed first when mixup / cutmix is on."""
    samples, targets = batch
    if mixup_fn is not None:
        samples, targets = mixup_fn(samples, targets)
    return criterion(model(samples), targets)


def load_finetune_weights(args, model):
    """Start from a checkpoint's weights: ours (fine-tune or FCMAE) or an official one into our
    ConvNeXt V2, or a timm model's own checkpoint into it (models.weights.load_into). Returns
    the run.json fields naming the source. Also timm's and Hugging Face's ConvNeXt V2 weights,
    from torch or safetensors files or a Hugging Face folder. A stem of another band count (3-band
    weights, --in_chans 4) is adapted by timm's adapt_input_conv, in one line said."""
    from models.weights import explain, load_into, read_folder_or_safetensors, select_state_dict
    from util.checkpoint import load_checkpoint
    try:
        ckpt = read_folder_or_safetensors(args.finetune)
        ckpt = load_checkpoint(args.finetune) if ckpt is None else ckpt
        with warnings.catch_warnings():
            if args.linear_probe:  # the probe's head is new by design: said below, not as a dropped head
                warnings.filterwarnings("ignore", message="dropping the checkpoint's classifier head")
            missing, unexpected = load_into(model, select_state_dict(ckpt, args.model_key, args.model_prefix),
                                            note=lambda line: info(f"--finetune {args.finetune}: {line}"))
    except ModelError as e:
        raise UserError(f"--finetune {args.finetune}: {explain(e, '--model')}") from None
    info(f"loaded {args.finetune}: missing keys {missing or 'none'}, unexpected keys {unexpected or 'none'}")
    if args.linear_probe:
        info(f"linear probe: {args.finetune} frozen whole; only the head (BatchNorm without affine parameters, "
             "then Linear) trains")
    from util.checkpoint import source_fields
    return source_fields(args.finetune, ckpt)


def note_head_init_scale(args):
    """A run from scratch keeps the fine-tuning default --head_init_scale 0.001 (as the original
    does); one line says what it is for and how to change it."""
    if args.head_init_scale < 1:
        info(f"note: --head_init_scale {args.head_init_scale:g} shrinks the new classifier's initial weights, "
             "as meant for a start from pretrained weights (--finetune); training from scratch, pass "
             "--head_init_scale 1.0 for a head initialised like the rest of the model")


class FinetuneTask(Task):
    """Fine-tuning (and --eval): what differs from pretraining."""
    kind = "finetune"
    lower_is_better = False

    frozen = ()  # --linear_probe: the frozen parts, kept in evaluation mode while training

    def __init__(self, args, dist):
        from util.data import build_dataset, build_eval_loader, build_transform, check_same_classes
        if args.resume or args.eval:
            check_probe_checkpoint(args)
        uint8 = on_device(args, dist.device)
        train_set, nb_classes = build_dataset(True, args, transform=build_transform(True, args, uint8))
        val_set = None
        if not (args.disable_eval and not args.eval):
            val_set = build_dataset(False, args, transform=build_transform(False, args, uint8))[0]
        if val_set is not None:
            check_same_classes(train_set, val_set)
        if args.linear_probe:  # a classifier that cannot be probed: one line before a run directory is made
            try:
                with torch.device("meta"):  # shapes only: no memory, no init
                    build_model(args, nb_classes)
            except UserError:
                raise
            except Exception:  # a model that cannot be built shape-only: the real build decides
                pass
        super().__init__(args, dist, train_set, val_set, nb_classes)
        self.best_name = "test_acc1_ema" if (args.model_ema and args.model_ema_eval) else "test_acc1"
        self.mixup_fn = build_mixup(args, nb_classes)
        self.criterion = build_criterion(args, self.mixup_fn)
        self.val_loader = None if val_set is None else device_loader(
            build_eval_loader(val_set, args, dist.world_size, dist.rank), args, dist.device)
        if args.reprob > 0:
            from util.data.device_batches import RandomErasingBySample
            self.train_erasing = RandomErasingBySample(args.reprob, args.remode, args.recount)

    def optimizer_settings(self):
        """The optimizer flags (--opt, --opt_eps, --opt_betas, --momentum, --layer_decay...)."""
        a = self.args
        return {"weight_decay": a.weight_decay, "opt": a.opt, "opt_eps": a.opt_eps, "betas": a.opt_betas,
                "momentum": a.momentum, "layer_decay": a.layer_decay, "layer_decay_type": a.layer_decay_type}

    def build_model(self):
        return build_model(self.args, self.nb_classes)

    def prepare(self, model):
        extra = {}
        if self.args.finetune:
            extra = load_finetune_weights(self.args, model)
        elif self.args.linear_probe:
            info("note: --linear_probe without --finetune probes randomly initialised weights (a random-features "
                 "baseline); pass --finetune FILE to probe pretrained ones")
        else:
            note_head_init_scale(self.args)
        n = self.args.freeze_stages
        if n:  # the stem and the first n stages: no gradients, so no optimizer state and no decay
            ours = hasattr(model, "downsample_layers")  # timm's ConvNeXt keeps its downsampling inside stages
            if not hasattr(model, "stages") or not (ours or hasattr(model, "stem")):
                raise UserError(f"--freeze_stages: {self.args.model} has no stem and stages to freeze; "
                                "use a ConvNeXt (V2) model or --freeze_stages 0")
            for part in [*model.stages[:n], *(model.downsample_layers[:n] if ours else [model.stem])]:
                part.requires_grad_(False)
        if self.args.linear_probe:  # build_model made the head and froze the rest
            self.frozen = frozen_parts(model, model.get_submodule(classifier_name(model)))
        return extra

    def make_ema(self, model):
        if not self.args.model_ema:
            return None
        from timm.utils import ModelEmaV3
        return ModelEmaV3(model, decay=self.args.model_ema_decay,
                          device="cpu" if self.args.model_ema_force_cpu else None)

    def wd_schedule(self, updates):
        from util.optim import wd_schedule
        return wd_schedule(self.args, updates)

    def loss(self, model, batch):
        keep_frozen_in_eval(self.frozen)
        return classification_loss(model, batch, self.criterion, self.mixup_fn)

    def evaluate(self, models, epoch):
        if self.val_loader is None:
            return None
        return {f"test_{k}": v for k, v in self.evaluate_models(models).items()}

    def evaluate_models(self, models):
        """The model, and the EMA with --model_ema_eval (on its own device: --model_ema_force_cpu)."""
        args, device = self.args, self.dist.device
        stats = evaluate(self.val_loader, models.model, device, models.amp, reduce=args.dist_eval,
                         channels_last=args.channels_last, num_classes=self.nb_classes)
        if models.ema is not None and args.model_ema_eval:
            ema_device = next(models.ema.module.parameters()).device
            ema = evaluate(self.val_loader, models.ema.module, ema_device,
                           models.amp if ema_device == device else None, reduce=args.dist_eval,
                           channels_last=args.channels_last, num_classes=self.nb_classes)
            stats.update({f"{k}_ema": v for k, v in ema.items()})
        return stats

    def final_eval(self, models):
        stats = {**self.evaluate_models(models),
                 **bad_image_counts(self.train_set, self.val_set, self.args.max_bad_images)}
        info(f"Accuracy of the network on the {stats['n']} test images: {stats['acc1']:.2f}%")
        if "acc1_ema" in stats:
            info(f"Accuracy of the EMA model: {stats['acc1_ema']:.2f}%")
        return stats


@torch.no_grad()
def evaluate(data_loader, model, device, amp=None, reduce=True, channels_last=False, num_classes=None):
    """Accuracy over the loader (top-1 per class too, with `num_classes`); with `reduce`, counts
    are summed over ranks (no padding, exact)."""
    model.eval()
    criterion = torch.nn.CrossEntropyLoss(reduction="sum")
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, n
    per_class = None if not num_classes else torch.zeros(2, num_classes, dtype=torch.float64, device=device)
    n_local = 0  # counted on the host: no device read per batch
    for images, target in data_loader:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        images = images.to(device, non_blocking=True, memory_format=fmt)
        target = target.to(device, non_blocking=True)
        ctx = amp.autocast() if amp is not None else torch.autocast(device.type, enabled=False)
        with ctx:
            output = model(images)
        output = output.float()
        k = min(5, output.shape[1])
        top = output.topk(k, dim=1).indices
        hit = top.eq(target[:, None])
        sums[:3] += torch.stack([criterion(output, target).double(), hit[:, :1].sum().double(),
                                 hit.sum().double()])
        if per_class is not None:  # [2, classes]: top-1 hits, samples
            per_class[0].index_add_(0, target, hit[:, 0].double())
            per_class[1].index_add_(0, target, torch.ones_like(target, dtype=torch.float64))
        n_local += len(target)
    sums[3] = n_local
    counts = sums if per_class is None else torch.cat([sums, per_class.flatten()])
    if reduce and is_dist():
        if torch.distributed.get_backend() == "nccl" and counts.device.type != "cuda":  # an EMA kept on the CPU
            counts = counts.cuda()
        torch.distributed.all_reduce(counts)
    loss, c1, c5, n = counts[:4].tolist()
    n = max(n, 1)
    stats = {"loss": loss / n, "acc1": 100 * c1 / n, "acc5": 100 * c5 / n, "n": int(n)}
    if per_class is not None:  # None for a class with no validation image
        hits, seen = counts[4:].view(2, -1).tolist()
        stats["acc1_per_class"] = [100 * h / c if c else None for h, c in zip(hits, seen)]
    info(f"* Acc@1 {stats['acc1']:.3f} Acc@5 {stats['acc5']:.3f} loss {stats['loss']:.3f} (n={stats['n']})")
    return stats


# what --predict takes from the checkpoint's settings, not from the command line: the model and
# its run's evaluation transform (the launch keeps its batch size, workers, device and autocast)
PREDICT_FROM_CHECKPOINT = ("model", "nb_classes", "in_chans", "input_size", "crop_pct", "mean", "std",
                           "imagenet_default_mean_and_std", "linear_probe", "model_ema", "model_ema_eval", "bce_loss")


def prediction_model(args):
    """--predict: the classifier of the --resume checkpoint, built with the settings its run saved
    (PREDICT_FROM_CHECKPOINT) and given the weights that run judged itself by: the EMA's when it
    picked its best by them (--model_ema True --model_ema_eval True), else the model's. Returns
    (model, settings, class names: the checkpoint's, or '0', '1', ... for one written before
    checkpoints held them). A checkpoint without a classifier is refused in one line."""
    import argparse

    from util.checkpoint import check_state_dict_matches, load_checkpoint
    ckpt = load_checkpoint(args.resume)
    saved = ckpt.get("args") if isinstance(ckpt, dict) else None
    saved = vars(saved) if isinstance(saved, argparse.Namespace) else saved  # the original scripts' checkpoints
    no_head = UserError(f"--resume {args.resume} holds no classifier to predict with (an FCMAE pretraining "
                        "checkpoint, an encoder without a head, or weights without a fine-tuning run's settings); "
                        "--predict needs a checkpoint a fine-tuning run wrote, e.g. <run>/checkpoint-best.pth: "
                        f"fine-tune (or --linear_probe) from this one first with --finetune {args.resume}")
    if not (isinstance(saved, dict) and saved.get("nb_classes") and isinstance(ckpt.get("model"), dict)):
        raise no_head
    # decoded whole (no --jpeg_draft): the evaluation transform's own pixels
    settings = argparse.Namespace(**{**vars(args), **{k: saved[k] for k in PREDICT_FROM_CHECKPOINT if k in saved},
                                     "jpeg_draft": False})
    model = build_model(settings, settings.nb_classes)
    head = classifier_name(model)
    if head is None or not any(k.startswith(f"{head}.") for k in ckpt["model"]):
        raise no_head
    ema = bool(settings.model_ema and settings.model_ema_eval and isinstance(ckpt.get("model_ema"), dict))
    weights = ckpt["model_ema"] if ema else ckpt["model"]
    check_state_dict_matches(model, weights, f"--resume {args.resume}")
    model.load_state_dict(weights)
    n = settings.nb_classes
    classes = (ckpt.get("extra") or {}).get("classes")
    if not (isinstance(classes, list) and len(classes) == n):
        info(f"note: {args.resume} holds no class names (it was written before checkpoints kept them); predictions "
             f"name classes by index, 0 to {n - 1}, the order of the run's classes (class folders sorted by name)")
        classes = [str(i) for i in range(n)]
    info(f"predicting with {settings.model} ({n} classes, {settings.in_chans} bands, {settings.input_size} px) "
         f"from {args.resume}{', its EMA weights (the run picked its best by them)' if ema else ''}")
    return model, settings, classes


@torch.no_grad()
def predict(args, dist):
    """--predict PATH --resume CKPT: the checkpoint's classifier over the inputs of PATH
    (util/predict.py) through its run's evaluation transform, in the batches --eval's loader makes
    (under torchrun rank r takes inputs r, r+W, ...), under this launch's autocast; rank 0 gathers
    every input's top-5 and writes predictions.csv atomically into --output_dir, or next to the
    checkpoint, and says where. Returns {"predictions": that path (None off rank 0), "n",
    "unreadable"}."""
    import dataclasses
    import os

    from util import distributed as du
    from util.data.loaders import build_eval_loader
    from util.data.transforms import build_transform
    from util.predict import PredictInputs, list_inputs, write_predictions
    from util.train_loop import Amp
    from util.trainer import place_model
    names, sources = list_inputs(args.predict)  # no input: one line before the checkpoint is read
    model, settings, classes = prediction_model(args)
    amp = Amp.create(args.use_amp, dist.device)
    # laid out on the device as for --eval (the same numbers); each rank alone, so no DDP
    model = place_model(model, None, amp, args, dataclasses.replace(dist, distributed=False)).model
    model.eval()
    inputs = PredictInputs(sources, build_transform(False, settings), settings.in_chans, settings.input_size)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    k = min(5, len(classes))
    local = []  # (input index, ([(class, probability)] best first, error)) of this rank's share
    for images, index, errors in build_eval_loader(inputs, settings, dist.world_size, dist.rank):
        with amp.autocast():
            logits = model(images.to(dist.device, non_blocking=True, memory_format=fmt)).float()
        top = logits.topk(k, dim=1).indices  # ranked as evaluate() ranks: top-1 is the class --eval counts
        probs = (logits.sigmoid() if settings.bce_loss else logits.softmax(dim=1)).gather(1, top)
        for i, error, c, p in zip(index.tolist(), errors, top.tolist(), probs.tolist()):
            local.append((i, ([] if error else list(zip(c, p)), error)))
    # every rank's share, by input index (with --dist_eval False every rank predicted everything)
    results = dict(row for part in du.all_gather_object(local) for row in part)
    path, unreadable = None, sum(1 for _, error in results.values() if error)
    if du.is_main_process():
        out_dir = args.output_dir or os.path.dirname(args.resume) or "."
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "predictions.csv")
        write_predictions(path, names, [results[i] for i in range(len(names))], classes)
        info(f"predicted {len(names)} inputs of {args.predict}"
             f"{f' ({unreadable} unreadable: their rows hold the error)' if unreadable else ''}: {path}")
    du.cleanup()
    return {"predictions": path, "n": len(names), "unreadable": unreadable}

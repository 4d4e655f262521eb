"""FCMAE pretraining as a Task (util/trainer.py): the model (fresh, or started from --finetune
weights), the loss of a batch (masked patches reconstructed), the best metric (the lowest
training loss) and the image grid people look at in TensorBoard to judge a run."""
import re

import torch

from models.errors import ModelError
from util.console import info
from util.data.device_batches import on_device
from util.errors import UserError, as_user_error
from util.trainer import Task

# the arguments of models.create_fcmae and the flags that set them
FLAGS = {"mask_ratio": "--mask_ratio", "decoder_depth": "--decoder_depth",
         "decoder_embed_dim": "--decoder_embed_dim", "in_chans": "--in_chans"}


def build_model(args):
    """This run's FCMAE (also what the Slurm launcher's checkpoint check builds): --in_chans bands
    in, p x p x bands values predicted per patch."""
    from models import create_fcmae
    try:
        return create_fcmae(args.model, mask_ratio=args.mask_ratio, decoder_depth=args.decoder_depth,
                            decoder_embed_dim=args.decoder_embed_dim, norm_pix_loss=args.norm_pix_loss,
                            img_size=args.input_size, grad_checkpointing=args.grad_checkpointing,
                            in_chans=args.in_chans)
    except ModelError as e:
        raise as_user_error(e, FLAGS) from None


def _and(parts):
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"


def start_line(path, start):
    """The one line that says what --finetune gave a pretraining run (models.weights.FcmaeStart)."""
    verb = "starts" if len(start.fresh) == 1 else "start"
    fresh = f"{_and(start.fresh)} {verb} fresh ({start.why_fresh})" if start.fresh else "nothing starts fresh"
    unused = f"; the file's {_and(start.unused)} are not used" if start.unused else ""
    adapted = f"; {start.adapted}" if start.adapted else ""
    text = f"{_and(start.loaded)} loaded; {fresh}{unused}{adapted}"
    return f"--finetune {path}: " + re.sub(r"\b(" + "|".join(FLAGS) + r")\b", lambda m: FLAGS[m.group(1)], text)


def load_start_weights(args, model):
    """Start a new pretraining run from --finetune weights (models.weights.fit_fcmae): the
    encoder from any format fine-tuning reads, the decoder and mask token when the file has them
    in this run's shapes, else fresh; one line says which. Returns the run.json fields."""
    from models.weights import explain, fit_fcmae, read_folder_or_safetensors, select_state_dict
    from util.checkpoint import load_checkpoint, source_fields
    try:
        ckpt = read_folder_or_safetensors(args.finetune)
        ckpt = load_checkpoint(args.finetune) if ckpt is None else ckpt
        start = fit_fcmae(model, select_state_dict(ckpt, args.model_key, args.model_prefix))
    except ModelError as e:
        raise UserError(f"--finetune {args.finetune}: {explain(e, '--model')}") from None
    result = model.load_state_dict(start.state_dict, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys  # fit_fcmae placed the model's keys only
    info(start_line(args.finetune, start))
    return source_fields(args.finetune, ckpt)


def masked_loss(model, batch, mask_ratio):
    """The loss of one pretraining batch: the removed patches' reconstruction error."""
    loss, _, _ = model(batch[0], mask_ratio=mask_ratio)
    return loss


class PretrainTask(Task):
    """FCMAE pretraining: what differs from fine-tuning."""
    kind = "pretrain"
    label = "FCMAE"
    best_name, lower_is_better = "train_loss", True

    def __init__(self, args, dist):
        from util.data import build_dataset, build_pretrain_transform
        train_set, _ = build_dataset(True, args, transform=build_pretrain_transform(args, on_device(args, dist.device)))
        super().__init__(args, dist, train_set)
        self.vis_images = None  # the grid's images, read at its first drawing (rank 0)

    def optimizer_settings(self):
        """AdamW with the original FCMAE betas (0.9, 0.95)."""
        return {"weight_decay": self.args.weight_decay, "betas": (0.9, 0.95)}

    def build_model(self):
        return build_model(self.args)

    def prepare(self, model):
        """--finetune: the weights to start from (a new run: epoch 0, its own schedule)."""
        return load_start_weights(self.args, model) if self.args.finetune else {}

    def loss(self, model, batch):
        return masked_loss(model, batch, self.args.mask_ratio)

    def show(self, tb, models, epoch):
        """The reconstruction grid every --vis_freq epochs and after the last one (rank 0)."""
        args = self.args
        if not (self.dist.is_main and args.vis_freq > 0 and (epoch % args.vis_freq == 0 or epoch + 1 == args.epochs)):
            return
        from util.data import mean_std
        if self.vis_images is None:
            from util.data import build_dataset
            from util.data.transforms import build_vis_transform
            vis_set, _ = build_dataset(True, args, transform=build_vis_transform(args))
            self.vis_images = torch.stack([vis_set[i][0] for i in range(min(8, len(vis_set)))]).to(self.dist.device)
        with models.amp.autocast():
            grid = reconstruction_grid(models.unwrapped, self.vis_images, *mean_std(args), args.mask_ratio)
        tb.image("reconstruction (original / masked / reconstructed)", grid, epoch)


@torch.no_grad()
def reconstruction_grid(model, images, mean, std, mask_ratio, seed=0):
    """Rows of (original, masked input, reconstruction with the visible patches pasted back),
    as one [3, H', W'] image in [0, 1] for TensorBoard: bands 1-3 as RGB, or band 1 as grey
    with fewer than 3 bands, each unnormalised with its own `mean`/`std`. The same mask each
    time (seeded)."""
    import torchvision
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    p = model.patch_size
    n, _, h, w = images.shape
    length = (h // p) * (w // p)
    keep = int(length * (1 - mask_ratio))
    ids = torch.rand(n, length, generator=g).argsort(dim=1)[:, :keep]
    mask = torch.ones(n, length).scatter_(1, ids, 0.0).to(images.device)
    _, pred, mask = model(images, mask=mask)
    target = model.patchify(images)
    if model.norm_pix_loss:  # pred is in per-patch normalised units: undo with the true statistics
        pred = pred * (target.var(-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(-1, keepdim=True)
    grid = (h // p, w // p)
    m = mask[..., None]
    recon = model.unpatchify(pred * m + target * (1 - m), grid)
    masked = model.unpatchify(target * (1 - m), grid)
    shown = 3 if images.shape[1] >= 3 else 1
    mean = torch.tensor(mean[:shown], device=images.device).view(1, shown, 1, 1)
    std = torch.tensor(std[:shown], device=images.device).view(1, shown, 1, 1)
    rows = [(t[:, :shown] * std + mean).clamp(0, 1).expand(-1, 3, -1, -1) for t in (images, masked, recon)]
    model.train(was_training)
    return torchvision.utils.make_grid(torch.cat(rows).float().cpu(), nrow=n, padding=2)

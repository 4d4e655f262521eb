"""One FCMAE pretraining epoch, and the image grid people look at to judge a run."""
import torch

from util.train_loop import LoopState, run_epoch


def train_one_epoch(model, data_loader, optimizer, device, epoch, state: LoopState, mask_ratio,
                    start_step=0):
    """Train for one epoch (from micro-step `start_step` when resuming). Returns train stats."""

    def loss_fn(m, batch):
        loss, _, _ = m(batch[0], mask_ratio=mask_ratio)
        return loss, None

    return run_epoch(model, loss_fn, data_loader, optimizer, device, epoch, state, start_step)


@torch.no_grad()
def reconstruction_grid(model, images, mean, std, mask_ratio, seed=0):
    """Rows of (original, masked input, reconstruction with the visible patches pasted back),
    as one [3, H', W'] image in [0, 1] for TensorBoard. The same mask each time (seeded)."""
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
    mean = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    rows = [(t * std + mean).clamp(0, 1) for t in (images, masked, recon)]
    model.train(was_training)
    return torchvision.utils.make_grid(torch.cat(rows).float().cpu(), nrow=n, padding=2)

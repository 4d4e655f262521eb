"""One fine-tuning epoch and evaluation (top-1, top-5, loss with exact distributed counts)."""
import torch
import torch.distributed as dist

from util.train_loop import LoopState, run_epoch


def train_one_epoch(model, criterion, data_loader, optimizer, device, epoch, state: LoopState,
                    mixup_fn=None, start_step=0):
    """Train for one epoch (from micro-step `start_step` when resuming). Returns train stats."""

    def loss_fn(m, batch):
        samples, targets = batch
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        return criterion(m(samples), targets), None

    return run_epoch(model, loss_fn, data_loader, optimizer, device, epoch, state, start_step)


@torch.no_grad()
def evaluate(data_loader, model, device, amp=None, reduce=True, channels_last=False):
    """Accuracy over the loader; with `reduce`, counts are summed over ranks (no padding, exact)."""
    model.eval()
    criterion = torch.nn.CrossEntropyLoss(reduction="sum")
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, n
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
        n_local += len(target)
    sums[3] = n_local
    if reduce and dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl" and sums.device.type != "cuda":  # an EMA kept on the CPU
            sums = sums.cuda()
        dist.all_reduce(sums)
    loss, c1, c5, n = sums.tolist()
    n = max(n, 1)
    stats = {"loss": loss / n, "acc1": 100 * c1 / n, "acc5": 100 * c5 / n, "n": int(n)}
    print(f"* Acc@1 {stats['acc1']:.3f} Acc@5 {stats['acc5']:.3f} loss {stats['loss']:.3f} (n={stats['n']})")
    return stats

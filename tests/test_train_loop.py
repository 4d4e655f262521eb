"""util/train_loop.py: what the console says of an epoch agrees with what log.txt records."""
import argparse
import re

import torch

from util.train_loop import Amp, train_one_epoch


class _Loader(list):
    batch_size = 2


def test_console_running_average_is_the_epochs_train_loss(capsys):
    """The bracketed average of the loss on the epoch's last console line averages the same
    steps as the epoch's train_loss (every step, not only the logged ones)."""
    model = torch.nn.Linear(3, 1)
    torch.manual_seed(0)
    loader = _Loader((torch.randn(2, 3) * (i + 1), torch.zeros(2, 1)) for i in range(7))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    args = argparse.Namespace(update_freq=1, print_freq=3, clip_grad=None, skip_nonfinite=0, channels_last=False,
                              compile=False)
    stats = train_one_epoch(model, lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(), loader, optimizer,
                            torch.device("cpu"), 0, args, Amp.create(False, torch.device("cpu")))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("train epoch 0")]
    assert [line.split("]")[0] for line in lines] == ["train epoch 0 [3/7", "train epoch 0 [6/7", "train epoch 0 [7/7"]
    shown = float(re.search(r"  loss \S+ \((\S+)\)", lines[-1]).group(1))
    assert shown == float(f"{stats['loss']:.4g}")

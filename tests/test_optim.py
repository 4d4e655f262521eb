"""Schedules, layer-wise lr decay ids and parameter groups."""
import argparse

import numpy as np
import pytest
import torch

from util.optim import (cosine_schedule, effective_lr, global_batch, layer_id_convnext, lr_schedule,
                        param_groups, updates_per_epoch, wd_schedule)


def test_cosine_schedule_warmup_then_cosine():
    s = cosine_schedule(1.0, 0.1, epochs=4, iters_per_epoch=10, warmup_epochs=1)
    assert len(s) == 40
    assert s[0] == 0 and s[9] == pytest.approx(1.0)
    assert s[10] == pytest.approx(1.0) and s[-1] > 0.1 and s[-1] < 0.11
    assert np.all(np.diff(s[10:]) <= 1e-12)


def test_warmup_steps_win_over_epochs():
    s = cosine_schedule(1.0, 0.0, epochs=2, iters_per_epoch=10, warmup_epochs=1, warmup_steps=3)
    assert s[2] == pytest.approx(1.0) and s[1] < 1.0 and s[3] == pytest.approx(1.0)


def test_layer_ids_follow_the_recipe():
    depths = [3, 3, 27, 3]
    single = lambda n: layer_id_convnext(n, depths, "single")
    assert single("downsample_layers.0.0.weight") == 1
    assert single("downsample_layers.2.1.weight") == 7
    assert single("stages.2.5.dwconv.weight") == 12
    assert single("head.weight") == 37
    group = lambda n: layer_id_convnext(n, depths, "group")
    assert group("downsample_layers.0.0.weight") == 0
    assert group("stages.0.1.dwconv.weight") == 1
    assert group("stages.2.26.pwconv1.weight") == 3 + 26 // 3 == 11
    assert group("stages.3.0.pwconv1.weight") == 12 and group("norm.weight") == 13


def test_lr_from_blr_uses_global_batch():
    args = argparse.Namespace(batch_size=32, update_freq=4, lr=None, blr=6.25e-4)
    assert global_batch(args, world_size=8) == 1024
    assert effective_lr(args, world_size=8) == pytest.approx(6.25e-4 * 4)
    assert args.lr is None  # the settings stay as parsed
    args.lr = 0.1
    assert effective_lr(args, world_size=8) == 0.1  # a given --lr wins


def test_updates_per_epoch_and_schedules():
    args = argparse.Namespace(min_lr=0.0, epochs=2, warmup_epochs=1, warmup_steps=-1, weight_decay=0.05,
                              weight_decay_end=None)
    assert updates_per_epoch(10, 3) == 3
    np.testing.assert_array_equal(lr_schedule(args, 0.5, 5), cosine_schedule(0.5, 0.0, 2, 5, 1, -1))
    assert np.all(wd_schedule(args, 5) == 0.05)
    args.weight_decay_end = 0.1
    np.testing.assert_array_equal(wd_schedule(args, 5), cosine_schedule(0.05, 0.1, 2, 5))


class Tiny(torch.nn.Module):
    depths = [1, 1, 1, 1]

    def __init__(self):
        super().__init__()
        self.downsample_layers = torch.nn.ModuleList([torch.nn.Conv2d(3, 4, 1) for _ in range(4)])
        self.stages = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(4, 4)) for _ in range(4)])
        self.head = torch.nn.Linear(4, 2)


def test_param_groups_decay_and_no_weight_decay_on_biases():
    groups = param_groups(Tiny(), 0.05, layer_decay=0.5)
    by_id = {(g["layer_id"], g["weight_decay"]): g for g in groups}
    assert by_id[(5, 0.05)]["lr_scale"] == 1.0          # head: top layer
    assert by_id[(1, 0.05)]["lr_scale"] == 0.5 ** 4      # stem
    assert all(p.ndim > 1 for g in groups if g["weight_decay"] > 0 for p in g["params"])
    assert sum(len(g["params"]) for g in groups) == len(list(Tiny().parameters()))


def test_each_task_hands_its_optimizer_flags_over():
    """Fine-tuning's --opt, --opt_eps, --opt_betas, --momentum, --weight_decay and --layer_decay
    reach the optimizer (Task.optimizer_settings -> create_optimizer); pretraining, which has none
    of those flags but --weight_decay, gets AdamW with the original FCMAE betas (0.9, 0.95)."""
    from types import SimpleNamespace

    from engine_finetune import FinetuneTask
    from engine_pretrain import PretrainTask
    from main_finetune import get_args_parser as finetune_parser
    from main_pretrain import get_args_parser as pretrain_parser
    from models import create_fcmae, create_model
    from util.config import parse_args
    from util.optim import create_optimizer
    cpu = torch.device("cpu")

    def built(task, parser, argv, model):
        settings = task.optimizer_settings(SimpleNamespace(args=parse_args(parser(), argv)))
        return create_optimizer(model, 1e-3, cpu, **settings)
    model = create_model("convnextv2_atto", num_classes=10)
    opt = built(FinetuneTask, finetune_parser, ["--opt_betas", "0.8", "0.9", "--opt_eps", "1e-6",
                                                "--layer_decay", "0.8", "--weight_decay", "0.1"], model)
    assert type(opt) is torch.optim.AdamW and opt.defaults["betas"] == (0.8, 0.9) and opt.defaults["eps"] == 1e-6
    assert len({g["lr_scale"] for g in opt.param_groups}) > 2 and max(g["weight_decay"] for g in opt.param_groups) == 0.1
    opt = built(FinetuneTask, finetune_parser, ["--opt", "sgd", "--momentum", "0.5"], model)
    assert type(opt) is torch.optim.SGD and opt.defaults["momentum"] == 0.5
    opt = built(PretrainTask, pretrain_parser, ["--weight_decay", "0.02"], create_fcmae("convnextv2_atto"))
    assert type(opt) is torch.optim.AdamW and opt.defaults["betas"] == (0.9, 0.95)
    assert {g["lr_scale"] for g in opt.param_groups} == {1.0} and max(g["weight_decay"] for g in opt.param_groups) == 0.02

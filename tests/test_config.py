"""util/config.py: YAML defaults + command line, validation, and the save -> load round trip."""
import argparse
import copy
import os
import pickle

import pytest
import yaml

from util.config import (Namespace, add_config_args, config_dict, flag_dests, parse_args,
                         save_config, str2bool)
from util.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_parser():
    """Shaped like main_finetune.py's parser: original flags, str2bool booleans, aliases."""
    p = argparse.ArgumentParser()
    a = p.add_argument
    a("--batch_size", default=64, type=int)
    a("--epochs", default=100, type=int)
    a("--update_freq", default=1, type=int)
    a("--model", default="convnextv2_base", type=str)
    a("--lr", type=float, default=None)
    a("--blr", type=float, default=5e-4)
    a("--min_lr", type=float, default=1e-6)
    a("--mixup", type=float, default=0)
    a("--clip_grad", type=float, default=None)
    a("--opt_betas", type=float, nargs="+", default=None)
    a("--layer_decay_type", type=str, choices=["single", "group"], default="single")
    a("--model_ema", type=str2bool, default=False)
    a("--channels_last", type=str2bool, nargs="?", const=True, default=False)
    a("--norm_pix_loss", action="store_true", default=True)
    a("--no_norm_pix_loss", action="store_false", dest="norm_pix_loss")
    a("--force", action="store_true")
    a("--finetune", default="")
    a("--output_dir", default="")
    a("--num_workers", default=10, type=int)
    a("--local_rank", "--local-rank", dest="local_rank", default=-1, type=int)
    add_config_args(p)
    return p


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("v,want", [("True", True), ("false", False), ("1", True), ("0", False),
                                    ("YES", True), ("no", False), ("y", True), ("F", False),
                                    (True, True), (False, False)])
def test_str2bool(v, want):
    assert str2bool(v) is want


def test_str2bool_rejects():
    with pytest.raises(argparse.ArgumentTypeError):
        str2bool("maybe")


def test_add_config_args_adds_only_config():
    p = argparse.ArgumentParser()
    add_config_args(p)
    add_config_args(p)  # twice is harmless (a script may add it in get_args_parser already)
    assert [a.dest for a in p._actions] == ["help", "config"]


def test_yaml_sets_defaults_and_cli_wins(tmp_path):
    cfg = write(tmp_path, "blr: 1.0e-3\nepochs: 10\nmodel: convnextv2_atto\nmodel_ema: true\n")
    args = parse_args(make_parser(), ["--config", cfg, "--epochs", "3"])
    assert args.blr == 1e-3 and args.model == "convnextv2_atto" and args.model_ema is True
    assert args.epochs == 3  # command line wins, wherever it stands
    args = parse_args(make_parser(), ["--epochs", "4", f"--config={cfg}", "--model_ema", "False"])
    assert args.epochs == 4 and args.model_ema is False and args.config == cfg


def test_no_config_is_plain_argparse():
    args = parse_args(make_parser(), ["--lr", "0.1"])
    assert args.lr == 0.1 and args.config is None and args.batch_size == 64


def test_parser_left_unchanged(tmp_path):
    p = make_parser()
    parse_args(p, ["--config", write(tmp_path, "epochs: 7\n")])
    assert parse_args(p, []).epochs == 100


def test_abbreviated_config_flag_still_loads(tmp_path):
    args = parse_args(make_parser(), ["--conf", write(tmp_path, "epochs: 7\n")])
    assert args.epochs == 7


def test_parse_args_adds_config_when_missing(tmp_path):
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=1)
    assert parse_args(p, ["--config", write(tmp_path, "epochs: 2\n")]).epochs == 2


def test_type_conversion(tmp_path):
    cfg = write(tmp_path, "\n".join([
        "blr: 5e-4",           # a string to YAML 1.1; float() makes it a number
        "min_lr: 0",           # int in YAML, float flag
        "batch_size: '32'",    # quoted, int flag
        "clip_grad: null",
        "lr: 1.5e-4",
        "opt_betas: [0.9, 0.95]",
        "model_ema: 'yes'",
        "channels_last: true",
        "norm_pix_loss: false",
        "local-rank: 3",       # dashes for underscores
        "finetune: 123",       # a text flag: kept as text
    ]) + "\n")
    args = parse_args(make_parser(), ["--config", cfg])
    assert args.blr == 5e-4 and isinstance(args.blr, float)
    assert args.min_lr == 0.0 and isinstance(args.min_lr, float)
    assert args.batch_size == 32 and args.clip_grad is None and args.lr == 1.5e-4
    assert args.opt_betas == [0.9, 0.95] and args.model_ema is True
    assert args.channels_last is True and args.norm_pix_loss is False
    assert args.local_rank == 3 and args.finetune == "123"
    # the store_true flag can still be turned back on from the command line
    assert parse_args(make_parser(), ["--config", cfg, "--norm_pix_loss"]).norm_pix_loss is True


@pytest.mark.parametrize("text,words", [
    ("batch_size: 1.5\n", ["batch_size", "1.5"]),
    ("model_ema: maybe\n", ["model_ema", "maybe", "boolean"]),
    ("norm_pix_loss: maybe\n", ["norm_pix_loss", "true or false"]),
    ("layer_decay_type: both\n", ["layer_decay_type", "single, group"]),
    ("opt_betas: 0.9\n", ["opt_betas", "list"]),
    ("model: [a, b]\n", ["model", "single value"]),
    ("model: yes\n", ["model", "quote"]),
    ("config: other.yaml\n", ["another config"]),
    ("- a\n- b\n", ["mapping"]),
    ("epochs: [1\n", ["not valid YAML"]),
])
def test_bad_values(tmp_path, text, words):
    with pytest.raises(UserError) as e:
        parse_args(make_parser(), ["--config", write(tmp_path, text)])
    for w in words:
        assert w in str(e.value)


def test_unknown_key_suggests(tmp_path):
    with pytest.raises(UserError) as e:
        parse_args(make_parser(), ["--config", write(tmp_path, "epochs: 1\nbatchsize: 8\n")])
    msg = str(e.value)
    assert "unknown key 'batchsize'" in msg and "batch_size" in msg and "\n" not in msg
    with pytest.raises(UserError) as e:
        parse_args(make_parser(), ["--config", write(tmp_path, "qqqqqqq: 1\n")])
    assert "--help" in str(e.value)


def test_python_tags_refused(tmp_path):
    cfg = write(tmp_path, "epochs: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(UserError) as e:
        parse_args(make_parser(), ["--config", cfg])
    assert "!!python" in str(e.value) and "refused" in str(e.value)


def test_missing_file():
    with pytest.raises(UserError, match="not found"):
        parse_args(make_parser(), ["--config", "/nonexistent/x.yaml"])


def test_empty_file_is_empty_config(tmp_path):
    assert parse_args(make_parser(), ["--config", write(tmp_path, "# nothing\n")]).epochs == 100


def test_config_supplies_required_flag(tmp_path):
    p = make_parser()
    p.add_argument("--data_path", required=True)
    args = parse_args(p, ["--config", write(tmp_path, "data_path: /data\n")])
    assert args.data_path == "/data"
    with pytest.raises(SystemExit):
        parse_args(p, [])  # still required without the file


def test_round_trip(tmp_path):
    argv = ["--lr", "1.5e-4", "--opt_betas", "0.9", "0.95", "--model_ema", "True",
            "--layer_decay_type", "group", "--no_norm_pix_loss", "--channels_last",
            "--finetune", "", "--model", "1e3", "--batch_size", "32",
            "--output_dir", str(tmp_path / "out"), "--force", "--local-rank", "2"]
    args = parse_args(make_parser(), argv)
    args.rank, args.gpu, args.distributed = 1, 1, True  # set at run time, not flags
    path = str(tmp_path / "config.yaml")
    save_config(args, path)
    text = open(path).read()
    assert "rank" not in yaml.safe_load(text) and "force" not in yaml.safe_load(text)
    again = parse_args(make_parser(), ["--config", path])
    for k in vars(make_parser().parse_args([])):
        if k not in ("config", "output_dir", "force", "local_rank"):
            assert getattr(again, k) == getattr(args, k), k
            if isinstance(getattr(args, k), (bool, str, list)) or getattr(args, k) is None:
                assert type(getattr(again, k)) is type(getattr(args, k)), k
    assert again.clip_grad is None and again.model == "1e3" and again.finetune == ""
    assert again.output_dir == "" and again.force is False  # per-launch settings stay out


def test_flag_dests_survive_pickle_and_copy(tmp_path):
    args = parse_args(make_parser(), [])
    assert isinstance(args, Namespace) and "epochs" in flag_dests(args)
    assert "_flag_dests" not in vars(args)  # invisible to code that dumps vars(args)
    for other in (pickle.loads(pickle.dumps(args)), copy.deepcopy(args)):
        assert flag_dests(other) == flag_dests(args) and vars(other) == vars(args)
    assert flag_dests(argparse.Namespace(**vars(args))) is None


def test_config_dict_without_parser_drops_runtime():
    ns = argparse.Namespace(epochs=1, rank=0, gpu=0, output_dir="x", config="c.yaml",
                            device="cuda:1", eval=False, _private=1)
    assert config_dict(ns) == {"epochs": 1}


# ---- the recipes in configs/ must be valid for the original command line

FINETUNE_FLAGS = (
    "batch_size epochs update_freq model input_size drop_path layer_decay_type layer_decay "
    "model_ema model_ema_decay model_ema_force_cpu model_ema_eval clip_grad weight_decay "
    "weight_decay_end lr blr min_lr warmup_epochs warmup_steps opt opt_eps opt_betas momentum "
    "color_jitter aa smoothing train_interpolation reprob remode recount resplit mixup cutmix "
    "cutmix_minmax mixup_prob mixup_switch_prob mixup_mode finetune head_init_scale model_key "
    "model_prefix data_path eval_data_path nb_classes data_set imagenet_default_mean_and_std "
    "output_dir log_dir device seed resume auto_resume save_ckpt save_ckpt_freq save_ckpt_num "
    "start_epoch eval dist_eval disable_eval num_workers pin_mem crop_pct use_amp world_size "
    "local_rank dist_on_itp dist_url").split()
PRETRAIN_FLAGS = (
    "batch_size epochs warmup_epochs update_freq model input_size mask_ratio norm_pix_loss "
    "decoder_depth decoder_embed_dim weight_decay lr blr min_lr data_path output_dir log_dir "
    "device seed resume auto_resume save_ckpt save_ckpt_freq save_ckpt_num start_epoch "
    "num_workers pin_mem crop_pct world_size local_rank dist_on_itp dist_url").split()
RECIPES = ["pretrain_base", "finetune_atto", "finetune_tiny", "finetune_base"]


@pytest.mark.parametrize("name", RECIPES)
def test_recipes_use_original_flags(name):
    path = os.path.join(REPO, "configs", f"{name}.yaml")
    data = yaml.safe_load(open(path))
    flags = PRETRAIN_FLAGS if name.startswith("pretrain") else FINETUNE_FLAGS
    assert data and not set(data) - set(flags), set(data) - set(flags)
    assert all(v is None or isinstance(v, (bool, int, float, str)) for v in data.values())
    # and they load through a parser with the right types
    p = argparse.ArgumentParser()
    for k in data:
        v = data[k]
        t = str2bool if isinstance(v, bool) else type(v) if isinstance(v, (int, float)) else str
        p.add_argument(f"--{k}", type=t)
    args = parse_args(p, ["--config", path])
    assert args.model.startswith("convnextv2_")


def test_recipe_global_batches():
    load = lambda n: yaml.safe_load(open(os.path.join(REPO, "configs", f"{n}.yaml")))  # noqa
    pre = load("pretrain_base")
    assert pre["batch_size"] * pre.get("update_freq", 1) * 64 == 4096
    for n in RECIPES[1:]:
        d = load(n)
        assert d["batch_size"] * d.get("update_freq", 1) * 8 == 1024, n


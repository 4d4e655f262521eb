"""The command lines users type: --help, the original flags and launchers' forms."""
import shlex

import pytest

from tests.helpers import TINY, run
from util.config import parse_args

ORIGINAL_FINETUNE = """--model convnextv2_base --batch_size 32 --update_freq 4 --blr 6.25e-4 --epochs 100
  --warmup_epochs 20 --layer_decay_type 'group' --layer_decay 0.6 --weight_decay 0.05 --drop_path 0.1
  --reprob 0.25 --mixup 0.8 --cutmix 1.0 --smoothing 0.1 --model_ema True --model_ema_eval True
  --use_amp True --finetune /path/to/checkpoint --data_path /path/to/imagenet-1k --output_dir /out"""


@pytest.mark.parametrize("script", ["main_finetune.py", "main_pretrain.py"])
def test_help_works(script):
    p = run(script, ["--help"], fresh=True)  # a new interpreter, as a user types it
    assert "usage:" in p.stdout and "--batch_size" in p.stdout and "--device" in p.stdout


@pytest.mark.parametrize("module", ["submitit_finetune", "submitit_pretrain"])
def test_launcher_mistyped_flag_is_one_line(module, capsys):
    """The Slurm launchers parse through util/config.parse_args too: a mistyped flag, theirs or
    the main script's, is one line with the closest flags, exit 2."""
    import importlib
    launcher = importlib.import_module(module)
    for argv, line in ((["--ngpu", "2"], "error: unknown flag --ngpu; did you mean --ngpus?"),
                       (["--lrr", "1e-3"], "error: unknown flag --lrr; did you mean --lr?")):
        with pytest.raises(SystemExit) as e:
            launcher.main(argv)
        assert e.value.code == 2 and capsys.readouterr().err.splitlines() == [line]


def test_original_finetune_command_line_parses_with_its_meaning():
    from main_finetune import get_args_parser
    a = parse_args(get_args_parser(), shlex.split(ORIGINAL_FINETUNE))
    assert (a.batch_size, a.update_freq, a.blr, a.layer_decay_type, a.layer_decay) == (32, 4, 6.25e-4, "group", 0.6)
    assert a.model_ema is True and a.model_ema_eval is True and a.use_amp is True
    assert a.device == "auto" and a.aa == "rand-m9-mstd0.5-inc1" and a.dist_eval is True


@pytest.mark.parametrize("flag", ["--local_rank", "--local-rank"])
def test_both_local_rank_spellings(flag):
    from main_finetune import get_args_parser
    assert parse_args(get_args_parser(), [f"{flag}=3"]).local_rank == 3
    assert parse_args(get_args_parser(), [flag, "1"]).local_rank == 1


def test_original_pretrain_defaults():
    from main_pretrain import get_args_parser
    a = parse_args(get_args_parser(), [])
    assert (a.batch_size, a.epochs, a.warmup_epochs, a.blr, a.min_lr, a.mask_ratio) == (64, 800, 40, 1.5e-4, 0.0, 0.6)
    assert (a.decoder_depth, a.decoder_embed_dim, a.norm_pix_loss) == (1, 512, True)


def test_unknown_model_is_one_line_with_suggestion(tmp_path):
    p = run("main_finetune.py", TINY + ["--model", "convnextv2_atoo", "--output_dir", str(tmp_path / "o")],
            check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == [p.stderr.strip()] and "convnextv2_atto" in p.stderr


def test_any_timm_model_fine_tunes(tmp_path):
    run("main_finetune.py", TINY + ["--model", "resnet18", "--epochs", "1", "--batch_size", "16",
                                    "--output_dir", str(tmp_path / "r")])

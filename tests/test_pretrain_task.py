"""What pretraining computes (engine_pretrain.PretrainTask): the masked loss and its options.
A new pretraining loss option gets its test here."""
import torch

import engine_pretrain
from main_pretrain import get_args_parser
from util.config import parse_args


def test_norm_pix_loss_can_be_turned_off():
    assert parse_args(get_args_parser(), []).norm_pix_loss is True
    assert parse_args(get_args_parser(), ["--norm_pix_loss"]).norm_pix_loss is True
    assert parse_args(get_args_parser(), ["--norm_pix_loss", "False"]).norm_pix_loss is False


def test_the_loss_of_a_batch_is_the_fcmae_loss_at_the_flags_mask_ratio():
    """The Task's loss is the model's own reconstruction loss of the removed patches, at
    --mask_ratio, whatever else the batch carries (labels)."""
    args = parse_args(get_args_parser(), ["--model", "convnextv2_atto", "--input_size", "64",
                                          "--decoder_embed_dim", "64", "--mask_ratio", "0.75"])
    torch.manual_seed(0)
    model = engine_pretrain.build_model(args)
    images = torch.randn(2, 3, 64, 64)
    torch.manual_seed(1)
    loss = engine_pretrain.masked_loss(model, [images, torch.zeros(2)], args.mask_ratio)
    torch.manual_seed(1)
    expected, _, mask = model(images, mask_ratio=0.75)
    assert torch.equal(loss, expected)
    assert float(mask.mean()) == 0.75


def test_fcmae_pretrains_on_four_bands(tmp_path):
    """The built-in 4-band set (only the last band carries the class): FCMAE reconstructs all
    four bands, its loss falls, and the grid of bands 1-3 reaches TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.helpers import read_log, run
    out = tmp_path / "run"
    run("main_pretrain.py", ["--model", "convnextv2_atto", "--data_set", "synthetic", "--input_size", "64",
                             "--synthetic_train_samples", "128", "--batch_size", "16", "--num_workers", "0",
                             "--device", "cpu", "--warmup_epochs", "0", "--blr", "2e-2", "--decoder_embed_dim", "64",
                             "--epochs", "3", "--in_chans", "4", "--vis_freq", "2", "--output_dir", str(out)])
    log = read_log(out)
    assert log[-1]["train_loss"] < log[0]["train_loss"]
    assert torch.load(out / "checkpoint-2.pth", weights_only=True)["model"]["pred.weight"].shape[0] == 32 * 32 * 4
    tb = EventAccumulator(str(out / "tensorboard"))
    tb.Reload()
    assert tb.Tags()["images"]

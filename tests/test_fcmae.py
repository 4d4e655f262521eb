"""FCMAE: sparse-encoder semantics, masking, loss, sizes, hand-off of encoder weights."""
import pytest
import torch
import torch.nn.functional as F

from models import create_fcmae
from models.convnextv2 import ConvNeXtV2
from tests.test_models import _randomise, reference_block
from models.errors import ModelError


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = create_fcmae("convnextv2_atto")
    _randomise(m.encoder)
    return m.eval()


def _up(keep, factor):
    return keep.repeat_interleave(factor, 1).repeat_interleave(factor, 2)


def reference_encoder(enc, x, keep):
    """The masked dense encoder written out plainly (mask before and after every layer)."""
    masks = [_up(keep.float(), 2 ** (3 - i)).unsqueeze(1) for i in range(4)]
    x = enc.downsample_layers[0](x) * masks[0]
    for i in range(4):
        if i:
            x = enc.downsample_layers[i][0](x) * masks[i - 1]
            x = enc.downsample_layers[i][1](x) * masks[i]
        for block in enc.stages[i]:
            x = reference_block(block, x, masks[i])
    return x


@pytest.mark.parametrize("ragged", [False, True])
def test_encoder_matches_masked_dense_reference(model, ragged):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 96)
    keep = torch.tensor([[[1, 0, 1], [0, 0, 1]], [[0, 1, 1], [1, 0, 0]]], dtype=torch.bool)
    if ragged:
        keep[1, 1, 1] = True
    with torch.no_grad():
        out = model.encoder.forward_encoder(x, keep)
        ref = reference_encoder(model.encoder, x, keep)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert out.masked_select(~keep.unsqueeze(1)).abs().max() == 0


def test_removed_pixels_change_nothing(model):
    torch.manual_seed(2)
    x = torch.randn(2, 3, 64, 64)
    mask = torch.tensor([[1.0, 0, 0, 1], [0, 1, 1, 0]])  # 1 = removed, 2x2 grid
    x2 = x.clone()
    x2[0, :, :32, :32] = torch.randn(3, 32, 32) * 10  # patch 0 of image 0 (removed)
    x2[1, :, 32:, :32] = torch.randn(3, 32, 32) * 10  # patch 2 of image 1 (removed)
    keep = (mask == 0).view(2, 2, 2)
    with torch.no_grad():
        e1 = model.encoder.forward_encoder(x, keep)
        e2 = model.encoder.forward_encoder(x2, keep)
        _, p1, m1 = model(x, mask=mask)
        _, p2, m2 = model(x2, mask=mask)
    torch.testing.assert_close(e1, e2, atol=1e-6, rtol=0)
    torch.testing.assert_close(p1, p2, atol=1e-6, rtol=0)
    assert torch.equal(m1, mask) and torch.equal(m2, mask)


def test_grn_is_per_image(model):
    torch.manual_seed(3)
    x = torch.randn(2, 3, 64, 64)
    x2 = x.clone()
    x2[1] = torch.randn(3, 64, 64) * 5
    mask = torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 1]])
    with torch.no_grad():
        _, p1, _ = model(x, mask=mask)
        _, p2, _ = model(x2, mask=mask)
    torch.testing.assert_close(p1[0], p2[0], atol=1e-6, rtol=0)
    assert not torch.allclose(p1[1], p2[1])


@pytest.mark.parametrize("batch", [1, 2])
def test_random_masking_any_batch_and_backward(batch):
    torch.manual_seed(4)
    m = create_fcmae("convnextv2_atto", mask_ratio=0.5, decoder_embed_dim=64)
    loss, pred, mask = m(torch.randn(batch, 3, 64, 128))
    assert pred.shape == (batch, 8, 32 * 32 * 3) and mask.shape == (batch, 8)
    assert (mask.sum(1) == 8 - int(8 * 0.5)).all()
    loss.backward()
    assert torch.isfinite(loss) and m.encoder.downsample_layers[0][0].weight.grad.abs().sum() > 0
    assert m.unpatchify(pred, grid=(2, 4)).shape == (batch, 3, 64, 128)


def test_patchify_round_trip():
    m = create_fcmae("convnextv2_atto", decoder_embed_dim=32)
    imgs = torch.randn(2, 3, 64, 64)
    patches = m.patchify(imgs)
    assert patches.shape == (2, 4, 3072)
    torch.testing.assert_close(patches[0, 1], imgs[0, :, :32, 32:].permute(1, 2, 0).reshape(-1))
    torch.testing.assert_close(m.unpatchify(patches), imgs)


def test_wrong_arguments_are_model_errors():
    m = create_fcmae("convnextv2_atto", decoder_embed_dim=32)
    with pytest.raises(ModelError, match="multiple of the patch size"):
        m(torch.randn(1, 3, 48, 64))
    with pytest.raises(ModelError, match="mask_ratio"):
        m(torch.randn(1, 3, 64, 64), mask_ratio=1.0)
    with pytest.raises(ModelError, match="mask_ratio"):
        create_fcmae("convnextv2_atto", mask_ratio=0.0)
    with pytest.raises(ModelError, match="patch_size"):
        create_fcmae("convnextv2_atto", patch_size=16)


def test_norm_pix_loss_switch():
    torch.manual_seed(5)
    a = create_fcmae("convnextv2_atto", norm_pix_loss=True, decoder_embed_dim=32)
    b = create_fcmae("convnextv2_atto", norm_pix_loss=False, decoder_embed_dim=32)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 64, 64) * 3 + 1
    mask = torch.tensor([[1.0, 0, 0, 1], [0, 1, 1, 0]])
    with torch.no_grad():
        la, lb = a(x, mask=mask)[0], b(x, mask=mask)[0]
        pred = a(x, mask=mask)[1]
    target = a.patchify(x)
    per_patch = (pred - target).pow(2).mean(-1)
    torch.testing.assert_close(lb, (per_patch * mask).sum() / mask.sum())
    assert not torch.allclose(la, lb)


def test_single_init_and_encoder_hand_off():
    torch.manual_seed(6)
    m = create_fcmae("convnextv2_atto")
    assert 0.015 < m.encoder.stages[2][0].pwconv1.weight.std() < 0.025
    assert 0.015 < m.decoder[0].pwconv1.weight.std() < 0.025
    assert 0.015 < m.pred.weight.std() < 0.025 and m.pred.bias.abs().max() == 0
    assert 0.01 < m.mask_token.std() < 0.03
    assert "encoder.downsample_layers.0.0.weight" in m.state_dict()
    enc = {k[len("encoder."):]: v for k, v in m.state_dict().items() if k.startswith("encoder.")}
    dense = ConvNeXtV2(depths=(2, 2, 6, 2), dims=(40, 80, 160, 320))
    missing, unexpected = dense.load_state_dict(enc, strict=False)
    assert unexpected == []
    assert sorted(missing) == ["head.bias", "head.weight", "norm.bias", "norm.weight"]


def test_all_kept_equals_dense_stages(model):
    """With nothing removed, the sparse encoder is the dense network's stages."""
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        sparse = model.encoder.forward_encoder(x, torch.ones(1, 2, 2, dtype=torch.bool))
        dense = x
        for down, stage in zip(model.encoder.downsample_layers, model.encoder.stages):
            dense = stage(down(dense))
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=0)
    assert F.mse_loss(sparse, dense) < 1e-10


def test_bf16_autocast_pretrain_and_finetune_paths():
    torch.manual_seed(7)
    m = create_fcmae("convnextv2_atto", decoder_embed_dim=32)
    mask = torch.tensor([[1.0, 0, 0, 1], [0, 1, 1, 1]])  # ragged: 2 and 1 kept patches
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m(torch.randn(2, 3, 64, 64))[0] + m(torch.randn(2, 3, 64, 64), mask=mask)[0]
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_decoder_on_removed_rows_gives_the_dense_loss_and_gradients():
    """The prediction layer's backward runs on removed rows only: the loss, every gradient and
    the returned pred (kept patches too) equal the plain dense decoder's."""
    torch.manual_seed(8)
    m = create_fcmae("convnextv2_atto", decoder_embed_dim=32, decoder_depth=2)
    for p in m.parameters():  # make GRN, the mask token and the biases matter
        p.data.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(2, 3, 64, 96)
    mask = torch.tensor([[1.0, 0, 1, 0, 1, 1], [0, 1, 1, 1, 0, 0]])  # ragged: 4 and 3 removed
    loss, pred, _ = m(x, mask=mask)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in m.named_parameters()}
    m.zero_grad()

    keep = (mask == 0).view(2, 2, 3)
    y = m.proj(m.encoder.forward_encoder(x, keep))
    y = torch.where(mask.view(2, 1, 2, 3).bool(), m.mask_token, y)
    ref_pred = m.pred(m.decoder(y)).flatten(2).transpose(1, 2)
    target = m.patchify(x)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    ref_loss = ((ref_pred - target).pow(2).mean(-1) * mask).sum() / mask.sum()
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(pred, ref_pred.detach(), atol=1e-5, rtol=1e-5)
    for k, p in m.named_parameters():
        torch.testing.assert_close(grads[k], p.grad, atol=1e-6, rtol=1e-4, msg=k)

"""--grad_checkpointing: the blocks are recomputed in backward (fewer activations kept) and the
gradients are those of a run without it: ours (fine-tuning, FCMAE's encoder) and a timm model."""
import argparse

import pytest
import torch

from models import ModelError, create_fcmae, create_model


def _saved_bytes(fn):
    """Bytes autograd keeps for backward while `fn()` runs its forward (its return value)."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total[0]


def _grads(model, forward, seed=0):
    """(gradients by name, saved bytes) of one forward + backward, drop_path seeded alike."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss, saved = _saved_bytes(forward)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, saved


def _same(a, b):
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7, msg=k)


def _pair(build, **kw):
    torch.manual_seed(0)
    plain = build(**kw)
    ckpt = build(grad_checkpointing=True, **kw)
    ckpt.load_state_dict(plain.state_dict())
    return plain, ckpt


def test_finetune_model_gradients_equal_without_it():
    plain, ckpt = _pair(create_model, name="convnextv2_atto", num_classes=10, drop_path_rate=0.2,
                        head_init_scale=1.0)
    x = torch.randn(3, 3, 64, 64)
    y = torch.tensor([1, 4, 7])

    def fwd(m):
        return lambda: torch.nn.functional.cross_entropy(m(x), y)
    saved_plain, saved_ckpt = _same_gradients(plain, ckpt, fwd)
    assert saved_ckpt < 0.5 * saved_plain, (saved_ckpt, saved_plain)


def _same_gradients(plain, ckpt, fwd):
    """Both models' gradients agree; returns the bytes each saved for backward."""
    ga, saved_plain = _grads(plain, fwd(plain))
    gb, saved_ckpt = _grads(ckpt, fwd(ckpt))
    _same(ga, gb)
    return saved_plain, saved_ckpt


def test_fcmae_encoder_gradients_equal_without_it():
    plain, ckpt = _pair(create_fcmae, name="convnextv2_atto", decoder_embed_dim=64)
    x = torch.randn(2, 3, 64, 64)
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0]])  # [N, L], 1 = removed

    def fwd(m):
        return lambda: m(x, mask=mask)[0]
    saved_plain, saved_ckpt = _same_gradients(plain, ckpt, fwd)
    assert ckpt.encoder.grad_checkpointing and saved_ckpt < saved_plain, (saved_ckpt, saved_plain)


def test_timm_model_gradients_equal_without_it():
    plain, ckpt = _pair(create_model, name="convnext_atto", num_classes=5)  # timm's, not ours
    x = torch.randn(2, 3, 64, 64)

    def fwd(m):
        return lambda: m(x).square().mean()
    saved_plain, saved_ckpt = _same_gradients(plain, ckpt, fwd)
    assert saved_ckpt < 0.5 * saved_plain, (saved_ckpt, saved_plain)


def test_no_checkpointing_without_gradients():
    """Evaluation (no_grad) runs the blocks plainly, with the same outputs."""
    plain, ckpt = _pair(create_model, name="convnextv2_atto", num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    plain.eval(), ckpt.eval()
    with torch.no_grad():
        assert torch.equal(plain(x), ckpt(x))


def test_timm_model_without_it_is_refused_naming_the_argument():
    with pytest.raises(ModelError, match=r"^grad_checkpointing is not supported by the timm model 'dla46_c'"):
        create_model("dla46_c", grad_checkpointing=True)


def test_the_tasks_pass_the_flag():
    import engine_finetune
    import engine_pretrain
    ft = argparse.Namespace(model="convnextv2_atto", drop_path=0.0, head_init_scale=1.0, grad_checkpointing=True,
                            in_chans=3, linear_probe=False)
    assert engine_finetune.build_model(ft, 10).grad_checkpointing
    pt = argparse.Namespace(model="convnextv2_atto", mask_ratio=0.6, decoder_depth=1, decoder_embed_dim=64,
                            norm_pix_loss=True, input_size=64, grad_checkpointing=True, in_chans=3)
    assert engine_pretrain.build_model(pt).encoder.grad_checkpointing
    timm_model = engine_finetune.build_model(argparse.Namespace(**{**vars(ft), "model": "convnext_atto"}), 10)
    assert timm_model.stages[0].grad_checkpointing

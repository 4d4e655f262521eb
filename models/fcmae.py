"""FCMAE: fully convolutional masked autoencoder pretraining for ConvNeXt V2.

The encoder is a plain `ConvNeXtV2` (no final norm, no head) run through its keep-mask path,
which reproduces the sparse encoder of the original without MinkowskiEngine; its weights carry
the dense names under `encoder.`, so they load straight into `ConvNeXtV2` for fine-tuning.
"""
import torch
import torch.nn.functional as F
from torch import nn

from models.convnextv2 import Block, ConvNeXtV2, init_weights, variant_builder
from models.errors import ModelError


def _check_ratio(mask_ratio):
    if not 0.0 < mask_ratio < 1.0:
        raise ModelError(f"mask_ratio {mask_ratio} is outside (0, 1); use e.g. 0.6")


class FCMAE(nn.Module):
    """Sparse ConvNeXt V2 encoder + light dense ConvNeXt V2 decoder, MSE on removed patches."""
    channels_last_inside = True  # as ConvNeXtV2

    def __init__(self, img_size=224, in_chans=3, depths=(3, 3, 9, 3), dims=(96, 192, 384, 768),
                 decoder_depth=1, decoder_embed_dim=512, patch_size=32, mask_ratio=0.6,
                 norm_pix_loss=True, grad_checkpointing=False):
        super().__init__()
        _check_ratio(mask_ratio)
        self.encoder = ConvNeXtV2(in_chans=in_chans, depths=depths, dims=dims, with_head=False,
                                  grad_checkpointing=grad_checkpointing)
        if patch_size != self.encoder.stride:
            raise ModelError(f"patch_size {patch_size} must equal the encoder's total stride "
                             f"{self.encoder.stride}; use patch_size={self.encoder.stride}")
        if decoder_depth < 0 or decoder_embed_dim < 1:
            raise ModelError(f"decoder_depth {decoder_depth} / decoder_embed_dim "
                             f"{decoder_embed_dim} are invalid; use e.g. 1 / 512")
        self.img_size = img_size  # the default; any multiple of patch_size works
        self.in_chans = in_chans
        self.patch_size = patch_size
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.proj = nn.Conv2d(dims[-1], decoder_embed_dim, kernel_size=1)
        self.mask_token = nn.Parameter(torch.zeros(1, decoder_embed_dim, 1, 1))
        self.decoder = nn.Sequential(*[Block(decoder_embed_dim) for _ in range(decoder_depth)])
        self.pred = nn.Conv2d(decoder_embed_dim, patch_size ** 2 * in_chans, kernel_size=1)
        # The encoder initialised itself; the decoder parts get the same init, once.
        for part in (self.proj, self.decoder, self.pred):
            part.apply(init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def set_grad_checkpointing(self, enable=True):
        """Recompute the encoder's blocks in backward (the decoder's one block is kept)."""
        self.encoder.set_grad_checkpointing(enable)

    def patchify(self, imgs):
        """[N, C, H, W] -> [N, L, p*p*C], each patch flattened in (row, column, channel) order."""
        p = self.patch_size
        n, c, h, w = imgs.shape
        x = imgs.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(n, (h // p) * (w // p), p * p * c)

    def unpatchify(self, x, grid=None):
        """[N, L, p*p*C] -> [N, C, H, W]; grid = (rows, cols) of patches, square if omitted."""
        p, c = self.patch_size, self.in_chans
        n, length, _ = x.shape
        if grid is None:
            side = int(round(length ** 0.5))
            if side * side != length:
                raise ValueError(f"{length} patches are not a square grid; pass grid=(rows, cols)")
            grid = (side, side)
        gh, gw = grid
        x = x.reshape(n, gh, gw, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(n, c, gh * p, gw * p)

    def random_mask(self, n, grid, mask_ratio, device):
        """[N, L] with 1 = removed; each image keeps int(L * (1 - ratio)) random patches."""
        length = grid[0] * grid[1]
        keep = int(length * (1 - mask_ratio))
        ids = torch.rand(n, length, device=device).argsort(dim=1)[:, :keep]
        return torch.ones(n, length, device=device).scatter_(1, ids, 0.0)

    def forward_decoder(self, x, mask, lost):
        """x: encoder map [N, d, h, w]; mask [N, L] (1 = removed); lost: the flat indices of
        the removed patches (mask.view(-1)'s nonzeros) -> (pred [N, L, p*p*C], the removed
        patches' predictions [R, p*p*C], in the order of `lost`).

        Only the removed patches enter the loss, so the last layer (the decoder's largest: 512
        -> p*p*C per patch) computes the kept patches' predictions without gradient and its
        backward runs on the removed rows only: the same loss and gradients, 0.4 of that
        layer's backward saved at mask ratio 0.6.
        """
        x = self.proj(x)
        n, d, h, w = x.shape
        removed = mask.reshape(n, 1, h, w).bool()
        x = torch.where(removed, self.mask_token.to(x.dtype), x)
        rows = self.decoder(x).permute(0, 2, 3, 1).reshape(n * h * w, d)
        weight, bias = self.pred.weight.view(self.pred.out_channels, d), self.pred.bias
        pred_lost = F.linear(rows.index_select(0, lost), weight, bias)
        kept = (mask.reshape(-1) == 0).nonzero().squeeze(1)
        with torch.no_grad():
            pred = rows.new_empty(n * h * w, weight.shape[0]).index_copy_(
                0, kept, F.linear(rows.index_select(0, kept), weight, bias))
        pred = pred.index_copy(0, lost, pred_lost)  # the removed rows carry the gradient
        return pred.view(n, h * w, -1), pred_lost

    def forward_loss(self, imgs, pred_lost, lost):
        """pred_lost [R, p*p*C]: the removed patches' predictions, in the order of `lost` (their
        flat indices into [N * L]); MSE per patch, averaged over the removed patches."""
        target = self.patchify(imgs)
        target = target.reshape(-1, target.shape[-1]).index_select(0, lost)
        if self.norm_pix_loss and len(lost):
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = (pred_lost.float() - target.float()).pow(2).mean(dim=-1)
        return loss.sum() / max(len(lost), 1)  # a mask that removes nothing: loss 0, not 0/0

    def forward(self, imgs, labels=None, mask_ratio=None, mask=None):
        """imgs [N, C, H, W] (H, W multiples of patch_size). `mask_ratio` defaults to the
        model's; a given `mask` [N, L] (1 = removed) is used as is.

        Returns (loss, pred [N, L, p*p*C], mask [N, L]); `unpatchify(pred)` gives images.
        `labels` is accepted for interface compatibility and unused.
        """
        n, c, h, w = imgs.shape
        p = self.patch_size
        if h % p or w % p:
            raise ModelError(f"input size {h}x{w} is not a multiple of the patch size {p}; "
                             f"use e.g. {max(p, h // p * p)}x{max(p, w // p * p)}")
        if c != self.in_chans:
            raise ModelError(f"input has {c} channels but the model expects {self.in_chans}; "
                             "build it with in_chans to match the data")
        grid = (h // p, w // p)
        if mask is None:
            mask_ratio = self.mask_ratio if mask_ratio is None else mask_ratio
            _check_ratio(mask_ratio)
            mask = self.random_mask(n, grid, mask_ratio, imgs.device)
        elif tuple(mask.shape) != (n, grid[0] * grid[1]):
            raise ValueError(f"mask must be [N, L] = [{n}, {grid[0] * grid[1]}], "
                             f"got {tuple(mask.shape)}")
        mask = mask.to(imgs.dtype) if mask.dtype == torch.bool else mask
        keep = (mask == 0).view(n, *grid)
        x = self.encoder.forward_encoder(imgs, keep)
        lost = mask.reshape(-1).nonzero().squeeze(1)
        pred, pred_lost = self.forward_decoder(x, mask, lost)
        loss = self.forward_loss(imgs, pred_lost, lost)
        return loss, pred, mask


def _builder(name):
    return variant_builder(FCMAE, name, "FCMAE with a {name} encoder (depths {depths}, dims {dims}).")


convnextv2_atto = _builder("convnextv2_atto")
convnextv2_femto = _builder("convnextv2_femto")
convnextv2_pico = _builder("convnextv2_pico")
convnextv2_nano = _builder("convnextv2_nano")
convnextv2_tiny = _builder("convnextv2_tiny")
convnextv2_base = _builder("convnextv2_base")
convnextv2_large = _builder("convnextv2_large")
convnextv2_huge = _builder("convnextv2_huge")

"""ConvNeXt V2 (dense classifier), with a keep-mask path that FCMAE pretraining shares.

State-dict names follow the official release, so its checkpoints load with strict=True.

Speed on CPU (1.1-1.2x timm's convnextv2 per training step): activations stay in
channels_last memory, so NCHW <-> NHWC permutes are free views and channels-first LayerNorm
is F.layer_norm on such a view; the Linear layers run as 1x1 convs (oneDNN, much faster than
MKL's GEMM on AMD CPUs) on the same weights; GRN has a hand-written two-pass backward.
On the gathered kept rows of the keep-mask path the Linear layers stay plain `nn.Linear`
(MKL's GEMM): forward + backward, 1.2-1.8x faster there than the 1x1 conv on a [16, C, K/16, 1]
view, whose backward is slow on such thin shapes (measured on a 2-core AMD EPYC, torch 2.14.1).

Keep-mask path (`keep` argument, 1 = kept): reproduces a sparse convolutional network
densely. Removed positions hold zeros after every layer, the depthwise conv sees zeros there
(and its output is read only at kept positions), GRN takes its norm per image over kept
positions, and the per-position layers (LayerNorm, Linear, GELU, GRN, Linear) run on the
gathered kept positions only, which is where the pretraining speed comes from.
"""
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.errors import ModelError

# name -> (depths, dims); the table of the paper.
VARIANTS = {
    "convnextv2_atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
    "convnextv2_femto": ((2, 2, 6, 2), (48, 96, 192, 384)),
    "convnextv2_pico": ((2, 2, 6, 2), (64, 128, 256, 512)),
    "convnextv2_nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "convnextv2_tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "convnextv2_base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "convnextv2_large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
    "convnextv2_huge": ((3, 3, 27, 3), (352, 704, 1408, 2816)),
}


class KeepIndex:
    """The kept positions of a binary keep-mask [N, H, W], computed once per resolution.

    `rows` indexes the flattened NHWC feature map ([N*H*W, C]) in image-major order, so when
    every image keeps the same number of positions (`per_image`), the gathered rows view as
    [N, per_image, C]; otherwise `image` gives each row's image.
    """

    def __init__(self, keep):
        if keep.dim() != 3:
            raise ValueError(f"keep-mask must be [N, H, W], got {tuple(keep.shape)}")
        keep = keep != 0
        self.shape = tuple(keep.shape)
        n = self.shape[0]
        self.removed = (~keep).unsqueeze(-1)  # [N, H, W, 1]: masks NHWC views (see zero_removed)
        self.rows = keep.reshape(-1).nonzero().squeeze(1)
        counts = keep.reshape(n, -1).sum(1)
        self.counts = counts
        uniform = bool((counts == counts[0]).all())
        self.per_image = int(counts[0]) if uniform else None
        self.image = None if uniform else torch.repeat_interleave(
            torch.arange(n, device=keep.device), counts)

    @classmethod
    def from_mask(cls, mask, x):
        """From a float/bool mask broadcastable to x [N, C, H, W] (1 = kept), one channel."""
        n, _, h, w = x.shape
        if mask.dim() == 4:
            mask = mask[:, 0]
        return cls(mask.expand(n, h, w))

    def zero_removed(self, x):
        """x [N, C, H, W] with zeros at removed positions, in x's channels_last memory.

        The mask is applied to the NHWC view: a [N, 1, H, W] mask beside a channels_last x
        leaves the output's memory format ambiguous, and torch picks NCHW, on which the next
        depthwise conv runs 3x (quiet CPU) to 250x (busy CPU) slower.
        """
        return x.permute(0, 2, 3, 1).masked_fill(self.removed, 0.0).permute(0, 3, 1, 2)

    def per_row(self, values):
        """Expand a per-image vector [N] to the gathered rows: [K, 1]."""
        if self.per_image is not None:
            return values.repeat_interleave(self.per_image).unsqueeze(1)
        return values[self.image].unsqueeze(1)

    def downsample(self, factor):
        """The keep-mask at 1/factor resolution (a cell is kept if any position in it is)."""
        keep = ~self.removed[..., 0]
        n, h, w = self.shape
        keep = keep.view(n, h // factor, factor, w // factor, factor).any(4).any(2)
        return KeepIndex(keep)


def drop_path(x, p, training, keep=None):
    """Stochastic depth: zero a whole sample's branch with probability p, scale the rest."""
    if p == 0.0 or not training:
        return x
    n = keep.shape[0] if keep is not None else x.shape[0]
    scale = x.new_empty(n).bernoulli_(1.0 - p).div_(1.0 - p)
    if keep is not None:  # x holds gathered kept rows [K, C]
        return x * keep.per_row(scale)
    return x * scale.view((n,) + (1,) * (x.dim() - 1))


def pointwise(x, linear):
    """nn.Linear applied per position of x [N, C, H, W] (channels_last memory), as a 1x1
    conv: oneDNN's 1x1 conv is several times faster than MKL's GEMM on AMD CPUs."""
    if x.is_cuda:
        return linear(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    w = linear.weight
    return F.conv2d(x, w.view(w.shape[0], w.shape[1], 1, 1), linear.bias)


class LayerNorm(nn.Module):
    """LayerNorm over channels; channels_first inputs are [N, C, H, W] (normalised as NHWC)."""

    def __init__(self, normalized_shape, eps=1e-6, data_format="channels_last"):
        super().__init__()
        if data_format not in ("channels_last", "channels_first"):
            raise ValueError(f"unknown data_format {data_format!r}")
        self.weight = nn.Parameter(torch.ones(normalized_shape))
        self.bias = nn.Parameter(torch.zeros(normalized_shape))
        self.eps = eps
        self.data_format = data_format
        self.normalized_shape = (normalized_shape,)

    def forward(self, x):
        if self.data_format == "channels_last":
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                         self.eps)
        return x.permute(0, 3, 1, 2)


class _GRNFunction(torch.autograd.Function):
    """GRN on x [N, K, C] (norm over K) with a hand-written backward.

    Autograd's version walks the big tensor about six times in backward (the norm's backward
    over a non-inner axis is slow on CPU); this one reads it twice: 2-3x faster at stage 0.
    """

    @staticmethod
    def forward(ctx, x, gamma, beta, eps):
        gx = torch.linalg.vector_norm(x, 2, dim=1, keepdim=True)  # [N, 1, C]
        m = gx.mean(dim=-1, keepdim=True) + eps
        nx = gx / m
        scale = torch.addcmul(torch.ones_like(nx), gamma, nx)  # out = x * (1 + g*Nx) + b
        ctx.save_for_backward(x, gamma, gx, m, nx, scale)
        return torch.addcmul(beta, x, scale)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, gamma, gx, m, nx, scale = ctx.saved_tensors
        ds = (dy * x).sum(dim=1, keepdim=True)  # d out / d scale, per image and channel
        dbeta = dy.sum(dim=(0, 1))
        dgamma = (ds * nx).sum(dim=(0, 1))
        dnx = ds * gamma
        dgx = dnx / m - (dnx * gx).sum(dim=-1, keepdim=True) / (m * m * x.shape[-1])
        t = torch.where(gx > 0, dgx / gx, torch.zeros_like(gx))  # d||x||/dx = x / ||x||
        dx = torch.addcmul(dy * scale, x, t)
        return dx.to(x.dtype), dgamma.to(gamma.dtype), dbeta.to(gamma.dtype), None


class GRN(nn.Module):
    """Global Response Normalization on channels-last input [N, H, W, C], per image:
    out = gamma * (x * Nx) + beta + x, Nx = ||x||_HW / (mean_C ||x||_HW + eps)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.eps = eps

    def _grn(self, x):  # [N, K, C]
        c = x.shape[-1]
        return _GRNFunction.apply(x, self.gamma.view(c), self.beta.view(c), self.eps)

    def forward(self, x):
        n, h, w, c = x.shape
        return self._grn(x.reshape(n, h * w, c)).view(n, h, w, c)

    def forward_cf(self, x):
        """Same on [N, C, H, W] (channels_last memory, so the permutes are views)."""
        return self.forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward_kept(self, x, keep):
        """x: gathered kept rows [K, C]; the norm is per image over its kept rows."""
        n = keep.shape[0]
        c = x.shape[-1]
        if keep.per_image is not None:
            return self._grn(x.view(n, keep.per_image, c)).view(-1, c)
        sq = x.new_zeros(n, c).index_add_(0, keep.image, x * x)
        # clamp: an image with no kept rows would give sqrt(0), whose gradient is inf
        gx = sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt()
        nx = gx / (gx.mean(dim=-1, keepdim=True) + self.eps)
        scale = torch.addcmul(torch.ones_like(nx), self.gamma.view(c), nx)
        return torch.addcmul(self.beta.view(c), x, scale[keep.image])


class Block(nn.Module):
    """dwconv 7x7 -> LayerNorm -> Linear(d, 4d) -> GELU -> GRN -> Linear(4d, d) -> residual."""

    def __init__(self, dim, drop_path=0.0):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.grn = GRN(4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.drop_path = drop_path

    def extra_repr(self):
        return f"drop_path={self.drop_path}"

    def forward(self, x, keep=None):
        """x: [N, C, H, W]. keep: None (dense), a mask broadcastable to x (1 = kept), or a
        KeepIndex; with a mask, x is zeroed at removed positions first."""
        if keep is None:
            y = self.norm(self.dwconv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            y = self.act(pointwise(y, self.pwconv1))
            y = self.grn.forward_cf(y)
            y = pointwise(y, self.pwconv2)
            return x + drop_path(y, self.drop_path, self.training)
        if not isinstance(keep, KeepIndex):
            keep = KeepIndex.from_mask(keep, x)
            x = keep.zero_removed(x)
        return self._forward_kept(x, keep)

    def _forward_kept(self, x, keep):
        """x must already be zero at removed positions (so the dwconv sees zeros there)."""
        n, c, h, w = x.shape
        y = self.dwconv(x).permute(0, 2, 3, 1).reshape(n * h * w, c)
        y = y.index_select(0, keep.rows)
        y = self.act(self.pwconv1(self.norm(y)))
        y = self.pwconv2(self.grn.forward_kept(y, keep))
        y = drop_path(y, self.drop_path, self.training, keep)
        out = x.permute(0, 2, 3, 1).reshape(n * h * w, c).index_add(0, keep.rows, y.to(x.dtype))
        return out.view(n, h, w, c).permute(0, 3, 1, 2)


def init_weights(module):
    """The one init of the suite: trunc_normal(std .02) conv/linear weights, zero biases."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class ConvNeXtV2(nn.Module):
    """ConvNeXt V2. `with_head=False` leaves out the final norm and head (FCMAE encoder);
    `num_classes=0` keeps the norm and returns pooled features."""
    channels_last_inside = True  # activations (so weight gradients) are channels_last: see place_model

    def __init__(self, in_chans=3, num_classes=1000, depths=(3, 3, 9, 3),
                 dims=(96, 192, 384, 768), drop_path_rate=0.0, head_init_scale=1.0,
                 with_head=True, grad_checkpointing=False):
        super().__init__()
        self.grad_checkpointing = bool(grad_checkpointing)
        if len(depths) != len(dims):
            raise ValueError("depths and dims must have the same length")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ModelError(f"drop_path_rate {drop_path_rate} is outside [0, 1); use e.g. 0.1")
        self.depths = list(depths)
        self.dims = list(dims)
        self.num_classes = num_classes
        self.downsample_layers = nn.ModuleList()
        self.downsample_layers.append(nn.Sequential(
            nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4),
            LayerNorm(dims[0], eps=1e-6, data_format="channels_first")))
        for i in range(1, len(dims)):
            self.downsample_layers.append(nn.Sequential(
                LayerNorm(dims[i - 1], eps=1e-6, data_format="channels_first"),
                nn.Conv2d(dims[i - 1], dims[i], kernel_size=2, stride=2)))
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.stages = nn.ModuleList()
        start = 0
        for depth, dim in zip(depths, dims):
            self.stages.append(nn.Sequential(
                *[Block(dim, drop_path=rates[start + j]) for j in range(depth)]))
            start += depth
        if with_head:
            self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
            self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        else:
            self.norm = None
            self.head = None
        self.apply(init_weights)
        if isinstance(self.head, nn.Linear):
            with torch.no_grad():
                self.head.weight.mul_(head_init_scale)
                self.head.bias.mul_(head_init_scale)

    def set_grad_checkpointing(self, enable=True):
        """Recompute each block in backward instead of keeping its activations (timm's name):
        less memory, one more forward of the blocks per step, the same gradients."""
        self.grad_checkpointing = bool(enable)

    def _run_block(self, block, x, keep=None):
        if self.grad_checkpointing and torch.is_grad_enabled():
            # non-reentrant; the RNG state is restored for the recomputation (same drop_path)
            return checkpoint(block, x, keep, use_reentrant=False)
        return block(x, keep)

    @property
    def stride(self):
        """Total downsampling factor of the last stage."""
        return 4 * 2 ** (len(self.dims) - 1)

    def forward_features(self, x):
        """Pooled, normalised features [N, dims[-1]]."""
        if self.norm is None:
            raise RuntimeError("this ConvNeXtV2 was built with_head=False (an encoder)")
        x = x.contiguous(memory_format=torch.channels_last)
        for down, stage in zip(self.downsample_layers, self.stages):
            x = down(x)
            for block in stage:
                x = self._run_block(block, x)
        # avg_pool2d's backward writes a channels_last gradient; x.mean's is an expanded
        # (stride 0) tensor that turned the last stage's whole backward NCHW
        return self.norm(F.avg_pool2d(x, x.shape[-2:]).flatten(1))

    def forward(self, x):
        return self.head(self.forward_features(x))

    def forward_encoder(self, x, keep):
        """Sparse-semantics encoder: x [N, C, H, W], keep [N, H/stride, W/stride] (1 = kept).

        Returns the last stage map [N, dims[-1], H/stride, W/stride], zero at removed cells.
        """
        x = x.contiguous(memory_format=torch.channels_last)
        n, _, h, w = x.shape
        grid = keep.shape[-2:]
        last = len(self.stages) - 1
        if keep.shape[0] != n or h != grid[0] * self.stride or w != grid[1] * self.stride:
            raise ValueError(f"keep-mask {tuple(keep.shape)} does not fit input {tuple(x.shape)}")
        up = 2 ** last
        keep0 = KeepIndex((keep != 0).repeat_interleave(up, 1).repeat_interleave(up, 2))
        for i, (down, stage) in enumerate(zip(self.downsample_layers, self.stages)):
            if i == 0:
                kept = keep0
                x = kept.zero_removed(down(x))
            else:
                new = kept.downsample(2)
                x = kept.zero_removed(down[0](x))
                x = new.zero_removed(down[1](x))
                kept = new
            for block in stage:
                x = self._run_block(block, x, kept)
        return x


def variant_builder(cls, name, doc="{name}: depths {depths}, dims {dims}."):
    """`name(**kwargs)` building `cls` with that variant's depths and dims (also used by FCMAE)."""
    depths, dims = VARIANTS[name]

    def build(**kwargs):
        return cls(depths=depths, dims=dims, **kwargs)

    build.__name__ = name
    build.__doc__ = doc.format(name=name, depths=depths, dims=dims)
    return build


def _builder(name):
    return variant_builder(ConvNeXtV2, name)


convnextv2_atto = _builder("convnextv2_atto")
convnextv2_femto = _builder("convnextv2_femto")
convnextv2_pico = _builder("convnextv2_pico")
convnextv2_nano = _builder("convnextv2_nano")
convnextv2_tiny = _builder("convnextv2_tiny")
convnextv2_base = _builder("convnextv2_base")
convnextv2_large = _builder("convnextv2_large")
convnextv2_huge = _builder("convnextv2_huge")

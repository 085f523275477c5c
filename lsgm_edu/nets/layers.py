"""Building blocks of DDPM++ / NCSN++ (Song et al. 2021, App. H), in plain PyTorch.

Ported from yang-song/score_sde_pytorch (`models/layers.py`, `layerspp.py`,
`up_or_down_sampling.py`): the DDPM initializer, FIR up/downsampling (StyleGAN2's `upfirdn2d`,
here with conv2d and pad only, no compiled op), BigGAN and DDPM residual blocks, and the
single-head self-attention block computed with `scaled_dot_product_attention`.

Initialization is not done by the layers: each weight records its reference init scale in an
`init_scale` attribute, and `init_weights` draws every weight from one torch.Generator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "AttnBlock",
    "Combine",
    "Downsample",
    "FIRConv2d",
    "ResnetBlockBigGAN",
    "ResnetBlockDDPM",
    "Upsample",
    "conv2d",
    "conv_downsample_2d",
    "downsample_2d",
    "fir_kernel_2d",
    "group_norm",
    "init_weights",
    "timestep_embedding",
    "upfirdn2d",
    "upsample_2d",
    "upsample_conv_2d",
    "variance_scaling_",
]


# ----------------------------------------------------------------------------- initialization


def _reference_scale(init_scale: float) -> float:
    # score_sde's `default_init(scale)`: a scale of 0 means 1e-10, so the layer starts near zero
    # but still passes gradients to what feeds it.
    return 1e-10 if init_scale == 0 else float(init_scale)


@torch.no_grad()
def variance_scaling_(
    tensor: torch.Tensor, scale: float = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Fill `tensor` in place with DDPM's init: variance_scaling(scale, 'fan_avg', 'uniform').

    Shape [out, in, *kernel]; U(-b, b) with b = sqrt(3 scale / ((fan_in + fan_out) / 2)), scale 0
    read as 1e-10 (score_sde `layers.default_init`; Ho et al. 2020).
    """
    receptive = math.prod(tensor.shape[2:])
    fan_avg = (tensor.shape[0] + tensor.shape[1]) * receptive / 2
    bound = math.sqrt(3 * _reference_scale(scale) / fan_avg)
    noise = torch.empty(tensor.shape, dtype=torch.float32).uniform_(
        -bound, bound, generator=generator
    )
    return tensor.copy_(noise)


def _mark(module: nn.Module, init_scale: float, chunks: int = 1) -> nn.Module:
    module.init_scale = float(init_scale)
    module.init_chunks = chunks
    return module


def conv2d(
    in_ch: int,
    out_ch: int,
    kernel_size: int = 3,
    *,
    stride: int = 1,
    padding: int | None = None,
    bias: bool = True,
    init_scale: float = 1.0,
) -> nn.Conv2d:
    """A conv with DDPM init (score_sde `ddpm_conv3x3` / `ddpm_conv1x1`); 'same' padding by default."""
    padding = kernel_size // 2 if padding is None else padding
    conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding, bias=bias)
    return _mark(conv, init_scale)


def linear(n_in: int, n_out: int, *, init_scale: float = 1.0, chunks: int = 1) -> nn.Linear:
    """A dense layer with DDPM init; `chunks` row blocks are initialized as separate matrices."""
    return _mark(nn.Linear(n_in, n_out), init_scale, chunks)


@torch.no_grad()
def init_weights(model: nn.Module, generator: torch.Generator) -> None:
    """Initialize every marked conv/linear of `model` (in module order) from `generator`.

    Weights: `variance_scaling_` with the layer's `init_scale`; biases: zero (score_sde).
    Layers without the mark (GroupNorm, embeddings) are left to their owner.
    """
    for module in model.modules():
        if not hasattr(module, "init_scale"):
            continue
        for block in module.weight.chunk(module.init_chunks, dim=0):
            variance_scaling_(block, module.init_scale, generator)
        if module.bias is not None:
            module.bias.zero_()


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with min(C // 4, 32) groups and eps 1e-6, as every NCSN++ norm layer."""
    groups = min(channels // 4, 32)
    if groups < 1 or channels % groups:
        raise ValueError(
            f"group_norm: {channels} channels cannot be split into min(C // 4, 32) = {groups} "
            "groups; choose nf and ch_mult so that every channel count is a multiple of it"
        )
    return nn.GroupNorm(groups, channels, eps=1e-6)


def timestep_embedding(t: torch.Tensor, dim: int, max_positions: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding of a [B] time label -> [B, dim] (Vaswani et al. 2017; DDPM).

    Frequencies exp(-log(max_positions) i / (dim/2 - 1)), i < dim/2; [sin, cos], zero-padded to an
    odd `dim` (score_sde `layers.get_timestep_embedding`). Computed in float32 at least.
    """
    half = dim // 2
    if half < 2:
        raise ValueError(f"timestep_embedding: dim must be >= 4, got {dim}")
    t = t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)
    freqs = torch.exp(
        torch.arange(half, dtype=t.dtype, device=t.device) * (-math.log(max_positions) / (half - 1))
    )
    args = t[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


# ----------------------------------------------------------------------------- FIR resampling


def fir_kernel_2d(k: Sequence[float]) -> torch.Tensor:
    """The separable 2-D FIR filter outer(k, k) / sum, normalized to unit DC gain (StyleGAN2)."""
    k = np.asarray(k, dtype=np.float64)
    if k.ndim != 1 or k.size < 2 or not np.isfinite(k).all() or k.sum() == 0:
        raise ValueError(f"fir_kernel must be >= 2 finite taps with a nonzero sum, got {k.tolist()}")
    k2 = np.outer(k, k)
    return torch.from_numpy(k2 / k2.sum()).to(torch.float32)


def _zero_upsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Insert factor - 1 zeros after every pixel along H and W, keeping x's memory format."""
    b, c, h, w = x.shape
    channels_last = x.is_contiguous(memory_format=torch.channels_last)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(
        (b, c, h * factor, w * factor), dtype=x.dtype, device=x.device, memory_format=layout
    ).zero_()
    out[:, :, ::factor, ::factor] = x
    return out


def upfirdn2d(
    x: torch.Tensor,
    kernel: torch.Tensor,
    up: int = 1,
    down: int = 1,
    pad: tuple[int, int] = (0, 0),
) -> torch.Tensor:
    """Upsample by zero insertion, pad, convolve with the FIR `kernel`, keep every `down`-th pixel.

    StyleGAN2's `upfirdn2d` (native path), applied to every channel of x [B, C, H, W]: pad =
    (before, after) on both H and W, negative values crop. Output side (H up + p0 + p1 - K) // down
    + 1. Pure torch (pad, depthwise conv2d), so autograd, channels_last and autocast just work.
    """
    if x.ndim != 4:
        raise ValueError(f"upfirdn2d: x must be [B, C, H, W], got shape {tuple(x.shape)}")
    c = x.shape[1]
    if up > 1:
        x = _zero_upsample(x, up)
    p0, p1 = pad
    if p0 or p1:
        x = F.pad(x, (p0, p1, p0, p1))
    # conv2d correlates; flipping the kernel makes it a convolution, as in upfirdn2d.
    weight = torch.flip(kernel, (0, 1)).to(device=x.device, dtype=x.dtype)
    weight = weight[None, None].expand(c, 1, *kernel.shape)
    return F.conv2d(x, weight, stride=down, groups=c)


def upsample_2d(x: torch.Tensor, kernel: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """FIR upsampling [B, C, H, W] -> [B, C, fH, fW]; a constant image stays constant inside.

    score_sde `up_or_down_sampling.upsample_2d` with gain 1: the kernel is scaled by factor^2.
    """
    p = kernel.shape[0] - factor
    return upfirdn2d(x, kernel * factor**2, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def downsample_2d(x: torch.Tensor, kernel: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """FIR downsampling [B, C, H, W] -> [B, C, H/f, W/f] (score_sde `downsample_2d`, gain 1)."""
    p = kernel.shape[0] - factor
    return upfirdn2d(x, kernel, down=factor, pad=((p + 1) // 2, p // 2))


def upsample_conv_2d(
    x: torch.Tensor, weight: torch.Tensor, kernel: torch.Tensor, factor: int = 2
) -> torch.Tensor:
    """Fused `upsample_2d` then 'same' conv with `weight` [out, in, k, k], padded once (StyleGAN2).

    A strided transposed conv with the spatially flipped, transposed weight, then the FIR filter
    (score_sde `upsample_conv_2d`, whose `w[..., ::-1, ::-1]` is `torch.flip` here).
    """
    ksize = weight.shape[-1]
    p = (kernel.shape[0] - factor) - (ksize - 1)
    w = torch.flip(weight, (2, 3)).transpose(0, 1)
    x = F.conv_transpose2d(x, w, stride=factor)
    return upfirdn2d(x, kernel * factor**2, pad=((p + 1) // 2 + factor - 1, p // 2 + 1))


def conv_downsample_2d(
    x: torch.Tensor, weight: torch.Tensor, kernel: torch.Tensor, factor: int = 2
) -> torch.Tensor:
    """Fused conv with `weight` then `downsample_2d`, padded once (score_sde `conv_downsample_2d`)."""
    ksize = weight.shape[-1]
    p = (kernel.shape[0] - factor) + (ksize - 1)
    x = upfirdn2d(x, kernel, pad=((p + 1) // 2, p // 2))
    return F.conv2d(x, weight, stride=factor)


class FIRConv2d(nn.Module):
    """3x3 conv fused with FIR up- or downsampling by 2 (score_sde `up_or_down_sampling.Conv2d`)."""

    def __init__(
        self, in_ch: int, out_ch: int, fir_kernel: Sequence[float], *, up: bool = False,
        down: bool = False, kernel_size: int = 3,
    ):
        super().__init__()
        if up == down:
            raise ValueError("FIRConv2d: exactly one of up and down must be True")
        self.up = up
        self.weight = nn.Parameter(torch.zeros(out_ch, in_ch, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        self.register_buffer("fir", fir_kernel_2d(fir_kernel), persistent=False)
        _mark(self, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        resample = upsample_conv_2d if self.up else conv_downsample_2d
        return resample(x, self.weight, self.fir) + self.bias.reshape(1, -1, 1, 1)


class Upsample(nn.Module):
    """2x upsampling: nearest (+ 3x3 conv) or FIR (fused with the conv) (score_sde `layerspp`)."""

    def __init__(
        self, in_ch: int, out_ch: int | None = None, *, with_conv: bool = False, fir: bool = False,
        fir_kernel: Sequence[float] = (1, 3, 3, 1),
    ):
        super().__init__()
        out_ch = out_ch or in_ch
        if not with_conv and out_ch != in_ch:
            raise ValueError("Upsample: changing the channel count needs with_conv=True")
        self.fir, self.with_conv = fir, with_conv
        self.conv = None
        if with_conv:
            self.conv = FIRConv2d(in_ch, out_ch, fir_kernel, up=True) if fir else conv2d(
                in_ch, out_ch
            )
        if fir:
            self.register_buffer("fir_k", fir_kernel_2d(fir_kernel), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fir:
            return self.conv(x) if self.with_conv else upsample_2d(x, self.fir_k)
        h = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(h) if self.with_conv else h


class Downsample(nn.Module):
    """2x downsampling: strided 3x3 conv / average pool, or FIR (fused with the conv) (score_sde)."""

    def __init__(
        self, in_ch: int, out_ch: int | None = None, *, with_conv: bool = False, fir: bool = False,
        fir_kernel: Sequence[float] = (1, 3, 3, 1),
    ):
        super().__init__()
        out_ch = out_ch or in_ch
        if not with_conv and out_ch != in_ch:
            raise ValueError("Downsample: changing the channel count needs with_conv=True")
        self.fir, self.with_conv = fir, with_conv
        self.conv = None
        if with_conv:
            self.conv = FIRConv2d(in_ch, out_ch, fir_kernel, down=True) if fir else conv2d(
                in_ch, out_ch, stride=2, padding=0
            )
        if fir:
            self.register_buffer("fir_k", fir_kernel_2d(fir_kernel), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fir:
            return self.conv(x) if self.with_conv else downsample_2d(x, self.fir_k)
        x = F.pad(x, (0, 1, 0, 1))  # TF's 'SAME' padding for a stride-2 window
        return self.conv(x) if self.with_conv else F.avg_pool2d(x, 2, stride=2)


class Combine(nn.Module):
    """Merge the input pyramid into the features: conv1x1(x) + y, or concat (score_sde `Combine`)."""

    def __init__(self, dim1: int, dim2: int, method: str = "cat"):
        super().__init__()
        if method not in ("cat", "sum"):
            raise ValueError(f"Combine: method must be 'cat' or 'sum', got {method!r}")
        self.conv = conv2d(dim1, dim2, 1)
        self.method = method

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        return torch.cat([h, y], dim=1) if self.method == "cat" else h + y


# ----------------------------------------------------------------------------- blocks


def _skip(x: torch.Tensor, h: torch.Tensor, skip_rescale: bool) -> torch.Tensor:
    return (x + h) / math.sqrt(2.0) if skip_rescale else x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual (score_sde `AttnBlockpp`).

    h = GroupNorm(x); out = W_o softmax(Q K^T / sqrt(C)) V; returns x + out (over sqrt 2 when
    skip_rescale). Q, K, V start at init scale 0.1 and W_o at `init_scale`, as the reference NINs.
    """

    def __init__(self, channels: int, *, skip_rescale: bool = False, init_scale: float = 0.0):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = linear(channels, 3 * channels, init_scale=0.1, chunks=3)
        self.proj_out = linear(channels, channels, init_scale=init_scale)
        self.skip_rescale = skip_rescale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v)
        out = self.proj_out(out).transpose(1, 2).reshape(b, c, h, w)
        return _skip(x, out, self.skip_rescale)


class ResnetBlockDDPM(nn.Module):
    """DDPM's residual block with time embedding and a 1x1 shortcut (score_sde `ResnetBlockDDPMpp`)."""

    def __init__(
        self, in_ch: int, out_ch: int | None = None, *, temb_dim: int | None = None,
        dropout: float = 0.1, skip_rescale: bool = False, init_scale: float = 0.0,
    ):
        super().__init__()
        out_ch = out_ch or in_ch
        self.norm0 = group_norm(in_ch)
        self.conv0 = conv2d(in_ch, out_ch)
        self.dense = linear(temb_dim, out_ch) if temb_dim is not None else None
        self.norm1 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = conv2d(out_ch, out_ch, init_scale=init_scale)
        # score_sde's NIN shortcut: a 1x1 projection with init scale 0.1
        self.shortcut = conv2d(in_ch, out_ch, 1, init_scale=0.1) if in_ch != out_ch else None
        self.skip_rescale = skip_rescale

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        if self.dense is not None and temb is not None:
            h = h + self.dense(F.silu(temb))[:, :, None, None]
        h = self.conv1(self.dropout(F.silu(self.norm1(h))))
        if self.shortcut is not None:
            x = self.shortcut(x)
        return _skip(x, h, self.skip_rescale)


class ResnetBlockBigGAN(nn.Module):
    """BigGAN residual block, optionally resampling by 2 (score_sde `ResnetBlockBigGANpp`).

    Resampling (FIR or nearest/mean) is applied to both paths after the first norm; the shortcut
    gets a 1x1 conv when the channels change or the block resamples.
    """

    def __init__(
        self, in_ch: int, out_ch: int | None = None, *, temb_dim: int | None = None,
        up: bool = False, down: bool = False, dropout: float = 0.1, fir: bool = False,
        fir_kernel: Sequence[float] = (1, 3, 3, 1), skip_rescale: bool = True,
        init_scale: float = 0.0,
    ):
        super().__init__()
        if up and down:
            raise ValueError("ResnetBlockBigGAN: up and down are exclusive")
        out_ch = out_ch or in_ch
        self.up, self.down, self.fir = up, down, fir
        if fir and (up or down):
            self.register_buffer("fir_k", fir_kernel_2d(fir_kernel), persistent=False)
        self.norm0 = group_norm(in_ch)
        self.conv0 = conv2d(in_ch, out_ch)
        self.dense = linear(temb_dim, out_ch) if temb_dim is not None else None
        self.norm1 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = conv2d(out_ch, out_ch, init_scale=init_scale)
        resamples = up or down
        self.shortcut = conv2d(in_ch, out_ch, 1) if in_ch != out_ch or resamples else None
        self.skip_rescale = skip_rescale

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return upsample_2d(x, self.fir_k) if self.fir else F.interpolate(
                x, scale_factor=2.0, mode="nearest"
            )
        if self.down:
            return downsample_2d(x, self.fir_k) if self.fir else F.avg_pool2d(x, 2)
        return x

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self._resample(F.silu(self.norm0(x)))
        x = self._resample(x)
        h = self.conv0(h)
        if self.dense is not None and temb is not None:
            h = h + self.dense(F.silu(temb))[:, :, None, None]
        h = self.conv1(self.dropout(F.silu(self.norm1(h))))
        if self.shortcut is not None:
            x = self.shortcut(x)
        return _skip(x, h, self.skip_rescale)

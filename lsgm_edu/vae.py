"""The hierarchical VAE that LSGM builds on: NVAE (Vahdat & Kautz 2020) as LSGM uses it.

A bottom-up encoder and a top-down decoder of residual cells (BN-Swish or MBConv branches,
squeeze-excitation, `skip + 0.1 * branch`); groups of spatial latents per scale. In LSGM's
variant every group has the prior N(0, I) and the hierarchy lives in the decoder: the
posterior of group j is q(ε_j | x, ε_<j), and ε_j enters the decoder through a conv
(LSGM App. G; NVlabs/LSGM `nvae.py`). The score prior models the top-scale groups only
(`top_latent`); lower scales keep N(0, I).

Written from the paper and the reference code's architecture, in plain PyTorch: weight-normalized
convs (a learnable log-norm per output channel, counted as parameters), posterior soft
clamping 5 tanh(·/5), autoregressive shift flows (NVAE §3.2 / LSGM's `PairedCellAR`),
Bernoulli, discretized mixture of logistics and Gaussian decoders, spectral regularization
(NVAE §3.2) and KL warm-up / balancing (NVAE App. A). Parameter counts equal the reference's
for the paper's five VAEs (tests/test_vae.py).

Images enter in [0, 1] ({0, 1} for Bernoulli); the networks see them mapped to [-1, 1].
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .checks import check_float, check_int
from .nets.mlp import as_generator
from .utils import randn_like

__all__ = [
    "NVAE",
    "AutoregressiveShift",
    "BernoulliDecoder",
    "Cell",
    "DiscretizedMixLogistic",
    "FlowCell",
    "GaussianDecoder",
    "VAEConfig",
    "VAEOutput",
    "WNConv2d",
    "autoregressive_mask",
    "kl_balancer",
    "kl_balancer_coeff",
    "kl_coeff",
    "soft_clamp",
]

_CHOICES = {
    "cell_type": ("res_bnswish", "res_mbconv"),
    "decoder": ("bernoulli", "dml", "gaussian"),
}
BN_EPS, BN_MOMENTUM = 1e-5, 0.05  # the reference's batch norms
LOG_2PI = math.log(2 * math.pi)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ----------------------------------------------------------------------------- configuration


@dataclass
class VAEConfig:
    """Architecture of an NVAE; each field names the LSGM `train_vae.py` flag it mirrors.

    Defaults: the CIFAR-10 VAE of LSGM's best-FID and balanced models (README, vae1/vae2).
    """

    image_size: int = 32  # util.get_input_size(dataset): 32 for CIFAR-10 and padded MNIST/OMNIGLOT
    num_channels: int = 3  # image channels: 1 for MNIST/OMNIGLOT, 3 otherwise
    num_latent_scales: int = 1  # --num_latent_scales
    num_groups_per_scale: int = 20  # --num_groups_per_scale
    num_latent_per_group: int = 9  # --num_latent_per_group
    num_channels_enc: int = 128  # --num_channels_enc
    num_channels_dec: int = 128  # --num_channels_dec
    num_preprocess_blocks: int = 1  # --num_preprocess_blocks (each ends with a downsampling cell)
    num_preprocess_cells: int = 2  # --num_preprocess_cells
    num_postprocess_blocks: int = 1  # --num_postprocess_blocks (each starts by upsampling)
    num_postprocess_cells: int = 2  # --num_postprocess_cells
    num_cell_per_cond_enc: int = 2  # --num_cell_per_cond_enc
    num_cell_per_cond_dec: int = 2  # --num_cell_per_cond_dec
    ch_mult: tuple[int, ...] = (1, 2)  # --channel_mult, one per scale (pre-process + latent)
    cell_type: str = "res_bnswish"  # --arch_instance: "res_bnswish" | "res_mbconv"
    use_se: bool = True  # --use_se
    num_flows: int = 0  # --num_nf: paired autoregressive flow cells per group
    decoder: str = "dml"  # --decoder_dist: "bernoulli" (bin) | "dml" | "gaussian" (normal)
    num_mixtures: int = 10  # logistic components of the dml decoder (nvae.py: num_mix_output)
    num_x_bits: int = 8  # --num_x_bits: pixel bit depth the dml decoder models
    input_skip: bool = False  # --progressive_input_vae input_skip (CelebA-HQ 256)
    log_sig_q_scale: float = 5.0  # --log_sig_q_scale: log σ_q soft-clamped to ±this
    crop_output: int = 0  # border pixels left out of log p(x|z) (2: MNIST/OMNIGLOT)
    checkpointing: bool = False  # activation checkpointing of the residual cells (memory)

    def __post_init__(self):
        if isinstance(self.ch_mult, list):  # YAML gives lists
            self.ch_mult = tuple(self.ch_mult)
        self.validate()

    @property
    def num_scales(self) -> int:
        """Pre-process scales plus latent scales: one channel multiplier each."""
        return self.num_preprocess_blocks + self.num_latent_scales

    @property
    def latent_size(self) -> int:
        """Side of the top (smallest) latent scale: image_size / 2^(num_scales - 1)."""
        return self.image_size // 2 ** (self.num_scales - 1)

    @property
    def top_latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the latent the score prior models: the top scale's groups stacked."""
        s = self.latent_size
        return (self.num_groups_per_scale * self.num_latent_per_group, s, s)

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""

        def bad(key, why):
            raise ValueError(f"VAEConfig.{key}: {why}, got {getattr(self, key)!r}")

        for key, choices in _CHOICES.items():
            if getattr(self, key) not in choices:
                bad(key, f"must be one of {choices}")
        for key in ("image_size", "num_channels", "num_latent_scales", "num_groups_per_scale",
                    "num_latent_per_group", "num_preprocess_cells", "num_postprocess_cells",
                    "num_cell_per_cond_enc", "num_cell_per_cond_dec", "num_mixtures"):
            if not _is_int(getattr(self, key)) or getattr(self, key) < 1:
                bad(key, "must be an int >= 1")
        for key in ("num_preprocess_blocks", "num_postprocess_blocks", "num_flows", "crop_output"):
            if not _is_int(getattr(self, key)) or getattr(self, key) < 0:
                bad(key, "must be an int >= 0")
        for key in ("num_channels_enc", "num_channels_dec"):
            if not _is_int(getattr(self, key)) or getattr(self, key) < 4:
                bad(key, "must be an int >= 4 (downsampling cells split channels four ways)")
        for key in ("use_se", "input_skip"):
            if not isinstance(getattr(self, key), bool):
                bad(key, "must be a bool")
        if self.num_postprocess_blocks != self.num_preprocess_blocks:
            bad("num_postprocess_blocks", f"must equal num_preprocess_blocks = "
                f"{self.num_preprocess_blocks} (the decoder mirrors the encoder)")
        if not isinstance(self.ch_mult, tuple) or not all(_is_int(m) and m >= 1
                                                          for m in self.ch_mult):
            bad("ch_mult", "must be a tuple of ints >= 1")
        if len(self.ch_mult) != self.num_scales:
            bad("ch_mult", f"needs one entry per scale, num_preprocess_blocks + num_latent_scales "
                f"= {self.num_scales}")
        if self.image_size % 2 ** self.num_scales:
            bad("image_size", f"must be divisible by 2**(num_preprocess_blocks + "
                f"num_latent_scales) = {2 ** self.num_scales} (every downsampled side stays even)")
        if not _is_int(self.num_x_bits) or not 1 <= self.num_x_bits <= 8:
            bad("num_x_bits", "must be an int in [1, 8]")
        if self.decoder == "bernoulli" and self.num_x_bits != 8:
            bad("num_x_bits", "must be 8 for the bernoulli decoder (binary pixels have no depth)")
        if isinstance(self.log_sig_q_scale, bool) or not isinstance(
                self.log_sig_q_scale, (int, float)) or not self.log_sig_q_scale > 0:
            bad("log_sig_q_scale", "must be a number > 0")
        if 2 * self.crop_output >= self.image_size:
            bad("crop_output", f"must leave pixels: 2 * crop_output < image_size = "
                f"{self.image_size}")


class VAEOutput(NamedTuple):
    """What `NVAE.forward` returns. Per-group lists are in decoder order (top scale first).

    logits: decoder parameters [B, C_out, H, W]; eps: latent samples ε_j (after flows);
    log_q: log q(ε_j | x, ε_<j) summed over the group, flow log-dets included, [B] each;
    log_q_per_channel: the same summed over H, W only, [B, C_j] each;
    mean, std: the Normal posterior before the flows (with `num_flows = 0` q is exactly
    N(mean, std²), the form LSGM's cross-entropy needs); kl: log q − log N(ε_j; 0, I) at
    the sample, [B] each.
    """

    logits: torch.Tensor
    eps: list[torch.Tensor]
    log_q: list[torch.Tensor]
    log_q_per_channel: list[torch.Tensor]
    mean: list[torch.Tensor]
    std: list[torch.Tensor]
    kl: list[torch.Tensor]


# ----------------------------------------------------------------------------- small helpers


def soft_clamp(x: torch.Tensor, bound: float = 5.0) -> torch.Tensor:
    """bound · tanh(x / bound): a differentiable clamp to (−bound, bound) (NVAE/LSGM code)."""
    return bound * torch.tanh(x / bound)


def log_standard_normal(x: torch.Tensor) -> torch.Tensor:
    """log N(x; 0, 1) elementwise."""
    return -0.5 * x.square() - 0.5 * LOG_2PI


def _uniform_like(x: torch.Tensor, generator=None, low: float = 1e-5) -> torch.Tensor:
    """U(low, 1 − low) draws shaped like x, as Φ(n) of normals from `utils.randn_like`, so that
    every generator type the package accepts (incl. per-sample ones) works here too."""
    return torch.special.ndtr(randn_like(x, generator)).clamp(low, 1 - low)


def _check_images(fn: str, x, cfg: VAEConfig) -> torch.Tensor:
    want = (cfg.num_channels, cfg.image_size, cfg.image_size)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim != 4 \
            or tuple(x.shape[1:]) != want:
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{fn}: x must be a floating-point tensor [B, {', '.join(map(str, want))}]"
                         f" with values in [0, 1], got {got}")
    return x


# ----------------------------------------------------------------------------- convolutions


class WNConv2d(nn.Conv2d):
    """A conv with weight normalization: W = e^g · V / ‖V‖ per output channel (Salimans &
    Kingma 2016), g = `log_weight_norm` a learnable parameter; an optional fixed 0/1 `mask`
    multiplies V first (autoregressive convs). `weight_norm=False` gives a plain conv."""

    def __init__(self, c_in, c_out, kernel_size, stride=1, padding=0, groups=1, bias=False,
                 weight_norm=True, mask: torch.Tensor | None = None):
        super().__init__(c_in, c_out, kernel_size, stride, padding, groups=groups, bias=bias)
        self.register_buffer("mask", mask, persistent=False)
        self.log_weight_norm = (nn.Parameter(torch.zeros(c_out, 1, 1, 1)) if weight_norm
                                else None)
        self.log_norm_offset = 0.0  # added to log ‖V‖ at init (0.1 gain: log 0.1)

    def normalized_weight(self) -> torch.Tensor:
        w = self.weight if self.mask is None else self.weight * self.mask
        if self.log_weight_norm is None:
            return w
        norm = w.square().sum(dim=(1, 2, 3), keepdim=True).sqrt()
        return self.log_weight_norm.exp() * w / (norm + 1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.normalized_weight(), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


def autoregressive_mask(c_in: int, c_out: int, kernel_size: int, *, depthwise: bool = False,
                        zero_diagonal: bool = False, mirror: bool = False) -> torch.Tensor:
    """0/1 mask [c_out, c_in or 1, k, k] that makes a conv causal in raster order (pixels above
    and to the left), and, at the centre pixel, in channel order (PixelCNN; NVAE §3.2).

    Channels come in blocks when c_out and c_in differ by an integer ratio: output block i sees
    input blocks < i (`zero_diagonal`) or <= i. A depthwise conv sees its own channel at the
    centre unless `zero_diagonal`. `mirror` flips the spatial order (the second flow of a pair).
    """
    if c_in % c_out and c_out % c_in:
        raise ValueError(f"autoregressive_mask: channels {c_in} -> {c_out} must divide one another")
    m = kernel_size // 2
    mask = torch.ones(c_out, 1 if depthwise else c_in, kernel_size, kernel_size)
    mask[:, :, m:, :] = 0
    mask[:, :, m, :m] = 1
    offset = 0 if zero_diagonal else 1
    if depthwise:
        centre = torch.full((c_out, 1), float(offset))
    else:
        o = torch.arange(c_out)[:, None]
        i = torch.arange(c_in)[None, :]
        if c_out >= c_in:
            centre = (i < o // (c_out // c_in) + offset).float()
        else:
            centre = (i // (c_in // c_out) < o + offset).float()
    mask[:, :, m, m] = centre
    return mask.flip(2, 3) if mirror else mask


# ----------------------------------------------------------------------------- residual cells


class BNSwish(nn.Sequential):
    """BatchNorm (eps 1e-5, momentum 0.05) followed by Swish = SiLU."""

    def __init__(self, channels: int):
        super().__init__(nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM), nn.SiLU())


class BNSwishConv(nn.Module):
    """BN-Swish, [nearest ×2 upsampling], 3×3 weight-normalized conv (NVAE Fig. 3a, one half)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.upsample = stride == -1
        self.bn_act = BNSwish(c_in)
        self.conv = WNConv2d(c_in, c_out, 3, stride=abs(stride), padding=1, bias=True)

    def forward(self, x):
        x = self.bn_act(x)
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x)


class InvertedResidual(nn.Sequential):
    """MBConv branch (NVAE Fig. 3b): [upsample], BN, 1×1 expand + BN-Swish, depthwise 5×5 +
    BN-Swish, 1×1 project + BN. Its convs are plain (no weight normalization), as in NVAE."""

    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int):
        hidden = round(c_in * expansion)
        layers = [nn.UpsamplingNearest2d(scale_factor=2)] if stride == -1 else []
        layers += [
            nn.BatchNorm2d(c_in, eps=BN_EPS, momentum=BN_MOMENTUM),
            WNConv2d(c_in, hidden, 1, weight_norm=False), BNSwish(hidden),
            WNConv2d(hidden, hidden, 5, stride=abs(stride), padding=2, groups=hidden,
                     weight_norm=False), BNSwish(hidden),
            WNConv2d(hidden, c_out, 1, weight_norm=False),
            nn.BatchNorm2d(c_out, eps=BN_EPS, momentum=BN_MOMENTUM),
        ]
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """x · sigmoid(MLP(mean_hw x)), hidden width max(C / 16, 4) (Hu et al. 2018); the gate is
    computed outside autocast, in the weights' precision (float32 under mixed precision)."""

    def __init__(self, channels: int):
        super().__init__()
        hidden = max(channels // 16, 4)
        self.gate = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(),
                                  nn.Linear(hidden, channels), nn.Sigmoid())

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            gate = self.gate(x.mean(dim=(2, 3)).to(self.gate[0].weight.dtype))
        return x * gate.to(x.dtype)[:, :, None, None]


class FactorizedReduce(nn.Module):
    """The skip path of a downsampling cell: Swish, then four stride-2 1×1 convs on the input
    shifted by (0, 0), (1, 1), (0, 1), (1, 0) pixels, concatenated (NVAE; DARTS)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        widths = [c_out // 4] * 3 + [c_out - 3 * (c_out // 4)]
        self.convs = nn.ModuleList(WNConv2d(c_in, w, 1, stride=2, bias=True) for w in widths)

    def forward(self, x):
        x = F.silu(x)
        shifted = (x, x[:, :, 1:, 1:], x[:, :, :, 1:], x[:, :, 1:, :])
        return torch.cat([conv(s) for conv, s in zip(self.convs, shifted)], dim=1)


class UpsampleSkip(nn.Module):
    """The skip path of an upsampling cell: bilinear ×2 (align_corners), then a 1×1 conv."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = WNConv2d(c_in, c_out, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True))


class Cell(nn.Module):
    """Residual cell: skip(x) + 0.1 · SE(branch(x)) (NVAE Fig. 3; the 0.1 keeps early training
    stable). `stride` 1 keeps the size, 2 halves it, −1 doubles it. The branch is two
    BN-Swish-convs ('bnswish') or one MBConv with expansion 6 or 3 ('mbconv6', 'mbconv3')."""

    def __init__(self, c_in: int, c_out: int, stride: int, branch: str, use_se: bool):
        super().__init__()
        if stride == 1:
            self.skip = nn.Identity()
        elif stride == 2:
            self.skip = FactorizedReduce(c_in, c_out)
        else:
            self.skip = UpsampleSkip(c_in, c_out)
        if branch == "bnswish":
            self.branch = nn.Sequential(BNSwishConv(c_in, c_out, stride),
                                        BNSwishConv(c_out, c_out, 1))
        else:
            self.branch = InvertedResidual(c_in, c_out, stride, expansion=int(branch[-1]))
        self.se = SqueezeExcitation(c_out) if use_se else nn.Identity()

    def forward(self, x):
        return self.skip(x) + 0.1 * self.se(self.branch(x))


def _branch(cfg: VAEConfig, where: str) -> str:
    """Branch type of a cell (LSGM `get_arch_cells`): res_mbconv uses MBConv in the decoder
    only (expansion 6 in the latent tower, 3 in post-processing)."""
    if cfg.cell_type == "res_bnswish" or where in ("pre", "enc"):
        return "bnswish"
    return "mbconv6" if where == "dec" else "mbconv3"


class EncoderCombiner(nn.Module):
    """Encoder feature + 1×1 conv of the decoder state: the input of q(ε_j | x, ε_<j)."""

    def __init__(self, c_enc: int, c_dec: int):
        super().__init__()
        self.conv = WNConv2d(c_dec, c_enc, 1, bias=True)

    def forward(self, enc, dec):
        return enc + self.conv(dec)


class DecoderCombiner(nn.Module):
    """1×1 conv of [decoder state, latent]: how a group enters the top-down decoder."""

    def __init__(self, c_dec: int, c_latent: int):
        super().__init__()
        self.conv = WNConv2d(c_dec + c_latent, c_dec, 1, bias=True)

    def forward(self, dec, z):
        return self.conv(torch.cat([dec, z], dim=1))


# ----------------------------------------------------------------------------- flows


class AutoregressiveShift(nn.Module):
    """ε ↦ ε − μ(ε) with μ autoregressive (masked convs): a unit-triangular Jacobian, so
    log|det| = 0 (NVAE §3.2's IAF cell in LSGM's shift-only form, `CellAR`)."""

    def __init__(self, num_z: int, mirror: bool, expansion: int = 6):
        super().__init__()
        h = num_z * expansion

        def masked(c_in, c_out, k, depthwise=False, zero_diagonal=False, bias=False):
            mask = autoregressive_mask(c_in, c_out, k, depthwise=depthwise,
                                       zero_diagonal=zero_diagonal, mirror=mirror)
            return WNConv2d(c_in, c_out, k, padding=k // 2, groups=c_out if depthwise else 1,
                            bias=bias, mask=mask)

        self.hidden = nn.Sequential(masked(num_z, h, 3, zero_diagonal=True), nn.ELU(),
                                    masked(h, h, 5, depthwise=True), nn.ELU())
        self.mu = masked(h, num_z, 1, bias=True)
        self.mu.log_norm_offset = math.log(0.1)  # start near the identity map

    def forward(self, z):
        return z - self.mu(self.hidden(z))


class FlowCell(nn.Module):
    """Two autoregressive shifts, the second in mirrored (reverse raster) order (`PairedCellAR`).
    Returns (ε', log|det ∂ε'/∂ε| per element) — zeros: shifts preserve volume."""

    def __init__(self, num_z: int):
        super().__init__()
        self.shifts = nn.ModuleList([AutoregressiveShift(num_z, mirror=False),
                                     AutoregressiveShift(num_z, mirror=True)])

    def forward(self, z):
        for shift in self.shifts:
            z = shift(z)
        return z, torch.zeros_like(z)


# ----------------------------------------------------------------------------- decoders p(x|z)


class BernoulliDecoder:
    """p(x|z) = Π Bernoulli(x_i; sigmoid(logit_i)) for binary images; logits [B, C, H, W]."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits

    def log_prob(self, x01: torch.Tensor) -> torch.Tensor:
        """log p(x|z) per pixel, summed over channels: [B, H, W]."""
        return -F.binary_cross_entropy_with_logits(self.logits, x01, reduction="none").sum(1)

    def sample(self, generator=None, temperature: float = 1.0) -> torch.Tensor:
        return (_uniform_like(self.logits, generator, 0.0) < torch.sigmoid(self.logits)).to(
            self.logits.dtype)

    def mean(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)


class GaussianDecoder:
    """p(x|z) = N(2x − 1; μ, σ²) per pixel, a density on the [-1, 1] scale (LSGM 'normal');
    params [B, 2C, H, W] = soft-clamped (μ, log σ)."""

    def __init__(self, params: torch.Tensor):
        self.mu, self.log_sigma = soft_clamp(params).chunk(2, dim=1)

    def log_prob(self, x01: torch.Tensor) -> torch.Tensor:
        z = (2 * x01 - 1 - self.mu) * torch.exp(-self.log_sigma)
        return (-0.5 * z.square() - self.log_sigma - 0.5 * LOG_2PI).sum(1)

    def sample(self, generator=None, temperature: float = 1.0) -> torch.Tensor:
        x = self.mu + temperature * self.log_sigma.exp() * randn_like(self.mu, generator)
        return (x.clamp(-1, 1) + 1) / 2

    def mean(self) -> torch.Tensor:
        return (self.mu.clamp(-1, 1) + 1) / 2


class DiscretizedMixLogistic:
    """Discretized mixture of logistics over 2^bits pixel levels (PixelCNN++, Salimans et al.
    2017; NVAE's `dml`). Channel c's location is μ_c + Σ_{j<c} a_cj x_j within a component.

    params [B, M + M·(2C + C(C−1)/2), H, W]: mixture logits, then per channel (location,
    log-scale), then the coupling coefficients a (tanh'd): 10·M channels for RGB, as NVAE.
    Bin probabilities are σ(upper) − σ(lower) computed in log space without the reference's
    pdf fallback, so the levels of a pixel sum to one exactly.
    """

    def __init__(self, params: torch.Tensor, num_channels: int, num_mixtures: int,
                 num_bits: int = 8):
        b, _, h, w = params.shape
        c, m = num_channels, num_mixtures
        self.num_channels, self.num_mixtures = c, m
        self.max_level = 2**num_bits - 1
        self.logit_probs = params[:, :m]  # [B, M, H, W]
        per_channel = params[:, m:m + 2 * c * m].reshape(b, c, 2 * m, h, w)
        self.locs = per_channel[:, :, :m]  # [B, C, M, H, W]
        self.log_scales = per_channel[:, :, m:].clamp(min=-7.0)
        self.coeffs = torch.tanh(params[:, m + 2 * c * m:].reshape(b, -1, m, h, w))

    @staticmethod
    def num_params(num_channels: int, num_mixtures: int) -> int:
        c = num_channels
        return num_mixtures * (1 + 2 * c + c * (c - 1) // 2)

    def _coupled_locs(self, x: torch.Tensor) -> torch.Tensor:
        """Component locations of every channel given the previous channels' values x (in
        [-1, 1], [B, C, H, W] or broadcastable) -> [B, C, M, H, W]."""
        locs, k = [], 0
        for c in range(self.num_channels):
            loc = self.locs[:, c]
            for j in range(c):
                loc = loc + self.coeffs[:, k] * x[:, j:j + 1]
                k += 1
            locs.append(loc)
        return torch.stack(locs, dim=1)

    def log_prob(self, x01: torch.Tensor) -> torch.Tensor:
        """log p(x|z) per pixel (the mixture is over the joint of the channels): [B, H, W]."""
        level = torch.round(x01 * self.max_level)  # the bin index, robust to float error
        x = (2 * level / self.max_level - 1).unsqueeze(2)  # [B, C, 1, H, W] on [-1, 1]
        centered = x - self._coupled_locs(x[:, :, 0])
        inv_scale = torch.exp(-self.log_scales)
        upper = inv_scale * (centered + 1 / self.max_level)
        lower = inv_scale * (centered - 1 / self.max_level)
        # log(σ(u) − σ(l)) = log σ(u) + log σ(−l) + log(1 − e^{l−u}): stable for all u > l
        log_mid = (-F.softplus(-upper) - F.softplus(lower)
                   + torch.log(-torch.expm1(lower - upper)))
        level = level.unsqueeze(2)
        log_bin = torch.where(level == 0, -F.softplus(-upper),  # all mass below the top edge
                              torch.where(level == self.max_level, -F.softplus(lower), log_mid))
        log_mix = log_bin.sum(1) + F.log_softmax(self.logit_probs, dim=1)  # [B, M, H, W]
        return torch.logsumexp(log_mix, dim=1)

    def _select(self, weights: torch.Tensor):
        """Locations, log-scales and coefficients mixed by one-hot or soft weights [B, M, H, W]."""
        w = weights.unsqueeze(1)
        return ((self.locs * w).sum(2), (self.log_scales * w).sum(2), (self.coeffs * w).sum(2))

    def _couple(self, x: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
        out, k = [], 0
        for c in range(self.num_channels):
            xc = x[:, c]
            for j in range(c):
                xc = xc + coeffs[:, k] * out[j]
                k += 1
            out.append(xc.clamp(-1, 1))
        return torch.stack(out, dim=1)

    def sample(self, generator=None, temperature: float = 1.0) -> torch.Tensor:
        """A component by Gumbel-max on logits / T, then a logistic draw with scale · T; not
        rounded to the pixel grid (as NVAE). Returns x in [0, 1]."""
        gumbel = -torch.log(-torch.log(_uniform_like(self.logit_probs, generator)))
        pick = torch.argmax(self.logit_probs / temperature + gumbel, dim=1)
        one_hot = F.one_hot(pick, self.num_mixtures).permute(0, 3, 1, 2).to(self.locs.dtype)
        locs, log_scales, coeffs = self._select(one_hot)
        u = _uniform_like(locs, generator)
        x = locs + log_scales.exp() * temperature * (torch.log(u) - torch.log1p(-u))
        return (self._couple(x, coeffs) + 1) / 2

    def mean(self) -> torch.Tensor:
        """NVAE's summary image: component-weighted locations, coupled, clamped; in [0, 1]."""
        locs, _, coeffs = self._select(torch.softmax(self.logit_probs, dim=1))
        return (self._couple(locs, coeffs) + 1) / 2


# ----------------------------------------------------------------------------- the model


class SpectralPowerIteration(nn.Module):
    """Left/right singular-vector estimates u [n, rows], v [n, cols] for n stacked weight
    matrices of one shape, kept as buffers (so checkpoints carry them)."""

    def __init__(self, n: int, rows: int, cols: int):
        super().__init__()
        self.register_buffer("u", torch.zeros(n, rows))
        self.register_buffer("v", torch.zeros(n, cols))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def reset(self, generator: torch.Generator) -> None:
        for buf in (self.u, self.v):
            if not buf.is_meta:
                noise = torch.randn(buf.shape, generator=generator)
                buf.copy_(F.normalize(noise, dim=1, eps=1e-3))
        self.initialized.fill_(False)

    def forward(self, weights: torch.Tensor, num_iter: int) -> torch.Tensor:
        """Σ_i u_iᵀ W_i v_i after `num_iter` power iterations (10× on the first call)."""
        with torch.no_grad():
            w = weights.detach().to(self.u.dtype)
            for _ in range(num_iter if bool(self.initialized) else 10 * num_iter):
                self.v.copy_(F.normalize((self.u.unsqueeze(1) @ w).squeeze(1), dim=1, eps=1e-3))
                self.u.copy_(F.normalize((w @ self.v.unsqueeze(2)).squeeze(2), dim=1, eps=1e-3))
            self.initialized.fill_(True)
        u, v = self.u.to(weights.dtype), self.v.to(weights.dtype)
        return (u.unsqueeze(1) @ weights @ v.unsqueeze(2)).sum()


def checkpoint_keeping_batchnorm_stats(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """block(x) with activation checkpointing (torch.utils.checkpoint, non-reentrant): the
    activations are recomputed in the backward pass instead of stored. The recomputation would
    update the BatchNorm running statistics a second time; they are put back as the first pass
    left them, so a checkpointed step changes the model exactly as a plain one does."""
    from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

    norms = [m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.training and m.track_running_stats]
    passes = 0

    def run(inp: torch.Tensor) -> torch.Tensor:
        nonlocal passes
        passes += 1
        if passes == 1 or not norms:
            return block(inp)
        stats = [[b.clone() for b in (m.running_mean, m.running_var, m.num_batches_tracked)]
                 for m in norms]
        out = block(inp)
        with torch.no_grad():
            for m, saved in zip(norms, stats):
                for buffer, value in zip((m.running_mean, m.running_var, m.num_batches_tracked),
                                         saved):
                    buffer.copy_(value)
        return out

    with set_checkpoint_early_stop(False):  # run the recomputation to its end, where it restores
        return checkpoint(run, x, use_reentrant=False)


class NVAE(nn.Module):
    """NVAE with N(0, I) priors on every group (LSGM's first stage; Vahdat & Kautz 2020).

    `vae(x)` -> `VAEOutput` for x in [0, 1]: bottom-up encoder, then the top-down pass that
    samples ε_j ~ q(ε_j | x, ε_<j) group by group and decodes. NELBO per sample:
    `vae.reconstruction_loss(out, x) + sum(out.kl)` (NVAE eq. 1 with p(ε) = N(0, I)).
    Weights are drawn from `generator` (a torch.Generator, an int seed, or None for seed 0)
    with PyTorch's default initializers, as the reference; global random state is untouched.
    """

    def __init__(self, config: VAEConfig, *, generator=None):
        super().__init__()
        if not isinstance(config, VAEConfig):
            raise TypeError(f"NVAE: config must be a VAEConfig, got {type(config).__name__}")
        self.config = cfg = dataclasses.replace(config)
        g = as_generator(generator)
        with torch.random.fork_rng(devices=[]):  # nn layers draw a default init from global RNG
            self._build(cfg)
        self._init_weights(g)

    # --- construction -------------------------------------------------------------------

    def _build(self, cfg: VAEConfig) -> None:
        enc = [cfg.num_channels_enc * m for m in cfg.ch_mult]  # channels per scale, fine to coarse
        dec = [cfg.num_channels_dec * m for m in cfg.ch_mult]
        n_pre, n_lat = cfg.num_preprocess_blocks, cfg.num_latent_scales
        groups = cfg.num_groups_per_scale
        num_z, se = cfg.num_latent_per_group, cfg.use_se
        self.num_groups = n_lat * groups

        self.stem = WNConv2d(cfg.num_channels, enc[0], 3, padding=1, bias=True)
        self.preprocess = nn.ModuleList()
        for b in range(n_pre):
            for c in range(cfg.num_preprocess_cells):
                last = c == cfg.num_preprocess_cells - 1
                self.preprocess.append(Cell(enc[b], enc[b + 1] if last else enc[b],
                                            2 if last else 1, _branch(cfg, "pre"), se))

        # bottom-up tower: groups from the finest latent scale to the top one
        self.encoder_groups = nn.ModuleList()
        self.encoder_combiners = nn.ModuleList()  # one per group but the last (the top one)
        self.encoder_down = nn.ModuleList()
        self.input_skips = nn.ModuleList()
        for s in range(n_lat):
            i = n_pre + s
            for gi in range(groups):
                self.encoder_groups.append(nn.Sequential(*[
                    Cell(enc[i], enc[i], 1, _branch(cfg, "enc"), se)
                    for _ in range(cfg.num_cell_per_cond_enc)]))
                if not (s == n_lat - 1 and gi == groups - 1):
                    self.encoder_combiners.append(EncoderCombiner(enc[i], dec[i]))
            if s < n_lat - 1:
                self.encoder_down.append(Cell(enc[i], enc[i + 1], 2, _branch(cfg, "enc"), se))
                if cfg.input_skip:  # the pre-processed image, downsampled again, added back
                    self.input_skips.append(BNSwishConv(enc[i], enc[i + 1], 2))

        # top-down tower, in decoder order (top scale first): q(ε_j | ·), flows, p-path
        top = cfg.num_scales - 1
        self.prior_ftr0 = nn.Parameter(torch.zeros(dec[top], cfg.latent_size, cfg.latent_size))
        self.posteriors, self.flows, self.latent_convs = (nn.ModuleList() for _ in range(3))
        self.decoder_combiners, self.decoder_groups, self.decoder_up = (
            nn.ModuleList() for _ in range(3))
        for s in range(n_lat):
            i = top - s
            for _ in range(groups):
                self.posteriors.append(nn.Sequential(
                    nn.ELU(), WNConv2d(enc[i], 2 * num_z, 3, padding=1, bias=True)))
                self.flows.append(nn.ModuleList(FlowCell(num_z) for _ in range(cfg.num_flows)))
                self.latent_convs.append(WNConv2d(num_z, num_z, 3, padding=1, bias=True))
                self.decoder_combiners.append(DecoderCombiner(dec[i], num_z))
                self.decoder_groups.append(nn.Sequential(*[
                    Cell(dec[i], dec[i], 1, _branch(cfg, "dec"), se)
                    for _ in range(cfg.num_cell_per_cond_dec)]))
            if s < n_lat - 1:
                self.decoder_up.append(Cell(dec[i], dec[i - 1], -1, _branch(cfg, "dec"), se))

        self.postprocess = nn.ModuleList()
        for b in range(cfg.num_postprocess_blocks):
            i = n_pre - b  # each block starts by upsampling from scale i to scale i - 1
            for c in range(cfg.num_postprocess_cells):
                c_in, stride = (dec[i], -1) if c == 0 else (dec[i - 1], 1)
                self.postprocess.append(Cell(c_in, dec[i - 1], stride, _branch(cfg, "post"), se))
        out_channels = {"bernoulli": cfg.num_channels, "gaussian": 2 * cfg.num_channels,
                        "dml": DiscretizedMixLogistic.num_params(cfg.num_channels,
                                                                 cfg.num_mixtures)}
        self.output = nn.Sequential(nn.ELU(), WNConv2d(dec[0], out_channels[cfg.decoder], 3,
                                                       padding=1, bias=True))

        # power-iteration state for the spectral regularizer, one entry per weight shape
        self._sr_shapes = sorted({self._matrix_shape(m) for m in self._convs()})
        self.spectral = nn.ModuleList(
            SpectralPowerIteration(sum(self._matrix_shape(m) == sh for m in self._convs()), *sh)
            for sh in self._sr_shapes)

    @torch.no_grad()
    def _init_weights(self, g: torch.Generator) -> None:
        """PyTorch's default conv/linear init, U(±1/sqrt(fan_in)), drawn from g; the weight
        norm starts at log(‖V‖ + 0.01) (+ log 0.1 for the flows' last conv); BN γ = 1, β = 0;
        the decoder's learned input `prior_ftr0` ~ U(0, 1), all as the reference."""

        def uniform_(p, bound):
            if not p.is_meta:
                p.copy_(torch.empty(p.shape).uniform_(-bound, bound, generator=g))

        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                uniform_(m.weight, 1 / math.sqrt(fan_in))
                if m.bias is not None:
                    uniform_(m.bias, 1 / math.sqrt(fan_in))
                if isinstance(m, WNConv2d) and m.log_weight_norm is not None \
                        and not m.weight.is_meta:
                    w = m.weight if m.mask is None else m.weight * m.mask
                    norm = w.square().sum(dim=(1, 2, 3), keepdim=True).sqrt()
                    m.log_weight_norm.copy_(torch.log(norm + 1e-2) + m.log_norm_offset)
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()
            elif isinstance(m, SpectralPowerIteration):
                m.reset(g)
        if not self.prior_ftr0.is_meta:
            self.prior_ftr0.copy_(torch.rand(self.prior_ftr0.shape, generator=g))

    def _convs(self):
        """Every conv, in module order: what spectral regularization constrains."""
        return [m for m in self.modules() if isinstance(m, WNConv2d)]

    @staticmethod
    def _matrix_shape(conv: WNConv2d) -> tuple[int, int]:
        return (conv.weight.shape[0], conv.weight[0].numel())

    # --- latent bookkeeping ---------------------------------------------------------------

    @property
    def groups_per_scale(self) -> list[int]:
        """Groups at each latent scale, top scale first (the decoder's order)."""
        return [self.config.num_groups_per_scale] * self.config.num_latent_scales

    def latent_shapes(self) -> list[tuple[int, int, int]]:
        """(C, H, W) of each group ε_j, in decoder order."""
        cfg, shapes = self.config, []
        for s in range(cfg.num_latent_scales):
            side = cfg.latent_size * 2**s
            shapes += [(cfg.num_latent_per_group, side, side)] * cfg.num_groups_per_scale
        return shapes

    def top_latent(self, eps: Sequence[torch.Tensor]) -> torch.Tensor:
        """The top-scale groups stacked along channels [B, G·L, h, w]: the latent z_0 the score
        prior models (LSGM `concat_eps_per_scale(...)[0]`)."""
        return torch.cat(list(eps[:self.config.num_groups_per_scale]), dim=1)

    def split_top_latent(self, z: torch.Tensor) -> list[torch.Tensor]:
        """Inverse of `top_latent`: z [B, G·L, h, w] -> the G top groups."""
        want = self.config.top_latent_shape
        if not isinstance(z, torch.Tensor) or z.ndim != 4 or tuple(z.shape[1:]) != want:
            got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"NVAE.split_top_latent: z must be [B, {', '.join(map(str, want))}]"
                             f", got {got}")
        return list(z.chunk(self.config.num_groups_per_scale, dim=1))

    # --- passes -----------------------------------------------------------------------------

    def preprocess_images(self, x: torch.Tensor) -> torch.Tensor:
        """x in [0, 1] -> the network input in [-1, 1], on the num_x_bits grid (LSGM
        `change_bit_length`, with rounding to 8 bits first so float error cannot move a bin)."""
        bits = self.config.num_x_bits
        if bits < 8:
            x = torch.floor(torch.round(x * 255) / 2 ** (8 - bits)) / (2**bits - 1)
        return 2 * x - 1

    def _encode(self, x: torch.Tensor):
        """Bottom-up pass -> (top feature, features saved for the encoder combiners)."""
        h = self.stem(self.preprocess_images(x))
        for cell in self.preprocess:
            h = self._run(cell, h)
        cfg, pyramid, saved, j = self.config, h, [], 0
        for s in range(cfg.num_latent_scales):
            for _ in range(cfg.num_groups_per_scale):
                h = self._run(self.encoder_groups[j], h)
                if j < len(self.encoder_combiners):
                    saved.append(h)
                j += 1
            if s < cfg.num_latent_scales - 1:
                h = self.encoder_down[s](h)
                if cfg.input_skip:
                    pyramid = self.input_skips[s](pyramid)
                    h = h + pyramid
        return h, saved

    def _top_down(self, batch: int, latent_for_group) -> torch.Tensor:
        """The decoder: from the learned input, add each group's ε_j = latent_for_group(j, s)
        (s: the decoder state so far), then upsample to logits."""
        cfg, j = self.config, 0
        s = self.prior_ftr0.unsqueeze(0).expand(batch, -1, -1, -1)
        for scale in range(cfg.num_latent_scales):
            for _ in range(cfg.num_groups_per_scale):
                eps = latent_for_group(j, s)
                s = self.decoder_combiners[j](s, self.latent_convs[j](eps))
                s = self._run(self.decoder_groups[j], s)
                j += 1
            if scale < cfg.num_latent_scales - 1:
                s = self.decoder_up[scale](s)
        for cell in self.postprocess:
            s = self._run(cell, s)
        return self.output(s)

    def _run(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Call a residual cell (or group of cells), through activation checkpointing when
        enabled and a backward pass will follow."""
        if self.config.checkpointing and torch.is_grad_enabled():
            return checkpoint_keeping_batchnorm_stats(block, x)
        return block(x)

    def forward(self, x: torch.Tensor, generator=None) -> VAEOutput:
        """Encode x in [0, 1], sample every group from q (reparameterized), decode."""
        _check_images("NVAE", x, self.config)
        top, saved = self._encode(x)
        out = {k: [] for k in ("eps", "log_q", "log_q_per_channel", "mean", "std", "kl")}

        def posterior_sample(j, s):
            ftr = top if j == 0 else self.encoder_combiners[-j](saved[-j], s)
            mu, log_sigma = self.posteriors[j](ftr).chunk(2, dim=1)
            mu, log_sigma = soft_clamp(mu, 5.0), soft_clamp(log_sigma,
                                                            self.config.log_sig_q_scale)
            sigma = log_sigma.exp()
            eps = mu + sigma * randn_like(mu, generator)
            log_q = -0.5 * ((eps - mu) / sigma).square() - log_sigma - 0.5 * LOG_2PI
            for flow in self.flows[j]:
                eps, log_det = flow(eps)
                log_q = log_q - log_det  # change of variables: q(ε') = q(ε) / |det ∂ε'/∂ε|
            per_channel = log_q.sum(dim=(2, 3))
            out["eps"].append(eps)
            out["log_q"].append(per_channel.sum(1))
            out["log_q_per_channel"].append(per_channel)
            out["mean"].append(mu)
            out["std"].append(sigma)
            out["kl"].append(per_channel.sum(1) - log_standard_normal(eps).sum(dim=(1, 2, 3)))
            return eps

        logits = self._top_down(x.shape[0], posterior_sample)
        return VAEOutput(logits=logits, **out)

    def decoder_distribution(self, logits: torch.Tensor):
        """p(x | z) for decoder output `logits`: an object with log_prob, sample and mean."""
        cfg = self.config
        if cfg.decoder == "bernoulli":
            return BernoulliDecoder(logits)
        if cfg.decoder == "gaussian":
            return GaussianDecoder(logits)
        return DiscretizedMixLogistic(logits, cfg.num_channels, cfg.num_mixtures, cfg.num_x_bits)

    def reconstruction_loss(self, out: VAEOutput | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """−log p(x | z) in nats, summed over pixels (the `crop_output` border excluded): [B]."""
        _check_images("NVAE.reconstruction_loss", x, self.config)
        logits = out.logits if isinstance(out, VAEOutput) else out
        if self.config.num_x_bits < 8:  # the same grid the encoder saw
            x = (self.preprocess_images(x) + 1) / 2
        log_p = self.decoder_distribution(logits).log_prob(x)  # [B, H, W]
        c = self.config.crop_output
        if c:
            log_p = log_p[:, c:-c, c:-c]
        return -log_p.sum(dim=(1, 2))

    def decode(self, latent: torch.Tensor | Sequence[torch.Tensor], generator=None,
               temperature: float = 1.0) -> torch.Tensor:
        """Decoder logits from the top latent [B, G·L, h, w] (or a list of the first groups);
        the remaining groups are drawn from their prior N(0, temperature² I)."""
        check_float("NVAE.decode", "temperature", temperature, positive=True)
        eps = self.split_top_latent(latent) if isinstance(latent, torch.Tensor) else list(latent)
        if not 0 < len(eps) <= self.num_groups:
            raise ValueError(f"NVAE.decode: give the top latent or 1..{self.num_groups} groups, "
                             f"got {len(eps)}")

        def given_or_prior(j, s):
            if j < len(eps):
                return eps[j].to(s)
            b, _, h, w = s.shape
            shape = (b, self.config.num_latent_per_group, h, w)
            return temperature * randn_like(s.new_empty(shape), generator)

        return self._top_down(eps[0].shape[0], given_or_prior)

    def sample_images(self, logits: torch.Tensor, generator=None,
                      temperature: float = 1.0) -> torch.Tensor:
        """Images x ~ p(x | z) in [0, 1] (Bernoulli: {0, 1})."""
        return self.decoder_distribution(logits).sample(generator, temperature)

    def decoder_mean(self, logits: torch.Tensor) -> torch.Tensor:
        """The decoder's summary image in [0, 1]: Bernoulli probabilities, Gaussian mean, or
        NVAE's mixture-weighted logistic locations."""
        return self.decoder_distribution(logits).mean()

    @torch.no_grad()
    def sample(self, n: int, generator=None, temperature: float = 1.0, *,
               use_mean: bool = False) -> torch.Tensor:
        """n images in [0, 1] from the VAE's own prior: every group ~ N(0, temperature² I),
        images drawn from p(x | z) (or its mean, `use_mean`). With a score prior, draw the top
        latent from it and call `decode` and `sample_images` instead."""
        check_int("NVAE.sample", "n", n, low=1)
        check_float("NVAE.sample", "temperature", temperature, positive=True)
        c, h, w = self.latent_shapes()[0]
        top_group = randn_like(self.prior_ftr0.new_empty(n, c, h, w), generator)
        logits = self.decode([temperature * top_group], generator, temperature)
        return self.decoder_mean(logits) if use_mean else self.sample_images(logits, generator)

    # --- regularization ---------------------------------------------------------------------

    def spectral_regularization(self, num_power_iter: int = 4) -> torch.Tensor:
        """Σ_convs σ_max(W) + Σ_BN max|γ| (NVAE §3.2; LSGM `sr_utils`): σ_max by `num_power_iter`
        power iterations per call (warm-started from buffers; 10× on the first call). The caller
        multiplies by λ (`--weight_decay_norm`)."""
        by_shape = {sh: [] for sh in self._sr_shapes}
        for conv in self._convs():
            w = conv.normalized_weight()
            by_shape[self._matrix_shape(conv)].append(w.reshape(w.shape[0], -1))
        loss = sum(power(torch.stack(by_shape[sh]), num_power_iter)
                   for sh, power in zip(self._sr_shapes, self.spectral))
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d) and m.affine:
                loss = loss + m.weight.abs().max()
        return loss


# ----------------------------------------------------------------------------- KL warm-up


def kl_coeff(step: int, total_step: float, constant_step: float, min_kl_coeff: float,
             max_kl_coeff: float) -> float:
    """KL warm-up β(step): min_kl_coeff until `constant_step`, then linear to max_kl_coeff over
    `total_step` steps (NVAE App. A; LSGM `kl_coeff`)."""
    ramp = min_kl_coeff + (max_kl_coeff - min_kl_coeff) * (step - constant_step) / total_step
    return max(min(ramp, max_kl_coeff), min_kl_coeff)


def kl_balancer_coeff(groups_per_scale: Sequence[int], fun: str = "square") -> torch.Tensor:
    """Per-group weights α_j of KL balancing, top scale first, smallest 1: for scale i (0 = top)
    'equal' 1, 'linear' 2^i, 'sqrt' 2^(i/2), 'square' 4^i / groups (NVAE App. A)."""
    scale_weight = {
        "equal": lambda i, n: 1.0, "linear": lambda i, n: 2.0**i,
        "sqrt": lambda i, n: 2.0 ** (i / 2), "square": lambda i, n: 4.0**i / n,
    }
    if fun not in scale_weight:
        raise ValueError(f"kl_balancer_coeff: fun must be one of {tuple(scale_weight)}, "
                         f"got {fun!r}")
    alpha = torch.tensor([scale_weight[fun](i, n) for i, n in enumerate(groups_per_scale)
                          for _ in range(n)], dtype=torch.float64)
    return (alpha / alpha.min()).float()


def kl_balancer(kl_all: Sequence[torch.Tensor], kl_coeff: float = 1.0, balance: bool = False,
                alpha: torch.Tensor | None = None):
    """β · Σ_j γ_j KL_j per sample, the KL term of NVAE's warm-up objective (App. A).

    kl_all: per-group KL [B] each. While β = `kl_coeff` < 1 and `balance`, the weights
    γ_j ∝ (E_batch|KL_j| + 0.01) / α_j, normalized to mean 1 and not differentiated, push
    groups with little KL to carry some (avoids posterior collapse); otherwise γ_j = 1.
    Returns (kl [B], γ [G], batch-mean KL per group [G]).
    """
    kl = torch.stack(list(kl_all), dim=1)  # [B, G]
    kl_vals = kl.mean(dim=0)
    if balance and kl_coeff < 1.0:
        if alpha is None or alpha.shape != kl_vals.shape:
            raise ValueError(f"kl_balancer: balancing needs alpha of shape [{kl.shape[1]}] "
                             "(kl_balancer_coeff), got "
                             f"{None if alpha is None else tuple(alpha.shape)}")
        gamma = kl.abs().mean(dim=0) + 0.01
        gamma = gamma / alpha.to(gamma) * gamma.sum()
        gamma = (gamma / gamma.mean()).detach()
    else:
        gamma = torch.ones_like(kl_vals)
    return kl_coeff * (kl * gamma).sum(dim=1), gamma, kl_vals

"""DDPM++ and NCSN++, the score networks of Song et al. 2021 (App. H), as one configurable U-Net.

A port of `NCSNpp` from yang-song/score_sde_pytorch (`models/ncsnpp.py`) in plain PyTorch. The
network is raw: `UNet(cfg)(x, t, y)` maps an image and a noise label to an image-shaped output
(with `out_channels` channels when set: CLD's net reads the state (x, m) and returns 3).
The label is whatever the caller feeds (log σ for the Fourier embedding, e.g. 999 t for the
positional one); dividing by σ and choosing the parameterization belong to a preconditioning
wrapper around the net, and so does input scaling (score_sde rescaled [0, 1] data to [-1, 1]
inside the net when `data.centered` was False; this net never does).

`PAPER_CONFIGS` holds the paper's CIFAR-10 and CelebA-HQ 256 settings (score_sde's config
files); `BOOK_CONFIGS` holds the small models the book trains on a CPU.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..registry import MODELS, UnknownName
from .layers import (
    AttnBlock,
    Combine,
    Downsample,
    ResnetBlockBigGAN,
    ResnetBlockDDPM,
    Upsample,
    conv2d,
    group_norm,
    init_weights,
    linear,
    timestep_embedding,
)
from .mlp import GaussianFourierProjection, as_generator

__all__ = ["UNet", "UNetConfig", "build_model"]

_CHOICES = {
    "arch": ("ncsnpp", "ddpmpp"),
    "resblock_type": ("biggan", "ddpm"),
    "progressive": ("none", "output_skip", "residual"),
    "progressive_input": ("none", "input_skip", "residual"),
    "progressive_combine": ("sum", "cat"),
    "embedding_type": ("fourier", "positional"),
}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class UNetConfig:
    """Architecture of a DDPM++ / NCSN++ network; field names follow score_sde's `config.model`.

    `image_size` and `num_channels` come from score_sde's `config.data`. `out_channels` is the
    output's channel count, 0 meaning num_channels (score_sde); the phase-space nets of CLD and
    PSLD read the 6-channel state (x, m) and return 3 (CLD: the momentum part) or 6 (PSLD), the
    references' `in_ch` / `out_ch`. `num_classes` > 0 adds a
    learned label embedding to the time embedding (not in score_sde). `init_scale` 0 means 1e-10,
    as in the reference. `conv_size` is recorded, as in score_sde, where only 3 is implemented.
    """

    arch: str = "ncsnpp"  # a label (score_sde's model.name): the fields below set the architecture
    image_size: int = 32
    num_channels: int = 3
    out_channels: int = 0  # 0: num_channels
    nf: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 4
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    resamp_with_conv: bool = True
    fir: bool = True
    fir_kernel: tuple[int, ...] = (1, 3, 3, 1)
    skip_rescale: bool = True
    resblock_type: str = "biggan"
    progressive: str = "none"
    progressive_input: str = "residual"
    progressive_combine: str = "sum"
    init_scale: float = 0.0
    embedding_type: str = "fourier"
    fourier_scale: float = 16.0
    embedding_dim: int = 0  # width of the time embedding before its MLP; 0: nf (score_sde), LSGM: 128
    conv_size: int = 3
    num_classes: int = 0
    checkpointing: bool = False

    def __post_init__(self):
        for key in ("ch_mult", "attn_resolutions", "fir_kernel"):
            if isinstance(getattr(self, key), list):  # YAML gives lists
                setattr(self, key, tuple(getattr(self, key)))
        self.validate()

    @property
    def time_embedding_dim(self) -> int:
        """Width of the sinusoidal / Fourier time features; the conditioning vector is 4x this."""
        return self.embedding_dim or self.nf

    @property
    def output_channels(self) -> int:
        """Channels of the network's output: out_channels, or num_channels when it is 0."""
        return self.out_channels or self.num_channels

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Feature-map side at each level: image_size / 2^level."""
        return tuple(self.image_size // 2**i for i in range(len(self.ch_mult)))

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""

        def bad(key, why):
            raise ValueError(f"UNetConfig.{key}: {why}, got {getattr(self, key)!r}")

        for key, choices in _CHOICES.items():
            if getattr(self, key) not in choices:
                bad(key, f"must be one of {choices}")
        for key in ("image_size", "num_channels", "nf", "num_res_blocks"):
            if not _is_int(getattr(self, key)) or getattr(self, key) < 1:
                bad(key, "must be an int >= 1")
        for key in ("out_channels", "num_classes"):
            if not _is_int(getattr(self, key)) or getattr(self, key) < 0:
                bad(key, "must be an int >= 0")
        for key in ("resamp_with_conv", "fir", "skip_rescale", "checkpointing"):
            if not isinstance(getattr(self, key), bool):
                bad(key, "must be a bool")
        for key in ("ch_mult", "attn_resolutions", "fir_kernel"):
            value = getattr(self, key)
            if not isinstance(value, tuple) or not all(_is_int(v) for v in value):
                bad(key, "must be a tuple of ints")
        if not self.ch_mult or min(self.ch_mult) < 1:
            bad("ch_mult", "must be a non-empty tuple of ints >= 1")
        if self.image_size % 2 ** (len(self.ch_mult) - 1):
            bad("image_size", f"must be divisible by 2**(len(ch_mult) - 1) = "
                f"{2 ** (len(self.ch_mult) - 1)} (ch_mult={self.ch_mult})")
        missing = [r for r in self.attn_resolutions if r not in self.resolutions]
        if missing:
            bad("attn_resolutions", f"{missing} never occur; the resolutions are {self.resolutions}")
        if not _is_number(self.dropout) or not 0 <= self.dropout < 1:
            bad("dropout", "must be a number in [0, 1)")
        if len(self.fir_kernel) < 2 or sum(self.fir_kernel) == 0:
            bad("fir_kernel", "must have >= 2 taps and a nonzero sum")
        if not _is_number(self.init_scale) or self.init_scale < 0:
            bad("init_scale", "must be a number >= 0 (0 means 1e-10, as in score_sde)")
        if not _is_number(self.fourier_scale) or not self.fourier_scale > 0:
            bad("fourier_scale", "must be a number > 0")
        if self.conv_size != 3:
            bad("conv_size", "only 3 is implemented (score_sde uses 3x3 convolutions throughout)")
        if self.embedding_dim < 0 or (self.embedding_dim and self.embedding_dim % 2):
            bad("embedding_dim", "must be 0 (use nf) or an even number > 0")
        if self.embedding_type == "positional" and self.time_embedding_dim < 4:
            bad("nf", "must be >= 4 for the positional embedding")
        for ch in self._norm_channels():
            groups = min(ch // 4, 32)
            if groups < 1 or ch % groups:
                bad("nf", f"every GroupNorm must split its channels into min(C // 4, 32) groups; "
                    f"{ch} channels do not (ch_mult={self.ch_mult})")

    def _norm_channels(self) -> list[int]:
        """Channel counts that meet a GroupNorm, skip concatenations included (as `UNet` builds)."""
        nf, last = self.nf, len(self.ch_mult) - 1
        doubles = self.progressive_input == "input_skip" and self.progressive_combine == "cat"
        seen, in_ch, skips = set(), nf, [nf]
        for i, mult in enumerate(self.ch_mult):
            for _ in range(self.num_res_blocks):
                seen |= {in_ch, nf * mult}
                in_ch = nf * mult
                skips.append(in_ch)
            if i != last:
                seen.add(in_ch)
                in_ch *= 2 if doubles else 1
                skips.append(in_ch)
        in_ch = skips[-1]
        seen.add(in_ch)
        for mult in reversed(self.ch_mult):
            for _ in range(self.num_res_blocks + 1):
                seen |= {in_ch + skips.pop(), nf * mult}
                in_ch = nf * mult
        return sorted(seen)


class _Level(nn.Module):
    """The modules of one resolution of the U-Net (a namespace: the UNet's forward runs them)."""


class UNet(nn.Module):
    """NCSN++ / DDPM++ score network (Song et al. 2021, App. H; score_sde `NCSNpp`).

    forward(x [B, C, H, W], t [B] noise label, y [B] class labels or None) -> [B, C_out, H, W],
    C_out = `config.output_channels` (C unless out_channels is set). The time
    label goes through Fourier features of `t` (pass log σ) or the sinusoidal embedding (pass
    e.g. 999 t), then two dense layers. Every weight is drawn from `generator` (a
    torch.Generator, an int seed, or None for seed 0) with score_sde's initializer; global
    random state is left untouched (dropout, at train time, still draws from it).
    """

    def __init__(self, config: UNetConfig, *, generator=None):
        super().__init__()
        if not isinstance(config, UNetConfig):
            raise TypeError(f"UNet: config must be a UNetConfig, got {type(config).__name__}")
        # a private copy (validated again): later edits to the caller's config cannot desync the net
        self.config = cfg = dataclasses.replace(config)
        g = as_generator(generator)
        # nn.Conv2d & co. draw their default init from global RNG; fork it, then re-draw from g.
        with torch.random.fork_rng(devices=[]):
            self._build(cfg, g)
        init_weights(self, g)
        if self.label_embed is not None:
            with torch.no_grad():
                self.label_embed.weight.normal_(generator=g)

    def _build(self, cfg: UNetConfig, g: torch.Generator) -> None:
        nf, emb = cfg.nf, cfg.time_embedding_dim
        temb_dim = 4 * emb
        if cfg.embedding_type == "fourier":
            self.fourier = GaussianFourierProjection(2 * emb, cfg.fourier_scale, generator=g)
            embed_dim = 2 * emb
        else:
            self.fourier = None
            embed_dim = emb
        self.temb_dense0 = linear(embed_dim, temb_dim)
        self.temb_dense1 = linear(temb_dim, temb_dim)
        self.label_embed = nn.Embedding(cfg.num_classes, temb_dim) if cfg.num_classes else None

        fir = {"fir": cfg.fir, "fir_kernel": cfg.fir_kernel}
        block_kw = {"temb_dim": temb_dim, "dropout": cfg.dropout,
                    "skip_rescale": cfg.skip_rescale, "init_scale": cfg.init_scale}
        biggan = cfg.resblock_type == "biggan"

        def resblock(in_ch, out_ch=None, **kw):
            if biggan:
                return ResnetBlockBigGAN(in_ch, out_ch, **fir, **block_kw, **kw)
            return ResnetBlockDDPM(in_ch, out_ch, **block_kw)

        def attn(ch):
            return AttnBlock(ch, skip_rescale=cfg.skip_rescale, init_scale=cfg.init_scale)

        channels, n_levels = cfg.num_channels, len(cfg.ch_mult)
        out_channels = cfg.output_channels
        self.conv_in = conv2d(channels, nf)
        hs_c, in_ch, pyramid_in_ch = [nf], nf, channels
        self.down = nn.ModuleList()
        for i, mult in enumerate(cfg.ch_mult):
            level, out_ch = _Level(), nf * mult
            level.blocks, level.attns = nn.ModuleList(), nn.ModuleList()
            with_attn = cfg.resolutions[i] in cfg.attn_resolutions
            for _ in range(cfg.num_res_blocks):
                level.blocks.append(resblock(in_ch, out_ch))
                level.attns.append(attn(out_ch) if with_attn else nn.Identity())
                in_ch = out_ch
                hs_c.append(in_ch)
            if i != n_levels - 1:
                level.downsample = resblock(in_ch, down=True) if biggan else Downsample(
                    in_ch, with_conv=cfg.resamp_with_conv, **fir
                )
                if cfg.progressive_input == "input_skip":
                    level.pyramid_down = Downsample(pyramid_in_ch, with_conv=False, **fir)
                    level.combine = Combine(pyramid_in_ch, in_ch, cfg.progressive_combine)
                    if cfg.progressive_combine == "cat":
                        in_ch *= 2
                elif cfg.progressive_input == "residual":
                    level.pyramid_down = Downsample(pyramid_in_ch, in_ch, with_conv=True, **fir)
                    pyramid_in_ch = in_ch
                hs_c.append(in_ch)
            self.down.append(level)

        in_ch = hs_c[-1]
        self.mid_block0 = resblock(in_ch)
        self.mid_attn = attn(in_ch)
        self.mid_block1 = resblock(in_ch)

        self.up = nn.ModuleList()
        pyramid_ch = 0
        for i in reversed(range(n_levels)):
            level, out_ch = _Level(), nf * cfg.ch_mult[i]
            level.blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                level.blocks.append(resblock(in_ch + hs_c.pop(), out_ch))
                in_ch = out_ch
            level.attn = attn(in_ch) if cfg.resolutions[i] in cfg.attn_resolutions else None
            top = i == n_levels - 1
            if cfg.progressive == "output_skip":
                if not top:
                    level.pyramid_up = Upsample(pyramid_ch, with_conv=False, **fir)
                level.pyramid_norm = group_norm(in_ch)
                level.pyramid_conv = conv2d(in_ch, out_channels, init_scale=cfg.init_scale)
                pyramid_ch = out_channels
            elif cfg.progressive == "residual":
                if top:
                    level.pyramid_norm = group_norm(in_ch)
                    level.pyramid_conv = conv2d(in_ch, in_ch)
                else:
                    level.pyramid_up = Upsample(pyramid_ch, in_ch, with_conv=True, **fir)
                pyramid_ch = in_ch
            if i != 0:
                level.upsample = resblock(in_ch, up=True) if biggan else Upsample(
                    in_ch, with_conv=cfg.resamp_with_conv, **fir
                )
            self.up.append(level)
        assert not hs_c

        if cfg.progressive != "output_skip":
            self.norm_out = group_norm(in_ch)
            self.conv_out = conv2d(in_ch, out_channels, init_scale=cfg.init_scale)

    # ------------------------------------------------------------------------------ forward

    def _run(self, block: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        """Call a residual/attention block, through activation checkpointing when enabled."""
        if self.config.checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _skip(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a + b) / math.sqrt(2.0) if self.config.skip_rescale else a + b

    def _check_inputs(self, x, t, y) -> None:
        cfg = self.config
        want = (cfg.num_channels, cfg.image_size, cfg.image_size)
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != want:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"UNet: x must have shape [B, {', '.join(map(str, want))}], got {shape}")
        if not isinstance(t, torch.Tensor) or t.shape != (x.shape[0],):
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"UNet: t must have shape [B] = [{x.shape[0]}], got {shape}")
        if cfg.num_classes == 0:
            if y is not None:
                raise ValueError("UNet: y given, but the model is unconditional (num_classes=0)")
            return
        if y is None:
            raise ValueError(f"UNet: y [B] is required (num_classes={cfg.num_classes})")
        if not isinstance(y, torch.Tensor) or y.shape != (x.shape[0],) or y.is_floating_point():
            desc = f"{tuple(y.shape)} {y.dtype}" if isinstance(y, torch.Tensor) else type(y)
            raise ValueError(f"UNet: y must be an integer tensor [B] = [{x.shape[0]}], got {desc}")
        if not torch.compiler.is_compiling() and (y.min() < 0 or y.max() >= cfg.num_classes):
            raise ValueError(f"UNet: y must lie in [0, {cfg.num_classes}), got "
                             f"[{int(y.min())}, {int(y.max())}]")

    def time_embedding(self, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The [B, 4 embedding_dim] conditioning vector: embed(t) -> dense -> SiLU -> dense
        (+ label embedding)."""
        if self.fourier is not None:
            emb = self.fourier(t.to(torch.float64 if t.dtype == torch.float64 else torch.float32))
        else:
            emb = timestep_embedding(t, self.config.time_embedding_dim)
        emb = emb.to(self.temb_dense0.weight.dtype)
        temb = self.temb_dense1(F.silu(self.temb_dense0(emb)))
        if self.label_embed is not None:
            temb = temb + self.label_embed(y)
        return temb

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        self._check_inputs(x, t, y)
        cfg = self.config
        temb = self.time_embedding(t, y)

        # Downsampling path; `pyramid_in` is the progressively downsampled input image.
        pyramid_in = x
        hs = [self.conv_in(x)]
        for level in self.down:
            for block, attn in zip(level.blocks, level.attns):
                h = self._run(block, hs[-1], temb)
                if isinstance(attn, AttnBlock):
                    h = self._run(attn, h)
                hs.append(h)
            if hasattr(level, "downsample"):
                if isinstance(level.downsample, ResnetBlockBigGAN):
                    h = self._run(level.downsample, hs[-1], temb)
                else:
                    h = level.downsample(hs[-1])
                if cfg.progressive_input == "input_skip":
                    pyramid_in = level.pyramid_down(pyramid_in)
                    h = level.combine(pyramid_in, h)
                elif cfg.progressive_input == "residual":
                    pyramid_in = self._skip(level.pyramid_down(pyramid_in), h)
                    h = pyramid_in
                hs.append(h)

        h = self._run(self.mid_block0, hs[-1], temb)
        h = self._run(self.mid_attn, h)
        h = self._run(self.mid_block1, h, temb)

        # Upsampling path; `pyramid` is the output (or residual) pyramid of progressive growing.
        pyramid = None
        for level in self.up:
            for block in level.blocks:
                h = self._run(block, torch.cat([h, hs.pop()], dim=1), temb)
            if level.attn is not None:
                h = self._run(level.attn, h)
            if cfg.progressive != "none":
                if pyramid is None:  # the coarsest level starts the pyramid
                    pyramid = level.pyramid_conv(F.silu(level.pyramid_norm(h)))
                elif cfg.progressive == "output_skip":
                    pyramid = level.pyramid_up(pyramid) + level.pyramid_conv(
                        F.silu(level.pyramid_norm(h))
                    )
                else:
                    pyramid = self._skip(level.pyramid_up(pyramid), h)
                    h = pyramid
            if hasattr(level, "upsample"):
                if isinstance(level.upsample, ResnetBlockBigGAN):
                    h = self._run(level.upsample, h, temb)
                else:
                    h = level.upsample(h)

        if cfg.progressive == "output_skip":
            return pyramid
        return self.conv_out(F.silu(self.norm_out(h)))


def build_model(config, *, generator=None, **extra) -> nn.Module:
    """The network of a registered model config (`cfg.model`, e.g. a `UNetConfig` -> `UNet`,
    an `LSGMConfig` -> {"vae", "sgm"}, which takes `sde=`)."""
    try:
        return MODELS.build(config, generator=generator, **extra)
    except UnknownName as e:
        raise ValueError(f"build_model: {e}") from None


MODELS.register("unet", UNet, params=UNetConfig,
                build=lambda cfg, generator=None: UNet(cfg, generator=generator))

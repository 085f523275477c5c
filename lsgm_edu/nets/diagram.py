"""The U-Net of a config, as a table and a drawing: resolutions, channels, blocks, attention, skips.

`unet_layout` reads a `UNetConfig` (or a built `UNet`'s config) and states, level by level, what
`UNet` builds from it (Song et al. 2021, App. H; the U shape of Ronneberger et al. 2015, Fig. 1);
`draw_unet` draws that layout on a matplotlib axis, so the picture changes when the config does.
"""

from __future__ import annotations

from dataclasses import dataclass

from matplotlib.patches import FancyArrowPatch, Rectangle

from .unet import UNet, UNetConfig

__all__ = ["Level", "UNetLayout", "draw_unet", "unet_layout"]


@dataclass(frozen=True)
class Level:
    """One resolution of the U-Net: its encoder (down) and decoder (up) halves."""

    resolution: int  # feature-map side: image_size / 2^level
    channels: int  # output channels of the level's residual blocks: nf * ch_mult[level]
    down_blocks: int  # residual blocks on the way down
    up_blocks: int  # residual blocks on the way up: one per skip tensor
    down_attention: int  # attention blocks on the way down (one after each block, or none)
    up_attention: int  # attention blocks on the way up (one after the blocks, or none)
    skip_channels: tuple[int, ...]  # channels of each skip tensor, in the order they are made
    downsample: str | None  # how the encoder leaves this level (None at the bottom)
    upsample: str | None  # how the decoder leaves this level upwards (None at the top)


@dataclass(frozen=True)
class UNetLayout:
    """What `UNet` builds from a config: the levels from full resolution down, and the rest."""

    levels: tuple[Level, ...]
    in_channels: int
    out_channels: int
    nf: int
    middle: tuple[str, ...]  # the blocks at the bottom of the U, in order
    embedding: str  # the time embedding and the width of the conditioning vector
    progressive_input: str
    progressive: str

    @property
    def attention_resolutions(self) -> tuple[int, ...]:
        """Resolutions with attention blocks (the middle's attention not counted)."""
        return tuple(lv.resolution for lv in self.levels if lv.down_attention or lv.up_attention)


def _config_of(config_or_model) -> UNetConfig:
    """The UNetConfig of a config or a built UNet; TypeError otherwise."""
    if isinstance(config_or_model, UNet):
        return config_or_model.config
    if isinstance(config_or_model, UNetConfig):
        return config_or_model
    raise TypeError(f"unet_layout: give a UNetConfig or a UNet, got {type(config_or_model).__name__}")


def _resampler(cfg: UNetConfig, up: bool) -> str:
    """The module that halves (or doubles) the resolution, in words (`UNet._build`)."""
    arrow = "up" if up else "down"
    if cfg.resblock_type == "biggan":
        how = "FIR" if cfg.fir else ("nearest" if up else "avg pool")
        return f"ResBlock {arrow} ({how})"
    if cfg.resamp_with_conv:
        return f"FIR conv {arrow}" if cfg.fir else ("nearest + conv" if up else "conv, stride 2")
    return f"FIR {arrow}" if cfg.fir else ("nearest" if up else "avg pool")


def unet_layout(config_or_model) -> UNetLayout:
    """The levels, channels, blocks, attention and skip connections of a DDPM++ / NCSN++ config.

    Every encoder activation at a level (the input conv or the downsampled tensor, then each
    block's output) is a skip tensor that one decoder block of that level concatenates.
    """
    cfg = _config_of(config_or_model)
    n, nrb = len(cfg.ch_mult), cfg.num_res_blocks
    doubles = cfg.progressive_input == "input_skip" and cfg.progressive_combine == "cat"
    levels, entering = [], cfg.nf  # channels of the tensor that enters a level: its first skip
    for i, mult in enumerate(cfg.ch_mult):
        ch, res = cfg.nf * mult, cfg.resolutions[i]
        attn = res in cfg.attn_resolutions
        levels.append(Level(
            resolution=res, channels=ch, down_blocks=nrb, up_blocks=nrb + 1,
            down_attention=nrb if attn else 0, up_attention=int(attn),
            skip_channels=(entering,) + (ch,) * nrb,
            downsample=_resampler(cfg, up=False) if i < n - 1 else None,
            upsample=_resampler(cfg, up=True) if i > 0 else None))
        entering = ch * (2 if doubles else 1)
    width = cfg.time_embedding_dim
    embedding = (f"Fourier features of c(t) ({2 * width})" if cfg.embedding_type == "fourier"
                 else f"sinusoidal embedding of c(t) ({width})") + f" → MLP → {4 * width}"
    return UNetLayout(levels=tuple(levels), in_channels=cfg.num_channels,
                      out_channels=cfg.output_channels, nf=cfg.nf,
                      middle=("ResBlock", "attention", "ResBlock"), embedding=embedding,
                      progressive_input=cfg.progressive_input, progressive=cfg.progressive)


def _runs(values) -> str:
    """128, 256, 256, 256 -> '128 + 3×256'."""
    parts, i = [], 0
    while i < len(values):
        j = i
        while j < len(values) and values[j] == values[i]:
            j += 1
        parts.append(f"{j - i}×{values[i]}" if j - i > 1 else f"{values[i]}")
        i = j
    return " + ".join(parts)


def _box(ax, x, y, width, text, attention):
    """A block box centred at (x, y); orange when it holds attention."""
    color = "#fdd9b5" if attention else "#cfe2f3"
    ax.add_patch(Rectangle((x - width / 2, y - 0.32), width, 0.64, facecolor=color,
                           edgecolor="0.25", lw=0.8))
    ax.text(x, y, text, ha="center", va="center", fontsize=7.5)


def _arrow(ax, start, end, text="", **kw):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=9, lw=0.9,
                                 color=kw.pop("color", "0.25"), **kw))
    if text:
        ax.text((start[0] + end[0]) / 2 + 0.08, (start[1] + end[1]) / 2, text, fontsize=6.5,
                ha="left", va="center", color="0.3")


def draw_unet(ax, config_or_model, title: str | None = None) -> UNetLayout:
    """Draw the U-Net of a config (or built UNet) on `ax`: encoder left, decoder right, one row
    per resolution, skip connections across; box width grows with channels, orange boxes hold
    attention. Returns the layout drawn (`unet_layout`)."""
    lay = unet_layout(config_or_model)
    n, top = len(lay.levels), max(lv.channels for lv in lay.levels)
    xl, xr, dy = 2.0, 8.0, 1.25

    def width(ch):
        return 1.5 + 1.3 * ch / top

    for i, lv in enumerate(lay.levels):
        y, w = -i * dy, width(lv.channels)
        head = f"{lv.resolution}×{lv.resolution}, {lv.channels} ch"
        attn_down = f" + {lv.down_attention} attn" if lv.down_attention else ""
        attn_up = " + attn" if lv.up_attention else ""
        _box(ax, xl, y, w, f"{head}\n{lv.down_blocks} ResBlocks{attn_down}", lv.down_attention)
        _box(ax, xr, y, w, f"{head}\n{lv.up_blocks} ResBlocks{attn_up}", lv.up_attention)
        _arrow(ax, (xl + w / 2, y), (xr - w / 2, y), color="tab:green")
        ax.text(5.0, y + 0.12, f"{len(lv.skip_channels)} skips: {_runs(lv.skip_channels)} ch",
                ha="center", va="bottom", fontsize=6.5, color="tab:green")
        if lv.downsample:
            _arrow(ax, (xl, y - 0.32), (xl, y - dy + 0.32), lv.downsample)
        if lv.upsample:
            _arrow(ax, (xr, y + 0.32), (xr, y + dy - 0.32), lv.upsample)
    bottom = lay.levels[-1]
    ym = -n * dy
    _box(ax, 5.0, ym, 3.6, f"{bottom.resolution}×{bottom.resolution}, {bottom.channels} ch\n"
         + ", ".join(lay.middle), attention=True)
    _arrow(ax, (xl, ym + dy - 0.32), (3.2, ym))
    _arrow(ax, (6.8, ym), (xr, ym + dy - 0.32))
    size = lay.levels[0].resolution
    ax.text(xl, 0.75, f"$x_t$: {lay.in_channels}×{size}×{size} → conv → {lay.nf} ch",
            ha="center", fontsize=7)
    ax.text(xr, 0.75, f"conv → output: {lay.out_channels}×{size}×{size}", ha="center",
            fontsize=7)
    notes = [f"time: {lay.embedding}, added in every ResBlock"]
    if lay.progressive_input != "none" or lay.progressive != "none":
        notes.append(f"progressive input: {lay.progressive_input}, output: {lay.progressive}")
    ax.text(5.0, ym - 0.75, "\n".join(notes), ha="center", va="top", fontsize=6.5)
    ax.set(xlim=(0.2, 9.8), ylim=(ym - 1.25, 1.1))
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=10)
    return lay

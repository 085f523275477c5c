"""A time-conditional MLP for 2-D toys, its Gaussian Fourier time features, and the noise-
conditional classifier built on the same trunk.

The network is raw: `ScoreMLP(x, t)` returns whatever it is trained to predict. What that is
(a score, or the noise ε) is decided by a wrapper around it, as in EDM's preconditioning.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["GaussianFourierProjection", "NoiseConditionalClassifier", "ScoreMLP", "as_generator"]


def as_generator(generator) -> torch.Generator:
    """A CPU generator from a torch.Generator, an int seed, or None (seed 0)."""
    if isinstance(generator, torch.Generator):
        return generator
    if generator is None:
        generator = 0
    if isinstance(generator, bool) or not isinstance(generator, int):
        raise TypeError(
            f"generator must be a torch.Generator, an int seed or None, got {generator!r}"
        )
    return torch.Generator().manual_seed(generator)


def _init_linear(layer: nn.Linear, generator: torch.Generator) -> None:
    """PyTorch's default Linear init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), drawn from `generator`."""
    bound = 1.0 / math.sqrt(layer.in_features)
    with torch.no_grad():
        layer.weight.copy_(
            torch.empty_like(layer.weight, device="cpu").uniform_(
                -bound, bound, generator=generator
            )
        )
        layer.bias.copy_(
            torch.empty_like(layer.bias, device="cpu").uniform_(-bound, bound, generator=generator)
        )


def _linear(n_in: int, n_out: int, generator: torch.Generator) -> nn.Linear:
    # built under a forked RNG so nn.Linear's own init does not advance global random state
    with torch.random.fork_rng(devices=[]):
        layer = nn.Linear(n_in, n_out)
    _init_linear(layer, generator)
    return layer


class GaussianFourierProjection(nn.Module):
    """Random Fourier features of a scalar: [sin(2π W t), cos(2π W t)], W ~ N(0, scale^2).

    Tancik et al. 2020; Song et al. 2021 (NCSN++ time embedding, App. H). W is fixed (a buffer,
    saved in the state dict, never trained) and drawn from `generator` (a torch.Generator, an
    int seed, or None for seed 0), never from global random state. t [B] -> [B, dim].
    """

    def __init__(self, dim: int = 64, scale: float = 16.0, *, generator=None):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2 or dim % 2:
            raise ValueError(
                f"GaussianFourierProjection: dim must be an even int >= 2, got {dim!r}"
            )
        if not scale > 0:
            raise ValueError(f"GaussianFourierProjection: scale must be > 0, got {scale!r}")
        self.dim, self.scale = dim, float(scale)
        w = torch.randn(dim // 2, generator=as_generator(generator)) * self.scale
        self.register_buffer("W", w)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.Tensor) or t.ndim != 1:
            raise ValueError(
                f"GaussianFourierProjection: t must be a tensor [B], got "
                f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t)}"
            )
        proj = 2 * math.pi * t[:, None] * self.W.to(t.dtype)[None, :]
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, scale={self.scale}"


class ScoreMLP(nn.Module):
    """Time-conditional MLP for vectors: model(x [B, dim], t [B]) -> [B, dim].

    t enters directly (no log): its Gaussian Fourier features (`fourier_dim`, `fourier_scale`)
    pass through a two-layer embedding MLP and are added to every hidden layer, h_{l+1} =
    act(W_l h_l + E_l(emb(t))), for `depth` hidden layers of width `hidden`. The output is raw:
    wrap the net in `ScoreModel(net, sde, time_input="t")` to read it as ε. Initialization is deterministic: every weight
    is drawn from `generator` (a torch.Generator, an int seed, or None for seed 0).
    """

    def __init__(
        self,
        dim: int,
        hidden: int = 128,
        depth: int = 3,
        fourier_dim: int = 64,
        fourier_scale: float = 16.0,
        *,
        act: type[nn.Module] = nn.SiLU,
        generator=None,
    ):
        super().__init__()
        for name, v in (("dim", dim), ("hidden", hidden), ("depth", depth)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ScoreMLP: {name} must be an int >= 1, got {v!r}")
        g = as_generator(generator)
        self.dim, self.hidden, self.depth = dim, hidden, depth
        self.time_embed = nn.Sequential(
            GaussianFourierProjection(fourier_dim, fourier_scale, generator=g),
            _linear(fourier_dim, hidden, g),
            act(),
            _linear(hidden, hidden, g),
        )
        self.layers = nn.ModuleList(
            [_linear(dim, hidden, g)] + [_linear(hidden, hidden, g) for _ in range(depth - 1)]
        )
        self.time_proj = nn.ModuleList([_linear(hidden, hidden, g) for _ in range(depth)])
        self.out = _linear(hidden, dim, g)
        self.act = act()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[1] != self.dim:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x)
            raise ValueError(f"ScoreMLP: x must have shape [B, {self.dim}], got {shape}")
        if not isinstance(t, torch.Tensor) or t.shape != (x.shape[0],):
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t)
            raise ValueError(f"ScoreMLP: t must have shape [B] = [{x.shape[0]}], got {shape}")
        emb = self.time_embed(t.to(x.dtype))
        h = x
        for layer, proj in zip(self.layers, self.time_proj):
            h = self.act(layer(h) + proj(emb))
        return self.out(h)


class NoiseConditionalClassifier(ScoreMLP):
    """Time-conditional MLP classifier: x [B, dim], t [B] -> logits [B, n_classes] of p_t(y | x).

    ScoreMLP's trunk (Gaussian Fourier time features added to every hidden layer) with an
    n_classes head. Trained with `noise_conditional_classifier_loss` on x_t ~ p_t(x_t | x0), it
    estimates p_t(y | x_t) at every t, which guidance needs (Song et al. 2021, App. I.1).
    """

    def __init__(
        self,
        dim: int,
        n_classes: int,
        hidden: int = 128,
        depth: int = 3,
        fourier_dim: int = 64,
        fourier_scale: float = 16.0,
        *,
        act: type[nn.Module] = nn.SiLU,
        generator=None,
    ):
        if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 2:
            raise ValueError(
                f"NoiseConditionalClassifier: n_classes must be an int >= 2, got {n_classes!r}"
            )
        g = as_generator(generator)
        super().__init__(dim, hidden, depth, fourier_dim, fourier_scale, act=act, generator=g)
        self.n_classes = n_classes
        self.out = _linear(hidden, n_classes, g)

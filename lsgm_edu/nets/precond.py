"""Preconditioning: the wrapper that turns a raw network into a score model s(x, t).

The network predicts the noise, ε̂ = net(x_t, c(t), y), and the score is s(x, t) = -ε̂ / σ_t
with σ_t the SDE's marginal std (Ho et al. 2020; Song et al. 2021, App. C). The network never
sees t directly but a noise label c(t): 999·t for VP / sub-VP (the DDPM++ convention) and
log σ(t) of the geometric noise scale for VE (NCSN++'s Fourier features of log σ). Trained with
DSM and `SigmaSquaredWeighting`, the loss is 1/2 |ε̂ - z|^2 per sample, for every SDE. Data kept
in [0, 1] (the reference's VE setting, `centered=False`) reach the network as 2x - 1, as the
reference network does internally.
"""

from __future__ import annotations

import torch
from torch import nn

from lsgm_edu.sde import VESDE
from lsgm_edu.utils import append_dims


def noise_label(sde, t: torch.Tensor) -> torch.Tensor:
    """c(t): log σ(t) for VESDE (NCSN++), 999·t for VP and sub-VP (DDPM++)."""
    if isinstance(sde, VESDE):
        return torch.log(sde.noise_scale(t))
    return 999.0 * t


class ScoreModel(nn.Module):
    """s(x, t, y) = -net(x, c(t), y) / σ_t; `net` is the raw U-Net (or any (x, label, y) module)."""

    def __init__(self, net: nn.Module, sde, centered: bool = True):
        super().__init__()
        self.net = net
        self.sde = sde
        self.centered = centered

    def eps(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The network's noise prediction ε̂(x_t, t)."""
        return self.net(x if self.centered else 2 * x - 1, noise_label(self.sde, t), y)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None):
        _, std = self.sde.marginal_prob(x, t)
        return -self.eps(x, t, y) / append_dims(std, x.ndim).to(x.dtype)

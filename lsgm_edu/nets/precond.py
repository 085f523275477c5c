"""Preconditioning: the one ε-wrapper that turns a raw network into a score model s(z, t).

The network predicts the noise, ε̂ = net(z_t, c(t), y), and the score is the kernel score at
that noise, s(z, t) = -L_t^{-T} ε̂: -ε̂ / σ_t for the scalar SDEs (Ho et al. 2020; Song et al.
2021, App. C), and the Cholesky form in phase space (Dockhorn et al. 2022, eq. 14). The SDE
supplies both the scale L_t (`sde.marginal_scale`) and the network's time input c(t)
(`sde.noise_label`: 999·t for VP / sub-VP, log σ(t) for VE); the network never imports an SDE
and never knows which parameterization it serves. Trained with DSM and
`SigmaSquaredWeighting`, the loss is 1/2 |ε̂ - ε|^2 per sample, for every SDE. Data kept in
[0, 1] (the reference's VE setting, `centered=False`) reach the network as 2x - 1, as the
reference network does internally.
"""

from __future__ import annotations

import torch
from torch import nn

from lsgm_edu.kernel import eps_to_score

_TIME_INPUTS = ("noise_label", "t")


class ScoreModel(nn.Module):
    """s(z, t, y) = -L_t^{-T} net(z, c(t), y): the ε-parameterized score of a raw network.

    `sde`: any SDE of `lsgm_edu.sde`. time_input="noise_label" feeds the network c(t) =
    sde.noise_label(t) (the U-Nets); time_input="t" feeds t itself (the toy `ScoreMLP`, whose
    Fourier features expect t in [0, 1]). `y` (class labels) is passed on only when given.
    """

    def __init__(self, net: nn.Module, sde, centered: bool = True, *,
                 time_input: str = "noise_label"):
        super().__init__()
        if time_input not in _TIME_INPUTS:
            raise ValueError(f"ScoreModel: time_input must be one of {_TIME_INPUTS}, got "
                             f"{time_input!r}")
        self.net = net
        self.sde = sde
        self.centered = centered
        self.time_input = time_input

    def eps(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The network's noise prediction ε̂(z_t, t)."""
        c = self.sde.noise_label(t) if self.time_input == "noise_label" else t
        x_in = x if self.centered else 2 * x - 1
        return self.net(x_in, c) if y is None else self.net(x_in, c, y)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None):
        t_scale = t.to(device=x.device, dtype=torch.promote_types(t.dtype, x.dtype))
        return eps_to_score(self.eps(x, t, y), self.sde.marginal_scale(t_scale).to(x.dtype))

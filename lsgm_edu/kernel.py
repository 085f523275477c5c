"""The Gaussian perturbation kernel N(mean, L L^T) of a linear SDE, per data coordinate.

Shared by the SDEs (which build kernels), the losses (DSM and HSM targets) and the
epsilon-wrappers of the networks (which turn a noise prediction into a score), so the networks
never import an SDE.
"""

from __future__ import annotations

import torch

from lsgm_edu.utils import append_dims, phase_apply, phase_outer

__all__ = ["GaussianKernel", "eps_to_score"]


def _inverse_transpose(L: torch.Tensor) -> torch.Tensor:
    """L^{-T} of triangular blocks [B, K, K] (lower Cholesky factors, or the upper factors of
    PSLD's "upper" decomposition), in float64: a K x K inverse, whichever triangle, with no
    host synchronization to find out which."""
    return torch.linalg.inv(L.to(torch.float64)).mT


def eps_to_score(eps: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The kernel score -L^{-T} eps of z = mean + L eps: -eps / sigma when L is a std [B].

    Ho et al. 2020; Song et al. 2021, App. C (K = 1); Dockhorn et al. 2022, eq. 14 (K = 2).
    """
    if scale.ndim == 1:
        return -(eps / append_dims(scale.to(eps.dtype), eps.ndim))
    return -phase_apply(_inverse_transpose(scale), eps)


class GaussianKernel:
    """N(mean, L L^T) on the state, per data coordinate: the perturbation kernel of an SDE.

    mean: [B, ...] like the state (None where only the scale matters); scale L: a std [B]
    (K = 1) or triangular factors [B, K, K] with L L^T the covariance (lower Cholesky factors;
    upper ones for PSLD's "upper" decomposition). `sample(eps)` = mean + L eps is a
    draw for eps ~ N(0, I), and `score(eps)` = -L^{-T} eps is grad log N at that draw, the DSM
    and HSM target (Vincent 2011; Dockhorn et al. 2022, eq. 14).
    """

    def __init__(self, mean: torch.Tensor | None, scale: torch.Tensor):
        self.mean, self.scale = mean, scale

    @property
    def covariance(self) -> torch.Tensor:
        """L L^T: sigma^2 [B] or [B, K, K]."""
        return phase_outer(self.scale)

    def sample(self, eps: torch.Tensor) -> torch.Tensor:
        """mean + L eps."""
        return self.mean + phase_apply(self.scale, eps)

    def score(self, eps: torch.Tensor) -> torch.Tensor:
        """-L^{-T} eps, the score of the kernel at `sample(eps)`."""
        return eps_to_score(eps, self.scale)

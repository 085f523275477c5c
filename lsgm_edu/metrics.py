"""Distances between sample sets, used to check samplers against true samples."""

from __future__ import annotations

import torch

__all__ = ["sliced_wasserstein"]


def sliced_wasserstein(
    x: torch.Tensor,
    y: torch.Tensor,
    n_projections: int = 256,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sliced 2-Wasserstein distance between the empirical distributions of x and y ([N, D]).

    SW2(x, y)^2 = E_theta W2^2(theta . x, theta . y), theta uniform on the unit sphere, with
    the 1-D W2 computed exactly by sorting (Rabin et al. 2011; Bonneel et al. 2015) and E_theta
    a Monte Carlo mean over `n_projections` directions drawn from `generator`. Returns a scalar.
    """
    for name, v in (("x", x), ("y", y)):
        if not isinstance(v, torch.Tensor) or v.ndim != 2 or not v.is_floating_point():
            raise ValueError(f"sliced_wasserstein: {name} must be a float tensor [N, D]")
    if x.shape != y.shape:
        raise ValueError(
            f"sliced_wasserstein: x and y must have the same shape [N, D] (equal sample sizes "
            f"and dims), got {tuple(x.shape)} and {tuple(y.shape)}; subsample the larger set"
        )
    if x.shape[0] < 1:
        raise ValueError("sliced_wasserstein: x and y must hold at least one point")
    if isinstance(n_projections, bool) or not isinstance(n_projections, int) or n_projections < 1:
        raise ValueError(
            f"sliced_wasserstein: n_projections must be an int >= 1, got {n_projections!r}"
        )
    dtype = torch.promote_types(x.dtype, y.dtype)
    x, y = x.to(dtype), y.to(device=x.device, dtype=dtype)
    theta = torch.randn(
        x.shape[1], n_projections, generator=generator, device=x.device, dtype=dtype
    )
    theta = theta / theta.norm(dim=0, keepdim=True)
    px, _ = torch.sort(x @ theta, dim=0)
    py, _ = torch.sort(y @ theta, dim=0)
    return (px - py).pow(2).mean().sqrt()

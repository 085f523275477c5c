"""Latent score-based generative models (LSGM; Vahdat, Kreis & Kautz, NeurIPS 2021).

A VAE encodes x to a latent z0 ~ q(z0 | x); a score-based prior p(z0) replaces its N(0, I)
prior. The VAE's KL term splits into the negative entropy of q and the cross-entropy
CE(q(z0 | x) || p(z0)), and the cross-entropy is a denoising score-matching integral over
diffusion time (LSGM, Thm. 1 / eq. 8): for a VP-type SDE with kernel z_t = m_t z0 + σ_t ε,

    CE(q || p) = ∫_eps^1 g(t)^2 / (2 σ_t^2) E ||ε̂(z_t, t) - ε||^2 dt + D/2 (1 + log 2π σ_eps^2),

up to the terminal mismatch of q and p at t = 1 (small: both are close to N(0, I) there). The
integral is estimated with one t per sample from a time sampler q(t) and its weight 1 / q(t)
(`losses.time_sampler`), and z0 is reparameterized, so the gradient reaches the encoder.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from lsgm_edu.checks import check_callable, check_like, check_tensor
from lsgm_edu.sde import SDE
from lsgm_edu.utils import randn_like

__all__ = [
    "NELBO",
    "cross_entropy",
    "cross_entropy_at",
    "cross_entropy_constant",
    "likelihood_weight",
    "nelbo",
    "normal_entropy",
]


def likelihood_weight(sde: SDE, t: torch.Tensor) -> torch.Tensor:
    """g(t)^2 / (2 σ_t^2): the weight of ||ε̂ - ε||^2 in the likelihood-weighted loss [B]."""
    _, g = sde.sde_coefficients(t)
    return g.pow(2) / (2 * sde.marginal_scale(t).pow(2))


def cross_entropy_constant(sde: SDE, eps: float, dims: int) -> float:
    """D/2 (1 + log 2π σ_eps^2), the entropy of the kernel at t = eps (LSGM, eq. 8)."""
    var = sde.marginal_scale(torch.tensor([float(eps)], dtype=torch.float64)).pow(2).item()
    return 0.5 * dims * (1 + math.log(2 * math.pi * var))


def normal_entropy(std: torch.Tensor) -> torch.Tensor:
    """H(N(mean, std^2)) = sum 1/2 log(2πe std^2) per sample [B]: minus the VAE's log q term."""
    return (0.5 * math.log(2 * math.pi * math.e) + torch.log(std)).flatten(1).sum(1)


def cross_entropy(
    sde: SDE,
    eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    mean: torch.Tensor,
    std: torch.Tensor,
    t_sampler,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Unbiased one-sample estimate [B] of CE(N(mean, std^2) || p), p the score-based prior
    whose noise prediction is `eps_fn(z_t, t)` (LSGM, eq. 8, with t ~ t_sampler).

    z0 = mean + std ξ (gradients reach mean and std), t ~ q(t) on [t_sampler.eps, 1],
    z_t = m_t z0 + σ_t ε; the estimate is weight(t) g^2/(2σ_t^2) ||ε̂ - ε||^2 + D/2 (1 + log 2π
    σ_eps^2). With eps_fn the Normal prior's noise σ_t z_t (`MixedScore` at α = 0) it is the
    cross-entropy with N(0, I), as in a plain VAE.
    """
    _check_cross_entropy_args(sde, eps_fn, mean, std, t_sampler)
    return cross_entropy_at(sde, eps_fn, mean + std * randn_like(mean, generator), t_sampler,
                            generator)


def cross_entropy_at(sde: SDE, eps_fn, z0: torch.Tensor, t_sampler,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """The same estimate [B] at a given posterior sample z0 (any posterior, e.g. after
    normalizing flows): weight(t) g^2/(2σ_t^2) ||ε̂(z_t, t) - ε||^2 + D/2 (1 + log 2π σ_eps^2)."""
    t = t_sampler.sample(z0.shape[0], generator, device=z0.device, dtype=z0.dtype)
    noise = randn_like(z0, generator)
    z_t = sde.kernel(z0, t).sample(noise)
    squared_error = (eps_fn(z_t, t) - noise).pow(2).flatten(1).sum(1)
    weight = t_sampler.weight(t) * likelihood_weight(sde, t)
    return weight * squared_error + cross_entropy_constant(sde, t_sampler.eps, z0[0].numel())


def _check_cross_entropy_args(sde, eps_fn, mean, std, t_sampler) -> None:
    fn = "cross_entropy"
    if sde.K != 1:
        raise ValueError(f"{fn}: LSGM's prior lives on a scalar SDE (K = 1), got {sde!r}")
    check_callable(fn, "eps_fn", eps_fn, "eps_fn(z_t, t) -> like z_t")
    check_tensor(fn, "mean", mean, min_ndim=2)
    check_like(fn, "std", std, mean)
    for name in ("sample", "weight"):
        if not callable(getattr(t_sampler, name, None)):
            raise TypeError(f"{fn}: t_sampler needs .sample(n, generator) and .weight(t) "
                            f"(see losses.time_sampler), got {t_sampler!r}")


class NELBO(NamedTuple):
    """Per-sample terms [B] of LSGM's bound -log p(x) <= recon + log q + CE (eq. 6)."""

    total: torch.Tensor
    reconstruction: torch.Tensor  # -log p(x | z)
    log_q: torch.Tensor  # log q(z | x), all groups (flow log-dets included)
    cross_entropy: torch.Tensor  # -log p(z): the score prior on the top scale + N(0, I) below


def nelbo(vae, prior_eps: Callable, x: torch.Tensor, sde: SDE, t_sampler,
          generator: torch.Generator | None = None) -> NELBO:
    """LSGM's negative ELBO per sample: the VAE's reconstruction and log q, the score prior's
    cross-entropy (`cross_entropy_at`) on the top-scale latent, and the N(0, I) cross-entropy
    -log N(ε_j; 0, I) of the lower-scale groups, which keep the Normal prior (LSGM, eq. 6)."""
    out = vae(x, generator)
    top = vae.groups_per_scale[0]
    z0 = vae.top_latent(out.eps[:top])
    lower = [(0.5 * e.pow(2) + 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
             for e in out.eps[top:]]
    ce = cross_entropy_at(sde, prior_eps, z0, t_sampler, generator) + sum(lower, torch.zeros(()))
    recon = vae.reconstruction_loss(out, x)
    log_q = torch.stack(out.log_q).sum(0)
    return NELBO(recon + log_q + ce, recon, log_q, ce)

"""MCMC samplers driven by a score: unadjusted Langevin (ULA) and Metropolis-adjusted Langevin.

Convention used throughout the package: one Langevin step is

    x' = x + eps * grad log p(x) + sqrt(2 eps) z,    z ~ N(0, I).

Song & Ermon (2019, eq. 4 and Algorithm 1) write the same step as
x + (alpha / 2) grad log p(x) + sqrt(alpha) z: their alpha is 2 eps here.

Every sampler draws its noise from the `generator` it is given (the global generator is used
only when none is given), calls `callback(info)` after each step and shows a tqdm bar when
`progress=True`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from tqdm.auto import trange

from .utils import append_dims

__all__ = ["ChainRecorder", "langevin", "langevin_log_proposal", "langevin_proposal", "mala"]


def _check_args(fn: str, x0, step_size, n_steps) -> float:
    if not isinstance(x0, torch.Tensor) or not x0.is_floating_point() or x0.ndim < 1:
        raise ValueError(f"{fn}: x0 must be a floating-point tensor [B, ...] (one row per chain)")
    if isinstance(step_size, torch.Tensor):
        if step_size.numel() != 1:
            raise ValueError(
                f"{fn}: step_size must be a positive scalar, got shape {tuple(step_size.shape)}"
            )
        step_size = step_size.item()
    if isinstance(step_size, bool) or not isinstance(step_size, (int, float)):
        raise TypeError(f"{fn}: step_size must be a positive float, got {step_size!r}")
    if not (math.isfinite(step_size) and step_size > 0):
        raise ValueError(f"{fn}: step_size must be finite and > 0, got {step_size!r}")
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 0:
        raise ValueError(f"{fn}: n_steps must be an int >= 0, got {n_steps!r}")
    return float(step_size)


def _gaussian_noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def langevin_proposal(x, score, step_size, generator=None):
    """One Langevin step y = x + eps s(x) + sqrt(2 eps) z, given `score` = s(x).

    The Euler-Maruyama step of dX = grad log p(X) dt + sqrt(2) dW (Roberts & Tweedie 1996)."""
    return x + step_size * score + math.sqrt(2.0 * step_size) * _gaussian_noise(x, generator)


def langevin_log_proposal(y, x, score_x, step_size):
    """log q(y | x) = -|y - x - eps s(x)|^2 / (4 eps) + const, shape [B].

    The log density of the proposal N(x + eps s(x), 2 eps I), up to a constant that cancels."""
    diff = y - x - step_size * score_x
    return -diff.pow(2).flatten(1).sum(-1) / (4.0 * step_size)


@torch.no_grad()
def langevin(
    score_fn: Callable[[torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    step_size: float,
    n_steps: int,
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], None] | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Unadjusted Langevin algorithm: n_steps of x' = x + eps s(x) + sqrt(2 eps) z.

    Song & Ermon 2019, eq. (4) with alpha = 2 eps. Biased for any eps > 0 (no accept/reject);
    see `mala` for the exact version. x0: [B, ...], one chain per row.
    """
    step_size = _check_args("langevin", x0, step_size, n_steps)
    x = x0
    for i in trange(n_steps, disable=not progress, desc="langevin"):
        x = langevin_proposal(x, score_fn(x), step_size, generator)
        if callback is not None:
            callback({"i": i, "x": x, "step_size": step_size})
    return x


@torch.no_grad()
def mala(
    log_prob_fn: Callable[[torch.Tensor], torch.Tensor],
    score_fn: Callable[[torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    step_size: float,
    n_steps: int,
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], None] | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Metropolis-adjusted Langevin (MALA, Roberts & Tweedie 1996): propose a Langevin step y,
    accept it with probability min(1, p(y) q(x | y) / (p(x) q(y | x))).

    Exact for every eps > 0: p is its stationary distribution. log_prob_fn may be unnormalized.
    The callback's info also holds "accepted" (bool [B]).
    """
    step_size = _check_args("mala", x0, step_size, n_steps)
    x = x0
    logp_x, score_x = log_prob_fn(x), score_fn(x)
    if logp_x.shape != x.shape[:1] or score_x.shape != x.shape:
        raise ValueError(
            f"mala: log_prob_fn must return [B] and score_fn a tensor like x0 {tuple(x.shape)}, "
            f"got {tuple(logp_x.shape)} and {tuple(score_x.shape)}"
        )
    for i in trange(n_steps, disable=not progress, desc="mala"):
        y = langevin_proposal(x, score_x, step_size, generator)
        logp_y, score_y = log_prob_fn(y), score_fn(y)
        log_ratio = (
            logp_y
            - logp_x
            + langevin_log_proposal(x, y, score_y, step_size)
            - langevin_log_proposal(y, x, score_x, step_size)
        )
        u = torch.rand(log_ratio.shape, generator=generator, device=x.device, dtype=x.dtype)
        # A NaN ratio compares False, so a proposal into an invalid region is rejected.
        accepted = torch.log(u) < log_ratio
        keep = append_dims(accepted, x.ndim)
        x = torch.where(keep, y, x)
        score_x = torch.where(keep, score_y, score_x)
        logp_x = torch.where(accepted, logp_y, logp_x)
        if callback is not None:
            callback({"i": i, "x": x, "step_size": step_size, "accepted": accepted})
    return x


class ChainRecorder:
    """A sampler callback that keeps the chain every `every` steps (cloned, on CPU).

    Records the state after steps i with (i + 1) % every == 0, and every step's MALA
    acceptance mask. `trajectory()` -> [T, B, ...]; `acceptance_rate()` -> float.
    """

    def __init__(self, every: int = 1):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"ChainRecorder: every must be an int >= 1, got {every!r}")
        self.every = every
        self.steps: list[int] = []
        self.states: list[torch.Tensor] = []
        self.accepted: list[torch.Tensor] = []

    def __call__(self, info: dict) -> None:
        if (info["i"] + 1) % self.every == 0:
            self.steps.append(info["i"])
            self.states.append(info["x"].detach().to("cpu", copy=True))
        if "accepted" in info:
            self.accepted.append(info["accepted"].detach().to("cpu", copy=True))

    def trajectory(self) -> torch.Tensor:
        """The recorded states stacked along a new first axis: [T, B, ...]."""
        if not self.states:
            raise ValueError(
                "ChainRecorder.trajectory: nothing recorded yet; pass the recorder as "
                "callback= to a sampler and run at least `every` steps"
            )
        return torch.stack(self.states)

    def acceptance_rate(self) -> float:
        """Fraction of accepted proposals over all recorded steps and chains (MALA only)."""
        if not self.accepted:
            raise ValueError(
                "ChainRecorder.acceptance_rate: no acceptance recorded; only samplers with an "
                "accept/reject step (mala) report 'accepted' (langevin moves every step)"
            )
        return torch.cat([a.flatten() for a in self.accepted]).float().mean().item()

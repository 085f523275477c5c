"""Scalar linear SDEs dx = f(t) x dt + g(t) dW: VP, sub-VP and VE (Song et al. 2021).

Each SDE states its two scalar coefficients once (`sde_coefficients`) and its Gaussian
perturbation kernel p_t(x | x0) = N(alpha(t) x0, sigma(t)^2 I) (`marginal_coefficients`);
the drift, the marginals, the prior, the DDPM/SMLD discretizations and the reverse-time SDE
or probability-flow ODE all derive from them. Times `t` are per-sample tensors [B]; data are
[B, ...] of any shape; results follow the dtype and device of `x` (or of `t` alone).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable

import torch

from lsgm_edu.utils import append_dims

__all__ = ["SDE", "VESDE", "VPSDE", "ReverseSDE", "SubVPSDE"]

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _check_number(v, name: str, cls: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{cls}: {name} must be a finite number, got {v!r}")
    return float(v)


def _check_time(t, fn: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise ValueError(
            f"{fn}: t must be a floating-point torch.Tensor of times (one per sample, shape [B]), "
            f"got {type(t).__name__}"
            + (f" of dtype {t.dtype}" if isinstance(t, torch.Tensor) else "")
        )
    return t


def _check_x_t(x, t, fn: str) -> torch.Tensor:
    """Validate x [B, ...] and t [B]; return t on x's device in the promoted float dtype."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 1:
        raise ValueError(f"{fn}: x must be a floating-point torch.Tensor of shape [B, ...]")
    _check_time(t, fn)
    if t.shape != (x.shape[0],):
        raise ValueError(
            f"{fn}: t must have shape [B] = [{x.shape[0]}] (one time per sample of x with shape "
            f"{tuple(x.shape)}), got {tuple(t.shape)}; for a shared time use "
            f"torch.full((B,), t)"
        )
    return t.to(device=x.device, dtype=torch.promote_types(t.dtype, x.dtype))


def _sqrt_clamped(v: torch.Tensor) -> torch.Tensor:
    # Variances that are 0 in exact arithmetic (t = 0, or t slightly below 0 where torchdiffeq
    # may evaluate) can round to tiny negatives; clamp so sqrt never returns NaN.
    return v.clamp_min(0).sqrt()


class SDE(abc.ABC):
    """A linear SDE dx = f(t) x dt + g(t) dW on [0, T] (Song et al. 2021, eq. 5).

    Subclasses implement `sde_coefficients(t) -> (f, g)` and `marginal_coefficients(t) ->
    (alpha, sigma)`, and set `prior_std` (the prior is N(0, prior_std^2 I)).
    """

    T: float = 1.0
    prior_std: float = 1.0

    def __init__(self, N: int = 1000):
        if isinstance(N, bool) or not isinstance(N, int) or N < 1:
            raise ValueError(
                f"{type(self).__name__}: N must be an int >= 1 (number of discretization steps), "
                f"got {N!r}"
            )
        self.N = N

    @abc.abstractmethod
    def sde_coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scalar drift coefficient f(t) and diffusion g(t), each shaped like t."""

    @abc.abstractmethod
    def marginal_coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha(t), sigma(t) of the kernel p_t(x | x0) = N(alpha x0, sigma^2 I), shaped like t."""

    def sde(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward drift f(t) x (like x) and diffusion g(t) [B] (Song et al. 2021, eq. 5)."""
        t = _check_x_t(x, t, f"{type(self).__name__}.sde")
        f, g = self.sde_coefficients(t)
        return append_dims(f.to(x.dtype), x.ndim) * x, g.to(x.dtype)

    def marginal_prob(self, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean alpha(t) x0 (like x0) and std sigma(t) [B] of p_t(x | x0) (Song et al., eq. 29)."""
        t = _check_x_t(x0, t, f"{type(self).__name__}.marginal_prob")
        alpha, sigma = self.marginal_coefficients(t)
        return append_dims(alpha.to(x0.dtype), x0.ndim) * x0, sigma.to(x0.dtype)

    def prior_sampling(
        self,
        shape,
        generator: torch.Generator | None = None,
        device=None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Draw x_T ~ N(0, prior_std^2 I) of `shape` (device defaults to the generator's)."""
        try:
            shape = torch.Size(shape)
        except TypeError:
            shape = None
        if shape is None or len(shape) < 1 or any(s < 0 for s in shape):
            raise ValueError(
                f"{type(self).__name__}.prior_sampling: shape must be a sequence of ints [B, ...]"
            )
        if device is None:
            device = generator.device if generator is not None else torch.device("cpu")
        z = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        return self.prior_std * z

    def prior_logp(self, z: torch.Tensor) -> torch.Tensor:
        """log N(z; 0, prior_std^2 I) in nats [B], summed over all non-batch dims."""
        if not isinstance(z, torch.Tensor) or not z.is_floating_point() or z.ndim < 1:
            raise ValueError(
                f"{type(self).__name__}.prior_logp: z must be a floating-point tensor [B, ...]"
            )
        n_dims = math.prod(z.shape[1:])
        var = self.prior_std**2
        sq = z.pow(2).reshape(z.shape[0], -1).sum(-1)
        return -0.5 * n_dims * math.log(2 * math.pi * var) - 0.5 * sq / var

    def discretize(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """f, G [B] of x_{i+1} = x_i + f + G z with step T/N: Euler-Maruyama, f dt and g sqrt(dt).

        VPSDE and VESDE override this with the DDPM and SMLD chains (Song et al. 2021, eqs. 10, 8).
        """
        drift, diffusion = self.sde(x, t)
        dt = self.T / self.N
        return drift * dt, diffusion * math.sqrt(dt)

    def _step_index(self, t: torch.Tensor) -> torch.Tensor:
        # The reference's i = floor(t (N - 1) / T). The 1e-4 slack maps a time on the grid,
        # i / (N - 1) * T up to rounding (float32 included), to i and not i - 1; the clamp keeps
        # t slightly outside [0, T] in range.
        i = torch.floor(t.double() * ((self.N - 1) / self.T) + 1e-4)
        return i.clamp(0, self.N - 1).long()

    def reverse(self, score_fn: ScoreFn, probability_flow: bool = False) -> ReverseSDE:
        """The reverse-time SDE (Song et al. 2021, eq. 6) or probability-flow ODE (eq. 13)."""
        if not callable(score_fn):
            raise TypeError("SDE.reverse: score_fn must be callable as score_fn(x, t) -> like x")
        return ReverseSDE(self, score_fn, probability_flow)


class ReverseSDE:
    """dx = [f(x, t) - c g(t)^2 score(x, t)] dt + g_rev(t) dW-bar, run from T down to 0.

    c = 1 and g_rev = g for the reverse-time SDE (Song et al. 2021, eq. 6); c = 1/2 and
    g_rev = 0 for the probability-flow ODE (eq. 13). Drift and diffusion are written in forward
    time t, as in the paper: a sampler steps with dt < 0.
    """

    def __init__(self, forward: SDE, score_fn: ScoreFn, probability_flow: bool = False):
        self.forward = forward
        self.score_fn = score_fn
        self.probability_flow = bool(probability_flow)
        self.N = forward.N
        self.T = forward.T

    def __repr__(self) -> str:
        return f"ReverseSDE({self.forward!r}, probability_flow={self.probability_flow})"

    def _weight(self) -> float:
        return 0.5 if self.probability_flow else 1.0

    def sde(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reverse drift f - g^2 s (f - 1/2 g^2 s for the ODE) like x, and diffusion [B]."""
        drift, g = self.forward.sde(x, t)
        score = self.score_fn(x, t)
        drift = drift - append_dims(g.pow(2) * self._weight(), x.ndim) * score
        return drift, torch.zeros_like(g) if self.probability_flow else g

    def discretize(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reverse-diffusion rule x_{i-1} = x_i - f_rev + G_rev z (Song et al. 2021, App. E).

        f_rev = f - G^2 s, G_rev = G (f - 1/2 G^2 s and 0 for the probability flow).
        """
        f, G = self.forward.discretize(x, t)
        score = self.score_fn(x, t)
        rev_f = f - append_dims(G.pow(2) * self._weight(), x.ndim) * score
        return rev_f, torch.zeros_like(G) if self.probability_flow else G


class _LinearBetaSDE(SDE):
    """Shared schedule of VP and sub-VP: beta(t) = beta_min + t (beta_max - beta_min)."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, N: int = 1000):
        super().__init__(N)
        cls = type(self).__name__
        beta_min = _check_number(beta_min, "beta_min", cls)
        beta_max = _check_number(beta_max, "beta_max", cls)
        if beta_min < 0:
            raise ValueError(f"{cls}: beta_min must be >= 0, got {beta_min}")
        if beta_max < beta_min or beta_max <= 0:
            raise ValueError(
                f"{cls}: beta_max must be >= beta_min and > 0, got beta_min={beta_min}, "
                f"beta_max={beta_max}; swap them if they are reversed"
            )
        self.beta_min = beta_min
        self.beta_max = beta_max

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(beta_min={self.beta_min}, beta_max={self.beta_max}, N={self.N})"
        )

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        """beta(t) = beta_min + t (beta_max - beta_min) (Song et al. 2021, App. C, T = 1)."""
        _check_time(t, f"{type(self).__name__}.beta")
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def integrated_beta(self, t: torch.Tensor) -> torch.Tensor:
        """int_0^t beta(s) ds = beta_min t + 1/2 (beta_max - beta_min) t^2."""
        _check_time(t, f"{type(self).__name__}.integrated_beta")
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t.pow(2)


class VPSDE(_LinearBetaSDE):
    """Variance preserving: dx = -1/2 beta(t) x dt + sqrt(beta(t)) dW (Song et al. 2021, eq. 11).

    alpha(t) = exp(-1/2 int_0^t beta), sigma(t)^2 = 1 - exp(-int_0^t beta) (eq. 29); prior
    N(0, I). `discretize` is DDPM's chain with discrete_betas = linspace(beta_min / N,
    beta_max / N, N) (Ho et al. 2020; Song et al. 2021, eq. 10).
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, N: int = 1000):
        super().__init__(beta_min, beta_max, N)
        self.discrete_betas = torch.linspace(
            self.beta_min / N, self.beta_max / N, N, dtype=torch.float64
        )

    def sde_coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """f(t) = -1/2 beta(t), g(t) = sqrt(beta(t)) (eq. 11)."""
        beta = self.beta(t)
        return -0.5 * beta, _sqrt_clamped(beta)

    def marginal_coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha = exp(-1/2 int beta), sigma = sqrt(1 - exp(-int beta)) (eq. 29)."""
        b = self.integrated_beta(t)
        return torch.exp(-0.5 * b), _sqrt_clamped(-torch.expm1(-b))

    def discretize(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """DDPM: x_{i+1} = sqrt(1 - beta_i) x_i + sqrt(beta_i) z, i = floor(t (N - 1) / T).

        Returns f = (sqrt(1 - beta_i) - 1) x and G = sqrt(beta_i) [B] (Song et al. 2021, eq. 10).
        """
        t = _check_x_t(x, t, "VPSDE.discretize")
        if self.beta_max / self.N >= 1:
            raise ValueError(
                f"VPSDE.discretize: the DDPM chain needs beta_max / N < 1 (each beta_i < 1), got "
                f"beta_max={self.beta_max}, N={self.N}; use N > beta_max"
            )
        beta = self.discrete_betas.to(x.device)[self._step_index(t)]
        f = append_dims(torch.sqrt(1.0 - beta) - 1.0, x.ndim).to(x.dtype) * x
        return f, beta.sqrt().to(x.dtype)


class SubVPSDE(_LinearBetaSDE):
    """sub-VP: dx = -1/2 beta x dt + sqrt(beta (1 - exp(-2 int_0^t beta))) dW (Song et al., eq. 12).

    alpha(t) = exp(-1/2 int_0^t beta), sigma(t) = 1 - exp(-int_0^t beta) (eq. 29), so its
    variance stays below the VP one; prior N(0, I); `discretize` is plain Euler-Maruyama.
    """

    def sde_coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """f(t) = -1/2 beta(t), g(t) = sqrt(beta(t) (1 - exp(-2 int_0^t beta))) (eq. 12)."""
        beta = self.beta(t)
        discount = -torch.expm1(-2.0 * self.integrated_beta(t))
        return -0.5 * beta, _sqrt_clamped(beta * discount)

    def marginal_coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha = exp(-1/2 int beta), sigma = 1 - exp(-int beta) (eq. 29)."""
        b = self.integrated_beta(t)
        return torch.exp(-0.5 * b), (-torch.expm1(-b)).clamp_min(0)


class VESDE(SDE):
    """Variance exploding: dx = sigma(t) sqrt(2 log(sigma_max / sigma_min)) dW (Song et al., eq. 9).

    `noise_scale(t)` = sigma_min (sigma_max / sigma_min)^t is SMLD's geometric noise level, and
    d[noise_scale^2]/dt = g^2. The exact kernel of this SDE started at x0 at t = 0 is
    N(x0, (noise_scale(t)^2 - sigma_min^2) I) (eq. 29 with sigma(0) = sigma_min), and that is
    what `marginal_coefficients` returns: alpha = 1, sigma = sqrt(noise_scale^2 - sigma_min^2),
    so sigma(0) = 0. The Score SDE reference code returns noise_scale(t) itself as the std
    (it drops the - sigma_min^2, which differs by under sigma_min^2 / (2 noise_scale) and is
    not the SDE's own marginal). Prior N(0, sigma_max^2 I), as in the reference; the exact
    p_T has variance sigma_max^2 - sigma_min^2. `discretize` is the SMLD/NCSN chain.
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, N: int = 1000):
        super().__init__(N)
        sigma_min = _check_number(sigma_min, "sigma_min", "VESDE")
        sigma_max = _check_number(sigma_max, "sigma_max", "VESDE")
        if sigma_min <= 0:
            raise ValueError(f"VESDE: sigma_min must be > 0, got {sigma_min}")
        if sigma_max <= sigma_min:
            raise ValueError(
                f"VESDE: sigma_max must be > sigma_min, got sigma_min={sigma_min}, "
                f"sigma_max={sigma_max}; swap them if they are reversed"
            )
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.prior_std = sigma_max
        self._log_ratio = math.log(sigma_max / sigma_min)
        self.discrete_sigmas = torch.exp(
            torch.linspace(math.log(sigma_min), math.log(sigma_max), N, dtype=torch.float64)
        )

    def __repr__(self) -> str:
        return f"VESDE(sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, N={self.N})"

    def noise_scale(self, t: torch.Tensor) -> torch.Tensor:
        """SMLD's sigma(t) = sigma_min (sigma_max / sigma_min)^t (the reference's marginal std)."""
        _check_time(t, "VESDE.noise_scale")
        return self.sigma_min * torch.exp(t * self._log_ratio)

    def sde_coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """f(t) = 0, g(t) = sigma(t) sqrt(2 log(sigma_max / sigma_min)) (eq. 9)."""
        g = self.noise_scale(t) * math.sqrt(2.0 * self._log_ratio)
        return torch.zeros_like(t), g

    def marginal_coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha = 1, sigma = sqrt(sigma(t)^2 - sigma_min^2) = sigma_min sqrt(expm1(2 t log r))."""
        _check_time(t, "VESDE.marginal_coefficients")
        var = self.sigma_min**2 * torch.expm1(2.0 * self._log_ratio * t)
        return torch.ones_like(t), _sqrt_clamped(var)

    def discretize(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SMLD: x_{i+1} = x_i + sqrt(sigma_i^2 - sigma_{i-1}^2) z, sigma_{-1} = 0 (eq. 8).

        Returns f = 0 and G [B]; i = floor(t (N - 1) / T), sigma_i = discrete_sigmas[i].
        """
        t = _check_x_t(x, t, "VESDE.discretize")
        i = self._step_index(t)
        sigmas = self.discrete_sigmas.to(x.device)
        sigma = sigmas[i]
        previous = torch.where(i == 0, torch.zeros_like(sigma), sigmas[(i - 1).clamp_min(0)])
        G = _sqrt_clamped(sigma.pow(2) - previous.pow(2))
        return torch.zeros_like(x), G.to(x.dtype)

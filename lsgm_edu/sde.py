"""Linear SDEs dz = F(t) z dt + G(t) dW over K phase components: the one engine of the book.

K = 1 (VP, sub-VP, VE of Song et al. 2021): the state is the data, F = f(t) and G = g(t) are
per-sample scalars, and the perturbation kernel is p_t(x | x0) = N(alpha(t) x0, sigma(t)^2 I).
K = 2 (phase space: CLD, PSLD): the state z = (x, m) stacks data and momentum along dim 1
(channels for images, features for vectors), F and G are K x K blocks acting on the phase
components, and every marginal is Gaussian with a K x K covariance per data coordinate.

One primitive serves every consumer: the transition z_t | z_s = N(A(s, t) z_s, Sigma(s, t)),
`transition(s, t) -> (A, Sigma)`, as [B] scalars (K = 1) or [B, K, K] blocks (float64). From
it come the Gaussian kernel of z_t given data x0 (`kernel(x0, t)`: mean and Cholesky factor L,
`sample(eps) = mean + L eps`, `score(eps) = -L^{-T} eps`), the losses, the epsilon-wrapper,
the Gaussian-mixture oracle and the samplers. Each SDE also owns its noise label for the
networks (`noise_label(t)`), its prior on the state (`prior_sampling`, `prior_logp`) and the
lift / project between data x and state z. Times `t` are per-sample tensors [B]; results follow
the dtype and device of the state.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable

import torch

from lsgm_edu.checks import check_float, check_int, check_tensor, check_time
from lsgm_edu.kernel import GaussianKernel, eps_to_score
from lsgm_edu.registry import SDES
from lsgm_edu.utils import (
    append_dims,
    phase_apply,
    phase_block,
    phase_outer,
    psd_sqrt,
    randn,
)

__all__ = [
    "SDE",
    "VESDE",
    "VPSDE",
    "GaussianKernel",
    "GeometricVPSDE",
    "LinearSDE",
    "ReverseSDE",
    "ScalarSDE",
    "SubVPSDE",
    "eps_to_score",
]

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _check_x_t(x, t, fn: str) -> torch.Tensor:
    """Validate x [B, ...] and t [B]; return t on x's device in the promoted float dtype."""
    check_tensor(fn, "x", x)
    check_time(fn, t, x.shape[0])
    return t.to(device=x.device, dtype=torch.promote_types(t.dtype, x.dtype))


def _sqrt_clamped(v: torch.Tensor) -> torch.Tensor:
    # Variances that are 0 in exact arithmetic (t = 0, or t slightly below 0 where torchdiffeq
    # may evaluate) can round to tiny negatives; clamp so sqrt never returns NaN.
    return v.clamp_min(0).sqrt()


class SDE(abc.ABC):
    """A linear SDE dz = F(t) z dt + G(t) dW on [0, T] over K phase components (Song et al. 2021,
    eq. 5; Dockhorn et al. 2022, eq. 5; Pandey & Mandt 2023, eq. 4).

    A subclass states `sde_coefficients(t) -> (F, G)`, `transition(s, t) -> (A, Sigma)`,
    `lift_covariance` (the K x K law of z0 given x0), `prior_sampling` / `prior_logp`; the
    drift, kernel, discretization and reverse-time SDE derive from them. K = 1 subclasses derive
    from `ScalarSDE`, which states the kernel as alpha(t), sigma(t) instead.
    """

    T: float = 1.0
    K: int = 1
    numerical_eps: float = 0.0  # added to the diagonal of every kernel covariance
    factorization: str = "lower"  # the kernel's scale: lower Cholesky L, or upper U (U U^T = cov)
    supports_splitting: bool = False  # SSCS: hamiltonian_reversed() and dissipation_drift()
    scalar_marginals: bool = False  # kernel N(alpha_t x0, sigma_t^2 I): marginal_coefficients()
    variance_preserving: bool = False  # alpha^2 + sigma^2 = 1: LSGM's importance samplers of t

    def __init__(self, N: int = 1000):
        self.N = check_int(type(self).__name__, "N", N, 1)  # discretization steps

    # --- what a subclass states -------------------------------------------------------------

    @abc.abstractmethod
    def sde_coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Drift coefficient F(t) and diffusion G(t): [B] scalars or [B, K, K] blocks."""

    @abc.abstractmethod
    def transition(self, s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A(s, t), Sigma(s, t) of z_t | z_s = N(A z_s, Sigma): [B] or [B, K, K]."""

    @property
    @abc.abstractmethod
    def lift_covariance(self) -> torch.Tensor:
        """Covariance [K, K] (float64) of z0 = (x0, m0) given x0: zero for K = 1."""

    @abc.abstractmethod
    def prior_sampling(self, shape, generator=None, device=None, dtype=None) -> torch.Tensor:
        """A draw z_T of the prior on the state, of `shape` [B, K * C, ...]."""

    @abc.abstractmethod
    def prior_logp(self, z: torch.Tensor) -> torch.Tensor:
        """log prior(z) in nats [B], summed over all non-batch dims."""

    # --- derived ----------------------------------------------------------------------------

    def noise_label(self, t: torch.Tensor) -> torch.Tensor:
        """c(t) that a network sees instead of t: 999 t, the DDPM++ convention."""
        return 999.0 * t

    def sde(self, z: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward drift F(t) z (like z) and diffusion G(t), [B] or [B, K, K] (eq. 5)."""
        t = _check_x_t(z, t, f"{type(self).__name__}.sde")
        F, G = self.sde_coefficients(t)
        return phase_apply(F, z), G.to(z.dtype)

    def marginal_scale(self, t: torch.Tensor) -> torch.Tensor:
        """L(t): Cholesky factor [B, K, K] (float64) of Cov(z_t | x0) = A C A^T + Sigma(0, t)."""
        return self._kernel_moments(t)[1]

    def _kernel_moments(self, t: torch.Tensor, lift_covariance: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """A(0, t) and the Cholesky factor L(t) of A C A^T + Sigma(0, t) + numerical_eps I, from
        one call of `transition` (C: the lift covariance unless given)."""
        A, Sigma = self.transition(torch.zeros_like(t), t)
        A, Sigma = phase_block(A).double(), phase_block(Sigma).double()
        C = self.lift_covariance if lift_covariance is None else lift_covariance
        eye = torch.eye(A.shape[-1], dtype=torch.float64, device=A.device)
        cov = A @ C.to(A.device) @ A.mT + Sigma + self.numerical_eps * eye
        flip = self.factorization == "upper"  # U = P chol(P cov P) P, P the exchange matrix
        L, info = torch.linalg.cholesky_ex(cov.flip(-2, -1) if flip else cov)
        if bool((info > 0).any()):
            raise ValueError(
                f"{type(self).__name__}: the kernel covariance is singular at some "
                f"t (t = 0, where z_0 given x0 is degenerate?); evaluate at t >= eps > 0"
            )
        return A, (L.flip(-2, -1) if flip else L)

    def normal_covariance(self, t: torch.Tensor) -> torch.Tensor:
        """C_t [B, K, K] (float64): the covariance of z_t per coordinate when x0 ~ N(0, I), i.e.
        A (e e^T + C) A^T + L L^T with e the data axis and C the lift covariance."""
        A, L = self._kernel_moments(t)
        data_axis = A[..., :, :1]
        return data_axis @ data_axis.mT + L @ L.mT

    def normal_score(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """-C_t^{-1} z: the score at time t of the process whose data are N(0, I); the score a
        N(0, I) prior of a latent space has (LSGM's Normal part of the mixed score; -z for VP)."""
        t = _check_x_t(z, t, f"{type(self).__name__}.normal_score")
        C = self.normal_covariance(t.double())
        return -phase_apply(torch.linalg.inv(C) if C.ndim == 3 else 1 / C, z)

    @property
    def momentum_head_allowed(self) -> bool:
        """Whether a network may predict the momentum noise ε_m alone (CLD's head): K = 2, no
        noise on x (the x-score is never used) and the lower factor (s_m depends on ε_m only)."""
        return False

    def embed(self, x0: torch.Tensor) -> torch.Tensor:
        """The state (x0, 0, ..., 0): data in the first phase component, zeros elsewhere."""
        return torch.cat([x0] + [torch.zeros_like(x0)] * (self.K - 1), dim=1)

    def kernel(self, x0: torch.Tensor, t: torch.Tensor, m0: torch.Tensor | None = None
               ) -> GaussianKernel:
        """The perturbation kernel of data x0 [B, C, ...] at times t [B].

        Without m0, p_t(z | x0) = N(A(0, t) (x0, 0), L L^T) with the lift covariance C of z0
        given x0 integrated out: L L^T = A C A^T + Sigma(0, t), the hybrid kernel of HSM
        (Dockhorn et al. 2022, Sec. 3.2). With m0 (the other phase components of a sampled z0,
        [B, (K - 1) C, ...]), p_t(z | x0, m0) = N(A (x0, m0), Sigma(0, t)): the DSM kernel.
        """
        name = f"{type(self).__name__}.kernel"
        t = _check_x_t(x0, t, name)
        if m0 is None:
            A, L = self._kernel_moments(t)
            return GaussianKernel(phase_apply(A, self.embed(x0)), L)
        if self.K == 1:
            raise ValueError(f"{name}: m0 is the momentum of a phase-space SDE; {self!r} has one "
                             f"phase component (pass m0=None)")
        check_tensor(name, "m0", m0)
        wanted = (x0.shape[0], (self.K - 1) * x0.shape[1], *x0.shape[2:])
        if tuple(m0.shape) != wanted:
            raise ValueError(f"{name}: m0 must hold the other {self.K - 1} phase component(s) of "
                             f"x0 {tuple(x0.shape)}, shape {wanted}, got {tuple(m0.shape)}")
        z0 = torch.cat([x0, m0.to(x0.dtype)], dim=1)
        zero = torch.zeros(self.K, self.K, dtype=torch.float64)
        A, L = self._kernel_moments(t, zero)
        return GaussianKernel(phase_apply(A, z0), L)

    def lift(self, x0: torch.Tensor, generator=None, *, noise: torch.Tensor | None = None
             ) -> torch.Tensor:
        """A draw of z0 given data x0: (x0, m0) with m0 from the lift covariance (x0 itself when
        the lift covariance is zero, as for VP / sub-VP / VE). `noise` (state-shaped N(0, I))
        fixes the draw; otherwise it comes from `generator`."""
        if not bool(self.lift_covariance.any()):
            return self.embed(x0)
        C = self.lift_covariance.to(x0.device)
        root = psd_sqrt(C)
        z0 = self.embed(x0)
        if noise is None:
            noise = randn(z0.shape, generator, device=x0.device, dtype=x0.dtype)
        return z0 + phase_apply(root.expand(x0.shape[0], -1, -1), noise.to(x0.dtype))

    def project(self, z: torch.Tensor) -> torch.Tensor:
        """The data component x of a state z = (x, m, ...): its first 1/K of dim 1."""
        return z if self.K == 1 else z.chunk(self.K, dim=1)[0]

    def state_shape(self, data_shape) -> tuple[int, ...]:
        """The state shape [B, K * C, ...] of data of shape [B, C, ...]."""
        data_shape = tuple(data_shape)
        return (data_shape[0], self.K * data_shape[1], *data_shape[2:])

    def discretize(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """f, G of z_{i+1} = z_i + f + G z with step T/N: Euler-Maruyama, F z dt and G sqrt(dt).

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
    """dz = [F z - c G G^T score(z, t)] dt + g_rev dW-bar, run from T down to 0.

    c = 1 and g_rev = G for the reverse-time SDE (Song et al. 2021, eq. 6); c = 1/2 and
    g_rev = 0 for the probability-flow ODE (eq. 13). G G^T is g^2 for K = 1 and a K x K block
    otherwise. Drift and diffusion are written in forward time t, as in the paper: a sampler
    steps with dt < 0.
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
        """Reverse drift F z - G G^T s (F z - 1/2 G G^T s for the ODE) like z, and diffusion."""
        drift, G = self.forward.sde(x, t)
        score = self.score_fn(x, t)
        drift = drift - phase_apply(phase_outer(G) * self._weight(), score)
        return drift, torch.zeros_like(G) if self.probability_flow else G

    def discretize(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reverse-diffusion rule z_{i-1} = z_i - f_rev + G_rev z (Song et al. 2021, App. E).

        f_rev = f - G G^T s, G_rev = G (f - 1/2 G G^T s and 0 for the probability flow).
        """
        f, G = self.forward.discretize(x, t)
        score = self.score_fn(x, t)
        rev_f = f - phase_apply(phase_outer(G) * self._weight(), score)
        return rev_f, torch.zeros_like(G) if self.probability_flow else G


class ScalarSDE(SDE):
    """A linear SDE dx = f(t) x dt + g(t) dW with scalar coefficients (K = 1).

    Subclasses state `sde_coefficients(t) -> (f, g)` and `marginal_coefficients(t) ->
    (alpha, sigma)` of p_t(x | x0) = N(alpha x0, sigma^2 I), and set `prior_std` (the prior is
    N(0, prior_std^2 I)); the transition follows as A = alpha_t / alpha_s and
    Sigma = sigma_t^2 - A^2 sigma_s^2.
    """

    K = 1
    scalar_marginals = True
    prior_std: float = 1.0

    @abc.abstractmethod
    def marginal_coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha(t), sigma(t) of the kernel p_t(x | x0) = N(alpha x0, sigma^2 I), shaped like t."""

    @property
    def lift_covariance(self) -> torch.Tensor:
        return torch.zeros(1, 1, dtype=torch.float64)

    def transition(self, s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A = alpha_t / alpha_s, Sigma = sigma_t^2 - A^2 sigma_s^2, each [B] (eq. 29)."""
        (alpha_s, sigma_s), (alpha_t, sigma_t) = map(self.marginal_coefficients, (s, t))
        A = alpha_t / alpha_s
        return A, (sigma_t.pow(2) - A.pow(2) * sigma_s.pow(2)).clamp_min(0)

    def marginal_prob(self, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean alpha(t) x0 (like x0) and std sigma(t) [B] of p_t(x | x0) (Song et al., eq. 29)."""
        t = _check_x_t(x0, t, f"{type(self).__name__}.marginal_prob")
        alpha, sigma = self.marginal_coefficients(t)
        return append_dims(alpha.to(x0.dtype), x0.ndim) * x0, sigma.to(x0.dtype)

    def marginal_scale(self, t: torch.Tensor) -> torch.Tensor:
        """sigma(t) [B], the std of p_t(x | x0)."""
        return self.marginal_coefficients(t)[1]

    def normal_covariance(self, t: torch.Tensor) -> torch.Tensor:
        """alpha^2 + sigma^2 [B]: the variance of x_t when x0 ~ N(0, I) (1 for VP)."""
        alpha, sigma = self.marginal_coefficients(t)
        return alpha.pow(2) + sigma.pow(2)

    def kernel(self, x0: torch.Tensor, t: torch.Tensor, m0=None) -> GaussianKernel:
        """p_t(x | x0) = N(alpha x0, sigma^2 I) as a `GaussianKernel` with scale sigma [B]."""
        if m0 is not None:
            raise ValueError(f"{type(self).__name__}.kernel: m0 is the momentum of a phase-space "
                             f"SDE; a scalar SDE has none (pass m0=None)")
        return GaussianKernel(*self.marginal_prob(x0, t))

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
        return self.prior_std * randn(shape, generator, device=device, dtype=dtype)

    def prior_logp(self, z: torch.Tensor) -> torch.Tensor:
        """log N(z; 0, prior_std^2 I) in nats [B], summed over all non-batch dims."""
        check_tensor(f"{type(self).__name__}.prior_logp", "z", z)
        n_dims = math.prod(z.shape[1:])
        var = self.prior_std**2
        sq = z.pow(2).reshape(z.shape[0], -1).sum(-1)
        return -0.5 * n_dims * math.log(2 * math.pi * var) - 0.5 * sq / var


class _LinearBetaSDE(ScalarSDE):
    """Shared schedule of VP and sub-VP: beta(t) = beta_min + t (beta_max - beta_min)."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, N: int = 1000):
        super().__init__(N)
        cls = type(self).__name__
        beta_min = check_float(cls, "beta_min", beta_min)
        beta_max = check_float(cls, "beta_max", beta_max)
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
        check_time(f"{type(self).__name__}.beta", t)
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def integrated_beta(self, t: torch.Tensor) -> torch.Tensor:
        """int_0^t beta(s) ds = beta_min t + 1/2 (beta_max - beta_min) t^2."""
        check_time(f"{type(self).__name__}.integrated_beta", t)
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t.pow(2)


class VPSDE(_LinearBetaSDE):
    """Variance preserving: dx = -1/2 beta(t) x dt + sqrt(beta(t)) dW (Song et al. 2021, eq. 11).

    alpha(t) = exp(-1/2 int_0^t beta), sigma(t)^2 = 1 - exp(-int_0^t beta) (eq. 29); prior
    N(0, I). `discretize` is DDPM's chain with discrete_betas = linspace(beta_min / N,
    beta_max / N, N) (Ho et al. 2020; Song et al. 2021, eq. 10).
    """

    variance_preserving = True

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


class VESDE(ScalarSDE):
    """Variance exploding: dx = sigma(t) sqrt(2 log(sigma_max / sigma_min)) dW (Song et al., eq. 9).

    `noise_scale(t)` = sigma_min (sigma_max / sigma_min)^t is SMLD's geometric noise level, and
    d[noise_scale^2]/dt = g^2. The exact kernel of this SDE started at x0 at t = 0 is
    N(x0, (noise_scale(t)^2 - sigma_min^2) I) (eq. 29 with sigma(0) = sigma_min), and that is
    what `marginal_coefficients` returns: alpha = 1, sigma = sqrt(noise_scale^2 - sigma_min^2),
    so sigma(0) = 0. The Score SDE reference code returns noise_scale(t) itself as the std
    (it drops the - sigma_min^2 and is not the SDE's own marginal): the two stds differ by
    sigma_min^2 / (noise_scale + sigma), between sigma_min^2 / (2 noise_scale) and
    sigma_min^2 / noise_scale (equal to the upper bound, sigma_min, at t = 0). Prior
    N(0, sigma_max^2 I), as in the reference; the exact p_T has variance
    sigma_max^2 - sigma_min^2. `discretize` is the SMLD/NCSN chain.
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, N: int = 1000):
        super().__init__(N)
        sigma_min = check_float("VESDE", "sigma_min", sigma_min)
        sigma_max = check_float("VESDE", "sigma_max", sigma_max)
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
        check_time("VESDE.noise_scale", t)
        return self.sigma_min * torch.exp(t * self._log_ratio)

    def noise_label(self, t: torch.Tensor) -> torch.Tensor:
        """c(t) = log sigma(t) of the geometric noise scale (NCSN++'s Fourier features)."""
        return torch.log(self.noise_scale(t))

    def sde_coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """f(t) = 0, g(t) = sigma(t) sqrt(2 log(sigma_max / sigma_min)) (eq. 9)."""
        g = self.noise_scale(t) * math.sqrt(2.0 * self._log_ratio)
        return torch.zeros_like(t), g

    def marginal_coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha = 1, sigma = sqrt(sigma(t)^2 - sigma_min^2) = sigma_min sqrt(expm1(2 t log r))."""
        check_time("VESDE.marginal_coefficients", t)
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


class GeometricVPSDE(ScalarSDE):
    """LSGM's geometric VP SDE: dz = -1/2 g(t)^2 z dt + g(t) dW with a geometric variance
    (Vahdat, Kreis & Kautz 2021, App. ("geometric VPSDE")).

    With r = sigma2_max / sigma2_min the kernel variance is
    var(t) = sigma2_min r^t - sigma2_min + sigma2_0, so var(0) = sigma2_0 and var(1) ~ sigma2_max;
    the mean coefficient m_t obeys 1 - var(t) = (1 - sigma2_0) m_t^2, and
    g(t)^2 = (d var / dt) / (1 - var(t)) = sigma2_min r^t log r / (1 - var(t)).
    With sigma2_0 = sigma2_min (LSGM's NLL setting) var(t) = sigma2_min r^t is exactly geometric,
    and the likelihood weight g^2 / (2 var) = log r / (2 (1 - var)) is nearly constant where
    var is small. The state at t = 0 already carries variance sigma2_0 given the data:
    `lift_covariance` is sigma2_0 and `transition(s, t)` is the SDE's own (A = m_t / m_s,
    Sigma = 1 - A^2). Prior N(0, I); `discretize` is Euler-Maruyama.
    """

    variance_preserving = True

    def __init__(self, sigma2_min: float = 3e-5, sigma2_max: float = 0.999,
                 sigma2_0: float = 3e-5, N: int = 1000):
        super().__init__(N)
        for key, value in (("sigma2_min", sigma2_min), ("sigma2_max", sigma2_max),
                           ("sigma2_0", sigma2_0)):
            check_float("GeometricVPSDE", key, value)
        if not 0 < sigma2_min < sigma2_max < 1:
            raise ValueError(
                f"GeometricVPSDE: need 0 < sigma2_min < sigma2_max < 1, got sigma2_min="
                f"{sigma2_min}, sigma2_max={sigma2_max} (LSGM: 3e-5 and 0.999)")
        if not 0 <= sigma2_0 < 1 - sigma2_max + sigma2_min:
            raise ValueError(
                f"GeometricVPSDE: need 0 <= sigma2_0 < 1 - sigma2_max + sigma2_min so that "
                f"var(1) < 1, got sigma2_0={sigma2_0} (LSGM: sigma2_0 = sigma2_min)")
        self.sigma2_min, self.sigma2_max, self.sigma2_0 = sigma2_min, sigma2_max, sigma2_0
        self._log_ratio = math.log(sigma2_max / sigma2_min)

    def __repr__(self) -> str:
        return (f"GeometricVPSDE(sigma2_min={self.sigma2_min}, sigma2_max={self.sigma2_max}, "
                f"sigma2_0={self.sigma2_0}, N={self.N})")

    def variance(self, t: torch.Tensor) -> torch.Tensor:
        """var(t) = sigma2_min (r^t - 1) + sigma2_0 (LSGM's `var`)."""
        check_time("GeometricVPSDE.variance", t)
        return self.sigma2_min * torch.expm1(self._log_ratio * t) + self.sigma2_0

    def inverse_variance(self, var: torch.Tensor) -> torch.Tensor:
        """t with var(t) = var: log((var + sigma2_min - sigma2_0) / sigma2_min) / log r."""
        return torch.log1p((var - self.sigma2_0) / self.sigma2_min) / self._log_ratio

    @property
    def lift_covariance(self) -> torch.Tensor:
        return torch.full((1, 1), self.sigma2_0, dtype=torch.float64)

    def sde_coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """f = -1/2 g^2, g^2 = sigma2_min r^t log r / (1 - var(t))."""
        var = self.variance(t)
        g2 = self.sigma2_min * torch.exp(self._log_ratio * t) * self._log_ratio / (1 - var)
        return -0.5 * g2, _sqrt_clamped(g2)

    def marginal_coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """m_t = sqrt((1 - var) / (1 - sigma2_0)), sigma = sqrt(var(t)) (kernel from the data)."""
        var = self.variance(t)
        return torch.sqrt((1 - var) / (1 - self.sigma2_0)), _sqrt_clamped(var)

    def transition(self, s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A = m_t / m_s and Sigma = 1 - A^2, the SDE's transition (var(0) = sigma2_0 is the lift)."""
        (m_s, _), (m_t, _) = map(self.marginal_coefficients, (s, t))
        A = m_t / m_s
        return A, (1 - A.pow(2)).clamp_min(0)


class LinearSDE(SDE):
    """dz = beta(t) F z dt + sqrt(beta(t)) G dW with constant K x K blocks F, G acting on the
    phase components of z, time-scaled by beta(t) = beta_min + t (beta_max - beta_min) (the
    complete recipe of Pandey & Mandt 2023 with constant D, Q; `lsgm_edu.phase_space`).

    The transition is exact: with tau = int_s^t beta, A(s, t) = exp(F tau) and Sigma(s, t) from
    Van Loan's block matrix exponential (Van Loan 1978), in float64; it solves the moment ODEs
    dmu/dt = beta F mu, dSigma/dt = beta (F Sigma + Sigma F^T + G G^T). `lift_covariance` is the
    law of z0 given x0 (default: x0 exact, the other components N(0, 1)); the prior is N(0, P)
    per coordinate with P = `prior_covariance`, by default the stationary covariance
    (F P + P F^T + G G^T = 0, F stable). `numerical_eps` is added to the diagonal of every
    kernel covariance, as the CLD and PSLD references do, so its Cholesky factor exists at t = 0.
    """

    def __init__(self, F, G, *, beta_min: float = 1.0, beta_max: float | None = None,
                 lift_covariance=None, prior_covariance=None, numerical_eps: float = 0.0,
                 N: int = 1000):
        super().__init__(N)
        cls = type(self).__name__
        F64, G64 = (torch.as_tensor(m, dtype=torch.float64) for m in (F, G))
        if F64.ndim != 2 or F64.shape[0] != F64.shape[1] or G64.shape != F64.shape:
            raise ValueError(f"{cls}: F and G must be square K x K blocks of one size, got "
                             f"{tuple(F64.shape)} and {tuple(G64.shape)}")
        self.K = F64.shape[0]
        self.beta_min = check_float(cls, "beta_min", beta_min, positive=True)
        self.beta_max = self.beta_min if beta_max is None else check_float(
            cls, "beta_max", beta_max, positive=True)
        self.numerical_eps = check_float(cls, "numerical_eps", numerical_eps, low=0.0)
        self.F, self.G = F64, G64
        eye = torch.eye(self.K, dtype=torch.float64)
        default_lift = eye.clone()
        default_lift[0, 0] = 0.0
        self._lift = self._covariance(lift_covariance, default_lift, "lift_covariance", psd=True)
        if prior_covariance is None:
            prior_covariance = self.stationary_covariance()
        self.prior_covariance = self._covariance(prior_covariance, None, "prior_covariance")
        self._prior_root = torch.linalg.cholesky(self.prior_covariance)

    def _covariance(self, C, default, name: str, psd: bool = False) -> torch.Tensor:
        C = default if C is None else torch.as_tensor(C, dtype=torch.float64)
        if C.shape != (self.K, self.K) or not torch.allclose(C, C.mT):
            raise ValueError(f"{type(self).__name__}: {name} must be a symmetric {self.K} x "
                             f"{self.K} matrix, got {C.tolist()}")
        smallest = torch.linalg.eigvalsh(C).min().item()
        if smallest < (-1e-12 if psd else 1e-12):
            raise ValueError(f"{type(self).__name__}: {name} must be positive "
                             f"{'semi-' if psd else ''}definite, got eigenvalue {smallest:.3g}")
        return C

    def stationary_covariance(self) -> torch.Tensor:
        """P with F P + P F^T + G G^T = 0 (a Lyapunov equation), for a stable F."""
        if torch.linalg.eigvals(self.F).real.max().item() >= 0:
            raise ValueError(f"{type(self).__name__}: F has an eigenvalue with real part >= 0, "
                             f"so there is no stationary law; pass prior_covariance")
        eye = torch.eye(self.K, dtype=torch.float64)
        lyapunov = torch.kron(self.F, eye) + torch.kron(eye, self.F)
        P = torch.linalg.solve(lyapunov, -(self.G @ self.G.mT).reshape(-1)).reshape(self.K, self.K)
        return 0.5 * (P + P.mT)

    def __repr__(self) -> str:
        return (f"LinearSDE(F={self.F.tolist()}, G={self.G.tolist()}, beta_min={self.beta_min}, "
                f"beta_max={self.beta_max})")

    @property
    def lift_covariance(self) -> torch.Tensor:
        return self._lift

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        """beta(t) = beta_min + t (beta_max - beta_min)."""
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def integrated_beta(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """int_s^t beta = beta_min (t - s) + (beta_max - beta_min) (t^2 - s^2) / 2."""
        return (t - s) * (self.beta_min + 0.5 * (self.beta_max - self.beta_min) * (t + s))

    def sde_coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """F(t) = beta(t) F, G(t) = sqrt(beta(t)) G, each [B, K, K] in t's dtype."""
        beta = self.beta(t)[:, None, None]
        F = beta * self.F.to(device=t.device, dtype=t.dtype)
        G = beta.sqrt() * self.G.to(device=t.device, dtype=t.dtype)
        return F, G

    def transition(self, s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A = exp(F tau), Sigma = Phi B12 from exp([[-F, G G^T], [0, F^T]] tau), tau = int_s^t beta."""
        tau = self.integrated_beta(s.double(), t.double())[:, None, None]
        F, Q = self.F.to(tau.device), (self.G @ self.G.mT).to(tau.device)
        K = self.K
        block = torch.zeros(2 * K, 2 * K, dtype=torch.float64, device=tau.device)
        block[:K, :K], block[:K, K:], block[K:, K:] = -F, Q, F.mT
        E = torch.linalg.matrix_exp(block * tau)
        A = E[:, K:, K:].mT
        Sigma = A @ E[:, :K, K:]
        return A, 0.5 * (Sigma + Sigma.mT)

    def prior_sampling(self, shape, generator=None, device=None, dtype=None) -> torch.Tensor:
        """z_T ~ N(0, P) per coordinate, `shape` = [B, K * C, ...]."""
        shape = tuple(shape)
        if len(shape) < 2 or shape[1] % self.K:
            raise ValueError(f"{type(self).__name__}.prior_sampling: shape must be a state shape "
                             f"[B, K * C, ...] with K = {self.K}, got {shape}")
        eps = randn(shape, generator, device=device, dtype=dtype)
        return phase_apply(self._prior_root.to(eps.device).expand(shape[0], -1, -1), eps)

    def prior_logp(self, z: torch.Tensor) -> torch.Tensor:
        """log N(z; 0, P per coordinate) in nats [B]."""
        check_tensor(f"{type(self).__name__}.prior_logp", "z", z)
        blocks = z.reshape(z.shape[0], self.K, -1)
        root = self._prior_root.to(device=z.device, dtype=z.dtype)
        white = torch.linalg.solve_triangular(root, blocks, upper=False)
        n_coords = blocks.shape[-1]
        log_det = 2 * torch.log(torch.diagonal(root)).sum()
        return (-0.5 * white.pow(2).sum((1, 2))
                - 0.5 * n_coords * (self.K * math.log(2 * math.pi) + log_det))


SDES.register("vp", VPSDE)
SDES.register("subvp", SubVPSDE)
SDES.register("ve", VESDE)
SDES.register("geometric_vp", GeometricVPSDE)

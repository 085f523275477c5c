"""Score-matching objectives, loss weightings λ(t) and samplers of the diffusion time t.

Every loss returns one value per sample, shape [B]; the caller reduces (mean, sum, or an
importance-weighted mean). Weightings and time samplers are objects passed in, never flags:

    t = sampler.sample(x0.shape[0], generator)                 # t ~ q(t) on [eps, T]
    per_sample = denoising_score_matching(score_fn, sde, x0, t, weighting, generator)
    loss = (sampler.weight(t) * per_sample).mean()             # estimates ∫_eps^T ℓ(t) dt

`weight(t)` is 1 / q(t), so the importance-weighted mean is an unbiased estimate of the
time integral ∫_eps^T E[ℓ(x, t)] dt whatever the sampler; with `UniformTimeSampler` it is the
constant T - eps, i.e. the plain mean rescaled to the integral.

Two objectives written in other variables close the module: EDM's denoiser loss over noise
levels σ (Karras et al. 2022) and the terms of the DDPM ELBO, a diffusion read as a
hierarchical VAE (Ho et al. 2020).
"""

from __future__ import annotations

import abc
from collections.abc import Callable

import torch

from .checks import check_callable, check_float, check_int, check_like, check_time
from .nets.precond import edm_coefficients
from .sde import SDE
from .utils import append_dims, phase_apply, phase_outer, randn_like

__all__ = [
    "DropAllTimeSampler",
    "LikelihoodImportanceSampler",
    "LikelihoodWeighting",
    "LogVarianceTimeSampler",
    "SigmaSquaredWeighting",
    "UniformTimeSampler",
    "UnitWeighting",
    "VarianceTimeSampler",
    "ddpm_elbo_terms",
    "ddpm_eps_weight",
    "ddpm_reverse_model",
    "denoising_score_matching",
    "diffusion_posterior",
    "edm_loss",
    "edm_loss_weight",
    "edm_training_sigmas",
    "explicit_score_matching",
    "implicit_score_matching",
    "sliced_score_matching",
    "time_sampler",
]

_PROJECTIONS = ("rademacher", "gaussian")


# --- input checks ------------------------------------------------------------------------


def _check_data(x, fn: str) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"{fn}: x must be a floating-point torch.Tensor [B, ...], got {type(x)}")
    if x.ndim < 2 or x.shape[0] < 1:
        raise ValueError(
            f"{fn}: x must have a batch dimension and at least one data dimension [B, ...], got "
            f"shape {tuple(x.shape)}; for 1-D data use x[:, None]"
        )


def _check_time(t, batch: int, fn: str) -> None:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise ValueError(f"{fn}: t must be a floating-point torch.Tensor [B], got {type(t)}")
    if t.shape != (batch,):
        raise ValueError(
            f"{fn}: t must have shape [B] = [{batch}] (one time per sample), got {tuple(t.shape)}"
        )


def _check_like(s, x, fn: str, what: str = "the score model") -> None:
    if not isinstance(s, torch.Tensor) or s.shape != x.shape:
        shape = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s)
        raise ValueError(
            f"{fn}: {what} must return a tensor shaped like x {tuple(x.shape)}, got {shape}"
        )


def _sum_per_sample(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(1).sum(1)


def _diffusion(sde: SDE, t: torch.Tensor) -> torch.Tensor:
    """G(t): g(t) [B] for K = 1, a [B, K, K] block otherwise."""
    return sde.sde_coefficients(t)[1]


def _std(sde: SDE, t: torch.Tensor) -> torch.Tensor:
    """The kernel scale L(t): sigma(t) [B] for K = 1, a Cholesky block otherwise."""
    return sde.marginal_scale(t)


def weighted_squared_norm(weight: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """r^T Lambda r per sample [B]: lambda |r|^2 for a scalar weight [B], and the sum over data
    coordinates of r^T Lambda r for a [B, K, K] block acting on the phase components."""
    if weight.ndim == 1:
        return weight * _sum_per_sample(r.pow(2))
    return _sum_per_sample(r * phase_apply(weight, r))


# --- score matching on data (no time) ---------------------------------------------------


def explicit_score_matching(score_model: Callable, x: torch.Tensor, true_score) -> torch.Tensor:
    """1/2 |s(x) - ∇log p(x)|^2 per sample [B] (Hyvärinen 2005, eq. 2).

    `true_score` is a tensor shaped like x or a callable x -> like x (e.g. `gmm.score`).
    """
    fn = "explicit_score_matching"
    _check_data(x, fn)
    s = score_model(x)
    _check_like(s, x, fn)
    target = true_score(x) if callable(true_score) else true_score
    _check_like(target, x, fn, "true_score")
    return 0.5 * _sum_per_sample((s - target).pow(2))


def _grad_enabled_input(x: torch.Tensor) -> torch.Tensor:
    return x if x.requires_grad else x.detach().requires_grad_(True)


def _vjp(out: torch.Tensor, x: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """∇_x out.sum(), zeros where out does not depend on x."""
    if not out.requires_grad:
        return torch.zeros_like(x)
    (g,) = torch.autograd.grad(
        out.sum(), x, create_graph=create_graph, retain_graph=True, allow_unused=True
    )
    return torch.zeros_like(x) if g is None else g


def implicit_score_matching(score_model: Callable, x: torch.Tensor) -> torch.Tensor:
    """tr(∇_x s(x)) + 1/2 |s(x)|^2 per sample [B] (Hyvärinen 2005, eq. 4).

    Equals the explicit loss minus 1/2 E|∇log p|^2 in expectation, a constant of the data. The
    trace is exact: one backward pass per data dimension (use `sliced_score_matching` in high
    dimension). Samples must not interact inside `score_model` (no batch norm). Under
    `torch.no_grad()` the value is computed and returned detached; otherwise the graph is kept
    so the loss trains the model.
    """
    fn = "implicit_score_matching"
    _check_data(x, fn)
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        xg = _grad_enabled_input(x)
        s = score_model(xg)
        _check_like(s, x, fn)
        s_flat = s.flatten(1)
        trace = torch.zeros(x.shape[0], dtype=s.dtype, device=s.device)
        for i in range(s_flat.shape[1]):
            trace = trace + _vjp(s_flat[:, i], xg, create_graph).flatten(1)[:, i]
        loss = trace + 0.5 * s_flat.pow(2).sum(1)
    return loss if create_graph else loss.detach()


def _draw_projection(x: torch.Tensor, kind: str, generator) -> torch.Tensor:
    if kind == "rademacher":
        v = torch.randint(0, 2, x.shape, generator=generator, device=x.device)
        return v.to(x.dtype) * 2 - 1
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def sliced_score_matching(
    score_model: Callable,
    x: torch.Tensor,
    n_projections: int = 1,
    variance_reduced: bool = True,
    generator: torch.Generator | None = None,
    *,
    projection: str = "rademacher",
) -> torch.Tensor:
    """Sliced score matching per sample [B] (Song, Garg, Shi & Ermon 2019, eqs. 7-8).

    v^T ∇_x s(x) v + 1/2 (v^T s(x))^2 averaged over `n_projections` directions v with
    E[v v^T] = I (`projection`: "rademacher" or "gaussian", drawn from `generator`). With
    `variance_reduced=True` (SSM-VR, eq. 8) the second term is replaced by its expectation
    1/2 |s(x)|^2. Both are unbiased for `implicit_score_matching`; each projection costs one
    backward pass instead of one per dimension.
    """
    fn = "sliced_score_matching"
    _check_data(x, fn)
    if isinstance(n_projections, bool) or not isinstance(n_projections, int) or n_projections < 1:
        raise ValueError(f"{fn}: n_projections must be an int >= 1, got {n_projections!r}")
    if projection not in _PROJECTIONS:
        raise ValueError(f"{fn}: projection must be one of {_PROJECTIONS}, got {projection!r}")
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        xg = _grad_enabled_input(x)
        s = score_model(xg)
        _check_like(s, x, fn)
        total = torch.zeros(x.shape[0], dtype=s.dtype, device=s.device)
        for _ in range(n_projections):
            v = _draw_projection(x, projection, generator)
            sv = _sum_per_sample(s * v)  # v^T s
            jv = _vjp(sv, xg, create_graph)  # ∇_x (v^T s) = J^T v
            total = total + _sum_per_sample(v * jv)  # v^T J v
            if not variance_reduced:
                total = total + 0.5 * sv.pow(2)
        loss = total / n_projections
        if variance_reduced:
            loss = loss + 0.5 * _sum_per_sample(s.pow(2))
    return loss if create_graph else loss.detach()


# --- weightings λ(t): callables (sde, t [B]) -> [B] ---------------------------------------


class UnitWeighting:
    """λ(t) = 1."""

    def __call__(self, sde, t: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(t)

    def __repr__(self) -> str:
        return "UnitWeighting()"


class SigmaSquaredWeighting:
    """λ(t) = σ_t^2, the "reweighted" loss of Song et al. 2021 (eq. 7 with λ ∝ 1/E|∇log p_0t|^2).

    With an ε-parameterized score s = -ε̂/σ_t, the DSM loss becomes 1/2 |ε̂ - ε|^2 (Ho et al.
    2020's simple loss). In phase space λ is the kernel covariance L L^T [B, K, K], and with
    s = -L^{-T} ε̂ the loss is again 1/2 |ε̂ - ε|^2.

    `components` (phase indices, e.g. (1,) for CLD's momentum head) restricts the ε-loss to
    those components: λ = L P L^T with P the diagonal mask, so the loss is 1/2 |P (ε̂ - ε)|^2
    (CLD's `reweightedv2`, λ = ℓ_t^-2 on the momentum).
    """

    def __init__(self, components: tuple[int, ...] | None = None):
        if components is not None:
            components = tuple(int(c) for c in components)
            if not components or len(set(components)) != len(components) or min(components) < 0:
                raise ValueError(f"SigmaSquaredWeighting: components must be distinct phase "
                                 f"indices >= 0, got {components}")
        self.components = components

    def __call__(self, sde, t: torch.Tensor) -> torch.Tensor:
        L = _std(sde, t)
        if self.components is None:
            return phase_outer(L)
        if L.ndim == 1 or max(self.components) >= L.shape[-1]:
            raise ValueError(f"SigmaSquaredWeighting: components {self.components} need a "
                             f"phase-space SDE with more phase components; {sde!r} has K = {sde.K}")
        mask = torch.zeros(L.shape[-1], dtype=L.dtype, device=L.device)
        mask[list(self.components)] = 1.0
        return (L * mask) @ L.mT

    def __repr__(self) -> str:
        inner = "" if self.components is None else f"components={self.components}"
        return f"SigmaSquaredWeighting({inner})"


class LikelihoodWeighting:
    """λ(t) = g(t)^2: DSM integrated over t bounds the negative log-likelihood.

    Song, Durkan, Murray & Ermon 2021 ("Maximum likelihood training of score-based diffusion
    models"), Theorem 1 / eq. 10; pair with `LikelihoodImportanceSampler` to cut its variance.
    In phase space λ is the block G G^T (Dockhorn et al. 2022, eq. 11).
    """

    def __call__(self, sde, t: torch.Tensor) -> torch.Tensor:
        return phase_outer(_diffusion(sde, t))

    def __repr__(self) -> str:
        return "LikelihoodWeighting()"


# --- denoising score matching -------------------------------------------------------------


def denoising_score_matching(
    score_fn: Callable,
    sde: SDE,
    x0: torch.Tensor,
    t: torch.Tensor,
    weighting: Callable,
    generator: torch.Generator | None = None,
    *,
    noise: torch.Tensor | None = None,
    m0: torch.Tensor | None = None,
) -> torch.Tensor:
    """1/2 |s(z_t, t) - ∇log p_0t(z_t | x0)|^2_λ per sample [B], z_t = mean + L ε, ε ~ N(0, I).

    Vincent 2011; Song et al. 2021, eq. 7: for K = 1, x_t = α_t x0 + σ_t ε and the target is
    -ε / σ_t. The kernel comes from `sde.kernel(x0, t, m0)` for any SDE of the engine, so in
    phase space the same line is hybrid score matching (HSM: m0 None, the initial momentum
    integrated out) or DSM on the state (m0 given: a draw of the other phase components,
    `sde.lift`) (Dockhorn et al. 2022, Sec. 3.2). `weighting` is a callable (sde, t) -> λ(t),
    [B] or a [B, K, K] block; `noise` fixes ε (drawn from `generator` otherwise).
    """
    kernel = _check_dsm_args(sde, x0, t, weighting, m0)
    eps = randn_like(kernel.mean, generator) if noise is None else noise
    check_like("denoising_score_matching", "noise", eps, kernel.mean)
    s = score_fn(kernel.sample(eps), t)
    check_like("denoising_score_matching", "score_fn's output", s, kernel.mean)
    return 0.5 * weighted_squared_norm(weighting(sde, t), s - kernel.score(eps))


def _check_dsm_args(sde: SDE, x0, t, weighting, m0=None):
    """Validate the DSM arguments; returns the kernel p_t(z | x0) (or p_t(z | x0, m0))."""
    fn = "denoising_score_matching"
    _check_data(x0, fn)
    _check_time(t, x0.shape[0], fn)
    check_callable(fn, "weighting", weighting, "(sde, t) -> [B], e.g. SigmaSquaredWeighting()")
    return sde.kernel(x0, t) if m0 is None else sde.kernel(x0, t, m0)


# --- samplers of t: .sample(n, generator) -> t [B], .weight(t) = 1 / q(t) ------------------


def _check_interval(eps: float, T: float, who: str) -> tuple[float, float]:
    eps, T = float(eps), float(T)
    if not (0.0 <= eps < T) or not torch.isfinite(torch.tensor(T)):
        raise ValueError(f"{who}: need 0 <= eps < T (finite), got eps={eps}, T={T}")
    return eps, T


def _sample_device_dtype(generator, device, dtype):
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    return torch.device(device), dtype or torch.get_default_dtype()


def _check_n(n, who: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{who}: n must be an int >= 1, got {n!r}")
    return n


class UniformTimeSampler:
    """t ~ U[eps, T]; weight(t) = T - eps (= 1 / q(t)).

    eps > 0 keeps t away from 0, where the DSM target z/σ_t blows up (Song et al. 2021 use
    eps = 1e-5 for training).
    """

    def __init__(self, eps: float = 1e-5, T: float = 1.0):
        self.eps, self.T = _check_interval(eps, T, "UniformTimeSampler")

    def sample(self, n: int, generator: torch.Generator | None = None, *, device=None, dtype=None):
        """n times [n] uniform on [eps, T]."""
        _check_n(n, "UniformTimeSampler.sample")
        device, dtype = _sample_device_dtype(generator, device, dtype)
        return self.icdf(torch.rand(n, generator=generator, device=device, dtype=dtype))

    def cdf(self, t: torch.Tensor) -> torch.Tensor:
        """Q(t) = (t - eps) / (T - eps)."""
        return (t - self.eps) / (self.T - self.eps)

    def icdf(self, u: torch.Tensor) -> torch.Tensor:
        """The t with Q(t) = u."""
        return self.eps + (self.T - self.eps) * u

    def density(self, t: torch.Tensor) -> torch.Tensor:
        """q(t) = 1 / (T - eps)."""
        return torch.full_like(t, 1.0 / (self.T - self.eps))

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """1 / q(t) = T - eps: E_q[weight(t) ℓ(t)] = ∫_eps^T ℓ(t) dt."""
        return torch.full_like(t, self.T - self.eps)

    def __repr__(self) -> str:
        return f"UniformTimeSampler(eps={self.eps}, T={self.T})"


class _InverseCDFTimeSampler(abc.ABC):
    """t ~ q(t) = F'(t) / Z on [eps, T] for an increasing antiderivative F, drawn exactly.

    A subclass states F (`antiderivative`) and its derivative (`rate`); the CDF is
    Q(t) = (F(t) - F(eps)) / Z with Z = F(T) - F(eps), sampling solves Q(t) = u by bisection in
    float64 (to machine precision), and weight(t) = 1 / q(t) = Z / F'(t), so that
    E_q[weight(t) h(t)] = ∫_eps^T h(t) dt for any h. The constructor checks F' against a finite
    difference of F, so a sampler whose density and draws disagree is refused.
    """

    _BISECTION_STEPS = 64  # halves [eps, T] below float64 resolution

    def __init__(self, sde: SDE, eps: float, T: float | None = None):
        name = type(self).__name__
        if sde.K != 1:
            raise ValueError(f"{name}: defined for scalar SDEs (K = 1); {sde!r} has K = {sde.K} "
                             f"phase components")
        self.sde = sde
        self.eps, self.T = _check_interval(eps, sde.T if T is None else T, name)
        self._setup()
        ends = torch.tensor([self.eps, self.T], dtype=torch.float64)
        f_lo, f_hi = self.antiderivative(ends).tolist()
        self._f_lo, self.normalizer = f_lo, f_hi - f_lo
        if not (torch.isfinite(torch.tensor([f_lo, f_hi])).all() and self.normalizer > 0):
            raise ValueError(f"{name}: {self._what} must be finite and increasing on [eps, T] = "
                             f"[{self.eps}, {self.T}], got {f_lo} .. {f_hi}; use eps > 0")
        self._check_rate()

    _what = "F"

    def _setup(self) -> None:
        """Precomputation a subclass needs before F is evaluated (none by default)."""

    @abc.abstractmethod
    def antiderivative(self, t: torch.Tensor) -> torch.Tensor:
        """F(t), increasing on [eps, T]."""

    @abc.abstractmethod
    def rate(self, t: torch.Tensor) -> torch.Tensor:
        """F'(t), proportional to the density q(t)."""

    def _check_rate(self) -> None:
        """Refuse an SDE for which F' differs from the finite difference of F."""
        t = torch.linspace(self.eps, self.T, 7, dtype=torch.float64)[1:-1]
        h = 1e-6 * (self.T - self.eps)
        dfdt = (self.antiderivative(t + h) - self.antiderivative(t - h)) / (2 * h)
        if not torch.allclose(dfdt, self.rate(t), rtol=1e-4, atol=0.0):
            raise ValueError(
                f"{type(self).__name__}: the density is not the derivative of {self._what} for "
                f"{self.sde!r} (its marginal std does not solve dσ^2/dt = 2fσ^2 + g^2)")

    def cdf(self, t: torch.Tensor) -> torch.Tensor:
        """Q(t) = ∫_eps^t q, computed in float64 and returned in t's dtype."""
        t64 = t.to(torch.float64)
        return ((self.antiderivative(t64) - self._f_lo) / self.normalizer).to(t.dtype)

    def icdf(self, u: torch.Tensor) -> torch.Tensor:
        """The t in [eps, T] with Q(t) = u, by float64 bisection; returned in u's dtype."""
        target = self._f_lo + self.normalizer * u.to(torch.float64)
        lo = torch.full_like(target, self.eps)
        hi = torch.full_like(target, self.T)
        for _ in range(self._BISECTION_STEPS):
            mid = 0.5 * (lo + hi)
            below = self.antiderivative(mid) < target
            lo = torch.where(below, mid, lo)
            hi = torch.where(below, hi, mid)
        return (0.5 * (lo + hi)).to(u.dtype)

    def sample(self, n: int, generator: torch.Generator | None = None, *, device=None, dtype=None):
        """n times [n] from q (inverse CDF of float64 uniforms)."""
        _check_n(n, f"{type(self).__name__}.sample")
        device, dtype = _sample_device_dtype(generator, device, dtype)
        u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
        return self.icdf(u).to(dtype)

    def density(self, t: torch.Tensor) -> torch.Tensor:
        """q(t) = F'(t) / Z."""
        return self.rate(t) / self.normalizer

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """1 / q(t) = Z / F'(t): E_q[weight(t) ℓ(t)] = ∫_eps^T ℓ(t) dt."""
        return self.normalizer / self.rate(t)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.sde!r}, eps={self.eps}, T={self.T})"


def _variance(sde: SDE, t: torch.Tensor) -> torch.Tensor:
    """σ_t^2 of the kernel p_t(x | x0)."""
    return _std(sde, t).pow(2)


def _variance_rate(sde: SDE, t: torch.Tensor) -> torch.Tensor:
    """dσ_t^2/dt = 2 f σ_t^2 + g^2, the variance ODE of a scalar linear SDE (Särkkä & Solin 2019)."""
    f, g = sde.sde_coefficients(t)
    return 2 * f * _variance(sde, t) + g.pow(2)


class LikelihoodImportanceSampler(_InverseCDFTimeSampler):
    """t ~ q(t) ∝ g(t)^2 / σ_t^2 on [eps, T] (the log-SNR sampler), drawn exactly.

    Song, Durkan, Murray & Ermon 2021, Sec. 5 (importance sampling for likelihood weighting);
    LSGM (Vahdat et al. 2021), App. ("variance reduction"). For every scalar linear SDE whose
    marginal variance obeys dσ^2/dt = 2 f σ^2 + g^2 (VP, sub-VP, VE, geometric VP),

        g(t)^2 / σ_t^2 = d/dt log(σ_t^2 / α_t^2),

    the derivative of minus the log-SNR. So the CDF is Q(t) = (F(t) - F(eps)) / Z with
    F = log(σ^2 / α^2) and Z = F(T) - F(eps) = ∫_eps^T g^2/σ^2 dt (`normalizer`), for any of
    them; sampling solves Q(t) = u by bisection in float64 (to machine precision; for the VP SDE
    it matches the closed form t = (-β0 + sqrt(β0^2 + 2(β1-β0) log(1 + e^F))) / (β1-β0)).

    weight(t) = 1 / q(t) = Z σ_t^2 / g(t)^2, so E_q[weight(t) ℓ(t)] = ∫_eps^T ℓ(t) dt. With
    `LikelihoodWeighting` the product weight(t) λ(t) = Z σ_t^2: the likelihood-weighted loss
    becomes Z times the σ^2-weighted (ε) loss at IS-drawn times, which has far lower variance.
    Unlike `LogVarianceTimeSampler` (LSGM's `ll_iw`) this weight stays bounded as σ_t^2 -> 1.
    """

    _what = "log(σ^2/α^2)"

    def __init__(self, sde: SDE, eps: float = 1e-5, T: float | None = None):
        super().__init__(sde, eps, T)

    def neg_log_snr(self, t: torch.Tensor) -> torch.Tensor:
        """F(t) = log(σ_t^2 / α_t^2), an antiderivative of g^2 / σ^2."""
        alpha, _ = self.sde.transition(torch.zeros_like(t), t)
        return 2.0 * (torch.log(self.sde.marginal_scale(t)) - torch.log(alpha))

    antiderivative = neg_log_snr

    def rate(self, t: torch.Tensor) -> torch.Tensor:
        """g(t)^2 / σ_t^2."""
        return _diffusion(self.sde, t).pow(2) / _variance(self.sde, t)


class LogVarianceTimeSampler(_InverseCDFTimeSampler):
    """LSGM's `ll_iw`: log σ_t^2 uniform on [log σ_eps^2, log σ_T^2], q(t) ∝ (dσ^2/dt) / σ_t^2.

    For VP-type SDEs q ∝ g^2 (1 - σ^2) / σ^2, the likelihood weight g^2/(2σ^2) up to the factor
    1 - σ^2: weight(t) g^2 / (2σ^2) = Z / (2 (1 - σ_t^2)) (Vahdat et al. 2021, App. "Variance
    reduction"), which is nearly constant for small σ^2 and explodes as σ_t^2 -> 1 (VP, t -> 1).
    """

    _what = "log σ^2"

    def antiderivative(self, t: torch.Tensor) -> torch.Tensor:
        return torch.log(_variance(self.sde, t))

    def rate(self, t: torch.Tensor) -> torch.Tensor:
        return _variance_rate(self.sde, t) / _variance(self.sde, t)


class VarianceTimeSampler(_InverseCDFTimeSampler):
    """LSGM's `drop_sigma2t_iw`: σ_t^2 uniform on [σ_eps^2, σ_T^2], q(t) ∝ dσ^2/dt."""

    _what = "σ^2"

    def antiderivative(self, t: torch.Tensor) -> torch.Tensor:
        return _variance(self.sde, t)

    def rate(self, t: torch.Tensor) -> torch.Tensor:
        return _variance_rate(self.sde, t)


def _gauss_legendre(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    import numpy as np

    x, w = np.polynomial.legendre.leggauss(n)
    return torch.from_numpy(x), torch.from_numpy(w)


_GAUSS_LEGENDRE_8 = _gauss_legendre(8)


class DropAllTimeSampler(_InverseCDFTimeSampler):
    """LSGM's `drop_all_iw`: q(t) ∝ α_t^2, i.e. ∝ 1 - σ_t^2 for VP-type SDEs.

    The density of the unweighted ε-loss of LSGM's best-FID model (Vahdat et al. 2021,
    App. "Variance reduction"). F(t) = ∫_0^t α_s^2 ds by 8-point Gauss-Legendre quadrature on
    1024 panels of [0, T] (cumulative sums stored), exact to rounding for these smooth
    integrands; for the VP SDE it is the reference's erf closed form, with the normalizer
    exp(1/2 β0 β_frac) that the reference misses (+0.23%).
    """

    _what = "∫ α^2 dt"
    _PANELS = 1024

    def _setup(self) -> None:
        self._edges = torch.linspace(0.0, self.T, self._PANELS + 1, dtype=torch.float64)
        panels = self._panel_integral(self._edges[:-1], self._edges[1:])
        self._cumulative = torch.cat([panels.new_zeros(1), panels.cumsum(0)])

    def _alpha2(self, t: torch.Tensor) -> torch.Tensor:
        alpha, _ = self.sde.transition(torch.zeros_like(t), t)
        return alpha.pow(2)

    def _panel_integral(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        x, w = (v.to(a.device) for v in _GAUSS_LEGENDRE_8)
        s = 0.5 * (a + b)[:, None] + 0.5 * (b - a)[:, None] * x
        return 0.5 * (b - a) * (self._alpha2(s.reshape(-1)).reshape(s.shape) * w).sum(-1)

    def antiderivative(self, t: torch.Tensor) -> torch.Tensor:
        t64 = t.to(torch.float64)
        edges, cumulative = self._edges.to(t64.device), self._cumulative.to(t64.device)
        k = (torch.searchsorted(edges, t64, right=True) - 1).clamp(0, self._PANELS - 1)
        return (cumulative[k] + self._panel_integral(edges[k], t64)).to(t.dtype)

    def rate(self, t: torch.Tensor) -> torch.Tensor:
        return self._alpha2(t)

    def icdf(self, u: torch.Tensor) -> torch.Tensor:
        """The panel from the stored cumulative sums, then Newton steps inside it (F' > 0)."""
        target = self._f_lo + self.normalizer * u.to(torch.float64)
        edges, cumulative = self._edges.to(target.device), self._cumulative.to(target.device)
        k = (torch.searchsorted(cumulative, target, right=True) - 1).clamp(0, self._PANELS - 1)
        lo = torch.maximum(edges[k], torch.full_like(target, self.eps))
        hi = torch.minimum(edges[k + 1], torch.full_like(target, self.T))
        t = 0.5 * (lo + hi)
        for _ in range(self._NEWTON_STEPS):
            t = (t - (self.antiderivative(t) - target) / self.rate(t)).clamp(lo, hi)
        return t.to(u.dtype)

    _NEWTON_STEPS = 8  # from a panel of width T / 1024: far below float64 resolution


_TIME_SAMPLERS = {
    "uniform": lambda sde, eps: UniformTimeSampler(eps, sde.T),
    "ll_iw": LogVarianceTimeSampler,
    "drop_all_iw": DropAllTimeSampler,
    "drop_sigma2t_iw": VarianceTimeSampler,
    "log_snr": LikelihoodImportanceSampler,
}


def time_sampler(name: str, sde: SDE, eps: float):
    """The time sampler `name` on [eps, sde.T]: "uniform", LSGM's "ll_iw", "drop_all_iw",
    "drop_sigma2t_iw" (Vahdat et al. 2021), or "log_snr" (q ∝ g^2/σ^2, Song et al. 2021b).
    Each has `.sample(n, generator)`, `.density(t)` and `.weight(t) = 1 / q(t)`."""
    if name not in _TIME_SAMPLERS:
        raise ValueError(f"time_sampler: unknown name {name!r}; choose one of "
                         f"{', '.join(_TIME_SAMPLERS)}")
    return _TIME_SAMPLERS[name](sde, eps)


# --- EDM's denoiser loss (Karras et al. 2022) -----------------------------------------------


def _check_edm_loss_args(fn: str, y, sigma, sigma_data) -> float:
    _check_data(y, fn)
    if not isinstance(sigma, torch.Tensor) or not sigma.is_floating_point() \
            or sigma.shape != (y.shape[0],):
        got = tuple(sigma.shape) if isinstance(sigma, torch.Tensor) else type(sigma).__name__
        raise ValueError(f"{fn}: sigma must be a floating-point tensor [B] = [{y.shape[0]}] of "
                         f"noise levels, one per sample, got {got}")
    if not bool((sigma > 0).all()):
        raise ValueError(f"{fn}: sigma must hold noise levels > 0 (one per sample), got min "
                         f"{sigma.min().item():.3g}")
    return check_float(fn, "sigma_data", sigma_data, positive=True)


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """λ(σ) = 1 / c_out(σ)^2 = (σ^2 + σ_d^2) / (σ σ_d)^2 [B] (Karras et al. 2022, Table 1): with it
    the loss of `EDMPrecond` is the unit-weight loss of its raw network (eq. 8)."""
    return edm_coefficients(sigma, sigma_data)[1].pow(-2)


def edm_training_sigmas(n: int, generator: torch.Generator | None = None, *, P_mean: float = -1.2,
                        P_std: float = 1.2, device=None, dtype=None) -> torch.Tensor:
    """n noise levels with ln σ ~ N(P_mean, P_std^2) (Karras et al. 2022, Table 1, p_train)."""
    n = _check_n(n, "edm_training_sigmas")
    P_mean = check_float("edm_training_sigmas", "P_mean", P_mean)
    P_std = check_float("edm_training_sigmas", "P_std", P_std, positive=True)
    device, dtype = _sample_device_dtype(generator, device, dtype)
    z = torch.randn(n, generator=generator, device=device, dtype=dtype)
    return torch.exp(P_mean + P_std * z)


def edm_loss(
    denoiser: Callable,
    y: torch.Tensor,
    sigma: torch.Tensor,
    sigma_data: float = 0.5,
    generator: torch.Generator | None = None,
    *,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """λ(σ) |D(y + σ n; σ) - y|^2 per sample [B], n ~ N(0, I), λ = `edm_loss_weight` (Karras et
    al. 2022, eq. 2 and Table 1; no factor 1/2). `denoiser(x, sigma)` is D, e.g. an `EDMPrecond`;
    `noise` fixes n. With D = c_skip x + c_out F it is |F - (y - c_skip x) / c_out|^2 (eq. 8).
    """
    sigma_data = _check_edm_loss_args("edm_loss", y, sigma, sigma_data)
    check_callable("edm_loss", "denoiser", denoiser, "(x, sigma) -> like x, e.g. EDMPrecond(net)")
    n = randn_like(y, generator) if noise is None else noise
    check_like("edm_loss", "noise", n, y)
    x = y + append_dims(sigma.to(y.dtype), y.ndim) * n
    d = check_like("edm_loss", "the denoiser's output", denoiser(x, sigma), y)
    return edm_loss_weight(sigma.to(y.dtype), sigma_data) * _sum_per_sample((d - y).pow(2))


# --- the DDPM ELBO: a diffusion is a hierarchical VAE (Ho et al. 2020) -----------------------


def _check_ddpm_args(fn: str, sde, x0, s=None, t=None) -> None:
    if not sde.scalar_marginals:
        raise ValueError(f"{fn}: needs a scalar linear SDE (VPSDE, SubVPSDE, VESDE), got {sde!r}")
    _check_data(x0, fn)
    for name, v in (("s", s), ("t", t)):
        if v is not None:
            check_time(fn, v, x0.shape[0])
    if s is not None and t is not None and not bool((s < t).all()):
        raise ValueError(f"{fn}: need s < t for every sample (s is the earlier time)")


def _gaussian_kl(mean_q, var_q, mean_p, var_p) -> torch.Tensor:
    """KL(N(mean_q, var_q I) || N(mean_p, var_p I)) per sample [B]; var_q, var_p: [B]."""
    dim, r = mean_q[0].numel(), var_q / var_p
    return _sum_per_sample((mean_q - mean_p).pow(2)) / (2 * var_p) + 0.5 * dim * (r - 1 - r.log())


def _gaussian_nll(x, mean, var) -> torch.Tensor:
    """-log N(x; mean, var I) per sample [B]; var: [B]."""
    dim = x[0].numel()
    return _sum_per_sample((x - mean).pow(2)) / (2 * var) + 0.5 * dim * torch.log(2 * torch.pi * var)


def diffusion_posterior(sde, x0: torch.Tensor, x_t: torch.Tensor, s: torch.Tensor, t: torch.Tensor):
    """q(x_s | x_t, x0) = N(mean, var I) for s < t: mean like x0, var [B] (Ho et al. 2020, eqs. 6-7
    with ᾱ = α^2): mean = (A σ_s^2 x_t + α_s Σ x0) / σ_t^2, var = Σ σ_s^2 / σ_t^2, where
    x_t | x_s ~ N(A x_s, Σ I) (`sde.transition`) and x_s | x0 ~ N(α_s x0, σ_s^2 I)."""
    _check_ddpm_args("diffusion_posterior", sde, x0, s, t)
    A, Sigma = sde.transition(s, t)
    alpha_s, sigma_s = sde.marginal_coefficients(s)
    var_t = sde.marginal_coefficients(t)[1].pow(2)
    c_t, c_0 = (append_dims(c.to(x0.dtype), x0.ndim)
                for c in (A * sigma_s.pow(2) / var_t, alpha_s * Sigma / var_t))
    return c_t * x_t + c_0 * x0, (Sigma * sigma_s.pow(2) / var_t).to(x0.dtype)


def ddpm_reverse_model(score_fn: Callable, sde, x_t: torch.Tensor, s: torch.Tensor, t: torch.Tensor):
    """p(x_s | x_t) = N(mean, Σ I) (mean like x_t, Σ [B]): `diffusion_posterior` with x0 replaced
    by x̂0 = (x_t + σ_t^2 s(x_t, t)) / α_t (Tweedie), and the forward step's variance Σ (Ho et
    al. 2020, eq. 11 and their choice σ_t^2 = β_t)."""
    _check_ddpm_args("ddpm_reverse_model", sde, x_t, s, t)
    alpha_t, sigma_t = (append_dims(c.to(x_t.dtype), x_t.ndim) for c in sde.marginal_coefficients(t))
    score = check_like("ddpm_reverse_model", "score_fn's output", score_fn(x_t, t), x_t)
    x0_hat = (x_t + sigma_t.pow(2) * score) / alpha_t
    return diffusion_posterior(sde, x0_hat, x_t, s, t)[0], sde.transition(s, t)[1].to(x_t.dtype)


def ddpm_eps_weight(sde, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """w = Σ / (2 A^2 σ_t^2) [B]: the mean part of KL(q(x_s | x_t, x0) || p(x_s | x_t)) is
    w |ε - ε̂|^2 (Ho et al. 2020, eq. 12: β_t^2 / (2 σ_t^2 α_t (1 - ᾱ_t)) with σ_t^2 = β_t). As
    t - s -> 0, w / (t - s) -> g(t)^2 / (2 σ_t^2), the likelihood weighting (Song et al. 2021b)."""
    A, Sigma = sde.transition(s, t)
    return Sigma / (2 * A.pow(2) * sde.marginal_coefficients(t)[1].pow(2))


def ddpm_elbo_terms(
    score_fn: Callable,
    sde,
    x0: torch.Tensor,
    steps: int,
    generator: torch.Generator | None = None,
    *,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """The terms of DDPM's negative ELBO of x0, [B, steps + 1] nats (Ho et al. 2020, eq. 5).

    The latents x_1 .. x_N (N = steps) are the SDE at t_i = i T / N. Column 0 is the
    reconstruction L_0 = -log p(x0 | x_1); column i, 0 < i < N, is L_i = KL(q(x_i | x_{i+1}, x0)
    || p(x_i | x_{i+1})); column N is the prior term L_N = KL(q(x_N | x0) || N(0, prior_std^2 I)).
    p is `ddpm_reverse_model`. Each term draws its own x_{i+1} = α x0 + σ ε, so the row sum is
    an unbiased estimate of -ELBO(x0) >= -log p(x0); `noise` (like x0) fixes ε, the same at
    every step (e.g. quadrature nodes: each term is an expectation over ε on its own).
    """
    _check_ddpm_args("ddpm_elbo_terms", sde, x0)
    steps = check_int("ddpm_elbo_terms", "steps", steps, low=1)
    if noise is not None:
        check_like("ddpm_elbo_terms", "noise", noise, x0)
    times = torch.linspace(0.0, sde.T, steps + 1, dtype=torch.float64, device=x0.device)
    terms = []
    for i in range(steps):
        s, t = (torch.full((x0.shape[0],), v.item(), dtype=x0.dtype, device=x0.device)
                for v in times[i:i + 2])
        x_t = sde.kernel(x0, t).sample(randn_like(x0, generator) if noise is None else noise)
        mean_p, var_p = ddpm_reverse_model(score_fn, sde, x_t, s, t)
        if i == 0:
            terms.append(_gaussian_nll(x0, mean_p, var_p))
        else:
            terms.append(_gaussian_kl(*diffusion_posterior(sde, x0, x_t, s, t), mean_p, var_p))
    mean_T, sigma_T = sde.marginal_prob(x0, t)
    prior_var = torch.full_like(sigma_T, sde.prior_std**2)
    terms.append(_gaussian_kl(mean_T, sigma_T.pow(2), torch.zeros_like(x0), prior_var))
    return torch.stack(terms, dim=1)

"""Exact log-likelihoods along the probability-flow ODE, bits/dim, and uniform dequantization.

The probability-flow ODE dx/dt = f~(x, t) = f(x, t) - 1/2 g(t)^2 s(x, t) (Song et al. 2021,
eq. 13) is a continuous normalizing flow, so the instantaneous change of variables (Chen et al.
2018) gives

    log p_eps(x(eps)) = log p_T(x(T)) + int_eps^T div f~(x(t), t) dt     (Song et al. 2021, eq. 39)

with p_T replaced by the prior. The divergence is computed exactly by autograd (one backward pass
per dimension: small D only) or estimated with Hutchinson's trace estimator E[v^T J v] = tr J
(Song et al. 2021, App. D.2), whose probes v are drawn once and kept for the whole solve.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import data
from .checks import check_interval_eps
from .samplers import check_ode_args, odeint_bounded, solve_probability_flow
from .sde import SDE
from .utils import phase_apply, psd_sqrt, randn

__all__ = [
    "LikelihoodResult",
    "bits_per_dim",
    "data_log_likelihood",
    "decode",
    "dequantize",
    "divergence",
    "draw_probes",
    "encode",
    "hutchinson_divergence",
    "log_likelihood",
]

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_PROBES = ("rademacher", "gaussian")


@dataclass
class LikelihoodResult:
    """What `log_likelihood` returns; all per-sample tensors are [B], in nats unless stated.

    logp = prior_logp + delta_logp; z = x carried to time T (the latent code); nfe = drift
    evaluations of the solver; bpd = bits/dim of the dequantized data (or None, see
    `bits_per_dim`).
    """

    logp: torch.Tensor
    prior_logp: torch.Tensor
    delta_logp: torch.Tensor
    z: torch.Tensor
    nfe: int
    bpd: torch.Tensor | None = None


def _flat_sum(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape[0], -1).sum(-1)


def _value_and_divergence(fn, x: torch.Tensor, probes: torch.Tensor | None):
    """fn(x) and its divergence tr(d fn / dx) [B]: exact (probes None) or Hutchinson's estimate.

    Exact: one backward pass per dimension. Hutchinson: the K probes [K, B, ...] are stacked into
    one batch of K * B rows, so one forward and one backward pass give every v_k^T J v_k. Both
    need fn to act on each row alone, as a score network in eval mode does.
    """
    with torch.enable_grad():
        if probes is None:
            x = x.detach().requires_grad_(True)
            out = fn(x)
            flat = out.reshape(out.shape[0], -1)
            div = torch.zeros(out.shape[0], device=out.device, dtype=out.dtype)
            for j in range(flat.shape[1]):
                (grad,) = torch.autograd.grad(flat[:, j].sum(), x, retain_graph=True)
                div = div + grad.reshape(grad.shape[0], -1)[:, j]
            return out.detach(), div.detach()
        stacked = x.detach().repeat(probes.shape[0], *([1] * (x.ndim - 1))).requires_grad_(True)
        v = probes.reshape(stacked.shape)
        out = fn(stacked)
        (vjp,) = torch.autograd.grad((out * v).sum(), stacked)  # v^T J, row by row
        estimate = _flat_sum(vjp * v).reshape(probes.shape[0], x.shape[0]).mean(0)
        return out[: x.shape[0]].detach(), estimate.detach()


def divergence(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Exact divergence tr(dF/dx) [B] of F = fn applied row-wise to x [B, ...], by autograd."""
    return _value_and_divergence(fn, x, None)[1]


def hutchinson_divergence(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, probes: torch.Tensor
) -> torch.Tensor:
    """Hutchinson's estimate mean_k v_k^T (dF/dx) v_k [B], probes [K, B, ...] from `draw_probes`.

    Unbiased for tr(dF/dx) when E[v v^T] = I (Rademacher or standard Gaussian probes).
    """
    if not isinstance(probes, torch.Tensor) or probes.ndim < 2 or probes.shape[1:] != x.shape:
        raise ValueError(
            f"hutchinson_divergence: probes must have shape [K, *x.shape] = [K, "
            f"{', '.join(map(str, x.shape))}], got "
            f"{tuple(probes.shape) if isinstance(probes, torch.Tensor) else type(probes).__name__}"
        )
    return _value_and_divergence(fn, x, probes)[1]


def draw_probes(
    x: torch.Tensor,
    n_probes: int = 1,
    probe: str = "rademacher",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """n_probes Hutchinson probes like x, shape [n_probes, *x.shape]: Rademacher (+-1) or N(0, I)."""
    if isinstance(n_probes, bool) or not isinstance(n_probes, int) or n_probes < 1:
        raise ValueError(f"draw_probes: n_probes must be an int >= 1, got {n_probes!r}")
    kind = probe.lower() if isinstance(probe, str) else probe
    shape, kw = (n_probes, *x.shape), {"generator": generator, "device": x.device}
    if kind == "rademacher":
        return torch.randint(0, 2, shape, **kw).to(x.dtype) * 2 - 1
    if kind == "gaussian":
        return torch.randn(shape, dtype=x.dtype, **kw)
    raise ValueError(f"draw_probes: unknown probe {probe!r}; choose one of {_PROBES}")


class _LogDensityODE:
    """d/dt [x, delta_logp] = [f~(x, t), div f~(x, t)] as a torchdiffeq function; counts calls."""

    def __init__(self, rsde, probes: torch.Tensor | None):
        self.rsde, self.probes, self.nfe = rsde, probes, 0

    def __call__(self, t, state):
        self.nfe += 1
        t = t.to(state[0].dtype)

        def drift(x):
            return self.rsde.sde(x, t.expand(x.shape[0]))[0]

        return _value_and_divergence(drift, state[0], self.probes)


def _check_x(fn: str, x) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 2:
        raise ValueError(f"{fn}: x must be a floating-point tensor [B, ...] with a batch dim")


@torch.no_grad()
def log_likelihood(
    sde: SDE,
    score_fn: ScoreFn,
    x: torch.Tensor,
    exact_divergence: bool = False,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    *,
    method: str = "dopri5",
    eps: float = 1e-5,
    n_probes: int = 1,
    probe: str = "rademacher",
    generator: torch.Generator | None = None,
    steps: int | None = None,
    n_bins: int | None = None,
    data_range: tuple[float, float] = (-1.0, 1.0),
) -> LikelihoodResult:
    """log p(x) [B] in nats by the probability-flow ODE from eps to T (Song et al. 2021, eq. 39).

    Integrates [x, delta_logp] with torchdiffeq (`method`: adaptive with rtol/atol, or
    fixed-step with `steps`), then logp = sde.prior_logp(z) + delta_logp. The divergence is exact
    (exact_divergence=True: D backward passes per evaluation) or Hutchinson's estimate averaged
    over `n_probes` probes ("rademacher" or "gaussian") drawn once from `generator` (App. D.2);
    x's path does not depend on the probes, so logp is unbiased up to solver error (exp(logp) is
    not). The result is log p_eps, which tends to log p_0 as eps -> 0. Give n_bins (and
    data_range) to also get bits/dim of dequantized data (see `bits_per_dim`). The state has
    x's dtype: pass float64 x where accuracy matters.
    """
    fn = "log_likelihood"
    _check_x(fn, x)
    check_ode_args(fn, method, steps)
    eps = check_interval_eps(fn, eps, sde.T)
    probes = None if exact_divergence else draw_probes(x, n_probes, probe, generator)
    ode = _LogDensityODE(sde.reverse(score_fn, probability_flow=True), probes)
    t_dtype = torch.float32 if x.device.type == "mps" else torch.float64
    t = torch.linspace(
        eps, sde.T, 2 if steps is None else steps + 1, dtype=t_dtype, device=x.device
    )
    delta0 = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
    xs, deltas = odeint_bounded(ode, (x, delta0), t, rtol=rtol, atol=atol, method=method,
                                what="the likelihood's probability-flow ODE")
    z, delta_logp = xs[-1], deltas[-1]
    prior_logp = sde.prior_logp(z)
    logp = prior_logp + delta_logp
    bpd = None if n_bins is None else bits_per_dim(logp, x[0].numel(), n_bins, data_range)
    return LikelihoodResult(logp, prior_logp, delta_logp, z, ode.nfe, bpd)


def data_log_likelihood(
    sde: SDE,
    score_fn: ScoreFn,
    x: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    n_bins: int | None = None,
    data_range: tuple[float, float] = (-1.0, 1.0),
    momentum_at_eps: bool = False,
    eps: float = 1e-5,
    **kwargs,
) -> LikelihoodResult:
    """A lower bound on log p(x) [B] of the data x of a phase-space model (log p(x) itself for
    K = 1): log p(x) >= log p(x, m) + H(r(m)) for any law r of m (Jensen; Dockhorn et al. 2022,
    App. E.2). r is the lift N(0, C_mm), the bound the CLD and PSLD references report, or with
    momentum_at_eps the kernel's momentum marginal at t = eps given x, N(μ_m, Σ_mm): closer to
    the model's own p_eps(m | x) when eps is not small against the momentum's mixing time (a
    latent prior trained from eps = 0.01). log p(x, m) is `log_likelihood` of the state (the
    `kwargs` are its options, eps among them; `generator` draws m and the probes); H(r) =
    D / 2 log det(2 pi e Cov(r)) for D data coordinates. bpd counts the D data dimensions only.
    """
    fn = "data_log_likelihood"
    _check_x(fn, x)
    if sde.K == 1:
        return log_likelihood(sde, score_fn, x, generator=generator, n_bins=n_bins,
                              data_range=data_range, eps=eps, **kwargs)
    if momentum_at_eps:
        z0, C_mm = _momentum_from_kernel(sde, x, eps, generator)
    else:
        z0, C_mm = sde.lift(x, generator), sde.lift_covariance[1:, 1:]
    if torch.linalg.eigvalsh(C_mm).min() <= 0:
        raise ValueError(f"{fn}: the lift of {sde!r} draws no momentum (its covariance "
                         f"{C_mm.tolist()} is singular), so there is no bound to take")
    res = log_likelihood(sde, score_fn, z0, generator=generator, eps=eps, **kwargs)
    entropy = 0.5 * x[0].numel() * torch.logdet(2 * math.pi * math.e * C_mm).item()
    logp = res.logp + entropy
    bpd = None if n_bins is None else bits_per_dim(logp, x[0].numel(), n_bins, data_range)
    return LikelihoodResult(logp, res.prior_logp, res.delta_logp + entropy, res.z, res.nfe, bpd)


def _momentum_from_kernel(sde: SDE, x: torch.Tensor, eps: float, generator):
    """The state (x, m) with m from the HSM kernel's momentum marginal at eps given x, and that
    marginal's covariance Σ_mm [K - 1, K - 1] (float64)."""
    t = torch.full((x.shape[0],), float(eps), dtype=torch.float64, device=x.device)
    kernel = sde.kernel(x, t)
    cov = kernel.covariance[0, 1:, 1:]
    mean_m = kernel.mean[:, x.shape[1]:]
    noise = randn(mean_m.shape, generator, device=x.device, dtype=x.dtype)
    momentum = mean_m + phase_apply(psd_sqrt(cov).expand(x.shape[0], -1, -1), noise)
    return torch.cat([x, momentum.to(x.dtype)], dim=1), cov


@torch.no_grad()
def encode(
    sde: SDE,
    score_fn: ScoreFn,
    x: torch.Tensor,
    *,
    method: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    eps: float = 1e-5,
    steps: int | None = None,
    return_nfe: bool = False,
):
    """The latent code z = x(T) of data x = x(eps) along the probability-flow ODE (eq. 13).

    Deterministic and invertible up to solver error: `decode` with the same arguments maps z
    back. Returns z, or (z, nfe) with return_nfe=True.
    """
    _check_x("encode", x)
    eps = check_interval_eps("encode", eps, sde.T)
    z, nfe = solve_probability_flow(
        sde, score_fn, x, eps, sde.T, method=method, rtol=rtol, atol=atol, steps=steps
    )
    return (z, nfe) if return_nfe else z


@torch.no_grad()
def decode(
    sde: SDE,
    score_fn: ScoreFn,
    z: torch.Tensor,
    *,
    method: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    eps: float = 1e-5,
    steps: int | None = None,
    return_nfe: bool = False,
):
    """Data x = x(eps) of a latent code z = x(T) along the probability-flow ODE; inverse of
    `encode`. Returns x, or (x, nfe) with return_nfe=True."""
    _check_x("decode", z)
    eps = check_interval_eps("decode", eps, sde.T)
    x, nfe = solve_probability_flow(
        sde, score_fn, z, sde.T, eps, method=method, rtol=rtol, atol=atol, steps=steps
    )
    return (x, nfe) if return_nfe else x


def _check_bins(fn: str, n_bins, data_range) -> tuple[float, float]:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 2:
        raise ValueError(f"{fn}: n_bins must be an int >= 2 (256 for 8-bit data), got {n_bins!r}")
    try:
        low, high = (float(v) for v in data_range)
    except (TypeError, ValueError):
        raise ValueError(
            f"{fn}: data_range must be a pair (low, high), got {data_range!r}"
        ) from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"{fn}: data_range must be finite with low < high, got {data_range!r}")
    return low, high


def bits_per_dim(
    logp: torch.Tensor,
    n_dims: int,
    n_bins: int | None = 256,
    data_range: tuple[float, float] = (-1.0, 1.0),
) -> torch.Tensor:
    """Bits/dim of integer data from the log density `logp` [B] (nats) of its dequantized form.

    Integer data x in {0, ..., n_bins - 1}^D are dequantized as y = low + (high - low)(x + u) /
    n_bins, u ~ U[0, 1)^D (`dequantize`): bin x becomes a cube of side w = (high - low) / n_bins
    in the model's space, and for any density p, P(x) = w^D E_u[p(y)] >= exp(E_u[log p(y)] +
    D log w) (Jensen; equality when p is constant on the cube). So

        bpd = -(log p(y) + D log w) / (D log 2),

    an upper bound on -log2 P(x) / D in expectation over u (Theis et al. 2016; Ho et al. 2019).
    The offset -log2(w) is exactly 7 bits/dim for n_bins = 256 and data_range (-1, 1) (w = 1/128,
    the reference's dequantization (x + u) / 256 * 2 - 1), and 8 for data in [0, 1). For data
    scaled by x / 127.5 - 1 and dequantized as (x + u) / 127.5 - 1, w = 1/127.5: pass
    data_range=(-1, 1 + 1/127.5), i.e. subtract D log 127.5 nats. n_bins=None gives the
    continuous -logp / (D log 2) without offset. n_dims: D, e.g. 3 * 32 * 32 for CIFAR-10.
    """
    if isinstance(n_dims, bool) or not isinstance(n_dims, int) or n_dims < 1:
        raise ValueError(f"bits_per_dim: n_dims must be an int >= 1, got {n_dims!r}")
    if n_bins is None:
        return -logp / (n_dims * math.log(2))
    low, high = _check_bins("bits_per_dim", n_bins, data_range)
    log_width = math.log((high - low) / n_bins)
    return -(logp + n_dims * log_width) / (n_dims * math.log(2))


def dequantize(
    x_int: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    n_bins: int = 256,
    data_range: tuple[float, float] = (-1.0, 1.0),
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Uniform dequantization y = low + (high - low)(x + u) / n_bins, u ~ U[0, 1) from `generator`:
    `lsgm_edu.data.dequantize` (its one home) with the model range (-1, 1) as default.

    Bin x becomes the cube [low + w x, low + w (x + 1)), w = (high - low) / n_bins; use the same
    n_bins and data_range in `bits_per_dim`.
    """
    _check_bins("dequantize", n_bins, data_range)
    return data.dequantize(x_int, n_bins, generator, data_range=data_range, dtype=dtype)

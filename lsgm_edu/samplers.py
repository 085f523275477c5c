"""Samplers driven by a score: Langevin MCMC (ULA, MALA), annealed Langevin (NCSN), and the
reverse-time SDE and probability-flow ODE samplers of Song et al. 2021 (Euler-Maruyama,
predictor-corrector, torchdiffeq ODE solves).

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
from tqdm.auto import tqdm, trange

from .checks import check_float, check_int, check_interval_eps, check_shape, check_tensor
from .sde import SDE
from .utils import append_dims, phase_apply, psd_sqrt, randn, randn_like

__all__ = [
    "PREDICTORS",
    "STRIDINGS",
    "ChainRecorder",
    "annealed_langevin",
    "check_ddim_args",
    "check_heun_args",
    "check_ode_args",
    "check_pc_args",
    "check_scalar_marginals",
    "corrector_alpha",
    "ddim",
    "ddim_step",
    "ddpm_posterior_std",
    "edm_sigmas",
    "edm_time_grid",
    "euler_maruyama",
    "euler_maruyama_step",
    "heun",
    "heun_step",
    "langevin",
    "langevin_corrector_step",
    "langevin_log_proposal",
    "langevin_proposal",
    "mala",
    "marginal_coefficients_at",
    "noise_to_signal",
    "per_sample_time",
    "predict_noise_and_data",
    "predictor_corrector",
    "probability_flow",
    "reverse_diffusion_step",
    "reverse_time_grid",
    "solve_probability_flow",
    "sscs",
    "time_of_noise_to_signal",
]


def _check_args(fn: str, x0, step_size, n_steps) -> float:
    check_tensor(fn, "x0", x0)  # one row per chain
    if isinstance(step_size, torch.Tensor) and step_size.numel() != 1:
        raise ValueError(
            f"{fn}: step_size must be a positive scalar, got shape {tuple(step_size.shape)}"
        )
    if isinstance(step_size, bool) or not isinstance(step_size, (int, float, torch.Tensor)):
        raise TypeError(f"{fn}: step_size must be a positive float, got {step_size!r}")
    check_int(fn, "n_steps", n_steps, 0)
    return check_float(fn, "step_size", step_size, positive=True)


def langevin_proposal(x, score, step_size, generator=None):
    """One Langevin step y = x + eps s(x) + sqrt(2 eps) z, given `score` = s(x).

    The Euler-Maruyama step of dX = grad log p(X) dt + sqrt(2) dW (Roberts & Tweedie 1996)."""
    return x + step_size * score + math.sqrt(2.0 * step_size) * randn_like(x, generator)


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


# --- reverse-time SDE samplers, probability-flow ODE and annealed Langevin -----------------
#
# The samplers below run the reverse-time SDE (Song et al. 2021, eq. 6) or the probability-flow
# ODE (eq. 13) of a forward SDE from `lsgm_edu.sde` from T down to 0, driven by a time-dependent
# score_fn(x, t) -> like x with t a tensor [B]. Their callback receives
# {"i": step, "t": time reached (float), "x": state, "x_mean": state without the step's noise}.

_ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "adaptive_heun")
_FIXED_METHODS = ("euler", "midpoint", "rk4")


def _check_steps(fn: str, steps, name: str = "steps") -> int:
    return check_int(fn, name, steps, 1)


def _check_eps(fn: str, sde: SDE, eps) -> float:
    return check_interval_eps(fn, eps, sde.T)


STRIDINGS = ("uniform", "quadratic")


def check_striding(fn: str, striding) -> str:
    if striding not in STRIDINGS:
        raise ValueError(f"{fn}: striding must be one of {STRIDINGS}, got {striding!r}")
    return striding


def reverse_time_grid(T: float, eps: float, steps: int, striding: str = "uniform") -> list[float]:
    """The `steps` evaluation times from T down to eps, then 0: steps + 1 floats.

    "uniform": linspace(T, eps, steps), the reference's grid (Song et al. 2021). "quadratic":
    t_i = eps + (T - eps) (1 - i / (steps - 1))^2, small steps near the data (CLD and PSLD's
    quadratic striding, "QS"). Built in float64: step i evaluates the score at grid[i] and
    moves the state to grid[i + 1]; the last step goes from eps to 0 and is the denoising step
    (its noise is dropped when denoise=True), so `steps` is the number of score evaluations.
    """
    check_striding("reverse_time_grid", striding)
    if striding == "uniform":
        grid = torch.linspace(T, eps, steps, dtype=torch.float64)
    else:
        grid = eps + (T - eps) * (1 - torch.linspace(0.0, 1.0, steps, dtype=torch.float64)) ** 2
    return grid.tolist() + [0.0]


def per_sample_time(t: float, x: torch.Tensor) -> torch.Tensor:
    """The time t for every sample of x: [B] in x's dtype and device."""
    return torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)


def euler_maruyama_step(rsde, x, t, dt, generator=None):
    """x_mean = x + drift dt, x = x_mean + G sqrt(-dt) z for dt < 0 (Song et al. 2021, App. E).

    rsde: `sde.reverse(score_fn)`; t: [B]; dt: float. Returns (x, x_mean).
    """
    drift, diffusion = rsde.sde(x, t)
    x_mean = x + drift * dt
    return x_mean + phase_apply(diffusion * math.sqrt(-dt), randn_like(x, generator)), x_mean


def reverse_diffusion_step(rsde, x, t, dt=None, generator=None):
    """x_mean = x - f_rev, x = x_mean + G_rev z: the reverse of the forward chain `discretize`.

    Song et al. 2021, eq. (46) (Algorithms 2-3 predictor); the step is the SDE's own N-step
    chain, so `dt` is unused (kept for the same signature as `euler_maruyama_step`).
    """
    f, G = rsde.discretize(x, t)
    x_mean = x - f
    return x_mean + phase_apply(G, randn_like(x, generator)), x_mean


def langevin_corrector_step(score_fn, x, t, snr, alpha=1.0, generator=None, diffusion=None):
    """One Langevin corrector step with the step size set by a target signal-to-noise ratio.

    eps = 2 alpha (snr |z| / |s|)^2, x_mean = x + eps s, x = x_mean + sqrt(2 eps) z (Song et al.
    2021, Algorithms 4-5). As in the reference code, |z| and |s| are per-sample norms averaged
    over the batch, so the whole batch shares one step size; alpha: float or [B]. Returns
    (x, x_mean).

    `diffusion`: a block G [B, K, K] of a phase-space SDE makes it Langevin preconditioned by
    G G^T, x_mean = x + eps G (G^T s), noise sqrt(2 eps) G z, with the step from |G^T s|: it
    moves only the components noise enters (CLD: the momentum, whose score a momentum head
    models; the x-score it leaves out is never used) and leaves p_t invariant, as any constant
    positive semidefinite preconditioner does.
    """
    score = score_fn(x, t)
    G = None if diffusion is None else diffusion.to(x.dtype)
    if G is not None:
        score = phase_apply(G.mT, score)  # G^T s: the score in the noise's coordinates
    z = randn_like(x, generator)
    score_norm = score.reshape(score.shape[0], -1).norm(dim=-1).mean()
    noise_norm = z.reshape(z.shape[0], -1).norm(dim=-1).mean()
    # An all-zero score (every x at a stationary point) would give an infinite step: no step.
    ratio = noise_norm / score_norm
    step = torch.where(score_norm > 0, 2 * alpha * (snr * ratio) ** 2, 0.0)
    step = append_dims(torch.as_tensor(step, device=x.device, dtype=x.dtype), x.ndim)
    if G is not None:
        score, z = phase_apply(G, score), phase_apply(G, z)
    x_mean = x + step * score
    return x_mean + torch.sqrt(2 * step) * z, x_mean


def corrector_alpha(sde: SDE, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
    """alpha of the Langevin corrector at t before a step to t_next: A(t_next, t)^2 [B].

    DDPM's 1 - beta_i for VP and sub-VP, 1 for VE (Song et al. 2021, Algorithm 5); for a block
    A the squared geometric mean of its eigenvalues, |det A|^(2 / K).
    """
    A, _ = sde.transition(t_next, t)
    return A**2 if A.ndim == 1 else torch.linalg.det(A).abs() ** (2.0 / A.shape[-1])


PREDICTORS = {"euler_maruyama": euler_maruyama_step, "reverse_diffusion": reverse_diffusion_step}


def check_pc_args(fn: str, sde: SDE, steps, snr, n_corrector, predictor, eps) -> tuple[int, float]:
    """Validate predictor-corrector arguments; returns (steps, eps)."""
    steps, eps = _check_steps(fn, steps), _check_eps(fn, sde, eps)
    if predictor not in PREDICTORS:
        raise ValueError(
            f"{fn}: unknown predictor {predictor!r}; choose one of {sorted(PREDICTORS)}"
        )
    check_int(fn, "n_corrector", n_corrector, 0)
    check_float(fn, "snr", snr, positive=True)
    if predictor == "reverse_diffusion" and steps != sde.N:
        raise ValueError(
            f"{fn}: the reverse_diffusion predictor runs the SDE's own {sde.N}-step chain "
            f"(sde.discretize), so steps must equal sde.N = {sde.N}, got {steps}; build the SDE "
            f"with N={steps} or use predictor='euler_maruyama'"
        )
    return steps, eps


@torch.no_grad()
def predictor_corrector(
    sde: SDE,
    score_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    shape,
    steps: int = 1000,
    snr: float = 0.16,
    n_corrector: int = 1,
    *,
    predictor: str = "reverse_diffusion",
    eps: float = 1e-3,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], None] | None = None,
    progress: bool = False,
    device=None,
    dtype: torch.dtype | None = None,
    denoise: bool = True,
    striding: str = "uniform",
) -> torch.Tensor:
    """Predictor-corrector sampling (Song et al. 2021, Algorithms 2-3, correctors Algs. 4-5).

    x_T ~ prior; at each time of `reverse_time_grid(T, eps, steps)`, `n_corrector` Langevin
    corrector steps at that time, then one predictor step to the next time: "reverse_diffusion"
    (the SDE's discretize chain: needs steps == sde.N) or "euler_maruyama". n_corrector=0 is
    the predictor alone. The corrector's alpha is (alpha(t_i) / alpha(t_{i+1}))^2, DDPM's
    1 - beta_i for VP and sub-VP and 1 for VE (`corrector_alpha`). Returns the last predictor
    step's x_mean (denoise=True, as the reference) or its x. shape: the state shape [B, ...];
    device/dtype of the samples. `striding`: the time grid (`reverse_time_grid`).
    """
    fn = "predictor_corrector"
    shape = check_shape(fn, shape)
    steps, eps = check_pc_args(fn, sde, steps, snr, n_corrector, predictor, eps)
    if check_striding(fn, striding) != "uniform" and predictor == "reverse_diffusion":
        raise ValueError(f"{fn}: the reverse_diffusion predictor runs the SDE's own uniform "
                         f"chain; use predictor='euler_maruyama' with striding={striding!r}")
    predictor_step = PREDICTORS[predictor]
    rsde = sde.reverse(score_fn)
    x = sde.prior_sampling(shape, generator=generator, device=device, dtype=dtype)
    grid = reverse_time_grid(sde.T, eps, steps, striding)
    for i in trange(steps, disable=not progress, desc=fn):
        t, t_next = per_sample_time(grid[i], x), per_sample_time(grid[i + 1], x)
        if n_corrector:
            alpha = corrector_alpha(sde, t, t_next)
            G = None if sde.K == 1 else sde.sde_coefficients(t)[1]
            for _ in range(n_corrector):
                x, _ = langevin_corrector_step(score_fn, x, t, snr, alpha, generator, G)
        x, x_mean = predictor_step(rsde, x, t, grid[i + 1] - grid[i], generator)
        if callback is not None:
            callback({"i": i, "t": grid[i + 1], "x": x, "x_mean": x_mean})
    return x_mean if denoise else x


@torch.no_grad()
def euler_maruyama(
    sde: SDE,
    score_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    shape,
    steps: int = 1000,
    *,
    eps: float = 1e-3,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], None] | None = None,
    progress: bool = False,
    device=None,
    dtype: torch.dtype | None = None,
    denoise: bool = True,
    striding: str = "uniform",
) -> torch.Tensor:
    """Euler-Maruyama on the reverse-time SDE dx = [f - g^2 s] dt + g dW-bar (Song et al. 2021,
    eq. 6), from x_T ~ prior over `reverse_time_grid(T, eps, steps, striding)`.

    The predictor-only sampler: `predictor_corrector` with predictor="euler_maruyama" and no
    corrector. Returns the last step's x_mean when denoise=True (as the reference): steps - 1
    Euler-Maruyama steps and the denoising step from eps to 0, `steps` score evaluations (the
    NFE of CLD and PSLD).
    """
    return predictor_corrector(
        sde, score_fn, shape, steps, n_corrector=0, predictor="euler_maruyama", eps=eps,
        generator=generator, callback=callback, progress=progress, device=device, dtype=dtype,
        denoise=denoise, striding=striding,
    )  # fmt: skip


def _exact_linear_step(linear: SDE, z: torch.Tensor, t_to: float, t_from: float,
                       generator=None) -> torch.Tensor:
    """A draw of the linear SDE's transition over [t_to, t_from] (reverse time runs t_from ->
    t_to): A z + chol(Sigma + numerical_eps I) xi, in float64 for the moments."""
    s = torch.tensor([t_to], dtype=torch.float64, device=z.device)
    A, Sigma = linear.transition(s, s.new_tensor([t_from]))
    eye = torch.eye(A.shape[-1], dtype=torch.float64, device=z.device)
    root = psd_sqrt(Sigma + linear.numerical_eps * eye)  # root root^T = Sigma (+ eps I)
    B = z.shape[0]
    noise = randn_like(z, generator)
    return phase_apply(A.expand(B, -1, -1), z) + phase_apply(root.expand(B, -1, -1), noise)


def _check_splitting(fn: str, sde) -> None:
    if not sde.supports_splitting:
        raise ValueError(f"{fn}: symmetric splitting needs an SDE of the complete recipe "
                         f"(lsgm_edu.phase_space: recipe, CLD, PSLD), got {sde!r}; the VP SDE is "
                         f"recipe(0.5, 0.0, beta_min=0.1, beta_max=20.0)")


@torch.no_grad()
def sscs(
    sde,
    score_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    shape,
    steps: int,
    *,
    eps: float = 1e-3,
    striding: str = "uniform",
    denoise: bool = True,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], None] | None = None,
    progress: bool = False,
    device=None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Symmetric splitting score-based sampling (SSCS; Dockhorn et al. 2022, Sec. 3.4, Alg. 1;
    Pandey & Mandt 2023 for PSLD) from z_T ~ prior over `reverse_time_grid(T, eps, steps,
    striding)`.

    The reverse-time SDE splits into the linear SDE recipe(D, -Q) (`sde.hamiltonian_reversed`:
    the Hamiltonian part runs backwards, dissipation and noise stay), sampled exactly, and the
    drift 2 beta D (s + ∇H) (`sde.dissipation_drift`). Each step: an exact half-step, an Euler
    step of the drift with the score at the step's start time, an exact half-step (Strang
    splitting). With denoise=True the last of the `steps` score evaluations is the references'
    denoising step, the Euler-Maruyama mean from eps to 0. Returns the state; `sde.project`
    gives x.
    """
    fn = "sscs"
    shape, steps, eps = check_shape(fn, shape), _check_steps(fn, steps), _check_eps(fn, sde, eps)
    _check_splitting(fn, sde)
    grid = reverse_time_grid(sde.T, eps, steps, check_striding(fn, striding))
    linear = sde.hamiltonian_reversed()
    z = sde.prior_sampling(shape, generator=generator, device=device, dtype=dtype)
    n_split = steps - 1 if denoise else steps
    for i in trange(steps, disable=not progress, desc=fn):
        t, t_next = grid[i], grid[i + 1]
        if i < n_split:
            t_mid = 0.5 * (t + t_next)
            z = _exact_linear_step(linear, z, t_mid, t, generator)
            t_vec = per_sample_time(t, z)
            z = z + (t - t_next) * sde.dissipation_drift(z, score_fn(z, t_vec), t_vec)
            z = _exact_linear_step(linear, z, t_next, t_mid, generator)
            z_mean = z
        else:  # the denoising step: the Euler-Maruyama mean of the full reverse drift
            _, z_mean = euler_maruyama_step(sde.reverse(score_fn), z, per_sample_time(t, z),
                                            t_next - t, generator)
            z = z_mean
        if callback is not None:
            callback({"i": i, "t": t_next, "x": z, "x_mean": z_mean})
    return z


class _ProbabilityFlowODE:
    """dx/dt = f - 1/2 g^2 s as a torchdiffeq function; counts evaluations and reports steps.

    torchdiffeq's step hooks see the state at the start of each step, so step k is reported when
    step k + 1 starts, and the last one after the solve.
    """

    def __init__(self, rsde, n_rows, callback=None, bar=None):
        self.rsde, self.n_rows, self.callback, self.bar = rsde, n_rows, callback, bar
        self.nfe, self.step, self.started = 0, 0, False

    def __call__(self, t, x):
        self.nfe += 1
        return self.rsde.sde(x, t.expand(self.n_rows).to(x.dtype))[0]

    def _report(self, t, x):
        if self.callback is not None:
            self.callback({"i": self.step, "t": float(t), "x": x, "x_mean": x})
        if self.bar is not None:
            self.bar.update(1)
        self.step += 1

    def _step_started(self, t0, y0, dt):
        if self.started:  # the state at the start of a step is the previous step's result
            self._report(t0, y0)
        self.started = True

    def solve(self, x, t_start, t_end, method, rtol, atol, steps, striding="uniform"):
        # torchdiffeq calls the hook it finds: once per step on a fixed grid, once per accepted
        # step for adaptive methods (callback_step there would also see rejected attempts).
        if steps is None:
            self.callback_accept_step = self._step_started
        else:
            self.callback_step = self._step_started
        n = 2 if steps is None else steps + 1
        t_dtype = torch.float32 if x.device.type == "mps" else torch.float64
        grid = reverse_time_grid(t_start, t_end, n, striding)[:-1]  # t_start ... t_end
        t = torch.tensor(grid, dtype=t_dtype, device=x.device)
        # Adaptive solvers otherwise step past t_end and interpolate back: a model evaluated at
        # t < eps (sigma(t) -> 0, an eps-network divided by sigma) turns the solve into inf/NaN.
        options = {"step_t": t[-1:]} if steps is None else None
        out = odeint_bounded(self, x, t, rtol=rtol, atol=atol, method=method, options=options,
                             what="the probability-flow ODE")[-1]
        self._report(t_end, out)
        return out


MAX_ODE_STEPS = 10_000  # adaptive steps (accepted or rejected) before a solve gives up


def odeint_bounded(func, y0, t, *, rtol, atol, method, options=None, what="the ODE solve"):
    """torchdiffeq's `odeint`, where an adaptive solve that cannot finish (a tolerance below
    the float precision, a NaN drift) stops after MAX_ODE_STEPS steps with a RuntimeError
    that says why, instead of running for ever or failing on a bare assert."""
    from torchdiffeq import odeint  # imported here: only the ODE solvers need it

    if method in _ADAPTIVE_METHODS:
        options = {**(options or {}), "max_num_steps": MAX_ODE_STEPS}
    try:
        return odeint(func, y0, t, rtol=rtol, atol=atol, method=method, options=options)
    except AssertionError as e:
        reason = str(e)
        if "max_num_steps" in reason:
            hint = (f"took more than {MAX_ODE_STEPS} steps at rtol={rtol:g}, atol={atol:g}: "
                    f"the tolerance is too tight for {_dtype_name(y0)} (use >= 1e-6 in float32)")
        elif "underflow" in reason:
            hint = (f"step size underflowed ({reason}): the drift is NaN/inf or stiff (check "
                    f"the model's weights and the input)")
        else:
            raise
        raise RuntimeError(f"{what} ({method}) {hint}") from None


def _dtype_name(y) -> str:
    first = y[0] if isinstance(y, tuple) else y
    return str(first.dtype).replace("torch.", "")


def check_ode_args(fn: str, method, steps, striding: str = "uniform"):
    check_striding(fn, striding)
    if method in _ADAPTIVE_METHODS:
        if striding != "uniform":
            raise ValueError(f"{fn}: striding is for the fixed-step methods {_FIXED_METHODS}; "
                             f"the adaptive method {method!r} picks its own steps")
        if steps is not None:
            raise ValueError(
                f"{fn}: steps is only for the fixed-step methods {_FIXED_METHODS}; the adaptive "
                f"method {method!r} picks its own steps from rtol/atol"
            )
    elif method in _FIXED_METHODS:
        if steps is None:
            raise ValueError(f"{fn}: the fixed-step method {method!r} needs steps (an int >= 1)")
        _check_steps(fn, steps)
    else:
        raise ValueError(
            f"{fn}: unknown method {method!r}; choose an adaptive one {_ADAPTIVE_METHODS} or a "
            f"fixed-step one {_FIXED_METHODS}"
        )


def solve_probability_flow(
    sde: SDE,
    score_fn,
    x: torch.Tensor,
    t_start: float,
    t_end: float,
    *,
    method: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    steps: int | None = None,
    callback: Callable[[dict], None] | None = None,
    progress: bool = False,
    striding: str = "uniform",
) -> tuple[torch.Tensor, int]:
    """Integrate the probability-flow ODE dx/dt = f - 1/2 g^2 s (Song et al. 2021, eq. 13) from
    t_start to t_end with torchdiffeq; returns (x(t_end), number of score evaluations).

    Adaptive methods use rtol/atol; fixed-step ones take `steps` steps on the `striding` grid
    (`reverse_time_grid`). Time is float64.
    """
    check_ode_args("solve_probability_flow", method, steps, striding)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 1:
        raise ValueError("solve_probability_flow: x must be a floating-point tensor [B, ...]")
    rsde = sde.reverse(score_fn, probability_flow=True)
    with tqdm(total=steps, disable=not progress, desc="probability_flow") as bar:
        ode = _ProbabilityFlowODE(rsde, x.shape[0], callback, bar)
        out = ode.solve(x, float(t_start), float(t_end), method, rtol, atol, steps, striding)
    return out, ode.nfe


@torch.no_grad()
def probability_flow(
    sde: SDE,
    score_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    shape,
    method: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    *,
    eps: float = 1e-3,
    steps: int | None = None,
    generator: torch.Generator | None = None,
    z: torch.Tensor | None = None,
    return_nfe: bool = False,
    callback: Callable[[dict], None] | None = None,
    progress: bool = False,
    device=None,
    dtype: torch.dtype | None = None,
    denoise: bool = False,
    striding: str = "uniform",
):
    """Sample by solving the probability-flow ODE (Song et al. 2021, eq. 13) from T to eps.

    x_T ~ prior (or `z`, which then sets shape, device and dtype) is carried deterministically
    by torchdiffeq's `method`: adaptive ("dopri5", ...) with rtol/atol, or fixed-step
    ("euler", "midpoint", "rk4") with `steps` on the `striding` grid. denoise=True adds the
    reference's final reverse-diffusion mean step at eps (one more score evaluation). Returns
    x, or (x, nfe) with return_nfe=True; nfe counts score evaluations. The callback gets one
    call per solver step.
    """
    fn = "probability_flow"
    check_ode_args(fn, method, steps, striding)
    eps = _check_eps(fn, sde, eps)
    if z is None:
        z = sde.prior_sampling(
            check_shape(fn, shape), generator=generator, device=device, dtype=dtype
        )
    elif not isinstance(z, torch.Tensor) or not z.is_floating_point() or z.ndim < 1:
        raise ValueError(f"{fn}: z must be a floating-point tensor [B, ...] (a prior draw)")
    elif shape is not None and tuple(shape) != tuple(z.shape):
        raise ValueError(f"{fn}: z has shape {tuple(z.shape)} but shape={tuple(shape)}")
    x, nfe = solve_probability_flow(
        sde, score_fn, z, sde.T, eps, method=method, rtol=rtol, atol=atol, steps=steps,
        callback=callback, progress=progress, striding=striding,
    )  # fmt: skip
    if denoise:
        _, x = reverse_diffusion_step(sde.reverse(score_fn), x, per_sample_time(eps, x))
        nfe += 1
    return (x, nfe) if return_nfe else x


def _check_annealed_args(fn: str, sigmas, n_steps_each, step_lr) -> tuple[int, torch.Tensor]:
    """Validate annealed Langevin's arguments; returns (n_steps_each, sigmas as float64 [L])."""
    n_steps_each = _check_steps(fn, n_steps_each, "n_steps_each")
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
    if (
        len(sigmas) < 1
        or not bool(torch.all(sigmas > 0))
        or not bool(torch.all(sigmas[1:] < sigmas[:-1]))
    ):
        raise ValueError(
            f"{fn}: sigmas must be positive and strictly decreasing, got {sigmas.tolist()}"
        )
    if (
        isinstance(step_lr, bool)
        or not isinstance(step_lr, (int, float))
        or not 0 < step_lr < math.inf
    ):
        raise ValueError(f"{fn}: step_lr must be a finite float > 0, got {step_lr!r}")
    return n_steps_each, sigmas


@torch.no_grad()
def annealed_langevin(
    score_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    sigmas,
    shape,
    n_steps_each: int = 100,
    step_lr: float = 2e-5,
    *,
    x0: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], None] | None = None,
    progress: bool = False,
    device=None,
    dtype: torch.dtype | None = None,
    denoise: bool = True,
) -> torch.Tensor:
    """Annealed Langevin dynamics (NCSN; Song & Ermon 2019, Algorithm 1).

    For each noise level sigma_i of the decreasing `sigmas`, n_steps_each steps of
    x <- x + alpha_i / 2 s(x, sigma_i) + sqrt(alpha_i) z with alpha_i = step_lr sigma_i^2 /
    sigma_L^2 (alpha_i = 2 eps in this module's Langevin convention). score_fn(x, sigma) takes
    sigma [B]. Starts from x0, or from N(0, sigma_1^2 I) (the VE prior). The callback gets
    {"i", "sigma", "x", "x_mean"}, i counting all steps; denoise=True returns the last x_mean.
    """
    fn = "annealed_langevin"
    n_steps_each, sigmas = _check_annealed_args(fn, sigmas, n_steps_each, step_lr)
    if x0 is None:
        x = sigmas[0].item() * randn(check_shape(fn, shape), generator, device=device, dtype=dtype)
    elif not isinstance(x0, torch.Tensor) or not x0.is_floating_point() or x0.ndim < 1:
        raise ValueError(f"{fn}: x0 must be a floating-point tensor [B, ...]")
    else:
        x = x0
    x_mean = x
    with tqdm(total=len(sigmas) * n_steps_each, disable=not progress, desc=fn) as bar:
        for level, sigma in enumerate(sigmas.tolist()):
            step_size = 0.5 * step_lr * (sigma / sigmas[-1].item()) ** 2  # eps = alpha_i / 2
            s = per_sample_time(sigma, x)
            for j in range(n_steps_each):
                x_mean = x + step_size * score_fn(x, s)
                x = x_mean + math.sqrt(2 * step_size) * randn_like(x, generator)
                if callback is not None:
                    i = level * n_steps_each + j
                    callback({"i": i, "sigma": sigma, "x": x, "x_mean": x_mean})
                bar.update(1)
    return x_mean if denoise else x


# --- the modern samplers: DDIM and EDM's Heun on the probability-flow ODE -------------------
#
# Both need scalar marginals x_t = alpha_t x0 + sigma_t eps (K = 1: VP, sub-VP, VE, geometric
# VP). In the variables xbar = x / alpha and sigmabar = sigma / alpha the probability-flow ODE
# of every such SDE reads d xbar / d sigmabar = eps_hat(x, t) (Karras et al. 2022, eq. 4 with
# s(t) = alpha_t, sigma(t) = sigmabar): DDIM (eta = 0) is its Euler step, EDM adds Heun's
# correction. Their callback receives {"i", "t", "x", "x_mean", "denoised"} (denoised = x0_hat).


def check_scalar_marginals(fn: str, sde) -> None:
    """Refuse an SDE whose kernel is not N(alpha_t x0, sigma_t^2 I) with scalar alpha, sigma."""
    if not sde.scalar_marginals:
        raise ValueError(
            f"{fn}: needs an SDE with scalar marginals x_t = alpha_t x0 + sigma_t eps (K = 1: "
            f"VPSDE, SubVPSDE, VESDE, GeometricVPSDE), got {sde!r} with K = "
            f"{getattr(sde, 'K', '?')} phase components; sample phase space with `sscs` or "
            f"`probability_flow`"
        )


def check_ddim_args(fn: str, sde, steps, eta, eps, striding) -> tuple[int, float, float]:
    """Validate DDIM's arguments; returns (steps, eta, eps)."""
    check_scalar_marginals(fn, sde)
    check_striding(fn, striding)
    eta = check_float(fn, "eta", eta, low=0.0)
    if eta > 1:
        raise ValueError(f"{fn}: eta must lie in [0, 1] (0: DDIM, 1: DDPM), got {eta!r}")
    return _check_steps(fn, steps), eta, _check_eps(fn, sde, eps)


def check_heun_args(fn: str, sde, steps, rho, eps) -> tuple[int, float, float]:
    """Validate EDM Heun's arguments; returns (steps, rho, eps)."""
    check_scalar_marginals(fn, sde)
    steps = check_int(fn, "steps", steps, 2)
    return steps, check_float(fn, "rho", rho, positive=True), _check_eps(fn, sde, eps)


def _initial_state(fn: str, sde, shape, z, generator, device, dtype) -> torch.Tensor:
    """x_T: the given prior draw `z` (which then sets shape, device, dtype), else a fresh one."""
    if z is None:
        return sde.prior_sampling(
            check_shape(fn, shape), generator=generator, device=device, dtype=dtype
        )
    check_tensor(fn, "z", z)
    if shape is not None and tuple(shape) != tuple(z.shape):
        raise ValueError(f"{fn}: z has shape {tuple(z.shape)} but shape={tuple(shape)}")
    return z


def marginal_coefficients_at(sde, t: float) -> tuple[float, float]:
    """alpha_t, sigma_t of p_t(x | x0) = N(alpha_t x0, sigma_t^2 I) at one time, as float64."""
    alpha, sigma = sde.marginal_coefficients(torch.tensor([float(t)], dtype=torch.float64))
    return alpha.item(), sigma.item()


def predict_noise_and_data(sde, score_fn, x, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """eps_hat = -sigma_t s(x, t) and x0_hat = (x - sigma_t eps_hat) / alpha_t (Tweedie).

    Song, Meng & Ermon 2021, eq. (9): the noise a score predicts and the data it points to."""
    alpha, sigma = marginal_coefficients_at(sde, t)
    eps_hat = -sigma * score_fn(x, per_sample_time(t, x))
    return eps_hat, (x - sigma * eps_hat) / alpha


def ddpm_posterior_std(sde, t: float, s: float) -> float:
    """sigma_tilde = (sigma_s / sigma_t) sqrt(sigma_t^2 - (alpha_t / alpha_s)^2 sigma_s^2): the
    std of q(x_s | x_t, x0), DDIM's sigma_t(eta = 1) (Song, Meng & Ermon 2021, eq. 16)."""
    (alpha_t, sigma_t), (alpha_s, sigma_s) = (marginal_coefficients_at(sde, u) for u in (t, s))
    return sigma_s / sigma_t * math.sqrt(max(sigma_t**2 - (alpha_t / alpha_s * sigma_s) ** 2, 0))


def ddim_step(sde, score_fn, x, t: float, s: float, eta: float = 0.0, generator=None):
    """x_s = alpha_s x0_hat + sqrt(sigma_s^2 - eta^2 sigma_tilde^2) eps_hat + eta sigma_tilde z.

    Song, Meng & Ermon 2021, eq. (12), for any scalar SDE (s < t). eta = 0: the exponential
    integrator (Euler step in sigma / alpha) of the probability-flow ODE; eta = 1: DDPM's
    ancestral step. Returns (x_s, x_mean without the noise, x0_hat).
    """
    eps_hat, x0_hat = predict_noise_and_data(sde, score_fn, x, t)
    alpha_s, sigma_s = marginal_coefficients_at(sde, s)
    noise_std = eta * ddpm_posterior_std(sde, t, s)
    x_mean = alpha_s * x0_hat + math.sqrt(max(sigma_s**2 - noise_std**2, 0)) * eps_hat
    if noise_std == 0:  # no draw: eta = 0 leaves the generator untouched
        return x_mean, x_mean, x0_hat
    return x_mean + noise_std * randn_like(x, generator), x_mean, x0_hat


@torch.no_grad()
def ddim(
    sde: SDE,
    score_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    shape,
    steps: int,
    *,
    eta: float = 0.0,
    eps: float = 1e-3,
    striding: str = "uniform",
    z: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], None] | None = None,
    progress: bool = False,
    device=None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """DDIM (Song, Meng & Ermon 2021, eq. 12) from x_T ~ prior (or `z`) over
    `reverse_time_grid(T, eps, steps, striding)`, one `ddim_step` per score evaluation.

    eta = 0 is deterministic: a first-order solver of the probability-flow ODE (Song et al.
    2021, eq. 13) exact for a point mass; eta = 1 samples like DDPM. The last step, from eps
    to 0, returns x0_hat (sigma_0 = 0). `steps` score evaluations.
    """
    fn = "ddim"
    steps, eta, eps = check_ddim_args(fn, sde, steps, eta, eps, striding)
    x = _initial_state(fn, sde, shape, z, generator, device, dtype)
    grid = reverse_time_grid(sde.T, eps, steps, striding)
    for i in trange(steps, disable=not progress, desc=fn):
        x, x_mean, x0_hat = ddim_step(sde, score_fn, x, grid[i], grid[i + 1], eta, generator)
        if callback is not None:
            callback({"i": i, "t": grid[i + 1], "x": x, "x_mean": x_mean, "denoised": x0_hat})
    return x


def noise_to_signal(sde, t: torch.Tensor) -> torch.Tensor:
    """sigma_bar(t) = sigma_t / alpha_t: EDM's noise level sigma(t) of the SDE (Karras et al.
    2022, Table 1: sqrt(exp(1/2 beta_d t^2 + beta_min t) - 1) for VP, sigma_t for VE)."""
    alpha, sigma = sde.marginal_coefficients(t)
    return sigma / alpha


def time_of_noise_to_signal(sde, sigma_bar: torch.Tensor, iterations: int = 64) -> torch.Tensor:
    """The t in [0, T] with sigma_t / alpha_t = sigma_bar, by bisection in float64 (it increases
    with t for every scalar SDE of lsgm_edu.sde), elementwise."""
    target = sigma_bar.double()
    lo, hi = torch.zeros_like(target), torch.full_like(target, sde.T)
    for _ in range(iterations):  # 64 halvings: below float64's resolution of [0, T]
        mid = 0.5 * (lo + hi)
        below = noise_to_signal(sde, mid) < target
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return 0.5 * (lo + hi)


def edm_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> torch.Tensor:
    """sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,
    i = 0 .. N - 1 (Karras et al. 2022, eq. 5): float64 [N], sigma_max down to sigma_min."""
    ramp = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def edm_time_grid(sde, steps: int, eps: float = 1e-3, rho: float = 7.0) -> list[float]:
    """EDM's discretization as times: t_i with sigma_t / alpha_t = sigma_i of `edm_sigmas`
    between sigma_bar(eps) and sigma_bar(T), then t_N = 0 (sigma_N = 0): steps + 1 floats."""
    ends = noise_to_signal(sde, torch.tensor([eps, sde.T], dtype=torch.float64)).tolist()
    times = time_of_noise_to_signal(sde, edm_sigmas(*ends, steps, rho)).tolist()
    return [sde.T] + times[1:-1] + [eps, 0.0]  # the ends exactly, not to bisection precision


def heun_step(sde, score_fn, x, t: float, s: float, correct: bool = True):
    """One step of EDM's Heun sampler (Karras et al. 2022, Algorithm 1, lines 4-8) on the
    probability-flow ODE d xbar / d sigmabar = eps_hat, xbar = x / alpha, sigmabar = sigma / alpha.

    The Euler step is `ddim_step` (eta = 0); `correct` averages its slope with the slope at the
    Euler point (the trapezoidal rule), unless sigma_s = 0 (line 7: no score at zero noise).
    Returns (x_s, x0_hat at t).
    """
    (alpha_t, sigma_t), (alpha_s, sigma_s) = (marginal_coefficients_at(sde, u) for u in (t, s))
    h = sigma_s / alpha_s - sigma_t / alpha_t  # the step in sigmabar (< 0)
    eps_t, x0_hat = predict_noise_and_data(sde, score_fn, x, t)
    x_bar = x / alpha_t + h * eps_t
    if correct and sigma_s > 0:
        eps_s, _ = predict_noise_and_data(sde, score_fn, alpha_s * x_bar, s)
        x_bar = x / alpha_t + h * 0.5 * (eps_t + eps_s)
    return alpha_s * x_bar, x0_hat


@torch.no_grad()
def heun(
    sde: SDE,
    score_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    shape,
    steps: int,
    *,
    rho: float = 7.0,
    eps: float = 1e-3,
    z: torch.Tensor | None = None,
    return_nfe: bool = False,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], None] | None = None,
    progress: bool = False,
    device=None,
    dtype: torch.dtype | None = None,
):
    """EDM's deterministic sampler (Karras et al. 2022, Algorithm 1, no churn): `heun_step`s over
    `edm_time_grid(sde, steps, eps, rho)` from x_T ~ prior (or `z`); the last step, to
    sigma = 0, is Euler's.

    Second order in the step: NFE = 2 steps - 1 score evaluations (returned with
    return_nfe=True, as (x, nfe)). steps >= 2.
    """
    fn = "heun"
    steps, rho, eps = check_heun_args(fn, sde, steps, rho, eps)
    x = _initial_state(fn, sde, shape, z, generator, device, dtype)
    grid = edm_time_grid(sde, steps, eps, rho)
    for i in trange(steps, disable=not progress, desc=fn):
        x, x0_hat = heun_step(sde, score_fn, x, grid[i], grid[i + 1], correct=i < steps - 1)
        if callback is not None:
            callback({"i": i, "t": grid[i + 1], "x": x, "x_mean": x, "denoised": x0_hat})
    return (x, 2 * steps - 1) if return_nfe else x

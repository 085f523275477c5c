"""2-D toy datasets and the Gaussian mixture, the analytic oracle the book tests against.

A mixture of isotropic Gaussians has a closed-form density, score and posterior over its
components, so samplers, losses and likelihoods can be checked against the truth.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .sde import SDE
from .utils import phase_block

__all__ = [
    "TOY_DATASETS",
    "GaussianMixture",
    "checkerboard",
    "eight_gaussians",
    "eight_gaussians_mixture",
    "rings",
    "sample_toy",
    "swiss_roll",
    "two_moons",
]


def _check_n(n, fn: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{fn}: n must be an int >= 1 (number of samples), got {n!r}")
    return n


def _as_float_tensor(v) -> torch.Tensor:
    t = torch.as_tensor(v)
    if not t.is_floating_point():
        t = t.to(torch.get_default_dtype())
    return t


class GaussianMixture:
    """p(x) = sum_k w_k N(x; mu_k, sigma_k^2 I), an isotropic Gaussian mixture in D dims.

    means: [K, D]; stds: [K] or a scalar; weights: [K] non-negative (normalized here, default
    uniform). Parameters take the dtype and device of `means`; `log_prob`, `score`,
    `responsibilities` follow the dtype and device of their input `x` ([..., D]).
    """

    def __init__(self, means, stds, weights=None):
        means = _as_float_tensor(means)
        if means.ndim != 2 or means.shape[0] < 1 or means.shape[1] < 1:
            raise ValueError(
                f"GaussianMixture: means must have shape [K, D] with K, D >= 1, got "
                f"{tuple(means.shape)}; for 1-D data pass means[:, None]"
            )
        k = means.shape[0]
        stds = torch.as_tensor(stds, dtype=means.dtype, device=means.device)
        if stds.ndim == 0:
            stds = stds.expand(k).clone()
        if stds.shape != (k,):
            raise ValueError(
                f"GaussianMixture: stds must be a scalar or have shape [K] = [{k}] (one isotropic "
                f"std per component), got {tuple(stds.shape)}"
            )
        if not bool(torch.all(stds > 0)) or not bool(torch.all(torch.isfinite(stds))):
            raise ValueError(f"GaussianMixture: stds must be finite and > 0, got {stds.tolist()}")
        if weights is None:
            weights = torch.full((k,), 1.0 / k, dtype=means.dtype, device=means.device)
        weights = torch.as_tensor(weights, dtype=means.dtype, device=means.device)
        if weights.shape != (k,):
            raise ValueError(
                f"GaussianMixture: weights must have shape [K] = [{k}], got {tuple(weights.shape)}"
            )
        if not bool(torch.all(weights >= 0)) or not bool(torch.all(torch.isfinite(weights))):
            raise ValueError(
                f"GaussianMixture: weights must be finite and >= 0, got {weights.tolist()}"
            )
        if not float(weights.sum()) > 0:
            raise ValueError("GaussianMixture: weights sum to 0; give at least one positive weight")
        self.means = means
        self.stds = stds
        self.weights = weights / weights.sum()

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def n_components(self) -> int:
        return self.means.shape[0]

    def __repr__(self) -> str:
        return (
            f"GaussianMixture(n_components={self.n_components}, dim={self.dim}, "
            f"dtype={self.means.dtype}, device={self.means.device})"
        )

    def to(self, device=None, dtype=None) -> GaussianMixture:
        """A copy with parameters moved to `device` and/or cast to `dtype`."""
        return GaussianMixture(
            self.means.to(device=device, dtype=dtype),
            self.stds.to(device=device, dtype=dtype),
            self.weights.to(device=device, dtype=dtype),
        )

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n i.i.d. draws [n, D]: pick k ~ Categorical(w), then x = mu_k + sigma_k z."""
        _check_n(n, "GaussianMixture.sample")
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(
            n, self.dim, generator=generator, device=self.means.device, dtype=self.means.dtype
        )
        return self.means[k] + self.stds[k, None] * z

    def _params_like(self, x: torch.Tensor, width: int | None = None):
        width = self.dim if width is None else width
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError("GaussianMixture: x must be a floating-point torch.Tensor [..., D]")
        if x.ndim < 1 or x.shape[-1] != width:
            raise ValueError(
                f"GaussianMixture: x must have shape [..., {width}] (D = {self.dim} data dims"
                f"{'' if width == self.dim else ' times K phase components'}), got "
                f"{tuple(x.shape)}"
            )
        return (
            self.means.to(device=x.device, dtype=x.dtype),
            self.stds.to(device=x.device, dtype=x.dtype),
            self.weights.to(device=x.device, dtype=x.dtype),
        )

    def _log_joint(self, x: torch.Tensor):
        """log w_k + log N(x; mu_k, sigma_k^2 I) [..., K]; also mu_k - x [..., K, D], sigma_k^2."""
        means, stds, weights = self._params_like(x)
        diff = means - x.unsqueeze(-2)
        var = stds.pow(2)
        log_norm = -0.5 * self.dim * torch.log(2 * math.pi * var)
        return torch.log(weights) + log_norm - 0.5 * diff.pow(2).sum(-1) / var, diff, var

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) = logsumexp_k [log w_k + log N(x; mu_k, sigma_k^2 I)], shape [...]."""
        log_joint, _, _ = self._log_joint(x)
        return torch.logsumexp(log_joint, dim=-1)

    def responsibilities(self, x: torch.Tensor) -> torch.Tensor:
        """Posterior p(k | x) = w_k N_k(x) / p(x), shape [..., K]; rows sum to 1."""
        log_joint, _, _ = self._log_joint(x)
        return torch.softmax(log_joint, dim=-1)

    def component_of(self, x: torch.Tensor) -> torch.Tensor:
        """The most probable component argmax_k p(k | x), shape [...] (long)."""
        log_joint, _, _ = self._log_joint(x)
        return log_joint.argmax(dim=-1)

    def component_fractions(self, x: torch.Tensor) -> torch.Tensor:
        """Fraction of the points x [N, D] whose most probable component is k, shape [K].

        For i.i.d. samples of well-separated components this estimates the weights w_k; for
        MCMC output it shows how the chains split between the modes.
        """
        counts = torch.bincount(self.component_of(x).reshape(-1), minlength=self.n_components)
        return counts.to(x.dtype) / counts.sum()

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Exact score: grad_x log p(x) = sum_k p(k | x) (mu_k - x) / sigma_k^2, shape like x."""
        log_joint, diff, var = self._log_joint(x)
        r = torch.softmax(log_joint, dim=-1)
        return ((r / var).unsqueeze(-1) * diff).sum(-2)

    # --- the mixture diffused by a linear SDE of the engine (lsgm_edu.sde) ---------------------

    def _diffused_log_joint(self, sde: SDE, z: torch.Tensor, t: torch.Tensor):
        """log w_k + log N(z; m_k(t), S_k(t) per coordinate) [N, n_components] at times t [N].

        Component k lifted to the state is z0 ~ N((mu_k, 0, ...), sigma_k^2 e0 e0^T + C) per
        data coordinate (C = sde.lift_covariance: the initial momentum law for K = 2, zero for
        K = 1); the transition maps it to N(A (mu_k, 0), A (sigma_k^2 e0 e0^T + C) A^T + Sigma)
        with (A, Sigma) = sde.transition(0, t). Also returns S_k^{-1} (m_k - z) [N, n, K, D].
        """
        K, D = sde.K, self.dim
        means, stds, weights = self._params_like(z, K * D)
        t = self._check_times(z, t)
        A, Sigma = (phase_block(m).to(z.dtype) for m in sde.transition(torch.zeros_like(t), t))
        C = sde.lift_covariance.to(device=z.device, dtype=z.dtype)
        e0 = torch.zeros(K, K, dtype=z.dtype, device=z.device)
        e0[0, 0] = 1.0
        start = stds.pow(2)[:, None, None] * e0 + C  # [n, K, K]
        S = A[:, None] @ start @ A[:, None].mT + Sigma[:, None]  # [N, n, K, K]
        m = A[:, None, :, :1] * means[None, :, None, :]  # [N, n, K, D]
        diff = m - z.reshape(-1, 1, K, D)
        precision_diff = torch.linalg.solve(S, diff)
        quad = (diff * precision_diff).sum((-2, -1))
        log_norm = -0.5 * D * (K * math.log(2 * math.pi) + torch.logdet(S))
        return torch.log(weights) + log_norm - 0.5 * quad, precision_diff

    def _check_times(self, z: torch.Tensor, t) -> torch.Tensor:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError("GaussianMixture: t must be a floating-point torch.Tensor [B]")
        if t.shape != (z.shape[0],):
            raise ValueError(
                f"GaussianMixture: t must have shape [B] = [{z.shape[0]}] (one time per "
                f"point of x with shape {tuple(z.shape)}), got {tuple(t.shape)}"
            )
        return t.to(device=z.device, dtype=torch.promote_types(t.dtype, z.dtype))

    @staticmethod
    def _check_sde(sde, fn: str) -> None:
        if not isinstance(sde, SDE):
            raise TypeError(
                f"GaussianMixture.{fn}: sde must be a linear SDE of lsgm_edu.sde (e.g. VPSDE(), "
                f"or a phase-space LinearSDE); got {type(sde).__name__}"
            )

    def log_prob_fn(self, sde: SDE) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Exact log p_t(z) [B] of the mixture diffused by `sde`, as a function (z, t).

        Each Gaussian component stays Gaussian under a linear SDE (Song et al. 2021, eq. 29 for
        K = 1: N(alpha mu_k, (alpha^2 sigma_k^2 + sigma^2) I)); for K = 2 the joint law of
        (x, m) is a mixture with K x K block covariances. z: the state [B, K * D], t: [B].
        """
        self._check_sde(sde, "log_prob_fn")

        def log_prob_t(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            log_joint, _ = self._diffused_log_joint(sde, z.reshape(-1, z.shape[-1]), t.reshape(-1))
            return torch.logsumexp(log_joint, dim=-1).reshape(z.shape[:-1])

        return log_prob_t

    def score_fn(self, sde: SDE) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Exact score grad_z log p_t(z) (like z) of the diffused mixture, as a function (z, t).

        = sum_k p_t(k | z) S_k^{-1} (m_k - z); for K = 1, sum_k p_t(k | x) (alpha mu_k - x) /
        (alpha^2 sigma_k^2 + sigma^2). See `log_prob_fn`.
        """
        self._check_sde(sde, "score_fn")

        def score_t(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            log_joint, precision_diff = self._diffused_log_joint(
                sde, z.reshape(-1, z.shape[-1]), t.reshape(-1)
            )
            r = torch.softmax(log_joint, dim=-1)
            return (r[..., None, None] * precision_diff).sum(1).reshape(z.shape)

        return score_t

    # --- conditioning and transforming the mixture (Song et al. 2021, Sec. 5 and App. I) -----

    def _class_of_components(self, classes) -> torch.Tensor:
        """The class index of each component, long [K]; None: component k is class k."""
        if classes is None:
            return torch.arange(self.n_components, device=self.means.device)
        c = torch.as_tensor(classes, device=self.means.device)
        if c.shape != (self.n_components,) or c.is_floating_point() or c.dtype == torch.bool:
            raise ValueError(
                f"GaussianMixture: classes must be an int sequence [K] = [{self.n_components}] "
                f"giving the class of each component, got {classes!r}"
            )
        if bool(torch.any(c < 0)) or set(c.tolist()) != set(range(int(c.max()) + 1)):
            raise ValueError(
                f"GaussianMixture: classes must number the classes 0..C-1, each used at least "
                f"once, got {c.tolist()}"
            )
        return c.long()

    def sample_with_labels(
        self, n: int, generator: torch.Generator | None = None, classes=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """n draws [n, D] with their labels [n] (long): the component k of each draw, or its
        class classes[k]. Draws exactly like `sample` (the same generator calls)."""
        _check_n(n, "GaussianMixture.sample_with_labels")
        c = self._class_of_components(classes)
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(
            n, self.dim, generator=generator, device=self.means.device, dtype=self.means.dtype
        )
        return self.means[k] + self.stds[k, None] * z, c[k]

    def class_log_prob_fn(
        self, sde, classes=None
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Exact noise-conditional class posterior log p_t(y | x) [B, C] as a function (x, t).

        p_t(y | x) = sum_{k: classes[k] = y} p_t(k | x), the responsibilities of the diffused
        mixture (see `log_prob_fn`) summed over the components of class y: the classifier that
        conditional sampling needs (Song et al. 2021, eq. 14 and App. I.1). classes [K] gives
        each component's class 0..C-1 (None: one class per component).
        """
        self._check_sde(sde, "class_log_prob_fn")
        c = self._class_of_components(classes)
        n_classes = int(c.max()) + 1

        def class_log_prob_t(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            log_joint, _ = self._diffused_log_joint(sde, x.reshape(-1, x.shape[-1]), t.reshape(-1))
            log_r = torch.log_softmax(log_joint, dim=-1)
            members = c.to(x.device)
            return torch.stack(
                [torch.logsumexp(log_r[..., members == y], dim=-1) for y in range(n_classes)],
                dim=-1,
            ).reshape(*x.shape[:-1], n_classes)

        return class_log_prob_t

    def class_conditional(self, y: int, classes=None) -> GaussianMixture:
        """p(x | y): the components of class y, weights w_k / sum_{classes[j] = y} w_j."""
        c = self._class_of_components(classes)
        if isinstance(y, bool) or not isinstance(y, int) or not 0 <= y <= int(c.max()):
            raise ValueError(
                f"GaussianMixture.class_conditional: y must be a class index in "
                f"0..{int(c.max())}, got {y!r}"
            )
        keep = c == y
        return GaussianMixture(self.means[keep], self.stds[keep], self.weights[keep])

    def condition(self, mask, values) -> GaussianMixture:
        """p(x_unknown | x_known = values): a mixture over the unknown dims (mask False).

        Within an isotropic component the coordinates are independent, so component k keeps
        its unknown-dim mean and its std, and its weight becomes the posterior
        w_k N(values; mu_k,known, sigma_k^2 I) / sum_j (...) (Bayes' rule). mask: bool [D],
        True = known; values: [D] (entries at unknown dims are ignored) or [number known].
        """
        mask = torch.as_tensor(mask, device=self.means.device)
        if mask.shape != (self.dim,):
            raise ValueError(
                f"GaussianMixture.condition: mask must have shape [D] = [{self.dim}], got "
                f"{tuple(mask.shape)}"
            )
        mask = mask.bool()
        n_known = int(mask.sum())
        if not 0 < n_known < self.dim:
            raise ValueError(
                "GaussianMixture.condition: mask must mark at least one known (True) and one "
                f"unknown (False) dim, got {mask.tolist()}"
            )
        values = _as_float_tensor(values).to(device=self.means.device, dtype=self.means.dtype)
        if values.shape == (self.dim,):
            values = values[mask]
        if values.shape != (n_known,):
            raise ValueError(
                f"GaussianMixture.condition: values must have shape [D] = [{self.dim}] or "
                f"[number known] = [{n_known}], got {tuple(values.shape)}"
            )
        known = GaussianMixture(self.means[:, mask], self.stds, self.weights)
        posterior = known.responsibilities(values)
        return GaussianMixture(self.means[:, ~mask], self.stds, posterior)

    def transform(self, W) -> GaussianMixture:
        """The law of W x for an orthogonal W [D, D]: means W mu_k, same stds and weights.

        An orthogonal map sends N(mu, s^2 I) to N(W mu, s^2 W W^T) = N(W mu, s^2 I), so the
        mixture stays isotropic (the decoupling transform of Song et al. 2021, App. I.3).
        """
        W = _as_float_tensor(W).to(device=self.means.device, dtype=self.means.dtype)
        eye = torch.eye(self.dim, dtype=W.dtype, device=W.device)
        tol = 1e-4 if W.dtype in (torch.float16, torch.bfloat16, torch.float32) else 1e-10
        if W.shape != (self.dim, self.dim) or not torch.allclose(W @ W.T, eye, atol=tol):
            raise ValueError(
                f"GaussianMixture.transform: W must be an orthogonal [D, D] = [{self.dim}, "
                f"{self.dim}] matrix (W W^T = I); a general linear map does not keep the "
                f"components isotropic"
            )
        return GaussianMixture(self.means @ W.T, self.stds, self.weights)


# --- named 2-D datasets: f(n, generator=None, **params) -> [n, 2] float32 -----------------


def _device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _rand(n: int, generator, *shape) -> torch.Tensor:
    return torch.rand(n, *shape, generator=generator, device=_device(generator))


def _randn(n: int, generator, *shape) -> torch.Tensor:
    return torch.randn(n, *shape, generator=generator, device=_device(generator))


def two_moons(
    n: int, generator: torch.Generator | None = None, *, noise: float = 0.1, scale: float = 2.0
) -> torch.Tensor:
    """Two interleaving half circles (scikit-learn's make_moons), centred and scaled by `scale`.

    Each point picks a moon with probability 1/2 and a uniform angle on it; Gaussian `noise`
    is added in the unscaled units, as in make_moons.
    """
    _check_n(n, "two_moons")
    angle = math.pi * _rand(n, generator)
    upper = _rand(n, generator) < 0.5
    x = torch.where(upper, torch.cos(angle), 1.0 - torch.cos(angle))
    y = torch.where(upper, torch.sin(angle), 0.5 - torch.sin(angle))
    pts = torch.stack([x, y], dim=-1) + noise * _randn(n, generator, 2)
    return (scale * (pts - torch.tensor([0.5, 0.25], device=pts.device))).float()


def swiss_roll(
    n: int, generator: torch.Generator | None = None, *, noise: float = 0.2
) -> torch.Tensor:
    """The 2-D Swiss roll: t = 1.5 pi (1 + 2u), x = (t cos t, t sin t) / 5 + noise * z."""
    _check_n(n, "swiss_roll")
    t = 1.5 * math.pi * (1.0 + 2.0 * _rand(n, generator))
    pts = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=-1) / 5.0
    return (pts + noise * _randn(n, generator, 2)).float()


def checkerboard(
    n: int, generator: torch.Generator | None = None, *, n_cells: int = 4, half_width: float = 4.0
) -> torch.Tensor:
    """Uniform on the dark squares of an `n_cells` x `n_cells` board covering [-w, w]^2."""
    _check_n(n, "checkerboard")
    if isinstance(n_cells, bool) or not isinstance(n_cells, int) or n_cells < 2:
        raise ValueError(f"checkerboard: n_cells must be an int >= 2, got {n_cells!r}")
    dev = _device(generator)
    ij = torch.cartesian_prod(torch.arange(n_cells, device=dev), torch.arange(n_cells, device=dev))
    dark = ij[(ij.sum(-1) % 2) == 0]
    cell = dark[torch.randint(len(dark), (n,), generator=generator, device=dev)]
    width = 2.0 * half_width / n_cells
    return (-half_width + (cell + _rand(n, generator, 2)) * width).float()


# FFJORD's 8gaussians (Grathwohl et al. 2019): centres at radius 4 and std 0.5, both / 1.414.
_EIGHT_RADIUS = 2.0 * math.sqrt(2.0)
_EIGHT_STD = 0.5 / math.sqrt(2.0)


def eight_gaussians_mixture(
    radius: float = _EIGHT_RADIUS, std: float = _EIGHT_STD, *, dtype=torch.float32, device=None
) -> GaussianMixture:
    """The exact density of `eight_gaussians`: 8 equal-weight N(mu_k, std^2 I) on a circle."""
    if not radius > 0 or not std > 0:
        raise ValueError(
            f"eight_gaussians_mixture: radius and std must be > 0, got {radius}, {std}"
        )
    angle = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    means = radius * torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1)
    return GaussianMixture(means.to(device=device, dtype=dtype), std)


def eight_gaussians(
    n: int,
    generator: torch.Generator | None = None,
    *,
    radius: float = _EIGHT_RADIUS,
    std: float = _EIGHT_STD,
) -> torch.Tensor:
    """Samples of `eight_gaussians_mixture(radius, std)`."""
    _check_n(n, "eight_gaussians")
    return eight_gaussians_mixture(radius, std, device=_device(generator)).sample(n, generator)


def rings(
    n: int,
    generator: torch.Generator | None = None,
    *,
    radii: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0),
    noise: float = 0.08,
) -> torch.Tensor:
    """Concentric circles with Gaussian radial-and-tangential `noise`.

    A ring is chosen with probability proportional to its radius, so points are uniform in arc
    length over all rings.
    """
    _check_n(n, "rings")
    r = torch.as_tensor(radii, dtype=torch.float32, device=_device(generator))
    if r.ndim != 1 or len(r) < 1 or not bool(torch.all(r > 0)):
        raise ValueError(
            f"rings: radii must be a non-empty sequence of positive floats, got {radii}"
        )
    ring = torch.multinomial(r / r.sum(), n, replacement=True, generator=generator)
    angle = 2 * math.pi * _rand(n, generator)
    pts = r[ring, None] * torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1)
    return (pts + noise * _randn(n, generator, 2)).float()


TOY_DATASETS: dict[str, Callable[..., torch.Tensor]] = {
    "two_moons": two_moons,
    "swiss_roll": swiss_roll,
    "checkerboard": checkerboard,
    "eight_gaussians": eight_gaussians,
    "rings": rings,
}


def sample_toy(name: str, n: int, generator: torch.Generator | None = None, **params):
    """Draw n points [n, 2] float32 from the toy dataset called `name` (see TOY_DATASETS)."""
    if name not in TOY_DATASETS:
        raise ValueError(f"sample_toy: unknown name {name!r}; choose one of {sorted(TOY_DATASETS)}")
    return TOY_DATASETS[name](n, generator, **params)

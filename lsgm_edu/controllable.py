"""Controllable generation with an unconditional score model (Song et al. 2021, Sec. 5, App. I).

- class-conditional sampling: add the gradient of a noise-conditional classifier to the score,
  grad log p_t(x | y) = grad log p_t(x) + grad log p_t(y | x) (eq. 14, App. I.1);
- imputation (inpainting): the predictor-corrector sampler with the known coordinates replaced,
  after every step, by a fresh forward-diffused copy of their values (App. I.2);
- colorization: imputation after an orthogonal "decoupling" change of basis in which the
  grey level is one coordinate (App. I.3), written for any orthogonal map (`impute_linear`).

Every function takes a plain `score_fn(x, t)` (exact or learned) and works on toy vectors
[B, D] and on images [B, C, H, W] alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import trange

from .checks import check_float, check_tensor, check_time
from .samplers import (
    PREDICTORS,
    check_pc_args,
    corrector_alpha,
    langevin_corrector_step,
    per_sample_time,
    reverse_time_grid,
)
from .sde import SDE
from .utils import randn_like

__all__ = [
    "cfg_score",
    "colorize",
    "conditional_score_fn",
    "decoupling_matrix",
    "impute_linear",
    "inpaint",
    "noise_conditional_classifier_loss",
]

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# --- class-conditional sampling ---------------------------------------------------------


def _labels(y, x: torch.Tensor) -> torch.Tensor:
    """y as long [B] on x's device: an int is used for every sample."""
    if isinstance(y, int) and not isinstance(y, bool):
        return torch.full((x.shape[0],), y, dtype=torch.long, device=x.device)
    if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.shape != (x.shape[0],):
        raise ValueError(
            f"conditional_score_fn: y must be an int or an integer tensor [B] = [{x.shape[0]}] "
            f"of class labels, got {y!r}"
        )
    return y.to(device=x.device, dtype=torch.long)


def conditional_score_fn(
    score_fn: ScoreFn,
    classifier_log_prob_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    y,
    scale: float = 1.0,
) -> ScoreFn:
    """The score of p_t(x | y): s(x, t) + scale * grad_x log p_t(y | x) (Song et al. 2021, eq. 14).

    classifier_log_prob_fn(x, t) -> [B, C]: logits or log-probabilities of a *noise-conditional*
    classifier (normalized here by log_softmax); y: an int or labels long [B]. The gradient is
    taken by autograd, also inside the samplers' no_grad. scale = 1 is Bayes' rule; other
    values are classifier guidance (Dhariwal & Nichol 2021), the score of p_t(x) p_t(y | x)^scale.
    """
    if not callable(score_fn) or not callable(classifier_log_prob_fn):
        raise TypeError(
            "conditional_score_fn: score_fn and classifier_log_prob_fn must be callable"
        )
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"conditional_score_fn: scale must be a finite float, got {scale!r}")

    def score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = score_fn(x, t)
        if scale == 0:
            return s
        labels = _labels(y, x)
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            logits = classifier_log_prob_fn(x_in, t)
            if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
                raise ValueError(
                    f"conditional_score_fn: classifier_log_prob_fn must return [B, C] = "
                    f"[{x.shape[0]}, C], got {tuple(logits.shape)}"
                )
            log_py = torch.log_softmax(logits, dim=-1).gather(-1, labels[:, None])
            (grad,) = torch.autograd.grad(log_py.sum(), x_in)
        return s + scale * grad.to(s.dtype)

    return score


def noise_conditional_classifier_loss(
    classifier: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    sde: SDE,
    x0: torch.Tensor,
    y: torch.Tensor,
    t: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Cross-entropy -log p_theta(y | x_t, t) per sample [B], x_t = alpha_t x0 + sigma_t z.

    Its minimizer over classifiers is the noise-conditional posterior p_t(y | x_t) at every t
    (Song et al. 2021, App. I.1). classifier(x, t) -> logits [B, C]; y: labels long [B] of x0;
    t: [B], drawn by the caller (e.g. `UniformTimeSampler`); z from `generator`.
    """
    _check_classifier_loss_args(x0, y, t)
    kernel = sde.kernel(x0, t)
    x_t = kernel.sample(randn_like(kernel.mean, generator))
    return F.cross_entropy(classifier(x_t, t), y.long(), reduction="none")


def _check_classifier_loss_args(x0, y, t) -> None:
    fn = "noise_conditional_classifier_loss"
    check_tensor(fn, "x0", x0, min_ndim=2)
    batch = x0.shape[0]
    if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.shape != (batch,):
        raise ValueError(f"{fn}: y must be an integer tensor of labels [B] = [{batch}]")
    check_time(fn, t, batch)


# --- imputation -------------------------------------------------------------------------


def _known_mask(fn: str, x_known, mask) -> torch.Tensor:
    """Validate x_known [B, ...] and the 0/1 mask; returns the mask broadcast to x_known (bool)."""
    if not isinstance(x_known, torch.Tensor) or not x_known.is_floating_point() or x_known.ndim < 2:
        raise ValueError(f"{fn}: x_known must be a floating-point tensor [B, ...]")
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{fn}: mask must be a tensor (1 = known) broadcastable to x_known")
    try:
        known = torch.broadcast_to(mask.to(x_known.device).bool(), x_known.shape)
    except RuntimeError:
        raise ValueError(
            f"{fn}: mask of shape {tuple(mask.shape)} does not broadcast to x_known's shape "
            f"{tuple(x_known.shape)}"
        ) from None
    if mask.dtype != torch.bool and not bool(torch.all((mask == 0) | (mask == 1))):
        raise ValueError(f"{fn}: mask must hold only 0 (unknown) and 1 (known)")
    return known


@torch.no_grad()
def inpaint(
    sde: SDE,
    score_fn: ScoreFn,
    x_known: torch.Tensor,
    mask: torch.Tensor,
    steps: int = 1000,
    snr: float = 0.16,
    n_corrector: int = 1,
    *,
    predictor: str = "reverse_diffusion",
    eps: float = 1e-3,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], None] | None = None,
    progress: bool = False,
    denoise: bool = True,
) -> torch.Tensor:
    """Imputation by replacement (Song et al. 2021, App. I.2): PC sampling of the unknown
    coordinates, with the known ones (mask 1) set after every corrector and predictor step to
    a fresh draw of N(alpha_t x_known, sigma_t^2 I), their forward diffusion to that time.

    An approximation: it follows the score of p_t(x_unknown | diffused known values), not of
    p_t(x_unknown | x_known). x_known: [B, ...] (values at unknown coordinates are ignored);
    mask: broadcastable to x_known. Predictor, corrector, grid and callback are those of
    `predictor_corrector`. Returns [B, ...] with the known coordinates equal to x_known.
    """
    fn = "inpaint"
    known = _known_mask(fn, x_known, mask)
    steps, eps = check_pc_args(fn, sde, steps, snr, n_corrector, predictor, eps)

    def diffused_known(x: torch.Tensor, t: torch.Tensor):
        # A fresh sample of p_t(x_known(t) | x_known) at every call: the known part carries
        # the noise level of time t, as the unknown part does.
        kernel = sde.kernel(x_known, t)
        return torch.where(known, kernel.sample(randn_like(x, generator)), x), kernel.mean

    predictor_step, rsde = PREDICTORS[predictor], sde.reverse(score_fn)
    x = sde.prior_sampling(
        x_known.shape, generator=generator, device=x_known.device, dtype=x_known.dtype
    )
    grid = reverse_time_grid(sde.T, eps, steps)
    x, _ = diffused_known(x, per_sample_time(grid[0], x))
    for i in trange(steps, disable=not progress, desc=fn):
        t, t_next = per_sample_time(grid[i], x), per_sample_time(grid[i + 1], x)
        if n_corrector:
            alpha = corrector_alpha(sde, t, t_next)
            for _ in range(n_corrector):
                x, _ = langevin_corrector_step(score_fn, x, t, snr, alpha, generator)
                x, _ = diffused_known(x, t)
        x, x_mean = predictor_step(rsde, x, t, grid[i + 1] - grid[i], generator)
        x, known_mean = diffused_known(x, t_next)
        x_mean = torch.where(known, known_mean, x_mean)
        if callback is not None:
            callback({"i": i, "t": grid[i + 1], "x": x, "x_mean": x_mean})
    # At t = 0 the diffused known values are x_known already; set them exactly all the same.
    return torch.where(known, x_known, x_mean if denoise else x)


def decoupling_matrix(dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The orthogonal 3 x 3 W whose first row (1, 1, 1)/sqrt(3) measures the grey level.

    Rows: (1, 1, 1)/sqrt(3), (-2, 1, 1)/sqrt(6), (0, 1, -1)/sqrt(2): the transpose of the matrix
    of Song et al. 2021, App. I.3 (their code's `M`). u = W x puts sqrt(3) * mean(RGB) in u_0
    and the two colour (chroma) directions in u_1, u_2.
    """
    rows = [
        [1 / math.sqrt(3)] * 3,
        [-2 / math.sqrt(6), 1 / math.sqrt(6), 1 / math.sqrt(6)],
        [0.0, 1 / math.sqrt(2), -1 / math.sqrt(2)],
    ]
    return torch.tensor(rows, dtype=torch.float64).to(device=device, dtype=dtype)


def _check_orthogonal(W, fn: str, dtype, device) -> torch.Tensor:
    if not isinstance(W, torch.Tensor) or W.ndim != 2 or W.shape[0] != W.shape[1]:
        raise ValueError(f"{fn}: W must be a square matrix [C, C]")
    W = W.to(device=device, dtype=dtype)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    eye = torch.eye(W.shape[0], dtype=dtype, device=device)
    if not torch.allclose(W @ W.T, eye, atol=tol):
        raise ValueError(f"{fn}: W must be orthogonal (W W^T = I); got W W^T = {W @ W.T}")
    return W


def impute_linear(
    sde: SDE,
    score_fn: ScoreFn,
    y: torch.Tensor,
    W: torch.Tensor,
    steps: int = 1000,
    snr: float = 0.16,
    n_corrector: int = 1,
    **kwargs,
) -> torch.Tensor:
    """Sample x given the measurements y = (W x)[:, :k] for an orthogonal W [C, C] on dim 1.

    In u = W x (per channel vector) the measurements are coordinates, and u_t = W x_t follows
    the same scalar SDE with score W s(W^T u, t); so `inpaint` u with its first k channels known
    and return x = W^T u (Song et al. 2021, App. I.3). y: [B, k, ...]; keywords go to `inpaint`
    (its callback sees x, not u). Returns [B, C, ...].
    """
    fn = "impute_linear"
    if not isinstance(y, torch.Tensor) or not y.is_floating_point() or y.ndim < 2:
        raise ValueError(f"{fn}: y must be a floating-point tensor [B, k, ...]")
    W = _check_orthogonal(W, fn, y.dtype, y.device)
    n_channels, k = W.shape[0], y.shape[1]
    if not 0 < k < n_channels:
        raise ValueError(f"{fn}: y must hold 1..C-1 = 1..{n_channels - 1} measurements, got {k}")

    def to_u(x):
        return torch.einsum("ij,bj...->bi...", W, x)

    def to_x(u):
        return torch.einsum("ji,bj...->bi...", W, u)

    shape = (y.shape[0], n_channels, *y.shape[2:])
    u_known = torch.zeros(shape, dtype=y.dtype, device=y.device)
    u_known[:, :k] = y
    mask = torch.zeros(shape, dtype=torch.bool, device=y.device)
    mask[:, :k] = True
    callback = kwargs.pop("callback", None)
    if callback is not None:
        kwargs["callback"] = lambda info: callback(
            {**info, "x": to_x(info["x"]), "x_mean": to_x(info["x_mean"])}
        )
    u = inpaint(
        sde, lambda u, t: to_u(score_fn(to_x(u), t)), u_known, mask, steps, snr, n_corrector,
        **kwargs,
    )  # fmt: skip
    return to_x(u)


def colorize(
    sde: SDE,
    score_fn: ScoreFn,
    gray: torch.Tensor,
    steps: int = 1000,
    snr: float = 0.16,
    n_corrector: int = 1,
    **kwargs,
) -> torch.Tensor:
    """Colour a grey image: gray [B, 1, ...] = mean of the RGB channels -> x [B, 3, ...].

    `impute_linear` with `decoupling_matrix()`, whose first row measures sqrt(3) * gray
    (Song et al. 2021, App. I.3); the result has x.mean(1) = gray up to rounding.
    """
    if not isinstance(gray, torch.Tensor) or gray.ndim < 2 or gray.shape[1] != 1:
        shape = tuple(gray.shape) if isinstance(gray, torch.Tensor) else type(gray)
        raise ValueError(f"colorize: gray must have shape [B, 1, ...] (one channel), got {shape}")
    W = decoupling_matrix(gray.dtype, gray.device)
    return impute_linear(sde, score_fn, math.sqrt(3) * gray, W, steps, snr, n_corrector, **kwargs)


# --- classifier-free guidance -------------------------------------------------------------


def _check_cfg_args(cond_score_fn, uncond_score_fn, w) -> float:
    if not callable(cond_score_fn) or not callable(uncond_score_fn):
        raise TypeError("cfg_score: cond_score_fn(x, t, y) and uncond_score_fn(x, t) must be "
                        "callable (one network with and without its label, or two)")
    return check_float("cfg_score", "w", w)


def cfg_score(
    cond_score_fn: Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor],
    uncond_score_fn: ScoreFn,
    w: float,
) -> Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]:
    """Classifier-free guidance: s~(x, t, y) = (1 + w) s(x, t, y) - w s(x, t).

    Ho & Salimans 2022, eq. (6) (there on the noise ε, which is the score times -σ_t). It is
    the score of p_t(x | y)^(1 + w) / p_t(x)^w, i.e. of p_t(x) p_t(y | x)^(1 + w): classifier
    guidance with scale 1 + w (`conditional_score_fn`) with the classifier that Bayes' rule
    implies, so no classifier is trained. w = 0: the conditional score; returns (x, t, y) -> like
    x (bind y for a sampler: `lambda x, t: guided(x, t, y)`).
    """
    w = _check_cfg_args(cond_score_fn, uncond_score_fn, w)

    def guided(x: torch.Tensor, t: torch.Tensor, y) -> torch.Tensor:
        s_cond = cond_score_fn(x, t, y)
        if w == 0:  # no unconditional evaluation needed
            return s_cond
        return (1 + w) * s_cond - w * uncond_score_fn(x, t)

    return guided

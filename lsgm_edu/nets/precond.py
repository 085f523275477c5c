"""Preconditioning: the one ε-wrapper that turns a raw network into a score model s(z, t).

The network predicts the noise, ε̂ = net(z_t, c(t), y), and the score is the kernel score at
that noise, s(z, t) = -L_t^{-T} ε̂: -ε̂ / σ_t for the scalar SDEs (Ho et al. 2020; Song et al.
2021, App. C), and the Cholesky form in phase space (Dockhorn et al. 2022, eq. 14). The SDE
supplies both the scale L_t (`sde.marginal_scale`) and the network's time input c(t)
(`sde.noise_label`: 999·t for VP / sub-VP, log σ(t) for VE); the network never imports an SDE
and never knows which parameterization it serves. Trained with DSM and
`SigmaSquaredWeighting`, the loss is 1/2 |ε̂ - ε|^2 per sample, for every SDE. Data kept in
[0, 1] (the reference's VE setting, `centered=False`) reach the network as 2x - 1, as the
reference network does internally.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lsgm_edu.kernel import eps_to_score
from lsgm_edu.utils import append_dims, phase_apply

_TIME_INPUTS = ("noise_label", "t")
# What the raw network predicts: the noise ε (ours), or σ(t) times the score with SMLD's noise
# level σ(t) = sde.noise_scale(t) (score_sde's `scale_by_sigma` VE models, lsgm_edu.convert).
PARAMETERIZATIONS = ("eps", "scale_by_sigma")


class ScoreModel(nn.Module):
    """s(z, t, y) = -L_t^{-T} net(z, c(t), y): the ε-parameterized score of a raw network.

    `sde`: any SDE of `lsgm_edu.sde` / `lsgm_edu.phase_space`. time_input="noise_label" feeds
    the network c(t) = sde.noise_label(t) (the U-Nets); time_input="t" feeds t itself (the toy
    `ScoreMLP`, whose Fourier features expect t in [0, 1]). `y` (class labels) is passed on
    only when given.

    In phase space (K = 2) the network sees the state z = (x, m) and predicts either the noise of
    the whole state (PSLD) or, when its output has the data's channels only, the noise ε_m of
    the momentum (CLD's head): ε̂ = (0, ε̂_m). With L lower-triangular the momentum score
    s_m = -ε̂_m / L_mm needs ε̂_m alone; the x-score is then not modelled, which is right only
    when no noise enters x (the reverse drift uses G G^T s). `mixed_score` adds CLD's Normal
    part: s_m = -m / Σ_mm(t) - ε̂_m / L_mm with Σ_mm the momentum variance of the HSM kernel
    (Dockhorn et al. 2022, Sec. 3.3).

    parameterization="scale_by_sigma" reads the network the way score_sde's VE models were
    trained (`model.scale_by_sigma`, `models/utils.get_score_fn`): its output is σ(t) s with
    SMLD's σ(t) = σ_min (σ_max/σ_min)^t (`sde.noise_scale`), so s = net / σ(t), and
    ε̂ = -σ_t s with the exact std σ_t = sqrt(σ(t)² - σ_min²). Checkpoints converted from
    score_sde (`lsgm_edu.convert`) record it in their sidecar.
    """

    def __init__(self, net: nn.Module, sde, centered: bool = True, *,
                 time_input: str = "noise_label", mixed_score: bool = False,
                 parameterization: str = "eps"):
        super().__init__()
        _check_score_args(sde, centered, time_input, mixed_score, parameterization)
        self.net = net
        self.sde = sde
        self.centered = centered
        self.time_input = time_input
        self.mixed_score = mixed_score
        self.parameterization = parameterization

    def eps(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The noise prediction ε̂(z_t, t) of the whole state (zeros where the head is silent)."""
        return self._eps(x, t, y)

    def _eps(self, x, t, y=None, scale=None) -> torch.Tensor:
        """`eps`, reusing the kernel scale L_t when the caller has it (`scale`)."""
        out = self._net_out(x, t, y)
        if self.parameterization == "scale_by_sigma":  # ε̂ = -σ_t s = -σ_t net / σ(t)
            ratio = self._scale(x, t) / self._noise_scale(x, t)
            return -append_dims(ratio.to(x.dtype), x.ndim) * out
        if out.shape == x.shape:
            if self.mixed_score:
                raise ValueError("ScoreModel: mixed_score needs the momentum head (a network "
                                 "whose output has the data's channels); this one predicts the "
                                 "whole state")
            return out
        return self._momentum_head(out, x, t, scale)

    def _net_out(self, x, t, y=None) -> torch.Tensor:
        """The raw network at (x, c(t)), x rescaled to [-1, 1] when the data are not centered."""
        c = self.sde.noise_label(t) if self.time_input == "noise_label" else t
        x_in = x if self.centered else 2 * x - 1
        return self.net(x_in, c) if y is None else self.net(x_in, c, y)

    def _momentum_head(self, eps_m: torch.Tensor, z: torch.Tensor, t: torch.Tensor, scale=None):
        """(0, ε̂_m), plus CLD's Normal part L_mm m / Σ_mm in ε units when mixed_score."""
        x, m = self.sde.project(z), z[:, z.shape[1] // 2:]
        if self.sde.K != 2 or eps_m.shape != m.shape:
            raise ValueError(f"ScoreModel: the network returned {tuple(eps_m.shape)} for a state "
                             f"{tuple(z.shape)}; it must return the state's shape, or (K = 2) "
                             f"the data's shape {tuple(m.shape)} (momentum head)")
        if not self.sde.momentum_head_allowed:
            _refuse_momentum_head(self.sde, z.shape[1])
        if self.mixed_score:
            L = self._scale(z, t) if scale is None else scale
            L_mm, var_mm = L[:, 1, 1], (L[:, 1] ** 2).sum(-1)
            eps_m = eps_m + append_dims((L_mm / var_mm).to(z.dtype), z.ndim) * m
        return torch.cat([torch.zeros_like(x), eps_m], dim=1)

    def _scale(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t_scale = t.to(device=x.device, dtype=torch.promote_types(t.dtype, x.dtype))
        return self.sde.marginal_scale(t_scale)

    def _noise_scale(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """SMLD's σ(t) [B] (VESDE.noise_scale), the divisor of score_sde's VE output."""
        t_scale = t.to(device=x.device, dtype=torch.promote_types(t.dtype, x.dtype))
        return self.sde.noise_scale(t_scale)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None):
        if self.parameterization == "scale_by_sigma":  # score_sde: s = net / σ(t), as it was
            sigma = self._noise_scale(x, t)
            return self._net_out(x, t, y) / append_dims(sigma.to(x.dtype), x.ndim)
        scale = self._scale(x, t)
        return eps_to_score(self._eps(x, t, y, scale), scale.to(x.dtype))


def _refuse_momentum_head(sde, state_channels: int) -> None:
    """Why `sde` cannot take a momentum head (`sde.momentum_head_allowed` is False)."""
    if sde.factorization != "lower":
        raise ValueError("ScoreModel: a momentum head needs the lower (Cholesky) factorization, "
                         "where s_m depends on ε_m alone; with 'upper' give the network the "
                         "whole state as output")
    raise ValueError(f"ScoreModel: a momentum head leaves the x-score unmodelled, but {sde!r} "
                     f"puts noise on x; give the network out_channels = {state_channels} (the "
                     f"whole state)")


def _check_score_args(sde, centered, time_input, mixed_score, parameterization="eps") -> None:
    if time_input not in _TIME_INPUTS:
        raise ValueError(f"ScoreModel: time_input must be one of {_TIME_INPUTS}, got "
                         f"{time_input!r}")
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"ScoreModel: parameterization must be one of {PARAMETERIZATIONS}, got "
                         f"{parameterization!r} (a checkpoint's sidecar 'parameterization' from "
                         f"a newer lsgm_edu? upgrade lsgm_edu)")
    if parameterization == "scale_by_sigma" and (
            sde is None or not hasattr(sde, "noise_scale") or mixed_score):
        raise ValueError(f"ScoreModel: parameterization 'scale_by_sigma' is score_sde's VE "
                         f"output (net / sigma(t)); it needs a VESDE and no mixed_score, got "
                         f"{sde!r}, mixed_score={mixed_score}")
    if sde is not None and sde.K > 1 and not centered:
        raise ValueError("ScoreModel: phase-space SDEs take data centered in [-1, 1] "
                         "(data.centered: true); the 2x - 1 rescaling is for K = 1 only")
    if mixed_score and (sde is None or not sde.momentum_head_allowed):
        raise ValueError(f"ScoreModel: mixed_score is CLD's (noise on the momentum only, K = 2); "
                         f"got {sde!r}")


class MixedScore(nn.Module):
    """LSGM's mixed score: a Normal prior's noise plus a learned correction, per channel.

    ε̂(z, t) = (1 - α) ⊙ ε_N(z, t) + α ⊙ net(z, c(t)), α = sigmoid(`mixing_logit`), one logit per
    channel of the state (Vahdat, Kreis & Kautz 2021, eq. 10). ε_N is the noise a standard
    Normal prior predicts: its score is `sde.normal_score` = -C_t^{-1} z, so ε_N = L_t^T C_t^{-1} z
    (σ_t z under a VP SDE, where C_t = 1; any SDE of the engine, phase space included, where z
    is the state of the latent). With α = 0 the model *is* the N(0, I) prior and the network
    only learns the departure from it. Calling the module gives the score
    (1 - α) s_N - α L_t^{-T} net (`eps_to_score`); `.eps(z, t)` gives ε̂. The network's time
    input is c(t) = embedding_scale · t (LSGM: 1000 t). Latent channels switched off by
    `set_active` (LSGM's inactive latent variables, KL <= 0.1 nat) get logit -15 and are zeroed
    at the network input, in every phase component.
    """

    INACTIVE_LOGIT = -15.0

    def __init__(self, net: nn.Module, sde, channels: int, logit_init: float = -3.0, *,
                 spatial: bool = True, embedding_scale: float = 1000.0):
        super().__init__()
        _check_mixed_args(channels, logit_init, embedding_scale)
        self.net = net
        self.sde = sde
        self.embedding_scale = float(embedding_scale)
        shape = (1, channels, 1, 1) if spatial else (1, channels)
        self.mixing_logit = nn.Parameter(torch.full(shape, float(logit_init)))
        self.register_buffer("is_active", torch.ones(shape))

    @property
    def alpha(self) -> torch.Tensor:
        """α = sigmoid(mixing_logit), the weight of the network per channel."""
        return torch.sigmoid(self.mixing_logit)

    def normal_eps(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """ε_N = -L_t^T s_N(z, t): the noise a N(0, I) prior predicts (σ_t z under VP)."""
        return -phase_apply(_transpose(self._scale(z, t)), self._sde().normal_score(z, t))

    def eps(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """ε̂ = (1 - α) ε_N + α net(z ⊙ active, c(t))."""
        alpha, net_eps = self.alpha.to(z.dtype), self._net_eps(z, t)
        return (1 - alpha) * self.normal_eps(z, t) + alpha * net_eps

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The score (1 - α) s_N - α L_t^{-T} net: -(1 - α) z - α net / σ_t under VP (exactly
        the Normal prior's score where α = 0)."""
        alpha, net_eps = self.alpha.to(z.dtype), self._net_eps(z, t)
        return ((1 - alpha) * self._sde().normal_score(z, t)
                + alpha * eps_to_score(net_eps, self._scale(z, t)))

    def _net_eps(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(z * self.is_active.to(z.dtype), self.embedding_scale * t.to(z.dtype))

    def _sde(self):
        if self.sde is None:
            raise RuntimeError("MixedScore has no SDE: build it with sde=..., or set .sde before "
                               "calling it (build_model(cfg.model, sde=build_sde(cfg.sde)))")
        return self.sde

    def _scale(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The kernel scale L_t: σ_t [B] or the factor [B, K, K], in z's dtype."""
        t_scale = t.to(device=z.device, dtype=torch.promote_types(t.dtype, z.dtype))
        return self._sde().marginal_scale(t_scale).to(z.dtype)

    @torch.no_grad()
    def set_active(self, active: torch.Tensor) -> None:
        """Switch latent channels off (`active` False, one flag per latent channel, repeated over
        the K phase components of the state): logit -15 (α ≈ 3e-7) and zero network input."""
        channels = self.mixing_logit.shape[1]
        K = 1 if self.sde is None else self.sde.K
        active = torch.as_tensor(active, dtype=torch.bool, device=self.mixing_logit.device)
        if active.shape != (channels // K,):
            raise ValueError(f"MixedScore.set_active: need one flag per latent channel "
                             f"({channels // K}), got shape {tuple(active.shape)}")
        active = active.repeat(K)
        mask = active.to(self.is_active.dtype).reshape(self.is_active.shape)
        self.is_active.copy_(mask)
        self.mixing_logit.masked_fill_(~active.reshape(self.mixing_logit.shape),
                                       self.INACTIVE_LOGIT)


def _transpose(scale: torch.Tensor) -> torch.Tensor:
    """L^T of a kernel scale: σ itself [B], or the transposed blocks [B, K, K]."""
    return scale if scale.ndim == 1 else scale.mT


def _check_mixed_args(channels, logit_init, embedding_scale) -> None:
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"MixedScore: channels must be an int >= 1, got {channels!r}")
    if not isinstance(logit_init, (int, float)) or math.isnan(logit_init) or logit_init == math.inf:
        raise ValueError(f"MixedScore: logit_init must be a number < inf (-inf: the Normal prior "
                         f"exactly), got {logit_init!r}")
    if not isinstance(embedding_scale, (int, float)) or not math.isfinite(embedding_scale):
        raise ValueError(f"MixedScore: embedding_scale must be a finite number, got "
                         f"{embedding_scale!r}")


def edm_coefficients(sigma: torch.Tensor, sigma_data: float = 0.5):
    """c_skip, c_out, c_in, c_noise of EDM's preconditioning at noise levels sigma [B]
    (Karras et al. 2022, Table 1 and eq. 7): sigma_d^2 / (sigma^2 + sigma_d^2),
    sigma sigma_d / sqrt(sigma^2 + sigma_d^2), 1 / sqrt(sigma^2 + sigma_d^2), ln(sigma) / 4."""
    total = sigma.pow(2) + sigma_data**2
    return sigma_data**2 / total, sigma * sigma_data / total.sqrt(), total.rsqrt(), sigma.log() / 4


def _check_edm_args(sigma_data) -> float:
    if isinstance(sigma_data, bool) or not isinstance(sigma_data, (int, float)) \
            or not 0 < sigma_data < math.inf:
        raise ValueError(f"EDMPrecond: sigma_data must be a finite float > 0 (the data's std; "
                         f"EDM: 0.5 for images in [-1, 1]), got {sigma_data!r}")
    return float(sigma_data)


class EDMPrecond(nn.Module):
    """EDM's preconditioned denoiser D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) around a
    raw network F = net(x, c_noise) (Karras et al. 2022, eq. 7; `edm_coefficients`).

    sigma: [B] noise levels of x = y + sigma n (the VE form; for a scalar SDE, sigma_t / alpha_t
    applied to x_t / alpha_t). `score(x, sigma)` = (D - x) / sigma^2, the score of p(x; sigma)
    (eq. 3). With sigma_data the data's std, F's input and target both have unit variance.
    """

    def __init__(self, net: nn.Module, sigma_data: float = 0.5):
        super().__init__()
        self.sigma_data = _check_edm_args(sigma_data)
        self.net = net

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = sigma.to(x.dtype)
        c_skip, c_out, c_in, c_noise = (append_dims(c, x.ndim) for c in
                                        edm_coefficients(sigma, self.sigma_data))
        return c_skip * x + c_out * self.net(c_in * x, c_noise.flatten())

    def score(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """grad log p(x; sigma) = (D(x; sigma) - x) / sigma^2 (Karras et al. 2022, eq. 3)."""
        return (self(x, sigma) - x) / append_dims(sigma.to(x.dtype), x.ndim).pow(2)

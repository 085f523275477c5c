"""Latent score-based generative models (LSGM; Vahdat, Kreis & Kautz, NeurIPS 2021).

A VAE encodes x to a latent z0 ~ q(z0 | x); a score-based prior p(z0) replaces its N(0, I)
prior. The VAE's KL term splits into the negative entropy of q and the cross-entropy
CE(q(z0 | x) || p(z0)), and the cross-entropy is a denoising score-matching integral over
diffusion time (LSGM, Thm. 1 / eq. 8): for a VP-type SDE with kernel z_t = m_t z0 + σ_t ε,

    CE(q || p) = ∫_eps^1 g(t)^2 / (2 σ_t^2) E ||ε̂(z_t, t) - ε||^2 dt + D/2 (1 + log 2π σ_eps^2),

up to the terminal mismatch of q and p at t = 1 (small: both are close to N(0, I) there). The
integral is estimated with one t per sample from a time sampler q(t) and its weight 1 / q(t)
(`losses.time_sampler`), and z0 is reparameterized, so the gradient reaches the encoder.

The prior may diffuse by any SDE of the engine. A phase-space prior (CLD, PSLD: latent PSLD)
diffuses the state (z0, m0) by its HSM kernel, ε̂ is the state's noise, the weight becomes the
block L^{-1} G G^T L^{-T} / 2 (`likelihood_weight`), and the constant keeps only the entropy of
the latent's component of the kernel, so the estimate bounds the latent's cross-entropy
(`cross_entropy_constant`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from lsgm_edu.checks import check_callable, check_float, check_int, check_like, check_tensor
from lsgm_edu.nets.precond import MixedScore
from lsgm_edu.nets.unet import UNet, UNetConfig
from lsgm_edu.registry import MODELS
from lsgm_edu.sde import SDE
from lsgm_edu.utils import EvalMode, append_dims, phase_apply, phase_outer, randn, randn_like
from lsgm_edu.vae import NVAE, VAEConfig, log_standard_normal

__all__ = [
    "NELBO",
    "NLL_ESTIMATORS",
    "P_WEIGHTINGS",
    "LSGMConfig",
    "NLLBound",
    "active_channels",
    "build_lsgm",
    "cross_entropy",
    "cross_entropy_at",
    "cross_entropy_constant",
    "cross_entropy_from_error",
    "cross_entropy_sampler_name",
    "denoising_error",
    "eps_of",
    "likelihood_weight",
    "nelbo",
    "nll_bound",
    "norm_regularization",
    "normal_cross_entropy",
    "normal_entropy",
    "p_weight",
    "sample_latent",
    "takes_time_samplers",
    "top_kl_per_channel",
    "weighted_error",
]


def likelihood_weight(sde: SDE, t: torch.Tensor) -> torch.Tensor:
    """The weight of the residual ε̂ - ε in the likelihood-weighted loss: g(t)^2 / (2 σ_t^2) [B],
    or in phase space the block W = L^{-1} G G^T L^{-T} / 2 [B, K, K], so that the loss
    1/2 |G^T (s - ∇log p_0t)|^2 = tr(W (ε̂ - ε)(ε̂ - ε)^T) (Song et al. 2021b, eq. 10;
    Dockhorn et al. 2022, eq. 11). Apply it with `weighted_error`."""
    _, g = sde.sde_coefficients(t)
    L = sde.marginal_scale(t)
    if L.ndim == 1:
        return g.pow(2) / (2 * L.pow(2))
    L_inv_G = torch.linalg.solve(L, g.to(L.dtype))
    return 0.5 * L_inv_G @ L_inv_G.mT


def weighted_error(weight: torch.Tensor, error: torch.Tensor) -> torch.Tensor:
    """tr(W E) per sample [B]: w |r|^2 for a scalar weight [B], Σ_ij W_ij E_ij for a block."""
    if weight.ndim == 1:
        return weight.to(error.dtype) * error
    return (weight.to(error.dtype) * error).sum((-2, -1))


def cross_entropy_constant(sde: SDE, eps: float, dims: int) -> float:
    """D/2 (1 + log 2π σ_eps^2): the entropy of the kernel at t = eps (LSGM, eq. 8). In phase
    space σ_eps^2 is the variance Σ_xx of the latent's component of the kernel: the state's
    cross-entropy bounds the latent's, CE(q(z)||p(z)) <= CE(q(z, m)||p(z, m)) - H(q(m | z)),
    and H(q(m | z)) >= H(m | z, z0) = H(kernel) - 1/2 log(2πe Σ_xx) (conditioning cannot add
    entropy), so subtracting the kernel's conditional entropy of m leaves D/2 log(2πe Σ_xx)."""
    L = sde.marginal_scale(torch.tensor([float(eps)], dtype=torch.float64))
    var = L.pow(2) if L.ndim == 1 else (L @ L.mT)[:, 0, 0]
    return 0.5 * dims * (1 + math.log(2 * math.pi * var.item()))


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
                     generator: torch.Generator | None = None, *, t: torch.Tensor | None = None,
                     noise: torch.Tensor | None = None) -> torch.Tensor:
    """The same estimate [B] at a given posterior sample z0 (any posterior, e.g. after
    normalizing flows): weight(t) g^2/(2σ_t^2) ||ε̂(z_t, t) - ε||^2 + D/2 (1 + log 2π σ_eps^2).
    t ~ t_sampler and ε ~ N(0, I) (of the state's shape) come from `generator`, or are given
    (`t`, `noise`)."""
    if t is None:
        t = t_sampler.sample(z0.shape[0], generator, device=z0.device, dtype=z0.dtype)
    if noise is None:
        noise = randn(sde.state_shape(z0.shape), generator, device=z0.device, dtype=z0.dtype)
    error = denoising_error(sde, eps_fn, z0, t, noise)
    return cross_entropy_from_error(sde, t_sampler, t, error, z0[0].numel())


def eps_of(score_model, sde: SDE):
    """ε̂(z, t) = -L_t^T s(z, t) (-σ_t s for K = 1): the noise prediction of a score model,
    through its forward (a DistributedDataParallel wrapper synchronizes gradients only there)."""

    def eps_fn(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        L = sde.marginal_scale(t.to(device=z.device)).to(z.dtype)
        return -phase_apply(L if L.ndim == 1 else L.mT, score_model(z, t))

    return eps_fn


def denoising_error(sde: SDE, eps_fn, z0: torch.Tensor, t: torch.Tensor,
                    noise: torch.Tensor) -> torch.Tensor:
    """||ε̂(z_t, t) - ε||^2 per sample [B] (float32 or wider), z_t = m_t z0 + σ_t ε; in phase
    space (z_t from the HSM kernel of the latent z0) the Gram matrix Σ r r^T of the residual's
    phase components, [B, K, K], which `weighted_error` weighs."""
    z_t = sde.kernel(z0, t).sample(noise)
    residual = (eps_fn(z_t, t) - noise).float()
    if sde.K == 1:
        return residual.pow(2).flatten(1).sum(1)
    r = residual.reshape(len(residual), sde.K, -1)
    return r @ r.mT


def cross_entropy_from_error(sde: SDE, t_sampler, t: torch.Tensor, error: torch.Tensor,
                             dims: int) -> torch.Tensor:
    """The cross-entropy estimate [B] from the denoising error at t ~ t_sampler (LSGM, eq. 8)."""
    weight = append_dims(t_sampler.weight(t), error.ndim) * likelihood_weight(sde, t)
    return weighted_error(weight, error) + cross_entropy_constant(sde, t_sampler.eps, dims)


def normal_cross_entropy(groups) -> torch.Tensor:
    """-log N(ε_j; 0, I) summed over the groups' dimensions [B]: the cross-entropy of the latent
    groups that keep the Normal prior (LSGM's lower scales)."""
    return sum(((0.5 * e.float().pow(2) + 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
                for e in groups), torch.zeros(()))


def _check_cross_entropy_args(sde, eps_fn, mean, std, t_sampler) -> None:
    fn = "cross_entropy"
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
    ce = (cross_entropy_at(sde, prior_eps, z0, t_sampler, generator)
          + normal_cross_entropy(out.eps[top:]))
    recon = vae.reconstruction_loss(out, x)
    log_q = torch.stack(out.log_q).sum(0)
    return NELBO(recon + log_q + ce, recon, log_q, ce)


# --- the model: a VAE and a score prior on its top latent --------------------------------------


def _latent_ncsnpp() -> UNetConfig:
    """LSGM's latent NCSN++ for CIFAR-10 (180 x 16 x 16 latent; App. G of the paper)."""
    return UNetConfig(arch="ncsnpp", image_size=16, num_channels=180, nf=512, ch_mult=(1, 1, 1),
                      num_res_blocks=8, attn_resolutions=(16,), dropout=0.2, fir=True,
                      resblock_type="biggan", progressive="none", progressive_input="none",
                      embedding_type="positional", embedding_dim=128)


@dataclass
class LSGMConfig:
    """An LSGM: the NVAE of `vae` and the latent NCSN++ of `sgm` inside a `MixedScore`.

    `sgm` sees the VAE's top latent: its image_size / num_channels must equal the VAE's
    `top_latent_shape` (K times its channels for a phase-space prior: the state (z0, m0)).
    `mixing_logit_init`: LSGM's --mixing_logit_init (-3 CIFAR-10, -6 MNIST, OMNIGLOT, CelebA-HQ); `embedding_scale`: the network's time input is this times t (1000).
    """

    vae: VAEConfig = field(default_factory=VAEConfig)
    sgm: UNetConfig = field(default_factory=_latent_ncsnpp)
    mixing_logit_init: float = -3.0
    embedding_scale: float = 1000.0

    def __post_init__(self):
        self.validate()

    # what the data checks of a config read (`configs.validate`)
    @property
    def image_size(self) -> int:
        return self.vae.image_size

    @property
    def num_channels(self) -> int:
        return self.vae.num_channels

    @property
    def num_classes(self) -> int:
        return 0

    def validate(self) -> None:
        """Raise ValueError naming the first field that does not fit."""
        c, h, w = self.vae.top_latent_shape
        if self.sgm.num_channels % c or self.sgm.image_size != h:
            raise ValueError(
                f"LSGMConfig.sgm: the score prior models the VAE's top latent {c}x{h}x{w} (or the "
                f"K x {c} channels of its phase-space state); set sgm.num_channels={c} "
                f"sgm.image_size={h} (got {self.sgm.num_channels} and {self.sgm.image_size})")
        if self.sgm.num_classes:
            raise ValueError("LSGMConfig.sgm.num_classes: the latent prior is unconditional; set 0")
        check_float("LSGMConfig", "mixing_logit_init", self.mixing_logit_init, high=20.0)
        check_float("LSGMConfig", "embedding_scale", self.embedding_scale, positive=True)


def build_lsgm(cfg: LSGMConfig, *, generator=None, sde: SDE | None = None) -> nn.ModuleDict:
    """`{"vae": NVAE, "sgm": MixedScore(UNet)}` of an `LSGMConfig`; weights from `generator`.

    The mixed score needs the SDE's σ_t: pass `sde` here or set `models["sgm"].sde` later.
    """
    vae = NVAE(cfg.vae, generator=generator)
    net = UNet(cfg.sgm, generator=_after_vae(generator))
    sgm = MixedScore(net, sde, cfg.sgm.num_channels, cfg.mixing_logit_init,
                     embedding_scale=cfg.embedding_scale)
    return nn.ModuleDict({"vae": vae, "sgm": sgm})


def _after_vae(generator):
    """The generator the score network draws from after the VAE: the same stream, or for an int
    seed (or None) the seed + 1, so the two networks never share initial weights."""
    if isinstance(generator, torch.Generator):
        return generator
    return (0 if generator is None else int(generator)) + 1


MODELS.register("lsgm", build_lsgm, params=LSGMConfig,
                build=lambda cfg, generator=None, sde=None: build_lsgm(cfg, generator=generator,
                                                                       sde=sde))


# --- LSGM's training weightings ----------------------------------------------------------------

# iw_sample_p of the reference: (time sampler, weighting λ_p of |ε̂ - ε|² in the SGM's loss).
# "likelihood": g²/(2σ²) (the CE itself); "g2": g²/2 (drops 1/σ²); "unit": 1 (drops all, the
# DDPM-style ε-loss). Every estimate is weight(t) λ_p(t) |ε̂ - ε|² with weight = 1/q(t), so each
# mode is unbiased for its own integral over [eps, 1] (the reference's uniform modes miss the
# factor 1 - eps, a constant).
P_WEIGHTINGS = {
    "ll_uniform": ("uniform", "likelihood"),
    "ll_iw": ("ll_iw", "likelihood"),
    "drop_all_uniform": ("uniform", "unit"),
    "drop_all_iw": ("drop_all_iw", "unit"),
    "drop_sigma2t_uniform": ("uniform", "g2"),
    "drop_sigma2t_iw": ("drop_sigma2t_iw", "g2"),
}


def takes_time_samplers(sde: SDE, iw_sample_p: str, iw_sample_q: str) -> bool:
    """Whether `sde` can use these samplers of t: the importance samplers are derived for a
    VP-type SDE; any other prior (VE, phase space) takes uniform t."""
    return sde.variance_preserving or (iw_sample_p.endswith("uniform")
                                       and iw_sample_q in ("reweight_p_samples", "ll_uniform"))


def cross_entropy_sampler_name(sde: SDE) -> str:
    """The sampler of t of the cross-entropy estimator of `nll_bound` for `sde`."""
    return "ll_iw" if sde.variance_preserving else "uniform"


def p_weight(kind: str, sde: SDE, t: torch.Tensor) -> torch.Tensor:
    """λ_p(t) of `P_WEIGHTINGS`: "likelihood" g²/(2σ_t²), "g2" g²/2 or "unit" 1, [B]; in phase
    space the blocks L^{-1} G G^T L^{-T} / 2, G G^T / 2 and I [B, K, K] (`weighted_error`)."""
    if kind == "likelihood":
        return likelihood_weight(sde, t)
    if kind == "g2":
        return phase_outer(sde.sde_coefficients(t)[1]) / 2
    if kind == "unit":
        if sde.K == 1:
            return torch.ones_like(t)
        return torch.eye(sde.K, dtype=t.dtype, device=t.device).expand(len(t), -1, -1)
    raise ValueError(f"p_weight: kind must be likelihood, g2 or unit, got {kind!r}")


def norm_regularization(module: nn.Module) -> torch.Tensor:
    """Σ max|γ| over the affine weights of the normalization layers of `module`: the part of
    spectral regularization LSGM keeps on its score network (`--weight_decay_norm_dae`)."""
    terms = [m.weight.abs().max() for m in module.modules()
             if isinstance(m, (nn.GroupNorm, nn.BatchNorm2d)) and m.affine]
    return torch.stack(terms).sum() if terms else torch.zeros(())


# --- sampling ------------------------------------------------------------------------------------


@torch.no_grad()
def sample_latent(sgm: MixedScore, sde: SDE, n: int, shape, *, method: str = "ode",
                  steps: int = 100, eps: float = 1e-5, rtol: float = 1e-5, atol: float = 1e-5,
                  generator: torch.Generator | None = None, device=None):
    """n top latents z0 ~ p(z0) from the score prior, and the number of score evaluations.

    method "ode": the probability-flow ODE by dopri5 at (rtol, atol) from T to eps (LSGM samples
    with RK45 at 1e-5, eps 1e-6 without a denoising step); "em": Euler-Maruyama with `steps`;
    "pc": reverse diffusion + one Langevin corrector per step (snr 0.16); "sscs": symmetric
    splitting (phase-space SDEs; `steps` evaluations, the last a denoising step). A phase-space
    prior samples the state (z0, m0) and returns its z0 (`sde.project`).
    """
    from lsgm_edu import samplers

    check_int("sample_latent", "n", n, low=1)
    full = sde.state_shape((n, *shape))
    kw = {"eps": eps, "generator": generator, "device": device}
    if method == "ode":
        z, nfe = samplers.probability_flow(sde, sgm, full, rtol=rtol, atol=atol, return_nfe=True,
                                           **kw)
    elif method == "em":
        z, nfe = samplers.euler_maruyama(sde, sgm, full, steps, **kw), steps + 1
    elif method == "pc":
        z, nfe = samplers.predictor_corrector(sde, sgm, full, steps, 0.16, 1,
                                              predictor="euler_maruyama", **kw), 2 * steps + 1
    elif method == "sscs":
        z, nfe = samplers.sscs(sde, sgm, full, steps, **kw), steps
    else:
        raise ValueError(f"sample_latent: method must be ode, em, pc or sscs, got {method!r}")
    return sde.project(z), nfe


@torch.no_grad()
def sample_images(models, sde: SDE, n: int, *, method: str = "ode", use_mean: bool = True,
                  generator: torch.Generator | None = None, **kw):
    """n images in [0, 1] from an LSGM: z0 from the score prior (`sample_latent`), the lower
    groups from N(0, I), decoded by the VAE (its mean image, or a draw with use_mean=False).
    Returns (images, nfe)."""
    vae, sgm = models["vae"], models["sgm"]
    device = next(vae.parameters()).device
    z0, nfe = sample_latent(sgm, sde, n, vae.config.top_latent_shape, method=method,
                            generator=generator, device=device, **kw)
    logits = vae.decode(z0, generator)
    images = vae.decoder_mean(logits) if use_mean else vae.sample_images(logits, generator)
    return images, nfe


# --- likelihood ----------------------------------------------------------------------------------


def top_kl_per_channel(vae: NVAE, x: torch.Tensor, generator=None) -> torch.Tensor:
    """KL(q(z0 | x) || N(0, I)) of each channel of the top latent z0 (summed over its pixels),
    one-sample estimate log q - log N at z0 ~ q(z0 | x), [B, C] (LSGM `infer_active_variables`)."""
    out = vae(x, generator)
    top = vae.groups_per_scale[0]
    log_normal = [log_standard_normal(e).sum(dim=(2, 3)) for e in out.eps[:top]]
    return torch.cat([q - n for q, n in zip(out.log_q_per_channel[:top], log_normal)], dim=1)


@torch.no_grad()
def active_channels(vae: NVAE, batches, threshold: float = 0.1, generator=None) -> torch.Tensor:
    """LSGM's active latent variables: the top-latent channels whose KL from N(0, I), averaged
    over the images of `batches` (an iterable of [B, C, H, W] in [0, 1]), exceeds `threshold`
    nats; bool [C]. The rest carry no information: the score prior leaves them N(0, I)
    (`MixedScore.set_active`)."""
    total, count = None, 0
    with EvalMode(vae):
        for x in batches:
            kl = top_kl_per_channel(vae, x, generator).double().sum(0)
            total = kl if total is None else total + kl
            count += x.shape[0]
    if count == 0:
        raise ValueError("active_channels: `batches` gave no images")
    return total / count > threshold


class NLLBound(NamedTuple):
    """Per-sample terms [B] (nats) of LSGM's bound -log p(x) <= recon + log q - log p(z0)."""

    nll: torch.Tensor
    reconstruction: torch.Tensor
    log_q: torch.Tensor
    log_p: torch.Tensor  # log p(z0): the score prior by the PF-ODE (+ N(0, I) of lower groups)
    nfe: int  # score evaluations of the ODE solve (0 for the VAE alone)


NLL_ESTIMATORS = ("ode", "cross_entropy")


@torch.no_grad()
def nll_bound(models, sde: SDE | None, x: torch.Tensor, *, ode_eps: float = 1e-5,
              tol: float = 1e-5, generator: torch.Generator | None = None,
              estimator: str = "ode", t_sampler=None, draws: int = 16,
              exact_divergence: bool = False) -> NLLBound:
    """LSGM's single-sample NLL bound for images x in [0, 1] (its evaluation protocol): z ~ q(z | x)
    once, log p(z0) of the top latent, lower groups under N(0, I). With models lacking "sgm"
    (or sde None) it is the VAE's own NELBO, recon + Σ KL.

    estimator "ode": log p(z0) by the probability-flow ODE from ode_eps to 1 (dopri5 at
    rtol = atol = tol, one Gaussian Hutchinson probe as LSGM App. F, or the exact divergence
    for small latents), nfe = its evaluations; a phase-space prior gives the bound
    log p(z0, m) + H(r(m)) with one m from the kernel's momentum marginal at ode_eps given z0
    (`likelihood.data_log_likelihood` with momentum_at_eps).
    estimator "cross_entropy": -log p(z0) <= the denoising cross-entropy `cross_entropy_at`
    (eq. 8), averaged over `draws` draws of (t ~ t_sampler, ε): the training objective's bound,
    an upper bound on -log p_SDE(z0) in expectation; nfe = draws."""
    from lsgm_edu.likelihood import data_log_likelihood

    _check_nll_args(estimator, t_sampler, draws)
    vae = models["vae"]
    out = vae(x, generator)
    recon = vae.reconstruction_loss(out, x)
    log_q = torch.stack(out.log_q).sum(0)
    if "sgm" not in models or sde is None:
        log_p = log_q - torch.stack(out.kl).sum(0)
        return NLLBound(recon + log_q - log_p, recon, log_q, log_p, 0)
    top = vae.groups_per_scale[0]
    z0 = vae.top_latent(out.eps[:top])
    if estimator == "ode":
        with torch.enable_grad():
            res = data_log_likelihood(sde, models["sgm"], z0, exact_divergence=exact_divergence,
                                      rtol=tol, atol=tol, eps=ode_eps, probe="gaussian",
                                      generator=generator, momentum_at_eps=True)
        log_p_top, nfe = res.logp, int(res.nfe)
    else:
        eps_fn = eps_of(models["sgm"], sde)
        log_p_top = -sum(cross_entropy_at(sde, eps_fn, z0, t_sampler, generator)
                         for _ in range(draws)) / draws
        nfe = draws
    log_p = log_p_top.to(recon.dtype) - normal_cross_entropy(out.eps[top:]).to(recon.dtype)
    return NLLBound(recon + log_q - log_p, recon, log_q, log_p, nfe)


@torch.no_grad()
def iw_bound(models, sde: SDE | None, x: torch.Tensor, k: int, **bound_kwargs) -> torch.Tensor:
    """The importance-weighted bound [B] (nats) with k posterior samples per image (Burda et al.
    2016, eq. 8): -log p(x) <= -log (1/k) Σ_j exp(-nelbo_j), nelbo_j = recon + log q - log p(z_j)
    of `nll_bound` (same keywords; one solve over all k B latents). k = 1 is `nll_bound`. A noisy
    log p(z_j) (Hutchinson, or the cross-entropy estimator) biases the log-sum-exp low: use
    exact_divergence=True where the latent is small."""
    check_int("iw_bound", "k", k, 1)
    terms = nll_bound(models, sde, x.repeat(k, *([1] * (x.ndim - 1))), **bound_kwargs)
    log_w = -terms.nll.reshape(k, len(x))
    return math.log(k) - torch.logsumexp(log_w, 0)


def _check_nll_args(estimator, t_sampler, draws) -> None:
    if estimator not in NLL_ESTIMATORS:
        raise ValueError(f"nll_bound: estimator must be one of {NLL_ESTIMATORS}, got "
                         f"{estimator!r}")
    if estimator == "cross_entropy" and t_sampler is None:
        raise ValueError("nll_bound: estimator 'cross_entropy' needs t_sampler "
                         "(losses.time_sampler('ll_iw', sde, time_eps))")
    check_int("nll_bound", "draws", draws, 1)

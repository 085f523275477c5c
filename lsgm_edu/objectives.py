"""Training objectives: `objective(models, batch, generator) -> (loss [B], logs)`.

An objective is an object with a `__call__` over *named* models (a dict, e.g. {"score": net};
LSGM adds "vae") that returns the per-sample loss [B] of this process's part of the batch and
a dict of per-sample or scalar tensors to log. `lsgm_edu.train.train` is the one loop around
it: it reduces the loss, steps one optimizer per model and keeps the EMAs, checkpoints, logs.

Randomness comes through a `BatchGenerator`: every draw is made for the *global* batch from a
generator seeded by (seed, step) and each process keeps its slice, so N processes compute
what one process computes and a resumed run draws what the uninterrupted one drew.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lsgm_edu.losses import (
    LikelihoodImportanceSampler,
    LikelihoodWeighting,
    SigmaSquaredWeighting,
    UniformTimeSampler,
    denoising_score_matching,
)
from lsgm_edu.nets.precond import ScoreModel
from lsgm_edu.utils import append_dims

__all__ = ["DSM", "Batch", "BatchGenerator", "LSGMObjective", "VAEObjective"]


@dataclass
class Batch:
    """This process's slice of a training batch: data in model space, labels (or None), and the
    training step it belongs to (for schedules such as KL warm-up)."""

    x: torch.Tensor
    y: torch.Tensor | None = None
    step: int = 0


class BatchGenerator:
    """Random numbers for one step's global batch; returns this process's rows.

    `draw(fn)` calls `fn(global_size, generator)` and keeps rows `rank_slice`, moved to
    `device`. With one process (`rank_slice=None`) it is a plain generator of batch size
    `global_size`.
    """

    def __init__(self, generator: torch.Generator, global_size: int,
                 rank_slice: slice | None = None, device=None):
        self.generator, self.global_size = generator, global_size
        self.rank_slice = rank_slice if rank_slice is not None else slice(None)
        self.device = device

    def draw(self, fn: Callable[[int, torch.Generator], torch.Tensor]) -> torch.Tensor:
        return fn(self.global_size, self.generator)[self.rank_slice].to(self.device)

    def randn(self, *shape: int, dtype=torch.float32) -> torch.Tensor:
        """N(0, I) of shape [b, *shape] (b = this process's rows)."""
        return self.draw(lambda n, g: torch.randn((n, *shape), generator=g, dtype=dtype))

    def rand(self, *shape: int, dtype=torch.float32) -> torch.Tensor:
        """U[0, 1) of shape [b, *shape]."""
        return self.draw(lambda n, g: torch.rand((n, *shape), generator=g, dtype=dtype))

    def randn_rows(self, shape: tuple[int, ...], dtype=None) -> torch.Tensor:
        """N(0, I) of exactly `shape` = [b, ...] (b = this process's rows), so code that draws
        with `lsgm_edu.utils.randn(shape, generator)` (e.g. the VAE's posterior samples) takes
        this process's slice of a global draw."""
        z = self.randn(*shape[1:], dtype=dtype or torch.float32)
        if z.shape[0] != shape[0]:
            raise ValueError(f"BatchGenerator: asked for {shape[0]} rows, this process holds "
                             f"{z.shape[0]} of the global batch {self.global_size}")
        return z


class DSM:
    """Continuous-time denoising score matching (Song et al. 2021, eq. 7) of model `"score"`.

    Per sample 1/2 λ(t) |s(z_t, t) - ∇log p_0t(z_t | x0)|² with s = `ScoreModel(net, sde,
    centered, mixed_score=...)` (ε-parameterization); t from `t_sampler`, weighted by 1/q(t)
    when `importance_weight`; with `reduce_mean` divided by the number of predicted noise
    elements (score_sde's `reduce_mean`, PSLD's mean over all elements). In phase space the
    kernel is the hybrid one of HSM (`hsm=True`) or DSM's with m0 drawn by `sde.lift`.
    """

    def __init__(self, sde, *, weighting=None, t_sampler=None, importance_weight: bool = False,
                 reduce_mean: bool = False, centered: bool = True, model: str = "score",
                 hsm: bool = True, mixed_score: bool = False):
        self.sde, self.centered, self.model = sde, centered, model
        self.hsm, self.mixed_score = hsm, mixed_score
        self.weighting = weighting if weighting is not None else SigmaSquaredWeighting()
        self.t_sampler = t_sampler if t_sampler is not None else UniformTimeSampler(1e-5, sde.T)
        self.importance_weight, self.reduce_mean = importance_weight, reduce_mean
        self.models = (model,)

    @classmethod
    def from_config(cls, cfg, sde) -> DSM:
        """The objective of `cfg.train` (likelihood weighting, importance sampling, eps, HSM;
        an ε-loss on the momentum alone for a network with a momentum head)."""
        tc = cfg.train
        t_sampler = (LikelihoodImportanceSampler(sde, eps=tc.eps) if tc.importance_sampling
                     else UniformTimeSampler(eps=tc.eps, T=sde.T))
        momentum_head = sde.K == 2 and cfg.model.out_channels * 2 == cfg.model.num_channels
        weighting = (LikelihoodWeighting() if tc.likelihood_weighting
                     else SigmaSquaredWeighting((1,) if momentum_head else None))
        return cls(sde, weighting=weighting, t_sampler=t_sampler,
                   importance_weight=tc.importance_sampling, reduce_mean=tc.reduce_mean,
                   centered=cfg.data.centered, hsm=tc.hsm, mixed_score=tc.mixed_score)

    def loss(self, score_model, x0, t, z, y=None, m0=None) -> torch.Tensor:
        """The per-sample loss [B] at given times t, noise z and (DSM) momentum m0 (float32)."""
        per_sample = denoising_score_matching(lambda x, tt: score_model(x, tt, y), self.sde, x0,
                                              t, self.weighting, noise=z, m0=m0).float()
        if self.importance_weight:
            per_sample = per_sample * self.t_sampler.weight(t)
        if self.reduce_mean:
            components = getattr(self.weighting, "components", None)
            per_sample = per_sample / (x0[0].numel() * len(components or range(self.sde.K)))
        return per_sample

    def __call__(self, models: dict, batch: Batch, generator: BatchGenerator):
        t = generator.draw(lambda n, g: self.t_sampler.sample(n, g, dtype=torch.float32))
        z = generator.randn(*self.sde.state_shape(batch.x.shape)[1:])  # noise on the state
        m0 = None
        if not self.hsm and self.sde.K > 1:  # DSM: z0 = (x0, m0) with m0 drawn from the lift
            noise = generator.randn(*self.sde.state_shape(batch.x.shape)[1:])
            m0 = self.sde.lift(batch.x, noise=noise)[:, batch.x.shape[1]:]
        score_model = ScoreModel(models[self.model], self.sde, centered=self.centered,
                                 mixed_score=self.mixed_score)
        return self.loss(score_model, batch.x, t, z, batch.y, m0), {}


class VAEObjective:
    """NVAE pre-training, LSGM's first stage (Vahdat & Kautz 2020, eq. 1 and App. A).

    Per sample: recon + β(step) Σ_j γ_j KL_j + λ SR, with the KL warm-up β of
    `lsgm_edu.vae.kl_coeff` over `total_steps`, KL balancing γ while β < 1 (`kl_balancer`) and
    λ times the spectral regularization (`NVAE.spectral_regularization`, one value per batch).
    Logs the unweighted NELBO = recon + Σ KL (nats per image), its parts and β.
    """

    def __init__(self, *, total_steps: int, kl_anneal_portion: float = 0.3,
                 kl_const_portion: float = 1e-4, kl_const_coeff: float = 1e-4,
                 kl_max_coeff: float = 1.0, kl_balance: bool = True,
                 weight_decay_norm: float = 1e-2, model: str = "vae"):
        self.total_steps, self.model, self.models = total_steps, model, (model,)
        self.anneal, self.const = kl_anneal_portion * total_steps, kl_const_portion * total_steps
        self.min_coeff, self.max_coeff = kl_const_coeff, kl_max_coeff
        self.kl_balance, self.weight_decay_norm = kl_balance, weight_decay_norm

    @classmethod
    def from_config(cls, cfg) -> VAEObjective:
        lc = cfg.lsgm
        return cls(total_steps=cfg.train.n_iters, kl_anneal_portion=lc.kl_anneal_portion,
                   kl_const_portion=lc.kl_const_portion, kl_const_coeff=lc.kl_const_coeff,
                   kl_max_coeff=lc.kl_max_coeff, kl_balance=lc.kl_balance,
                   weight_decay_norm=lc.weight_decay_norm_vae)

    def kl_coefficient(self, step: int) -> float:
        from lsgm_edu.vae import kl_coeff

        return kl_coeff(step, max(self.anneal, 1.0), self.const, self.min_coeff, self.max_coeff)

    def __call__(self, models: dict, batch: Batch, generator: BatchGenerator):
        from lsgm_edu.vae import kl_balancer, kl_balancer_coeff

        vae = models[self.model]
        raw = getattr(vae, "module", vae)  # under DDP, the NVAE's own methods
        out = vae(batch.x, generator)
        recon = raw.reconstruction_loss(out, batch.x)
        beta = self.kl_coefficient(batch.step)
        alpha = kl_balancer_coeff(raw.groups_per_scale).to(batch.x.device)
        kl, _, _ = kl_balancer(out.kl, beta, balance=self.kl_balance, alpha=alpha)
        loss = recon + kl
        if self.weight_decay_norm > 0:
            loss = loss + self.weight_decay_norm * raw.spectral_regularization()
        kl_sum = torch.stack(out.kl).sum(0)
        logs = {"nelbo": recon + kl_sum, "recon": recon, "kl": kl_sum, "kl_coeff": beta}
        return loss.float(), logs


class LSGMObjective:
    """LSGM's end-to-end step (Vahdat, Kreis & Kautz 2021, Alg. 3 "reweight_p_samples" and the
    joint variant with a separate t for the VAE): per-model losses {"vae": q, "sgm": p}.

    One posterior sample z0 (the VAE's top latent), t ~ the SGM's sampler, z_t = m_t z0 + σ_t ε:
      p = weight(t) λ_p(t) |ε̂(z_t, t) - ε|²  (+ λ_sgm Σ max|γ|): the SGM's objective,
      q = recon + β(step) (log q + CE) (+ λ_vae SR): the VAE's, with the cross-entropy
          CE = weight(t) g²/(2σ²) |ε̂ - ε|² + D/2 (1 + log 2π σ²_eps) on the top latent (same t
          and ε: "reweight_p_samples"; or a fresh t from `q_sampler`, same ε, as the reference)
          plus -log N(ε_j; 0, I) of the lower groups.
    A phase-space prior (CLD, PSLD: any SDE of the engine) diffuses the lifted state (z0, m0) by
    its HSM kernel; λ_p and g²/(2σ²) become K x K blocks (`lsgm.p_weight`) and t is uniform.
    The trainer descends each model's own loss (gradients of p never reach the VAE). Logs the
    NELBO (β = 1) per image in nats.

    disjoint (the reference's --disjoint_training, its Algorithm 2, used for CelebA-HQ): the VAE's
    cross-entropy takes its own t ~ `q_sampler` and ε, and the SGM learns on the detached z0 with
    independent t and ε.
    """

    def __init__(self, sde, *, iw_sample_p: str = "drop_all_iw",
                 iw_sample_q: str = "reweight_p_samples", time_eps: float = 0.01,
                 total_steps: int = 1, kl_anneal: bool = True, kl_anneal_portion: float = 0.1,
                 kl_const_coeff: float = 0.7, weight_decay_norm_vae: float = 0.0,
                 weight_decay_norm_sgm: float = 0.0, disjoint: bool = False):
        from lsgm_edu.losses import time_sampler
        from lsgm_edu.lsgm import P_WEIGHTINGS, takes_time_samplers

        if iw_sample_p not in P_WEIGHTINGS:
            raise ValueError(f"LSGMObjective: iw_sample_p must be one of {', '.join(P_WEIGHTINGS)}"
                             f", got {iw_sample_p!r}")
        if iw_sample_q not in ("reweight_p_samples", "ll_uniform", "ll_iw"):
            raise ValueError(f"LSGMObjective: iw_sample_q must be reweight_p_samples, ll_uniform "
                             f"or ll_iw, got {iw_sample_q!r}")
        if disjoint and iw_sample_q == "reweight_p_samples":
            raise ValueError("LSGMObjective: disjoint training draws the VAE's own t: "
                             "iw_sample_q must be ll_uniform or ll_iw")
        sampler_name, self.p_kind = P_WEIGHTINGS[iw_sample_p]
        if not takes_time_samplers(sde, iw_sample_p, iw_sample_q):
            raise ValueError(f"LSGMObjective: the importance samplers of t are derived for a "
                             f"VP-type SDE; {sde!r} takes uniform t "
                             f"(iw_sample_p *_uniform, iw_sample_q reweight_p_samples or "
                             f"ll_uniform), got {iw_sample_p} / {iw_sample_q}")
        self.disjoint = disjoint
        self.sde, self.time_eps = sde, time_eps
        self.p_sampler = time_sampler(sampler_name, sde, time_eps)
        self.q_sampler = (None if iw_sample_q == "reweight_p_samples"
                          else time_sampler(P_WEIGHTINGS[iw_sample_q][0], sde, time_eps))
        self.total_steps, self.kl_anneal = total_steps, kl_anneal
        self.kl_anneal_portion, self.kl_const_coeff = kl_anneal_portion, kl_const_coeff
        self.weight_decay_norm_vae = weight_decay_norm_vae
        self.weight_decay_norm_sgm = weight_decay_norm_sgm
        self.models = ("vae", "sgm")

    @classmethod
    def from_config(cls, cfg, sde) -> LSGMObjective:
        lc = cfg.lsgm
        return cls(sde, iw_sample_p=lc.iw_sample_p, iw_sample_q=lc.iw_sample_q,
                   time_eps=lc.time_eps, total_steps=cfg.train.n_iters,
                   kl_anneal=lc.kl_anneal_lsgm, kl_anneal_portion=lc.kl_anneal_portion_lsgm,
                   kl_const_coeff=lc.kl_const_coeff_lsgm,
                   # a frozen VAE (train_vae false) runs no power iterations of its norms
                   weight_decay_norm_vae=lc.weight_decay_norm_vae if lc.train_vae else 0.0,
                   weight_decay_norm_sgm=lc.weight_decay_norm_sgm,
                   disjoint=lc.disjoint_training)

    def kl_coefficient(self, step: int) -> float:
        """β: kl_const_coeff rising linearly to 1 over kl_anneal_portion of training, else 1."""
        if not self.kl_anneal:
            return 1.0
        from lsgm_edu.vae import kl_coeff

        return kl_coeff(step, max(self.kl_anneal_portion * self.total_steps, 1.0), 0.0,
                        self.kl_const_coeff, 1.0)

    def __call__(self, models: dict, batch: Batch, generator: BatchGenerator):
        from lsgm_edu import lsgm

        vae, sgm = models["vae"], models["sgm"]
        raw_vae, raw_sgm = getattr(vae, "module", vae), getattr(sgm, "module", sgm)
        out = vae(batch.x, generator)
        top = raw_vae.groups_per_scale[0]
        z0 = raw_vae.top_latent(out.eps)
        t = generator.draw(lambda n, g: self.p_sampler.sample(n, g, dtype=torch.float64))
        noise = generator.randn(*self.sde.state_shape(z0.shape)[1:], dtype=z0.dtype)
        eps_fn = lsgm.eps_of(sgm, self.sde)
        sampler_q = self.q_sampler or self.p_sampler
        t_q = t if self.q_sampler is None else generator.draw(
            lambda n, g: sampler_q.sample(n, g, dtype=torch.float64))
        noise_q = (generator.randn(*noise.shape[1:], dtype=z0.dtype) if self.disjoint
                   else noise)
        # joint: the SGM and the VAE share ε (and t with "reweight_p_samples"); disjoint: not
        error = lsgm.denoising_error(self.sde, eps_fn, z0.detach() if self.disjoint else z0,
                                     t, noise)
        p_weight = lsgm.p_weight(self.p_kind, self.sde, t)
        p_weight = p_weight * append_dims(self.p_sampler.weight(t), p_weight.ndim)
        p_loss = lsgm.weighted_error(p_weight.float(), error)
        error_q = error if self.q_sampler is None else lsgm.denoising_error(
            self.sde, eps_fn, z0, t_q, noise_q)
        ce = (lsgm.cross_entropy_from_error(self.sde, sampler_q, t_q, error_q, z0[0].numel())
              + lsgm.normal_cross_entropy(out.eps[top:]))  # lower scales keep N(0, I)
        recon = raw_vae.reconstruction_loss(out, batch.x).float()
        kl = torch.stack(out.log_q).float().sum(0) + ce
        beta = self.kl_coefficient(batch.step)
        q_loss = recon + beta * kl
        if self.weight_decay_norm_vae > 0:
            q_loss = q_loss + self.weight_decay_norm_vae * raw_vae.spectral_regularization()
        if self.weight_decay_norm_sgm > 0:
            p_loss = p_loss + self.weight_decay_norm_sgm * lsgm.norm_regularization(raw_sgm)
        logs = {"nelbo": recon + kl, "recon": recon, "kl": kl, "p_loss": p_loss,
                "kl_coeff": beta, "alpha": raw_sgm.alpha.mean()}
        return {"vae": q_loss, "sgm": p_loss}, logs

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

__all__ = ["DSM", "Batch", "BatchGenerator"]


@dataclass
class Batch:
    """This process's slice of a training batch: data in model space and labels (or None)."""

    x: torch.Tensor
    y: torch.Tensor | None = None


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


class DSM:
    """Continuous-time denoising score matching (Song et al. 2021, eq. 7) of model `"score"`.

    Per sample 1/2 λ(t) |s(x_t, t) + z/σ_t|² with s = `ScoreModel(net, sde, centered)`
    (ε-parameterization); t from `t_sampler`, weighted by 1/q(t) when `importance_weight`; with
    `reduce_mean` divided by the number of dimensions (score_sde's `reduce_mean`).
    """

    def __init__(self, sde, *, weighting=None, t_sampler=None, importance_weight: bool = False,
                 reduce_mean: bool = False, centered: bool = True, model: str = "score"):
        self.sde, self.centered, self.model = sde, centered, model
        self.weighting = weighting if weighting is not None else SigmaSquaredWeighting()
        self.t_sampler = t_sampler if t_sampler is not None else UniformTimeSampler(1e-5, sde.T)
        self.importance_weight, self.reduce_mean = importance_weight, reduce_mean
        self.models = (model,)

    @classmethod
    def from_config(cls, cfg, sde) -> DSM:
        """The objective of `cfg.train` (likelihood weighting, importance sampling, eps)."""
        tc = cfg.train
        t_sampler = (LikelihoodImportanceSampler(sde, eps=tc.eps) if tc.importance_sampling
                     else UniformTimeSampler(eps=tc.eps, T=sde.T))
        weighting = LikelihoodWeighting() if tc.likelihood_weighting else SigmaSquaredWeighting()
        return cls(sde, weighting=weighting, t_sampler=t_sampler,
                   importance_weight=tc.importance_sampling, reduce_mean=tc.reduce_mean,
                   centered=cfg.data.centered)

    def loss(self, score_model, x0, t, z, y=None) -> torch.Tensor:
        """The per-sample loss [B] at given times t and noise z (float32)."""
        per_sample = denoising_score_matching(lambda x, tt: score_model(x, tt, y), self.sde, x0,
                                              t, self.weighting, noise=z).float()
        if self.importance_weight:
            per_sample = per_sample * self.t_sampler.weight(t)
        if self.reduce_mean:
            per_sample = per_sample / x0[0].numel()
        return per_sample

    def __call__(self, models: dict, batch: Batch, generator: BatchGenerator):
        t = generator.draw(lambda n, g: self.t_sampler.sample(n, g, dtype=torch.float32))
        z = generator.randn(*self.sde.state_shape(batch.x.shape)[1:])  # noise on the state
        score_model = ScoreModel(models[self.model], self.sde, centered=self.centered)
        return self.loss(score_model, batch.x, t, z, batch.y), {}

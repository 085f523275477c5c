"""The small training loop of the book's 2-D chapters: Adam on fresh samples at every step.

Toy data cost nothing to draw, so each step sees a new minibatch from the data distribution
(no epochs, no dataset); the objective is any per-sample loss. The full trainer for images
(EMA, checkpoints, DDP, mixed precision) is `lsgm_edu.train`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import trange

__all__ = ["train_toy_score_model"]

SCHEDULES = ("cosine", "constant")


def train_toy_score_model(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Generator | None], torch.Tensor],
    sample_batch: Callable[[int, torch.Generator | None], torch.Tensor],
    steps: int,
    *,
    batch_size: int = 256,
    lr: float = 2e-3,
    schedule: str = "cosine",
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> tuple[nn.Module, torch.Tensor]:
    """Train `model` for `steps` Adam steps on fresh minibatches; returns (model in eval mode,
    minibatch losses [steps]).

    Each step draws x = sample_batch(batch_size, generator), takes the mean of the per-sample
    loss_fn(model, x, generator) [B] and steps Adam (Kingma & Ba 2015) with learning rate `lr`,
    decayed to 0 along a half cosine (Loshchilov & Hutter 2017) or held (`"constant"`). All
    randomness comes from `generator`: with a seeded one the run is reproducible.
    """
    fn = "train_toy_score_model"
    if not isinstance(model, nn.Module) or not any(p.requires_grad for p in model.parameters()):
        raise TypeError(f"{fn}: model must be an nn.Module with trainable parameters")
    for name, f in (("loss_fn", loss_fn), ("sample_batch", sample_batch)):
        if not callable(f):
            raise TypeError(f"{fn}: {name} must be callable, got {type(f).__name__}")
    for name, v in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{fn}: {name} must be an int >= 1, got {v!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"{fn}: lr must be a positive finite number, got {lr!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"{fn}: schedule must be one of {SCHEDULES}, got {schedule!r}")

    opt = torch.optim.Adam(model.parameters(), lr=lr)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if schedule == "cosine" else None
    losses = torch.empty(steps)
    model.train()
    bar = trange(steps, disable=not progress, desc="training")
    for step in bar:
        loss = loss_fn(model, sample_batch(batch_size, generator), generator)
        if not isinstance(loss, torch.Tensor) or loss.shape != (batch_size,):
            raise ValueError(
                f"{fn}: loss_fn must return per-sample losses of shape ({batch_size},), got "
                f"{getattr(loss, 'shape', type(loss).__name__)}; the loop takes the mean"
            )
        loss = loss.mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{fn}: loss is {loss.item()} at step {step}; lower lr?")
        opt.zero_grad()
        loss.backward()
        opt.step()
        if decay is not None:
            decay.step()
        losses[step] = loss.item()
        if step % 50 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{losses[step]:.4g}")
    return model.eval(), losses

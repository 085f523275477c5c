"""Small helpers shared by every module: broadcasting (over samples and over the phase axis),
noise drawn from generators, and the book's run mode."""

from __future__ import annotations

import os

import torch

FAST_ENV = "LSGM_EDU_FAST"


def append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """Append trailing singleton dims so a per-sample `v` of shape [B] broadcasts against [B, ...]."""
    if v.ndim > ndim:
        raise ValueError(f"append_dims: tensor has {v.ndim} dims, more than the target {ndim}")
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def phase_apply(M: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """M z over the phase axis: a per-sample scalar M [B] scales z; a block M [B, K, K] mixes the
    K phase components of z [B, K * C, ...] (z = (x, m) stacked along dim 1 for K = 2).

    The one broadcasting helper of the SDE engine: K = 1 is the `append_dims` path.
    """
    M = M.to(z.dtype)
    if M.ndim == 1:
        return append_dims(M, z.ndim) * z
    return (M @ z.reshape(z.shape[0], M.shape[-1], -1)).reshape(z.shape)


def phase_outer(G: torch.Tensor) -> torch.Tensor:
    """G G^T: g^2 [B] for a scalar diffusion, G @ G^T [B, K, K] for a block one."""
    return G.pow(2) if G.ndim == 1 else G @ G.mT


def phase_block(M: torch.Tensor) -> torch.Tensor:
    """M as a [B, K, K] block: a scalar [B] becomes [B, 1, 1]."""
    return M.reshape(-1, 1, 1) if M.ndim == 1 else M


def psd_sqrt(M: torch.Tensor) -> torch.Tensor:
    """The symmetric square root R = R^T of a PSD matrix (or a batch [..., K, K]), R R^T = M:
    diag(sqrt d) for a diagonal one. Eigenvalues rounded below 0 count as 0."""
    w, V = torch.linalg.eigh(M)
    return (V * w.clamp_min(0).sqrt()[..., None, :]) @ V.mT


def is_fast_mode() -> bool:
    """True when `LSGM_EDU_FAST=1` (set by the tests): chapters shrink every loop."""
    return os.environ.get(FAST_ENV, "0").strip().lower() in {"1", "true", "yes"}


def fast_or(full, fast):
    """Return `fast` in fast mode and `full` otherwise (loop sizes, sample counts)."""
    return fast if is_fast_mode() else full


class PerSampleGenerators:
    """One `torch.Generator` per sample: row i of every draw comes from generator i.

    Pass it wherever a function takes `generator=`: the samples then depend on each row's
    seed only, not on how the rows are batched (a sample seeded by (seed, i) is the same in a
    batch of 7 and in a batch of 16). Costs one small draw per row.
    """

    def __init__(self, generators):
        self.generators = list(generators)
        if not self.generators or not all(isinstance(g, torch.Generator) for g in self.generators):
            raise TypeError("PerSampleGenerators: give a non-empty sequence of torch.Generator")
        devices = {g.device for g in self.generators}
        if len(devices) != 1:
            raise ValueError(f"PerSampleGenerators: generators on several devices {devices}")
        self.device = devices.pop()

    @classmethod
    def seeded(cls, seeds, device="cpu") -> PerSampleGenerators:
        """Generators seeded by the ints `seeds`, one per sample."""
        return cls(torch.Generator(device=device).manual_seed(int(s)) for s in seeds)

    def __len__(self) -> int:
        return len(self.generators)


def randn(shape, generator=None, *, device=None, dtype=None) -> torch.Tensor:
    """Standard normal draws of `shape` from `generator`: a torch.Generator, None (global RNG),
    `PerSampleGenerators` (row i from generator i), or a trainer's `BatchGenerator` (this
    process's rows of a draw for the global batch). Device defaults to the generator's."""
    if hasattr(generator, "randn_rows"):
        return generator.randn_rows(tuple(shape), dtype=dtype).to(device)
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    if not isinstance(generator, PerSampleGenerators):
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    shape = tuple(shape)
    if not shape or shape[0] != len(generator):
        raise ValueError(
            f"randn: {len(generator)} per-sample generators cannot draw a batch of shape {shape}"
        )
    rows = [torch.randn(shape[1:], generator=g, device=device, dtype=dtype)
            for g in generator.generators]
    return torch.stack(rows)


def randn_like(x: torch.Tensor, generator=None) -> torch.Tensor:
    """`randn` with the shape, device and dtype of x."""
    return randn(x.shape, generator, device=x.device, dtype=x.dtype)


class EvalMode:
    """Run a model in eval mode (batch norm on running statistics), restoring its mode after."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.was_training = model, model.training

    def __enter__(self):
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)

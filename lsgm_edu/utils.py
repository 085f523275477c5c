"""Small helpers shared by every module: broadcasting and the book's run mode."""

from __future__ import annotations

import os

import torch

FAST_ENV = "LSGM_EDU_FAST"


def append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """Append trailing singleton dims so a per-sample `v` of shape [B] broadcasts against [B, ...]."""
    if v.ndim > ndim:
        raise ValueError(f"append_dims: tensor has {v.ndim} dims, more than the target {ndim}")
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def is_fast_mode() -> bool:
    """True when `LSGM_EDU_FAST=1` (set by the tests): chapters shrink every loop."""
    return os.environ.get(FAST_ENV, "0").strip().lower() in {"1", "true", "yes"}


def fast_or(full, fast):
    """Return `fast` in fast mode and `full` otherwise (loop sizes, sample counts)."""
    return fast if is_fast_mode() else full

"""Argument checks shared by the package, so that the functions a chapter shows read as the
algorithm: one line `check_...(...)` at the top, the maths below.

Each check raises a `ValueError` (or `TypeError`) that names the function, the argument and
the fix, and returns the value converted where that helps (ints, floats, shapes, times).
"""

from __future__ import annotations

import math
from numbers import Integral

import torch

__all__ = [
    "check_callable",
    "check_float",
    "check_int",
    "check_interval_eps",
    "check_like",
    "check_shape",
    "check_tensor",
    "check_time",
]


def check_int(fn: str, name: str, v, low: int = 0) -> int:
    """An integer >= low (a Python or NumPy int; bools refused), returned as an int."""
    if isinstance(v, bool) or not isinstance(v, Integral) or v < low:
        raise ValueError(f"{fn}: {name} must be an int >= {low}, got {v!r}")
    return int(v)


def check_float(fn: str, name: str, v, *, positive: bool = False, low=None, high=None) -> float:
    """A finite real number (a one-element tensor is accepted), > 0 if `positive`, in [low, high)."""
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{fn}: {name} must be a finite number, got {v!r}")  # noqa: TRY004
    if positive and not (math.isfinite(v) and v > 0):
        raise ValueError(f"{fn}: {name} must be finite and > 0, got {v!r}")
    if not math.isfinite(v):
        raise ValueError(f"{fn}: {name} must be a finite number, got {v!r}")
    if (low is not None and v < low) or (high is not None and v >= high):
        raise ValueError(f"{fn}: {name} must lie in [{low}, {high}), got {v!r}")
    return float(v)


def check_tensor(fn: str, name: str, x, min_ndim: int = 1) -> torch.Tensor:
    """A floating-point tensor with at least `min_ndim` dims ([B, ...])."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < min_ndim:
        what = f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) \
            else type(x).__name__
        dims = "[B, ...]" if min_ndim <= 1 else "[B, ...] with a batch and a data dim"
        raise ValueError(f"{fn}: {name} must be a floating-point tensor {dims}, got {what}")
    return x


def check_time(fn: str, t, batch: int | None = None) -> torch.Tensor:
    """Times t: a floating-point tensor [B] (B = `batch` when given)."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise ValueError(
            f"{fn}: t must be a floating-point torch.Tensor of times (one per sample, shape [B]), "
            f"got {type(t).__name__}" + (f" of dtype {t.dtype}" if isinstance(t, torch.Tensor) else "")
        )
    if batch is not None and t.shape != (batch,):
        raise ValueError(
            f"{fn}: t must have shape [B] = [{batch}] (one time per sample), got "
            f"{tuple(t.shape)}; for a shared time use torch.full((B,), t)"
        )
    return t


def check_like(fn: str, what: str, s, x: torch.Tensor) -> torch.Tensor:
    """`s` (what a callable returned, or a given tensor) must be shaped like x."""
    if not isinstance(s, torch.Tensor) or s.shape != x.shape:
        shape = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
        raise ValueError(f"{fn}: {what} must be a tensor shaped like {tuple(x.shape)}, got {shape}")
    return s


def check_shape(fn: str, shape) -> tuple[int, ...]:
    """A non-empty sequence of ints >= 1, [B, ...]."""
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"{fn}: shape must be a sequence of ints [B, ...], got {shape!r}") from None
    if len(shape) < 1 or any(s < 1 for s in shape):
        raise ValueError(f"{fn}: shape must be a non-empty sequence of ints >= 1, got {shape}")
    return shape


def check_interval_eps(fn: str, eps, T: float) -> float:
    """The smallest time eps, in (0, T)."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < T:
        raise ValueError(f"{fn}: eps must be a float in (0, T) = (0, {T}), got {eps!r}")
    return float(eps)


def check_callable(fn: str, name: str, f, signature: str) -> None:
    if not callable(f):
        raise TypeError(f"{fn}: {name} must be callable as {signature}, got {f!r}")

"""Sample-quality metrics: sliced Wasserstein, FID / IS / KID, classifier-feature FID, bits/dim.

Protocol of the papers (Song et al. 2021, Tables 1 and 3): FID of 50,000 generated samples
against the statistics of the training set (CIFAR-10: the 50,000 training images; CelebA-HQ
256: all 30,000 images), with features of the TF Inception graph of 2015-12-05 applied to 8-bit
images. Here the features come from torch-fidelity's PyTorch port of that graph
(`InceptionFeatures`, local weights only, nothing is downloaded), so numbers agree with
TF-Inception numbers up to small differences (other float kernels and summation order, the
resize to 299x299 reimplemented in PyTorch); compare numbers computed one way. FID is biased
upwards at finite sample size (Chong & Forsyth 2020): use 50k samples to compare with the
tables. Generated images are streamed (`stream_sample_statistics`: a batch at a time into
running moments and Inception-score sums). KID (Bińkowski et al. 2018) needs feature samples,
not moments: saved reference statistics keep the features of a seeded random subset of the
reference images (`compute_reference_statistics(..., keep_features=K)`). For MNIST-size data,
Inception features mean little: `classifier_fid` uses the penultimate features of a small digit
classifier trained on the data (`lsgm_edu.nets.classifier`).
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .data import to_uint8
from .likelihood import bits_per_dim
from .nets.classifier import DigitClassifier, check_digit_images, classifier_input

__all__ = [
    "INCEPTION_WEIGHTS_FILENAME",
    "INCEPTION_WEIGHTS_URL",
    "ImageStats",
    "InceptionFeatures",
    "SampleStatistics",
    "classifier_accuracy",
    "classifier_features",
    "classifier_fid",
    "compute_reference_statistics",
    "extract_features",
    "fid_against_reference",
    "fid_from_features",
    "frechet_distance",
    "gaussian_statistics",
    "images_to_uint8",
    "inception_score",
    "kernel_inception_distance",
    "load_classifier",
    "nll_to_bits_per_dim",
    "save_classifier",
    "sliced_wasserstein",
    "sliced_wasserstein_ratio",
    "stream_sample_statistics",
]

# torch-fidelity's conversion of the TF graph inception-2015-12-05 (the FID/IS reference network)
INCEPTION_WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
    + INCEPTION_WEIGHTS_FILENAME
)
CLASSIFIER_KIND = "DigitClassifier"


def sliced_wasserstein(
    x: torch.Tensor,
    y: torch.Tensor,
    n_projections: int = 256,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sliced 2-Wasserstein distance between the empirical distributions of x and y ([N, D]).

    SW2(x, y)^2 = E_theta W2^2(theta . x, theta . y), theta uniform on the unit sphere, with
    the 1-D W2 computed exactly by sorting (Rabin et al. 2011; Bonneel et al. 2015) and E_theta
    a Monte Carlo mean over `n_projections` directions drawn from `generator`. Returns a scalar.
    """
    for name, v in (("x", x), ("y", y)):
        if not isinstance(v, torch.Tensor) or v.ndim != 2 or not v.is_floating_point():
            raise ValueError(f"sliced_wasserstein: {name} must be a float tensor [N, D]")
    if x.shape != y.shape:
        raise ValueError(
            f"sliced_wasserstein: x and y must have the same shape [N, D] (equal sample sizes "
            f"and dims), got {tuple(x.shape)} and {tuple(y.shape)}; subsample the larger set"
        )
    if x.shape[0] < 1:
        raise ValueError("sliced_wasserstein: x and y must hold at least one point")
    if isinstance(n_projections, bool) or not isinstance(n_projections, int) or n_projections < 1:
        raise ValueError(
            f"sliced_wasserstein: n_projections must be an int >= 1, got {n_projections!r}"
        )
    dtype = torch.promote_types(x.dtype, y.dtype)
    x, y = x.to(dtype), y.to(device=x.device, dtype=dtype)
    theta = torch.randn(
        x.shape[1], n_projections, generator=generator, device=x.device, dtype=dtype
    )
    theta = theta / theta.norm(dim=0, keepdim=True)
    px, _ = torch.sort(x @ theta, dim=0)
    py, _ = torch.sort(y @ theta, dim=0)
    return (px - py).pow(2).mean().sqrt()


# ----------------------------------------------------------------------------------------------
# Fréchet distance between Gaussians


def _as_float64(fn: str, name: str, v, ndim: int) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        v = v.detach().to("cpu", torch.float64).numpy()
    a = np.asarray(v, dtype=np.float64)
    if a.ndim != ndim:
        shape = "[D]" if ndim == 1 else "[D, D]" if name.startswith("sigma") else "[N, D]"
        raise ValueError(f"{fn}: {name} must have shape {shape}, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{fn}: {name} holds NaN or infinite values")
    return a


def _clean_eigenvalues(w: np.ndarray) -> np.ndarray:
    """Zero the eigenvalues of a PSD matrix that are rounding noise (|w| < D eps max w, as in
    a pseudo-inverse's cutoff): their square roots, ~1e-8, would otherwise add up in traces."""
    tol = w.shape[0] * np.finfo(np.float64).eps * max(float(w.max(initial=0.0)), 0.0)
    return np.where(w > tol, w, 0.0)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix by eigendecomposition."""
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(_clean_eigenvalues(w))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet (2-Wasserstein) distance^2 between N(mu1, sigma1) and N(mu2, sigma2), float64.

    d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}) (Dowson & Landau 1982), the FID of
    Heusel et al. 2017 when the Gaussians are fitted to Inception features. Tr (S1 S2)^{1/2} = Tr (S1^{1/2} S2 S1^{1/2})^{1/2}: S1 S2 is similar to this PSD
    matrix, so both square roots come from symmetric eigendecompositions, which stay accurate
    for singular covariances where scipy's sqrtm of the non-symmetric S1 S2 needs an eps offset.
    Arrays or tensors in; a Python float >= 0 out (rounding below 0 is clipped).
    """
    fn = "frechet_distance"
    mu1, mu2 = _as_float64(fn, "mu1", mu1, 1), _as_float64(fn, "mu2", mu2, 1)
    sigma1, sigma2 = _as_float64(fn, "sigma1", sigma1, 2), _as_float64(fn, "sigma2", sigma2, 2)
    d = mu1.shape[0]
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"{fn}: shapes must be mu [D], sigma [D, D] with one D, got mu1 {mu1.shape}, "
            f"sigma1 {sigma1.shape}, mu2 {mu2.shape}, sigma2 {sigma2.shape}"
        )
    sigma1, sigma2 = (sigma1 + sigma1.T) / 2, (sigma2 + sigma2.T) / 2
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    tr_covmean = np.sqrt(_clean_eigenvalues(eig)).sum()
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean
    return max(float(value), 0.0)


def gaussian_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] (divided by N - 1) of features [N, D], float64.

    The statistics FID compares (Heusel et al. 2017), as the TF and pytorch-fid code compute them
    (np.mean, np.cov with rowvar=False).
    """
    f = _as_float64("gaussian_statistics", "features", features, 2)
    if f.shape[0] < 2:
        raise ValueError(f"gaussian_statistics: need at least 2 feature rows, got {f.shape[0]}")
    mu = f.mean(axis=0)
    c = f - mu
    return mu, (c.T @ c) / (f.shape[0] - 1)


def fid_from_features(features1, features2) -> float:
    """FID = frechet_distance of the Gaussians fitted to two feature sets [N1, D], [N2, D]."""
    return frechet_distance(*gaussian_statistics(features1), *gaussian_statistics(features2))


# ----------------------------------------------------------------------------------------------
# Inception score and kernel inception distance from features


class _InceptionScoreParts:
    """Running sums for the Inception score of n samples that arrive in batches, in order.

    Split k holds rows [k n / S, (k + 1) n / S) (integer division), as in the reference code.
    Per split, KL(p(y|x) || p(y)) averaged over x is E_x[sum_y p log p] - sum_y p(y) log p(y)
    with p(y) = E_x p(y|x): two running sums per split, so no logits are kept.
    """

    def __init__(self, n: int, splits: int):
        self.n, self.splits, self.seen = n, splits, 0
        self.bounds = torch.tensor([k * n // splits for k in range(splits + 1)])
        self.sum_p: torch.Tensor | None = None  # [S, C]
        self.sum_plogp = torch.zeros(splits, dtype=torch.float64)

    def update(self, logits: torch.Tensor) -> None:
        log_p = torch.log_softmax(logits.detach().to("cpu", torch.float64), dim=1)
        p = log_p.exp()
        if self.sum_p is None:
            self.sum_p = torch.zeros(self.splits, p.shape[1], dtype=torch.float64)
        rows = torch.arange(self.seen, self.seen + p.shape[0])
        if self.seen + p.shape[0] > self.n:
            raise ValueError(f"inception_score: more than the announced {self.n} samples")
        split = torch.searchsorted(self.bounds, rows, right=True) - 1
        self.sum_p.index_add_(0, split, p)
        self.sum_plogp.index_add_(0, split, (p * log_p).sum(1))
        self.seen += p.shape[0]

    def result(self) -> tuple[float, float]:
        if self.seen != self.n:
            raise ValueError(f"inception_score: got {self.seen} samples, announced {self.n}")
        counts = (self.bounds[1:] - self.bounds[:-1]).to(torch.float64)
        p_y = self.sum_p / counts[:, None]
        kl = self.sum_plogp / counts - torch.xlogy(p_y, p_y).sum(1)
        scores = kl.exp().numpy()
        return float(np.mean(scores)), float(np.std(scores))


def _check_splits(n: int, splits) -> None:
    if isinstance(splits, bool) or not isinstance(splits, int) or splits < 1:
        raise ValueError(f"inception_score: splits must be an int >= 1, got {splits!r}")
    if n < splits:
        raise ValueError(f"inception_score: {n} samples cannot be cut into {splits} splits")


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """Inception score exp(E_x KL(p(y|x) || p(y))) from class logits [N, C] (Salimans et al. 2016).

    As in the reference code: the N samples are cut into `splits` contiguous parts, p(y) is the
    mean of p(y|x) = softmax(logits) within a part, and the result is the (mean, std) over parts.
    The reference uses the 1008 Inception logits without the fc bias (`InceptionFeatures`).
    Ranges from 1 (all predictions equal) to C (confident and evenly spread over C classes).
    `stream_sample_statistics` computes the same from batches without keeping the logits.
    """
    if isinstance(logits, np.ndarray):
        logits = torch.from_numpy(logits)
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or not logits.is_floating_point():
        raise ValueError("inception_score: logits must be a float tensor [N, C]")
    _check_splits(logits.shape[0], splits)
    parts = _InceptionScoreParts(logits.shape[0], splits)
    parts.update(logits)
    return parts.result()


def _polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Unbiased MMD^2 (Gretton et al. 2012, eq. 3) of equal-size sets with the cubic kernel."""
    m = x.shape[0]
    kxx, kyy, kxy = _polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y)
    within = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return within - 2.0 * kxy.sum() / (m * m)


def kernel_inception_distance(
    features1,
    features2,
    subsets: int = 100,
    subset_size: int = 1000,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """KID: unbiased MMD^2 with the kernel k(x, y) = (x.y / d + 1)^3 (Bińkowski et al. 2018).

    Averaged over `subsets` random subsets of `subset_size` rows from each set (drawn without
    replacement from `generator`); returns (mean, std over subsets), in float64. Unbiased, so
    it is about 0 (and may be negative) for two samples of one distribution.
    """
    fn = "kernel_inception_distance"
    x = torch.as_tensor(features1)
    y = torch.as_tensor(features2)
    for name, v in (("features1", x), ("features2", y)):
        if v.ndim != 2 or not v.is_floating_point():
            raise ValueError(f"{fn}: {name} must be a float tensor [N, D]")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"{fn}: feature dims differ, {x.shape[1]} and {y.shape[1]}")
    for name, v, low in (("subsets", subsets, 1), ("subset_size", subset_size, 2)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{fn}: {name} must be an int >= {low}, got {v!r}")
    if min(x.shape[0], y.shape[0]) < subset_size:
        raise ValueError(
            f"{fn}: subset_size {subset_size} exceeds the sample sizes ({x.shape[0]}, "
            f"{y.shape[0]}); pass a smaller subset_size"
        )
    x, y = x.to(torch.float64), y.to(device=x.device, dtype=torch.float64)
    mmds = torch.empty(subsets, dtype=torch.float64)
    for i in range(subsets):
        ix = torch.randperm(x.shape[0], generator=generator)[:subset_size].to(x.device)
        iy = torch.randperm(y.shape[0], generator=generator)[:subset_size].to(x.device)
        mmds[i] = _mmd2_unbiased(x[ix], y[iy]).cpu()
    return mmds.mean().item(), mmds.std(unbiased=False).item()


# ----------------------------------------------------------------------------------------------
# Feature extraction over batches of uint8 images, and saved reference statistics


def images_to_uint8(x: torch.Tensor, data_range: tuple[float, float] = (-1.0, 1.0), *,
                    discretization: str = "scale") -> torch.Tensor:
    """Float images in data_range -> uint8 [0, 255], clipped: `data.to_uint8` with 256 levels.

    The rounding rule follows the training discretization: "scale" (data trained as x / 255)
    rounds to the nearest level, "dequantize" (trained as (x + u) / 256) floors. Metrics see
    generated samples as 8-bit images, like the saved PNGs the reference code reads.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError("images_to_uint8: x must be a floating-point tensor")
    low, high = (float(v) for v in data_range)
    if not low < high:
        raise ValueError(f"images_to_uint8: data_range must have low < high, got {data_range!r}")
    x01 = (x.double() - low) / (high - low)
    return to_uint8(x01, 256, discretization=discretization, centered=False)


def _check_uint8_batch(fn: str, batch) -> torch.Tensor:
    if isinstance(batch, np.ndarray):
        batch = torch.from_numpy(batch)
    if not isinstance(batch, torch.Tensor) or batch.dtype != torch.uint8 or batch.ndim != 4:
        what = (
            f"{batch.dtype} tensor of shape {tuple(batch.shape)}"
            if isinstance(batch, torch.Tensor)
            else type(batch).__name__
        )
        raise ValueError(
            f"{fn}: images must be uint8 [B, C, H, W] (use images_to_uint8 for float samples), "
            f"got {what}"
        )
    return batch


def _uint8_batches(fn: str, images, batch_size: int):
    """(iterator of uint8 [B, C, H, W] batches, number of batches or None)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"{fn}: batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(images, (torch.Tensor, np.ndarray)):
        images = _check_uint8_batch(fn, images)
        n = images.shape[0]
        return (images[i : i + batch_size] for i in range(0, n, batch_size)), -(-n // batch_size)

    def batches():
        for batch in images:  # e.g. a DataLoader of (images, labels)
            yield _check_uint8_batch(fn, batch[0] if isinstance(batch, (tuple, list)) else batch)

    total = len(images) if hasattr(images, "__len__") else None
    return batches(), total


def _device_of(feature_fn) -> torch.device:
    module = (
        feature_fn if isinstance(feature_fn, nn.Module) else getattr(feature_fn, "__self__", None)
    )
    if isinstance(module, nn.Module):
        for p in module.parameters():
            return p.device
    return torch.device("cpu")


FeatureFn = Callable[[torch.Tensor], "torch.Tensor | tuple[torch.Tensor, ...]"]


@torch.no_grad()
def extract_features(
    images,
    feature_fn: FeatureFn,
    *,
    batch_size: int = 250,
    device: torch.device | str | None = None,
    progress: bool = False,
):
    """Apply feature_fn (uint8 [B, C, H, W] -> [B, D], or a tuple of such) batch by batch.

    images: a uint8 tensor/array [N, C, H, W] or an iterable of uint8 batches (or of (images,
    labels) pairs). Batches go to `device` (default: feature_fn's parameters' device); results
    come back concatenated on the CPU, a tensor or a tuple like feature_fn's output.
    """
    batches, total = _uint8_batches("extract_features", images, batch_size)
    device = _device_of(feature_fn) if device is None else torch.device(device)
    outs = []
    for batch in tqdm(batches, total=total, disable=not progress, desc="features"):
        out = feature_fn(batch.to(device))
        outs.append(tuple(o.cpu() for o in out) if isinstance(out, tuple) else out.cpu())
    if not outs:
        raise ValueError("extract_features: no images")
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outs))
    return torch.cat(outs)


@dataclass
class ImageStats:
    """Mean [D] and covariance [D, D] (float64) of n images' features; `source` says of what.

    `features` (float32 [M, D], optional) is a seeded uniformly random subset of the images'
    features, which KID needs (an unbiased MMD of feature samples, not of moments). Saved as
    .npz with keys mu, sigma, n, source (and features); the precomputed TTUR / pytorch-fid files
    (keys mu and sigma only) load too, with n = 0 (unknown) and no features.
    """

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    source: str = ""
    features: np.ndarray | None = None

    def save(self, path: str | Path) -> Path:
        """Write the .npz atomically (temporary file, fsync, rename)."""
        arrays = {"mu": self.mu, "sigma": self.sigma, "n": np.int64(self.n), "source": self.source}
        if self.features is not None:
            arrays["features"] = np.asarray(self.features, dtype=np.float32)

        def write(tmp):
            with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
                np.savez(f, **arrays)

        return ckpt.atomic_write_bytes(path, write)

    @classmethod
    def load(cls, path: str | Path) -> ImageStats:
        """Read statistics written by `save` (or a TTUR / pytorch-fid .npz with mu and sigma)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no reference statistics here; make them with "
                f"compute_reference_statistics(...).save(path)"
            )
        with np.load(path, allow_pickle=False) as z:
            if "mu" not in z or "sigma" not in z:
                raise ValueError(f"{path}: not a statistics file (needs arrays mu and sigma)")
            mu, sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
            n = int(z["n"]) if "n" in z else 0
            source = str(z["source"]) if "source" in z else path.name
            features = z["features"].astype(np.float32) if "features" in z else None
        if mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2:
            raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not match")
        if features is not None and (features.ndim != 2 or features.shape[1] != mu.shape[0]):
            raise ValueError(f"{path}: features {features.shape} do not match mu {mu.shape}")
        return cls(mu, sigma, n, source, features)


class _RunningMoments:
    """Streaming mean and unbiased covariance in float64, shifted by the first batch's mean so
    the sum of outer products does not cancel catastrophically."""

    def __init__(self):
        self.n, self.shift, self.total, self.outer = 0, None, None, None

    def update(self, f: torch.Tensor) -> None:
        f = f.to(torch.float64)
        if self.shift is None:
            self.shift = f.mean(0)
            self.total = torch.zeros_like(self.shift)
            self.outer = torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64, device=f.device)
        c = f - self.shift
        self.n += f.shape[0]
        self.total += c.sum(0)
        self.outer += c.T @ c

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError(f"need at least 2 images for a covariance, got {self.n}")
        mean_c = self.total / self.n
        sigma = (self.outer - self.n * torch.outer(mean_c, mean_c)) / (self.n - 1)
        return (mean_c + self.shift).cpu().numpy(), sigma.cpu().numpy()


class _RandomSubset:
    """A uniformly random subset of k rows of a stream (bottom-k sampling): every row gets a
    U(0, 1) key from a seeded generator and the k smallest keys are kept, so memory is k rows."""

    def __init__(self, k: int, seed: int):
        self.k, self.generator = k, torch.Generator().manual_seed(seed)
        self.keys, self.rows = torch.empty(0, dtype=torch.float64), None

    def update(self, f: torch.Tensor) -> None:
        if self.k == 0:
            return
        f = f.detach().to("cpu", torch.float32)
        keys = torch.cat([self.keys, torch.rand(f.shape[0], generator=self.generator,
                                                dtype=torch.float64)])
        rows = f if self.rows is None else torch.cat([self.rows, f])
        if keys.shape[0] > self.k:
            keep = torch.topk(keys, self.k, largest=False, sorted=True).indices
            keys, rows = keys[keep], rows[keep]
        self.keys, self.rows = keys, rows


@torch.no_grad()
def compute_reference_statistics(
    images,
    feature_fn: FeatureFn,
    *,
    batch_size: int = 250,
    source: str = "",
    keep_features: int = 0,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> ImageStats:
    """Feature mean and covariance of a (large) image set, streamed batch by batch.

    For FID as in the papers: all training images (CIFAR-10 train, 50,000; CelebA-HQ 256, all
    30,000) through `InceptionFeatures(path).features`; save with `.save(path)` and reuse.
    `keep_features` > 0 also keeps the features of a uniformly random subset of that many
    images (chosen by `seed`; all of them if fewer) as `.features`, for KID. images /
    feature_fn as in `extract_features` (if feature_fn returns a tuple, its first element is
    used).
    """
    if isinstance(keep_features, bool) or not isinstance(keep_features, int) or keep_features < 0:
        raise ValueError(f"compute_reference_statistics: keep_features must be an int >= 0, "
                         f"got {keep_features!r}")
    batches, total = _uint8_batches("compute_reference_statistics", images, batch_size)
    device = _device_of(feature_fn) if device is None else torch.device(device)
    moments, subset = _RunningMoments(), _RandomSubset(keep_features, seed)
    for batch in tqdm(batches, total=total, disable=not progress, desc="statistics"):
        out = feature_fn(batch.to(device))
        del batch
        f = out[0] if isinstance(out, tuple) else out
        moments.update(f)
        subset.update(f)
    mu, sigma = moments.statistics()
    features = None if subset.rows is None else subset.rows.numpy()
    return ImageStats(mu, sigma, moments.n, source, features)


@dataclass
class SampleStatistics:
    """What `stream_sample_statistics` keeps of n generated images: the feature moments
    (`stats`), the features of the first `features.shape[0]` images (float32, for KID) and the
    Inception score (mean, std over splits; None when the feature function gives no logits)."""

    stats: ImageStats
    features: torch.Tensor
    inception_score: tuple[float, float] | None


@torch.no_grad()
def stream_sample_statistics(
    batches,
    feature_fn: FeatureFn,
    num_images: int,
    *,
    is_splits: int = 10,
    keep_features: int = 10_000,
    source: str = "",
    device: torch.device | str | None = None,
    progress: bool = False,
) -> SampleStatistics:
    """FID / IS / KID statistics of images that arrive in uint8 batches, holding one batch.

    feature_fn(batch) -> pool features [B, D], or (pool [B, D], logits [B, C]) as
    `InceptionFeatures` gives. Per batch: running mean and covariance of the features
    (float64), running Inception-score sums over `is_splits` contiguous splits of the
    `num_images` images (the same numbers `inception_score` gives on all logits at once), and
    the features of the first `keep_features` images (generated images are i.i.d., so these
    are a random subset). Nothing else is kept: for 50k CelebA-HQ 256 samples that is about
    80 MB of features instead of 9.8 GB of images. `batches`: an iterable of uint8 [B, C, H, W]
    (e.g. a generator that samples them); drop references to a batch once yielded.
    """
    fn = "stream_sample_statistics"
    for name, v, low in (("num_images", num_images, 2), ("keep_features", keep_features, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{fn}: {name} must be an int >= {low}, got {v!r}")
    _check_splits(num_images, is_splits)
    device = _device_of(feature_fn) if device is None else torch.device(device)
    moments, score, kept = _RunningMoments(), _InceptionScoreParts(num_images, is_splits), []
    has_logits = None
    bar = tqdm(total=num_images, disable=not progress, desc="features", unit="img")
    for batch in batches:
        batch = _check_uint8_batch(fn, batch)
        b = batch.shape[0]
        out = feature_fn(batch.to(device))
        del batch  # the only images held are the batch being featurized
        pool, logits = out if isinstance(out, tuple) else (out, None)
        has_logits = logits is not None if has_logits is None else has_logits
        moments.update(pool)
        if logits is not None:
            score.update(logits)
        room = keep_features - sum(k.shape[0] for k in kept)
        if room > 0:
            kept.append(pool[:room].detach().to("cpu", torch.float32))
        bar.update(b)
    bar.close()
    if moments.n != num_images:
        raise ValueError(f"{fn}: got {moments.n} images, expected num_images={num_images}")
    mu, sigma = moments.statistics()
    features = torch.cat(kept) if kept else torch.empty(0, mu.shape[0])
    return SampleStatistics(ImageStats(mu, sigma, moments.n, source), features,
                            score.result() if has_logits else None)


def fid_against_reference(
    images,
    feature_fn: FeatureFn,
    reference: ImageStats | str | Path,
    *,
    batch_size: int = 250,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> float:
    """FID of generated uint8 images against saved reference statistics (an ImageStats or .npz).

    Protocol of Song et al. 2021 (Tables 1, 3): 50,000 samples against the training-set
    statistics, Inception pool features; see the module docstring on TF-Inception differences.
    """
    if not isinstance(reference, ImageStats):
        reference = ImageStats.load(reference)
    stats = compute_reference_statistics(
        images, feature_fn, batch_size=batch_size, device=device, progress=progress
    )
    if stats.mu.shape != reference.mu.shape:
        raise ValueError(
            f"fid_against_reference: features have dim {stats.mu.shape[0]} but the reference "
            f"statistics ({reference.source}) have dim {reference.mu.shape[0]}; use the same "
            f"feature extractor for both"
        )
    return frechet_distance(stats.mu, stats.sigma, reference.mu, reference.sigma)


# ----------------------------------------------------------------------------------------------
# Inception features from local weights


def _check_inception_weights(weights_path) -> Path:
    how = (
        f"Download torch-fidelity's Inception weights {INCEPTION_WEIGHTS_FILENAME} (the TF FID "
        f"Inception, inception-2015-12-05) from {INCEPTION_WEIGHTS_URL} and pass its path, e.g. "
        f"`python -m lsgm_edu eval ... --inception-weights PATH` or InceptionFeatures(PATH). "
        f"lsgm_edu never downloads weights itself."
    )
    if weights_path is None:
        raise FileNotFoundError(f"InceptionFeatures: no Inception weights given. {how}")
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"InceptionFeatures: {path} does not exist. {how}")
    return path


def _load_inception_state_dict(path: Path) -> dict:
    # torch-fidelity itself calls torch.load(weights_only=False), which can run pickled code;
    # the file is a plain dict of tensors, which weights_only=True reads safely.
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        raise ValueError(
            f"InceptionFeatures: {path} is not a weights-only PyTorch state dict ({e}); expected "
            f"{INCEPTION_WEIGHTS_FILENAME} from {INCEPTION_WEIGHTS_URL}"
        ) from None
    if not isinstance(state_dict, dict) or "fc.weight" not in state_dict:
        raise ValueError(
            f"InceptionFeatures: {path} is not an Inception state dict (no fc.weight); expected "
            f"{INCEPTION_WEIGHTS_FILENAME} from {INCEPTION_WEIGHTS_URL}"
        )
    return state_dict


class InceptionFeatures(nn.Module):
    """The TF FID Inception-v3 (torch-fidelity's port) from a local weights file.

    forward(images uint8 [B, C, H, W], C in {1, 3}, any H, W) -> (pool [B, 2048], logits
    [B, 1008]), float32: pool3 features for FID / KID (Heusel et al. 2017) and the softmax
    logits without bias for IS, as the reference IS code computes them (Salimans et al. 2016).
    Images are resized to 299x299 with TF1's bilinear rule inside, as the reference does; grey
    images are repeated to 3 channels. Weights are read with weights_only=True and handed to
    torch-fidelity directly, so its download path can never run. Always in eval mode.
    """

    def __init__(self, weights_path: str | Path | None, *, internal_dtype: str = "float32"):
        super().__init__()
        path = _check_inception_weights(weights_path)
        state_dict = _load_inception_state_dict(path)
        from torch_fidelity import feature_extractor_inceptionv3 as tfi

        # torch-fidelity builds the network and loads weights in one constructor: with no path
        # it calls its module-level `load_state_dict_from_url`. We swap that name for a function
        # returning the safely loaded dict for the duration of the call.
        original = tfi.load_state_dict_from_url
        tfi.load_state_dict_from_url = lambda *args, **kwargs: state_dict
        try:
            self.extractor = tfi.FeatureExtractorInceptionV3(
                "inception-v3-compat",
                ["2048", "logits_unbiased"],
                feature_extractor_weights_path=None,
                feature_extractor_internal_dtype=internal_dtype,
            )
        finally:
            tfi.load_state_dict_from_url = original
        self.weights_path = str(path)

    def train(self, mode: bool = True):
        """Stays in eval mode: the BatchNorm statistics are the reference network's."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = _check_uint8_batch("InceptionFeatures", images)
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        if images.shape[1] != 3:
            raise ValueError(f"InceptionFeatures: expected 1 or 3 channels, got {images.shape[1]}")
        device = next(self.extractor.parameters()).device
        pool, logits = self.extractor(images.to(device).contiguous())
        return pool, logits

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pool3 features [B, 2048] only (for FID / KID statistics)."""
        return self(images)[0]


# ----------------------------------------------------------------------------------------------
# Classifier-feature FID for MNIST-size data


@torch.no_grad()
def classifier_features(
    classifier: DigitClassifier, images_uint8, *, batch_size: int = 500
) -> torch.Tensor:
    """Penultimate features [N, feature_dim] of grey uint8 images [N, 1, H, W] (or [N, H, W])."""
    images = check_digit_images("classifier_features", images_uint8, classifier.image_size)
    was_training = classifier.training
    classifier.eval()
    try:
        return extract_features(
            images,
            lambda b: classifier.features(classifier_input(b)),
            batch_size=batch_size,
            device=_device_of(classifier),
        )
    finally:
        classifier.train(was_training)


@torch.no_grad()
def classifier_accuracy(
    classifier: DigitClassifier, images_uint8, labels, *, batch_size: int = 500
) -> float:
    """Fraction of images whose arg-max logit is the label."""
    images = check_digit_images("classifier_accuracy", images_uint8, classifier.image_size)
    labels = torch.as_tensor(labels).to(torch.int64).reshape(-1)
    was_training = classifier.training
    classifier.eval()
    try:
        logits = extract_features(
            images,
            lambda b: classifier(classifier_input(b)),
            batch_size=batch_size,
            device=_device_of(classifier),
        )
    finally:
        classifier.train(was_training)
    return (logits.argmax(1) == labels).to(torch.float64).mean().item()


def classifier_fid(
    images_a_uint8, images_b_uint8, classifier: DigitClassifier, *, batch_size: int = 500
) -> float:
    """FID in the feature space of a digit classifier: frechet_distance of the Gaussians fitted
    to the penultimate features of two grey uint8 image sets (FID of Heusel et al. 2017)."""
    return fid_from_features(
        classifier_features(classifier, images_a_uint8, batch_size=batch_size),
        classifier_features(classifier, images_b_uint8, batch_size=batch_size),
    )


def _classifier_stem(path: str | Path) -> Path:
    path = Path(path)
    return path.with_suffix("") if path.suffix in (".safetensors", ".json") else path


def save_classifier(
    model: DigitClassifier,
    path: str | Path,
    *,
    test_accuracy: float | None = None,
    command: str | None = None,
) -> Path:
    """Save as `<stem>.safetensors` + `<stem>.json` (architecture, training arguments, the
    command that made it, test accuracy), each written atomically. Returns the sidecar path."""
    if not isinstance(model, DigitClassifier):
        raise TypeError(f"save_classifier: expected a DigitClassifier, got {type(model).__name__}")
    meta = dict(getattr(model, "metadata", {}))
    meta.update(kind=CLASSIFIER_KIND, architecture=model.config)
    if test_accuracy is not None:
        meta["test_accuracy"] = float(test_accuracy)
    if command is not None:
        meta["command"] = command
    json.dumps(meta)  # fail before writing anything if the metadata is not JSON
    return ckpt.save_checkpoint(_classifier_stem(path), model.state_dict(), meta)


def load_classifier(path: str | Path, *, device: torch.device | str = "cpu") -> DigitClassifier:
    """Load a classifier saved by `save_classifier` (path: the .safetensors, .json or stem);
    returns it in eval mode with the sidecar as `.metadata`."""
    stem = _classifier_stem(path)
    if not stem.with_suffix(".json").is_file():
        raise FileNotFoundError(
            f"load_classifier: {stem.with_suffix('.json')} not found; train one with "
            f"lsgm_edu.nets.classifier.train_digit_classifier and save_classifier (or `python "
            f"-m lsgm_edu train-classifier`)"
        )
    tensors, meta = ckpt.load_checkpoint(stem.with_suffix(".json"))
    if meta.get("kind") != CLASSIFIER_KIND:
        raise ValueError(f"load_classifier: {stem}.json is not a {CLASSIFIER_KIND} checkpoint")
    model = DigitClassifier(**meta["architecture"])
    ckpt.load_module_state(model, tensors, f"{stem}.json")
    model.metadata = {k: v for k, v in meta.items() if k not in ("format", "tensors", "sha256")}
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------------
# Likelihood in bits/dim


def nll_to_bits_per_dim(nll_nats, num_dims: int, num_levels: int = 256, centered: bool = True):
    """Bits/dim of L-level integer data from the NLL (nats) of its dequantized, rescaled form.

    A thin front for `likelihood.bits_per_dim`, spelling out the offsets: a density on [0, 1)^D
    becomes a mass on L^D bins of width 1/L, which adds D log L nats to the NLL; a density on
    [-1, 1)^D (centered=True, y = 2u - 1) is 2^-D times that of u, so its NLL is D log 2 nats
    above u's. Hence bpd = nll / (D ln 2) + log2(L) - (1 if centered else 0), e.g. nll = 0
    gives 7 bits/dim for L = 256, centered (Theis et al. 2016; Song et al. 2021, App. D.2).
    Tensors in, tensors out; floats in, float out.
    """
    as_float = not isinstance(nll_nats, torch.Tensor)
    nll = torch.as_tensor(nll_nats, dtype=torch.float64)
    data_range = (-1.0, 1.0) if centered else (0.0, 1.0)
    bpd = bits_per_dim(-nll, num_dims, num_levels, data_range)
    return bpd.item() if as_float else bpd


# ----------------------------------------------------------------------------------------------
# Sliced Wasserstein against the i.i.d. baseline


def sliced_wasserstein_ratio(
    samples: torch.Tensor,
    sample_true: Callable[[int, torch.Generator | None], torch.Tensor],
    *,
    sets: int = 1,
    references: int = 1,
    baseline_pairs: int = 16,
    n_projections: int = 256,
    generator: torch.Generator | None = None,
    projection_seed: int = 0,
    return_parts: bool = False,
    baseline: torch.Tensor | None = None,
):
    """SW2 of samples to fresh true samples, over the SW2 between two independent true samples.

    `samples` [S * n, D] is split into S = `sets` sets of n; each is compared with `references`
    fresh true sets of n drawn by `sample_true(n, generator)` (e.g. `gmm.sample`), and the mean
    distance is divided by the i.i.d. baseline, the mean SW2 between `baseline_pairs` pairs of
    independent true sets of n: what sampling noise alone gives at this n. A sampler that draws
    from the target gives a ratio near 1 (as close as the two means' Monte Carlo error allows);
    a biased one, a ratio that grows with n. Every distance uses the same `n_projections`
    directions, seeded by `projection_seed`, so projection noise largely cancels in the ratio.
    SW2 is `sliced_wasserstein` (Rabin et al. 2011); draws come from `generator` only.
    Returns the ratio (float), or with `return_parts=True` the tuple (ratio, distances
    [S * references], baseline distances [baseline_pairs]). `baseline`: the baseline distances
    of an earlier call at the same n (they depend on n only), to skip recomputing them.
    """
    fn = "sliced_wasserstein_ratio"
    for name, v in (("sets", sets), ("references", references), ("baseline_pairs", baseline_pairs)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{fn}: {name} must be an int >= 1, got {v!r}")
    if not isinstance(samples, torch.Tensor) or samples.ndim != 2:
        raise ValueError(f"{fn}: samples must be a tensor [N, D], got {samples!r:.80}")
    if not callable(sample_true):
        raise TypeError(f"{fn}: sample_true must be a callable (n, generator) -> [n, D]")
    if samples.shape[0] < sets or samples.shape[0] % sets:
        raise ValueError(
            f"{fn}: {samples.shape[0]} samples do not split into {sets} sets of equal size"
        )
    n = samples.shape[0] // sets

    def draw() -> torch.Tensor:
        x = sample_true(n, generator)
        if not isinstance(x, torch.Tensor) or x.shape != (n, samples.shape[1]):
            raise ValueError(
                f"{fn}: sample_true({n}, generator) must return a tensor of shape "
                f"{(n, samples.shape[1])}, got {getattr(x, 'shape', type(x).__name__)}"
            )
        return x

    def swd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        g = torch.Generator(device=a.device).manual_seed(projection_seed)
        return sliced_wasserstein(a, b, n_projections, g)

    distances = torch.stack(
        [swd(x, draw()) for x in samples.chunk(sets) for _ in range(references)]
    )
    if baseline is None:
        baselines = torch.stack([swd(draw(), draw()) for _ in range(baseline_pairs)])
    else:
        baselines = torch.as_tensor(baseline, dtype=distances.dtype).reshape(-1)
    ratio = (distances.mean() / baselines.mean()).item()
    return (ratio, distances, baselines) if return_parts else ratio

"""A small vector-latent VAE, its training loop, and the measurements of chapter 10: the ELBO,
the IWAE bound, active units, the aggregate posterior and the prior hole.

`MLPVAE` is the VAE of Kingma & Welling (2014) and Rezende et al. (2014): an MLP encoder to a
diagonal Normal posterior q(z | x), an MLP decoder p(x | z), the prior N(0, I). It returns the
same `VAEOutput` as the hierarchical `lsgm_edu.vae.NVAE` (one group) and has its
`reconstruction_loss`, `decode` and `sample`, so every function here takes either model:
they only use `vae(x, generator) -> VAEOutput` and `vae.reconstruction_loss(out, x)`, where
per sample NELBO = reconstruction_loss + Σ_j kl_j and Σ_j kl_j = log q(z | x) − log p(z) at the
posterior sample.

The aggregate-posterior functions take the posterior parameters of the first (top) group,
flattened to vectors: for the MLPVAE that is the whole latent.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import ClassVar, NamedTuple

import torch
from torch import nn
from tqdm.auto import trange

from .checks import check_float, check_int, check_tensor
from .data import ImageDataset
from .data import binarize as binarize_images
from .likelihood import bits_per_dim as _bits_per_dim
from .nets.mlp import _linear, as_generator
from .utils import EvalMode, randn, randn_like
from .vae import BernoulliDecoder, VAEOutput, kl_balancer, kl_balancer_coeff, kl_coeff

__all__ = [
    "BOOK_MNIST_VAE",
    "MLPVAE",
    "ELBOSurgery",
    "ELBOTerms",
    "GaussianDensityDecoder",
    "PriorHole",
    "active_units",
    "aggregate_posterior_density",
    "aggregate_posterior_log_density",
    "bits_per_dim",
    "elbo_surgery",
    "elbo_terms",
    "fit_vae",
    "gaussian_kl",
    "iwae_bound",
    "latent_activity",
    "linear_gaussian_log_marginal",
    "linear_gaussian_vae",
    "posterior_parameters",
    "prior_hole",
]

LOG_2PI = math.log(2 * math.pi)

# The book-size NVAE of chapter 10 (and tests/test_vae.py): binarized MNIST padded to 32x32
# (the 2-pixel border left out of log p(x|z)), two pre-processing scales, one latent scale of
# two groups of 10 channels at 8x8 (a 20x8x8 top latent), 124,034 parameters.
BOOK_MNIST_VAE = {
    "image_size": 32, "num_channels": 1, "crop_output": 2, "num_channels_enc": 8,
    "num_channels_dec": 8, "num_preprocess_blocks": 2, "num_preprocess_cells": 1,
    "num_postprocess_blocks": 2, "num_postprocess_cells": 1, "num_latent_scales": 1,
    "num_groups_per_scale": 2, "num_latent_per_group": 10, "num_cell_per_cond_enc": 1,
    "num_cell_per_cond_dec": 1, "ch_mult": (1, 2, 4), "cell_type": "res_bnswish",
    "use_se": True, "num_flows": 0, "decoder": "bernoulli"}

DECODERS = ("bernoulli", "gaussian")


# ----------------------------------------------------------------------------- argument checks


def _check_vae_args(fn: str, data_shape, latent_dim, hidden, decoder) -> tuple[tuple, tuple]:
    shape = (data_shape,) if isinstance(data_shape, int) and not isinstance(data_shape, bool) \
        else data_shape
    if not isinstance(shape, Sequence) or not shape or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape):
        raise ValueError(f"{fn}: data_shape must be an int D >= 1 or a shape (C, H, W) of ints "
                         f">= 1, got {data_shape!r}")
    check_int(fn, "latent_dim", latent_dim, low=1)
    if not isinstance(hidden, Sequence) or not all(
            isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in hidden):
        raise ValueError(f"{fn}: hidden must be a sequence of layer widths >= 1 (() for linear "
                         f"maps), got {hidden!r}")
    if decoder not in DECODERS:
        raise ValueError(f"{fn}: decoder must be one of {DECODERS}, got {decoder!r}")
    return tuple(shape), tuple(hidden)


def _check_x(fn: str, x, data_shape: tuple) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() \
            or tuple(x.shape[1:]) != data_shape or x.ndim != len(data_shape) + 1:
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{fn}: x must be a floating-point tensor [B, "
                         f"{', '.join(map(str, data_shape))}], got {got}")
    return x


def _check_model(fn: str, vae) -> None:
    if not isinstance(vae, nn.Module) or not hasattr(vae, "reconstruction_loss"):
        raise TypeError(f"{fn}: vae must be an MLPVAE or an NVAE (an nn.Module returning "
                        f"VAEOutput, with reconstruction_loss), got {type(vae).__name__}")


# ----------------------------------------------------------------------------- the model


class GaussianDensityDecoder:
    """p(x | z) = Π_i N(x_i; μ_i, σ_i²) on x's own scale, params = cat([μ, log σ], dim=1) with
    μ and log σ shaped like x (no clamping, so a linear decoder is exactly linear-Gaussian).

    NVAE's `gaussian` decoder instead models 2x − 1 with soft-clamped parameters; the two
    densities differ by D log 2 nats.
    """

    def __init__(self, params: torch.Tensor):
        self.mu, self.log_sigma = params.chunk(2, dim=1)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x | z) summed over every dimension: [B]."""
        z = (x - self.mu) * torch.exp(-self.log_sigma)
        return (-0.5 * z.square() - self.log_sigma - 0.5 * LOG_2PI).flatten(1).sum(1)

    def sample(self, generator=None, temperature: float = 1.0) -> torch.Tensor:
        return self.mu + temperature * self.log_sigma.exp() * randn_like(self.mu, generator)

    def mean(self) -> torch.Tensor:
        return self.mu


def _mlp(sizes: Sequence[int], g: torch.Generator) -> nn.Sequential:
    layers = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(_linear(n_in, n_out, g))
        if i < len(sizes) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class MLPVAE(nn.Module):
    """The VAE of Kingma & Welling (2014): q(z | x) = N(μ(x), diag σ(x)²) from an MLP encoder,
    an MLP decoder p(x | z), prior N(0, I) on a vector latent z [B, latent_dim].

    data_shape: D or (C, H, W); images enter in [0, 1] ({0, 1} for `decoder="bernoulli"`) and
    are flattened. hidden: widths of the hidden layers (SiLU) of both MLPs, the decoder's in
    reverse order; `()` makes both maps linear. decoder: "bernoulli" (logits shaped like x) or
    "gaussian" (`GaussianDensityDecoder`: [μ, log σ] stacked along dim 1). Weights are drawn from
    `generator` (torch.Generator, int seed, or None for seed 0); global random state is untouched.
    `vae(x, generator)` returns `VAEOutput` with one group, as `lsgm_edu.vae.NVAE`.
    """

    def __init__(self, data_shape: int | Sequence[int], latent_dim: int,
                 hidden: Sequence[int] = (256, 256), decoder: str = "bernoulli", *,
                 generator=None):
        super().__init__()
        self.data_shape, hidden = _check_vae_args("MLPVAE", data_shape, latent_dim, hidden, decoder)
        self.latent_dim, self.hidden, self.decoder = latent_dim, hidden, decoder
        self.data_dim = math.prod(self.data_shape)
        g = as_generator(generator)
        out = self.data_dim * (2 if decoder == "gaussian" else 1)
        self.encoder = _mlp([self.data_dim, *hidden, 2 * latent_dim], g)
        self.decoder_net = _mlp([latent_dim, *reversed(hidden), out], g)

    groups_per_scale: ClassVar[list[int]] = [1]  # one group, for `kl_balancer_coeff`

    def latent_shapes(self) -> list[tuple[int]]:
        return [(self.latent_dim,)]

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior parameters (μ(x), σ(x)), each [B, latent_dim]."""
        _check_x("MLPVAE.encode", x, self.data_shape)
        mean, log_std = self.encoder(x.flatten(1)).chunk(2, dim=1)
        return mean, log_std.exp()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Decoder parameters for latents z [B, latent_dim]: logits [B, *data_shape] (Bernoulli)
        or [μ, log σ] stacked along dim 1 (Gaussian)."""
        check_tensor("MLPVAE.decode", "z", z, min_ndim=2)
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"MLPVAE.decode: z must be [B, {self.latent_dim}], got "
                             f"{tuple(z.shape)}")
        params = self.decoder_net(z)
        if self.decoder == "gaussian":
            mu, log_sigma = params.chunk(2, dim=1)
            return torch.cat([mu.reshape(-1, *self.data_shape),
                              log_sigma.reshape(-1, *self.data_shape)], dim=1)
        return params.reshape(-1, *self.data_shape)

    def forward(self, x: torch.Tensor, generator=None) -> VAEOutput:
        """Encode, draw z = μ + σ ⊙ ε with ε ~ N(0, I) (the reparameterization trick, Kingma &
        Welling 2014, Sec. 2.4), decode. kl = log q(z | x) − log N(z; 0, I) at that z."""
        mean, std = self.encode(x)
        noise = randn_like(mean, generator)
        z = mean + std * noise  # differentiable in (μ, σ): gradients flow through the sample
        log_q = -0.5 * noise.square() - std.log() - 0.5 * LOG_2PI  # log N(z; μ, σ²) per dim
        log_p = -0.5 * z.square() - 0.5 * LOG_2PI  # log N(z; 0, 1) per dim
        return VAEOutput(logits=self.decode(z), eps=[z], log_q=[log_q.sum(1)],
                         log_q_per_channel=[log_q], mean=[mean], std=[std],
                         kl=[(log_q - log_p).sum(1)])

    def decoder_distribution(self, logits: torch.Tensor):
        """p(x | z) for decoder output `logits`: an object with log_prob, sample and mean."""
        if self.decoder == "gaussian":
            return GaussianDensityDecoder(logits)
        return BernoulliDecoder(logits)

    def reconstruction_loss(self, out: VAEOutput | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """−log p(x | z) in nats, summed over every dimension of x: [B]."""
        _check_x("MLPVAE.reconstruction_loss", x, self.data_shape)
        logits = out.logits if isinstance(out, VAEOutput) else out
        return -self.decoder_distribution(logits).log_prob(x).reshape(x.shape[0], -1).sum(1)

    def decoder_mean(self, logits: torch.Tensor) -> torch.Tensor:
        """Bernoulli probabilities or the Gaussian mean, shaped like x."""
        return self.decoder_distribution(logits).mean()

    def sample_images(self, logits: torch.Tensor, generator=None) -> torch.Tensor:
        """x ~ p(x | z)."""
        return self.decoder_distribution(logits).sample(generator)

    @torch.no_grad()
    def sample(self, n: int, generator=None, temperature: float = 1.0, *,
               use_mean: bool = False) -> torch.Tensor:
        """n draws from the model: z ~ N(0, temperature² I), then x ~ p(x | z) (or its mean,
        `use_mean`), [n, *data_shape]."""
        check_int("MLPVAE.sample", "n", n, low=1)
        check_float("MLPVAE.sample", "temperature", temperature, positive=True)
        p = next(self.parameters())
        z = temperature * randn((n, self.latent_dim), generator, device=p.device, dtype=p.dtype)
        logits = self.decode(z)
        return self.decoder_mean(logits) if use_mean else self.sample_images(logits, generator)


# ----------------------------------------------------------------------------- training


def _check_fit_args(fn, vae, steps, batch_size, lr, kl_warmup_steps) -> None:
    _check_model(fn, vae)
    check_int(fn, "steps", steps, low=1)
    check_int(fn, "batch_size", batch_size, low=1)
    check_float(fn, "lr", lr, positive=True)
    check_int(fn, "kl_warmup_steps", kl_warmup_steps, low=0)


def _training_images(fn: str, data, binarize) -> tuple[torch.Tensor, bool]:
    """(images in [0, 1] [N, ...], whether to binarize them per batch)."""
    if isinstance(data, ImageDataset):
        x = data.data.float() / (data.num_levels - 1)
        return x, data.binarize if binarize is None else bool(binarize)
    if isinstance(data, torch.Tensor) and data.is_floating_point() and data.ndim >= 2 \
            and data.shape[0] >= 1:
        if binarize and not bool(((data >= 0) & (data <= 1)).all()):
            raise ValueError(f"{fn}: binarize=True needs data in [0, 1] (Bernoulli probabilities)")
        return data, bool(binarize)
    raise ValueError(f"{fn}: data must be an ImageDataset (load_dataset) or a floating-point "
                     f"tensor of images [N, ...] in [0, 1], got {type(data).__name__}")


def fit_vae(vae: nn.Module, data, steps: int, *, batch_size: int = 64, lr: float = 1e-3,
            generator=None, kl_warmup_steps: int = 0, kl_balance: bool = False,
            binarize: bool | None = None, progress: bool = True) -> torch.Tensor:
    """Train an MLPVAE or NVAE by Adam on the NELBO; returns the per-step NELBO [steps] (nats per
    image, batch mean, the unweighted bound) and leaves the model in eval mode.

    data: an `ImageDataset` (its levels scaled to [0, 1]; the binarized_ sets drawn as fresh
    Bernoulli images every batch, the dynamic binarization of NVAE and LSGM) or a float tensor
    [N, ...] in [0, 1] (binarized per batch if `binarize`). Minibatches are drawn with replacement. The loss is
    recon + β Σ_j γ_j KL_j: β ramps linearly from 1e-4 to 1 over `kl_warmup_steps` (KL
    warm-up, Sønderby et al. 2016; NVAE App. A), γ are NVAE's KL-balancing weights while β < 1
    (`kl_balance`). The learning rate decays to 0 on a half cosine. Every draw comes from
    `generator` (torch.Generator or int seed; None is seed 0): a run is reproducible.
    """
    fn = "fit_vae"
    _check_fit_args(fn, vae, steps, batch_size, lr, kl_warmup_steps)
    images, draw_binary = _training_images(fn, data, binarize)
    g = as_generator(generator)
    device = next(vae.parameters()).device
    alpha = kl_balancer_coeff(vae.groups_per_scale).to(device) if kl_balance else None
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    nelbos = torch.empty(steps)
    vae.train()
    bar = trange(steps, disable=not progress, desc="VAE")
    for step in bar:
        x = images[torch.randint(0, images.shape[0], (batch_size,), generator=g)]
        x = (binarize_images(x, generator=g) if draw_binary else x).to(device)
        out = vae(x, g)
        recon = vae.reconstruction_loss(out, x)
        beta = kl_coeff(step, kl_warmup_steps, 0, 1e-4, 1.0) if kl_warmup_steps else 1.0
        kl, _, _ = kl_balancer(out.kl, beta, balance=kl_balance, alpha=alpha)
        loss = (recon + kl).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{fn}: loss is {loss.item()} at step {step}; lower lr?")
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay.step()
        nelbos[step] = (recon + torch.stack(out.kl).sum(0)).mean().item()
        if step % 50 == 0 or step == steps - 1:
            bar.set_postfix(nelbo=f"{nelbos[step]:.1f}")
    vae.eval()
    return nelbos


# ----------------------------------------------------------------------------- bounds


class ELBOTerms(NamedTuple):
    """One-sample ELBO terms per sample: reconstruction −log p(x|z) [B], kl Σ_j KL_j [B] (the
    sampled log q − log p), kl_per_group [B, G], elbo = −(reconstruction + kl) [B]; nats."""

    reconstruction: torch.Tensor
    kl: torch.Tensor
    kl_per_group: torch.Tensor
    elbo: torch.Tensor


@torch.no_grad()
def elbo_terms(vae: nn.Module, x: torch.Tensor, generator=None) -> ELBOTerms:
    """E_q[log p(x|z)] − KL(q(z|x) ‖ p(z)) estimated with one posterior sample per x (Kingma &
    Welling 2014, eq. 3; NVAE eq. 1 for the groups); in eval mode, without gradients."""
    _check_model("elbo_terms", vae)
    with EvalMode(vae):
        out = vae(x, generator)
        recon = vae.reconstruction_loss(out, x)
    kl_groups = torch.stack(out.kl, dim=1)
    kl = kl_groups.sum(1)
    return ELBOTerms(recon, kl, kl_groups, -(recon + kl))


def _check_iwae_args(fn, vae, x, k, max_batch) -> None:
    _check_model(fn, vae)
    check_tensor(fn, "x", x, min_ndim=2)
    check_int(fn, "k", k, low=1)
    check_int(fn, "max_batch", max_batch, low=1)


def _log_weights(vae: nn.Module, x: torch.Tensor, generator) -> torch.Tensor:
    """log p(x | z) + log p(z) − log q(z | x) at one posterior sample per row of x: [B]."""
    out = vae(x, generator)
    return -(vae.reconstruction_loss(out, x) + torch.stack(out.kl).sum(0))


@torch.no_grad()
def iwae_bound(vae: nn.Module, x: torch.Tensor, k: int, generator=None, *,
               max_batch: int = 4096) -> torch.Tensor:
    """L_k(x) = log (1/k) Σ_i p(x, z_i) / q(z_i | x), z_i ~ q(z | x) i.i.d., per sample [B]
    (Burda et al. 2016, Sec. 3): L_1 is the ELBO, E[L_k] rises with k to log p(x) (their Thm. 1).

    For the NVAE z = (ε_1, ..., ε_G): log p(z) − log q(z | x) = −Σ_j kl_j. Evaluated in eval
    mode, at most `max_batch` model rows at a time.
    """
    _check_iwae_args("iwae_bound", vae, x, k, max_batch)
    b = x.shape[0]
    per_pass = max(1, max_batch // b)
    lse = torch.full((b,), -math.inf, dtype=torch.float64, device=x.device)
    with EvalMode(vae):
        for start in range(0, k, per_pass):
            n = min(per_pass, k - start)
            xr = x.repeat(n, *([1] * (x.ndim - 1)))  # row i * b + j is x[j]
            log_w = _log_weights(vae, xr, generator).double().reshape(n, b)
            lse = torch.logaddexp(lse, torch.logsumexp(log_w, dim=0))
    return (lse - math.log(k)).to(x.dtype)


def bits_per_dim(nll_nats, num_dims: int):
    """−log2 p(x) / D from an NLL in nats: nll / (D ln 2), for discrete data such as binary
    images (no dequantization offset; `likelihood.bits_per_dim` with n_bins=None)."""
    as_float = not isinstance(nll_nats, torch.Tensor)
    bpd = _bits_per_dim(-torch.as_tensor(nll_nats, dtype=torch.float64), num_dims, n_bins=None)
    return bpd.item() if as_float else bpd


def gaussian_kl(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, diag σ²) ‖ N(0, I)) = ½ Σ (μ² + σ² − 1 − 2 log σ), summed over all but the batch
    dim: [B] (Kingma & Welling 2014, App. B)."""
    return 0.5 * (mean.square() + std.square() - 1 - 2 * std.log()).flatten(1).sum(1)


# ----------------------------------------------------------------------------- latents


def _batches(x: torch.Tensor, batch_size: int):
    for start in range(0, x.shape[0], batch_size):
        yield x[start:start + batch_size]


@torch.no_grad()
def posterior_parameters(vae: nn.Module, x: torch.Tensor, *,
                         batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ, σ) of q(z | x) for the first group, flattened: each [N, L]. For the MLPVAE that is
    the whole latent; for the NVAE the top group, whose posterior depends on x alone."""
    _check_model("posterior_parameters", vae)
    check_tensor("posterior_parameters", "x", x, min_ndim=2)
    g = torch.Generator(device=x.device).manual_seed(0)  # the draw is discarded
    means, stds = [], []
    with EvalMode(vae):
        for xb in _batches(x, batch_size):
            out = vae(xb, g)
            means.append(out.mean[0].flatten(1))
            stds.append(out.std[0].flatten(1))
    return torch.cat(means), torch.cat(stds)


def _check_mixture(fn: str, mean, std, z=None, **counts) -> None:
    """mean, std [N, L]; points z [M, L]; ints >= 1 and a positive `threshold` in `counts`."""
    for name, v in counts.items():
        if name == "threshold":
            check_float(fn, name, v, positive=True)
        else:
            check_int(fn, name, v, low=1)
    check_tensor(fn, "mean", mean, min_ndim=2)
    if mean.ndim != 2 or not isinstance(std, torch.Tensor) or std.shape != mean.shape:
        raise ValueError(f"{fn}: mean and std must both be [N, L] (posterior_parameters), got "
                         f"{tuple(mean.shape)} and "
                         f"{tuple(std.shape) if isinstance(std, torch.Tensor) else std!r}")
    if z is not None and (not isinstance(z, torch.Tensor) or z.ndim != 2
                          or z.shape[1] != mean.shape[1]):
        got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"{fn}: points must be [M, {mean.shape[1]}] (the latent dimension of "
                         f"the posteriors), got {got}")


def aggregate_posterior_log_density(mean: torch.Tensor, std: torch.Tensor, z: torch.Tensor, *,
                                    chunk: int = 1024) -> torch.Tensor:
    """log q(z) = log (1/N) Σ_n N(z; μ_n, diag σ_n²), the aggregate posterior of N data points
    (Hoffman & Johnson 2016; Tomczak & Welling 2018, eq. 8), at points z [M, L]: [M]."""
    _check_mixture("aggregate_posterior_log_density", mean, std, z)
    # Σ_l (z_l − μ_nl)² / σ_nl² expanded into matrix products, in float64 (the terms cancel)
    mean64, prec = mean.double(), std.double().pow(-2)  # [N, L]
    log_norm = -(std.double().log().sum(1) + 0.5 * mean.shape[1] * LOG_2PI)  # [N]
    const = log_norm - 0.5 * (mean64.square() * prec).sum(1)
    out = []
    for zb in _batches(z.double(), chunk):
        quad = zb.square() @ prec.T - 2 * zb @ (mean64 * prec).T  # [m, N]
        out.append(torch.logsumexp((const - 0.5 * quad).to(mean.dtype), dim=1).double())
    return (torch.cat(out) - math.log(mean.shape[0])).to(mean.dtype)


def aggregate_posterior_density(vae: nn.Module, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """q(z) = (1/N) Σ_n q(z | x_n) of the data x [N, ...] at the points grid [M, L]: [M]."""
    mean, std = posterior_parameters(vae, x)
    return aggregate_posterior_log_density(mean, std, grid).exp()


def _log_standard_normal(z: torch.Tensor) -> torch.Tensor:
    return (-0.5 * z.square() - 0.5 * LOG_2PI).sum(1)


class PriorHole(NamedTuple):
    """fraction: share of prior samples z ~ N(0, I) where q(z) < threshold · p(z);
    kl_prior_aggregate: KL(p(z) ‖ q(z)) estimated as the mean of log p − log q over them (nats);
    log_ratio: log q(z) − log p(z) [n]; z: the samples [n, L]."""

    fraction: float
    kl_prior_aggregate: float
    log_ratio: torch.Tensor
    z: torch.Tensor


def prior_hole(mean: torch.Tensor, std: torch.Tensor, n: int = 10_000, generator=None, *,
               threshold: float = 0.1) -> PriorHole:
    """How much prior mass lies where the aggregate posterior q(z) has little: the "holes" that
    prior samples fall into but the decoder was never trained on (Rosca et al. 2018; LSGM Sec. 1).

    mean, std: posterior parameters [N, L] of the data (`posterior_parameters`).
    """
    _check_mixture("prior_hole", mean, std, n=n, threshold=threshold)
    z = randn((n, mean.shape[1]), generator, device=mean.device, dtype=mean.dtype)
    log_ratio = aggregate_posterior_log_density(mean, std, z) - _log_standard_normal(z)
    fraction = (log_ratio < math.log(threshold)).to(torch.float64).mean().item()
    return PriorHole(fraction, -log_ratio.mean().item(), log_ratio, z)


class ELBOSurgery(NamedTuple):
    """E_x KL(q(z|x) ‖ p(z)) = I_q(x; z) + KL(q(z) ‖ p(z)) (Hoffman & Johnson 2016), all in nats,
    Monte Carlo over the data's posterior samples; `log_n` = log N bounds the information."""

    average_kl: float
    mutual_information: float
    marginal_kl: float
    log_n: float


def elbo_surgery(mean: torch.Tensor, std: torch.Tensor, generator=None, *,
                 samples: int = 1) -> ELBOSurgery:
    """Split the ELBO's average KL into the mutual information between x and z under the
    encoder and the KL from the aggregate posterior to the prior (Hoffman & Johnson 2016).

    With z_n ~ q(z | x_n) (`samples` per point) and q(z) the mixture over the N points:
    I = mean[log q(z_n | x_n) − log q(z_n)] (≤ log N, since q(z_n) ≥ q(z_n | x_n) / N),
    marginal KL = mean[log q(z_n) − log p(z_n)]; their sum is the average KL.
    """
    _check_mixture("elbo_surgery", mean, std, samples=samples)
    mean_r, std_r = mean.repeat(samples, 1), std.repeat(samples, 1)
    noise = randn(mean_r.shape, generator, device=mean.device, dtype=mean.dtype)
    z = mean_r + std_r * noise
    log_q_cond = (-0.5 * noise.square() - std_r.log() - 0.5 * LOG_2PI).sum(1)
    log_q = aggregate_posterior_log_density(mean, std, z)
    info = (log_q_cond - log_q).mean().item()
    marginal = (log_q - _log_standard_normal(z)).mean().item()
    return ELBOSurgery(info + marginal, info, marginal, math.log(mean.shape[0]))


def _check_activity_args(fn, vae, x, samples) -> None:
    _check_model(fn, vae)
    check_int(fn, "samples", samples, low=1)
    check_tensor(fn, "x", x, min_ndim=2)
    if x.shape[0] < 2:
        raise ValueError(f"{fn}: need at least 2 data points for a variance, got {x.shape[0]}")


@torch.no_grad()
def latent_activity(vae: nn.Module, x: torch.Tensor, generator=None, *, samples: int = 1,
                    batch_size: int = 512) -> list[torch.Tensor]:
    """Cov_x(E_q[z | x]) per latent unit, one tensor per group shaped like the group's latent
    (Burda et al. 2016, Sec. 5.2). For the NVAE, E_q[ε_j | x] is averaged over `samples` draws
    of the groups above j (its posterior mean depends on them); for group 1 it is exact."""
    _check_activity_args("latent_activity", vae, x, samples)
    per_group = None
    with EvalMode(vae):
        for xb in _batches(x, batch_size):
            means = None
            for _ in range(samples):
                out = vae(xb, generator)
                means = out.mean if means is None else [a + m for a, m in zip(means, out.mean)]
            means = [m.double() / samples for m in means]
            per_group = means if per_group is None else [
                torch.cat([a, m]) for a, m in zip(per_group, means)]
    return [m.var(dim=0).to(x.dtype) for m in per_group]


def active_units(vae: nn.Module, x: torch.Tensor, threshold: float = 0.01, generator=None, *,
                 per: str = "unit", samples: int = 1) -> int:
    """Number of active latent units: activity Cov_x(E_q[z | x]) > threshold (Burda et al.
    2016, Sec. 5.2, threshold 10⁻²). per="unit" counts scalar latents (for the NVAE every
    channel at every position); per="channel" counts channels whose activity averaged over
    positions exceeds the threshold (for vector latents the two agree)."""
    check_float("active_units", "threshold", threshold, positive=True)
    if per not in ("unit", "channel"):
        raise ValueError(f"active_units: per must be 'unit' or 'channel', got {per!r}")
    activity = latent_activity(vae, x, generator, samples=samples)
    if per == "channel":
        activity = [a.reshape(a.shape[0], -1).mean(1) for a in activity]
    return int(sum((a > threshold).sum().item() for a in activity))


# ----------------------------------------------------------------------------- an exact model


def _check_linear_gaussian(fn: str, weight, bias, noise_std, posterior_std_scale=None) -> None:
    check_tensor(fn, "weight", weight, min_ndim=2)
    if weight.ndim != 2 or not isinstance(bias, torch.Tensor) or bias.shape != weight.shape[:1]:
        raise ValueError(f"{fn}: weight must be [D, L] and bias [D], got {tuple(weight.shape)} "
                         f"and {tuple(bias.shape) if isinstance(bias, torch.Tensor) else bias!r}")
    check_float(fn, "noise_std", noise_std, positive=True)
    if posterior_std_scale is None:
        return
    check_float(fn, "posterior_std_scale", posterior_std_scale, positive=True)
    gram = weight.T @ weight
    if (gram - torch.diag(torch.diagonal(gram))).abs().max() > 1e-6 * gram.abs().max():
        raise ValueError(f"{fn}: weight needs orthogonal columns (WᵀW diagonal) for the exact "
                         "posterior to be a diagonal Normal")


def linear_gaussian_log_marginal(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                 noise_std: float) -> torch.Tensor:
    """log p(x) for p(z) = N(0, I), p(x | z) = N(Wz + b, s² I): x ~ N(b, W Wᵀ + s² I): [B]."""
    _check_linear_gaussian("linear_gaussian_log_marginal", weight, bias, noise_std)
    cov = weight @ weight.T + noise_std**2 * torch.eye(weight.shape[0], dtype=weight.dtype,
                                                       device=weight.device)
    return torch.distributions.MultivariateNormal(bias, cov).log_prob(x)


@torch.no_grad()
def linear_gaussian_vae(weight: torch.Tensor, bias: torch.Tensor, noise_std: float, *,
                        posterior_std_scale: float = 1.0) -> MLPVAE:
    """A linear MLPVAE (hidden=(), Gaussian decoder) that is the linear-Gaussian model
    p(z) = N(0, I), p(x | z) = N(Wz + b, s² I), with its encoder set to the exact posterior
    N(Σ Wᵀ(x − b) / s², Σ), Σ = (I + WᵀW / s²)⁻¹, its std times `posterior_std_scale`.

    W [D, L] must have orthogonal columns (WᵀW diagonal), so that Σ is diagonal and the
    exact posterior is in the encoder's family; dtype and device follow W.
    """
    _check_linear_gaussian("linear_gaussian_vae", weight, bias, noise_std, posterior_std_scale)
    gram = weight.T @ weight
    d, latent = weight.shape
    vae = MLPVAE(d, latent, hidden=(), decoder="gaussian").to(weight)
    post_var = 1 / (1 + torch.diagonal(gram) / noise_std**2)  # [L]
    gain = post_var[:, None] * weight.T / noise_std**2  # [L, D]: posterior mean = gain (x − b)
    enc, dec = vae.encoder[0], vae.decoder_net[0]
    enc.weight.zero_()
    enc.weight[:latent] = gain
    enc.bias[:latent] = -gain @ bias
    enc.bias[latent:] = 0.5 * post_var.log() + math.log(posterior_std_scale)
    dec.weight.zero_()
    dec.weight[:d] = weight
    dec.bias[:d] = bias
    dec.bias[d:] = math.log(noise_std)
    return vae.eval()

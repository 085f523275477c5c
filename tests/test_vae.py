"""NVAE (lsgm_edu.vae) against the reference's sizes and independent oracles.

Oracles: the parameter counts of NVlabs/LSGM's `NVAE` built with the README's `train_vae.py`
flags (REFERENCE_LSGM_PSLD.md §E); torch.distributions log-densities; a brute-force Jacobian
of the flows; exhaustive sums over every pixel level; the analytic Gaussian KL; exact singular
values. The big models are built on the meta device (no memory, no init, no forward).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.autograd.functional import jacobian

from lsgm_edu.vae import (
    NVAE,
    AutoregressiveShift,
    DiscretizedMixLogistic,
    VAEConfig,
    VAEOutput,
    autoregressive_mask,
    kl_balancer,
    kl_balancer_coeff,
    kl_coeff,
    soft_clamp,
)
from lsgm_edu.vae_toy import BOOK_MNIST_VAE  # the chapters' NVAE, defined once

# VAEConfig kwargs of the five first-stage VAEs of the LSGM README (`train_vae.py` flags);
# MNIST/OMNIGLOT images are padded to 32x32 and the reconstruction cropped back (nvae.py).
PAPER_VAES = {
    "lsgm_cifar10_fid": {  # vae1 (balanced) and vae2 (best FID): same architecture
        "image_size": 32, "num_channels": 3, "num_channels_enc": 128, "num_channels_dec": 128,
        "num_preprocess_blocks": 1, "num_preprocess_cells": 2, "num_postprocess_blocks": 1,
        "num_postprocess_cells": 2, "num_latent_scales": 1, "num_groups_per_scale": 20,
        "num_latent_per_group": 9, "num_cell_per_cond_enc": 2, "num_cell_per_cond_dec": 2,
        "ch_mult": (1, 2), "cell_type": "res_bnswish", "use_se": True, "num_flows": 0,
        "decoder": "dml"},
    "lsgm_cifar10_nll": {  # vae3
        "image_size": 32, "num_channels": 3, "num_channels_enc": 256, "num_channels_dec": 256,
        "num_preprocess_blocks": 1, "num_preprocess_cells": 3, "num_postprocess_blocks": 1,
        "num_postprocess_cells": 3, "num_latent_scales": 1, "num_groups_per_scale": 4,
        "num_latent_per_group": 45, "num_cell_per_cond_enc": 3, "num_cell_per_cond_dec": 3,
        "ch_mult": (1, 2), "cell_type": "res_bnswish", "use_se": True, "num_flows": 2,
        "decoder": "dml"},
    "lsgm_mnist": {
        "image_size": 32, "num_channels": 1, "crop_output": 2, "num_channels_enc": 64,
        "num_channels_dec": 64, "num_preprocess_blocks": 2, "num_preprocess_cells": 3,
        "num_postprocess_blocks": 2, "num_postprocess_cells": 3, "num_latent_scales": 1,
        "num_groups_per_scale": 2, "num_latent_per_group": 20, "num_cell_per_cond_enc": 1,
        "num_cell_per_cond_dec": 1, "ch_mult": (1, 2, 2), "cell_type": "res_mbconv",
        "use_se": True, "num_flows": 0, "decoder": "bernoulli"},
    "lsgm_omniglot": {
        "image_size": 32, "num_channels": 1, "crop_output": 2, "num_channels_enc": 64,
        "num_channels_dec": 64, "num_preprocess_blocks": 1, "num_preprocess_cells": 2,
        "num_postprocess_blocks": 1, "num_postprocess_cells": 2, "num_latent_scales": 1,
        "num_groups_per_scale": 3, "num_latent_per_group": 20, "num_cell_per_cond_enc": 3,
        "num_cell_per_cond_dec": 3, "ch_mult": (1, 2), "cell_type": "res_mbconv",
        "use_se": True, "num_flows": 0, "decoder": "bernoulli"},
    "lsgm_celebahq256_quantitative": {
        "image_size": 256, "num_channels": 3, "num_channels_enc": 64, "num_channels_dec": 64,
        "num_preprocess_blocks": 1, "num_preprocess_cells": 2, "num_postprocess_blocks": 1,
        "num_postprocess_cells": 2, "num_latent_scales": 3, "num_groups_per_scale": 8,
        "num_latent_per_group": 20, "num_cell_per_cond_enc": 2, "num_cell_per_cond_dec": 2,
        "ch_mult": (1, 1, 2, 4), "cell_type": "res_mbconv", "use_se": True, "num_flows": 2,
        "decoder": "dml", "num_x_bits": 5, "input_skip": True},
}
# sum(p.numel() for p in NVAE(args, get_arch_cells(...)).parameters()) in NVlabs/LSGM, and the
# top-scale latent the score prior sees (REFERENCE_LSGM_PSLD.md §A3, §E).
PAPER_PARAMS = {
    "lsgm_cifar10_fid": (100_867_740, (180, 16, 16)),
    "lsgm_cifar10_nll": (130_622_772, (180, 16, 16)),
    "lsgm_mnist": (3_005_822, (40, 8, 8)),
    "lsgm_omniglot": (5_384_190, (60, 16, 16)),
    "lsgm_celebahq256_quantitative": (51_296_572, (160, 32, 32)),
}

# The book's binarized-MNIST VAE (32x32 padded, cropped back to 28x28): 124,034 parameters,
# a 20x8x8 latent; trains on two CPU cores in minutes.
# Tiny models for the behavioural tests: 8x8 images, two latent scales (2x2 top, 4x4).
TINY = {
    "image_size": 8, "num_channels": 1, "num_channels_enc": 8, "num_channels_dec": 8,
    "num_preprocess_blocks": 1, "num_preprocess_cells": 1, "num_postprocess_blocks": 1,
    "num_postprocess_cells": 1, "num_latent_scales": 2, "num_groups_per_scale": 2,
    "num_latent_per_group": 2, "num_cell_per_cond_enc": 1, "num_cell_per_cond_dec": 1,
    "ch_mult": (1, 1, 2), "cell_type": "res_bnswish", "use_se": True, "num_flows": 0,
    "decoder": "bernoulli"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny convs gain nothing from a second thread, and on a busy two-core machine OpenMP's
    spinning makes each small op ~100x slower; restore the count afterwards."""
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n_threads)


def tiny(**changes) -> VAEConfig:
    return VAEConfig(**{**TINY, **changes})


def images(cfg: VAEConfig, batch: int, seed: int = 0) -> torch.Tensor:
    """Data on the model's pixel grid: binary for Bernoulli, 8-bit levels otherwise."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, cfg.num_channels, cfg.image_size, cfg.image_size)
    if cfg.decoder == "bernoulli":
        return (torch.rand(shape, generator=g) > 0.5).float()
    return torch.randint(0, 256, shape, generator=g).float() / 255


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("name", list(PAPER_VAES))
def test_paper_vae_parameter_counts_and_latent_shapes(name):
    cfg = VAEConfig(**PAPER_VAES[name])
    with torch.device("meta"):
        vae = NVAE(cfg)
    want_params, want_latent = PAPER_PARAMS[name]
    assert n_params(vae) == want_params
    assert cfg.top_latent_shape == want_latent
    shapes = vae.latent_shapes()
    assert len(shapes) == cfg.num_latent_scales * cfg.num_groups_per_scale
    assert sum(s[0] for s in shapes[:cfg.num_groups_per_scale]) == want_latent[0]
    assert {s[1:] for s in shapes[:cfg.num_groups_per_scale]} == {want_latent[1:]}
    # lower scales (CelebA-HQ: 64^2 and 128^2) double the side at every scale
    sides = sorted({s[1] for s in shapes})
    assert sides == [want_latent[1] * 2**i for i in range(cfg.num_latent_scales)]


def test_book_mnist_vae_size_and_one_training_step():
    cfg = VAEConfig(**BOOK_MNIST_VAE)
    vae = NVAE(cfg, generator=0)
    assert 64_000 <= n_params(vae) <= 128_000
    assert cfg.top_latent_shape == (20, 8, 8)
    x = images(cfg, 2)
    out = vae(x, torch.Generator().manual_seed(0))
    assert vae.top_latent(out.eps).shape == (2, 20, 8, 8)
    loss = (vae.reconstruction_loss(out, x) + sum(out.kl)).mean()
    loss.backward()
    assert all(p.grad is not None for p in vae.parameters())


# ----------------------------------------------------------------------------- forward/backward


@pytest.mark.parametrize("changes", [
    {},
    {"cell_type": "res_mbconv", "num_flows": 1, "input_skip": True},
    {"decoder": "dml", "num_channels": 3, "num_mixtures": 3, "use_se": False},
    {"decoder": "dml", "num_channels": 3, "num_x_bits": 5, "num_latent_scales": 1, "num_flows": 2,
         "ch_mult": (1, 2)},
    {"decoder": "gaussian", "num_channels": 3, "crop_output": 1},
], ids=["bnswish-bernoulli", "mbconv-flow-inputskip", "dml8", "dml5-flows", "gaussian"])
def test_forward_backward_per_sample_terms_and_gradients(changes):
    cfg = tiny(**changes)
    vae = NVAE(cfg, generator=1)
    x = images(cfg, 3)
    out = vae(x, torch.Generator().manual_seed(0))
    assert isinstance(out, VAEOutput)
    n_groups = cfg.num_latent_scales * cfg.num_groups_per_scale
    for name in ("eps", "log_q", "log_q_per_channel", "mean", "std", "kl"):
        assert len(getattr(out, name)) == n_groups
    for eps, shape in zip(out.eps, vae.latent_shapes()):
        assert eps.shape == (3, *shape)
    for terms in (out.log_q, out.kl, [vae.reconstruction_loss(out, x)]):
        for term in terms:
            assert term.shape == (3,) and torch.isfinite(term).all()
    for per_channel, log_q in zip(out.log_q_per_channel, out.log_q):
        torch.testing.assert_close(per_channel.sum(1), log_q)

    nelbo = vae.reconstruction_loss(out, x) + sum(out.kl)
    # per-sample: sample 0's NELBO does not depend on sample 1's image
    nelbo[0].backward(retain_graph=True)
    assert vae.stem.weight.grad.abs().sum() > 0
    vae.zero_grad()
    nelbo.mean().backward()
    encoder = [vae.stem.weight, vae.posteriors[0][1].weight, *vae.encoder_groups[0].parameters()]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder)
    missing = [n for n, p in vae.named_parameters() if p.grad is None]
    assert not missing, f"no gradient reaches {missing[:5]}"


def test_per_sample_independence_in_eval_mode():
    cfg = tiny()
    vae = NVAE(cfg, generator=2).eval()
    x = images(cfg, 4)
    x_req = x.clone().requires_grad_(True)
    out = vae(x_req, torch.Generator().manual_seed(0))
    (vae.reconstruction_loss(out, x) + sum(out.kl))[1].backward()
    grad = x_req.grad.abs().sum(dim=(1, 2, 3))
    assert grad[1] > 0 and torch.all(grad[[0, 2, 3]] == 0)


def test_log_q_is_the_normal_density_at_the_returned_sample_and_kl_subtracts_the_prior():
    cfg = tiny()
    vae = NVAE(cfg, generator=3)
    out = vae(images(cfg, 5), torch.Generator().manual_seed(1))
    for eps, mu, std, log_q, kl in zip(out.eps, out.mean, out.std, out.log_q, out.kl):
        oracle = torch.distributions.Normal(mu, std).log_prob(eps).sum(dim=(1, 2, 3))
        torch.testing.assert_close(log_q, oracle, rtol=1e-5, atol=1e-4)
        prior = torch.distributions.Normal(0.0, 1.0).log_prob(eps).sum(dim=(1, 2, 3))
        torch.testing.assert_close(kl, log_q - prior, rtol=1e-5, atol=1e-4)


def test_flow_log_det_is_in_log_q_and_matches_a_brute_force_jacobian():
    cfg = tiny(num_flows=2, num_latent_per_group=3)
    vae = NVAE(cfg, generator=4).double().eval()
    x = images(cfg, 2).double()
    out = vae(x, torch.Generator().manual_seed(5))
    redraw = torch.Generator().manual_seed(5)  # the forward draws one N(0, I) tensor per group
    for j, (mu, std) in enumerate(zip(out.mean, out.std)):
        noise = torch.randn(mu.shape, generator=redraw, dtype=mu.dtype)
        base = mu + std * noise

        def flows(z, j=j):
            for cell in vae.flows[j]:
                z, _ = cell(z)
            return z

        torch.testing.assert_close(flows(base), out.eps[j])
        for b in range(2):
            jac = jacobian(flows, base[b:b + 1]).reshape(base[0].numel(), -1)
            assert (jac - torch.eye(len(jac), dtype=jac.dtype)).abs().max() > 1e-4  # not identity
            log_det = torch.linalg.slogdet(jac).logabsdet
            base_log_q = torch.distributions.Normal(mu[b], std[b]).log_prob(base[b]).sum()
            torch.testing.assert_close(out.log_q[j][b], base_log_q - log_det)
            assert abs(log_det.item()) < 1e-9  # shift flows preserve volume


@pytest.mark.parametrize("mirror", [False, True])
def test_autoregressive_shift_jacobian_is_unit_triangular_in_raster_then_channel_order(mirror):
    with torch.random.fork_rng(devices=[]):  # the layer's default init draws from global RNG
        shift = AutoregressiveShift(3, mirror=mirror).double()
    with torch.no_grad():
        for p in shift.parameters():
            p.normal_(generator=torch.Generator().manual_seed(p.numel()))
    z = torch.randn(1, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    jac = jacobian(shift, z).reshape(3, 16, 3, 16)  # [c_out, pixel_out, c_in, pixel_in]
    if mirror:
        jac = jac.flip(1, 3)  # the mirrored cell is causal in reverse raster order
    jac = jac.permute(1, 0, 3, 2).reshape(48, 48)  # order: pixel (raster) major, channel minor
    torch.testing.assert_close(torch.diagonal(jac), torch.ones(48, dtype=torch.float64))
    assert torch.triu(jac, diagonal=1).abs().max() == 0
    assert torch.tril(jac, diagonal=-1).abs().max() > 1e-3


def test_autoregressive_mask_channel_blocks():
    m = autoregressive_mask(2, 4, 1, zero_diagonal=True)[:, :, 0, 0]  # out block i sees in < i
    assert m.tolist() == [[0, 0], [0, 0], [1, 0], [1, 0]]
    m = autoregressive_mask(4, 2, 1)[:, :, 0, 0]  # out i sees in blocks <= i
    assert m.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


# ----------------------------------------------------------------------------- decoders


def _all_levels(num_channels: int, bits: int) -> torch.Tensor:
    levels = torch.arange(2**bits, dtype=torch.float64) / (2**bits - 1)
    grid = torch.cartesian_prod(*[levels] * num_channels)
    return grid.reshape(-1, num_channels)


@pytest.mark.parametrize("num_channels,bits", [(3, 5), (1, 8), (3, 2)])
def test_discretized_mixture_of_logistics_sums_to_one_over_all_levels(num_channels, bits):
    m, pixels = 3, 4
    g = torch.Generator().manual_seed(bits)
    n_par = DiscretizedMixLogistic.num_params(num_channels, m)
    params = torch.randn(1, n_par, 1, pixels, generator=g, dtype=torch.float64) * 3
    # stress the tails: very sharp and very wide components, locations outside [-1, 1]
    locs = slice(m, m + 2 * num_channels * m)
    per_channel = params[:, locs].clone().reshape(1, num_channels, 2 * m, 1, pixels)
    per_channel[:, :, m:, :, 0] = -7.0
    per_channel[:, :, m:, :, 1] = 4.0
    params[:, locs] = per_channel.reshape(1, -1, 1, pixels)
    grid = _all_levels(num_channels, bits)  # [L^C, C]
    x = grid[:, :, None, None].expand(-1, -1, 1, pixels)
    dml = DiscretizedMixLogistic(params.expand(len(grid), -1, -1, -1), num_channels, m, bits)
    log_p = dml.log_prob(x)  # [L^C, 1, pixels]
    total = torch.logsumexp(log_p, dim=0)
    torch.testing.assert_close(total, torch.zeros_like(total), atol=1e-10, rtol=0)


def test_discretized_logistic_bins_match_the_naive_cdf_difference():
    g = torch.Generator().manual_seed(0)
    params = torch.randn(64, DiscretizedMixLogistic.num_params(1, 1), 1, 1, generator=g,
                         dtype=torch.float64)
    x = torch.randint(0, 256, (64, 1, 1, 1), generator=g).double() / 255
    dml = DiscretizedMixLogistic(params, 1, 1, 8)
    loc, log_s = params[:, 1], params[:, 2].clamp(min=-7)
    xs = 2 * x[:, 0] - 1
    upper = torch.sigmoid((xs - loc + 1 / 255) / log_s.exp())
    lower = torch.sigmoid((xs - loc - 1 / 255) / log_s.exp())
    upper = torch.where(x[:, 0] == 1, torch.ones_like(upper), upper)
    lower = torch.where(x[:, 0] == 0, torch.zeros_like(lower), lower)
    torch.testing.assert_close(dml.log_prob(x), torch.log(upper - lower))


def test_bernoulli_and_gaussian_reconstruction_match_torch_distributions_with_crop():
    cfg = tiny(crop_output=2)
    vae = NVAE(cfg, generator=6)
    x = images(cfg, 3)
    logits = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    oracle = torch.distributions.Bernoulli(logits=logits).log_prob(x)[:, :, 2:6, 2:6]
    bce = F.binary_cross_entropy_with_logits(logits, x, reduction="none")[:, :, 2:6, 2:6]
    torch.testing.assert_close(vae.reconstruction_loss(logits, x), -oracle.sum(dim=(1, 2, 3)))
    torch.testing.assert_close(vae.reconstruction_loss(logits, x), bce.sum(dim=(1, 2, 3)))

    cfg = tiny(decoder="gaussian", num_channels=3)
    vae = NVAE(cfg, generator=6)
    x = images(cfg, 3)
    params = torch.randn(3, 6, 8, 8, generator=torch.Generator().manual_seed(1)) * 4
    mu, log_sigma = (5 * torch.tanh(params / 5)).chunk(2, dim=1)
    oracle = torch.distributions.Normal(mu, log_sigma.exp()).log_prob(2 * x - 1)
    torch.testing.assert_close(vae.reconstruction_loss(params, x), -oracle.sum(dim=(1, 2, 3)))


def test_five_bit_preprocessing_matches_change_bit_length():
    cfg = tiny(decoder="dml", num_channels=3, num_x_bits=5)
    vae = NVAE(cfg, generator=0)
    x8 = torch.arange(256.0) / 255
    reference = torch.floor(torch.arange(256.0) / 8) / 31  # floor(x 255 / 2^(8-5)) / (2^5 - 1)
    torch.testing.assert_close((vae.preprocess_images(x8) + 1) / 2, reference)


def test_decoder_samples_and_means_are_images_in_the_unit_interval():
    for changes in ({}, {"decoder": "dml", "num_channels": 3}, {"decoder": "gaussian"}):
        cfg = tiny(**changes)
        vae = NVAE(cfg, generator=7).eval()
        logits = vae(images(cfg, 2), torch.Generator().manual_seed(0)).logits * 10
        for img in (vae.sample_images(logits, torch.Generator().manual_seed(0)),
                    vae.decoder_mean(logits)):
            assert img.shape == (2, cfg.num_channels, 8, 8)
            assert img.min() >= 0 and img.max() <= 1
        if cfg.decoder == "bernoulli":
            assert set(vae.sample_images(logits).unique().tolist()) <= {0.0, 1.0}


# ----------------------------------------------------------------------------- posterior, KL


def test_soft_clamp_bounds_and_posterior_parameters_stay_inside():
    x = torch.tensor([-1e6, -10.0, 0.0, 1e-3, 10.0, 1e6])
    y = soft_clamp(x, 5.0)
    assert y.abs().max() <= 5.0 and y[0] == -5.0 and y[-1] == 5.0
    torch.testing.assert_close(y[3], x[3], rtol=1e-6, atol=0)  # identity near zero
    cfg = tiny(log_sig_q_scale=2.0)
    vae = NVAE(cfg, generator=8)
    with torch.no_grad():
        for post in vae.posteriors:
            post[1].log_weight_norm.fill_(8.0)  # blow the posterior convs up
    out = vae(images(cfg, 4), torch.Generator().manual_seed(0))
    for mu, std in zip(out.mean, out.std):
        assert mu.abs().max() <= 5.0 and mu.abs().max() > 4.0
        assert std.log().abs().max() <= 2.0 + 1e-6 and std.log().abs().max() > 1.5


def test_monte_carlo_kl_matches_the_analytic_normal_kl():
    cfg = tiny()
    vae = NVAE(cfg, generator=9).eval()
    x = images(cfg, 1).expand(4096, -1, -1, -1)
    with torch.no_grad():
        out = vae(x, torch.Generator().manual_seed(3))
    for mu, std, kl in zip(out.mean, out.std, out.kl):
        analytic = (0.5 * (mu.square() + std.square() - 1) - std.log()).sum(dim=(1, 2, 3))
        diff = (kl - analytic).double()
        stderr = diff.std() / math.sqrt(len(diff))
        assert abs(diff.mean()) < 4 * stderr, (diff.mean().item(), stderr.item())
        assert analytic.mean() > 0.1  # a posterior that differs from the prior


# ----------------------------------------------------------------------------- latents, sampling


def test_top_latent_split_and_decode_reproduce_the_forward_pass():
    for changes in ({"num_latent_scales": 1, "ch_mult": (1, 2)}, {}):
        cfg = tiny(**changes)
        vae = NVAE(cfg, generator=10).eval()
        with torch.no_grad():
            out = vae(images(cfg, 3), torch.Generator().manual_seed(0))
            z = vae.top_latent(out.eps)
            assert z.shape == (3, *cfg.top_latent_shape)
            for a, b in zip(vae.split_top_latent(z), out.eps):
                assert torch.equal(a, b)
            torch.testing.assert_close(vae.decode(out.eps), out.logits)
            if cfg.num_latent_scales == 1:
                torch.testing.assert_close(vae.decode(z), out.logits)


def test_sampling_is_reproducible_and_leaves_global_rng_alone():
    for changes in ({}, {"decoder": "dml", "num_channels": 3, "num_flows": 1}):
        state = torch.get_rng_state()
        vae = NVAE(tiny(**changes), generator=11).eval()
        a = vae.sample(4, generator=torch.Generator().manual_seed(1), temperature=0.8)
        b = vae.sample(4, generator=torch.Generator().manual_seed(1), temperature=0.8)
        c = vae.sample(4, generator=torch.Generator().manual_seed(2), temperature=0.8)
        out = vae(images(vae.config, 2), torch.Generator().manual_seed(0))
        logits = vae.decode(vae.top_latent(out.eps), generator=torch.Generator().manual_seed(0))
        vae.sample_images(logits, torch.Generator().manual_seed(0))
        assert torch.equal(torch.get_rng_state(), state), "global RNG state was touched"
        assert torch.equal(a, b) and not torch.equal(a, c)
        assert a.shape == (4, vae.config.num_channels, 8, 8)
        # the construction is deterministic in its generator as well
        for p, q in zip(vae.parameters(), NVAE(tiny(**changes), generator=11).parameters()):
            assert torch.equal(p, q)


def test_float64_follows_the_input():
    cfg = tiny(decoder="dml", num_channels=3, num_flows=1)
    vae = NVAE(cfg, generator=12).double()
    x = images(cfg, 2).double()
    out = vae(x, torch.Generator().manual_seed(0))
    assert out.logits.dtype == torch.float64 and out.eps[0].dtype == torch.float64
    assert vae.reconstruction_loss(out, x).dtype == torch.float64
    assert vae.sample(2, torch.Generator().manual_seed(0)).dtype == torch.float64


# ----------------------------------------------------------------------------- regularizers


def test_spectral_regularization_equals_exact_singular_values_and_is_differentiable():
    vae = NVAE(tiny(cell_type="res_mbconv", num_flows=1), generator=13)
    convs = vae._convs()
    exact = sum(torch.linalg.matrix_norm(c.normalized_weight().detach().flatten(1), ord=2)
                for c in convs)
    bn = sum(m.weight.detach().abs().max() for m in vae.modules()
             if isinstance(m, torch.nn.BatchNorm2d))
    reg = vae.spectral_regularization(num_power_iter=30)  # 300 iterations on the first call
    assert reg > 0
    torch.testing.assert_close(reg.detach(), exact + bn, rtol=1e-4, atol=0)
    assert all(bool(p.initialized) for p in vae.spectral)  # warm-started from now on
    with torch.no_grad():
        for m in vae.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(0))
    reg = vae.spectral_regularization()
    reg.backward()
    assert convs[0].log_weight_norm.grad.abs().sum() > 0
    assert vae.preprocess[0].branch[0].bn_act[0].weight.grad.abs().sum() > 0


def test_kl_coeff_schedule():
    assert kl_coeff(0, 100, 10, 1e-4, 0.7) == 1e-4
    assert kl_coeff(60, 100, 10, 1e-4, 0.7) == pytest.approx(1e-4 + (0.7 - 1e-4) * 0.5)
    assert kl_coeff(10_000, 100, 10, 1e-4, 0.7) == 0.7


def test_kl_balancer_weights_and_gradient():
    alpha = kl_balancer_coeff([2, 2], "square")
    assert alpha.tolist() == [1.0, 1.0, 4.0, 4.0]  # 4^i / groups, smallest 1
    kl_all = [torch.tensor([1.0, 3.0], requires_grad=True), torch.tensor([10.0, 10.0]),
              torch.tensor([0.0, 0.0]), torch.tensor([4.0, 8.0])]
    kl, gamma, vals = kl_balancer(kl_all, kl_coeff=1.0, balance=True, alpha=alpha)
    torch.testing.assert_close(kl, torch.tensor([15.0, 21.0]))  # β = 1: no balancing
    assert torch.equal(gamma, torch.ones(4))
    kl, gamma, vals = kl_balancer(kl_all, kl_coeff=0.5, balance=True, alpha=alpha)
    raw = (torch.tensor([2.0, 10.0, 0.0, 6.0]) + 0.01) / alpha
    torch.testing.assert_close(gamma, raw / raw.mean())
    torch.testing.assert_close(vals, torch.tensor([2.0, 10.0, 0.0, 6.0]))
    torch.testing.assert_close(kl, 0.5 * (torch.stack(kl_all, 1) * gamma).sum(1))
    kl.sum().backward()
    torch.testing.assert_close(kl_all[0].grad, 0.5 * gamma[0].expand(2))  # γ not differentiated
    with pytest.raises(ValueError, match="alpha"):
        kl_balancer(kl_all, kl_coeff=0.5, balance=True)


# ----------------------------------------------------------------------------- training


def test_training_on_binarized_digits_lowers_the_nelbo():
    from sklearn.datasets import load_digits

    digits = torch.from_numpy(load_digits().images.astype(np.float32)) / 16
    x_all = (digits > 0.5).float()[:, None]  # [1797, 1, 8, 8]
    train, held_out = x_all[:-256], x_all[-256:]
    cfg = tiny(num_latent_scales=1, num_groups_per_scale=2, num_latent_per_group=4,
               ch_mult=(1, 2))  # 29k parameters, a 8x4x4 latent
    vae = NVAE(cfg, generator=0)
    alpha = kl_balancer_coeff(vae.groups_per_scale)

    def held_out_nelbo() -> float:
        vae.eval()
        with torch.no_grad():
            out = vae(held_out, torch.Generator().manual_seed(1))
            value = (vae.reconstruction_loss(out, held_out) + sum(out.kl)).mean().item()
        vae.train()
        return value

    before = held_out_nelbo()
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(200):
        x = train[torch.randint(0, len(train), (64,), generator=g)]
        out = vae(x, g)
        # NVAE pre-training: KL warm-up with balancing, spectral regularization
        kl, _, _ = kl_balancer(out.kl, kl_coeff(step, 100, 0, 0.1, 1.0), balance=True,
                               alpha=alpha)
        loss = (vae.reconstruction_loss(out, x) + kl).mean() + 1e-3 * vae.spectral_regularization()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = held_out_nelbo()
    assert after < 0.6 * before, (before, after)
    assert after < 30.0, (before, after)  # nats per 8x8 binary digit (44 nats at p = 1/2)


# ----------------------------------------------------------------------------- config


def test_config_validation_names_the_field():
    assert VAEConfig(ch_mult=[1, 2]).ch_mult == (1, 2)  # YAML lists become tuples
    bad = [
        ({"decoder": "logistic"}, "VAEConfig.decoder"),
        ({"cell_type": "res_gn"}, "VAEConfig.cell_type"),
        ({"ch_mult": (1, 2, 2)}, "VAEConfig.ch_mult"),
        ({"num_postprocess_blocks": 2}, "VAEConfig.num_postprocess_blocks"),
        ({"image_size": 30}, "VAEConfig.image_size"),
        ({"num_x_bits": 9}, "VAEConfig.num_x_bits"),
        ({"decoder": "bernoulli", "num_x_bits": 5}, "VAEConfig.num_x_bits"),
        ({"num_flows": -1}, "VAEConfig.num_flows"),
        ({"use_se": 1}, "VAEConfig.use_se"),
        ({"num_groups_per_scale": 2.0}, "VAEConfig.num_groups_per_scale"),
        ({"crop_output": 16}, "VAEConfig.crop_output"),
        ({"log_sig_q_scale": 0.0}, "VAEConfig.log_sig_q_scale"),
    ]
    for kwargs, field in bad:
        with pytest.raises(ValueError, match=field):
            VAEConfig(**kwargs)
    with pytest.raises(TypeError):
        NVAE(dataclasses.asdict(VAEConfig()))
    vae = NVAE(tiny(), generator=0)
    with pytest.raises(ValueError, match="NVAE: x must be"):
        vae(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="split_top_latent"):
        vae.split_top_latent(torch.zeros(2, 5, 2, 2))


def test_activation_checkpointing_changes_memory_not_the_training_step():
    """model.vae.checkpointing recomputes each cell in the backward pass (the cells run twice)
    and gives the same loss, gradients and BatchNorm running statistics as the plain step."""
    results = {}
    for checkpointing in (False, True):
        vae = NVAE(tiny(checkpointing=checkpointing), generator=0).train()
        calls = []
        vae.postprocess[0].register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
        x = (torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)) > 0.5).float()
        out = vae(x, torch.Generator().manual_seed(2))
        loss = (vae.reconstruction_loss(out, x) + torch.stack(out.kl).sum(0)).mean()
        loss.backward()
        results[checkpointing] = (loss.detach(), {n: p.grad.clone() for n, p in
                                                  vae.named_parameters() if p.grad is not None},
                                  {n: b.clone() for n, b in vae.named_buffers()
                                   if "running" in n or "num_batches" in n}, len(calls))
    (loss0, grads0, stats0, calls0), (loss1, grads1, stats1, calls1) = results[False], results[True]
    assert (calls0, calls1) == (1, 2)  # recomputed in backward
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    assert grads1.keys() == grads0.keys() and len(grads0) > 0
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-5, atol=1e-7, msg=name)
    assert stats1.keys() == stats0.keys() and len(stats0) > 0
    for name in stats0:
        torch.testing.assert_close(stats1[name], stats0[name], rtol=0, atol=0, msg=name)

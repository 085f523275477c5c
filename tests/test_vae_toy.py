"""The vector-latent VAE and chapter 10's measurements, against exact oracles.

The linear-Gaussian model p(z) = N(0, I), p(x|z) = N(Wz + b, s² I) has a closed-form marginal
and posterior: with the exact posterior the ELBO *is* log p(x) for every sample; with a
posterior whose std is r times too large the gap is the KL L/2 (r² − 1 − 2 log r); the IWAE
bound rises with k to log p(x). The aggregate posterior of the exact model over its own data is
the prior; a mixture density integrates to one; active units count exactly the informative
latents of a constructed encoder.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from test_vae import TINY as TINY_NVAE  # 8x8 images, two latent scales (2x2 top, 4x4)

from lsgm_edu.data import binarize, load_dataset
from lsgm_edu.vae import NVAE, VAEConfig
from lsgm_edu.vae_toy import (
    BOOK_MNIST_VAE,
    MLPVAE,
    active_units,
    aggregate_posterior_density,
    aggregate_posterior_log_density,
    bits_per_dim,
    elbo_surgery,
    elbo_terms,
    fit_vae,
    gaussian_kl,
    iwae_bound,
    latent_activity,
    linear_gaussian_log_marginal,
    linear_gaussian_vae,
    posterior_parameters,
    prior_hole,
)

F64 = torch.float64

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small networks gain nothing from a second thread, and on a busy two-core machine
    OpenMP's spinning makes each small op far slower; restore the count afterwards."""
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n_threads)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def linear_gaussian(d: int = 5, latent: int = 2, seed: int = 0):
    """W [d, latent] with orthogonal columns of different lengths, b [d], s."""
    q, _ = torch.linalg.qr(torch.randn(d, latent, generator=gen(seed), dtype=F64))
    scales = torch.linspace(2.0, 0.7, latent, dtype=F64)
    return q * scales, torch.randn(d, generator=gen(seed + 1), dtype=F64), 0.5


def model_data(weight, bias, s, n, seed):
    z = torch.randn(n, weight.shape[1], generator=gen(seed), dtype=F64)
    return z @ weight.T + bias + s * torch.randn(n, weight.shape[0], generator=gen(seed + 1),
                                                  dtype=F64)


def digits01(split: str = "train") -> torch.Tensor:
    ds = load_dataset("binarized_digits8x8", split)
    return ds.data.float() / (ds.num_levels - 1)


# ----------------------------------------------------------------------------- exact oracles


def test_exact_posterior_elbo_equals_log_marginal_for_every_sample():
    weight, bias, s = linear_gaussian()
    vae = linear_gaussian_vae(weight, bias, s)
    x = model_data(weight, bias, s, 64, 10)
    log_p = linear_gaussian_log_marginal(x, weight, bias, s)
    # p(x, z) / q(z | x) = p(x) at *every* z when q is the exact posterior
    terms = elbo_terms(vae, x, gen(11))
    torch.testing.assert_close(terms.elbo, log_p, rtol=0, atol=1e-10)
    torch.testing.assert_close(iwae_bound(vae, x, 7, gen(12)), log_p, rtol=0, atol=1e-10)
    torch.testing.assert_close(terms.elbo, -(terms.reconstruction + terms.kl))


def test_elbo_gap_is_the_kl_to_the_posterior():
    weight, bias, s = linear_gaussian(latent=3)
    r = 2.0
    vae = linear_gaussian_vae(weight, bias, s, posterior_std_scale=r)
    x = model_data(weight, bias, s, 4, 20).repeat(2000, 1)  # 2000 ELBO draws per point
    elbo = elbo_terms(vae, x, gen(21)).elbo.reshape(2000, 4)
    gap = linear_gaussian_log_marginal(x[:4], weight, bias, s) - elbo.mean(0)
    exact = 0.5 * 3 * (r**2 - 1 - 2 * math.log(r))  # KL(q ‖ p(z|x)), the same for every x
    se = elbo.std(0) / math.sqrt(2000)
    assert ((gap - exact).abs() < 4 * se).all(), (gap, exact, se)


def test_iwae_rises_with_k_to_log_marginal():
    weight, bias, s = linear_gaussian()
    vae = linear_gaussian_vae(weight, bias, s, posterior_std_scale=1.8)
    x = model_data(weight, bias, s, 8, 30)
    log_p = linear_gaussian_log_marginal(x, weight, bias, s)
    reps = 100
    bounds = {k: torch.stack([iwae_bound(vae, x, k, gen(100 * k + i)) for i in range(reps)])
              for k in (1, 4, 16, 64)}
    gaps = [(log_p - b.mean(0)).mean().item() for b in bounds.values()]
    assert all(g > 0 for g in gaps) and all(a > b for a, b in itertools.pairwise(gaps)), gaps
    assert gaps[-1] < 0.05 * gaps[0]
    far = iwae_bound(vae, x, 4096, gen(31))
    assert (log_p - far).abs().max() < 0.02
    # the same seed gives the same bound, also when the k samples are drawn in chunks
    torch.testing.assert_close(iwae_bound(vae, x, 10, gen(5), max_batch=8),
                               iwae_bound(vae, x, 10, gen(5), max_batch=8))


def test_iwae_with_k1_is_the_one_sample_elbo():
    vae = MLPVAE((1, 8, 8), 3, hidden=(16,), generator=1)
    x = binarize(digits01()[:32], generator=gen(1))
    torch.testing.assert_close(iwae_bound(vae, x, 1, gen(2)), elbo_terms(vae, x, gen(2)).elbo)


def test_aggregate_posterior_of_the_exact_model_is_the_prior():
    weight, bias, s = linear_gaussian(d=4, latent=2)
    vae = linear_gaussian_vae(weight, bias, s)
    x = model_data(weight, bias, s, 3000, 40)
    mean, std = posterior_parameters(vae, x)
    surgery = elbo_surgery(mean, std, gen(41))
    assert abs(surgery.marginal_kl) < 0.02
    assert 0 < surgery.mutual_information <= surgery.log_n
    hole = prior_hole(mean, std, 4000, gen(42), threshold=0.1)
    assert hole.fraction < 0.005 and abs(hole.kl_prior_aggregate) < 0.02
    z = torch.randn(500, 2, generator=gen(43), dtype=F64)
    log_p = -0.5 * z.square().sum(1) - math.log(2 * math.pi)
    assert (aggregate_posterior_log_density(mean, std, z) - log_p).abs().median() < 0.05


def test_standard_normal_posteriors_have_no_hole_and_no_information():
    mean, std = torch.zeros(50, 3, dtype=F64), torch.ones(50, 3, dtype=F64)
    hole = prior_hole(mean, std, 1000, gen(0))
    assert hole.fraction == 0 and abs(hole.kl_prior_aggregate) < 1e-12
    surgery = elbo_surgery(mean, std, gen(1), samples=3)
    assert max(map(abs, surgery[:3])) < 1e-12


def test_separated_posteriors_leave_a_hole_in_the_middle():
    mean = torch.tensor([[-3.0, 0.0], [3.0, 0.0]]).repeat(100, 1)
    std = torch.full_like(mean, 0.2)
    hole = prior_hole(mean, std, 4000, gen(0), threshold=0.1)
    assert hole.fraction > 0.95 and hole.kl_prior_aggregate > 5
    assert (hole.log_ratio[hole.z[:, 0].abs() < 1] < math.log(0.1)).all()


def test_aggregate_posterior_density_integrates_to_one():
    vae = MLPVAE((1, 8, 8), 2, hidden=(32,), generator=3)
    x = binarize(digits01()[:300], generator=gen(4))
    n, lim = 401, 8.0
    axis = torch.linspace(-lim, lim, n)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1).reshape(-1, 2)
    q = aggregate_posterior_density(vae, x, grid)
    area = (2 * lim / (n - 1)) ** 2
    assert abs(q.sum().item() * area - 1) < 1e-3


def test_aggregate_log_density_is_the_mixture_average():
    mean = torch.randn(7, 3, generator=gen(0), dtype=F64)
    std = torch.rand(7, 3, generator=gen(1), dtype=F64) + 0.1
    z = torch.randn(11, 3, generator=gen(2), dtype=F64) * 2
    normals = torch.distributions.Independent(torch.distributions.Normal(mean, std), 1)
    direct = torch.logsumexp(normals.log_prob(z[:, None, :]), dim=1) - math.log(7)
    torch.testing.assert_close(aggregate_posterior_log_density(mean, std, z, chunk=4), direct)


def test_elbo_surgery_adds_up_to_the_average_kl():
    mean = torch.randn(400, 2, generator=gen(0), dtype=F64)
    std = torch.rand(400, 2, generator=gen(1), dtype=F64) * 0.5 + 0.1
    s = elbo_surgery(mean, std, gen(2), samples=50)
    assert s.average_kl == pytest.approx(s.mutual_information + s.marginal_kl, abs=1e-12)
    assert s.average_kl == pytest.approx(gaussian_kl(mean, std).mean().item(), rel=0.02)
    assert 0 < s.mutual_information <= s.log_n and s.marginal_kl > 0


def test_gaussian_kl_is_the_closed_form():
    mean = torch.randn(5, 2, 3, generator=gen(0), dtype=F64)
    std = torch.rand(5, 2, 3, generator=gen(1), dtype=F64) + 0.2
    d = torch.distributions
    want = d.kl_divergence(d.Normal(mean, std), d.Normal(0.0, 1.0)).flatten(1).sum(1)
    torch.testing.assert_close(gaussian_kl(mean, std), want)


# ----------------------------------------------------------------------------- active units


def test_active_units_count_exactly_the_informative_latents():
    vae = MLPVAE((1, 8, 8), 6, hidden=(), generator=0)
    with torch.no_grad():
        enc = vae.encoder[0]
        enc.weight.zero_()
        enc.bias.zero_()
        enc.weight[[0, 3]] = torch.randn(2, 64, generator=gen(1))  # only μ_0 and μ_3 see x
        enc.weight[6:] = torch.randn(6, 64, generator=gen(2))  # σ(x) varies: not activity
    x = binarize(digits01()[:200], generator=gen(3))
    activity = latent_activity(vae, x)
    assert [a.shape for a in activity] == [(6,)]
    assert (activity[0][[1, 2, 4, 5]] == 0).all() and (activity[0][[0, 3]] > 0.5).all()
    assert active_units(vae, x) == 2 == active_units(vae, x, per="channel")
    assert active_units(vae, x, threshold=1e6) == 0


def test_nvae_activity_has_the_latent_shapes_and_a_silenced_group_is_inactive():
    vae = NVAE(VAEConfig(**TINY_NVAE), generator=0)
    with torch.no_grad():  # group 0's posterior mean no longer depends on x
        conv = vae.posteriors[0][1]
        conv.weight.zero_()
        conv.bias.zero_()
    x = binarize(digits01()[:64], generator=gen(1))
    activity = latent_activity(vae, x, gen(2), samples=2)
    assert [tuple(a.shape) for a in activity] == vae.latent_shapes()
    assert (activity[0] == 0).all()
    units = sum(a.numel() for a in activity)
    assert 0 < active_units(vae, x, 1e-6, gen(2)) <= units - activity[0].numel()
    assert active_units(vae, x, 1e-6, gen(2), per="channel") <= 2 * (len(activity) - 1)


# ----------------------------------------------------------------------------- the model


def test_mlpvae_returns_the_nvae_output_contract():
    vae = MLPVAE((1, 8, 8), 4, hidden=(16, 8), generator=0)
    x = binarize(digits01()[:10], generator=gen(0))
    out = vae(x, gen(1))
    assert out.logits.shape == x.shape
    for field in ("eps", "mean", "std"):
        assert [t.shape for t in getattr(out, field)] == [(10, 4)]
    assert out.log_q_per_channel[0].shape == (10, 4)
    z = out.eps[0]
    log_prior = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1)
    log_q = torch.distributions.Normal(out.mean[0], out.std[0]).log_prob(z).sum(1)
    torch.testing.assert_close(out.log_q[0], log_q)
    torch.testing.assert_close(out.kl[0], log_q - log_prior)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(out.logits, x, reduction="none")
    torch.testing.assert_close(vae.reconstruction_loss(out, x), bce.flatten(1).sum(1))
    torch.testing.assert_close(vae.decode(z), out.logits)
    samples = vae.sample(5, gen(2))
    assert samples.shape == (5, 1, 8, 8) and set(samples.unique().tolist()) <= {0.0, 1.0}
    assert vae.sample(3, gen(2), use_mean=True).shape == (3, 1, 8, 8)


def test_gaussian_decoder_is_a_density_on_x():
    vae = MLPVAE(6, 2, hidden=(8,), decoder="gaussian", generator=0)
    x = torch.randn(4, 6, generator=gen(0))
    out = vae(x, gen(1))
    assert out.logits.shape == (4, 12)
    mu, log_sigma = out.logits.chunk(2, dim=1)
    want = -torch.distributions.Normal(mu, log_sigma.exp()).log_prob(x).sum(1)
    torch.testing.assert_close(vae.reconstruction_loss(out, x), want)


def test_bits_per_dim():
    assert bits_per_dim(784 * math.log(2), 784) == pytest.approx(1.0)
    torch.testing.assert_close(bits_per_dim(torch.tensor([0.0, 2 * math.log(2)]), 2),
                               torch.tensor([0.0, 1.0], dtype=F64))


def test_book_mnist_vae_is_the_documented_size():
    vae = NVAE(VAEConfig(**BOOK_MNIST_VAE), generator=0)
    assert sum(p.numel() for p in vae.parameters()) == 124_034
    assert vae.config.top_latent_shape == (20, 8, 8)


# ----------------------------------------------------------------------------- training


def test_fit_vae_lowers_the_nelbo_reproducibly_without_global_rng():
    data = load_dataset("binarized_digits8x8")
    state = torch.random.get_rng_state()
    runs = []
    for _ in range(2):
        vae = MLPVAE((1, 8, 8), 2, hidden=(64,), generator=0)
        runs.append((vae, fit_vae(vae, data, 300, batch_size=64, lr=3e-3, generator=5,
                                  progress=False)))
    assert torch.equal(torch.random.get_rng_state(), state)
    (vae, nelbo), (vae2, nelbo2) = runs
    assert nelbo.shape == (300,) and torch.equal(nelbo, nelbo2)
    assert all(torch.equal(a, b) for a, b in zip(vae.parameters(), vae2.parameters()))
    assert nelbo[-30:].mean() < nelbo[:30].mean() - 5
    assert not vae.training
    test = binarize(digits01("test"), generator=gen(0))
    untrained = MLPVAE((1, 8, 8), 2, hidden=(64,), generator=0)
    assert elbo_terms(vae, test, gen(1)).elbo.mean() > elbo_terms(untrained, test, gen(1)).elbo.mean()


def test_fit_vae_trains_the_nvae_with_warmup_and_balancing_reproducibly():
    data = load_dataset("binarized_digits8x8")
    losses = []
    for _ in range(2):
        vae = NVAE(VAEConfig(**TINY_NVAE), generator=0)
        losses.append(fit_vae(vae, data, 3, batch_size=8, generator=gen(1), kl_warmup_steps=2,
                              kl_balance=True, progress=False))
    assert torch.equal(*losses) and torch.isfinite(losses[0]).all()


def test_fit_vae_takes_a_tensor_of_probabilities():
    x = digits01()[:100]
    vae = MLPVAE((1, 8, 8), 2, hidden=(16,), generator=0)
    nelbo = fit_vae(vae, x, 5, batch_size=16, generator=0, binarize=True, progress=False)
    assert nelbo.shape == (5,)


# ----------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("call, match", [
    (lambda: MLPVAE((1, 8, 8), 2, decoder="poisson"), "decoder must be one of"),
    (lambda: MLPVAE((1, 0, 8), 2), "data_shape"),
    (lambda: MLPVAE(64, 0), "latent_dim"),
    (lambda: MLPVAE(64, 2, hidden=(8, -1)), "hidden"),
    (lambda: MLPVAE((1, 8, 8), 2)(torch.zeros(3, 64)), r"x must be a floating-point tensor \[B, 1, 8, 8\]"),
    (lambda: MLPVAE(64, 2).decode(torch.zeros(3, 5)), r"z must be \[B, 2\]"),
    (lambda: fit_vae(MLPVAE(64, 2), torch.rand(10, 64), 0, progress=False), "steps"),
    (lambda: fit_vae(MLPVAE(64, 2), torch.rand(10, 64), 5, lr=-1.0, progress=False), "lr"),
    (lambda: fit_vae(MLPVAE(64, 2), [1, 2], 5, progress=False), "data must be an ImageDataset"),
    (lambda: fit_vae(MLPVAE(64, 2), 2 * torch.ones(10, 64), 5, binarize=True, progress=False),
     r"in \[0, 1\]"),
    (lambda: iwae_bound(MLPVAE(64, 2), torch.rand(3, 64), 0), "k must be an int >= 1"),
    (lambda: iwae_bound(torch.nn.Linear(2, 2), torch.rand(3, 2), 1), "vae must be"),
    (lambda: aggregate_posterior_log_density(torch.zeros(5, 2), torch.ones(5, 2),
                                             torch.zeros(4, 3)), r"points must be \[M, 2\]"),
    (lambda: aggregate_posterior_log_density(torch.zeros(5, 2), torch.ones(5, 3),
                                             torch.zeros(4, 2)), "mean and std must both"),
    (lambda: prior_hole(torch.zeros(5, 2), torch.ones(5, 2), threshold=0.0), "threshold"),
    (lambda: active_units(MLPVAE(64, 2), torch.rand(4, 64), per="pixel"), "per must be"),
    (lambda: latent_activity(MLPVAE(64, 2), torch.rand(1, 64)), "at least 2"),
    (lambda: linear_gaussian_vae(torch.ones(3, 2, dtype=F64), torch.zeros(3, dtype=F64), 0.5),
     "orthogonal columns"),
    (lambda: linear_gaussian_log_marginal(torch.zeros(2, 3), torch.ones(3, 2), torch.zeros(2),
                                          0.5), r"weight must be \[D, L\] and bias \[D\]"),
])
def test_bad_arguments_say_what_is_wrong(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()

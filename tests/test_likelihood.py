"""Probability-flow likelihoods against exact densities (Song et al. 2021, eq. 39), Hutchinson's
estimator, encode/decode, and the bits/dim offset of uniform dequantization."""

import math

import pytest
import torch

from lsgm_edu.likelihood import (
    LikelihoodResult,
    bits_per_dim,
    decode,
    dequantize,
    divergence,
    draw_probes,
    encode,
    hutchinson_divergence,
    log_likelihood,
)
from lsgm_edu.sde import VESDE, VPSDE, SubVPSDE
from lsgm_edu.toy import GaussianMixture

F64 = torch.float64


def target_gmm():
    """Three overlapping modes with unequal weights (float64: likelihoods are compared to 1e-2)."""
    means = torch.tensor([[-1.2, 0.0], [1.2, 0.3], [0.0, 1.5]], dtype=F64)
    return GaussianMixture(means, torch.tensor([0.5, 0.4, 0.35]), torch.tensor([0.5, 0.3, 0.2]))


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def at(t, x):
    return torch.full((x.shape[0],), t, dtype=x.dtype)


# --- the likelihood against the exact mixture density ---------------------------------------


def test_exact_divergence_likelihood_matches_gmm_log_prob():
    gmm, sde = target_gmm(), VPSDE()
    x = gmm.sample(400, gen(0))
    res = log_likelihood(sde, gmm.score_fn(sde), x, exact_divergence=True)
    assert isinstance(res, LikelihoodResult) and res.bpd is None
    assert isinstance(res.nfe, int) and res.nfe > 0
    assert res.z.shape == x.shape and res.logp.shape == (400,) and res.logp.dtype == F64
    torch.testing.assert_close(res.logp, res.prior_logp + res.delta_logp)
    err = (res.logp - gmm.log_prob(x)).abs()
    # what is left is mostly the prior mismatch: N(0, I) is not exactly p_T of the VP SDE
    assert (err < 0.01).float().mean() >= 0.95
    assert err.max() < 0.05


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE(sigma_max=10.0)], ids=repr)
def test_solver_error_alone_is_small(sde):
    # with the exact log p_T in place of the prior, only the ODE solve's error remains
    gmm = target_gmm()
    x = gmm.sample(200, gen(1))
    log_p = gmm.log_prob_fn(sde)
    res = log_likelihood(sde, gmm.score_fn(sde), x, exact_divergence=True, eps=1e-5)
    exact = log_p(x, at(1e-5, x))
    assert (res.delta_logp + log_p(res.z, at(sde.T, x)) - exact).abs().max() < 1e-3
    tight = log_likelihood(sde, gmm.score_fn(sde), x, True, rtol=1e-8, atol=1e-8)
    assert (tight.delta_logp + log_p(tight.z, at(sde.T, x)) - exact).abs().max() < 1e-5
    assert tight.nfe > res.nfe


def test_hutchinson_with_many_probes_agrees_with_exact_density():
    gmm, sde = target_gmm(), VPSDE()
    x = gmm.sample(200, gen(2))
    res = log_likelihood(sde, gmm.score_fn(sde), x, n_probes=256, generator=gen(3))
    assert (res.logp - gmm.log_prob(x)).abs().mean() < 0.05


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_likelihood_is_unbiased(probe):
    # one probe per point: noisy, but its mean over points is the exact-divergence likelihood
    gmm, sde = target_gmm(), VPSDE()
    x = gmm.sample(400, gen(4))
    exact = log_likelihood(sde, gmm.score_fn(sde), x, exact_divergence=True)
    est = log_likelihood(sde, gmm.score_fn(sde), x, probe=probe, generator=gen(5))
    diff = est.logp - exact.logp
    assert diff.std() > 0.05  # the estimate really is random ...
    assert diff.mean().abs() < 4 * diff.std() / math.sqrt(len(diff))  # ... and centred


def test_gaussian_data_with_image_shape():
    # data N(m, s^2 I) of shape [B, 2, 2, 2]: p_t = N(alpha m, (alpha^2 s^2 + sigma^2) I)
    sde, s = VPSDE(), 0.7
    m = torch.linspace(-1, 1, 8, dtype=F64).reshape(1, 2, 2, 2)

    def variance(t):
        alpha, sigma = sde.marginal_coefficients(t)
        return alpha, alpha**2 * s**2 + sigma**2

    def score(x, t):
        alpha, var = variance(t)
        return -(x - alpha[:, None, None, None] * m) / var[:, None, None, None]

    def log_p(x, t):
        alpha, var = variance(t)
        sq = (x - alpha[:, None, None, None] * m).pow(2).flatten(1).sum(-1)
        return -0.5 * sq / var - 4 * torch.log(2 * math.pi * var)

    x = m + s * torch.randn(64, 2, 2, 2, generator=gen(6), dtype=F64)
    res = log_likelihood(sde, score, x, exact_divergence=True)
    assert res.z.shape == x.shape
    solved = res.delta_logp + log_p(res.z, at(1.0, x))
    torch.testing.assert_close(solved, log_p(x, at(1e-5, x)), atol=1e-3, rtol=0)
    # the PF drift is linear here: Hutchinson over 512 probes is tight
    hutch = log_likelihood(sde, score, x, n_probes=512, generator=gen(7))
    assert (hutch.logp - res.logp).abs().mean() < 0.05


def test_fixed_step_solver_and_nfe():
    gmm, sde = target_gmm(), VPSDE()
    x = gmm.sample(50, gen(8))
    adaptive = log_likelihood(sde, gmm.score_fn(sde), x, exact_divergence=True)
    rk4 = log_likelihood(sde, gmm.score_fn(sde), x, True, method="rk4", steps=100)
    assert rk4.nfe == 400
    torch.testing.assert_close(rk4.logp, adaptive.logp, atol=2e-3, rtol=0)


def test_bpd_reported_when_asked():
    gmm, sde = target_gmm(), VPSDE()
    x = gmm.sample(20, gen(9))
    res = log_likelihood(sde, gmm.score_fn(sde), x, True, n_bins=256, data_range=(-4.0, 4.0))
    torch.testing.assert_close(res.bpd, bits_per_dim(res.logp, 2, 256, (-4.0, 4.0)))


def test_same_generator_same_estimate_and_no_global_rng():
    gmm, sde = target_gmm(), VPSDE()
    x = gmm.sample(30, gen(10))
    torch.manual_seed(0)
    a = log_likelihood(sde, gmm.score_fn(sde), x, generator=gen(11)).logp
    torch.manual_seed(1)
    state = torch.get_rng_state()
    b = log_likelihood(sde, gmm.score_fn(sde), x, generator=gen(11)).logp
    assert torch.equal(a, b) and torch.equal(state, torch.get_rng_state())
    assert not torch.equal(a, log_likelihood(sde, gmm.score_fn(sde), x, generator=gen(12)).logp)


# --- divergence estimators on a linear map (tr A is the exact answer) -------------------------


def test_divergence_of_a_linear_map_is_its_trace():
    A = torch.randn(5, 5, generator=gen(0), dtype=F64)
    x = torch.randn(3, 5, generator=gen(1), dtype=F64)
    div = divergence(lambda v: v @ A.T, x)
    torch.testing.assert_close(div, torch.trace(A).expand(3), rtol=0, atol=1e-12)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_fixed_probe_is_v_A_v_and_unbiased(probe):
    A = torch.randn(5, 5, generator=gen(0), dtype=F64)
    x = torch.randn(1, 5, generator=gen(1), dtype=F64)
    probes = draw_probes(x, 20_000, probe, gen(2))  # [K, 1, 5]

    def linear(v):
        return v @ A.T

    # a fixed probe gives v^T A v, exactly
    v = probes[0]
    torch.testing.assert_close(
        hutchinson_divergence(linear, x, probes[:1]), (v * (v @ A.T)).sum(-1), rtol=0, atol=1e-12
    )
    # the mean over K probes is the mean of the K single-probe values, and tends to tr A
    single = torch.einsum("kbi,ij,kbj->kb", probes, A, probes)[:, 0]
    torch.testing.assert_close(hutchinson_divergence(linear, x, probes)[0], single.mean())
    se = single.std() / math.sqrt(len(single))
    assert (single.mean() - torch.trace(A)).abs() < 4 * se


def test_draw_probes():
    x = torch.zeros(4, 3, dtype=F64)
    r = draw_probes(x, 7, "rademacher", gen(0))
    assert r.shape == (7, 4, 3) and r.dtype == F64 and set(r.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(r, draw_probes(x, 7, "Rademacher", gen(0)))  # case-insensitive
    g = draw_probes(x, 2000, "gaussian", gen(1))
    assert abs(g.mean().item()) < 0.02 and abs(g.var().item() - 1) < 0.03
    with pytest.raises(ValueError, match="unknown probe"):
        draw_probes(x, 1, "sphere")
    with pytest.raises(ValueError, match="n_probes must be an int >= 1"):
        draw_probes(x, 0)
    with pytest.raises(ValueError, match="probes must have shape"):
        hutchinson_divergence(lambda v: v, x, torch.zeros(4, 3))


# --- encode / decode --------------------------------------------------------------------------


def test_decode_inverts_encode():
    gmm, sde = target_gmm(), VPSDE()
    x = gmm.sample(100, gen(13))
    kw = {"rtol": 1e-8, "atol": 1e-8}
    z, nfe = encode(sde, gmm.score_fn(sde), x, return_nfe=True, **kw)
    assert nfe > 0 and z.shape == x.shape and z.dtype == F64
    assert z.std() > 0.8  # carried to the N(0, I)-like prior, not left as data
    torch.testing.assert_close(decode(sde, gmm.score_fn(sde), z, **kw), x, atol=1e-3, rtol=0)
    # the likelihood's latent is the same code
    res = log_likelihood(sde, gmm.score_fn(sde), x, exact_divergence=True, **kw)
    torch.testing.assert_close(res.z, z, atol=1e-4, rtol=0)


# --- bits/dim and dequantization: cases with a known answer ---------------------------------


def test_uniform_density_on_the_range_is_eight_bits():
    # U[-1, 1)^D has log p = -D log 2; with 256 bins P(x) = 256^-D: exactly 8 bits/dim
    y = dequantize(torch.randint(0, 256, (10, 3, 4, 4), generator=gen(0)), gen(1), dtype=F64)
    inside = ((y >= -1) & (y < 1)).flatten(1).all(-1)
    logp = torch.where(inside, -48 * math.log(2), -math.inf).to(F64)
    torch.testing.assert_close(bits_per_dim(logp, 48), torch.full((10,), 8.0, dtype=F64))


def test_piecewise_constant_density_gives_the_discrete_probability_exactly():
    # A density constant on every bin, p(y) = P(x) / w^D, makes the dequantization bound tight:
    # bits_per_dim must return -log2 P(x) / D for every draw of u.
    n_bins, low, high, d = 8, -1.0, 3.0, 2
    w = (high - low) / n_bins
    probs = torch.rand(n_bins, n_bins, generator=gen(0), dtype=F64) + 0.1
    probs = probs / probs.sum()
    x_int = torch.randint(0, n_bins, (500, d), generator=gen(1))
    y = dequantize(x_int, gen(2), n_bins=n_bins, data_range=(low, high), dtype=F64)
    bins = torch.floor((y - low) / w).long()
    assert torch.equal(bins, x_int)  # each point lands in its own bin
    assert bool(((y >= low) & (y < high)).all())
    log_density = torch.log(probs[bins[:, 0], bins[:, 1]]) - d * math.log(w)
    bpd = bits_per_dim(log_density, d, n_bins, (low, high))
    exact = -torch.log2(probs[x_int[:, 0], x_int[:, 1]]) / d
    torch.testing.assert_close(bpd, exact, rtol=0, atol=1e-12)


def test_documented_offsets():
    logp = torch.tensor([-1000.0, 0.0], dtype=F64)
    d = 3 * 32 * 32
    plain = -logp / (d * math.log(2))
    torch.testing.assert_close(bits_per_dim(logp, d, None), plain)
    # the reference's (x + u) / 256 * 2 - 1: +7 bits/dim; data in [0, 1): +8
    torch.testing.assert_close(bits_per_dim(logp, d), plain + 7)
    torch.testing.assert_close(bits_per_dim(logp, d, 256, (0.0, 1.0)), plain + 8)
    # x / 127.5 - 1 dequantized with u / 127.5: subtract D log 127.5 nats
    bpd = bits_per_dim(logp, d, 256, (-1.0, 1.0 + 1 / 127.5))
    torch.testing.assert_close(bpd, -(logp - d * math.log(127.5)) / (d * math.log(2)))


def test_dequantize_reproducible_and_accepts_uint8_and_integral_floats():
    x = torch.randint(0, 256, (4, 5), generator=gen(0)).to(torch.uint8)
    a = dequantize(x, gen(1))
    assert a.dtype == torch.float32 and torch.equal(a, dequantize(x, gen(1)))
    assert torch.equal(a, dequantize(x.double(), gen(1)))
    state = torch.get_rng_state()
    dequantize(x, gen(2))
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: dequantize(torch.tensor([256])), r"must lie in \{0, ..., 255\}"),
        (lambda: dequantize(torch.tensor([-1])), "must lie in"),
        (lambda: dequantize(torch.tensor([0.5])), "non-integer"),
        (lambda: dequantize(torch.tensor([1]), n_bins=1), "n_bins must be an int >= 2"),
        (lambda: dequantize(torch.tensor([1]), data_range=(1.0, -1.0)), "low < high"),
        (lambda: bits_per_dim(torch.zeros(2), 0), "n_dims must be an int >= 1"),
        (lambda: bits_per_dim(torch.zeros(2), 2, data_range=(0.0,)), "data_range must be"),
    ],
)
def test_bits_and_dequantize_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"method": "rk45"}, "unknown method"),
        ({"method": "rk4"}, "needs steps"),
        ({"steps": 10}, "only for the fixed-step"),
        ({"probe": "sphere"}, "unknown probe"),
        ({"n_probes": 0}, "n_probes must be"),
        ({"eps": 0.0}, "eps must be a float in"),
        ({"x": torch.zeros(4)}, "x must be a floating-point tensor"),
        ({"x": torch.zeros(4, 2, dtype=torch.long)}, "x must be a floating-point tensor"),
    ],
)
def test_log_likelihood_bad_arguments(kwargs, match):
    gmm, sde = target_gmm(), VPSDE()
    call = {"x": torch.zeros(4, 2, dtype=F64)} | kwargs
    with pytest.raises(ValueError, match=match):
        log_likelihood(sde, gmm.score_fn(sde), **call)

"""GaussianMixture diffused by VP / sub-VP / VE: the exact p_t and its score, against autograd,
quadrature, the Fokker-Planck equation, the prior and Monte-Carlo diffusion of samples."""

import math

import pytest
import torch

from lsgm_edu.sde import VESDE, VPSDE, SubVPSDE
from lsgm_edu.toy import GaussianMixture

F64 = torch.float64
SDES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE}
NAMES = sorted(SDES)


def random_mixture(seed, k, d, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    means = 3.0 * torch.randn(k, d, generator=g, dtype=dtype)
    stds = 0.3 + 1.5 * torch.rand(k, generator=g, dtype=dtype)
    weights = 0.05 + torch.rand(k, generator=g, dtype=dtype)  # unequal, unnormalized
    return GaussianMixture(means, stds, weights), g


def diffused_points(gmm, sde, t, g):
    """x_t = alpha x0 + sigma z for x0 ~ gmm: typical points of p_t, plus far-out ones."""
    x0 = gmm.sample(len(t), g)
    mean, std = sde.marginal_prob(x0, t)
    x = mean + std[:, None] * torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    far = 8.0 * torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    return torch.cat([x, far]), torch.cat([t, t])


CONFIGS = [(seed, k, d) for seed, (k, d) in enumerate([(1, 1), (3, 2), (8, 2), (5, 3), (4, 5)])]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("seed,k,d", CONFIGS)
def test_score_fn_equals_autograd_of_log_prob_fn(name, seed, k, d):
    sde = SDES[name]()
    gmm, g = random_mixture(seed, k, d)
    t = 1e-3 + (1 - 1e-3) * torch.rand(150, generator=g, dtype=F64)  # per-sample times
    x, t = diffused_points(gmm, sde, t, g)
    x.requires_grad_(True)
    log_p = gmm.log_prob_fn(sde)(x, t)
    assert log_p.shape == (300,)
    (auto,) = torch.autograd.grad(log_p.sum(), x)
    score = gmm.score_fn(sde)(x.detach(), t)
    assert score.shape == x.shape
    err = (score - auto).norm(dim=-1)
    assert torch.all(err <= 1e-8 * auto.norm(dim=-1) + 1e-12), err.max()


@pytest.mark.parametrize("name", NAMES)
def test_time_zero_gives_back_the_data_density_and_score(name):
    sde = SDES[name]()
    gmm, g = random_mixture(3, 4, 2)
    x = torch.cat([gmm.sample(100, g), 6.0 * torch.randn(50, 2, generator=g, dtype=F64)])
    t = torch.zeros(150, dtype=F64)
    alpha, sigma = sde.marginal_coefficients(t[:1])
    assert alpha.item() == 1.0 and sigma.item() == 0.0  # every SDE starts at the data
    torch.testing.assert_close(gmm.log_prob_fn(sde)(x, t), gmm.log_prob(x), rtol=1e-13, atol=0)
    torch.testing.assert_close(gmm.score_fn(sde)(x, t), gmm.score(x), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", NAMES)
def test_per_sample_times_are_independent(name):
    sde = SDES[name]()
    gmm, g = random_mixture(4, 3, 2)
    x = 3.0 * torch.randn(6, 2, generator=g, dtype=F64)
    t = torch.tensor([0.0, 0.01, 0.2, 0.5, 0.9, 1.0], dtype=F64)
    score, log_p = gmm.score_fn(sde)(x, t), gmm.log_prob_fn(sde)(x, t)
    for i in range(6):
        one = (x[i : i + 1], t[i : i + 1])
        torch.testing.assert_close(score[i : i + 1], gmm.score_fn(sde)(*one), rtol=0, atol=0)
        torch.testing.assert_close(log_p[i : i + 1], gmm.log_prob_fn(sde)(*one), rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_log_prob_fn_solves_the_fokker_planck_equation(name):
    """d/dt log p = -f D - f x.s + 1/2 g^2 (div s + |s|^2) for dx = f x dt + g dW, s = grad log p.

    Ties the oracle to the SDE's own coefficients (sde_coefficients), not to marginal_prob.
    """
    sde = SDES[name]()
    gmm, g = random_mixture(5, 3, 2)
    t = 0.02 + 0.96 * torch.rand(60, generator=g, dtype=F64)
    x, t = diffused_points(gmm, sde, t, g)
    x, t = x.requires_grad_(True), t.requires_grad_(True)
    log_p = gmm.log_prob_fn(sde)(x, t)
    (dlogp_dt,) = torch.autograd.grad(log_p.sum(), t)
    score = gmm.score_fn(sde)(x, t.detach())
    div = sum(
        torch.autograd.grad(score[:, i].sum(), x, retain_graph=True)[0][:, i] for i in range(2)
    )
    f, gg = sde.sde_coefficients(t.detach())
    x, score = x.detach(), score.detach()
    rhs = -2 * f - f * (x * score).sum(-1) + 0.5 * gg**2 * (div + score.pow(2).sum(-1))
    torch.testing.assert_close(dlogp_dt, rhs, rtol=1e-8, atol=1e-8 * rhs.abs().max().item())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("t_value", [0.05, 0.4])
def test_log_prob_fn_normalizes_on_a_2d_grid(name, t_value):
    sde = SDES[name]()
    gmm, _ = random_mixture(3, 4, 2)
    alpha, sigma = sde.marginal_coefficients(torch.tensor(t_value, dtype=F64))
    spread = 8 * (alpha**2 * gmm.stds.max() ** 2 + sigma**2).sqrt()
    lo = (alpha * gmm.means.min(0).values - spread).tolist()
    hi = (alpha * gmm.means.max(0).values + spread).tolist()
    xs = torch.linspace(lo[0], hi[0], 500, dtype=F64)
    ys = torch.linspace(lo[1], hi[1], 500, dtype=F64)
    gx, gy = torch.meshgrid(xs, ys, indexing="ij")
    pts = torch.stack([gx, gy], -1).reshape(-1, 2)
    p = gmm.log_prob_fn(sde)(pts, torch.full((len(pts),), t_value, dtype=F64)).exp()
    p = p.reshape(500, 500)
    integral = torch.trapezoid(torch.trapezoid(p, ys, dim=1), xs)
    assert integral.item() == pytest.approx(1.0, abs=1e-4)


def test_vp_at_time_T_is_close_to_the_prior():
    """VP(0.1, 20) at T = 1: alpha = exp(-5.025) ~ 6.6e-3, so p_T = N(0, I) up to O(alpha).

    Per component, log N(x; a mu, v I) - log N(x; 0, I) with v = 1 - a^2 (1 - s^2) is
    a x.mu - a^2 |mu|^2 / 2 + (D - |x|^2) (1 - v) / 2 + O(a^4); the mixture's log-sum-exp
    lies between the components' extremes, which bounds the gap.
    """
    sde = VPSDE()
    gmm, g = random_mixture(6, 5, 3)
    x = torch.randn(400, 3, generator=g, dtype=F64) * 1.5
    t = torch.ones(400, dtype=F64)
    alpha = sde.marginal_coefficients(t[:1])[0].item()
    assert alpha == pytest.approx(math.exp(-0.25 * 19.9 - 0.05), rel=1e-12)
    gap = gmm.log_prob_fn(sde)(x, t) - sde.prior_logp(x)
    mu_max = gmm.means.norm(dim=-1).max()
    one_minus_v = alpha**2 * (1 - gmm.stds**2).abs().max()
    bound = alpha * x.norm(dim=-1) * mu_max + alpha**2 * mu_max**2 / 2
    bound = bound + (3 + x.pow(2).sum(-1)) * one_minus_v / 2
    assert torch.all(gap.abs() <= 1.01 * bound + 1e-10), (gap.abs() / bound).max()
    assert gap.abs().max() < 0.2  # and the bound is small: p_T is close to N(0, I)
    # the same comparison far from T fails: the test can tell the two apart
    mid = gmm.log_prob_fn(sde)(x, torch.full((400,), 0.3, dtype=F64)) - sde.prior_logp(x)
    assert mid.abs().max() > 1.0


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("t_value", [0.1, 0.6])
def test_monte_carlo_diffusion_of_samples_matches_the_oracle(name, t_value):
    """Diffuse GMM samples with marginal_prob and compare the moments of
    p_t = sum_k w_k N(alpha mu_k, (alpha^2 sigma_k^2 + sigma^2) I); check the oracle's score
    on the same samples with Stein's identity E[s(x) x^T] = -I."""
    sde = SDES[name]()
    gmm, _ = random_mixture(7, 4, 3)
    n = 100_000
    g = torch.Generator().manual_seed(8)
    x0 = gmm.sample(n, g)
    t = torch.full((n,), t_value, dtype=F64)
    mean, std = sde.marginal_prob(x0, t)
    x = mean + std[:, None] * torch.randn(x0.shape, generator=g, dtype=F64)

    alpha, sigma = sde.marginal_coefficients(t[:1])
    w, mu = gmm.weights, alpha * gmm.means
    var_k = alpha**2 * gmm.stds**2 + sigma**2
    m = w @ mu
    eye = torch.eye(3, dtype=F64)
    second = w[:, None, None] * (var_k[:, None, None] * eye + mu[:, :, None] * mu[:, None, :])
    cov = second.sum(0) - torch.outer(m, m)
    # standard errors from n: sqrt(var / n) for the mean, std(product) / sqrt(n) for cov
    assert torch.all((x.mean(0) - m).abs() < 5 * (cov.diagonal() / n).sqrt())
    xc = x - m
    prod = xc[:, :, None] * xc[:, None, :]
    assert torch.all((prod.mean(0) - cov).abs() < 5 * prod.std(0) / math.sqrt(n))

    score = gmm.score_fn(sde)(x, t)
    stein = score[:, :, None] * x[:, None, :]
    assert torch.all((stein.mean(0) + eye).abs() < 5 * stein.std(0) / math.sqrt(n))


@pytest.mark.parametrize("name", NAMES)
def test_dtype_follows_x_and_float32_agrees(name):
    sde = SDES[name]()
    gmm, g = random_mixture(9, 3, 2)
    x = 2.0 * torch.randn(20, 2, generator=g, dtype=F64)
    t = torch.rand(20, generator=g, dtype=F64)
    ref_s, ref_l = gmm.score_fn(sde)(x, t), gmm.log_prob_fn(sde)(x, t)
    for t_dtype in (torch.float32, F64):
        s32 = gmm.score_fn(sde)(x.float(), t.to(t_dtype))
        l32 = gmm.log_prob_fn(sde)(x.float(), t.to(t_dtype))
        assert s32.dtype == torch.float32 and l32.dtype == torch.float32
        torch.testing.assert_close(s32, ref_s.float(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(l32, ref_l.float(), rtol=1e-5, atol=1e-5)
    gmm32 = gmm.to(dtype=torch.float32)  # float32 parameters, float64 input: follows x
    assert gmm32.score_fn(sde)(x, t).dtype == F64


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_follows_x():
    gmm = GaussianMixture(torch.zeros(2, 2), 1.0)
    x, t = torch.randn(4, 2, device="cuda"), torch.rand(4, device="cuda")
    assert gmm.score_fn(VPSDE())(x, t).is_cuda and gmm.log_prob_fn(VESDE())(x, t).is_cuda


def test_bad_inputs_raise():
    gmm = GaussianMixture(torch.zeros(2, 3), 1.0)
    sde = VPSDE()
    x = torch.zeros(4, 3)
    for fn in (gmm.score_fn(sde), gmm.log_prob_fn(sde)):
        with pytest.raises(ValueError, match=r"t must have shape \[B\] = \[4\]"):
            fn(x, torch.zeros(3))
        with pytest.raises(ValueError, match=r"t must have shape"):
            fn(x, torch.tensor(0.5))
        with pytest.raises(ValueError, match="t must be a floating-point"):
            fn(x, torch.zeros(4, dtype=torch.long))
        with pytest.raises(ValueError, match=r"D = 3"):
            fn(torch.zeros(4, 2), torch.zeros(4))
    with pytest.raises(TypeError, match="sde must be a linear SDE"):
        gmm.score_fn("vp")
    with pytest.raises(TypeError, match="sde must be a linear SDE"):
        gmm.log_prob_fn(None)

"""EDM's preconditioned denoiser loss (Karras et al. 2022) and the DDPM ELBO (Ho et al. 2020),
against exact Gaussian mixtures.

The mixture diffused to noise level sigma is again a mixture (variances s_k^2 + sigma^2), so the
ideal denoiser and the score are exact. Gauss-Hermite quadrature over x0 and the noise makes the
expectations of the ELBO's terms exact in one dimension: the ELBO of a model whose reverse chain
is exact equals the log-likelihood, for every number of steps.
"""

import itertools

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from lsgm_edu.losses import (
    UnitWeighting,
    ddpm_elbo_terms,
    ddpm_eps_weight,
    ddpm_reverse_model,
    denoising_score_matching,
    diffusion_posterior,
    edm_loss,
    edm_loss_weight,
    edm_training_sigmas,
)
from lsgm_edu.nets import ScoreMLP
from lsgm_edu.nets.precond import EDMPrecond, edm_coefficients
from lsgm_edu.samplers import ddpm_posterior_std
from lsgm_edu.sde import VESDE, VPSDE, SubVPSDE
from lsgm_edu.toy import GaussianMixture

F64 = torch.float64
SDES = {"vp": VPSDE(), "subvp": SubVPSDE(), "ve": VESDE(sigma_max=10.0)}


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors in long loops: one thread (a second one waiting on a busy core slows them
    many times over), restored afterwards."""
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n_threads)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def mixture_2d():
    return GaussianMixture(torch.tensor([[-1.5, -1.0], [1.5, -1.0], [0.0, 1.6]], dtype=F64),
                           torch.tensor([0.6, 0.6, 0.8], dtype=F64),
                           torch.tensor([0.5, 0.3, 0.2], dtype=F64))


def mixture_1d():
    return GaussianMixture(torch.tensor([[-2.0], [1.0], [2.5]], dtype=F64),
                           torch.tensor([0.5, 0.6, 0.3], dtype=F64),
                           torch.tensor([0.3, 0.5, 0.2], dtype=F64))


def rms_per_coordinate(gmm):
    """sigma_d: sqrt(E|y|^2 / D) of the mixture, exactly."""
    second = (gmm.weights * (gmm.means.pow(2).sum(1) + gmm.dim * gmm.stds**2)).sum()
    return (second / gmm.dim).sqrt().item()


def noisy_mixture_score(gmm, x, sigma):
    """grad log (p_data * N(0, sigma^2 I))(x) with one sigma per sample [B]: a mixture of
    N(m_k, (s_k^2 + sigma^2) I), written out so the oracle does not use the package's SDEs."""
    var = gmm.stds[None, :] ** 2 + sigma[:, None] ** 2  # [B, K]
    diff = x[:, None, :] - gmm.means[None]  # [B, K, D]
    log_w = (gmm.weights.log()[None] - 0.5 * gmm.dim * var.log()
             - 0.5 * diff.pow(2).sum(-1) / var)
    r = torch.softmax(log_w, dim=1)
    return -(r[..., None] * diff / var[..., None]).sum(1)


def ideal_denoiser(gmm):
    """D*(x; sigma) = x + sigma^2 grad log p(x; sigma) (Tweedie; Karras et al. 2022, eq. 3)."""
    return lambda x, sigma: x + sigma[:, None] ** 2 * noisy_mixture_score(gmm, x, sigma)


# --- EDM -------------------------------------------------------------------------------------


def test_edm_loss_is_the_unit_weight_regression_of_the_raw_network():
    """Karras et al. eq. 8: lambda |D - y|^2 = |F(c_in x; c_noise) - (y - c_skip x) / c_out|^2 for
    any raw network F (measured: equal to 1e-13 relative)."""
    gmm, sigma_d = mixture_2d(), 1.3
    net = ScoreMLP(2, generator=0).double()
    y = gmm.sample(256, gen(1))
    sigma = edm_training_sigmas(256, gen(2), dtype=F64)
    n = torch.randn(y.shape, generator=gen(3), dtype=F64)
    c_skip, c_out, c_in, c_noise = (c[:, None] for c in edm_coefficients(sigma, sigma_d))
    x = y + sigma[:, None] * n
    with torch.no_grad():
        loss = edm_loss(EDMPrecond(net, sigma_d), y, sigma, sigma_d, noise=n)
        target = (y - c_skip * x) / c_out
        regression = (net(c_in * x, c_noise[:, 0]) - target).pow(2).sum(1)
    torch.testing.assert_close(loss, regression, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(edm_loss_weight(sigma, sigma_d), (sigma**2 + sigma_d**2) / (sigma * sigma_d) ** 2)


def test_edm_coefficients_give_unit_input_and_target_on_the_mixture():
    """With sigma_d the data's RMS per coordinate, E|c_in x|^2 / D = 1 and E|F_target|^2 / D = 1 at
    every sigma (Karras et al. App. B.6), while the raw input and the score target are far from it
    (measured on 200,000 draws: within 0.11 % of one at every sigma)."""
    gmm = mixture_2d()
    sigma_d = rms_per_coordinate(gmm)
    y = gmm.sample(200_000, gen(4))
    n = torch.randn(y.shape, generator=gen(5), dtype=F64)
    for s in [1e-3, 0.1, 1.0, 10.0, 100.0]:
        sigma = torch.full((len(y),), s, dtype=F64)
        c_skip, c_out, c_in, _ = (c[:, None] for c in edm_coefficients(sigma, sigma_d))
        x = y + s * n
        assert abs((c_in * x).pow(2).mean().item() - 1) < 0.01
        assert abs(((y - c_skip * x) / c_out).pow(2).mean().item() - 1) < 0.01
    assert (n / 1e-3).pow(2).mean() > 1e5  # the score's target at sigma = 1e-3
    assert (y + 100.0 * n).pow(2).mean() > 9e3  # the raw input at sigma = 100


def test_edm_precond_on_the_vp_sde_reproduces_the_exact_score():
    """In VP form x_t = alpha (y + sigma_bar n): grad log p_t(x_t) = precond.score(x_t / alpha,
    sigma_bar) / alpha, with F the exact target of the ideal denoiser of the noisy mixture
    (written out here) and p_t from the package's VP oracle (measured: 2e-12 relative)."""
    gmm, sde = mixture_2d(), VPSDE()
    sigma_d = rms_per_coordinate(gmm)
    denoise = ideal_denoiser(gmm)

    def ideal_raw_net(x_in, c_noise):
        sigma = torch.exp(4 * c_noise)
        c_skip, c_out, c_in, _ = (c[:, None] for c in edm_coefficients(sigma, sigma_d))
        return (denoise(x_in / c_in, sigma) - c_skip * x_in / c_in) / c_out

    t = torch.linspace(1e-3, 1.0, 300, dtype=F64)
    alpha, sigma_t = sde.marginal_coefficients(t)
    x_t = sde.marginal_prob(gmm.sample(300, gen(6)), t)[0] + sigma_t[:, None] * torch.randn(
        300, 2, generator=gen(7), dtype=F64)
    precond = EDMPrecond(ideal_raw_net, sigma_data=sigma_d)
    score = precond.score(x_t / alpha[:, None], sigma_t / alpha) / alpha[:, None]
    torch.testing.assert_close(score, gmm.score_fn(sde)(x_t, t), rtol=1e-8, atol=1e-8)


def test_edm_loss_is_minimized_by_the_ideal_denoiser():
    """E[lambda |D* + delta - y|^2] - E[lambda |D* - y|^2] = E[lambda |delta|^2] since E[y | x] = D*:
    a shift delta = 0.1 c_out adds exactly 0.01 per coordinate (measured: 0.0203 +- 0.0009 for
    the expected 0.0200)."""
    gmm = mixture_2d()
    sigma_d = rms_per_coordinate(gmm)
    denoise = ideal_denoiser(gmm)
    y = gmm.sample(100_000, gen(8))
    sigma = edm_training_sigmas(len(y), gen(9), dtype=F64)
    n = torch.randn(y.shape, generator=gen(10), dtype=F64)

    def shifted(x, s):
        return denoise(x, s) + 0.1 * edm_coefficients(s, sigma_d)[1][:, None]

    base = edm_loss(denoise, y, sigma, sigma_d, noise=n)
    diff = edm_loss(shifted, y, sigma, sigma_d, noise=n) - base
    se = diff.std().item() / len(diff) ** 0.5
    assert abs(diff.mean().item() - 0.02) < 4 * se
    assert base.mean().item() / 2 < 1  # the loss at the optimum is below the target's variance


def test_edm_loss_is_weighted_denoising_score_matching():
    """With D = x + sigma^2 s (Tweedie) and the VE kernel x = y + sigma_t n, lambda |D - y|^2 =
    2 lambda sigma^4 * (1/2 |s + n / sigma|^2): EDM's loss is DSM with weight lambda sigma^4."""
    gmm, sde, sigma_d = mixture_2d(), VESDE(sigma_max=50.0), 0.5
    score = gmm.score_fn(sde)
    y = gmm.sample(512, gen(11))
    t = torch.rand(512, generator=gen(12), dtype=F64) * 0.99 + 0.01
    sigma = sde.marginal_coefficients(t)[1]
    n = torch.randn(y.shape, generator=gen(13), dtype=F64)
    time_of = dict(zip(sigma.tolist(), t.tolist(), strict=True))

    def denoiser(x, s):
        tt = torch.tensor([time_of[v] for v in s.tolist()], dtype=F64)
        return x + s[:, None] ** 2 * score(x, tt)

    dsm = denoising_score_matching(score, sde, y, t, UnitWeighting(), noise=n)
    torch.testing.assert_close(edm_loss(denoiser, y, sigma, sigma_d, noise=n),
                               2 * edm_loss_weight(sigma, sigma_d) * sigma**4 * dsm)


def test_edm_training_sigmas_are_log_normal_and_seeded():
    s = edm_training_sigmas(200_000, gen(14), dtype=F64)
    assert abs(s.log().mean().item() + 1.2) < 0.01 and abs(s.log().std().item() - 1.2) < 0.01
    torch.testing.assert_close(s, edm_training_sigmas(200_000, gen(14), dtype=F64))
    s2 = edm_training_sigmas(1000, gen(15), P_mean=0.5, P_std=0.1)
    assert s2.dtype == torch.get_default_dtype() and abs(s2.log().mean().item() - 0.5) < 0.02
    with pytest.raises(ValueError, match="n must be"):
        edm_training_sigmas(0)
    with pytest.raises(ValueError, match="P_std"):
        edm_training_sigmas(4, P_std=0.0)


def test_edm_loss_rejects_bad_arguments():
    y, denoiser = torch.zeros(4, 2), lambda x, s: x
    with pytest.raises(ValueError, match=r"edm_loss: sigma must be a floating-point tensor \[B\]"):
        edm_loss(denoiser, y, torch.ones(3))
    with pytest.raises(ValueError, match="noise levels > 0"):
        edm_loss(denoiser, y, torch.tensor([1.0, 0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="sigma_data"):
        edm_loss(denoiser, y, torch.ones(4), sigma_data=0.0)
    with pytest.raises(ValueError, match="the denoiser's output"):
        edm_loss(lambda x, s: x[:, :1], y, torch.ones(4))


# --- the DDPM ELBO ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SDES))
def test_diffusion_posterior_is_bayes_rule(name):
    """q(x_s | x_t, x0) ∝ q(x_t | x_s) q(x_s | x0): precision A^2 / Sigma + 1 / sigma_s^2 and mean
    (A x_t / Sigma + alpha_s x0 / sigma_s^2) / precision; for VP also Ho et al.'s eqs. 6-7 and the
    samplers' `ddpm_posterior_std`."""
    sde = SDES[name]
    s = torch.rand(64, generator=gen(20), dtype=F64) * 0.9 + 0.01
    t = s + torch.rand(64, generator=gen(21), dtype=F64) * 0.09 + 1e-3
    x0, x_t = (torch.randn(64, 3, generator=gen(k), dtype=F64) for k in (22, 23))
    mean, var = diffusion_posterior(sde, x0, x_t, s, t)
    A, Sigma = sde.transition(s, t)
    alpha_s, sigma_s = sde.marginal_coefficients(s)
    precision = A**2 / Sigma + 1 / sigma_s**2
    torch.testing.assert_close(var, 1 / precision)
    torch.testing.assert_close(mean, ((A / Sigma)[:, None] * x_t + (alpha_s / sigma_s**2)[:, None] * x0)
                               / precision[:, None])
    torch.testing.assert_close(var[:3].sqrt(), torch.tensor(
        [ddpm_posterior_std(sde, t[i].item(), s[i].item()) for i in range(3)], dtype=F64))
    if name == "vp":  # Ho et al. 2020, eq. 7, with alpha_bar = alpha^2 and beta = 1 - A^2
        abar_s, abar_t, beta = alpha_s**2, sde.marginal_coefficients(t)[0] ** 2, 1 - A**2
        mu = ((abar_s.sqrt() * beta / (1 - abar_t))[:, None] * x0
              + ((1 - beta).sqrt() * (1 - abar_s) / (1 - abar_t))[:, None] * x_t)
        torch.testing.assert_close(mean, mu)
        torch.testing.assert_close(var, (1 - abar_s) / (1 - abar_t) * beta)


@pytest.mark.parametrize("name", list(SDES))
def test_each_kl_term_is_a_weighted_eps_error(name):
    """KL(q(x_s | x_t, x0) || p(x_s | x_t)) from torch.distributions = ddpm_eps_weight |eps -
    eps_hat|^2 + D/2 (r - 1 - log r), r = var_q / Sigma (Ho et al. eq. 12), for an imperfect model;
    and the weight tends to g^2 / (2 sigma_t^2) per unit time (the likelihood weighting)."""
    sde, gmm = SDES[name], mixture_2d()

    def score_fn(x, t):  # the exact score, perturbed: any model will do
        return gmm.score_fn(sde)(x, t) + 0.3 * torch.sin(x)

    s = torch.rand(128, generator=gen(24), dtype=F64) * 0.9 + 0.01
    t = s + 0.01
    x0, eps = gmm.sample(128, gen(25)), torch.randn(128, 2, generator=gen(26), dtype=F64)
    alpha_t, sigma_t = sde.marginal_coefficients(t)
    x_t = alpha_t[:, None] * x0 + sigma_t[:, None] * eps
    mean_q, var_q = diffusion_posterior(sde, x0, x_t, s, t)
    mean_p, var_p = ddpm_reverse_model(score_fn, sde, x_t, s, t)
    kl = kl_divergence(Normal(mean_q, var_q.sqrt()[:, None]), Normal(mean_p, var_p.sqrt()[:, None])).sum(1)
    eps_hat = -sigma_t[:, None] * score_fn(x_t, t)
    r = var_q / var_p
    eps_form = ddpm_eps_weight(sde, s, t) * (eps - eps_hat).pow(2).sum(1) + (r - 1 - r.log())
    torch.testing.assert_close(kl, eps_form, rtol=1e-9, atol=1e-12)
    t2 = torch.tensor([0.05, 0.3, 0.9], dtype=F64)
    h = 1e-6
    g2 = sde.sde_coefficients(t2)[1] ** 2
    torch.testing.assert_close(ddpm_eps_weight(sde, t2 - h, t2) / h,
                               g2 / (2 * sde.marginal_coefficients(t2)[1] ** 2), rtol=1e-4, atol=0)


def quadrature(gmm, n=24):
    """Gauss-Hermite nodes over x0 ~ gmm (1-D) and eps ~ N(0, 1): x0, eps [K n n, 1], weights."""
    u, w = (torch.tensor(v, dtype=F64) for v in np.polynomial.hermite_e.hermegauss(n))
    w = w / w.sum()
    k = gmm.n_components
    x0 = (gmm.means[:, 0, None, None] + gmm.stds[:, None, None] * u[None, :, None]).expand(k, n, n)
    eps = u[None, None, :].expand(k, n, n)
    weights = gmm.weights[:, None, None] * w[None, :, None] * w[None, None, :]
    return x0.reshape(-1, 1), eps.reshape(-1, 1), weights.reshape(-1)


def test_ddpm_elbo_of_the_normal_model_is_exact_at_every_depth():
    """With the score of N(0, I) (-x) the reverse VP chain is the forward chain run from N(0, I),
    so -ELBO(x0) = -log N(x0; 0, I) exactly, for every number of steps and any data (measured to
    5e-16 by quadrature)."""
    sde, gmm = VPSDE(), mixture_1d()
    x0, eps, w = quadrature(gmm)
    cross_entropy = (w * 0.5 * (x0[:, 0] ** 2 + np.log(2 * np.pi))).sum()
    for steps in (1, 3, 10, 50):
        terms = ddpm_elbo_terms(lambda x, t: -x, sde, x0, steps, noise=eps)
        assert terms.shape == (len(x0), steps + 1)
        torch.testing.assert_close((w * terms.sum(1)).sum(), cross_entropy, rtol=0, atol=1e-10)


def test_ddpm_elbo_bounds_the_likelihood_and_closes_like_one_over_steps():
    """With the exact score, -ELBO >= -log p(x0) and the gap shrinks like 1 / steps (measured by
    quadrature: gap * steps = 1.86, 1.89, 1.90 at 50, 100, 200 steps; a gap of 0.80 nats at 1)."""
    sde, gmm = VPSDE(), mixture_1d()
    x0, eps, w = quadrature(gmm, n=16)
    nll = -(w * gmm.log_prob(x0)).sum()
    gaps = {s: ((w * ddpm_elbo_terms(gmm.score_fn(sde), sde, x0, s, noise=eps).sum(1)).sum() - nll).item()
            for s in (1, 4, 16, 50, 100, 200)}
    values = list(gaps.values())
    assert all(a > b > 0 for a, b in itertools.pairwise(values))
    scaled = [gaps[s] * s for s in (50, 100, 200)]
    assert max(scaled) / min(scaled) < 1.05 and 1.7 < scaled[-1] < 2.1


def test_ddpm_elbo_terms_are_unbiased_monte_carlo_estimates():
    """Random draws of the noise give the quadrature value within their standard error."""
    sde, gmm = VPSDE(), mixture_1d()
    x0q, eps, w = quadrature(gmm, n=20)
    exact = (w * ddpm_elbo_terms(gmm.score_fn(sde), sde, x0q, 8, noise=eps).sum(1)).sum().item()
    x0 = gmm.sample(40_000, gen(27))
    est = ddpm_elbo_terms(gmm.score_fn(sde), sde, x0, 8, gen(28)).sum(1)
    assert abs(est.mean().item() - exact) < 4 * est.std().item() / len(est) ** 0.5
    again = ddpm_elbo_terms(gmm.score_fn(sde), sde, x0[:5], 8, gen(28))
    torch.testing.assert_close(again, ddpm_elbo_terms(gmm.score_fn(sde), sde, x0[:5], 8, gen(28)))


def test_ddpm_functions_reject_bad_arguments():
    from lsgm_edu.phase_space import CLD

    x0 = torch.zeros(4, 2, dtype=F64)
    with pytest.raises(ValueError, match="scalar linear SDE"):
        ddpm_elbo_terms(lambda x, t: x, CLD(), x0, 4)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        ddpm_elbo_terms(lambda x, t: x, VPSDE(), x0, 0)
    with pytest.raises(ValueError, match="noise must be"):
        ddpm_elbo_terms(lambda x, t: x, VPSDE(), x0, 2, noise=torch.zeros(3, 2, dtype=F64))
    s = torch.full((4,), 0.5, dtype=F64)
    with pytest.raises(ValueError, match="s < t"):
        diffusion_posterior(VPSDE(), x0, x0, s, s)
    with pytest.raises(ValueError, match="score_fn's output"):
        ddpm_reverse_model(lambda x, t: x[:, :1], VPSDE(), x0, s, s + 0.1)

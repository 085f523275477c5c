"""The one linear-SDE engine over a phase axis: K = 1 unchanged, K = 2 against exact answers.

- K = 1: EM, PC and the PF-ODE give the samples recorded on the main branch before the engine
  was opened (tests/data/sampler_regression.safetensors, tools/make_sampler_regression.py);
- K = 2, a LinearSDE with arbitrary constant F and G: the transition against a numerical
  solution of the moment ODEs; the diffused-mixture oracle's score against autograd of its
  log-density; Euler-Maruyama and the PF-ODE with the exact score against the i.i.d. baseline;
  the PF-ODE log-likelihood of the state against the exact log-density.
"""

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lsgm_edu.likelihood import log_likelihood
from lsgm_edu.losses import (
    LikelihoodWeighting,
    SigmaSquaredWeighting,
    denoising_score_matching,
)
from lsgm_edu.metrics import sliced_wasserstein
from lsgm_edu.samplers import euler_maruyama, probability_flow
from lsgm_edu.sde import VPSDE, GaussianKernel, LinearSDE
from lsgm_edu.toy import GaussianMixture

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from make_sampler_regression import run_all

F64 = torch.float64


def test_k1_samplers_match_the_recorded_main():
    recorded = load_file(str(REPO / "tests" / "data" / "sampler_regression.safetensors"))
    now = run_all()
    assert set(now) == set(recorded)
    for key, x in now.items():
        torch.testing.assert_close(x, recorded[key], rtol=1e-9, atol=1e-10, msg=key)


# --- K = 2 -----------------------------------------------------------------------------------

# Arbitrary constant blocks: F stable but not symmetric (rotation + damping), G full (noise on
# both components, correlated). Eigenvalues of beta F: 2.5 (-4 +- 1.6i), so |A(0, 1)| ~ e^-10
# and p_T is the stationary prior to within 1e-4 nats.
F_BLOCK = [[-3.0, 2.5], [-1.5, -5.0]]
G_BLOCK = [[1.2, 0.0], [0.7, 2.0]]
MOMENTUM_VAR = 0.3
BETA = 2.5


def phase_sde(**kw):
    lift = torch.tensor([[0.0, 0.0], [0.0, MOMENTUM_VAR]], dtype=F64)
    return LinearSDE(F_BLOCK, G_BLOCK, beta_min=BETA, lift_covariance=lift, **kw)


def mixture():
    means = torch.tensor([[-1.5, 0.0], [1.5, 0.5], [0.0, 1.8]], dtype=F64)
    return GaussianMixture(means, torch.tensor([0.4, 0.5, 0.35]), torch.tensor([0.5, 0.3, 0.2]))


def moment_ode_solution(F, G, s, t, n_steps=4000):
    """mu(t) = A mu(s), Sigma(t) by RK4 on dA/dt = F A, dSigma/dt = F Sigma + Sigma F^T + G G^T,
    with F and G scaled by beta and sqrt(beta)."""
    F = BETA * torch.tensor(F, dtype=F64)
    Q = BETA * torch.tensor(G, dtype=F64) @ torch.tensor(G, dtype=F64).T

    def rhs(A, S):
        return F @ A, F @ S + S @ F.T + Q

    A, S = torch.eye(2, dtype=F64), torch.zeros(2, 2, dtype=F64)
    h = (t - s) / n_steps
    for _ in range(n_steps):
        k1 = rhs(A, S)
        k2 = rhs(A + h / 2 * k1[0], S + h / 2 * k1[1])
        k3 = rhs(A + h / 2 * k2[0], S + h / 2 * k2[1])
        k4 = rhs(A + h * k3[0], S + h * k3[1])
        A = A + h / 6 * (k1[0] + 2 * k2[0] + 2 * k3[0] + k4[0])
        S = S + h / 6 * (k1[1] + 2 * k2[1] + 2 * k3[1] + k4[1])
    return A, S


@pytest.mark.parametrize(("s", "t"), [(0.0, 0.3), (0.2, 0.9), (0.5, 0.55)])
def test_transition_solves_the_moment_odes(s, t):
    sde = phase_sde()
    A, Sigma = sde.transition(torch.tensor([s], dtype=F64), torch.tensor([t], dtype=F64))
    A_ode, S_ode = moment_ode_solution(F_BLOCK, G_BLOCK, s, t)
    torch.testing.assert_close(A[0], A_ode, rtol=0, atol=1e-8)
    torch.testing.assert_close(Sigma[0], S_ode, rtol=0, atol=1e-8)


def test_transition_composes_and_prior_is_stationary():
    sde = phase_sde()
    r, s, t = (torch.tensor([v], dtype=F64) for v in (0.1, 0.4, 0.8))
    A_rs, S_rs = sde.transition(r, s)
    A_st, S_st = sde.transition(s, t)
    A_rt, S_rt = sde.transition(r, t)
    torch.testing.assert_close(A_st @ A_rs, A_rt, rtol=0, atol=1e-12)
    torch.testing.assert_close(A_st @ S_rs @ A_st.mT + S_st, S_rt, rtol=0, atol=1e-12)
    P = sde.prior_covariance
    F, Q = sde.F, sde.G @ sde.G.T
    torch.testing.assert_close(F @ P + P @ F.T + Q, torch.zeros(2, 2, dtype=F64), atol=1e-12,
                               rtol=0)


def test_kernel_samples_and_score():
    sde, g = phase_sde(), torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, generator=g, dtype=F64)
    t = torch.tensor([0.05, 0.2, 0.5, 1.0], dtype=F64)
    k = sde.kernel(x0, t)
    assert isinstance(k, GaussianKernel) and k.mean.shape == (4, 6)
    eps = torch.randn(4, 6, generator=g, dtype=F64)
    z = k.sample(eps)
    # the score of N(mean, L L^T) per coordinate, by autograd of the Gaussian log-density
    zg = z.clone().requires_grad_(True)
    cov = k.covariance
    blocks = (zg - k.mean).reshape(4, 2, 3)
    logp = -0.5 * (blocks * torch.linalg.solve(cov, blocks)).sum()
    (grad,) = torch.autograd.grad(logp, zg)
    torch.testing.assert_close(k.score(eps), grad, rtol=1e-10, atol=1e-10)


def test_lift_and_project():
    sde, g = phase_sde(), torch.Generator().manual_seed(1)
    x0 = torch.randn(20000, 2, generator=g, dtype=F64)
    z0 = sde.lift(x0, g)
    assert z0.shape == (20000, 4)
    torch.testing.assert_close(sde.project(z0), x0, rtol=0, atol=0)
    m = z0[:, 2:]
    assert abs(m.var().item() - MOMENTUM_VAR) < 0.01 and abs(m.mean().item()) < 0.01
    assert sde.state_shape((8, 3, 4, 4)) == (8, 6, 4, 4)


@pytest.mark.parametrize("t", [0.02, 0.3, 1.0])
def test_oracle_score_is_the_gradient_of_the_oracle_log_density(t):
    gmm, sde, g = mixture(), phase_sde(), torch.Generator().manual_seed(2)
    z = 1.5 * torch.randn(64, 4, generator=g, dtype=F64)
    tt = torch.full((64,), t, dtype=F64)
    zg = z.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(gmm.log_prob_fn(sde)(zg, tt).sum(), zg)
    torch.testing.assert_close(gmm.score_fn(sde)(z, tt), grad, rtol=1e-10, atol=1e-10)


def test_oracle_density_is_the_diffused_mixture_by_monte_carlo():
    """E over z0 ~ lifted mixture of p(z_t | z0) at a point equals the oracle density."""
    gmm, sde, g = mixture(), phase_sde(), torch.Generator().manual_seed(3)
    t = torch.tensor([0.15], dtype=F64)
    z0 = sde.lift(gmm.sample(400000, g), g)
    A, Sigma = sde.transition(torch.zeros(1, dtype=F64), t)
    points = torch.tensor([[0.3, -0.2, 0.1, 0.4], [-1.0, 0.5, 0.8, -0.3]], dtype=F64)
    L = torch.linalg.cholesky(Sigma[0])
    for z in points:
        mean = (A[0] @ z0.reshape(-1, 2, 2)).reshape(-1, 4)
        d = torch.linalg.solve_triangular(L, (z - mean).reshape(-1, 2, 2), upper=False)
        log_k = -0.5 * d.pow(2).sum((1, 2)) - 2 * torch.log(2 * torch.pi * L.diagonal().prod())
        mc = torch.logsumexp(log_k, 0) - torch.log(torch.tensor(len(log_k), dtype=F64))
        exact = gmm.log_prob_fn(sde)(z[None], t)[0]
        assert abs(mc - exact) < 0.02, (mc.item(), exact.item())


def iid_ratio(x, reference_sampler, g, n_sets=4):
    """SWD of x (n_sets sets) to fresh true sets, over the SWD between independent true sets."""
    n = x.shape[0] // n_sets
    swd = lambda a, b: sliced_wasserstein(a, b, 256, torch.Generator().manual_seed(9))
    model = torch.stack([swd(a, reference_sampler(n, g)) for a in x.chunk(n_sets)]).mean()
    base = torch.stack([swd(reference_sampler(n, g), reference_sampler(n, g))
                        for _ in range(n_sets)]).mean()
    return (model / base).item()


def test_phase_space_samplers_reach_the_iid_baseline():
    """EM and the PF-ODE with the exact K = 2 score sample the lifted mixture at t = eps."""
    gmm, sde = mixture(), phase_sde()
    score, eps = gmm.score_fn(sde), 1e-3

    def true_states(n, g):
        # p_eps of the state: the lifted mixture moved by the transition to eps
        z0 = sde.lift(gmm.sample(n, g), g)
        k_A, k_S = sde.transition(torch.zeros(n, dtype=F64), torch.full((n,), eps, dtype=F64))
        noise = torch.randn(n, 2, 2, generator=g, dtype=F64)
        return ((k_A @ z0.reshape(n, 2, 2)) + torch.linalg.cholesky(k_S) @ noise).reshape(n, 4)

    g = torch.Generator().manual_seed(4)
    shape = (4 * 800, 4)
    em = euler_maruyama(sde, score, shape, 250, eps=eps, generator=g, dtype=F64, denoise=False)
    ode = probability_flow(sde, score, shape, eps=eps, generator=g, dtype=F64)
    for name, x in (("euler_maruyama", em), ("probability_flow", ode)):
        ratio = iid_ratio(x, true_states, torch.Generator().manual_seed(5))
        assert ratio < 1.35, f"{name}: SWD / iid baseline = {ratio:.2f}"


def test_phase_space_pf_ode_likelihood_is_exact():
    gmm, sde, g = mixture(), phase_sde(), torch.Generator().manual_seed(6)
    eps = 1e-3
    z = sde.lift(gmm.sample(16, g), g)
    res = log_likelihood(sde, gmm.score_fn(sde), z, exact_divergence=True, eps=eps,
                         rtol=1e-8, atol=1e-8)
    exact = gmm.log_prob_fn(sde)(z, torch.full((16,), eps, dtype=F64))
    assert (res.logp - exact).abs().max().item() < 0.01


def test_dsm_on_the_state_is_zero_mean_at_the_exact_score_and_matches_eps_loss():
    """DSM of the exact K = 2 score; with SigmaSquaredWeighting and s = -L^{-T} eps_hat the loss is
    1/2 |eps_hat - eps|^2, as for K = 1."""
    sde, g = phase_sde(), torch.Generator().manual_seed(7)
    x0 = torch.randn(32, 3, generator=g, dtype=F64)
    t = torch.rand(32, generator=g, dtype=F64) * 0.9 + 0.05
    eps = torch.randn(32, 6, generator=g, dtype=F64)
    eps_hat = torch.randn(32, 6, generator=g, dtype=F64)
    scale = sde.marginal_scale(t)
    model = lambda z, tt: GaussianKernel(None, scale).score(eps_hat)
    loss = denoising_score_matching(model, sde, x0, t, SigmaSquaredWeighting(), noise=eps)
    torch.testing.assert_close(loss, 0.5 * (eps_hat - eps).pow(2).sum(1), rtol=1e-10, atol=1e-10)
    lik = denoising_score_matching(model, sde, x0, t, LikelihoodWeighting(), noise=eps)
    assert lik.shape == (32,) and bool((lik >= 0).all())


def test_vp_transition_matches_its_marginals():
    sde = VPSDE()
    s, t = torch.tensor([0.2], dtype=F64), torch.tensor([0.7], dtype=F64)
    A, Sigma = sde.transition(s, t)
    (a_s, sd_s), (a_t, sd_t) = sde.marginal_coefficients(s), sde.marginal_coefficients(t)
    torch.testing.assert_close(A * a_s, a_t)
    torch.testing.assert_close(A**2 * sd_s**2 + Sigma, sd_t**2)

"""Phase space against exact answers: the complete recipe, CLD and PSLD (lsgm_edu.phase_space).

- transitions against a numerical solution of the moment ODEs (float64, 1e-8), and the kernels
  against the references' own closed forms; PSLD(Gamma = 0, nu = 4, beta = 8) is CLD(M^-1 = 4,
  beta = 4); `recipe` reproduces CLD, PSLD and (one variable, D = 1/2) the VP SDE;
- HSM and DSM on the exact Gaussian-mixture oracle lifted to phase space: unbiased against the
  explicit score-matching loss, ℓ_t bounded (HSM) or not (DSM) as t -> 0;
- EM, SSCS and the PF-ODE with the exact score reach the i.i.d. baseline at 100 steps; SSCS
  beats EM at 20 steps; the PF-ODE log-likelihood of the state is exact;
- the score heads (whole state, momentum only, CLD's mixed score) and their ε-losses.
"""

import functools
import itertools
import math

import pytest
import torch

from lsgm_edu.likelihood import data_log_likelihood, log_likelihood
from lsgm_edu.losses import LikelihoodWeighting, SigmaSquaredWeighting, denoising_score_matching
from lsgm_edu.metrics import sliced_wasserstein_ratio
from lsgm_edu.nets.precond import ScoreModel
from lsgm_edu.phase_space import CLD, PSLD, recipe
from lsgm_edu.samplers import (
    euler_maruyama,
    predictor_corrector,
    probability_flow,
    reverse_time_grid,
    sscs,
)
from lsgm_edu.sde import VPSDE
from lsgm_edu.toy import GaussianMixture

F64 = torch.float64


def mixture():
    means = torch.tensor([[-1.5, 0.0], [1.5, 0.5], [0.0, 1.8]], dtype=F64)
    return GaussianMixture(means, torch.tensor([0.4, 0.5, 0.35]), torch.tensor([0.5, 0.3, 0.2]))


def times(*values):
    return torch.tensor(values, dtype=F64)


# --- transitions and kernels -------------------------------------------------------------------


def moment_ode(sde, s, t, n_steps=4000):
    """A(s, t) and Sigma(s, t) by RK4 on dA/du = beta(u) F A, dS/du = beta(u) (F S + S F^T + G G^T)."""
    F, Q = sde.F, sde.G @ sde.G.T

    def rhs(u, A, S):
        b = sde.beta_min + u * (sde.beta_max - sde.beta_min)
        return b * F @ A, b * (F @ S + S @ F.T + Q)

    A, S, h = torch.eye(2, dtype=F64), torch.zeros(2, 2, dtype=F64), (t - s) / n_steps
    for i in range(n_steps):
        u = s + i * h
        k1 = rhs(u, A, S)
        k2 = rhs(u + h / 2, A + h / 2 * k1[0], S + h / 2 * k1[1])
        k3 = rhs(u + h / 2, A + h / 2 * k2[0], S + h / 2 * k2[1])
        k4 = rhs(u + h, A + h * k3[0], S + h * k3[1])
        A = A + h / 6 * (k1[0] + 2 * k2[0] + 2 * k3[0] + k4[0])
        S = S + h / 6 * (k1[1] + 2 * k2[1] + 2 * k3[1] + k4[1])
    return A, S


SDES = [
    CLD(),
    CLD(beta=0.1, beta_max=7.0, m_inv=1.0),  # CLD's CelebA "post-paper" schedule 0.1 + 6.9 t
    PSLD(),
    PSLD(Gamma=0.02, nu=4.02),
    PSLD(beta=2.0, Gamma=2.0, nu=1.0),  # the reference yaml default (M^-1 = 0.25)
    PSLD(beta=1.0, beta_max=12.0, Gamma=0.5, nu=3.0, kappa=0.1),
]


@pytest.mark.parametrize("sde", SDES, ids=repr)
@pytest.mark.parametrize(("s", "t"), [(0.0, 0.3), (0.2, 0.9), (0.5, 0.55), (0.0, 1.0)])
def test_transition_solves_the_moment_odes(sde, s, t):
    A, Sigma = sde.transition(times(s), times(t))
    A_ode, S_ode = moment_ode(sde, s, t)
    torch.testing.assert_close(A[0], A_ode, rtol=0, atol=1e-8)
    torch.testing.assert_close(Sigma[0], S_ode, rtol=0, atol=1e-8)


def cld_reference_kernel(sde, x0, v0, B, Sxx0, Svv0):
    """CLD-SGM's closed-form mean and covariance (REFERENCE §B1), written out independently."""
    g = 1 / sde.friction
    e2, e4 = torch.exp(-2 * B * g), torch.exp(-4 * B * g)
    mu_x = e2 * ((1 + 2 * B * g) * x0 + 4 * B * g**2 * v0)
    mu_v = e2 * (-B * x0 + (1 - 2 * B * g) * v0)
    xx = e4 * (Sxx0 + torch.exp(4 * B * g) - 1 + 4 * B * g * (Sxx0 - 1)
               + 4 * B**2 * g**2 * (Sxx0 - 2) + 16 * g**4 * B**2 * Svv0)
    xv = e4 * (-Sxx0 * B + 4 * g**2 * B * Svv0 - 2 * g * B**2 * (Sxx0 - 2)
               - 8 * g**3 * B**2 * Svv0)
    vv = e4 * (sde.friction**2 * (torch.exp(4 * B * g) - 1) / 4 + sde.friction * B
               - 4 * g * B * Svv0 + 4 * g**2 * B**2 * Svv0 + Svv0 + B**2 * (Sxx0 - 2))
    return mu_x, mu_v, xx, xv, vv


def psld_reference_kernel(sde, x0, m0, B, Sxx0, Smm0):
    """PSLD's closed-form mean and covariance (REFERENCE §C3), written out independently."""
    G, nu, mi = sde.Gamma, sde.nu, sde.m_inv
    M = 1 / mi
    ea = torch.exp(-(nu + G) * B / 4)
    mu_x = ea * ((nu - G) / 4 * B * x0 + (G - nu) ** 2 / 8 * B * m0 + x0)
    mu_m = ea * (-0.5 * B * x0 + (G - nu) / 4 * B * m0 + m0)
    ec, grow = torch.exp(-(nu + G) * B / 2), torch.exp((nu + G) * B / 2)
    xx = ec * (mi / 4 * B**2 * Sxx0 + mi**2 / 4 * B**2 * Smm0 + (nu - G) / 2 * B * Sxx0
               - mi / 2 * B**2 + (G - nu) / 2 * B + (grow - 1) + Sxx0)
    xm = ec * ((G - nu) / 8 * B**2 * Sxx0 + mi * (G - nu) / 8 * B**2 * Smm0 - 0.5 * B * Sxx0
               + mi / 2 * B * Smm0 + (nu - G) / 4 * B**2)
    mm = ec * (0.25 * B**2 * Sxx0 + mi / 4 * B**2 * Smm0 + (G - nu) / 2 * B * Smm0
               - 0.5 * B**2 + M * (nu - G) / 2 * B + M * (grow - 1) + Smm0)
    return mu_x, mu_m, xx, xm, mm


@pytest.mark.parametrize("sde", SDES, ids=repr)
@pytest.mark.parametrize("hsm", [True, False])
def test_kernels_equal_the_references_closed_forms(sde, hsm):
    g = torch.Generator().manual_seed(0)
    t = times(1e-5, 1e-3, 0.1, 0.5, 1.0)
    x0 = torch.randn(5, 3, generator=g, dtype=F64)
    m0 = torch.randn(5, 3, generator=g, dtype=F64) * 0.3
    B = sde.integrated_beta(torch.zeros_like(t), t)[:, None]
    Smm0 = sde.lift_covariance[1, 1].item() if hsm else 0.0
    if isinstance(sde, CLD):
        parts = cld_reference_kernel(sde, x0, 0 * m0 if hsm else m0, B, 0.0, Smm0)
    else:
        parts = psld_reference_kernel(sde, x0, 0 * m0 if hsm else m0, B, 0.0, Smm0)
    mu_x, mu_m, xx, xm, mm = parts
    k = sde.kernel(x0, t) if hsm else sde.kernel(x0, t, m0)
    torch.testing.assert_close(k.mean, torch.cat([mu_x, mu_m], 1), rtol=0, atol=1e-10)
    cov = k.covariance - sde.numerical_eps * torch.eye(2, dtype=F64)
    ref = torch.stack([torch.cat([xx, xm], 1), torch.cat([xm, mm], 1)], 1)
    torch.testing.assert_close(cov, ref, rtol=0, atol=1e-10)


def test_psld_without_position_noise_is_cld():
    """PSLD(Gamma = 0, nu = 4, beta = 8) = CLD(M^-1 = 4, beta = 4) (Pandey & Mandt 2023)."""
    psld, cld = PSLD(beta=8.0, Gamma=0.0, nu=4.0), CLD(beta=4.0, m_inv=4.0)
    s, t = times(0.0, 0.1, 0.3), times(0.2, 0.5, 1.0)
    for a, b in zip(psld.transition(s, t), cld.transition(s, t), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    torch.testing.assert_close(psld.marginal_scale(t), cld.marginal_scale(t), rtol=0, atol=1e-12)
    torch.testing.assert_close(psld.F * 8, cld.F * 4, rtol=0, atol=1e-12)
    torch.testing.assert_close(psld.G * math.sqrt(8), cld.G * 2, rtol=0, atol=1e-12)


def test_recipe_gives_cld_psld_and_vp():
    J = [[0.0, -1.0], [1.0, 0.0]]
    cld = CLD(beta=4.0, m_inv=4.0, gamma=0.04)
    as_recipe = recipe([[0.0, 0.0], [0.0, 1.0]], J, m_inv=4.0, beta_min=4.0, gamma=0.04)
    psld = PSLD(beta=8.0, Gamma=0.01, nu=4.01, kappa=0.04)
    m_inv = (4.01 - 0.01) ** 2 / 4
    psld_recipe = recipe([[0.005, 0.0], [0.0, 2.005 / m_inv]], [[0.0, -0.5], [0.5, 0.0]],
                         m_inv=m_inv, beta_min=8.0, gamma=0.04)
    t = times(1e-5, 0.2, 1.0)
    for a, b in ((cld, as_recipe), (psld, psld_recipe)):
        torch.testing.assert_close(a.marginal_scale(t), b.marginal_scale(t), rtol=0, atol=1e-12)
        torch.testing.assert_close(a.prior_covariance, b.prior_covariance, rtol=0, atol=0)
        torch.testing.assert_close(a.lift_covariance, b.lift_covariance, rtol=0, atol=1e-15)
    # one variable, D = 1/2, Q = 0: the VP SDE, beta(t) linear from 0.1 to 20
    vp, one = VPSDE(beta_min=0.1, beta_max=20.0), recipe(0.5, 0.0, beta_min=0.1, beta_max=20.0,
                                                          numerical_eps=0.0)
    assert one.K == 1
    s, t = times(0.0, 0.2, 0.5), times(0.3, 0.7, 1.0)
    A, S = one.transition(s, t)
    A_vp, S_vp = vp.transition(s, t)
    torch.testing.assert_close(A[:, 0, 0], A_vp, rtol=0, atol=1e-12)
    torch.testing.assert_close(S[:, 0, 0], S_vp, rtol=0, atol=1e-12)
    torch.testing.assert_close(one.marginal_scale(t)[:, 0, 0], vp.marginal_scale(t), rtol=1e-12,
                               atol=0)
    f, g2 = one.sde_coefficients(t)
    f_vp, g_vp = vp.sde_coefficients(t)
    torch.testing.assert_close(f[:, 0, 0], f_vp, rtol=1e-12, atol=0)
    torch.testing.assert_close(g2[:, 0, 0], g_vp, rtol=1e-12, atol=0)


@pytest.mark.parametrize(("D", "Q", "message"), [
    ([[1.0, 0.0], [0.0, -0.1]], [[0.0, -1.0], [1.0, 0.0]], "positive semidefinite"),
    ([[1.0, 0.2], [0.0, 1.0]], [[0.0, -1.0], [1.0, 0.0]], "not symmetric"),
    ([[1.0, 0.0], [0.0, 1.0]], [[0.0, -1.0], [0.5, 0.0]], "skew-symmetric"),
    ([[1.0, 0.0], [0.0, 1.0]], [[0.1, -1.0], [1.0, 0.0]], "skew-symmetric"),
    ([[1.0]], [[0.0, 0.0], [0.0, 0.0]], "one size"),
    (torch.eye(3), torch.zeros(3, 3), "K = 1"),
])
def test_recipe_refuses_invalid_dissipation_or_mixing(D, Q, message):
    with pytest.raises(ValueError, match=message):
        recipe(D, Q, m_inv=4.0)


def test_invalid_parameters_are_refused():
    with pytest.raises(ValueError, match="nu must differ from Gamma"):
        PSLD(Gamma=1.0, nu=1.0)
    with pytest.raises(ValueError, match="m_inv"):
        CLD(m_inv=0.0)
    with pytest.raises(ValueError, match="Gamma"):
        PSLD(Gamma=-0.1)


def test_hsm_keeps_the_momentum_scale_bounded_and_dsm_does_not():
    """ℓ_t = 1 / L_mm: 11.2 (HSM) vs 111.8 (DSM) at t = 1e-5 for CLD (REFERENCE §B1), with the
    references' numerical_eps = 1e-9 on the covariance diagonal. That floor is what bounds HSM:
    in exact arithmetic x_t reveals m0 through x_t - x0 ≈ β M^-1 t m0 and both scales grow like
    t^-1/2 below t ~ 4e-3, HSM's by a factor sqrt(3) / 2 (193.7 vs 223.6 at 1e-5)."""
    sde, t = CLD(), times(1e-5)
    x0, m0 = torch.zeros(1, 3, dtype=F64), torch.zeros(1, 3, dtype=F64)
    ell_hsm = 1 / sde.kernel(x0, t).scale[0, 1, 1].item()
    ell_dsm = 1 / sde.kernel(x0, t, m0).scale[0, 1, 1].item()
    assert ell_hsm == pytest.approx(11.163, abs=0.01)
    assert ell_dsm == pytest.approx(111.84, abs=0.05)
    ells = [1 / sde.kernel(x0, times(t), m0).scale[0, 1, 1].item() for t in (1e-2, 1e-3, 1e-4)]
    assert ells[0] < ells[1] < ells[2] < ell_dsm  # DSM: ℓ_t grows as t -> 0
    assert 1 / sde.marginal_scale(times(1e-8))[0, 1, 1] < 1 / math.sqrt(0.04 / 4) + 1e-3
    exact = CLD(numerical_eps=0.0)
    hsm, dsm = (1 / exact.kernel(x0, times(1e-5), m).scale[0, 1, 1].item() for m in (None, m0))
    assert hsm == pytest.approx(193.7, abs=0.1) and dsm == pytest.approx(223.6, abs=0.1)
    assert hsm / dsm == pytest.approx(math.sqrt(3) / 2, rel=1e-3)


@pytest.mark.parametrize("sde_class", [CLD, PSLD])
def test_upper_factorization_is_another_root_of_the_same_kernel(sde_class):
    """PSLD's decomp_mode="upper": U U^T = Σ with U upper-triangular; z = mean + U ε and the
    score -U^{-T} ε is still the gradient of log N(mean, Σ) at z."""
    lower, upper = sde_class(), sde_class(factorization="upper")
    g = torch.Generator().manual_seed(11)
    x0 = torch.randn(4, 3, generator=g, dtype=F64)
    t = times(1e-4, 0.05, 0.5, 1.0)
    kl, ku = lower.kernel(x0, t), upper.kernel(x0, t)
    assert bool((ku.scale.tril(-1) == 0).all()) and bool((kl.scale.triu(1) == 0).all())
    torch.testing.assert_close(ku.covariance, kl.covariance, rtol=1e-12, atol=1e-14)
    eps = torch.randn(4, 6, generator=g, dtype=F64)
    z = ku.sample(eps).requires_grad_(True)
    blocks = (z - ku.mean).reshape(4, 2, 3)
    logp = -0.5 * (blocks * torch.linalg.solve(ku.covariance, blocks)).sum()
    (grad,) = torch.autograd.grad(logp, z)
    torch.testing.assert_close(ku.score(eps), grad, rtol=1e-9, atol=1e-9)
    eps_hat = torch.randn(4, 6, generator=g, dtype=F64)
    model = lambda zz, tt: ku.score(eps_hat)  # an ε-network read through U
    loss = denoising_score_matching(model, upper, x0, t, SigmaSquaredWeighting(), noise=eps)
    torch.testing.assert_close(loss, 0.5 * (eps_hat - eps).pow(2).sum(1), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="factorization"):
        sde_class(factorization="diagonal")
    with pytest.raises(ValueError, match="lower"):
        ScoreModel(Constant(3), CLD(factorization="upper"))(torch.zeros(2, 6, 2, 2),
                                                             torch.full((2,), 0.5))


def test_kernel_m0_is_checked():
    sde = CLD()
    with pytest.raises(ValueError, match="m0 must hold"):
        sde.kernel(torch.zeros(2, 3, dtype=F64), times(0.1, 0.2), torch.zeros(2, 4, dtype=F64))
    with pytest.raises(ValueError, match="scalar SDE has none"):
        VPSDE().kernel(torch.zeros(2, 3), times(0.1, 0.2), torch.zeros(2, 3))


# --- losses on the exact oracle ------------------------------------------------------------


@pytest.mark.parametrize("sde", [CLD(), PSLD()], ids=repr)
@pytest.mark.parametrize("hsm", [True, False])
@pytest.mark.parametrize("weighting", [SigmaSquaredWeighting(), LikelihoodWeighting()], ids=repr)
def test_score_matching_losses_are_unbiased_for_the_explicit_loss(sde, hsm, weighting):
    """E[DSM(s) - DSM(s*)] = ESM(s) = E 1/2 |s - s*|^2_λ for any s, and E[DSM(s*)] is its exact
    constant 1/2 E[target^T λ target] - 1/2 E[s*^T λ s*], for HSM and DSM on the state."""
    gmm, g = mixture(), torch.Generator().manual_seed(1)
    n = 40000
    x0 = gmm.sample(n, g)
    t = 0.01 + 0.99 * torch.rand(n, generator=g, dtype=F64)
    noise = torch.randn(n, 4, generator=g, dtype=F64)
    m0 = None if hsm else sde.lift(x0, g)[:, 2:]
    exact = gmm.score_fn(sde)

    def perturbed(z, tt):
        return exact(z, tt) + 0.3 * torch.tanh(z)

    def dsm(score):
        return denoising_score_matching(score, sde, x0, t, weighting, noise=noise, m0=m0)

    diff = dsm(perturbed) - dsm(exact)
    k = sde.kernel(x0, t, m0)
    z = k.sample(noise)
    lam = weighting(sde, t)
    r = 0.3 * torch.tanh(z)
    esm = 0.5 * (r.reshape(n, 2, 2) * (lam @ r.reshape(n, 2, 2))).sum((1, 2))
    se = (diff - esm).std() / math.sqrt(n)
    assert abs((diff - esm).mean()) < 3 * se, ((diff - esm).mean(), se)
    # the constant at the true score
    target = k.score(noise).reshape(n, 2, 2)
    s_star = exact(z, t).reshape(n, 2, 2)
    constant = 0.5 * ((target * (lam @ target)).sum((1, 2)) - (s_star * (lam @ s_star)).sum((1, 2)))
    at_true = dsm(exact)
    se = (at_true - constant).std() / math.sqrt(n)
    assert abs((at_true - constant).mean()) < 3 * se


# --- samplers on the exact oracle ---------------------------------------------------------


def sample_ratio(sde, sampler, steps, striding="uniform", n=4000, seed=1):
    """SWD of the sampled x (2 sets of n/2) to fresh data sets over the i.i.d. baseline."""
    gmm = mixture()
    score = gmm.score_fn(sde)
    g = torch.Generator().manual_seed(seed)
    if sampler is probability_flow:
        z = probability_flow(sde, score, (n, 4), generator=g, dtype=F64, rtol=1e-6, atol=1e-6)
    else:
        z = sampler(sde, score, (n, 4), steps, generator=g, dtype=F64, striding=striding)
    return sliced_wasserstein_ratio(sde.project(z), gmm.sample, sets=2, references=4,
                                    baseline_pairs=16, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("sde", [CLD(), PSLD()], ids=repr)
@pytest.mark.parametrize("sampler", [euler_maruyama, sscs, probability_flow],
                         ids=["em", "sscs", "ode"])
def test_samplers_reach_the_iid_baseline(sde, sampler):
    ratio = sample_ratio(sde, sampler, 100, "quadratic")
    assert ratio < 1.3, f"{sampler.__name__}: SWD / iid baseline = {ratio:.2f}"


@pytest.mark.parametrize("sde", [CLD(), PSLD()], ids=repr)
def test_predictor_corrector_reaches_the_iid_baseline(sde):
    """Euler-Maruyama + one Langevin corrector preconditioned by G G^T (SWD ratio 1.08 CLD,
    1.19 PSLD at 100 quadratic steps; 1.35 / 1.38 at 20, where EM alone gives 1.51 / 1.60)."""
    pc = functools.partial(predictor_corrector, snr=0.16, n_corrector=1,
                           predictor="euler_maruyama")
    assert sample_ratio(sde, pc, 100, "quadratic") < 1.3


def test_predictor_corrector_of_cld_never_reads_the_x_score():
    """No noise enters x under CLD, so the reverse drift and the G G^T-preconditioned corrector
    use the momentum score alone: a momentum head's missing x-score cannot leak in."""
    sde, score = CLD(), mixture().score_fn(CLD())

    def garbage_x(z, t):
        s = score(z, t)
        return torch.cat([torch.full_like(s[:, :2], 1e6), s[:, 2:]], dim=1)

    runs = [predictor_corrector(sde, fn, (64, 4), 20, 0.16, 2, predictor="euler_maruyama",
                                generator=torch.Generator().manual_seed(4), dtype=F64)
            for fn in (score, garbage_x)]
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("striding", ["uniform", "quadratic"])
def test_sscs_beats_euler_maruyama_at_20_steps(striding):
    """With the exact score, 20 steps: the splitting's exact linear part pays (SWD ratio EM 6.6
    vs SSCS 2.3 uniform, 2.6 vs 1.9 quadratic for PSLD with 20,000 samples; the benchmark
    benchmarks/phase_space_samplers.py has the table)."""
    sde = PSLD()
    em = sample_ratio(sde, euler_maruyama, 20, striding)
    split = sample_ratio(sde, sscs, 20, striding)
    assert split < em, (striding, split, em)


def test_quadratic_striding_puts_small_steps_near_the_data():
    uniform = reverse_time_grid(1.0, 1e-3, 5)
    quad = reverse_time_grid(1.0, 1e-3, 5, "quadratic")
    assert uniform[0] == quad[0] == 1.0 and uniform[-2] == pytest.approx(1e-3)
    assert quad[-2] == pytest.approx(1e-3) and quad[-1] == uniform[-1] == 0.0
    assert quad[1] == pytest.approx(1e-3 + 0.999 * 0.75**2)
    gaps = [a - b for a, b in itertools.pairwise(quad[:-1])]
    assert gaps == sorted(gaps, reverse=True)
    with pytest.raises(ValueError, match="striding"):
        reverse_time_grid(1.0, 1e-3, 5, "cubic")


def test_sscs_refuses_an_sde_without_a_recipe():
    with pytest.raises(ValueError, match="complete recipe"):
        sscs(VPSDE(), lambda z, t: -z, (4, 2), 10)


def test_sscs_with_the_vp_recipe_samples_the_mixture():
    """The splitting is generic in K: the one-variable recipe (VP) samples too. (With beta up to
    20 it needs more steps than EM: SWD ratio 1.6 at 100 quadratic steps against EM's 1.2, 1.1
    at 400 and 1000; with a constant beta = 8, 1.1 at 100.)"""
    gmm, sde = mixture(), recipe(0.5, 0.0, beta_min=0.1, beta_max=20.0)
    g = torch.Generator().manual_seed(3)
    x = sscs(sde, gmm.score_fn(sde), (4000, 2), 400, generator=g, dtype=F64, striding="quadratic")
    ratio = sliced_wasserstein_ratio(x, gmm.sample, sets=2, references=4,
                                     generator=torch.Generator().manual_seed(5))
    assert ratio < 1.3


# --- likelihood ---------------------------------------------------------------------------


@pytest.mark.parametrize("sde", [CLD(), PSLD()], ids=repr)
def test_pf_ode_log_likelihood_of_the_state_is_exact(sde):
    gmm, g = mixture(), torch.Generator().manual_seed(6)
    z = sde.lift(gmm.sample(12, g), g)
    eps = 1e-3
    res = log_likelihood(sde, gmm.score_fn(sde), z, exact_divergence=True, eps=eps, rtol=1e-8,
                         atol=1e-8)
    exact = gmm.log_prob_fn(sde)(z, torch.full((12,), eps, dtype=F64))
    assert (res.logp - exact).abs().max().item() < 0.01


def test_data_bound_is_tight_at_t_zero_in_expectation():
    """log p(x) >= E_m0[log p(x, m0)] + H(p(m0)). The lift draws m0 independently of x, so at
    t -> 0 the bound is tight: log p(x) - (log p(x, m0) + H) = -log N(m0; 0, C) - H, mean 0 and
    variance D / 2 (D = 2 data dims) per draw. `data_log_likelihood` (one m0 per x, the PF-ODE
    of the state with the exact score) must show exactly that."""
    gmm, sde, g = mixture(), PSLD(), torch.Generator().manual_seed(7)
    x = gmm.sample(64, g)
    res = data_log_likelihood(sde, gmm.score_fn(sde), x, generator=torch.Generator().manual_seed(8),
                              exact_divergence=True, eps=1e-5, rtol=1e-7, atol=1e-7, n_bins=256)
    m0 = sde.lift(x, torch.Generator().manual_seed(8))[:, 2:]  # the draw it made
    C = sde.lift_covariance[1, 1].item()
    log_n_m0 = (-0.5 * m0.pow(2) / C - 0.5 * math.log(2 * math.pi * C)).sum(1)
    entropy = math.log(2 * math.pi * math.e * C)  # D / 2 log(2 pi e C) with D = 2
    exact_state = gmm.log_prob_fn(sde)(torch.cat([x, m0], 1), torch.full((64,), 1e-5, dtype=F64))
    assert (res.logp - (exact_state + entropy)).abs().max() < 0.01  # the ODE part is exact
    gap = gmm.log_prob(x) - res.logp
    assert (gap - (-log_n_m0 - entropy)).abs().max() < 0.03
    assert abs(gap.mean()) < 3 * gap.std() / 8, gap.mean()
    assert res.bpd.shape == (64,) and bool(torch.isfinite(res.bpd).all())


# --- score heads ----------------------------------------------------------------------------


class Constant(torch.nn.Module):
    def __init__(self, channels, value=0.0):
        super().__init__()
        self.channels, self.value = channels, value

    def forward(self, z, c):
        return torch.full((z.shape[0], self.channels, *z.shape[2:]), self.value, dtype=z.dtype)


def test_cld_mixed_score_is_the_hsm_momentum_score_of_a_normal():
    sde, g = CLD(), torch.Generator().manual_seed(9)
    z = torch.randn(5, 6, 2, 2, generator=g, dtype=F64)
    t = times(1e-4, 0.01, 0.1, 0.5, 1.0)
    model = ScoreModel(Constant(3), sde, mixed_score=True)
    cov = sde.marginal_scale(t) @ sde.marginal_scale(t).mT
    s = model(z, t)
    torch.testing.assert_close(s[:, 3:], -z[:, 3:] / cov[:, 1, 1, None, None, None], rtol=1e-10,
                               atol=1e-12)
    plain = ScoreModel(Constant(3, 0.5), sde)
    ell = 1 / sde.marginal_scale(t)[:, 1, 1]
    torch.testing.assert_close(plain(z, t)[:, 3:], -0.5 * ell[:, None, None, None].expand(5, 3, 2, 2),
                               rtol=1e-10, atol=1e-12)


def test_momentum_head_loss_is_the_momentum_eps_loss():
    sde, g = CLD(), torch.Generator().manual_seed(10)
    x0 = torch.randn(6, 3, generator=g, dtype=F64)
    t = 0.01 + torch.rand(6, generator=g, dtype=F64)
    eps = torch.randn(6, 6, generator=g, dtype=F64)
    eps_m = torch.randn(6, 3, generator=g, dtype=F64)

    class Net(torch.nn.Module):
        def forward(self, z, c):
            return eps_m

    model = ScoreModel(Net(), sde)
    loss = denoising_score_matching(model, sde, x0, t, SigmaSquaredWeighting((1,)), noise=eps)
    torch.testing.assert_close(loss, 0.5 * (eps_m - eps[:, 3:]).pow(2).sum(1), rtol=1e-10,
                               atol=1e-10)


def test_heads_that_cannot_be_right_are_refused():
    z, t = torch.zeros(2, 6, 2, 2), torch.full((2,), 0.5)
    with pytest.raises(ValueError, match="noise on x"):
        ScoreModel(Constant(3), PSLD())(z, t)
    with pytest.raises(ValueError, match="mixed_score is CLD's"):
        ScoreModel(Constant(3), PSLD(), mixed_score=True)
    with pytest.raises(ValueError, match="momentum head"):
        ScoreModel(Constant(6), CLD(), mixed_score=True)(z, t)
    with pytest.raises(ValueError, match="centered"):
        ScoreModel(Constant(6), PSLD(), centered=False)
    with pytest.raises(ValueError, match="components"):
        SigmaSquaredWeighting((1,))(VPSDE(), t)

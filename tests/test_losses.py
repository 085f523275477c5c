"""Score-matching losses, weightings and time samplers against exact oracles.

Expectation identities are checked per sample and paired (same x, same noise), with a
tolerance of Z_TOL standard errors of the mean taken from the samples themselves.
"""

import math

import pytest
import torch
from scipy import integrate

from lsgm_edu.losses import (
    LikelihoodImportanceSampler,
    LikelihoodWeighting,
    SigmaSquaredWeighting,
    UniformTimeSampler,
    UnitWeighting,
    denoising_score_matching,
    explicit_score_matching,
    implicit_score_matching,
    sliced_score_matching,
)
from lsgm_edu.sde import VESDE, VPSDE, SubVPSDE
from lsgm_edu.toy import GaussianMixture

Z_TOL = 4.0  # standard errors; fixed seeds make every check deterministic
F64 = torch.float64
SDES = [VPSDE(), SubVPSDE(), VESDE()]


def mean_and_se(v: torch.Tensor):
    return v.mean().item(), (v.std() / math.sqrt(v.numel())).item()


def assert_mean_zero(v: torch.Tensor, what: str = ""):
    m, se = mean_and_se(v)
    assert abs(m) < Z_TOL * se, f"{what}: mean {m:.4g} is {abs(m) / se:.1f} standard errors from 0"


def data_gmm():
    means = torch.tensor([[-1.5, 0.0], [1.5, 0.5], [0.0, 2.0]], dtype=F64)
    return GaussianMixture(means, torch.tensor([0.5, 0.7, 0.4], dtype=F64), [0.5, 0.3, 0.2])


def other_gmm():
    """A different mixture: its exact score is a smooth, wrong model for data_gmm."""
    means = torch.tensor([[-1.0, -0.5], [1.0, 1.0]], dtype=F64)
    return GaussianMixture(means, torch.tensor([0.8, 0.6], dtype=F64), [0.4, 0.6])


def random_mlp(seed: int, d: int = 2, hidden: int = 32):
    """A fixed random tanh network x -> [B, d] in float64 (a non-gradient-field model)."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(hidden, d, generator=g, dtype=F64) / math.sqrt(d)
    b1 = torch.randn(hidden, generator=g, dtype=F64)
    w2 = torch.randn(d, hidden, generator=g, dtype=F64) / math.sqrt(hidden)
    return lambda x: torch.tanh(x @ w1.T + b1) @ w2.T


def trace_of_jacobian(f, x):
    jac = torch.func.vmap(torch.func.jacrev(lambda xi: f(xi[None])[0]))(x)
    return jac.diagonal(dim1=-2, dim2=-1).sum(-1)


# --- explicit / implicit / sliced score matching -----------------------------------------


def test_ism_trace_is_exact_jacobian_trace():
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    model = random_mlp(1, d=3)
    s = model(x)
    expected = trace_of_jacobian(model, x) + 0.5 * s.pow(2).sum(1)
    torch.testing.assert_close(implicit_score_matching(model, x), expected, rtol=1e-12, atol=1e-12)


def test_ism_of_linear_score_is_closed_form_and_trains():
    # s(x) = W x: ISM = tr W + 1/2 |W x|^2, and the mean's gradient is I + W mean(x x^T)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 3, generator=g, dtype=F64)
    w = torch.randn(3, 3, generator=g, dtype=F64).requires_grad_(True)
    loss = implicit_score_matching(lambda y: y @ w.T, x)
    expected = torch.diagonal(w).sum() + 0.5 * (x @ w.T).pow(2).sum(1)
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-12, atol=1e-12)
    loss.mean().backward()
    grad = torch.eye(3, dtype=F64) + w.detach() @ (x.T @ x / len(x))
    torch.testing.assert_close(w.grad, grad, rtol=1e-12, atol=1e-12)


def test_esm_and_ism_agree_up_to_the_data_constant():
    """E[ISM] = E[ESM] - 1/2 E|∇log p|^2 for any model (Hyvärinen 2005, Theorem 1)."""
    p = data_gmm()
    x = p.sample(20_000, torch.Generator().manual_seed(3))
    const = 0.5 * p.score(x).pow(2).sum(1)
    gaps, esms = [], []
    for model in (other_gmm().score, random_mlp(4)):
        esm = explicit_score_matching(model, x, p.score)
        with torch.no_grad():  # evaluation mode: the value without a graph
            ism = implicit_score_matching(model, x)
        assert esm.shape == ism.shape == (len(x),) and not ism.requires_grad
        gap = ism - esm + const  # tr ∇s + s·∇log p: zero mean by integration by parts
        assert_mean_zero(gap, "ISM - ESM + 1/2|s*|^2")
        gaps.append(gap)
        esms.append(esm)
    # the constant depends on p only: the two models' gaps agree (paired on the same x) ...
    assert_mean_zero(gaps[0] - gaps[1], "gap difference between models")
    # ... while the models themselves are far apart, so the test has power
    m, se = mean_and_se(esms[0] - esms[1])
    assert abs(m) > 20 * se


def test_esm_accepts_a_target_tensor_and_is_zero_at_the_truth():
    p = data_gmm()
    x = p.sample(100, torch.Generator().manual_seed(5))
    assert torch.equal(explicit_score_matching(p.score, x, p.score(x)), torch.zeros(100, dtype=F64))
    model = random_mlp(6)
    torch.testing.assert_close(
        explicit_score_matching(model, x, p.score(x)),
        0.5 * (model(x) - p.score(x)).pow(2).sum(1),
    )


@pytest.mark.parametrize("projection", ["rademacher", "gaussian"])
@pytest.mark.parametrize("variance_reduced", [True, False])
def test_sliced_score_matching_is_unbiased_for_ism(projection, variance_reduced):
    """E_v[v^T J v] = tr J and E_v[(v^T s)^2] = |s|^2 (Song et al. 2019, eqs. 7-8)."""
    p = data_gmm()
    x = p.sample(20_000, torch.Generator().manual_seed(7))
    for model in (other_gmm().score, random_mlp(8)):
        ism = implicit_score_matching(model, x).detach()
        ssm = sliced_score_matching(
            model, x, 2, variance_reduced, torch.Generator().manual_seed(9), projection=projection
        ).detach()
        assert ssm.shape == (len(x),)
        assert_mean_zero(ssm - ism, f"SSM({projection}, vr={variance_reduced}) - ISM")


def test_ssm_and_ssm_vr_agree():
    p = data_gmm()
    x = p.sample(20_000, torch.Generator().manual_seed(10))
    for model in (random_mlp(11), other_gmm().score):
        ism = implicit_score_matching(model, x).detach()
        plain = sliced_score_matching(model, x, 1, False, torch.Generator().manual_seed(12))
        vr = sliced_score_matching(model, x, 1, True, torch.Generator().manual_seed(12))
        assert_mean_zero(plain.detach() - vr.detach(), "SSM - SSM-VR")
    # where |s| is large, 1/2 (v^T s)^2 dominates the projection noise and VR removes it
    # (for the small random MLP the two noises are comparable; VR is no guarantee)
    assert (vr - ism).var() < 0.2 * (plain - ism).var()


def test_ssm_vr_rademacher_is_exact_for_a_diagonal_jacobian():
    # v_i^2 = 1, so v^T J v = tr J whenever J is diagonal: SSM-VR equals ISM sample by sample
    x = torch.randn(200, 4, generator=torch.Generator().manual_seed(13), dtype=F64)
    scale = torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=F64)

    def model(y):
        return -scale * y + torch.sin(y)

    ssm = sliced_score_matching(model, x, 3, True, torch.Generator().manual_seed(0))
    torch.testing.assert_close(ssm, implicit_score_matching(model, x), rtol=1e-12, atol=1e-12)


def test_ssm_gradient_is_unbiased_for_ism_gradient():
    g = torch.Generator().manual_seed(14)
    x = torch.randn(4000, 3, generator=g, dtype=F64)
    w = torch.randn(3, 3, generator=g, dtype=F64).requires_grad_(True)
    sliced_score_matching(lambda y: y @ w.T, x, 25, True, g).mean().backward()
    expected = torch.eye(3, dtype=F64) + w.detach() @ (x.T @ x / len(x))
    # off-diagonal v_i v_j average 100k random signs: standard error 0.003
    torch.testing.assert_close(w.grad, expected, rtol=0, atol=0.015)


def test_sliced_projections_come_from_the_generator_only():
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(15), dtype=F64)
    model = random_mlp(16)
    state = torch.get_rng_state()
    a = sliced_score_matching(model, x, 2, False, torch.Generator().manual_seed(1))
    b = sliced_score_matching(model, x, 2, False, torch.Generator().manual_seed(1))
    c = sliced_score_matching(model, x, 2, False, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(state, torch.get_rng_state())


def test_data_losses_return_per_sample_values_for_image_shapes():
    x = torch.randn(5, 2, 3, 3, generator=torch.Generator().manual_seed(17), dtype=F64)

    def model(y):
        return -y + 0.1 * y.pow(3)

    # per-pixel model: the Jacobian is diagonal, tr = sum(-1 + 0.3 y^2)
    expected = (-1 + 0.3 * x.pow(2)).flatten(1).sum(1) + 0.5 * model(x).pow(2).flatten(1).sum(1)
    for loss in (
        implicit_score_matching(model, x),
        sliced_score_matching(model, x, 2, True, torch.Generator().manual_seed(0)),
    ):
        assert loss.shape == (5,)
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    assert explicit_score_matching(model, x, torch.zeros_like(x)).shape == (5,)


def test_data_losses_reject_bad_input():
    x = torch.randn(8, 2)
    with pytest.raises(ValueError, match=r"\[B, \.\.\.\]"):
        implicit_score_matching(lambda y: y, torch.randn(8))
    with pytest.raises(ValueError, match="floating-point"):
        explicit_score_matching(lambda y: y, torch.ones(8, 2, dtype=torch.long), torch.zeros(8, 2))
    with pytest.raises(ValueError, match="shaped like x"):
        implicit_score_matching(lambda y: y[:, :1], x)
    with pytest.raises(ValueError, match="true_score"):
        explicit_score_matching(lambda y: y, x, torch.zeros(8, 3))
    with pytest.raises(ValueError, match="n_projections"):
        sliced_score_matching(lambda y: y, x, 0)
    with pytest.raises(ValueError, match="projection"):
        sliced_score_matching(lambda y: y, x, projection="sphere")


def test_ism_of_a_constant_model_has_zero_trace():
    x = torch.randn(4, 2, dtype=F64)
    c = torch.tensor([1.0, -2.0], dtype=F64)
    torch.testing.assert_close(
        implicit_score_matching(lambda y: c.expand_as(y), x), torch.full((4,), 2.5, dtype=F64)
    )


# --- weightings --------------------------------------------------------------------------


def beta(t):
    return 0.1 + t * 19.9


def int_beta(t):
    return 0.1 * t + 0.5 * 19.9 * t**2


@pytest.mark.parametrize(
    "sde,sigma2,g2",
    [
        (VPSDE(), lambda t: 1 - torch.exp(-int_beta(t)), beta),
        (
            SubVPSDE(),
            lambda t: (1 - torch.exp(-int_beta(t))) ** 2,
            lambda t: beta(t) * (1 - torch.exp(-2 * int_beta(t))),
        ),
        (
            VESDE(0.01, 50.0),
            lambda t: 0.01**2 * (5000 ** (2 * t) - 1),
            lambda t: (0.01 * 5000**t) ** 2 * 2 * math.log(5000),
        ),
    ],
)
def test_weightings_have_their_closed_form_values(sde, sigma2, g2):
    t = torch.tensor([1e-3, 0.1, 0.5, 0.9, 1.0], dtype=F64)
    torch.testing.assert_close(SigmaSquaredWeighting()(sde, t), sigma2(t), rtol=1e-10, atol=0)
    torch.testing.assert_close(LikelihoodWeighting()(sde, t), g2(t), rtol=1e-10, atol=0)
    assert torch.equal(UnitWeighting()(sde, t), torch.ones(5, dtype=F64))
    for w in (SigmaSquaredWeighting(), LikelihoodWeighting(), UnitWeighting()):
        assert w(sde, t.float()).dtype == torch.float32


# --- denoising score matching ------------------------------------------------------------


def test_dsm_matches_its_formula_with_given_noise():
    sde, g = VPSDE(), torch.Generator().manual_seed(20)
    x0 = torch.randn(16, 2, generator=g, dtype=F64)
    t = torch.rand(16, generator=g, dtype=F64) * 0.9 + 0.05
    z = torch.randn(16, 2, generator=g, dtype=F64)
    model = random_mlp(21)

    def score_fn(x, t):
        return model(x) * t[:, None]

    loss = denoising_score_matching(score_fn, sde, x0, t, LikelihoodWeighting(), noise=z)
    a, s = torch.exp(-0.5 * int_beta(t)), torch.sqrt(1 - torch.exp(-int_beta(t)))
    xt = a[:, None] * x0 + s[:, None] * z
    expected = 0.5 * beta(t) * (score_fn(xt, t) + z / s[:, None]).pow(2).sum(1)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    # the ε form: with σ^2 weighting and s = -ε̂/σ the loss is 1/2 |ε̂ - z|^2
    eps_hat = model(xt)
    eps_loss = denoising_score_matching(
        lambda x, tt: -model(x) / s[:, None], sde, x0, t, SigmaSquaredWeighting(), noise=z
    )
    torch.testing.assert_close(eps_loss, 0.5 * (eps_hat - z).pow(2).sum(1), rtol=1e-12, atol=1e-12)


PERTURBATIONS = {
    "constant": lambda x: torch.tensor([1.0, -0.5], dtype=x.dtype).expand_as(x),
    "linear": lambda x: x @ torch.tensor([[0.3, -0.4], [0.8, 0.1]], dtype=x.dtype),
    "sine": lambda x: torch.sin(2 * x.flip(1)),
}


@pytest.mark.parametrize("sde", SDES, ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("t0", [0.05, 0.3, 0.9])
def test_dsm_is_esm_plus_vincents_constant(sde, t0):
    """E[DSM(s)] = E[1/2 λ|s - s*|^2(x_t)] + λ/2 (D/σ^2 - E|s*|^2) (Vincent 2011, eq. 11).

    So the exact score minimizes DSM, the slope at δ = 0 along any direction h is zero, and
    E[DSM(s* + δh)] - E[DSM(s*)] = δ^2/2 λ E|h|^2 exactly. Perturbations are h(x)/σ_t, in the
    units of the score at time t, so each check has the same power at every t.
    """
    p, n = data_gmm(), 20_000
    g = torch.Generator().manual_seed(int(100 * t0))
    x0, z = p.sample(n, g), torch.randn(n, 2, generator=g, dtype=F64)
    t = torch.full((n,), t0, dtype=F64)
    exact = p.score_fn(sde)
    lam = SigmaSquaredWeighting()(sde, t)
    mean, std = sde.marginal_prob(x0, t)
    xt, sigma2 = mean + std[:, None] * z, std.pow(2)
    s_star = exact(xt, t)

    def dsm(score_fn):
        return denoising_score_matching(score_fn, sde, x0, t, SigmaSquaredWeighting(), noise=z)

    d_star = dsm(exact)
    # Vincent's constant: per sample, its deviation from the DSM value has mean zero
    assert_mean_zero(d_star - 0.5 * lam * (2 / sigma2 - s_star.pow(2).sum(1)), "constant")
    for name, h_raw in PERTURBATIONS.items():

        def h(x, tt, h_raw=h_raw):
            return h_raw(x) / sde.marginal_prob(x, tt)[1][:, None]

        hx = h(xt, t)
        for delta in (0.5, -1.0):
            d = dsm(lambda x, tt, delta=delta, h=h: exact(x, tt) + delta * h(x, tt))
            quad = 0.5 * delta**2 * lam * hx.pow(2).sum(1)
            # the cross term δ λ h·(s* + z/σ) has mean zero: E[z/σ | x_t] = -s*(x_t)
            assert_mean_zero(d - d_star - quad, f"{name}, delta={delta}")
            m, se = mean_and_se(d - d_star)
            assert m > Z_TOL * se, f"{name}: exact score is not the DSM minimizer"


def test_dsm_draws_noise_from_the_generator_and_fits_any_shape():
    sde = VESDE()
    x0 = torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(22))
    t = torch.linspace(0.1, 1.0, 6)

    def score_fn(x, t):
        return -x / (1 + t[:, None, None, None])

    state = torch.get_rng_state()
    a = denoising_score_matching(
        score_fn, sde, x0, t, UnitWeighting(), torch.Generator().manual_seed(3)
    )
    b = denoising_score_matching(
        score_fn, sde, x0, t, UnitWeighting(), torch.Generator().manual_seed(3)
    )
    assert torch.equal(state, torch.get_rng_state())
    assert a.shape == (6,) and a.dtype == torch.float32 and torch.equal(a, b)


def test_dsm_rejects_bad_input():
    sde, x0 = VPSDE(), torch.randn(4, 2)
    t = torch.full((4,), 0.5)

    def good(x, t):
        return -x

    with pytest.raises(ValueError, match=r"t must have shape \[B\] = \[4\]"):
        denoising_score_matching(good, sde, x0, torch.full((4, 1), 0.5), UnitWeighting())
    with pytest.raises(TypeError, match="weighting"):
        denoising_score_matching(good, sde, x0, t, "sigma2")
    with pytest.raises(ValueError, match="score_fn"):
        denoising_score_matching(lambda x, t: x[:, 0], sde, x0, t, UnitWeighting())
    with pytest.raises(ValueError, match="noise"):
        denoising_score_matching(good, sde, x0, t, UnitWeighting(), noise=torch.randn(4, 3))


# --- time samplers -----------------------------------------------------------------------


def likelihood_rate(sde, t):
    """g(t)^2 / σ_t^2, from the SDE's own coefficients."""
    _, g = sde.sde(torch.zeros(len(t), 1, dtype=F64), t)
    _, s = sde.marginal_coefficients(t)
    return g.pow(2) / s.pow(2)


def cdf_table(sde, eps, n=200_001):
    """Exact CDF of q ∝ g^2/σ^2 on a log grid by cumulative Simpson-accurate quadrature."""
    u = torch.linspace(math.log(eps), math.log(sde.T), n, dtype=F64)
    t = u.exp()
    dens = likelihood_rate(sde, t) * t  # dt = t du
    cum = integrate.cumulative_trapezoid(dens.numpy(), u.numpy(), initial=0.0)
    return t, torch.from_numpy(cum / cum[-1]), cum[-1]


@pytest.mark.parametrize("sde", SDES, ids=lambda s: type(s).__name__)
def test_importance_sampler_follows_its_density(sde):
    eps, n = 1e-5, 20_000
    sampler = LikelihoodImportanceSampler(sde, eps)
    grid, cdf, total = cdf_table(sde, eps)
    assert sampler.normalizer == pytest.approx(total, rel=1e-6)
    torch.testing.assert_close(sampler.cdf(grid), cdf, rtol=0, atol=1e-7)
    t = sampler.sample(n, torch.Generator().manual_seed(30), dtype=F64)
    assert t.shape == (n,) and t.min() >= eps and t.max() <= sde.T
    ecdf = torch.searchsorted(t.sort().values, grid[::100].contiguous(), right=True).to(F64) / n
    ks = (ecdf - cdf[::100]).abs().max().item()
    assert ks < 1.95 / math.sqrt(n), ks  # Kolmogorov-Smirnov at the 0.1% level
    # the density integrates to one and is what weight() inverts
    torch.testing.assert_close(sampler.weight(t) * sampler.density(t), torch.ones(n, dtype=F64))
    torch.testing.assert_close(sampler.icdf(sampler.cdf(t)), t, rtol=1e-10, atol=0)


def test_importance_sampler_inverts_the_vp_cdf_in_closed_form():
    """VP: ∫ β/σ^2 = log(e^B - 1), so t = (-β0 + sqrt(β0^2 + 2(β1-β0) log(1 + e^F))) / (β1-β0)."""
    sampler = LikelihoodImportanceSampler(VPSDE(), 1e-5)
    u = torch.rand(1000, generator=torch.Generator().manual_seed(31), dtype=F64)
    f_lo = math.log(math.expm1(int_beta(1e-5)))
    f = f_lo + u * (math.log(math.expm1(int_beta(1.0))) - f_lo)
    t = (-0.1 + torch.sqrt(0.01 + 2 * 19.9 * torch.nn.functional.softplus(f))) / 19.9
    torch.testing.assert_close(sampler.icdf(u), t, rtol=1e-12, atol=0)


@pytest.mark.parametrize("sde", SDES, ids=lambda s: type(s).__name__)
def test_importance_weights_give_unbiased_time_integrals(sde):
    """E_q[weight(t) ℓ(t)] = ∫_eps^T ℓ dt for any ℓ; here ℓ = g^2/σ^2 f and ℓ = t^2."""
    eps, n = 1e-5, 50_000
    for sampler in (LikelihoodImportanceSampler(sde, eps), UniformTimeSampler(eps, sde.T)):
        t = sampler.sample(n, torch.Generator().manual_seed(32), dtype=F64)
        w = sampler.weight(t)

        def f(s):
            return 1.0 + torch.sin(5.0 * s)

        # ∫ g^2/σ^2 f dt by Simpson's rule on a fine log grid (the integrand is ~1/t near eps)
        u = torch.linspace(math.log(eps), 0.0, 200_001, dtype=F64)
        s_grid = u.exp()
        vals = likelihood_rate(sde, s_grid) * f(s_grid) * s_grid
        exact = integrate.simpson(vals.numpy(), x=u.numpy())
        est = w * likelihood_rate(sde, t) * f(t)
        m, se = mean_and_se(est)
        assert abs(m - exact) < Z_TOL * se, (type(sampler).__name__, m, exact, se)
        m, se = mean_and_se(w * t.pow(2))
        assert abs(m - (1 - eps**3) / 3) < Z_TOL * se


def test_uniform_time_sampler():
    sampler = UniformTimeSampler(1e-3, 1.0)
    state = torch.get_rng_state()
    t = sampler.sample(10_000, torch.Generator().manual_seed(33))
    assert torch.equal(state, torch.get_rng_state())
    assert t.dtype == torch.get_default_dtype() and t.min() >= 1e-3 and t.max() <= 1.0
    assert torch.equal(sampler.weight(t), torch.full_like(t, 1.0 - 1e-3))
    assert torch.equal(t, sampler.sample(10_000, torch.Generator().manual_seed(33)))
    assert abs(t.mean().item() - 0.5005) < Z_TOL * t.std().item() / 100


def test_importance_sampling_cuts_the_variance_of_the_likelihood_weighted_loss():
    """DSM with λ = g^2 over uniform t has a ~1/t integrand; IS of t flattens it (Song 2021b)."""
    sde, p, n, eps = VPSDE(), data_gmm(), 20_000, 1e-5
    g = torch.Generator().manual_seed(34)
    x0 = p.sample(n, g)

    def score_fn(x, t):  # a good but imperfect model: the exact score, slightly off
        return p.score_fn(sde)(x, t) + 0.1 * torch.sin(x)

    estimates = {}
    for sampler in (UniformTimeSampler(eps, sde.T), LikelihoodImportanceSampler(sde, eps)):
        t = sampler.sample(n, g, dtype=F64)
        per_sample = denoising_score_matching(score_fn, sde, x0, t, LikelihoodWeighting(), g)
        estimates[type(sampler).__name__] = sampler.weight(t) * per_sample
    uniform, importance = estimates["UniformTimeSampler"], estimates["LikelihoodImportanceSampler"]
    # measured ratio 0.04 at this seed (the true variance of the uniform estimate, ~1/eps,
    # is far larger than any sample of it shows)
    assert importance.var() < 0.1 * uniform.var(), (importance.var(), uniform.var())
    # and both estimate the same integral (the uniform one only loosely: its variance is huge)
    mu, seu = mean_and_se(uniform)
    mi, sei = mean_and_se(importance)
    assert abs(mu - mi) < Z_TOL * math.hypot(seu, sei)


def test_samplers_reject_bad_arguments():
    with pytest.raises(ValueError, match="eps < T"):
        UniformTimeSampler(1.0, 1.0)
    with pytest.raises(ValueError, match="eps > 0"):
        LikelihoodImportanceSampler(VPSDE(), 0.0)
    with pytest.raises(ValueError, match="n must be"):
        UniformTimeSampler().sample(0)

    class WrongVP(VPSDE):  # a marginal std that the SDE does not produce
        def marginal_coefficients(self, t):
            alpha, _ = super().marginal_coefficients(t)
            return alpha, torch.sqrt(-torch.expm1(-2 * self.integrated_beta(t)))

    with pytest.raises(ValueError, match="does not solve"):
        LikelihoodImportanceSampler(WrongVP())

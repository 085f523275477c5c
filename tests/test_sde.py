"""VP, sub-VP and VE SDEs against closed forms, Monte-Carlo simulation and their own ODEs."""

import math

import pytest
import torch

from lsgm_edu.sde import SDE, VESDE, VPSDE, ReverseSDE, SubVPSDE

F64 = torch.float64
BMIN, BMAX = 0.1, 20.0
SMIN, SMAX = 0.01, 50.0

SDES = {
    "vp": lambda: VPSDE(beta_min=BMIN, beta_max=BMAX),
    "subvp": lambda: SubVPSDE(beta_min=BMIN, beta_max=BMAX),
    "ve": lambda: VESDE(sigma_min=SMIN, sigma_max=SMAX),
}
NAMES = sorted(SDES)
TIMES = [0.0, 1e-4, 1e-3, 0.05, 0.2, 0.37, 0.5, 0.81, 1.0]


def closed_form(name, t):
    """alpha(t), sigma(t) written out from Song et al. 2021, App. B (eq. 29), in float64."""
    t = torch.as_tensor(t, dtype=F64)
    log_mean_coeff = -0.25 * t**2 * (BMAX - BMIN) - 0.5 * t * BMIN
    if name == "vp":
        return log_mean_coeff.exp(), (1.0 - torch.exp(2.0 * log_mean_coeff)).sqrt()
    if name == "subvp":
        return log_mean_coeff.exp(), 1.0 - torch.exp(2.0 * log_mean_coeff)
    # VE started at x0 at t = 0: variance sigma(t)^2 - sigma(0)^2 with geometric sigma(t)
    sigma_t = SMIN * (SMAX / SMIN) ** t
    return torch.ones_like(t), (sigma_t**2 - SMIN**2).sqrt()


# --- closed forms --------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_marginal_prob_equals_closed_form(name):
    sde = SDES[name]()
    t = torch.tensor(TIMES, dtype=F64)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(len(TIMES), 3, 2, generator=g, dtype=F64)
    mean, std = sde.marginal_prob(x0, t)
    alpha, sigma = closed_form(name, t)
    torch.testing.assert_close(mean, alpha[:, None, None] * x0, rtol=1e-12, atol=1e-14)
    # naive 1 - exp(...) loses ~1e-16 absolute near t = 0, hence the small atol
    torch.testing.assert_close(std, sigma, rtol=1e-12, atol=1e-14)
    assert std[0] == 0 and torch.all(std[1:] > 0)
    torch.testing.assert_close(sde.marginal_coefficients(t)[1], std, rtol=0, atol=0)


def test_vp_and_subvp_share_the_mean_and_subvp_variance_is_smaller():
    t = torch.linspace(0.01, 1.0, 50, dtype=F64)
    a_vp, s_vp = VPSDE().marginal_coefficients(t)
    a_sub, s_sub = SubVPSDE().marginal_coefficients(t)
    torch.testing.assert_close(a_vp, a_sub, rtol=0, atol=0)
    assert torch.all(s_sub < s_vp)
    torch.testing.assert_close(s_sub, s_vp**2, rtol=1e-12, atol=1e-14)  # eq. (29): (1 - e^-B)


def test_ve_noise_scale_is_the_reference_sigma():
    sde = VESDE(SMIN, SMAX)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    torch.testing.assert_close(sde.noise_scale(t), SMIN * (SMAX / SMIN) ** t, rtol=1e-13, atol=0)
    _, std = sde.marginal_coefficients(t)
    torch.testing.assert_close(std**2, sde.noise_scale(t) ** 2 - SMIN**2, rtol=1e-12, atol=1e-14)


# --- the SDE and its marginals agree --------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_coefficients_solve_the_moment_odes(name):
    """d/dt log alpha = f and d/dt sigma^2 = 2 f sigma^2 + g^2 (Sarkka & Solin 2019, eq. 6.2)."""
    sde = SDES[name]()
    t = torch.linspace(0.01, 0.99, 41, dtype=F64).requires_grad_(True)
    alpha, sigma = sde.marginal_coefficients(t)
    if alpha.requires_grad:
        (dlog_alpha,) = torch.autograd.grad(alpha.log().sum(), t, retain_graph=True)
    else:  # VE: alpha = 1 does not depend on t
        dlog_alpha = torch.zeros_like(t)
    (dvar,) = torch.autograd.grad(sigma.pow(2).sum(), t)
    f, g = sde.sde_coefficients(t.detach())
    var = sigma.detach() ** 2
    torch.testing.assert_close(dlog_alpha, f, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dvar, 2 * f * var + g**2, rtol=1e-10, atol=1e-12)
    # the same identities by central finite differences, independent of autograd
    h = 1e-6
    td = t.detach()
    ap, sp = sde.marginal_coefficients(td + h)
    am, sm = sde.marginal_coefficients(td - h)
    torch.testing.assert_close((ap.log() - am.log()) / (2 * h), f, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close((sp**2 - sm**2) / (2 * h), 2 * f * var + g**2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_sde_drift_is_linear_and_diffusion_per_sample(name):
    sde = SDES[name]()
    g = torch.Generator().manual_seed(1)
    t = torch.rand(5, generator=g, dtype=F64)
    x = torch.randn(5, 3, 4, 4, generator=g, dtype=F64)
    drift, diffusion = sde.sde(x, t)
    f, gg = sde.sde_coefficients(t)
    assert drift.shape == x.shape and diffusion.shape == (5,)
    torch.testing.assert_close(drift, f[:, None, None, None] * x, rtol=0, atol=0)
    torch.testing.assert_close(diffusion, gg, rtol=0, atol=0)


def simulate_forward(sde, x0, t_stops, n_steps, generator):
    """Euler-Maruyama of dx = f x dt + g dW with the coefficients at each step's midpoint.

    Returns {t_stop: x}. The midpoint keeps the time-discretization bias of the noise integral
    O(dt^2) (VE's g^2 grows 17-fold per unit time); the estimator is still a plain EM chain.
    """
    dt = sde.T / n_steps
    x = x0.clone()
    out = {}
    stops = {round(s * n_steps / sde.T): s for s in t_stops}
    # 2000 small steps: one intra-op thread avoids thread hand-off costs, which dominate (and
    # grow 20-fold when other processes share the two cores)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i in range(n_steps):
            t = torch.full((x.shape[0],), (i + 0.5) * dt, dtype=x.dtype)
            drift, diffusion = sde.sde(x, t)
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype)
            x = x + drift * dt + diffusion[:, None] * math.sqrt(dt) * z
            if i + 1 in stops:
                out[stops[i + 1]] = x
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_marginal_prob_matches_monte_carlo_of_the_forward_sde(name):
    sde = SDES[name]()
    # 40 x 1000 independent paths; column j starts at values[j % 4], so each start value has
    # n = 10_000 paths (a wide x keeps the per-step cost low on two cores)
    values = torch.tensor([2.0, -1.0, 0.5, 0.0], dtype=F64)
    x0 = values.repeat(250).expand(40, 1000).clone()
    paths = simulate_forward(sde, x0, [0.3, 1.0], 2000, torch.Generator().manual_seed(2))
    n = x0.numel() // 4
    for t_stop, x in paths.items():
        mean, std = sde.marginal_prob(x0, torch.full((40,), t_stop, dtype=F64))
        var = std[0] ** 2
        # standard error of a sample mean: sqrt(var / n)
        sample_mean = x.reshape(40, 250, 4).mean((0, 1))
        exact_mean = mean[0, :4]
        assert torch.all((sample_mean - exact_mean).abs() < 5 * (var / n).sqrt()), (
            t_stop,
            sample_mean,
            exact_mean,
        )
        # pooled over all 4 n paths about the exact mean: se = var sqrt(2 / (4 n))
        sample_var = (x - mean).pow(2).mean()
        se_var = var * math.sqrt(2 / (4 * n))
        assert (sample_var - var).abs() < 5 * se_var, (t_stop, sample_var, var)


# --- prior ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(7, 3), (4, 2, 5, 5), (6,)])
def test_prior_logp_is_the_log_density_of_the_prior(name, shape):
    sde = SDES[name]()
    z = sde.prior_sampling(shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    assert z.shape == shape and z.dtype == F64
    std = SMAX if name == "ve" else 1.0
    ref = torch.distributions.Normal(torch.tensor(0.0, dtype=F64), torch.tensor(std, dtype=F64))
    ref = ref.log_prob(z)
    ref = ref.reshape(shape[0], -1).sum(-1)
    logp = sde.prior_logp(z)
    assert logp.shape == (shape[0],)
    torch.testing.assert_close(logp, ref, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("name", NAMES)
def test_prior_sampling_moments(name):
    sde = SDES[name]()
    n = 100_000
    z = sde.prior_sampling((n, 2), generator=torch.Generator().manual_seed(4), dtype=F64)
    var = (SMAX if name == "ve" else 1.0) ** 2
    assert torch.all(z.mean(0).abs() < 5 * math.sqrt(var / n))
    assert torch.all((z.var(0) - var).abs() < 5 * var * math.sqrt(2 / n))


def test_prior_sampling_follows_generator_dtype_device_and_leaves_global_rng():
    sde = VPSDE()
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a = sde.prior_sampling((3, 2), generator=torch.Generator().manual_seed(5))
    b = sde.prior_sampling([3, 2], generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and torch.equal(state, torch.get_rng_state())
    assert a.dtype == torch.get_default_dtype() and a.device.type == "cpu"
    assert sde.prior_sampling(torch.Size([2, 1, 3, 3]), dtype=F64).dtype == F64
    assert sde.prior_logp(a).dtype == a.dtype


# --- discretizations -----------------------------------------------------------------------


def _index_times(sde, idx):
    """Times that land on step i = floor(t (N - 1) / T): the midpoint of [i, i + 1)."""
    idx = torch.as_tensor(idx, dtype=F64)
    return ((idx + 0.5) / (sde.N - 1) * sde.T).clamp(max=sde.T)


def beta_all(N):
    return BMIN / N + torch.arange(N, dtype=F64) * (BMAX - BMIN) / (N * (N - 1))


@pytest.mark.parametrize("N", [1000, 50])
def test_vp_discretize_is_the_ddpm_chain(N):
    sde = VPSDE(BMIN, BMAX, N=N)
    idx = torch.tensor([0, 1, N // 2, N - 2, N - 1])
    t = _index_times(sde, idx)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(len(idx), 3, generator=g, dtype=F64)
    f, G = sde.discretize(x, t)
    # Score SDE reference: discrete_betas = linspace(beta_min / N, beta_max / N, N)
    beta = BMIN / N + idx.double() * (BMAX - BMIN) / (N * (N - 1))
    torch.testing.assert_close(f, (torch.sqrt(1 - beta) - 1)[:, None] * x, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(G, beta.sqrt(), rtol=1e-12, atol=0)
    z = torch.randn(x.shape, generator=g, dtype=F64)
    ddpm = torch.sqrt(1 - beta)[:, None] * x + beta.sqrt()[:, None] * z  # Ho et al. 2020, eq. 2
    torch.testing.assert_close(x + f + G[:, None] * z, ddpm, rtol=1e-12, atol=1e-14)
    # t = i / (N - 1) exactly, as the reverse-diffusion sampler's time grid gives
    for dtype in (F64, torch.float32):
        _, G2 = sde.discretize(x.to(dtype), (idx.double() / (N - 1)).to(dtype))
        torch.testing.assert_close(G2, G.to(dtype), rtol=1e-6, atol=0)
    # and the reverse-diffusion grid linspace(T, eps, N) visits every step N - 1, ..., 0 once
    grid = torch.linspace(sde.T, 1e-3, N, dtype=F64)
    _, G3 = sde.discretize(torch.zeros(N, 1, dtype=F64), grid)
    torch.testing.assert_close(G3, beta_all(N).flip(0).sqrt(), rtol=1e-12, atol=0)


def test_vp_discretize_refuses_betas_of_one_or_more():
    sde = VPSDE(BMIN, BMAX, N=10)  # beta_max / N = 2: not a DDPM chain
    sde.sde(torch.zeros(2, 1), torch.zeros(2))  # the continuous SDE is fine
    with pytest.raises(ValueError, match="beta_max / N < 1"):
        sde.discretize(torch.zeros(2, 1), torch.zeros(2))


def test_ve_discretize_is_the_smld_chain():
    N = 1000
    sde = VESDE(SMIN, SMAX, N=N)
    idx = torch.tensor([0, 1, 2, 500, N - 1])
    t = _index_times(sde, idx)
    x = torch.randn(len(idx), 2, 2, generator=torch.Generator().manual_seed(7), dtype=F64)
    f, G = sde.discretize(x, t)
    sigma = SMIN * (SMAX / SMIN) ** (idx.double() / (N - 1))
    prev = torch.where(idx == 0, 0.0, SMIN * (SMAX / SMIN) ** ((idx.double() - 1) / (N - 1)))
    assert torch.equal(f, torch.zeros_like(x))
    torch.testing.assert_close(G, (sigma**2 - prev**2).sqrt(), rtol=1e-10, atol=0)
    assert G[0] == pytest.approx(SMIN, rel=1e-12)  # the first step adds the whole sigma_0


def test_subvp_discretize_is_euler_maruyama():
    sde = SubVPSDE(BMIN, BMAX, N=250)
    g = torch.Generator().manual_seed(8)
    t = torch.rand(6, generator=g, dtype=F64)
    x = torch.randn(6, 1, 3, 3, generator=g, dtype=F64)
    f, G = sde.discretize(x, t)
    drift, diffusion = sde.sde(x, t)
    torch.testing.assert_close(f, drift / 250, rtol=1e-14, atol=0)
    torch.testing.assert_close(G, diffusion * math.sqrt(1 / 250), rtol=1e-14, atol=0)


# --- reverse SDE and probability flow --------------------------------------------------------


def some_score(x, t):
    """An arbitrary smooth (x, t) -> like x field, not a true score: the rules are algebraic."""
    return -x * (1 + t.reshape((-1,) + (1,) * (x.ndim - 1))) + torch.sin(x)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(5, 3), (5, 2, 3, 3)])
def test_reverse_sde_and_probability_flow(name, shape):
    sde = SDES[name]()
    g = torch.Generator().manual_seed(9)
    x = torch.randn(shape, generator=g, dtype=F64)
    t = torch.rand(shape[0], generator=g, dtype=F64)
    f, gg = sde.sde(x, t)
    F, G = sde.discretize(x, t)
    s = some_score(x, t)
    col = (-1,) + (1,) * (len(shape) - 1)

    rsde = sde.reverse(some_score)
    assert isinstance(rsde, ReverseSDE) and rsde.N == sde.N and rsde.T == sde.T
    drift, diffusion = rsde.sde(x, t)
    torch.testing.assert_close(drift, f - gg.reshape(col) ** 2 * s, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(diffusion, gg, rtol=0, atol=0)
    rev_f, rev_G = rsde.discretize(x, t)
    torch.testing.assert_close(rev_f, F - G.reshape(col) ** 2 * s, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(rev_G, G, rtol=0, atol=0)

    ode = sde.reverse(some_score, probability_flow=True)
    drift, diffusion = ode.sde(x, t)
    torch.testing.assert_close(drift, f - 0.5 * gg.reshape(col) ** 2 * s, rtol=1e-14, atol=1e-14)
    assert diffusion.shape == (shape[0],) and torch.all(diffusion == 0)
    rev_f, rev_G = ode.discretize(x, t)
    torch.testing.assert_close(rev_f, F - 0.5 * G.reshape(col) ** 2 * s, rtol=1e-14, atol=1e-14)
    assert rev_G.shape == (shape[0],) and torch.all(rev_G == 0)


def test_probability_flow_of_the_true_score_keeps_a_gaussian_on_its_marginals():
    """For p_0 = N(0, s0^2), p_t = N(0, alpha^2 s0^2 + sigma^2) and the PF drift is linear; the
    ODE's log-variance rate must equal d/dt log var_t (Song et al. 2021, eq. 13)."""
    s0 = 0.7
    for sde in (VPSDE(), SubVPSDE(), VESDE()):
        t = torch.linspace(0.05, 0.95, 19, dtype=F64).requires_grad_(True)
        alpha, sigma = sde.marginal_coefficients(t)
        var_t = alpha**2 * s0**2 + sigma**2
        (dvar,) = torch.autograd.grad(var_t.sum(), t)
        t, var_t = t.detach(), var_t.detach()
        x = torch.ones(len(t), 1, dtype=F64)
        ode = sde.reverse(lambda x, _t, v=var_t: -x / v[:, None], probability_flow=True)
        drift, _ = ode.sde(x, t)
        # x' = c x keeps N(0, v) as N(0, v e^{2c dt}): 2c = d log v / dt
        torch.testing.assert_close(2 * drift[:, 0], dvar / var_t, rtol=1e-9, atol=1e-12)


# --- robustness: edges, shapes, dtypes, errors ------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_everything_finite_at_and_slightly_outside_the_time_interval(name, dtype):
    sde = SDES[name]()
    t = torch.tensor([-1e-3, -1e-7, 0.0, 1e-7, 1.0, 1.0 + 1e-3], dtype=dtype)
    x = torch.randn(len(t), 2, 3, 3, generator=torch.Generator().manual_seed(10), dtype=dtype)
    outs = [*sde.sde_coefficients(t), *sde.marginal_coefficients(t), *sde.sde(x, t)]
    outs += [*sde.marginal_prob(x, t), *sde.discretize(x, t)]
    for pf in (False, True):
        outs += [
            *sde.reverse(some_score, pf).sde(x, t),
            *sde.reverse(some_score, pf).discretize(x, t),
        ]
    for out in outs:
        assert torch.isfinite(out).all()
    _, std = sde.marginal_coefficients(t)
    assert torch.all(std >= 0) and std[2] == 0


def test_vp_with_zero_beta_min_is_finite_before_zero():
    sde = VPSDE(beta_min=0.0, beta_max=20.0)
    t = torch.tensor([-1e-3, 0.0], dtype=F64)
    _, g = sde.sde_coefficients(t)
    assert torch.isfinite(g).all() and torch.all(g >= 0)


@pytest.mark.parametrize("name", NAMES)
def test_shape_agnostic_and_dtype_follows_x(name):
    sde = SDES[name]()
    g = torch.Generator().manual_seed(11)
    t = torch.rand(4, generator=g, dtype=F64)
    x = torch.randn(4, 3, 2, 2, generator=g, dtype=F64)
    flat = x.reshape(4, -1)
    for method in ("sde", "marginal_prob", "discretize"):
        a, sa = getattr(sde, method)(x, t)
        b, sb = getattr(sde, method)(flat, t)
        torch.testing.assert_close(a.reshape(4, -1), b, rtol=0, atol=0)
        torch.testing.assert_close(sa, sb, rtol=0, atol=0)
        for t_dtype in (torch.float32, F64):
            x32 = x.float()
            a32, s32 = getattr(sde, method)(x32, t.to(t_dtype))
            assert a32.dtype == torch.float32 and s32.dtype == torch.float32
            assert a32.shape == x.shape and s32.shape == (4,)
            torch.testing.assert_close(a32, a.float(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(s32, sa.float(), rtol=1e-5, atol=1e-6)
    # marginal_coefficients alone follows t: shape and dtype
    grid = torch.linspace(0, 1, 6, dtype=torch.float32).reshape(2, 3)
    alpha, sigma = sde.marginal_coefficients(grid)
    assert alpha.shape == sigma.shape == (2, 3) and sigma.dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", NAMES)
def test_cuda_follows_x(name):
    sde = SDES[name]()
    x = torch.randn(3, 2, device="cuda")
    t = torch.rand(3, device="cuda")
    for out in (*sde.sde(x, t), *sde.marginal_prob(x, t), *sde.discretize(x, t)):
        assert out.is_cuda
    z = sde.prior_sampling((3, 2), generator=torch.Generator(device="cuda").manual_seed(0))
    assert z.is_cuda and sde.prior_logp(z).is_cuda


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: VPSDE(beta_min=-0.1), "beta_min must be >= 0"),
        (lambda: SubVPSDE(beta_min=-1.0), "beta_min must be >= 0"),
        (lambda: VPSDE(beta_min=5.0, beta_max=1.0), "beta_max must be >= beta_min"),
        (lambda: SubVPSDE(beta_min=0.0, beta_max=0.0), "beta_max must be >= beta_min and > 0"),
        (lambda: VPSDE(beta_max=float("nan")), "beta_max must be a finite number"),
        (lambda: VESDE(sigma_min=0.0), "sigma_min must be > 0"),
        (lambda: VESDE(sigma_min=-1.0), "sigma_min must be > 0"),
        (lambda: VESDE(sigma_min=1.0, sigma_max=1.0), "sigma_max must be > sigma_min"),
        (lambda: VESDE(sigma_min=1.0, sigma_max=0.5), "sigma_max must be > sigma_min"),
        (lambda: VPSDE(N=0), "N must be an int >= 1"),
        (lambda: VESDE(N=2.5), "N must be an int >= 1"),
        (lambda: SubVPSDE(N=True), "N must be an int >= 1"),
    ],
)
def test_bad_parameters_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("name", NAMES)
def test_bad_time_inputs_raise(name):
    sde = SDES[name]()
    x = torch.zeros(4, 2)
    for method in ("sde", "marginal_prob", "discretize"):
        fn = getattr(sde, method)
        with pytest.raises(ValueError, match=r"t must have shape \[B\] = \[4\]"):
            fn(x, torch.zeros(3))
        with pytest.raises(ValueError, match=r"t must have shape \[B\]"):
            fn(x, torch.tensor(0.5))
        with pytest.raises(ValueError, match=r"t must have shape \[B\]"):
            fn(x, torch.zeros(4, 1))
        with pytest.raises(ValueError, match="t must be a floating-point"):
            fn(x, torch.zeros(4, dtype=torch.long))
        with pytest.raises(ValueError, match="t must be a floating-point"):
            fn(x, 0.5)
        with pytest.raises(ValueError, match="x must be a floating-point"):
            fn(torch.zeros(4, 2, dtype=torch.long), torch.zeros(4))
    with pytest.raises(ValueError, match=r"t must have shape \[B\]"):
        sde.reverse(some_score).sde(x, torch.zeros(2))
    with pytest.raises(ValueError, match="shape must be a sequence"):
        sde.prior_sampling(3)
    with pytest.raises(ValueError, match="z must be a floating-point"):
        sde.prior_logp(torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="score_fn must be callable"):
        sde.reverse(None)


def test_sde_is_abstract():
    with pytest.raises(TypeError):
        SDE()
    assert VPSDE().T == 1.0 and VPSDE().N == 1000 and VESDE(N=7).N == 7
    assert "VESDE(sigma_min=0.01" in repr(VESDE()) and "beta_max=20.0" in repr(SubVPSDE())

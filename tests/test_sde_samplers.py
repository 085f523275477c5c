"""Reverse-SDE, predictor-corrector, probability-flow and annealed Langevin samplers against the
exact score of a diffused Gaussian mixture (Song et al. 2021; Song & Ermon 2019)."""

import itertools
import math

import pytest
import torch

from lsgm_edu.metrics import sliced_wasserstein_ratio
from lsgm_edu.samplers import (
    annealed_langevin,
    euler_maruyama,
    euler_maruyama_step,
    langevin_corrector_step,
    predictor_corrector,
    probability_flow,
    reverse_diffusion_step,
    reverse_time_grid,
)
from lsgm_edu.sde import VESDE, VPSDE
from lsgm_edu.toy import GaussianMixture

N, REPLICATES = 2000, 8  # sample-set size, and independent sets per comparison
SHAPE = (REPLICATES * N, 2)


def target_gmm(dtype=torch.float32):
    """Three overlapping modes with unequal weights and stds 0.35-0.5."""
    means = torch.tensor([[-1.2, 0.0], [1.2, 0.3], [0.0, 1.5]], dtype=dtype)
    return GaussianMixture(means, torch.tensor([0.5, 0.4, 0.35]), torch.tensor([0.5, 0.3, 0.2]))


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def swd_ratio(gmm, x, g):
    """SWD of REPLICATES sets of N samples to fresh true sets, over the iid baseline (32 pairs
    of independent true sets of N), with the same 512 projections for every pair.

    Exact samples give a ratio near 1: over seeds, 1.03 +- 0.11 with 8 sets of 2000.
    """
    return sliced_wasserstein_ratio(
        x.float(), gmm.sample, sets=REPLICATES, baseline_pairs=32, n_projections=512,
        generator=g, projection_seed=99,
    )


# --- distribution tests against the exact mixture --------------------------------------------


def test_euler_maruyama_matches_gmm():
    gmm, sde, g = target_gmm(), VPSDE(), gen(0)
    x = euler_maruyama(sde, gmm.score_fn(sde), SHAPE, steps=250, generator=g)
    assert swd_ratio(gmm, x, g) < 1.5


@pytest.mark.parametrize("predictor", ["reverse_diffusion", "euler_maruyama"])
def test_predictor_corrector_matches_gmm(predictor):
    gmm, sde, g = target_gmm(), VPSDE(N=250), gen(1)
    x = predictor_corrector(
        sde, gmm.score_fn(sde), SHAPE, 250, snr=0.16, predictor=predictor, generator=g
    )
    assert swd_ratio(gmm, x, g) < 1.5


@pytest.mark.parametrize("method,steps", [("dopri5", None), ("rk4", 25)])
def test_probability_flow_matches_gmm(method, steps):
    gmm, sde, g = target_gmm(), VPSDE(), gen(2)
    x, nfe = probability_flow(
        sde, gmm.score_fn(sde), SHAPE, method, steps=steps, generator=g, return_nfe=True
    )
    assert swd_ratio(gmm, x, g) < 1.5
    assert nfe == (4 * steps if steps else nfe) and nfe > 0


def test_swd_criterion_detects_too_few_steps():
    # the same criterion must fail for a sampler that does not reach the target
    gmm, sde, g = target_gmm(), VPSDE(), gen(3)
    x = euler_maruyama(sde, gmm.score_fn(sde), SHAPE, steps=5, generator=g)
    assert swd_ratio(gmm, x, g) > 2.0


def test_annealed_langevin_matches_gmm():
    # the score of the mixture convolved with N(0, sigma^2 I) is exact: stds -> sqrt(s^2 + sigma^2)
    gmm, g = target_gmm(), gen(4)

    def score(x, sigma):
        noisy = GaussianMixture(gmm.means, (gmm.stds**2 + sigma[0] ** 2).sqrt(), gmm.weights)
        return noisy.score(x)

    # 10 geometric levels; at sigma_L = 0.05 the noise adds under 2% to the modes' variance
    sigmas = torch.logspace(math.log10(3.0), math.log10(0.05), 10)
    x = annealed_langevin(score, sigmas, SHAPE, n_steps_each=100, step_lr=1e-3, generator=g)
    assert swd_ratio(gmm, x, g) < 1.5


# --- single steps and the time grid ------------------------------------------------------------


def test_reverse_time_grid_is_linspace_then_zero():
    grid = reverse_time_grid(1.0, 1e-3, 5)
    assert grid[:5] == torch.linspace(1.0, 1e-3, 5, dtype=torch.float64).tolist()
    assert grid[-1] == 0.0 and len(grid) == 6
    assert reverse_time_grid(1.0, 1e-3, 1) == [1.0, 0.0]


def test_steps_follow_their_formulas():
    gmm, sde = target_gmm(torch.float64), VPSDE()
    score = gmm.score_fn(sde)
    rsde = sde.reverse(score)
    x = torch.randn(6, 2, generator=gen(0), dtype=torch.float64)
    t = torch.full((6,), 0.4, dtype=torch.float64)
    z = torch.randn(6, 2, generator=gen(7), dtype=torch.float64)
    # Euler-Maruyama: x + drift dt + g sqrt(-dt) z
    drift, g = rsde.sde(x, t)
    out, mean = euler_maruyama_step(rsde, x, t, -0.01, gen(7))
    torch.testing.assert_close(mean, x - 0.01 * drift)
    torch.testing.assert_close(out, mean + 0.1 * g[:, None] * z)
    # reverse diffusion: x - f_rev + G_rev z with the SDE's discretization
    f, G = rsde.discretize(x, t)
    out, mean = reverse_diffusion_step(rsde, x, t, generator=gen(7))
    torch.testing.assert_close(mean, x - f)
    torch.testing.assert_close(out, mean + G[:, None] * z)
    # Langevin corrector: eps = 2 alpha (snr mean|z| / mean|s|)^2, batch-mean norms
    s = score(x, t)
    step = 2 * 0.9 * (0.16 * z.norm(dim=-1).mean() / s.norm(dim=-1).mean()) ** 2
    out, mean = langevin_corrector_step(score, x, t, 0.16, 0.9, gen(7))
    torch.testing.assert_close(mean, x + step * s)
    torch.testing.assert_close(out, mean + torch.sqrt(2 * step) * z)
    # a zero score gives a zero step, not an infinite one
    out, mean = langevin_corrector_step(lambda x, t: torch.zeros_like(x), x, t, 0.16, 1.0, gen(7))
    assert torch.equal(mean, x) and torch.equal(out, x)


def test_probability_flow_euler_is_the_hand_written_loop():
    gmm, sde = target_gmm(torch.float64), VPSDE()
    score = gmm.score_fn(sde)
    z = torch.randn(5, 2, generator=gen(0), dtype=torch.float64)
    out, nfe = probability_flow(sde, score, None, "euler", steps=8, z=z, return_nfe=True)
    rsde, x = sde.reverse(score, probability_flow=True), z.clone()
    ts = torch.linspace(1.0, 1e-3, 9, dtype=torch.float64)
    for t0, t1 in itertools.pairwise(ts):
        x = x + rsde.sde(x, t0.expand(5))[0] * (t1 - t0)
    torch.testing.assert_close(out, x)
    assert nfe == 8
    _, nfe = probability_flow(sde, score, None, "midpoint", steps=8, z=z, return_nfe=True)
    assert nfe == 16


def test_probability_flow_denoise_adds_one_evaluation():
    gmm, sde = target_gmm(torch.float64), VPSDE()
    z = torch.randn(5, 2, generator=gen(0), dtype=torch.float64)
    x, nfe = probability_flow(sde, gmm.score_fn(sde), None, "rk4", steps=4, z=z, return_nfe=True)
    xd, nfe_d = probability_flow(
        sde, gmm.score_fn(sde), None, "rk4", steps=4, z=z, return_nfe=True, denoise=True
    )
    assert nfe_d == nfe + 1 and not torch.equal(x, xd)
    assert (x - xd).abs().max() < 1e-2  # a small correction at t = eps


def test_pc_without_corrector_is_the_predictor_alone():
    gmm, sde = target_gmm(), VPSDE(N=20)
    a = predictor_corrector(
        sde, gmm.score_fn(sde), (50, 2), 20, n_corrector=0, predictor="euler_maruyama",
        generator=gen(5),
    )  # fmt: skip
    b = euler_maruyama(sde, gmm.score_fn(sde), (50, 2), 20, generator=gen(5))
    assert torch.equal(a, b)


def test_ve_sde_samplers_run_and_are_finite():
    gmm, sde = target_gmm(), VESDE(sigma_min=0.01, sigma_max=10.0, N=50)
    score = gmm.score_fn(sde)
    for x in (
        euler_maruyama(sde, score, (64, 2), 50, generator=gen(0)),
        predictor_corrector(sde, score, (64, 2), 50, generator=gen(0)),
        probability_flow(sde, score, (64, 2), generator=gen(0)),
    ):
        assert x.shape == (64, 2) and bool(torch.isfinite(x).all())
        assert x.abs().max() < 10  # landed near the data, not left at the prior's scale


# --- callbacks, randomness, dtypes, errors ------------------------------------------------------


STEPS = 25  # the DDPM chain needs N > beta_max = 20


def _run(name, score, sde, g, **kw):
    if name == "euler_maruyama":
        return euler_maruyama(sde, score, (16, 2), STEPS, generator=g, **kw)
    if name == "predictor_corrector":
        return predictor_corrector(sde, score, (16, 2), STEPS, generator=g, **kw)
    if name == "probability_flow":
        return probability_flow(sde, score, (16, 2), generator=g, **kw)
    if name == "probability_flow_rk4":
        return probability_flow(sde, score, (16, 2), "rk4", steps=STEPS, generator=g, **kw)
    return annealed_langevin(
        lambda x, s: score(x, torch.full_like(s, 0.5)), [1.0, 0.8, 0.5, 0.3, 0.1], (16, 2), 5,
        0.01, generator=g, **kw,
    )  # fmt: skip


SAMPLERS = [
    "euler_maruyama",
    "predictor_corrector",
    "probability_flow",
    "probability_flow_rk4",
    "annealed_langevin",
]


@pytest.mark.parametrize("name", SAMPLERS)
def test_callback_receives_documented_keys(name):
    gmm, sde, calls = target_gmm(), VPSDE(N=STEPS), []
    out = _run(name, gmm.score_fn(sde), sde, gen(0), callback=calls.append)
    time_key = "sigma" if name == "annealed_langevin" else "t"
    assert all(set(c) == {"i", time_key, "x", "x_mean"} for c in calls)
    assert [c["i"] for c in calls] == list(range(len(calls)))
    if name == "probability_flow":
        assert len(calls) > 2  # one per accepted adaptive step
    else:
        assert len(calls) == STEPS
    assert all(isinstance(c[time_key], float) for c in calls)
    times = [c[time_key] for c in calls]
    assert times == sorted(times, reverse=True)
    if name.startswith("probability_flow"):
        assert torch.equal(calls[-1]["x"], out) and times[-1] == pytest.approx(1e-3)
    else:
        assert torch.equal(calls[-1]["x_mean"], out)  # denoise: the last step's mean
    if name in ("euler_maruyama", "predictor_corrector"):
        assert times[-1] == 0.0


@pytest.mark.parametrize("name", SAMPLERS)
def test_same_generator_same_samples_and_no_global_rng(name):
    gmm, sde = target_gmm(), VPSDE(N=STEPS)
    torch.manual_seed(0)
    a = _run(name, gmm.score_fn(sde), sde, gen(42))
    torch.manual_seed(12345)
    state = torch.get_rng_state()
    b = _run(name, gmm.score_fn(sde), sde, gen(42))
    assert torch.equal(a, b)
    assert torch.equal(state, torch.get_rng_state())
    assert not torch.equal(a, _run(name, gmm.score_fn(sde), sde, gen(43)))


@pytest.mark.parametrize("name", SAMPLERS)
def test_dtype_from_arguments_and_progress_bar(name):
    gmm, sde = target_gmm(torch.float64), VPSDE(N=STEPS)
    out = _run(name, gmm.score_fn(sde), sde, gen(0), dtype=torch.float64, progress=True)
    assert out.dtype == torch.float64 and out.shape == (16, 2)


def test_probability_flow_z_overrides_prior_and_is_deterministic():
    gmm, sde = target_gmm(), VPSDE()
    z = torch.randn(8, 2, generator=gen(0))
    a = probability_flow(sde, gmm.score_fn(sde), None, z=z)
    b = probability_flow(sde, gmm.score_fn(sde), (8, 2), z=z, generator=gen(1))
    assert torch.equal(a, b)


def test_annealed_langevin_starts_from_x0():
    calls = []
    x0 = torch.zeros(4, 2)
    annealed_langevin(
        lambda x, s: -x, [1.0], None, 1, 0.1, x0=x0, generator=gen(0), callback=calls.append
    )
    torch.testing.assert_close(calls[0]["x_mean"], x0)  # zero score at 0: the mean stays


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda s, f: euler_maruyama(s, f, (4, 2), steps=0), "steps must be an int >= 1"),
        (lambda s, f: euler_maruyama(s, f, (4, 2), steps=2.5), "steps must be an int >= 1"),
        (lambda s, f: euler_maruyama(s, f, (4, 2), eps=0.0), "eps must be a float in"),
        (lambda s, f: euler_maruyama(s, f, (4, -2)), "shape must be"),
        (lambda s, f: predictor_corrector(s, f, (4, 2), STEPS, snr=0.0), "snr must be"),
        (lambda s, f: predictor_corrector(s, f, (4, 2), STEPS, snr=-1.0), "snr must be"),
        (
            lambda s, f: predictor_corrector(s, f, (4, 2), STEPS, predictor="ddim"),
            "unknown predictor",
        ),
        (lambda s, f: predictor_corrector(s, f, (4, 2), STEPS, n_corrector=-1), "n_corrector"),
        (lambda s, f: predictor_corrector(s, f, (4, 2), STEPS + 1), "steps must equal sde.N"),
        (lambda s, f: probability_flow(s, f, (4, 2), "rk45"), "unknown method"),
        (lambda s, f: probability_flow(s, f, (4, 2), "rk4"), "needs steps"),
        (lambda s, f: probability_flow(s, f, (4, 2), "rk4", steps=0), "steps must be an int"),
        (lambda s, f: probability_flow(s, f, (4, 2), steps=10), "only for the fixed-step"),
        (lambda s, f: probability_flow(s, f, (4, 3), z=torch.zeros(4, 2)), "z has shape"),
        (lambda s, f: annealed_langevin(f, [0.1, 1.0], (4, 2)), "strictly decreasing"),
        (lambda s, f: annealed_langevin(f, [1.0], (4, 2), 0), "n_steps_each must be"),
        (lambda s, f: annealed_langevin(f, [1.0], (4, 2), step_lr=0.0), "step_lr must be"),
    ],
)
def test_bad_arguments_raise_value_errors(call, match):
    gmm, sde = target_gmm(), VPSDE(N=STEPS)
    with pytest.raises(ValueError, match=match):
        call(sde, gmm.score_fn(sde))


@pytest.mark.parametrize("method", ["dopri5", "bosh3", "adaptive_heun"])
def test_adaptive_probability_flow_never_evaluates_outside_its_time_range(method):
    """Adaptive solvers must not step past eps: an eps-network divides by sigma(t) -> 0 there."""
    sde, gmm, eps = VPSDE(), target_gmm(torch.float64), 1e-3
    exact, seen = gmm.score_fn(sde), []

    def score_fn(x, t):
        seen.append(t.min().item())
        return exact(x, t)

    x = probability_flow(sde, score_fn, (64, 2), method=method, rtol=1e-5, atol=1e-5, eps=eps,
                         generator=gen(3), dtype=torch.float64)
    assert torch.isfinite(x).all()
    assert min(seen) >= eps * (1 - 1e-9), f"score evaluated at t = {min(seen)} < eps = {eps}"

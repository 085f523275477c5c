"""Langevin and MALA against exact targets: Gaussian mixtures and ULA's closed-form bias."""

import math

import pytest
import torch

from lsgm_edu.metrics import sliced_wasserstein_ratio
from lsgm_edu.samplers import (
    ChainRecorder,
    langevin,
    langevin_log_proposal,
    langevin_proposal,
    mala,
)
from lsgm_edu.toy import GaussianMixture

N, REPLICATES = 2000, 4  # sample-set size, and independent sets per comparison


def target_gmm():
    """Three overlapping modes, unequal weights: chains from a broad start mix in ~500 steps."""
    means = torch.tensor([[-1.2, 0.0], [1.2, 0.3], [0.0, 1.5]])
    return GaussianMixture(means, torch.tensor([0.5, 0.6, 0.45]), torch.tensor([0.5, 0.3, 0.2]))


def swd_ratio(gmm, x, g):
    """SWD of sampler output to fresh true samples over the iid baseline (two true sets).

    x holds REPLICATES * N independent chains, compared in sets of N; the baseline averages 16
    pairs of true sets, so a sampler that draws from the target gives a ratio near 1. The same
    512 projections serve every pair.
    """
    return sliced_wasserstein_ratio(
        x, gmm.sample, sets=REPLICATES, baseline_pairs=16, n_projections=512,
        generator=g, projection_seed=99,
    )


def broad_start(g):
    return 2.0 * torch.randn(REPLICATES * N, 2, generator=g)


def test_langevin_reaches_gmm():
    gmm, g = target_gmm(), torch.Generator().manual_seed(0)
    x = langevin(gmm.score, broad_start(g), step_size=0.02, n_steps=600, generator=g)
    assert swd_ratio(gmm, x, g) < 1.5


def test_mala_reaches_gmm():
    gmm, g = target_gmm(), torch.Generator().manual_seed(1)
    x = mala(gmm.log_prob, gmm.score, broad_start(g), step_size=0.05, n_steps=400, generator=g)
    assert swd_ratio(gmm, x, g) < 1.5


def test_swd_criterion_detects_a_biased_sampler():
    # a large ULA step inflates every mode's variance: the same criterion must fail
    gmm, g = target_gmm(), torch.Generator().manual_seed(2)
    x = langevin(gmm.score, broad_start(g), step_size=0.25, n_steps=100, generator=g)
    assert swd_ratio(gmm, x, g) > 2.0


def test_ula_bias_matches_closed_form_and_mala_is_exact():
    # Target N(0, s^2); ULA x' = (1 - eps/s^2) x + sqrt(2 eps) z has stationary variance
    # v = 2 eps / (1 - (1 - eps/s^2)^2) = s^2 / (1 - eps / (2 s^2)); MALA's is s^2.
    s2, eps, chains = 1.0, 0.5, 20_000
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((chains, 1), 3.0, dtype=torch.float64)  # far from stationarity

    def score(x):
        return -x / s2

    def log_prob(x):
        return -0.5 * x.pow(2).sum(-1) / s2

    x_ula = langevin(score, x0, eps, 200, generator=g)
    x_mala = mala(log_prob, score, x0, eps, 200, generator=g)
    v_ula = s2 / (1 - eps / (2 * s2))
    for x, v in [(x_ula, v_ula), (x_mala, s2)]:
        se_var = v * math.sqrt(2 / (chains - 1))  # sd of a Gaussian sample variance
        assert abs(x.var().item() - v) < 4 * se_var
        assert abs(x.mean().item()) < 4 * math.sqrt(v / chains)
    assert v_ula - s2 > 20 * s2 * math.sqrt(2 / chains)  # the bias is far outside the error


def test_log_proposal_is_the_gaussian_proposal_density():
    g = torch.Generator().manual_seed(0)
    x, s, y = (torch.randn(7, 3, generator=g, dtype=torch.float64) for _ in range(3))
    eps = 0.3
    exact = torch.distributions.Normal(x + eps * s, math.sqrt(2 * eps)).log_prob(y).sum(-1)
    const = -1.5 * math.log(4 * math.pi * eps)  # dropped, it cancels in the MH ratio
    torch.testing.assert_close(langevin_log_proposal(y, x, s, eps) + const, exact)
    # the proposal is that Gaussian: x + eps s + sqrt(2 eps) z with z from the generator
    z = torch.randn(7, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    y = langevin_proposal(x, s, eps, torch.Generator().manual_seed(5))
    torch.testing.assert_close(y, x + eps * s + math.sqrt(2 * eps) * z)


def test_mala_acceptance_rate_in_unit_interval_and_tends_to_one():
    gmm = target_gmm()
    rates = []
    for eps in [1.0, 0.1, 1e-2, 1e-4]:
        g = torch.Generator().manual_seed(0)
        rec = ChainRecorder(every=10)
        mala(gmm.log_prob, gmm.score, gmm.sample(500, g), eps, 20, generator=g, callback=rec)
        rates.append(rec.acceptance_rate())
    assert all(0 < r <= 1 for r in rates)
    assert rates == sorted(rates)  # smaller steps are accepted more often
    assert rates[-1] > 0.99


@pytest.mark.parametrize("sampler", ["langevin", "mala"])
def test_callback_called_every_step_with_documented_keys(sampler):
    gmm, calls = target_gmm(), []
    x0 = torch.zeros(5, 2)
    args = (gmm.score,) if sampler == "langevin" else (gmm.log_prob, gmm.score)
    fn = langevin if sampler == "langevin" else mala
    out = fn(*args, x0, 0.1, 7, generator=torch.Generator().manual_seed(0), callback=calls.append)
    keys = {"i", "x", "step_size"} | ({"accepted"} if sampler == "mala" else set())
    assert len(calls) == 7
    assert [c["i"] for c in calls] == list(range(7))
    assert all(set(c) == keys for c in calls)
    assert all(c["step_size"] == 0.1 and isinstance(c["step_size"], float) for c in calls)
    assert torch.equal(calls[-1]["x"], out)
    if sampler == "mala":
        assert all(c["accepted"].dtype == torch.bool and c["accepted"].shape == (5,) for c in calls)


def test_chain_recorder_trajectory():
    gmm = target_gmm()
    rec = ChainRecorder(every=3)
    out = langevin(gmm.score, torch.zeros(4, 2), 0.1, 10, generator=torch.Generator(), callback=rec)
    traj = rec.trajectory()
    assert traj.shape == (3, 4, 2) and rec.steps == [2, 5, 8]
    assert traj.device.type == "cpu"
    with pytest.raises(ValueError, match="only samplers with an accept/reject step"):
        rec.acceptance_rate()
    with pytest.raises(ValueError, match="nothing recorded"):
        ChainRecorder().trajectory()
    rec = ChainRecorder()
    out = langevin(gmm.score, torch.zeros(4, 2), 0.1, 5, generator=torch.Generator(), callback=rec)
    assert torch.equal(rec.trajectory()[-1], out)

    def shift_after_recording(info):
        rec(info)
        info["x"].add_(100.0)

    rec = ChainRecorder()
    langevin(
        gmm.score,
        torch.zeros(4, 2),
        0.1,
        1,
        generator=torch.Generator(),
        callback=shift_after_recording,
    )
    assert rec.trajectory().abs().max() < 50  # stored states are copies, not views


@pytest.mark.parametrize("sampler", ["langevin", "mala"])
def test_same_generator_same_chain_and_no_global_rng(sampler):
    gmm = target_gmm()
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))

    def run():
        g = torch.Generator().manual_seed(42)
        if sampler == "langevin":
            return langevin(gmm.score, x0, 0.1, 30, generator=g)
        return mala(gmm.log_prob, gmm.score, x0, 0.1, 30, generator=g)

    torch.manual_seed(0)
    a = run()
    torch.manual_seed(12345)
    state = torch.get_rng_state()
    b = run()
    assert torch.equal(a, b)
    assert torch.equal(state, torch.get_rng_state())


def test_dtype_follows_x0_and_zero_steps_returns_x0():
    gmm = target_gmm()
    x0 = torch.zeros(3, 2, dtype=torch.float64)
    assert langevin(gmm.score, x0, 0.1, 5, generator=torch.Generator()).dtype == torch.float64
    assert mala(gmm.log_prob, gmm.score, x0, 0.1, 5, generator=torch.Generator()).dtype == (
        torch.float64
    )
    assert torch.equal(langevin(gmm.score, x0, 0.1, 0), x0)


def test_mala_evaluates_target_once_per_proposal():
    gmm, n_logp, n_score = target_gmm(), [0], [0]

    def log_prob(x):
        n_logp[0] += 1
        return gmm.log_prob(x)

    def score(x):
        n_score[0] += 1
        return gmm.score(x)

    mala(log_prob, score, torch.zeros(3, 2), 0.1, 10, generator=torch.Generator())
    assert n_logp[0] == n_score[0] == 11  # the start, then one per proposal


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        ({"step_size": 0.0}, ValueError, "step_size must be finite and > 0"),
        ({"step_size": -1.0}, ValueError, "step_size"),
        ({"step_size": float("nan")}, ValueError, "step_size"),
        ({"step_size": "0.1"}, TypeError, "step_size"),
        ({"n_steps": -1}, ValueError, "n_steps must be an int >= 0"),
        ({"n_steps": 2.5}, ValueError, "n_steps"),
        ({"x0": torch.zeros(3, 2, dtype=torch.long)}, ValueError, "x0 must be a floating"),
    ],
)
@pytest.mark.parametrize("sampler", ["langevin", "mala"])
def test_bad_arguments_raise(sampler, kwargs, err, match):
    gmm = target_gmm()
    call = {"x0": torch.zeros(3, 2), "step_size": 0.1, "n_steps": 3} | kwargs
    with pytest.raises(err, match=match):
        if sampler == "langevin":
            langevin(gmm.score, **call)
        else:
            mala(gmm.log_prob, gmm.score, **call)


def test_mala_rejects_wrong_output_shapes():
    gmm = target_gmm()
    with pytest.raises(ValueError, match="log_prob_fn must return"):
        mala(lambda x: gmm.log_prob(x)[:, None], gmm.score, torch.zeros(3, 2), 0.1, 1)


def test_progress_bar_runs():
    gmm = target_gmm()
    x = langevin(gmm.score, torch.zeros(3, 2), 0.1, 3, generator=torch.Generator(), progress=True)
    assert x.shape == (3, 2)

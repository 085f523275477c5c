"""LSGM's pieces against exact answers: the geometric VP SDE's closed forms, the time samplers
(normalized, sampled from their own density, unbiased), the variance each removes, the
cross-entropy as a score-matching integral, and the mixed score."""

from __future__ import annotations

import math

import numpy
import pytest
import torch

from lsgm_edu.losses import (
    DropAllTimeSampler,
    LikelihoodImportanceSampler,
    LogVarianceTimeSampler,
    UniformTimeSampler,
    VarianceTimeSampler,
    time_sampler,
)
from lsgm_edu.lsgm import cross_entropy, cross_entropy_constant, likelihood_weight
from lsgm_edu.nets.precond import MixedScore
from lsgm_edu.sde import SDES, VPSDE, GeometricVPSDE

F64 = torch.float64
NAMES = ("uniform", "ll_iw", "drop_all_iw", "drop_sigma2t_iw", "log_snr")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def grid(lo: float, hi: float, n: int = 101) -> torch.Tensor:
    return torch.linspace(lo, hi, n, dtype=F64)


# --- the geometric VP SDE ----------------------------------------------------------------------

@pytest.mark.parametrize("params", [{}, {"sigma2_min": 1e-4, "sigma2_max": 0.99, "sigma2_0": 0.0},
                                    {"sigma2_min": 3e-5, "sigma2_max": 0.999, "sigma2_0": 1e-3}])
def test_geometric_vp_closed_forms(params):
    sde = GeometricVPSDE(**params)
    s2min, s2max, s20 = sde.sigma2_min, sde.sigma2_max, sde.sigma2_0
    r = s2max / s2min
    t = grid(0.0, 1.0).requires_grad_(True)
    var = sde.variance(t)
    m, sigma = sde.marginal_coefficients(t)
    # LSGM's own formulas (diffusion_continuous.py)
    torch.testing.assert_close(var, s2min * r**t - s2min + s20, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(m, torch.sqrt(1 + s2min * (1 - r**t) / (1 - s20)), rtol=1e-10,
                               atol=0)
    torch.testing.assert_close(sigma.pow(2), var, rtol=1e-12, atol=0)
    torch.testing.assert_close(1 - var, (1 - s20) * m.pow(2), rtol=1e-10, atol=0)
    f, g = sde.sde_coefficients(t)
    dvar = torch.autograd.grad(var.sum(), t, retain_graph=True)[0]
    torch.testing.assert_close(g.pow(2), dvar / (1 - var), rtol=1e-10, atol=0)
    torch.testing.assert_close(f, -0.5 * g.pow(2), rtol=1e-12, atol=0)
    # the variance ODE of a linear SDE, dvar/dt = 2 f var + g^2, and m' = f m
    torch.testing.assert_close(dvar, 2 * f * var + g.pow(2), rtol=1e-10, atol=0)
    dm = torch.autograd.grad(m.sum(), t)[0]
    torch.testing.assert_close(dm, f * m, rtol=1e-10, atol=1e-14)
    t = t.detach()
    assert sde.variance(torch.zeros(1, dtype=F64)).item() == pytest.approx(s20, rel=1e-12, abs=1e-18)
    assert sde.variance(torch.ones(1, dtype=F64)).item() == pytest.approx(s2max - s2min + s20,
                                                                          rel=1e-12)
    torch.testing.assert_close(sde.inverse_variance(sde.variance(t)), t, rtol=0, atol=1e-10)


def test_geometric_vp_transition_is_consistent_with_its_kernel():
    sde = GeometricVPSDE()
    s, u, t = grid(0.0, 0.3, 7), grid(0.2, 0.6, 7), grid(0.5, 1.0, 7)
    # Chapman-Kolmogorov: s -> u -> t equals s -> t
    A_su, S_su = sde.transition(s, u)
    A_ut, S_ut = sde.transition(u, t)
    A_st, S_st = sde.transition(s, t)
    torch.testing.assert_close(A_ut * A_su, A_st, rtol=1e-12, atol=0)
    torch.testing.assert_close(A_ut.pow(2) * S_su + S_ut, S_st, rtol=1e-10, atol=1e-15)
    # the kernel from data: the lift covariance sigma2_0 carried by the transition is var(t)
    _A, L = sde._kernel_moments(t)
    torch.testing.assert_close(L.reshape(-1).pow(2), sde.variance(t), rtol=1e-10, atol=0)
    torch.testing.assert_close(sde.marginal_scale(t).pow(2), sde.variance(t), rtol=1e-12, atol=0)
    x0 = torch.randn(20000, 3, generator=gen(), dtype=F64)
    z0 = sde.lift(x0, gen(1))
    assert (z0 - x0).var().item() == pytest.approx(sde.sigma2_0, rel=0.05)


def test_geometric_vp_weight_is_nearly_constant_in_the_nll_setting():
    """sigma2_0 = sigma2_min: var = sigma2_min r^t, g^2/(2 var) = log r / (2 (1 - var)) ~ 5.21."""
    sde = GeometricVPSDE()
    t = grid(0.0, 0.5)
    torch.testing.assert_close(sde.variance(t), 3e-5 * (0.999 / 3e-5) ** t, rtol=1e-12, atol=0)
    w = likelihood_weight(sde, t)
    torch.testing.assert_close(w, math.log(0.999 / 3e-5) / (2 * (1 - sde.variance(t))),
                               rtol=1e-10, atol=0)
    assert w[0].item() == pytest.approx(5.2068, abs=1e-3)


def test_geometric_vp_is_registered_and_checks_its_arguments():
    entry = SDES["geometric_vp"]
    assert isinstance(entry.build(entry.params()), GeometricVPSDE)
    with pytest.raises(ValueError, match="sigma2_min < sigma2_max"):
        GeometricVPSDE(sigma2_min=0.5, sigma2_max=0.1)
    with pytest.raises(ValueError, match="sigma2_0"):
        GeometricVPSDE(sigma2_0=0.5)


# --- time samplers -------------------------------------------------------------------------------

CASES = [(VPSDE(), 0.01), (GeometricVPSDE(), 0.0), (GeometricVPSDE(), 1e-3)]
CASE_IDS = ["vp-eps0.01", "geometric-eps0", "geometric-eps1e-3"]


NODES, WEIGHTS = (torch.from_numpy(v) for v in numpy.polynomial.legendre.leggauss(8))


def quad(fn, a: float, b: float, panels: int = 4000) -> float:
    """∫_a^b fn by composite 8-point Gauss-Legendre in float64 (one vectorized call)."""
    edges = torch.linspace(a, b, panels + 1, dtype=F64)
    lo, hi = edges[:-1, None], edges[1:, None]
    t = 0.5 * (lo + hi) + 0.5 * (hi - lo) * NODES
    values = fn(t.reshape(-1)).reshape(t.shape)
    return (0.5 * (hi - lo) * WEIGHTS * values).sum().item()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_time_sampler_density_cdf_and_draws_agree(case, name):
    sde, eps = case
    sampler = time_sampler(name, sde, eps)
    assert quad(sampler.density, eps, 1.0) == pytest.approx(1.0, abs=1e-8)
    for t in (0.05, 0.3, 0.9):
        assert sampler.cdf(torch.tensor([t], dtype=F64)).item() == pytest.approx(
            quad(sampler.density, eps, t), abs=1e-8)
    u = torch.rand(1000, generator=gen(2), dtype=F64)
    torch.testing.assert_close(sampler.cdf(sampler.icdf(u)), u, rtol=0, atol=1e-12)
    n = 20000
    t = sampler.sample(n, gen(3), dtype=F64)
    assert t.min().item() >= eps and t.max().item() <= 1.0
    # the draws follow the density: Kolmogorov-Smirnov distance against the CDF checked above
    cdf = sampler.cdf(t.sort().values)
    ks = torch.maximum(torch.arange(1, n + 1, dtype=F64) / n - cdf,
                       cdf - torch.arange(n, dtype=F64) / n).max().item()
    assert ks < 1.95 / math.sqrt(n)  # the 99.9% level
    # unbiased: E_q[weight(t) h(t)] = ∫ h dt for two integrands, within 4 standard errors
    for h in (lambda s: s.pow(2), lambda s: likelihood_weight(sde, s) * (1 - sde.marginal_scale(s).pow(2))):
        est = sampler.weight(t) * h(t)
        exact = quad(h, eps, 1.0)
        assert abs(est.mean().item() - exact) < 4 * est.std().item() / math.sqrt(n) + 1e-12


def test_time_samplers_fix_the_reference_biases():
    """drop_all_iw's normalizer is ∫_eps^1 (1 - σ^2) dt = 0.266004 (the reference: 0.266606);
    the uniform sampler's weight is 1 - eps (the reference omits it: +1% at eps = 0.01)."""
    sde = VPSDE()
    drop_all = DropAllTimeSampler(sde, 0.01)
    exact = quad(lambda t: 1 - sde.marginal_scale(t).pow(2), 0.01, 1.0)
    assert drop_all.normalizer == pytest.approx(exact, rel=1e-12)
    assert drop_all.normalizer == pytest.approx(0.266004, abs=1e-6)
    uniform = time_sampler("uniform", sde, 0.01)
    assert uniform.weight(torch.tensor([0.5])).item() == pytest.approx(0.99)
    assert isinstance(uniform, UniformTimeSampler)
    assert isinstance(time_sampler("ll_iw", sde, 0.01), LogVarianceTimeSampler)
    assert isinstance(time_sampler("drop_sigma2t_iw", sde, 0.01), VarianceTimeSampler)
    assert isinstance(time_sampler("log_snr", sde, 0.01), LikelihoodImportanceSampler)
    with pytest.raises(ValueError, match="unknown name 'll_uniform'"):
        time_sampler("ll_uniform", sde, 0.01)


def t_integrand_variance(sampler, h, eps: float) -> float:
    """Var_q[h(t) / q(t)] = ∫ h^2 / q dt - (∫ h dt)^2, by quadrature."""
    second = quad(lambda t: h(t).pow(2) / sampler.density(t), eps, 1.0)
    return second - quad(h, eps, 1.0) ** 2


def test_importance_sampling_reduces_the_variance_of_the_likelihood_integrand():
    """A narrow Normal posterior at 0 under the VP SDE, eps = 0.01: the likelihood-weighted
    integrand h(t) = g^2/(2σ^2) E|ε_N - ε|^2 = g^2 (1 - σ^2)^2 / (2σ^2) per dimension."""
    sde, eps = VPSDE(), 0.01

    def h(t):
        return likelihood_weight(sde, t) * (1 - sde.marginal_scale(t).pow(2)).pow(2)

    variance = {name: t_integrand_variance(time_sampler(name, sde, eps), h, eps)
                for name in ("uniform", "ll_iw", "log_snr")}
    assert variance["uniform"] / variance["ll_iw"] > 100  # measured: 105x
    assert variance["uniform"] / variance["log_snr"] == pytest.approx(5.0, abs=0.1)
    # ll_iw's weight times the likelihood weight explodes as σ^2 -> 1; log-SNR's stays bounded
    one = torch.ones(1, dtype=F64)
    ll_iw, log_snr = LogVarianceTimeSampler(sde, eps), LikelihoodImportanceSampler(sde, eps)
    assert (ll_iw.weight(one) * likelihood_weight(sde, one)).item() > 1e4
    ts = grid(eps, 1.0, 1001)
    assert (log_snr.weight(ts) * likelihood_weight(sde, ts)).max().item() <= log_snr.normalizer / 2 * (1 + 1e-12)


# --- the cross-entropy ---------------------------------------------------------------------------

def normal_prior_eps(sde):
    return lambda z, t: sde.marginal_scale(t).reshape(-1, *([1] * (z.ndim - 1))) * z


def cross_entropy_by_quadrature(sde, eps: float, mean_sq_plus_var: float, dims: int) -> float:
    """∫_eps^1 g^2/(2σ^2) E|σ z_t - ε|^2 dt + constant, with E|σ_t z_t - ε|^2 per dimension
    = σ^2 m^2 E[z0^2] + (1 - σ^2)^2 (m^2 = 1 - σ^2 up to sigma2_0)."""

    def h(t):
        m, s = sde.marginal_coefficients(t)
        return likelihood_weight(sde, t) * (s.pow(2) * m.pow(2) * mean_sq_plus_var
                                            + (1 - s.pow(2)).pow(2))

    return dims * quad(h, eps, 1.0) + cross_entropy_constant(sde, eps, dims)


@pytest.mark.parametrize("name", ["uniform", "ll_iw", "log_snr"])
@pytest.mark.parametrize("case", CASES[:2], ids=CASE_IDS[:2])
def test_cross_entropy_with_the_normal_prior_matches_quadrature(case, name):
    sde, eps = case
    n, dims = 20000, 2
    mean = torch.full((n, dims), 0.6, dtype=F64)
    std = torch.full((n, dims), 0.5, dtype=F64)
    ce = cross_entropy(sde, normal_prior_eps(sde), mean, std, time_sampler(name, sde, eps), gen(5))
    assert ce.shape == (n,)
    exact = cross_entropy_by_quadrature(sde, eps, 0.36 + 0.25, dims)
    assert abs(ce.mean().item() - exact) < 3 * ce.std().item() / math.sqrt(n)
    # and the integral is the cross-entropy between the diffused posterior at eps and N(0, I)
    m, s = sde.marginal_coefficients(torch.tensor([eps], dtype=F64))
    analytic = dims * (0.5 * math.log(2 * math.pi) + 0.5 * (m.item() ** 2 * 0.61 + s.item() ** 2))
    assert abs(exact - analytic) / dims < 1e-3


def test_cross_entropy_is_reparameterized_and_seeded():
    sde = VPSDE()
    mean = torch.zeros(64, 4, 2, 2, requires_grad=True)
    log_std = torch.full((64, 4, 2, 2), -1.0, requires_grad=True)
    sampler = time_sampler("ll_iw", sde, 0.01)
    ce = cross_entropy(sde, normal_prior_eps(sde), mean, log_std.exp(), sampler, gen(1))
    ce.mean().backward()
    assert mean.grad.abs().sum() > 0 and log_std.grad.abs().sum() > 0
    again = cross_entropy(sde, normal_prior_eps(sde), mean, log_std.exp(), sampler, gen(1))
    torch.testing.assert_close(ce, again)
    state = torch.random.get_rng_state()
    cross_entropy(sde, normal_prior_eps(sde), mean, log_std.exp(), sampler, gen(2))
    assert torch.equal(state, torch.random.get_rng_state())
    with pytest.raises(ValueError, match="std must be a tensor shaped like"):
        cross_entropy(sde, normal_prior_eps(sde), mean, torch.ones(3), sampler)
    with pytest.raises(TypeError, match="t_sampler needs"):
        cross_entropy(sde, normal_prior_eps(sde), mean, log_std.exp(), 0.01)


# --- the mixed score -----------------------------------------------------------------------------

class RecordingNet(torch.nn.Module):
    """Returns a fixed pattern and remembers its inputs."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(1.0))

    def forward(self, z, c):
        self.seen = (z.detach().clone(), c.detach().clone())
        return self.scale * torch.sin(3 * z) + 0.1


def test_mixed_score_at_alpha_zero_is_the_normal_prior_exactly():
    sde = VPSDE()
    model = MixedScore(RecordingNet(), sde, channels=4, logit_init=-math.inf)
    z = torch.randn(5, 4, 3, 3, generator=gen())
    t = torch.rand(5, generator=gen(1)) * 0.9 + 0.05
    assert torch.equal(model(z, t), -z)
    sigma = sde.marginal_scale(t).reshape(-1, 1, 1, 1)
    assert torch.equal(model.eps(z, t), sigma * z)


def test_mixed_score_mixes_per_channel_and_feeds_1000t():
    sde = GeometricVPSDE()
    net = RecordingNet()
    model = MixedScore(net, sde, channels=3, logit_init=-3.0)
    assert model.mixing_logit.shape == (1, 3, 1, 1)
    assert MixedScore(net, sde, channels=3, spatial=False).mixing_logit.shape == (1, 3)
    with torch.no_grad():
        model.mixing_logit.copy_(torch.tensor([-2.0, 0.0, 1.5]).reshape(1, 3, 1, 1))
    z = torch.randn(4, 3, 2, 2, generator=gen())
    t = torch.tensor([0.1, 0.4, 0.7, 1.0])
    alpha = torch.sigmoid(torch.tensor([-2.0, 0.0, 1.5])).reshape(1, 3, 1, 1)
    sigma = sde.marginal_scale(t).reshape(-1, 1, 1, 1)
    net_eps = torch.sin(3 * z) + 0.1
    torch.testing.assert_close(model.eps(z, t), (1 - alpha) * sigma * z + alpha * net_eps)
    torch.testing.assert_close(model(z, t), -model.eps(z, t) / sigma)
    torch.testing.assert_close(net.seen[1], 1000 * t)
    assert sum(p.numel() for p in model.parameters()) == 1 + 3  # the logits are trained
    model.set_active(torch.tensor([True, False, True]))
    model.eps(z, t)
    assert torch.equal(net.seen[0][:, 1], torch.zeros_like(z[:, 1]))
    assert model.mixing_logit[0, 1].item() == MixedScore.INACTIVE_LOGIT
    with pytest.raises(ValueError, match="one flag per latent channel"):
        model.set_active(torch.tensor([True]))
    with pytest.raises(ValueError, match="channels must be an int"):
        MixedScore(net, sde, channels=0)


# --- the latent NCSN++ at paper size -------------------------------------------------------------

# LSGM's score prior: our NCSN++ with LSGM's choices (biggan blocks, FIR, no progressive paths,
# dropout 0.2, positional embedding of width 128 -> 512, attention at 16 only) plus the mixing
# logit per latent channel. Reference counts: REFERENCE_LSGM_PSLD.md §E.
LATENT_NCSNPP = {
    "lsgm_cifar10": ({"image_size": 16, "num_channels": 180, "nf": 512, "ch_mult": (1, 1, 1)},
                     375_561_064),
    "lsgm_mnist": ({"image_size": 8, "num_channels": 40, "nf": 256, "ch_mult": (1, 1),
                    "attn_resolutions": ()}, 63_774_544),
    "lsgm_omniglot": ({"image_size": 16, "num_channels": 60, "nf": 256, "ch_mult": (1, 1, 1)},
                      97_804_152),
    "lsgm_celebahq256": ({"image_size": 32, "num_channels": 160, "nf": 256,
                          "ch_mult": (1, 2, 2, 2)}, 408_367_680),
}


@pytest.mark.parametrize("name", list(LATENT_NCSNPP))
def test_latent_ncsnpp_has_the_reference_parameter_count(name):
    from lsgm_edu.nets.unet import UNet, UNetConfig

    settings, expected = LATENT_NCSNPP[name]
    cfg = UNetConfig(**{"arch": "ncsnpp", "num_res_blocks": 8, "dropout": 0.2, "fir": True,
                        "resblock_type": "biggan", "progressive": "none",
                        "progressive_input": "none", "embedding_type": "positional",
                        "embedding_dim": 128, "attn_resolutions": (16,), **settings})
    with torch.device("meta"):
        model = MixedScore(UNet(cfg), VPSDE(), cfg.num_channels, logit_init=-3.0)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert count == expected


# --- the NELBO ----------------------------------------------------------------------------------

TINY_VAE = {
    "image_size": 8, "num_channels": 1, "num_channels_enc": 8, "num_channels_dec": 8,
    "num_preprocess_blocks": 1, "num_preprocess_cells": 1, "num_postprocess_blocks": 1,
    "num_postprocess_cells": 1, "num_latent_scales": 2, "num_groups_per_scale": 2,
    "num_latent_per_group": 2, "num_cell_per_cond_enc": 1, "num_cell_per_cond_dec": 1,
    "ch_mult": (1, 1, 2), "cell_type": "res_bnswish", "use_se": True, "num_flows": 0,
    "decoder": "bernoulli"}


class ZeroNet(torch.nn.Module):
    def forward(self, z, c):
        return torch.zeros_like(z)


def test_lsgm_with_a_normal_prior_has_the_nelbo_of_the_vae_alone():
    """Mixing logits -inf: the score prior is N(0, I), so LSGM's NELBO (cross-entropy through the
    diffusion) equals the VAE's recon + KL at the same posterior sample, up to Monte Carlo."""
    from lsgm_edu.lsgm import nelbo
    from lsgm_edu.vae import NVAE, VAEConfig

    vae = NVAE(VAEConfig(**TINY_VAE), generator=0).eval()
    sde = VPSDE()
    prior = MixedScore(ZeroNet(), sde, channels=4, logit_init=-math.inf)
    n = 20000
    x = (torch.rand(1, 1, 8, 8, generator=gen(9)) > 0.5).float().expand(n, -1, -1, -1)
    with torch.no_grad():
        bound = nelbo(vae, prior.eps, x, sde, time_sampler("ll_iw", sde, 0.01), gen(4))
        alone = vae(x, gen(4))  # the same posterior sample
        vae_nelbo = vae.reconstruction_loss(alone, x) + torch.stack(alone.kl).sum(0)
    torch.testing.assert_close(bound.reconstruction, vae.reconstruction_loss(alone, x))
    diff = bound.total - vae_nelbo
    assert abs(diff.mean().item()) < 4 * diff.std().item() / math.sqrt(n)
    assert diff.std().item() > 0  # the diffusion estimate is random, the check is not vacuous


def test_nll_bound_estimators_give_the_vaes_nelbo_under_a_normal_prior():
    """With α = 0 the PF-ODE of the prior does not move z, so the ODE estimate is the VAE's NELBO
    to rounding; the cross-entropy estimate (the training bound) equals it in expectation."""
    from lsgm_edu.lsgm import nll_bound
    from lsgm_edu.vae import NVAE, VAEConfig

    vae = NVAE(VAEConfig(**TINY_VAE), generator=0).eval()
    sde = VPSDE()
    models = {"vae": vae, "sgm": MixedScore(ZeroNet(), sde, channels=4, logit_init=-math.inf)}
    n = 4000
    x = (torch.rand(1, 1, 8, 8, generator=gen(9)) > 0.5).float().expand(n, -1, -1, -1)
    alone = nll_bound({"vae": vae}, None, x, generator=gen(4))
    ode = nll_bound(models, sde, x[:8], generator=gen(4))  # same images, same posterior samples
    torch.testing.assert_close(ode.nll, nll_bound({"vae": vae}, None, x[:8], generator=gen(4)).nll,
                               atol=1e-4, rtol=0)
    assert ode.nfe > 0 and alone.nfe == 0
    ce = nll_bound(models, sde, x, generator=gen(4), estimator="cross_entropy",
                   t_sampler=time_sampler("ll_iw", sde, 0.01), draws=2)
    assert ce.nfe == 2
    torch.testing.assert_close(ce.reconstruction, alone.reconstruction)
    diff = ce.nll - alone.nll
    assert diff.std().item() > 0
    assert abs(diff.mean().item()) < 4 * diff.std().item() / math.sqrt(n)
    with pytest.raises(ValueError, match="estimator must be one of"):
        nll_bound(models, sde, x[:2], estimator="exact")
    with pytest.raises(ValueError, match="needs t_sampler"):
        nll_bound(models, sde, x[:2], estimator="cross_entropy")
    with pytest.raises(ValueError, match="draws must be an int >= 1"):
        nll_bound(models, sde, x[:2], estimator="cross_entropy",
                  t_sampler=time_sampler("ll_iw", sde, 0.01), draws=0)


def test_iw_bound_is_the_single_sample_bound_at_k_1_and_tightens_with_k():
    """k = 1 is `nll_bound` on the same draws; the bound decreases with k in expectation (Burda et
    al. 2016, Thm. 1), here far beyond its standard error; with a Normal score prior and the
    exact divergence it is the VAE alone's IW bound on the same draws (the PF-ODE does not move)."""
    from lsgm_edu.lsgm import iw_bound, nll_bound
    from lsgm_edu.vae import NVAE, VAEConfig

    vae = NVAE(VAEConfig(**TINY_VAE), generator=0).eval()
    x = (torch.rand(64, 1, 8, 8, generator=gen(9)) > 0.5).float()
    torch.testing.assert_close(iw_bound({"vae": vae}, None, x, 1, generator=gen(4)),
                               nll_bound({"vae": vae}, None, x, generator=gen(4)).nll,
                               atol=0, rtol=0)
    bounds = {k: torch.stack([iw_bound({"vae": vae}, None, x, k, generator=gen(10 * k + r))
                              for r in range(8)]).mean(0) for k in (1, 4, 32)}
    for small, large in ((1, 4), (4, 32)):
        gain = bounds[small] - bounds[large]  # per image, averaged over 8 repetitions
        assert gain.mean() > 4 * gain.std() / math.sqrt(len(gain)) > 0, (small, large)

    sde = VPSDE()
    models = {"vae": vae, "sgm": MixedScore(ZeroNet(), sde, channels=4, logit_init=-math.inf)}
    torch.testing.assert_close(
        iw_bound(models, sde, x[:4], 8, generator=gen(5), exact_divergence=True),
        iw_bound({"vae": vae}, None, x[:4], 8, generator=gen(5)), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        iw_bound({"vae": vae}, None, x, 0)

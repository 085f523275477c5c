"""Latent PSLD: LSGM's score prior on any SDE of the engine, phase space included.

The Normal part of the mixed score is the exact score of lifted N(0, I) data (checked against the
Gaussian-mixture oracle); the latent cross-entropy estimate of a phase-space prior has the
expectation of its closed form and bounds the latent's cross-entropy; with a Normal prior the
LSGM's bounds equal the VAE's; and a PSLD-prior LSGM trains, resumes, samples and is evaluated
through the same trainer and command line as the VP one.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from lsgm_edu import lsgm
from lsgm_edu.configs import ConfigError, config_from_dict
from lsgm_edu.kernel import eps_to_score
from lsgm_edu.losses import time_sampler
from lsgm_edu.nets.precond import MixedScore
from lsgm_edu.phase_space import CLD, PSLD
from lsgm_edu.sde import VESDE, VPSDE
from lsgm_edu.toy import GaussianMixture

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_lsgm import TINY_VAE
from test_lsgm_training import TINY, _resumed_after_step_3, _run

F64 = torch.float64
SDES = {"vp": VPSDE(), "ve": VESDE(), "cld": CLD(), "psld": PSLD(),
        "psld_upper": PSLD(factorization="upper")}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class ZeroNet(torch.nn.Module):
    def forward(self, z, c):
        return torch.zeros_like(z)


class SineNet(torch.nn.Module):
    def forward(self, z, c):
        return torch.sin(3 * z) + 0.1


# --- the Normal part of the mixed score --------------------------------------------------------


def test_normal_score_is_minus_z_under_vp_exactly():
    z = torch.randn(8, 4, 2, 2, generator=gen())
    t = torch.rand(8, generator=gen(1)) * 0.99 + 0.01
    assert torch.equal(VPSDE().normal_score(z, t), -z)


@pytest.mark.parametrize("name", list(SDES))
def test_normal_score_is_the_oracle_score_of_lifted_normal_data(name):
    """N(0, I) data diffused by the SDE (lifted to the state): the Gaussian-mixture oracle with one
    unit component gives its exact score; the oracle ignores numerical_eps (1e-9)."""
    sde, dims = SDES[name], 3
    oracle = GaussianMixture(torch.zeros(1, dims, dtype=F64), torch.ones(1, dtype=F64))
    t = torch.tensor([1e-3, 0.01, 0.1, 0.5, 1.0], dtype=F64)
    z = torch.randn(5, sde.K * dims, generator=gen(2), dtype=F64)
    torch.testing.assert_close(sde.normal_score(z, t), oracle.score_fn(sde)(z, t),
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["cld", "psld", "psld_upper"])
def test_mixed_score_in_phase_space_mixes_the_normal_score_and_the_network(name):
    sde, channels = SDES[name], 3
    z = torch.randn(4, 2 * channels, 2, 2, generator=gen(3), dtype=F64)
    t = torch.tensor([0.02, 0.2, 0.6, 1.0], dtype=F64)
    normal = MixedScore(ZeroNet(), sde, 2 * channels, logit_init=-math.inf).double()
    torch.testing.assert_close(normal(z, t), sde.normal_score(z, t), rtol=0, atol=0)
    model = MixedScore(SineNet(), sde, 2 * channels, logit_init=0.3).double()
    L = sde.marginal_scale(t)
    # the score is the kernel score of the mixed noise, and α mixes per state channel
    torch.testing.assert_close(model(z, t), eps_to_score(model.eps(z, t), L))
    alpha = torch.sigmoid(torch.tensor(0.3, dtype=F64))
    expected = (1 - alpha) * sde.normal_score(z, t) + alpha * eps_to_score(torch.sin(3 * z) + 0.1, L)
    torch.testing.assert_close(model(z, t), expected)
    # one flag per latent channel switches the channel off in both phase components
    model.set_active(torch.tensor([True, False, True]))
    assert model.mixing_logit[0, [1, 4]].eq(MixedScore.INACTIVE_LOGIT).all()
    assert model.is_active[0, [0, 2, 3, 5]].eq(1).all()
    with pytest.raises(ValueError, match="one flag per latent channel \\(3\\)"):
        model.set_active(torch.ones(6, dtype=torch.bool))


# --- the cross-entropy of a phase-space prior ----------------------------------------------------


def state_cross_entropy_bound(sde, eps: float, mean: float, var: float) -> float:
    """Per latent coordinate, in closed form: CE(q_eps || p_eps) of the diffused states (z0 ~
    N(mean, var) and z0 ~ N(0, 1), both lifted) minus the kernel's conditional entropy of m given
    (x, z0), 1/2 log(2πe (Σ_mm - Σ_xm^2 / Σ_xx)). From `transition` and the lift alone."""
    A, Sigma = (m[0] for m in sde.transition(torch.zeros(1, dtype=F64),
                                               torch.tensor([eps], dtype=F64)))
    C0 = sde.lift_covariance
    e = torch.tensor([[1.0], [0.0]], dtype=F64)
    kernel = A @ C0 @ A.T + Sigma + sde.numerical_eps * torch.eye(2, dtype=F64)
    p_cov = A @ e @ e.T @ A.T + kernel
    q_cov = var * A @ e @ e.T @ A.T + kernel
    q_mean = mean * A @ e
    precision = torch.linalg.inv(p_cov)
    ce = 0.5 * (torch.trace(precision @ q_cov) + (q_mean.T @ precision @ q_mean).item()
                + torch.logdet(2 * math.pi * p_cov).item())
    conditional = kernel[1, 1] - kernel[0, 1] ** 2 / kernel[0, 0]
    return (ce - 0.5 * torch.log(2 * math.pi * math.e * conditional)).item()


@pytest.mark.parametrize("name", ["cld", "psld"])
def test_cross_entropy_of_a_normal_phase_space_prior_has_its_closed_form_expectation(name):
    sde, eps, n, dims = SDES[name], 0.01, 20000, 2
    prior = MixedScore(ZeroNet(), sde, 2 * dims, logit_init=-math.inf, spatial=False).double()
    mean = torch.full((n, dims), 0.6, dtype=F64)
    std = torch.full((n, dims), 0.5, dtype=F64)
    ce = lsgm.cross_entropy(sde, lsgm.eps_of(prior, sde), mean, std,
                            time_sampler("uniform", sde, eps), gen(5))
    assert ce.shape == (n,)
    exact = dims * state_cross_entropy_bound(sde, eps, 0.6, 0.25)
    assert abs(ce.mean().item() - exact) < 3 * ce.std().item() / math.sqrt(n)
    # a bound on the latent's own cross-entropy with N(0, I), tight for PSLD (noise on x too)
    true = dims * (0.5 * math.log(2 * math.pi) + 0.5 * (0.36 + 0.25))
    assert exact > true
    if name == "psld":
        assert state_cross_entropy_bound(sde, 1e-3, 0.6, 0.25) - true / dims < 0.02


def test_the_cross_entropy_bound_of_psld_tightens_to_the_latents_as_eps_shrinks():
    true = 0.5 * math.log(2 * math.pi) + 0.5 * 0.61
    gaps = [state_cross_entropy_bound(PSLD(), eps, 0.6, 0.25) - true
            for eps in (1e-2, 1e-3, 1e-4)]
    assert all(g > 0 for g in gaps) and gaps[0] > gaps[1] > gaps[2]
    assert gaps[2] < 0.003


def test_nll_bound_of_an_lsgm_with_a_normal_psld_prior_is_the_vaes_nelbo():
    """α = 0: the PF-ODE of the prior transports the lifted N(0, I) exactly, so the ODE bound
    log p(z0, m0) + H(m0) averages to log N(z0; 0, I): the VAE's NELBO, up to the m0 draw."""
    from lsgm_edu.vae import NVAE, VAEConfig

    vae = NVAE(VAEConfig(**TINY_VAE), generator=0).eval()
    sde = PSLD()
    channels = vae.config.top_latent_shape[0]
    models = {"vae": vae, "sgm": MixedScore(ZeroNet(), sde, 2 * channels, logit_init=-math.inf)}
    n = 64
    x = (torch.rand(1, 1, 8, 8, generator=gen(9)) > 0.5).float().expand(n, -1, -1, -1)
    alone = lsgm.nll_bound({"vae": vae}, None, x, generator=gen(4))
    ode = lsgm.nll_bound(models, sde, x, generator=gen(4), ode_eps=1e-4, tol=1e-5,
                         exact_divergence=True)
    assert ode.nfe > 0
    torch.testing.assert_close(ode.reconstruction, alone.reconstruction)
    diff = ode.nll - alone.nll
    assert diff.std().item() > 0.5  # the m0 draw makes each image's bound random
    assert abs(diff.mean().item()) < 4 * diff.std().item() / math.sqrt(n)


@pytest.mark.parametrize("name", ["cld", "psld"])
def test_momentum_from_the_kernel_at_eps_tightens_the_state_bound(name):
    """One Gaussian N(0, 0.5^2) per coordinate, its exact diffused score: log p_eps(x) is known
    in closed form. The bound with m from the lift N(0, C_mm) loses nats at eps = 0.01 (the
    momentum has mixed by then); with m from the kernel's momentum marginal at eps it is close."""
    from lsgm_edu.likelihood import data_log_likelihood

    sde, eps, n, dims = SDES[name], 0.01, 400, 2
    oracle = GaussianMixture(torch.zeros(1, dims, dtype=F64), torch.full((1,), 0.5, dtype=F64))
    x = oracle.sample(n, gen(6))
    t = torch.full((1,), eps, dtype=F64)
    A, Sigma = sde.transition(torch.zeros_like(t), t)
    start = torch.diag(torch.tensor([0.25, 0.0], dtype=F64)) + sde.lift_covariance
    var_x = (A[0] @ start @ A[0].T + Sigma[0])[0, 0] + sde.numerical_eps
    exact = (-0.5 * x.pow(2).sum(1) / var_x - 0.5 * dims * torch.log(2 * math.pi * var_x))
    bounds = {}
    for at_eps in (False, True):
        res = data_log_likelihood(sde, oracle.score_fn(sde), x, generator=gen(7), eps=eps,
                                  exact_divergence=True, rtol=1e-6, atol=1e-6,
                                  momentum_at_eps=at_eps)
        bounds[at_eps] = res.logp - exact  # <= 0 in expectation (Jensen)
    lift_gap, kernel_gap = (mean_se(bounds[k]) for k in (False, True))
    assert kernel_gap[0] < 3 * kernel_gap[1] and lift_gap[0] < 3 * lift_gap[1]
    assert kernel_gap[0] > -0.1 * dims  # nearly tight
    assert lift_gap[0] < kernel_gap[0] - 0.3 * dims  # the lift at 0 is far off at eps = 0.01


def mean_se(v: torch.Tensor) -> tuple[float, float]:
    return v.mean().item(), v.std().item() / math.sqrt(len(v))


# --- configs, training, sampling ---------------------------------------------------------------


def tiny_psld(**sections):
    tree = copy.deepcopy(TINY)
    tree["sde"] = {"name": "psld"}
    tree["model"]["sgm"]["num_channels"] = 8
    tree["lsgm"].update(iw_sample_p="drop_all_uniform")
    for section, changes in sections.items():
        tree.setdefault(section, {}).update(changes)
    return config_from_dict(tree, name="lsgm_tiny_psld")


@pytest.mark.parametrize(("section", "change", "message"), [
    ("model", {"sgm": {**TINY["model"]["sgm"], "num_channels": 4}}, "model.sgm.num_channels=4"),
    ("lsgm", {"iw_sample_p": "ll_iw"}, "takes uniform t"),
    ("lsgm", {"iw_sample_q": "ll_iw", "disjoint_training": True}, "takes uniform t"),
    ("sampling", {"method": "pc", "striding": "quadratic"}, "sampling.striding"),
])
def test_bad_phase_space_lsgm_configs_are_refused_naming_the_key(section, change, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        tiny_psld(**{section: change})


def test_book_psld_config_differs_from_the_vp_one_only_in_the_prior():
    from lsgm_edu.configs import load_config

    vp, psld = load_config("lsgm_mnist_book"), load_config("lsgm_mnist_book_psld")
    assert psld.model.vae == vp.model.vae and psld.train == vp.train and psld.lsgm == vp.lsgm
    assert psld.model.sgm.num_channels == 2 * vp.model.sgm.num_channels
    from lsgm_edu.nets import build_model
    from lsgm_edu.registry import SDES as REGISTRY

    assert type(REGISTRY.build(psld.sde)) is PSLD and type(REGISTRY.build(vp.sde)) is VPSDE

    a, b = build_model(vp.model), build_model(psld.model)
    n = [sum(p.numel() for p in m["sgm"].parameters()) for m in (a, b)]
    # 4 more channels into and out of the 3x3 convolutions of width nf = 32 (+ 4 output biases),
    # 4 more mixing logits
    assert n[1] - n[0] == 4 * 32 * 9 + (4 * 32 * 9 + 4) + 4


def test_lsgm_with_a_psld_prior_trains_samples_and_evaluates(tmp_path, capsys):
    import yaml

    from lsgm_edu.__main__ import main

    tree = copy.deepcopy(TINY)
    tree["sde"] = {"name": "psld"}
    tree["model"]["sgm"]["num_channels"] = 8
    tree["lsgm"].update(iw_sample_p="drop_all_uniform")
    config = tmp_path / "tiny_psld.yaml"
    config.write_text(yaml.safe_dump({k: v for k, v in tree.items() if k != "name"}))
    vae_run, run = tmp_path / "vae", tmp_path / "lsgm"
    assert main(["train", "--config", str(config), "--stage", "vae", "--out", str(vae_run)]) == 0
    vae_ckpt = max((vae_run / "checkpoints").glob("*.json"))
    assert main(["train", "--config", str(config), "--stage", "lsgm", "--out", str(run),
                 "--vae-checkpoint", str(vae_ckpt)]) == 0
    ckpt = max((run / "checkpoints").glob("*.json"))
    capsys.readouterr()
    for method in ("ode", "sscs", "em"):
        out = tmp_path / f"samples_{method}.png"
        assert main(["sample", "--checkpoint", str(ckpt), "--n", "4", "--out", str(out),
                     "--method", method, "--steps", "10"]) == 0
        assert out.exists()
    for estimator in ("ode", "cross_entropy"):
        out = tmp_path / f"{estimator}.json"
        assert main(["eval", "--checkpoint", str(ckpt), "--metric", "nll", "--num-samples", "8",
                     "--batch-size", "8", "--estimator", estimator, "--tol", "1e-3",
                     "--json", str(out)]) == 0
        result = json.loads(out.read_text())
        assert result["nll_nats"] > 0 and math.isfinite(result["nll_sem"])
        assert ("momentum marginal" in result["protocol"]) == (estimator == "ode")
        assert ("ll_iw" in result["protocol"]) is False


def test_psld_prior_lsgm_trains_end_to_end_and_resumes_exactly(tmp_path):
    """Both models, both losses, the state-shaped noise of the prior: resuming after step 3
    reproduces every tensor of the uninterrupted run (weights, EMA, optimizer state)."""
    from lsgm_edu import checkpoint as ckpt

    vae_run = _run(tmp_path, "vae", tiny_psld(), stage="vae")
    cfg = tiny_psld(lsgm={"vae_checkpoint": str(vae_run.checkpoint)})
    full = _run(tmp_path, "full", cfg)
    resumed = _resumed_after_step_3(tmp_path, cfg)
    a, b = (ckpt.load_checkpoint(r.checkpoint)[0] for r in (full, resumed))
    assert a.keys() == b.keys() and {k.split("/")[0] for k in a} == {"vae", "sgm", "ema", "opt"}
    assert a["sgm/mixing_logit"].shape == (1, 8, 1, 1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert math.isfinite(full.loss)


def test_ve_prior_lsgm_with_uniform_t_is_accepted_and_ll_iw_refused():
    tree = copy.deepcopy(TINY)
    tree["sde"] = {"name": "ve"}
    with pytest.raises(ConfigError, match="VP-type"):
        config_from_dict(tree, name="t")
    tree["lsgm"].update(iw_sample_p="ll_uniform")
    config_from_dict(tree, name="t")


# --- the shipped latent PSLD (data/checkpoints/lsgm_mnist_book_psld) --------------------------


@pytest.fixture(scope="module")
def shipped_pair():
    from lsgm_edu.data import shipped_file
    from lsgm_edu.train import load_lsgm

    return {name: load_lsgm(shipped_file(f"checkpoints/{name}.json"))
            for name in ("lsgm_mnist_book", "lsgm_mnist_book_psld")}


@pytest.mark.slow
def test_shipped_latent_psld_shares_the_vp_lsgms_vae_and_beats_it_alone(shipped_pair):
    """The comparison of benchmarks/latent_psld.py rests on one frozen VAE for both priors; on
    100 test digits (same binarizations and posterior draws) the PSLD prior's bound is far
    below that VAE's own NELBO with N(0, I)."""
    from lsgm_edu import data

    (vp, _, _), (psld, sde, cfg) = shipped_pair.values()
    assert isinstance(sde, PSLD) and cfg.lsgm.train_vae is False
    a, b = vp["vae"].state_dict(), psld["vae"].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ds = data.load_dataset("binarized_mnist5k", "test")
    index = torch.arange(100) * len(ds) // 100
    u = torch.rand(100, *ds.data.shape[1:], generator=gen(6))
    x = data.binarize(ds.data[index], ds.num_levels, noise=u)
    vae = lsgm.nll_bound(torch.nn.ModuleDict({"vae": psld["vae"]}), None, x, generator=gen(1))
    ours = lsgm.nll_bound(psld, sde, x, ode_eps=cfg.sampling.eps, tol=1e-4, generator=gen(1))
    assert torch.equal(vae.reconstruction, ours.reconstruction)
    diff = (ours.nll - vae.nll).double()
    se = diff.std().item() / math.sqrt(len(diff))
    assert diff.mean().item() < -5 * se, (diff.mean().item(), se)


@pytest.mark.slow
def test_shipped_latent_psld_reproduces_its_recorded_classifier_fid(tmp_path):
    """`eval --metric classifier-fid --tol 1e-3` of the sidecar, re-measured: same seeds, same
    images, same number."""
    import lsgm_edu.__main__ as cli
    from lsgm_edu.data import shipped_file

    path = shipped_file("checkpoints/lsgm_mnist_book_psld.json")
    recorded = json.loads(path.read_text())["evaluation"]["classifier_fid"]
    out = tmp_path / "fid.json"
    assert cli.main(["eval", "--metric", "classifier-fid", "--checkpoint", str(path),
                     "--num-samples", "500", "--tol", "1e-3", "--json", str(out)]) == 0
    measured = json.loads(out.read_text())
    assert measured["nfe"] == recorded["nfe"]
    assert measured["classifier_fid"] == pytest.approx(recorded["classifier_fid"], abs=0.5)

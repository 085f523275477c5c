"""The shipped book LSGM (data/checkpoints/lsgm_mnist_book) against the claims made for it: its
NLL bound beats its own VAE's (the frozen first stage it holds, with the N(0, I) prior) on the
same test images, binarizations and posterior draws, and its latent probability-flow ODE needs at
most half the NFE of the data-space MNIST model (mnist28_ddpmpp_vp) at the same tolerance, with a
classifier-FID as good within sampling noise.

benchmarks/lsgm.py measures the same things at several tolerances; the FID test reuses its
protocol and its recorded data-space draws."""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from lsgm_edu import data, lsgm, metrics, samplers
from lsgm_edu.train import load_lsgm, load_score_model, seeded_generator

pytestmark = pytest.mark.slow

N_NLL = 200  # test images of the NLL comparison (of 500)
# The likelihood ODE's tolerance (92 NFE; 248 at 1e-5): on these 200 images the per-image bounds
# at 1e-4 and 1e-5 differ by 0.01 nats on average and 0.12 at most, far below the SE here.
NLL_TOL = 1e-4
# The sampling tolerance of the NFE claim: LSGM's 23-NFE CelebA-HQ 256 result is at 1e-2, this is
# tighter; at 1e-5 the book's latent ODE needs more than half the data-space NFE
# (benchmarks/results/lsgm_mnist.json has every tolerance).
TOL = 1e-3
N_NFE = 100  # samples per model for the NFE comparison
BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "lsgm.py"
RESULTS = BENCHMARK.parent / "results" / "lsgm_mnist.json"


@pytest.fixture(scope="module")
def shipped():
    """(LSGM models, its VAE alone with the N(0, I) prior, sde, config), loaded once."""
    models, sde, cfg = load_lsgm(data.shipped_file("checkpoints/lsgm_mnist_book.json"))
    assert sde is not None and set(models) == {"vae", "sgm"}, "lsgm_mnist_book: not an LSGM"
    assert cfg.lsgm.train_vae is False, "the VAE alone is the first stage only if it was frozen"
    return models, torch.nn.ModuleDict({"vae": models["vae"]}), sde, cfg


def test_lsgm_nll_bound_beats_its_vae_on_the_same_images_and_binarizations(shipped):
    models, vae_alone, sde, cfg = shipped
    ds = data.load_dataset("binarized_mnist5k", "test")
    index = torch.arange(N_NLL) * len(ds) // N_NLL  # spread over the split (sorted by label)
    xs = ds.data[index]
    u = torch.stack([torch.rand(xs.shape[1:], generator=seeded_generator(0, 6, int(i)))
                     for i in index])  # image i's binarization, as `eval --metric nll` draws it
    x = data.binarize(xs, ds.num_levels, noise=u)
    with torch.no_grad():
        vae = lsgm.nll_bound(vae_alone, None, x, generator=torch.Generator().manual_seed(1))
        ours = lsgm.nll_bound(models, sde, x, ode_eps=cfg.sampling.eps, tol=NLL_TOL,
                              generator=torch.Generator().manual_seed(1))
    assert vae.nfe == 0 and ours.nfe > 0
    assert torch.equal(vae.reconstruction, ours.reconstruction), "not the same posterior draws"
    assert torch.isfinite(vae.nll).all() and torch.isfinite(ours.nll).all()
    diff = (ours.nll - vae.nll).double()
    se = float(diff.std() / math.sqrt(len(diff)))
    report = (f"LSGM bound {ours.nll.mean():.2f} vs VAE NELBO {vae.nll.mean():.2f} nats on "
              f"{N_NLL} images: paired difference {diff.mean():.2f} ± {se:.2f} nats (1 SE)")
    assert diff.mean() < -2 * se, report


@pytest.fixture(scope="module")
def nfe(shipped):
    """The NFE of each model's PF-ODE at rtol = atol = TOL for N_NFE samples from seed 0:
    {"latent": nfe, "pixel": nfe}."""
    models, _, sde, cfg = shipped
    _, nfe_latent = lsgm.sample_images(models, sde, N_NFE, method="ode", rtol=TOL, atol=TOL,
                                       eps=cfg.sampling.eps,
                                       generator=torch.Generator().manual_seed(0))
    model, pixel_cfg = load_score_model(data.shipped_file("checkpoints/mnist28_ddpmpp_vp.json"))
    _, nfe_pixel = samplers.probability_flow(
        model.sde, model, (N_NFE, 1, 28, 28), rtol=TOL, atol=TOL, eps=pixel_cfg.sampling.eps,
        generator=torch.Generator().manual_seed(0), return_nfe=True)
    return {"latent": nfe_latent, "pixel": nfe_pixel}


def test_latent_ode_needs_at_most_half_the_nfe_of_the_data_space_ode(nfe):
    assert 2 * nfe["latent"] <= nfe["pixel"], (
        f"{N_NFE} samples each at rtol = atol = {TOL:g}: latent PF-ODE {nfe['latent']} NFE, "
        f"data-space PF-ODE {nfe['pixel']} NFE")


def _benchmark():
    """benchmarks/lsgm.py as a module (its sampling and FID protocol), and its recorded results."""
    spec = importlib.util.spec_from_file_location("benchmark_lsgm", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, json.loads(RESULTS.read_text())


def _row(results: dict, key: str) -> dict:
    rows = [r for r in results["sampling"][key] if math.isclose(r["tol"], TOL)]
    assert rows, f"{RESULTS.name} has no {key} row at tol {TOL:g}: rerun benchmarks/lsgm.py"
    return rows[0]


def test_latent_ode_samples_are_no_worse_than_data_space_ones_by_classifier_fid(shipped):
    """Equal or better within sampling noise, at TOL. A 500-sample classifier-FID varies by
    several units between independent sample sets (benchmarks/results/lsgm_mnist.json: real
    digits too), so each model's FID is the mean over the benchmark's independent draws, and the
    LSGM may exceed the data-space model's by 2 standard errors of the difference. The LSGM's
    draws are measured here (the latent ODE is cheap) and must reproduce the recorded ones; the
    data-space model's draws, minutes of CPU each, come from the committed benchmark results,
    which test_recorded_data_space_fid_is_this_checkpoints (heavy) re-measures."""
    bench, results = _benchmark()
    models, _, sde, cfg = shipped
    settings = results["settings"]
    n, draws, batch = settings["num_samples"], settings["fid_draws"], settings["batch_size"]
    assert draws >= 2, f"{RESULTS.name}: one FID draw per point gives no spread; rerun it"
    classifier = metrics.load_classifier(data.shipped_file("checkpoints/mnist5k_classifier.json"))
    reference = data.load_dataset("mnist5k", "test").data
    latent = [metrics.classifier_fid(bench.sample_lsgm(models, sde, cfg, n, TOL, batch,
                                                       settings["seed"] + k)[0],
                                     reference, classifier) for k in range(draws)]
    recorded, pixel = _row(results, "lsgm"), _row(results, "data_space")
    assert latent == pytest.approx(recorded["classifier_fid_draws"], abs=0.5), (
        f"{RESULTS.name} was not measured on this checkpoint: LSGM FIDs {latent} here, "
        f"{recorded['classifier_fid_draws']} recorded")
    mean_latent, sd_latent = statistics.mean(latent), statistics.stdev(latent)
    mean_pixel, sd_pixel = pixel["classifier_fid"], pixel["classifier_fid_sd"]
    margin = 2 * math.sqrt((sd_latent**2 + sd_pixel**2) / draws)
    assert mean_latent <= mean_pixel + margin, (
        f"classifier-FID at rtol = atol = {TOL:g}, {n} samples, mean ± s.d. over {draws} draws: "
        f"LSGM {mean_latent:.1f} ± {sd_latent:.1f}, data space {mean_pixel:.1f} ± "
        f"{sd_pixel:.1f}; allowed margin {margin:.1f} (2 SE of the difference)")


@pytest.mark.heavy
def test_recorded_data_space_fid_is_this_checkpoints():
    """The data-space row the FID test reads: its first draw, sampled again at TOL, gives the
    recorded FID (minutes on a CPU, hence `make test-heavy`)."""
    bench, results = _benchmark()
    settings, pixel = results["settings"], _row(results, "data_space")
    model, pixel_cfg = load_score_model(data.shipped_file("checkpoints/mnist28_ddpmpp_vp.json"))
    images, _ = bench.sample_data_space(model, pixel_cfg, settings["num_samples"], TOL,
                                        settings["batch_size"], settings["seed"])
    classifier = metrics.load_classifier(data.shipped_file("checkpoints/mnist5k_classifier.json"))
    fid = metrics.classifier_fid(images, data.load_dataset("mnist5k", "test").data, classifier)
    assert fid == pytest.approx(pixel["classifier_fid_draws"][0], abs=0.5)

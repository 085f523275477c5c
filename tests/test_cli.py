"""python -m lsgm_edu sample | likelihood | eval, and loading trained / exported models."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from test_image_metrics import block_network, fake_inception  # noqa: F401  (fixture)

from lsgm_edu import checkpoint as ckpt
from lsgm_edu.__main__ import main, sample_batches
from lsgm_edu.configs import load_config
from lsgm_edu.data import load_dataset
from lsgm_edu.metrics import InceptionFeatures, compute_reference_statistics
from lsgm_edu.train import load_score_model, train

SMALL = ["model.nf=16", "model.ch_mult=[1, 2]", "model.num_res_blocks=1",
         "train.batch_size=16", "train.log_every=1", "train.sample_every=1000000",
         "train.warmup=1"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    cfg = load_config("digits8_ddpmpp_vp", [*SMALL, "model.attn_resolutions=[4]",
                                            "train.n_iters=4", "train.ckpt_every=4"])
    result = train(cfg, out, progress=False, log=lambda *a: None)
    return result


def test_export_ema_loads_back_the_same_model(digits_run, tmp_path):
    stem = tmp_path / "small"
    assert main(["export", "--checkpoint", str(digits_run.checkpoint), "--out", str(stem)]) == 0
    tensors, meta = ckpt.load_checkpoint(stem.with_suffix(".json"))
    assert meta["kind"] == "ema" and all(k.startswith("ema/") for k in tensors)
    model, cfg = load_score_model(stem.with_suffix(".json"))
    x, t = torch.randn(4, 1, 8, 8), torch.full((4,), 0.3)
    assert torch.equal(model(x, t), digits_run.score_model(x, t))
    assert cfg.name == "digits8_ddpmpp_vp"


def test_cli_sample_writes_a_grid(digits_run, tmp_path):
    out = tmp_path / "grid.png"
    assert main(["sample", "--checkpoint", str(digits_run.checkpoint), "--n", "9",
                 "--steps", "4", "--out", str(out)]) == 0
    w, h = Image.open(out).size
    assert (w, h) == (3 * 9 + 1, 3 * 9 + 1)  # 3x3 tiles of 8 pixels, 1-pixel padding


def test_cli_likelihood_reports_bits_per_dim(digits_run, tmp_path):
    out = tmp_path / "bpd.json"
    assert main(["likelihood", "--checkpoint", str(digits_run.checkpoint), "--n", "4",
                 "--batch-size", "4", "--tol", "1e-3", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    # An untrained model still gives a proper density: bits/dim positive and far below the
    # 64-dim uniform's log2(17) ~ 4.09 bits is not expected yet, but it must be finite.
    assert res["n"] == 4 and 0 < res["bits_per_dim"] < 50 and "17 levels" in res["protocol"]
    out2 = tmp_path / "eval.json"
    assert main(["eval", "--metric", "bpd", "--checkpoint", str(digits_run.checkpoint),
                 "--num-samples", "4", "--batch-size", "4", "--json", str(out2)]) == 0
    res2 = json.loads(out2.read_text())
    assert res2["n"] == 4 and res2["nfe"] > 2  # adaptive dopri5: drift evaluations, measured


def test_cli_classifier_fid_separates_noise_from_digits(tmp_path):
    cfg = load_config("mnist28_ddpmpp_vp", [*SMALL, "model.attn_resolutions=[14]",
                                            "train.n_iters=2", "train.ckpt_every=2"])
    run = train(cfg, tmp_path / "run", progress=False, log=lambda *a: None)
    out = tmp_path / "fid.json"
    assert main(["eval", "--checkpoint", str(run.checkpoint), "--metric", "classifier-fid",
                 "--num-samples", "100", "--batch-size", "50", "--steps", "5",
                 "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    # 2 training steps give noise-like images: far from the digits, unlike two halves of data
    assert res["classifier_fid"] > 10 * res["classifier_fid_data_vs_data"]
    assert res["num_samples"] == 100 and res["sampler"]["steps"] == 5
    n_corrector = cfg.sampling.n_corrector  # predictor-corrector: steps x (1 + correctors)
    assert res["nfe"] == 5 * (1 + n_corrector)


def test_cli_inception_fid_with_local_weights_and_saved_statistics(
        digits_run, tmp_path, fake_inception, monkeypatch):  # noqa: F811
    weights, _ = fake_inception
    block_network(monkeypatch)
    real = load_dataset("digits8x8", "test").data[:8]
    # the model sees 17-level digits; Inception sees them as 8-bit RGB, like the samples
    real = (real.float() * 255 / 16).round().to(torch.uint8).expand(-1, 3, -1, -1)
    stats = compute_reference_statistics(real, InceptionFeatures(weights).features,
                                         source="8 digits", progress=False)
    stats.save(tmp_path / "ref.npz")
    out = tmp_path / "fid.json"
    assert main(["eval", "--checkpoint", str(digits_run.checkpoint), "--num-samples", "8",
                 "--batch-size", "8", "--steps", "3", "--inception-weights", str(weights),
                 "--ref-stats", str(tmp_path / "ref.npz"), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["fid"] > 0 and res["inception_score"] >= 1.0 - 1e-9 and res["nfe"] > 0
    assert res["reference_statistics"] == "8 digits"
    # statistics saved without features: no KID, and the JSON says why
    assert res["kid"] is None and "KID: not computed" in res["protocol"]

    # with a seeded subset of reference features in the .npz, KID is computed; batches of 3
    # instead of 8 give the same images (per-image seeds), so the same FID up to the
    # summation order of the moments
    stats = compute_reference_statistics(real, InceptionFeatures(weights).features,
                                         source="8 digits", keep_features=8, progress=False)
    stats.save(tmp_path / "ref_kid.npz")
    out = tmp_path / "fid_kid.json"
    assert main(["eval", "--checkpoint", str(digits_run.checkpoint), "--num-samples", "8",
                 "--batch-size", "3", "--steps", "3", "--inception-weights", str(weights),
                 "--ref-stats", str(tmp_path / "ref_kid.npz"), "--kid-subsets", "4",
                 "--kid-subset-size", "5", "--json", str(out)]) == 0
    again = json.loads(out.read_text())
    assert again["fid"] == pytest.approx(res["fid"], rel=1e-9)
    assert again["inception_score"] == pytest.approx(res["inception_score"], rel=1e-9)
    assert isinstance(again["kid"], float) and again["kid_std"] >= 0
    assert "4 subsets of 5 rows" in again["protocol"]
    assert "8 reference features" in again["protocol"]
    assert "derived_seed(0, 8, i)" in again["protocol"] and "floor" in again["protocol"]


def test_samples_do_not_depend_on_the_batch_size(digits_run):
    model, cfg = load_score_model(digits_run.checkpoint)
    cfg.sampling.steps = 3
    batches = {bs: list(sample_batches(model, cfg, 16, bs, 0, "cpu", progress=False))
               for bs in (7, 16)}
    assert [b.shape[0] for b in batches[7]] == [7, 7, 2] and len(batches[16]) == 1
    images = torch.cat(batches[7])
    assert images.dtype == torch.uint8 and int(images.max()) <= 16  # 17-level digits
    assert torch.equal(images, batches[16][0])
    # another seed gives other images; the first 9 images of 16 are the 9 images of 9
    other = torch.cat(list(sample_batches(model, cfg, 16, 16, 1, "cpu", progress=False)))
    assert not torch.equal(other, images)
    first = torch.cat(list(sample_batches(model, cfg, 9, 4, 0, "cpu", progress=False)))
    assert torch.equal(first, images[:9])


def test_ve_config_trains_with_data_in_unit_range(tmp_path):
    """NCSN++ settings (VE SDE, [0, 1] data, FIR, Fourier features of log sigma) at toy size."""
    cfg = load_config("digits8_ddpmpp_vp", [
        *SMALL, "model.name=ncsnpp", "model.fir=true", "model.embedding_type=fourier",
        "model.progressive_input=residual", "model.attn_resolutions=[4]", "sde.name=vesde",
        "data.centered=false", "train.n_iters=3", "train.ckpt_every=3"])
    result = train(cfg, tmp_path, progress=False, log=lambda *a: None)
    assert torch.isfinite(torch.tensor(result.loss))
    model, loaded = load_score_model(result.checkpoint)
    assert not loaded.data.centered and not model.centered


def test_train_step_benchmark_writes_json_with_the_machine(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "train_step.py"
    res = subprocess.run(
        [sys.executable, str(script), "--config", "digits8_ddpmpp_vp", "--batch-size", "4",
         "--steps", "2", "--warmup", "0", "--set", "model.nf=16", "--set", "model.ch_mult=[1, 2]",
         "--out", str(tmp_path), "--name", "bench.json"],
        capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads((tmp_path / "bench.json").read_text())
    r = out["results"][0]
    assert out["machine"]["device"] == "cpu" and out["machine"]["cpu"]
    assert r["images_per_s"] > 0 and r["flops_per_step"] > 0 and 0 < r["mfu"] < 1.5


@pytest.mark.parametrize(("argv", "message"), [
    (["likelihood", "--checkpoint", "x.json", "--tol", "-1"], "--tol: must be a finite number > 0"),
    (["likelihood", "--checkpoint", "x.json", "--tol", "0"], "--tol: must be a finite number > 0"),
    (["eval", "--checkpoint", "x.json", "--tol", "nan"], "--tol: must be a finite number > 0"),
    (["sample", "--checkpoint", "x.json", "--steps", "0"], "--steps: must be at least 1, got 0"),
    (["sample", "--checkpoint", "x.json", "--n", "-3"], "--n: must be at least 1, got -3"),
    (["eval", "--checkpoint", "x.json", "--num-samples", "0"], "--num-samples: must be at least 1"),
    (["eval", "--checkpoint", "x.json", "--batch-size", "0"], "--batch-size: must be at least 1"),
    (["eval", "--checkpoint", "x.json", "--draws", "two"], "--draws: 'two' is not an integer"),
    (["likelihood", "--checkpoint", "x.json", "--n", "0"], "--n: must be at least 1"),
])
def test_cli_refuses_non_positive_counts_and_tolerances_in_one_line(argv, message, capsys):
    """`--steps 0` and `--num-samples 0` used to fall back to the config silently, and
    `likelihood --tol -1` to exit 0 with nonsense: now argparse refuses them before any work."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err

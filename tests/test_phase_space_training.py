"""Phase-space models through the one trainer: CLD (momentum head, mixed score, HSM) and PSLD
(whole-state head, DSM with m0 drawn per step) keep every guarantee of a score-model run:
bitwise resume after kill -9, 2-process DDP equal to one process, sampling with SSCS and
quadratic striding from the CLI."""

import json
import subprocess
import sys

import pytest
import torch
from test_train import ENV, _cli, _kill_and_resume, ddp_two_processes_equal_one_process

from lsgm_edu.configs import ConfigError, load_config
from lsgm_edu.data import shipped_file
from lsgm_edu.objectives import DSM, Batch, BatchGenerator
from lsgm_edu.train import init_model, score_model_of

# digits8 is 1 x 8 x 8: the state (x, m) has 2 channels
CLD_RUN = ["sde={name: cld}", "model.num_channels=2", "model.out_channels=1",
           "train.mixed_score=true", "sampling.method=sscs", "sampling.striding=quadratic",
           "sampling.grid_steps=20"]
PSLD_RUN = ["sde={name: psld}", "model.num_channels=2", "train.hsm=false", "train.reduce_mean=true",
            "sampling.method=em", "sampling.striding=quadratic", "sampling.grid_steps=20"]


def test_phase_space_configs_are_checked_before_compute():
    for extra, message in [
        (["sde={name: cld}"], "model.num_channels=2"),
        (["sde={name: psld}", "model.num_channels=2", "model.out_channels=1"], "whole state"),
        (["sde={name: psld}", "model.num_channels=2", "train.mixed_score=true"], "mixed_score"),
        (["sampling.method=sscs"], "complete recipe"),
        ([*CLD_RUN, "sampling.method=ode"], "striding"),
        ([*CLD_RUN[1:], "sde={name: cld, factorization: upper}"], "whole state"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config("digits8_ddpmpp_vp", extra)


def _objective(extra):
    cfg = load_config("digits8_ddpmpp_vp", ["model.nf=16", "model.ch_mult=[1, 2]", "model.num_res_blocks=1",
                                                "model.dropout=0.0", *extra])
    from lsgm_edu.train import build_sde

    sde = build_sde(cfg.sde)
    return cfg, sde, DSM.from_config(cfg, sde), init_model(cfg)


@pytest.mark.parametrize("run", [CLD_RUN, [*PSLD_RUN, "train.likelihood_weighting=true"]],
                         ids=["cld", "psld-likelihood"])
def test_bf16_autocast_losses_stay_finite_and_close_down_to_t_1e5(run):
    """The references' fp16 runs hit inf (CLD-SGM issue #3): 1 / L_t reaches ~1e2 per entry
    and the likelihood weights far more as t -> 0. Here the kernel and the score scale are float64
    and cast once; under bf16 autocast (on the CPU, as on CUDA) the per-sample losses at t from
    1e-5 to 1 stay finite and within bf16's rounding of the fp32 ones, where fp16 autocast gives
    nan (CLD) or inf (PSLD, likelihood weighting) at t = 1e-5 and 1e-4."""
    cfg, sde, objective, net = _objective(run)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(6, 1, 8, 8, generator=g) * 2 - 1
    t = torch.tensor([1e-5, 1e-4, 1e-3, 0.01, 0.3, 1.0])
    z = torch.randn(6, 2, 8, 8, generator=g)
    m0 = None if cfg.train.hsm else sde.lift(x, noise=torch.randn(6, 2, 8, 8, generator=g))[:, 1:]
    model = score_model_of(net, sde, cfg)
    fp32 = objective.loss(model, x, t, z, m0=m0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = objective.loss(model, x, t, z, m0=m0)
    assert torch.isfinite(bf16).all() and bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, fp32, rtol=0.1, atol=1e-4)  # t = 1: CLD losses ~1e-6
    with torch.autocast("cpu", dtype=torch.float16):  # the references' precision: nan / inf
        fp16 = objective.loss(model, x, t, z, m0=m0)
    assert not torch.isfinite(fp16[:2]).any() and torch.isfinite(fp16[3:]).all()


def test_cld_objective_is_the_momentum_eps_loss_and_psld_draws_m0():
    cfg, sde, objective, net = _objective(CLD_RUN)
    assert objective.weighting.components == (1,) and objective.mixed_score
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    gen = BatchGenerator(torch.Generator().manual_seed(0), 4)
    loss, _ = objective({"score": net}, Batch(x), gen)
    # the same draws by hand: t, then the state noise; loss = 1/2 |eps_m_hat - eps_m|^2
    g = torch.Generator().manual_seed(0)
    t = objective.t_sampler.sample(4, g, dtype=torch.float32)
    eps = torch.randn(4, 2, 8, 8, generator=g)
    z = sde.kernel(x, t).sample(eps)
    eps_hat = score_model_of(net, sde, cfg).eps(z, t)
    per_element = 64 if cfg.train.reduce_mean else 1  # reduce_mean: a mean over the 64 of ε_m
    expected = 0.5 * (eps_hat[:, 1:] - eps[:, 1:]).pow(2).sum((1, 2, 3)) / per_element
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    cfg, sde, objective, net = _objective(PSLD_RUN)
    assert objective.weighting.components is None and not objective.hsm
    a, _ = objective({"score": net}, Batch(x), BatchGenerator(torch.Generator().manual_seed(0), 4))
    objective.hsm = True
    b, _ = objective({"score": net}, Batch(x), BatchGenerator(torch.Generator().manual_seed(0), 4))
    assert not torch.allclose(a, b)  # DSM's kernel is conditioned on a drawn m0


@pytest.mark.slow
@pytest.mark.parametrize("run", [CLD_RUN, PSLD_RUN], ids=["cld", "psld"])
def test_phase_space_run_resumes_exactly_after_kill9(tmp_path, replay_seed, run):
    tensors = _kill_and_resume(lambda out, resume: _cli(out, 120, 10, *run, resume=resume),
                               tmp_path, 120, 10, replay_seed, (15, 90))
    assert {k.split("/")[0] for k in tensors if k != "step"} == {"score", "ema", "opt"}


def test_phase_space_ddp_two_processes_equal_one_process(tmp_path):
    ddp_two_processes_equal_one_process(tmp_path, "model.dropout=0.0", *PSLD_RUN)


def test_cli_samples_a_cld_run_with_sscs(tmp_path):
    """Train a few steps, then `sample` with the config's SSCS and quadratic striding: images of
    the data's shape (the projection of the state), finite, NFE = steps."""
    out = tmp_path / "run"
    subprocess.run(_cli(out, 4, 4, *CLD_RUN), check=True, env=ENV, capture_output=True)
    ckpt_json = max((out / "checkpoints").glob("*.json"))
    res = subprocess.run([sys.executable, "-m", "lsgm_edu", "sample", "--checkpoint", str(ckpt_json),
                          "--n", "4", "--steps", "6", "--out", str(tmp_path / "s.png")],
                         check=False, env=ENV, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert (tmp_path / "s.png").exists()


@pytest.mark.parametrize("name", ["mnist28_ddpmpp_vp", "lsgm_mnist_book"])
def test_cli_refuses_sscs_for_a_vp_model_in_one_line(name, capsys):
    from lsgm_edu.__main__ import main

    ckpt_json = str(shipped_file(f"checkpoints/{name}.json"))
    assert main(["sample", "--checkpoint", ckpt_json, "--method", "sscs", "--n", "2",
                 "--out", "unused.png"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--method sscs does not fit this checkpoint" in err
    assert "complete recipe" in err


@pytest.mark.parametrize("name", ["mnist28_cld", "mnist28_psld"])
def test_shipped_book_models_load_sample_and_beat_their_initialization(name):
    """The shipped MNIST CLD / PSLD models: the state network loads, SSCS gives digits of the
    data's shape, and their HSM loss on test digits is far below the untrained network's."""
    from lsgm_edu import data
    from lsgm_edu.samplers import sscs
    from lsgm_edu.train import load_score_model

    model, cfg = load_score_model(data.shipped_file(f"checkpoints/{name}.json"))
    assert cfg.name == name and model.sde.K == 2 and "classifier_fid" in json.loads(
        data.shipped_file(f"checkpoints/{name}.json").read_text())["evaluation"]
    z = sscs(model.sde, model, (4, 2, 28, 28), 10, generator=torch.Generator().manual_seed(0),
             striding="quadratic")
    assert z.shape == (4, 2, 28, 28) and bool(torch.isfinite(z).all())
    ds = data.load_dataset("mnist5k", "test")
    x = data.dequantize(ds.data[:64], 256, torch.Generator().manual_seed(1), data_range=(-1.0, 1.0))
    objective = DSM.from_config(cfg, model.sde)

    def loss(net):
        gen = BatchGenerator(torch.Generator().manual_seed(2), 64)
        with torch.no_grad():
            return objective({"score": net}, Batch(x), gen)[0].mean().item()

    trained, untrained = loss(model.net), loss(init_model(cfg))
    # PSLD: 0.0037 vs 0.50; CLD 0.0044 vs 0.038 (its mixed score's Normal part already helps)
    assert trained < 0.2 * untrained, (trained, untrained)

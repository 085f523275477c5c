"""LSGM through the config, the trainer and the command line: paper-size configs with the
reference's parameter counts, the two stages, per-model losses, exact resume (also after
kill -9), the NaN stop, binarized batches, and the NLL evaluation."""

from __future__ import annotations

import copy
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lsgm_edu import checkpoint as ckpt
from lsgm_edu import data as data_module
from lsgm_edu import lsgm
from lsgm_edu.__main__ import main
from lsgm_edu.configs import ConfigError, config_from_dict, load_config
from lsgm_edu.nets import build_model
from lsgm_edu.objectives import Batch, BatchGenerator
from lsgm_edu.train import (
    ModelSpec,
    TrainingDiverged,
    TrainState,
    lsgm_setup,
    read_log,
    seeded_generator,
    stage_config,
    train,
    train_step,
    training_setup,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import ENV, TORCHRUN, _final_tensors, _kill_and_resume

# An LSGM small enough for every code path in seconds: 8x8 binarized digits, a VAE with two
# latent scales (the score prior models the 4x2x2 top scale, the 4x4 groups keep N(0, I)).
TINY = {
    "name": "lsgm_tiny",
    "model": {
        "name": "lsgm",
        "vae": {"image_size": 8, "num_channels": 1, "num_channels_enc": 8, "num_channels_dec": 8,
                "num_preprocess_blocks": 1, "num_preprocess_cells": 1,
                "num_postprocess_blocks": 1, "num_postprocess_cells": 1,
                "num_latent_scales": 2, "num_groups_per_scale": 2, "num_latent_per_group": 2,
                "num_cell_per_cond_enc": 1, "num_cell_per_cond_dec": 1, "ch_mult": [1, 1, 2],
                "cell_type": "res_bnswish", "use_se": True, "decoder": "bernoulli"},
        "sgm": {"arch": "ncsnpp", "image_size": 2, "num_channels": 4, "nf": 8, "ch_mult": [1],
                "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0, "fir": False,
                "resblock_type": "biggan", "progressive": "none", "progressive_input": "none",
                "embedding_type": "positional", "embedding_dim": 8},
        "mixing_logit_init": -3.0,
    },
    "sde": {"name": "vp"},
    "data": {"dataset": "binarized_digits8x8", "random_flip": False, "centered": False,
             "dequantize": False},
    "train": {"n_iters": 6, "batch_size": 8, "lr": 1e-3, "warmup": 2, "grad_clip": 1.0,
              "ema_rate": 0.9, "log_every": 1, "sample_every": 1000000, "ckpt_every": 3},
    "lsgm": {"vae_pretrain_iters": 6, "vae_pretrain_batch_size": 8, "iw_sample_p": "ll_iw",
             "weight_decay_norm_sgm": 1e-3},
}


def tiny(**sections):
    tree = copy.deepcopy(TINY)
    for section, changes in sections.items():
        tree[section].update(changes)
    return config_from_dict(tree, name="lsgm_tiny")


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# --- configs ---------------------------------------------------------------------------------

# (VAE, score prior, top latent) of NVlabs/LSGM's classes with the README settings
# (../shared/REFERENCE_LSGM_PSLD.md §E).
PAPER = {
    "lsgm_cifar10_fid": (100_867_740, 375_561_064, (180, 16, 16)),
    "lsgm_cifar10_balanced": (100_867_740, 375_561_064, (180, 16, 16)),
    "lsgm_cifar10_nll": (130_622_772, 375_561_064, (180, 16, 16)),
    "lsgm_mnist": (3_005_822, 63_774_544, (40, 8, 8)),
    "lsgm_omniglot": (5_384_190, 97_804_152, (60, 16, 16)),
    "lsgm_celebahq256": (51_296_572, 408_367_680, (160, 32, 32)),
}


@pytest.mark.parametrize("name", list(PAPER))
def test_paper_configs_have_the_reference_parameter_counts(name):
    cfg = load_config(name)
    with torch.device("meta"):
        models = build_model(cfg.model)
    vae, sgm, latent = PAPER[name]
    assert set(models) == {"vae", "sgm"}
    assert (n_params(models["vae"]), n_params(models["sgm"])) == (vae, sgm)
    assert cfg.model.vae.top_latent_shape == latent
    assert models["sgm"].mixing_logit.shape == (1, latent[0], 1, 1)


@pytest.mark.slow
@pytest.mark.parametrize("name", [  # CIFAR-10 and CelebA-HQ: ~0.5 B parameters, `make test-heavy`
    pytest.param(n, marks=pytest.mark.heavy) if n.startswith(("lsgm_cifar10", "lsgm_celebahq"))
    else n for n in PAPER])
def test_paper_size_lsgm_runs_a_forward_and_backward_at_batch_one(name):
    """Both losses of the end-to-end objective, and a gradient for every parameter. (Spectral
    regularization is off: its power iterations cost more than the model on a CPU; tests/
    test_vae.py checks it.)"""
    cfg = load_config(name, ["lsgm.weight_decay_norm_vae=0", "lsgm.weight_decay_norm_sgm=0"])
    setup = training_setup(cfg, "lsgm")
    models = {n: spec.module for n, spec in setup.models.items()}
    c, size = cfg.model.vae.num_channels, cfg.model.vae.image_size
    x = torch.rand(1, c, size, size, generator=torch.Generator().manual_seed(0))
    if cfg.model.vae.decoder == "bernoulli":
        x = x.round()
    losses, logs = setup.objective(models, Batch(x, None, 0),
                                   BatchGenerator(torch.Generator().manual_seed(1), 1))
    assert all(torch.isfinite(v).all() for v in losses.values())
    for name_, loss in losses.items():
        loss.mean().backward(inputs=list(models[name_].parameters()), retain_graph=True)
    missing = [f"{m}/{p}" for m in models for p, t in models[m].named_parameters()
               if t.grad is None]
    assert not missing, missing[:5]
    assert torch.isfinite(logs["nelbo"]).all()


@pytest.mark.parametrize(("name", "vae_params", "top_latent"), [
    ("lsgm_mnist_book", 151_050, (4, 4, 4)),  # chapter 11's LSGM
    ("vae_mnist_book", 124_034, (20, 8, 8)),  # chapter 10's VAE (KL weight 1)
])
def test_book_configs_are_small_and_their_stages_differ_only_in_the_train_section(
        name, vae_params, top_latent):
    cfg = load_config(name)
    models = build_model(cfg.model)
    assert n_params(models["vae"]) == vae_params and n_params(models["sgm"]) < 1_000_000
    assert models["vae"].config.top_latent_shape == top_latent
    vae_cfg = stage_config(cfg, "vae")
    assert (vae_cfg.train.n_iters, vae_cfg.train.lr) == (cfg.lsgm.vae_pretrain_iters,
                                                          cfg.lsgm.lr_vae_pretrain)
    assert vae_cfg.model == cfg.model and stage_config(cfg, "lsgm") is cfg


@pytest.mark.parametrize(("section", "change", "message"), [
    ("model", {"sgm": {**TINY["model"]["sgm"], "num_channels": 3}}, "sgm.num_channels=4"),
    ("data", {"centered": True}, "data.centered"),
    ("sde", {"name": "ve"}, "VP-type"),
    ("lsgm", {"time_eps": 0.0}, "lsgm.time_eps"),
    ("lsgm", {"iw_sample_p": "ll_iww"}, "lsgm.iw_sample_p"),
    ("lsgm", {"lr_vae": 0.0}, "lsgm.lr_vae"),
    ("lsgm", {"inactive_batches": 0}, "lsgm.inactive_batches"),
    ("lsgm", {"disjoint_training": True}, "lsgm.iw_sample_q"),
    ("lsgm", {"disjoint_training": True, "iw_sample_q": "ll_iw", "train_vae": False},
     "lsgm.train_vae"),
])
def test_bad_lsgm_configs_are_refused_naming_the_key(section, change, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        tiny(**{section: change})


def test_stage_is_required_for_an_lsgm_and_refused_for_a_unet():
    with pytest.raises(ConfigError, match="--stage vae"):
        training_setup(tiny(), None)
    with pytest.raises(ConfigError, match="for LSGM configs"):
        stage_config(load_config("digits8_ddpmpp_vp"), "vae")


# --- the trainer -------------------------------------------------------------------------------


def test_cosine_schedule_warms_up_then_anneals_to_its_minimum():
    spec = ModelSpec(torch.nn.Linear(1, 1), lr=1e-2, warmup=10, lr_min=1e-4, total_steps=110)
    assert spec.lr_at(0) == pytest.approx(1e-3) and spec.lr_at(9) == pytest.approx(1e-2)
    assert spec.lr_at(60) == pytest.approx((1e-2 + 1e-4) / 2)  # half way: the mean
    assert spec.lr_at(110) == pytest.approx(1e-4) and spec.lr_at(500) == pytest.approx(1e-4)
    lrs = [spec.lr_at(s) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))  # monotone after the warmup


def _batch(cfg, step=0):
    ds = data_module.load_dataset(cfg.data.dataset, "train")
    x = data_module.binarize(torch.stack([ds[i][0] for i in range(8)]), ds.num_levels,
                             torch.Generator().manual_seed(step))
    return Batch(x, None, step)


def test_each_model_descends_its_own_loss():
    # no clipping (it rescales .grad), no spectral term (its power iteration is stateful)
    cfg = tiny(train={"grad_clip": 0.0}, lsgm={"weight_decay_norm_vae": 0.0})
    setup = lsgm_setup(cfg)
    state = TrainState(setup.models)
    batch = _batch(cfg, step=1)

    def generator():
        return BatchGenerator(seeded_generator(0, 5), 8)

    before = {n: copy.deepcopy(m.state_dict()) for n, m in state.modules.items()}
    losses, _ = setup.objective(state.forward, batch, generator())
    vae_params, sgm_params = (list(state.modules[n].parameters()) for n in ("vae", "sgm"))
    want_vae = torch.autograd.grad(losses["vae"].mean(), vae_params, retain_graph=True)
    want_sgm = torch.autograd.grad(losses["sgm"].mean(), sgm_params, retain_graph=True)
    leak = torch.autograd.grad(losses["sgm"].mean(), vae_params, allow_unused=True)
    assert max(g.abs().max().item() for g in leak if g is not None) > 0  # p does depend on the VAE
    for n, m in state.modules.items():  # same forward again (BN statistics are batch-wise)
        m.load_state_dict(before[n])
    train_step(state, setup.objective, batch, generator(), step=1)
    for p, g in zip(vae_params, want_vae):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
    for p, g in zip(sgm_params, want_sgm):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)


def test_disjoint_training_draws_independent_t_and_noise_and_detaches_the_prior_input(
        monkeypatch):
    """Algorithm 2 (--disjoint_training): the SGM's (t, ε) and the VAE's are independent draws and
    the SGM learns on the detached z0; the joint step with iw_sample_q ll_iw shares ε."""
    calls = []
    inner = lsgm.denoising_error

    def recording(sde, eps_fn, z0, t, noise):
        calls.append((z0.requires_grad, t.clone(), noise.clone()))
        return inner(sde, eps_fn, z0, t, noise)

    monkeypatch.setattr(lsgm, "denoising_error", recording)
    for disjoint in (False, True):
        cfg = tiny(lsgm={"iw_sample_q": "ll_iw", "disjoint_training": disjoint})
        setup = lsgm_setup(cfg)
        state = TrainState(setup.models)
        calls.clear()
        losses, logs = setup.objective(state.forward, _batch(cfg, step=1),
                                       BatchGenerator(seeded_generator(0, 5), 8))
        (p_grad, t_p, noise_p), (_, t_q, noise_q) = calls
        assert not torch.equal(t_p, t_q)  # ll_iw draws the VAE's own t in both modes
        assert torch.equal(noise_p, noise_q) is not disjoint
        assert p_grad is not disjoint  # the prior's input is detached only when disjoint
        leak = torch.autograd.grad(losses["sgm"].mean(), list(state.modules["vae"].parameters()),
                                   allow_unused=True)
        assert any(g is not None for g in leak) is not disjoint
        assert torch.isfinite(losses["vae"]).all() and torch.isfinite(logs["nelbo"]).all()


def test_trainer_binarizes_afresh_every_step(tmp_path):
    seen = []

    def spy(models, batch, generator):
        seen.append(batch.x.clone())
        return inner(models, batch, generator)

    cfg = tiny(train={"n_iters": 3, "ckpt_every": 3})
    setup = training_setup(cfg, "lsgm")
    inner, setup.objective = setup.objective, spy
    train(cfg, tmp_path, setup=setup, stage="lsgm", progress=False, log=lambda *_: None)
    assert all(set(x.unique().tolist()) == {0.0, 1.0} for x in seen)
    grey = data_module.load_dataset("digits8x8", "train")
    assert seen[0].shape == (8, *grey[0][0].shape)
    assert not torch.equal(seen[0], seen[1])


def _run(tmp_path, name, cfg, stage="lsgm", **kw):
    return train(cfg, tmp_path / name, stage=stage, progress=False, log=lambda *_: None, **kw)


def _resumed_after_step_3(tmp_path, cfg):
    """A run of `cfg` that stopped after its step-3 checkpoint, resumed to the end."""
    _run(tmp_path, "part", cfg)
    for step, sidecar in ckpt.list_checkpoints(tmp_path / "part" / "checkpoints"):
        if step > 3:
            sidecar.unlink()
            sidecar.with_suffix(".safetensors").unlink()
    return _run(tmp_path, "part", cfg)


def test_both_stages_train_and_resume_exactly(tmp_path):
    vae_run = _run(tmp_path, "vae", tiny(), stage="vae")
    _, meta = ckpt.load_checkpoint(vae_run.checkpoint)
    assert meta["models"] == ["vae"] and not any(k.startswith("ema/") for k in
                                                 ckpt.load_checkpoint(vae_run.checkpoint)[0])
    cfg = tiny(lsgm={"vae_checkpoint": str(vae_run.checkpoint)})
    # the LSGM starts from the stage-vae weights
    start = lsgm_setup(cfg).models["vae"].module.state_dict()
    saved = {k[len("vae/"):]: v for k, v in ckpt.load_checkpoint(vae_run.checkpoint)[0].items()
             if k.startswith("vae/")}
    assert saved.keys() == start.keys()
    assert all(torch.equal(start[k], v) for k, v in saved.items())
    full = _run(tmp_path, "full", cfg)
    resumed = _resumed_after_step_3(tmp_path, cfg)
    a, b = (ckpt.load_checkpoint(r.checkpoint)[0] for r in (full, resumed))
    assert a.keys() == b.keys() and {k.split("/")[0] for k in a} == {"vae", "sgm", "ema", "opt"}
    assert {k.split("/")[1] for k in a if k.startswith("ema/")} == {"sgm"}  # no EMA on the VAE
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert math.isfinite(full.loss)


def test_prior_only_stage_keeps_the_vae_bit_for_bit_and_resumes_exactly(tmp_path):
    """lsgm.train_vae false (the reference without --train_vae): the VAE is frozen in eval mode,
    saved with the run but never updated; the score prior trains and resumes exactly."""
    vae_run = _run(tmp_path, "vae", tiny(), stage="vae")
    cfg = tiny(lsgm={"vae_checkpoint": str(vae_run.checkpoint), "train_vae": False})
    full = _run(tmp_path, "full", cfg)
    vae0 = ckpt.load_checkpoint(vae_run.checkpoint)[0]
    tensors, meta = ckpt.load_checkpoint(full.checkpoint)
    assert meta["models"] == ["vae", "sgm"] and set(meta["optimizers"]) == {"sgm"}
    assert not any(k.startswith(("opt/vae/", "ema/vae/")) for k in tensors)
    # every VAE tensor, BatchNorm statistics included (eval mode), as it was loaded
    assert all(torch.equal(tensors[k], v) for k, v in vae0.items() if k.startswith("vae/"))
    start = lsgm_setup(cfg).models["sgm"].module.state_dict()
    assert any(not torch.equal(tensors["sgm/" + k], v) for k, v in start.items())
    log = read_log(full.log_path)
    assert "grad_norm/vae" not in log and "grad_norm/sgm" in log
    resumed = ckpt.load_checkpoint(_resumed_after_step_3(tmp_path, cfg).checkpoint)[0]
    assert resumed.keys() == tensors.keys()
    assert all(torch.equal(resumed[k], v) for k, v in tensors.items())
    with pytest.raises(ConfigError, match="lsgm.vae_checkpoint"):
        lsgm_setup(tiny(lsgm={"train_vae": False}))


def test_nan_in_the_score_prior_stops_with_the_last_good_checkpoint(tmp_path):
    cfg = tiny()
    setup = training_setup(cfg, "lsgm")
    inner = setup.objective

    def poisoned(models, batch, generator):
        if batch.step == 4:
            with torch.no_grad():
                models["sgm"].mixing_logit.fill_(float("nan"))
        return inner(models, batch, generator)

    setup.objective = poisoned
    with pytest.raises(TrainingDiverged, match=r"step 4: .*step_00000003\.json"):
        train(cfg, tmp_path, setup=setup, stage="lsgm", progress=False, log=lambda *_: None)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "checkpoints")] == [3]


def test_vae_checkpoint_of_another_architecture_is_refused(tmp_path):
    vae_run = _run(tmp_path, "vae", tiny(), stage="vae")
    other = copy.deepcopy(TINY["model"])
    other["vae"]["num_channels_enc"] = 16
    with pytest.raises(ConfigError, match="num_channels_enc: checkpoint 8 vs now 16"):
        lsgm_setup(tiny(model=other, lsgm={"vae_checkpoint": str(vae_run.checkpoint)}))


def test_activation_checkpointing_may_differ_from_the_vae_checkpoint_and_on_resume(tmp_path):
    """model.vae.checkpointing changes memory and time, not the model: a VAE trained without it
    loads into a stage that uses it, and a run resumes with it switched."""
    vae_run = _run(tmp_path, "vae", tiny(), stage="vae")
    model = copy.deepcopy(TINY["model"])
    model["vae"]["checkpointing"] = True
    lsgm_setup(tiny(model=model, lsgm={"vae_checkpoint": str(vae_run.checkpoint)}))
    resumed = _run(tmp_path, "vae", tiny(model=model, lsgm={"vae_pretrain_iters": 8}),
                   stage="vae")
    assert resumed.step == 8


# --- the command line ----------------------------------------------------------------------------


def _config_file(tmp_path, **sections) -> str:
    path = tmp_path / "lsgm_tiny.yaml"
    path.write_text(yaml.safe_dump(json.loads(json.dumps(tiny(**sections).to_dict()))))
    return str(path)


def test_cli_trains_both_stages_then_samples_and_evaluates_the_bound(tmp_path, capsys):
    config = _config_file(tmp_path)
    vae_out, lsgm_out = tmp_path / "vae", tmp_path / "lsgm"
    assert main(["train", "--config", config, "--out", str(vae_out), "--no-progress"]) == 2
    assert "--stage vae" in capsys.readouterr().err
    assert main(["train", "--config", config, "--stage", "vae", "--out", str(vae_out),
                 "--no-progress"]) == 0
    vae_ckpt = ckpt.list_checkpoints(vae_out / "checkpoints")[-1][1]
    assert main(["train", "--config", config, "--stage", "lsgm", "--out", str(lsgm_out),
                 "--vae-checkpoint", str(vae_ckpt), "--no-progress"]) == 0
    lsgm_ckpt = ckpt.list_checkpoints(lsgm_out / "checkpoints")[-1][1]
    capsys.readouterr()
    results = {}
    for name, path in (("vae", vae_ckpt), ("lsgm", lsgm_ckpt)):
        out = tmp_path / f"{name}.json"
        assert main(["eval", "--metric", "nll", "--checkpoint", str(path), "--num-samples", "6",
                     "--batch-size", "3", "--json", str(out)]) == 0
        results[name] = json.loads(out.read_text())
    for r in results.values():
        assert {"nll_nats", "nll_sem", "bpd", "nfe"} <= r.keys()
        assert r["nll_nats"] > 0 and r["nll_sem"] > 0
        assert r["bpd"] == pytest.approx(r["nll_nats"] / (64 * math.log(2)))
    assert results["vae"]["nfe"] == 0 and results["lsgm"]["nfe"] > 0
    out = tmp_path / "ce.json"
    assert main(["eval", "--metric", "nll", "--checkpoint", str(lsgm_ckpt), "--num-samples", "6",
                 "--batch-size", "3", "--estimator", "cross_entropy", "--draws", "3",
                 "--json", str(out)]) == 0
    ce = json.loads(out.read_text())
    assert ce["estimator"] == "cross_entropy" and ce["nfe"] == 3 and "3 draws of t ~ ll_iw" in \
        ce["protocol"] and math.isfinite(ce["nll_nats"])
    assert results["lsgm"]["estimator"] == "ode" and results["vae"]["estimator"] is None
    out = tmp_path / "iw.json"  # the importance-weighted bound: the VAE's, with 16 samples
    assert main(["eval", "--metric", "nll", "--checkpoint", str(vae_ckpt), "--num-samples", "6",
                 "--batch-size", "3", "--iw-samples", "16", "--json", str(out)]) == 0
    iw = json.loads(out.read_text())
    assert iw["iw_samples"] == 16 and "importance-weighted bound with 16" in iw["protocol"]
    assert iw["nll_nats"] < results["vae"]["nll_nats"]  # tighter than the single-sample bound
    assert results["vae"]["iw_samples"] == 1
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # argparse: one line, exit status 2
        main(["eval", "--metric", "nll", "--checkpoint", str(vae_ckpt), "--iw-samples", "0"])
    assert exit_info.value.code == 2
    assert "--iw-samples: must be at least 1, got 0" in capsys.readouterr().err
    png = tmp_path / "s.png"
    assert main(["sample", "--checkpoint", str(lsgm_ckpt), "--n", "4", "--method", "em",
                 "--steps", "5", "--out", str(png)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["nfe"] == 6
    assert png.stat().st_size > 0


@pytest.mark.slow
def test_lsgm_resumes_exactly_after_kill9(tmp_path, replay_seed):
    config = _config_file(tmp_path, train={"n_iters": 60, "ckpt_every": 5})

    def command(out, resume):
        cmd = [sys.executable, "-m", "lsgm_edu", "train", "--config", config, "--stage", "lsgm",
               "--out", str(out), "--no-progress"]
        return cmd + (["--resume"] if resume else [])

    tensors = _kill_and_resume(command, tmp_path, 60, 5, replay_seed, (8, 45))
    # two models, two optimizers, the EMA on the score prior only
    assert {k.split("/")[1] for k in tensors if k.startswith("opt/")} == {"vae", "sgm"}
    assert {k.split("/")[1] for k in tensors if k.startswith("ema/")} == {"sgm"}


@pytest.mark.slow
def test_lsgm_two_processes_equal_one_process(tmp_path):
    """DDP over gloo: batch norms see the global batch (GlobalBatchNorm2d), every random draw is
    made for the global batch, each model's gradient is averaged over processes."""
    config = _config_file(tmp_path, train={"n_iters": 4, "ckpt_every": 4})

    def command(out, launcher):
        return [*launcher, "train", "--config", config, "--stage", "lsgm", "--out", str(out),
                "--no-progress"]

    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(command(one, [sys.executable, "-m", "lsgm_edu"]), check=True, env=ENV,
                   capture_output=True)
    res = subprocess.run(command(two, [*TORCHRUN, "-m", "lsgm_edu"]), check=False, env=ENV,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    a, b = _final_tensors(one), _final_tensors(two)
    assert a.keys() == b.keys()
    worst = {k: (a[k].double() - b[k].double()).abs().max().item() for k in a
             if k != "step" and not k.endswith("/step")}
    assert max(worst.values()) < 1e-5, sorted(worst.items(), key=lambda kv: -kv[1])[:5]
    start = build_model(tiny().model, generator=seeded_generator(0, 0))
    moved = max((a[f"vae/{k}"] - v).abs().max().item()
                for k, v in start["vae"].state_dict().items() if v.is_floating_point())
    assert moved > 1e-3, "the VAE did not train, so the equality would prove nothing"


# --- inactive latent channels (LSGM's --drop_inactive_var) ----------------------------------------


def _vae_with_silent_group(cfg):
    """The tiny LSGM's VAE with top group 0's posterior made N(0, I) whatever x (its KL is 0)."""
    models = build_model(cfg.model, generator=seeded_generator(0, 0), sde=None)
    with torch.no_grad():
        conv = models["vae"].posteriors[0][1]
        conv.weight.zero_()
        conv.bias.zero_()
    return models


def _digits(n=64, seed=0):
    ds = data_module.load_dataset("binarized_digits8x8", "train")
    return data_module.binarize(ds.data[:n], ds.num_levels, seeded_generator(seed, 0))


def test_top_latent_kl_per_channel_sums_to_the_vaes_kl_and_a_silent_group_is_inactive():
    cfg = tiny()
    vae = _vae_with_silent_group(cfg)["vae"].eval()
    x = _digits()
    with torch.no_grad():
        kl = lsgm.top_kl_per_channel(vae, x, seeded_generator(0, 1))
    with torch.no_grad():
        out = vae(x, seeded_generator(0, 1))
    top = vae.groups_per_scale[0]
    assert kl.shape == (64, vae.config.top_latent_shape[0])
    torch.testing.assert_close(kl.sum(1), torch.stack(out.kl[:top]).sum(0))
    per_group = vae.config.num_latent_per_group
    assert (kl[:, :per_group] == 0).all()  # log q = log N(ε; 0, 1) exactly
    mean_kl = kl[:, per_group:].mean(0)
    threshold = float(mean_kl.min()) / 2
    active = lsgm.active_channels(vae, [x[:32], x[32:]], threshold, seeded_generator(0, 1))
    assert active.tolist() == [False] * per_group + [True] * per_group
    assert not lsgm.active_channels(vae, [x], float(mean_kl.max()) + 1).any()
    with pytest.raises(ValueError, match="no images"):
        lsgm.active_channels(vae, [])


def test_drop_inactive_var_switches_channels_off_before_step_zero_in_model_and_ema(tmp_path):
    vae_run = _run(tmp_path, "vae", tiny(), stage="vae")
    logs = []
    cfg = tiny(lsgm={"vae_checkpoint": str(vae_run.checkpoint), "drop_inactive_var": True,
                     "inactive_threshold": 1e9, "inactive_batches": 2})
    result = train(cfg, tmp_path / "lsgm", stage="lsgm", progress=False, log=logs.append)
    assert any("0 of 4 top-latent channels active" in line for line in logs), logs
    tensors, _ = ckpt.load_checkpoint(result.checkpoint)
    for prefix in ("sgm/", "ema/sgm/"):
        assert (tensors[prefix + "is_active"] == 0).all()
        assert (torch.sigmoid(tensors[prefix + "mixing_logit"]) < 1e-6).all()
    # no channel switched off: the run is the one without the option
    kept = tiny(lsgm={"vae_checkpoint": str(vae_run.checkpoint), "drop_inactive_var": True,
                      "inactive_threshold": 0.0})
    plain = tiny(lsgm={"vae_checkpoint": str(vae_run.checkpoint)})
    logs.clear()
    a = ckpt.load_checkpoint(train(kept, tmp_path / "kept", stage="lsgm", progress=False,
                                   log=logs.append).checkpoint)[0]
    assert any("4 of 4 top-latent channels active" in line for line in logs), logs
    b = ckpt.load_checkpoint(_run(tmp_path, "plain", plain).checkpoint)[0]
    assert all(torch.equal(a[k], b[k]) for k in a)

"""Configs: every shipped YAML loads; errors name the key before any compute."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lsgm_edu.configs import ConfigError, available_configs, load_config
from lsgm_edu.nets.unet import UNetConfig
from lsgm_edu.registry import MODELS, SDES
from lsgm_edu.sde import VESDE, VPSDE, SubVPSDE

PAPER = ["cifar10_ddpmpp_vp", "cifar10_ddpmpp_deep_vp", "cifar10_ncsnpp_ve",
         "cifar10_ncsnpp_deep_ve", "celebahq256_ncsnpp_ve"]


def test_every_shipped_config_loads():
    names = available_configs()
    assert set(PAPER) <= set(names)
    for name in names:
        cfg = load_config(name)
        assert cfg.name == name


def test_paper_training_settings():
    """Song et al. 2021, App. D/H: the settings the issue lists."""
    for name in PAPER[:4]:
        cfg = load_config(name)
        t = cfg.train
        assert (t.batch_size, t.lr, t.warmup, t.grad_clip) == (128, 2e-4, 5000, 1.0)
        assert cfg.model.dropout == 0.1
        assert t.ema_rate == (0.9999 if SDES.name_of(cfg.sde) == "vp" else 0.999)
        assert (t.eps, cfg.sampling.eps) == (1e-5, 1e-3 if SDES.name_of(cfg.sde) == "vp" else 1e-5)
    c = load_config("celebahq256_ncsnpp_ve")
    assert (c.train.batch_size, c.model.dropout, c.train.ema_rate, c.sde.sigma_max) == (
        64, 0.0, 0.999, 348.0)


def test_overrides_are_parsed_as_yaml_and_typed():
    cfg = load_config("cifar10_ddpmpp_vp", ["train.batch_size=64", "model.ch_mult=[1, 2]",
                                            "train.lr=1e-4", "data.data_dir=/tmp/x"])
    assert cfg.train.batch_size == 64 and cfg.model.ch_mult == (1, 2)
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.data.data_dir == "/tmp/x"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.batchsize=64", "unknown config key 'train.batchsize' (did you mean 'batch_size'?)"),
        ("trian.lr=1", "unknown config key 'trian'"),
        ("train.batch_size=abc", "train.batch_size: expected an integer, got str 'abc'"),
        ("train.batch_size=6.5", "train.batch_size: expected an integer"),
        ("train.random_flip=yes please", "unknown config key 'train.random_flip'"),
        ("data.random_flip=1", "data.random_flip: expected true/false"),
        ("model.ch_mult=3", "model.ch_mult: expected a list"),
        ("model.image_size=28", "model.image_size"),
        ("model.num_channels=1", "do not fit data.dataset 'cifar10'"),
        ("sde.name=vpp", "sde.name: unknown sde 'vpp' (did you mean 'vp'?); known: vp, subvp, ve"),
        ("sde.beta_mn=1", ("unknown config key 'sde.beta_mn' (did you mean 'beta_min'?); 'vp' is "
                           "lsgm_edu.sde.VPSDE(beta_min, beta_max, N)")),
        ("sde.name=ve", "unknown config key 'sde.beta_min'"),
        ("sde.N=1.5", "sde.N: expected an integer, got float 1.5"),
        ("sde.beta_max=-1", "sde: VPSDE: beta_max must be >= beta_min"),
        ("sde.sigma_max=50", "unknown config key 'sde.sigma_max'"),
        ("sde=3", "sde: expected a mapping with a 'name' (one of vp, subvp, ve, geometric_vp, cld, psld)"),
        ("model.name=ddpm", "model.name: unknown model 'ddpm'"),
        ("model.arch=ddpm", "model.arch: must be one of"),
        ("sampling.eps=0", "train.eps and sampling.eps must be in (0, 1)"),
        ("train.ema_rate=1.5", "train.ema_rate must be in [0, 1)"),
        ("data.dataset=imagenet", "data.dataset: unknown dataset 'imagenet'"),
        ("train.lr", "must look like section.key=value"),
    ],
)
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("cifar10_ddpmpp_vp", [override])
    assert message in str(e.value)


def test_impossible_model_shape_is_caught_at_load():
    with pytest.raises(ConfigError, match="image_size"):
        load_config("cifar10_ddpmpp_vp", ["model.ch_mult=[1, 2, 2, 2, 2, 2, 2]"])


def test_unknown_config_name_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match="cifar10_ddpmpp_vp"):
        load_config("cifar10_ddpm")


def test_cli_reports_config_error_before_compute(tmp_path):
    out = tmp_path / "run"
    res = subprocess.run(
        [sys.executable, "-m", "lsgm_edu", "train", "--config", "cifar10_ddpmpp_vp", "--out",
         str(out), "--set", "train.lerning_rate=1"],
        capture_output=True, text=True, check=False)
    assert res.returncode == 2
    assert "unknown config key 'train.lerning_rate'" in res.stderr
    assert not out.exists()


def test_parts_are_built_from_their_registered_classes():
    cfg = load_config("celebahq256_ncsnpp_ve")
    sde = SDES.build(cfg.sde)
    assert isinstance(sde, VESDE) and (sde.sigma_max, sde.N) == (348.0, 2000)
    assert isinstance(cfg.model, UNetConfig) and MODELS.name_of(cfg.model) == "unet"
    assert cfg.to_dict()["sde"] == {"name": "ve", "sigma_min": 0.01, "sigma_max": 348.0, "N": 2000}
    assert cfg.to_dict()["model"]["name"] == "unet" and cfg.to_dict()["model"]["arch"] == "ncsnpp"
    sub = load_config("cifar10_ddpmpp_vp", ["sde.name=subvp", "sde.beta_max=10"])
    assert type(SDES.build(sub.sde)) is SubVPSDE and sub.sde.beta_max == 10.0
    # switching to an SDE with other parameters replaces the whole section
    ve = load_config("cifar10_ddpmpp_vp", ["sde={name: ve, sigma_max: 60}"])
    assert isinstance(SDES.build(ve.sde), VESDE) and ve.sde.sigma_max == 60.0
    assert isinstance(SDES.build(load_config("digits8_ddpmpp_vp").sde), VPSDE)


def test_switching_sde_by_name_alone_says_how_to_replace_the_section():
    with pytest.raises(ConfigError, match=r"replace the whole section, e.g. --set 'sde=\{name: ve\}'"):
        load_config("cifar10_ddpmpp_vp", ["sde.name=ve"])


def test_cli_lists_configs_and_converts_the_first_format(tmp_path):
    res = subprocess.run([sys.executable, "-m", "lsgm_edu", "configs"], capture_output=True,
                         text=True, check=True)
    assert "cifar10_ncsnpp_ve" in res.stdout and "sde=ve" in res.stdout
    old = tmp_path / "old.yaml"
    old.write_text("model: {name: ddpmpp, image_size: 8, num_channels: 1, nf: 16, "
                   "ch_mult: [1, 2], attn_resolutions: [4]}\n"
                   "sde: {name: vpsde, beta_max: 10.0, sigma_max: 50.0, eps: 1.0e-4}\n"
                   "data: {dataset: digits8x8}\n")
    res = subprocess.run([sys.executable, "-m", "lsgm_edu", "configs", "--convert", str(old)],
                         capture_output=True, text=True, check=True)
    import yaml

    new = yaml.safe_load(res.stdout)
    assert new["sde"] == {"name": "vp", "beta_min": 0.1, "beta_max": 10.0, "N": 1000}
    assert new["model"]["name"] == "unet" and new["model"]["arch"] == "ddpmpp"
    assert new["train"]["eps"] == 1e-4

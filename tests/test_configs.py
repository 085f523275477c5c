"""Configs: every shipped YAML loads; errors name the key before any compute."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lsgm_edu.configs import ConfigError, available_configs, load_config

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
        assert t.ema_rate == (0.9999 if cfg.sde.name == "vpsde" else 0.999)
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
        ("sde.name=vp", "sde.name: 'vp' is not one of vpsde, subvpsde, vesde"),
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

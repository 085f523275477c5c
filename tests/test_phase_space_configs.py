"""The phase-space paper configs (CLD and PSLD) against the sizes of the reference networks.

Oracles: the trainable parameter counts of the reference classes built on CPU with the launch
scripts' settings (nv-tlabs/CLD-SGM `NCSNpp`, mandt-lab/PSLD `NCSNpp`; their 128 frozen Gaussian
Fourier frequencies are a frozen nn.Parameter there and a buffer here, so they are left out of
both sides), and the shipped mnist28_ddpmpp_vp checkpoint, whose state-dict keys and shapes were
written before `UNetConfig.out_channels` existed. Paper-size passes run at batch 1 on CPU.
"""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch
import yaml

from lsgm_edu.checkpoint import load_checkpoint
from lsgm_edu.configs import CONFIG_DIR, load_config
from lsgm_edu.data import shipped_file
from lsgm_edu.nets import UNet, UNetConfig, build_model
from lsgm_edu.phase_space import CLD, PSLD
from lsgm_edu.registry import SDES

# name: (trainable parameters of the reference net, output channels, image side)
REFERENCE = {
    "cifar10_psld": (97_627_782, 6, 32),  # PSLD sota CIFAR-10, "97M" (PSLD Tables 1-2)
    "cifar10_cld": (107_593_859, 3, 32),  # CLD CIFAR-10, "108M" (PSLD Table 1)
    "celeba64_psld": (62_769_158, 6, 64),  # PSLD sota CelebA-64 (PSLD Table 3)
}
SLOW = {"cifar10_cld"}  # ~30 s forward+backward on 2 CPU cores (8 blocks at 32x32 and 16x16)


def _yaml(name: str) -> dict:
    with open(CONFIG_DIR / f"{name}.yaml") as f:
        return yaml.safe_load(f)


def _model_config(name: str) -> UNetConfig:
    """The YAML's model section as a UNetConfig (the architecture alone, whatever the loader's
    cross-checks between sections say)."""
    section = dict(_yaml(name)["model"])
    assert section.pop("name") == "unet"
    return UNetConfig(**section)


def _trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------- the configs


@pytest.mark.parametrize("name", list(REFERENCE))
def test_config_loads_with_the_reference_settings(name):
    cfg = load_config(name)
    assert cfg.model == _model_config(name)
    sde = SDES.build(cfg.sde)
    t = cfg.train
    assert (t.lr, t.grad_clip, t.ema_rate, t.batch_size, t.eps) == (2e-4, 1.0, 0.9999, 128, 1e-5)
    assert (t.beta1, t.beta2, t.weight_decay, t.precision) == (0.9, 0.999, 0.0, "fp32")
    assert (cfg.data.centered, cfg.data.random_flip, cfg.data.dequantize) == (True, True, False)
    assert cfg.sampling.eps == 1e-3
    # the net reads the whole state (x, m) of the data
    c, h, w = (3, REFERENCE[name][2], REFERENCE[name][2])
    assert sde.state_shape((1, c, h, w)) == (1, cfg.model.num_channels, h, w)
    if name == "cifar10_cld":
        assert type(sde) is CLD and (sde.beta_min, sde.m_inv, sde.gamma) == (4.0, 4.0, 0.04)
        assert (t.warmup, t.n_iters, t.reduce_mean) == (100_000, 800_000, False)
    else:
        Gamma = 0.01 if name == "cifar10_psld" else 0.005
        assert type(sde) is PSLD and (sde.beta_min, sde.Gamma, sde.nu, sde.kappa) == (
            8.0, Gamma, 4 + Gamma, 0.04)
        assert sde.m_inv == pytest.approx(4.0)
        assert (t.warmup, t.reduce_mean) == (5000, True)
        # 2500 epochs of 50,000 / 500 epochs of 202,599 at 16 per GPU x 8, drop_last
        assert t.n_iters == (2500 * 390 if name == "cifar10_psld" else 500 * 1582)
    assert sde.numerical_eps == 1e-9


def test_model_sections_follow_the_launch_scripts():
    psld, cld, celeba = (_model_config(n) for n in REFERENCE)
    for cfg in (psld, cld, celeba):
        assert (cfg.arch, cfg.nf, cfg.attn_resolutions, cfg.num_channels) == (
            "ncsnpp", 128, (16,), 6)
        assert (cfg.fir, cfg.resblock_type, cfg.progressive, cfg.progressive_input) == (
            True, "biggan", "none", "residual")
        assert (cfg.embedding_type, cfg.fourier_scale, cfg.embedding_dim) == ("fourier", 16.0, 0)
        assert cfg.skip_rescale and cfg.init_scale == 0.0
    assert (psld.ch_mult, psld.num_res_blocks, psld.dropout, psld.out_channels) == (
        (2, 2, 2), 8, 0.15, 6)
    assert (cld.ch_mult, cld.num_res_blocks, cld.dropout, cld.out_channels) == (
        (1, 2, 2, 2), 8, 0.1, 3)
    assert (celeba.ch_mult, celeba.num_res_blocks, celeba.dropout, celeba.out_channels) == (
        (1, 2, 2, 2), 4, 0.1, 6)
    assert celeba.image_size == 64 and _yaml("celeba64_psld")["data"]["dataset"] == "celeba64"


@pytest.mark.parametrize("name", list(REFERENCE))
def test_parameter_count_matches_the_reference(name):
    model = build_model(_model_config(name))
    trainable, ref = _trainable(model), REFERENCE[name][0]
    frozen = model.fourier.W.numel()
    print(f"{name}: {trainable:,} trainable (+{frozen} Fourier frequencies, a buffer); "
          f"reference {ref:,}; diff {trainable - ref:+,}")
    assert frozen == 128 and not any(p is model.fourier.W for p in model.parameters())
    assert trainable == ref


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in REFERENCE])
def test_forward_backward_batch1(name):
    cfg = _model_config(name)
    _, out_ch, side = REFERENCE[name]
    model = UNet(cfg).train()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 6, side, side, generator=g)
    t = torch.tensor([1e-5]) + (1 - 1e-5) * torch.rand(1, generator=g)  # t in (1e-5, 1]
    start = time.perf_counter()
    out = model(z, torch.log(t))  # the references' noise label: log t
    out.square().sum().backward()
    print(f"{name}: forward+backward {time.perf_counter() - start:.1f} s "
          f"({torch.get_num_threads()} threads)")
    assert out.shape == (1, out_ch, side, side) and torch.isfinite(out).all()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname


# ------------------------------------------------------------------------- out_channels


def test_out_channels_zero_keeps_the_shipped_checkpoint_layout():
    """A checkpoint written before out_channels existed loads into the same keys and shapes."""
    tensors, meta = load_checkpoint(shipped_file("checkpoints/mnist28_ddpmpp_vp.safetensors"))
    section = dict(meta["config"]["model"])
    section.pop("name")
    assert "out_channels" not in section
    cfg = UNetConfig(**section)
    assert cfg.out_channels == 0 and cfg.output_channels == cfg.num_channels
    prefix = "ema/score/"
    saved = {k[len(prefix):]: tuple(v.shape) for k, v in tensors.items() if k.startswith(prefix)}
    state = {k: tuple(v.shape) for k, v in UNet(cfg).state_dict().items()}
    assert saved == state


@pytest.mark.parametrize("progressive", ["none", "output_skip", "residual"])
def test_out_channels_sets_every_output_path(progressive):
    base = UNetConfig(image_size=8, num_channels=4, nf=8, ch_mult=(1, 2), num_res_blocks=1,
                      attn_resolutions=(4,), dropout=0.0, progressive=progressive,
                      progressive_input="input_skip" if progressive == "output_skip" else "residual")
    same = dataclasses.replace(base, out_channels=4)
    a, b = UNet(base, generator=1), UNet(same, generator=1)
    # out_channels = num_channels is out_channels = 0: same keys, shapes and weights
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.zeros(2)
    assert a(x, t).shape == x.shape
    narrow = UNet(dataclasses.replace(base, out_channels=2), generator=1)
    assert narrow(x, t).shape == (2, 2, 8, 8)
    changed = {k for k, v in narrow.state_dict().items() if v.shape != a.state_dict()[k].shape}
    # only the layers that write the output change: conv_out, or the output_skip pyramid
    assert changed and all("conv_out" in k or "pyramid_conv" in k for k in changed), changed
    if progressive == "output_skip":
        assert not hasattr(narrow, "conv_out") and len(changed) == 2 * len(narrow.up)


@pytest.mark.parametrize("value", [-1, 1.5, True, "3"])
def test_out_channels_is_validated(value):
    with pytest.raises(ValueError, match="UNetConfig.out_channels: must be an int >= 0"):
        UNetConfig(out_channels=value)

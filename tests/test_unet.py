"""DDPM++ / NCSN++ (lsgm_edu.nets.unet, .layers) against score_sde's sizes and independent oracles.

Oracles: the parameter counts of score_sde's own `NCSNpp` for the paper configs; a loop-by-loop
NumPy `upfirdn`; the unfused resampling + conv compositions; a softmax(QK^T/sqrt(C))V written with
einsum, as score_sde's `AttnBlockpp`. Paper-size forward/backward passes run at batch 1.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lsgm_edu.configs import load_config
from lsgm_edu.nets import UNet, UNetConfig, build_model
from lsgm_edu.nets import unet as unet_module
from lsgm_edu.nets.layers import (
    AttnBlock,
    conv_downsample_2d,
    downsample_2d,
    fir_kernel_2d,
    init_weights,
    timestep_embedding,
    upfirdn2d,
    upsample_2d,
    upsample_conv_2d,
    variance_scaling_,
)

# The shipped YAML configs are the source of truth: their model sections are what is tested.
PAPER_CONFIGS = {n: load_config(n).model for n in (
    "cifar10_ddpmpp_vp", "cifar10_ddpmpp_deep_vp", "cifar10_ncsnpp_ve", "cifar10_ncsnpp_deep_ve",
    "celebahq256_ncsnpp_ve")}
BOOK_CONFIGS = {"mnist28_ddpmpp": load_config("mnist28_ddpmpp_vp").model,
                "digits8_ddpmpp": load_config("digits8_ddpmpp_vp").model}

# sum(p.numel() for p in NCSNpp(config).parameters()) in yang-song/score_sde_pytorch; score_sde
# keeps the nf Gaussian Fourier frequencies as a frozen nn.Parameter, lsgm_edu as a buffer.
REFERENCE_PARAMS = {
    "cifar10_ddpmpp_vp": 61_804_419,
    "cifar10_ddpmpp_deep_vp": 106_632_579,
    "cifar10_ncsnpp_ve": 62_758_915,
    "cifar10_ncsnpp_deep_ve": 107_587_075,
    "celebahq256_ncsnpp_ve": 65_574_549,
}
SLOW_PAPER = {"celebahq256_ncsnpp_ve"}  # ~50 s forward+backward at 256x256 on one thread


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _noise_label(cfg: UNetConfig, batch: int) -> torch.Tensor:
    """log σ for the Fourier embedding, 999 t for the positional one (the caller's job)."""
    t = torch.linspace(0.1, 0.9, batch)
    if cfg.embedding_type == "fourier":
        return torch.log(0.01 * (50.0 / 0.01) ** t)
    return 999.0 * t


def _inputs(cfg: UNetConfig, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.num_channels, cfg.image_size, cfg.image_size, generator=g)
    return x, _noise_label(cfg, batch)


def _tiny(**changes) -> UNetConfig:
    """A small config; init_scale 1 so that residual branches (and conditioning) matter at init."""
    base = {
        "arch": "ncsnpp", "image_size": 8, "num_channels": 2, "nf": 8, "ch_mult": (1, 2),
        "num_res_blocks": 1, "attn_resolutions": (4,), "dropout": 0.0, "init_scale": 1.0,
    }
    return UNetConfig(**{**base, **changes})


# ------------------------------------------------------------------------- paper configs


@pytest.mark.parametrize("name", list(REFERENCE_PARAMS))
def test_paper_parameter_count_matches_score_sde(name):
    cfg = PAPER_CONFIGS[name]
    model = build_model(cfg)
    trainable = _n_params(model)
    frozen = model.fourier.W.numel() if model.fourier is not None else 0
    ref = REFERENCE_PARAMS[name]
    print(f"{name}: {trainable:,} trainable + {frozen} Fourier = {trainable + frozen:,}; "
          f"score_sde {ref:,}; diff {trainable + frozen - ref:+,} ({trainable - ref:+,} trainable)")
    assert trainable + frozen == ref
    assert abs(trainable - ref) / ref < 0.01


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_PAPER else n for n in PAPER_CONFIGS],
)
def test_paper_forward_backward_batch1(name):
    cfg = PAPER_CONFIGS[name]
    if name in SLOW_PAPER:  # activation checkpointing halves the 3.8 GB peak at 256x256
        cfg = dataclasses.replace(cfg, checkpointing=True)
    model = UNet(cfg).train()
    x, t = _inputs(cfg, 1)
    start = time.perf_counter()
    out = model(x, t)
    out.square().sum().backward()
    print(f"{name}: forward+backward {time.perf_counter() - start:.1f} s "
          f"({torch.get_num_threads()} threads)")
    assert out.shape == x.shape
    assert torch.isfinite(out).all()
    # every parameter takes part in the output, and its gradient is finite
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname


def test_paper_configs_follow_score_sde_files():
    ve, vp = PAPER_CONFIGS["cifar10_ncsnpp_ve"], PAPER_CONFIGS["cifar10_ddpmpp_vp"]
    assert (ve.fir, ve.progressive_input, ve.embedding_type) == (True, "residual", "fourier")
    assert (vp.fir, vp.progressive_input, vp.embedding_type) == (False, "none", "positional")
    for cfg in (ve, vp):
        assert (cfg.nf, cfg.ch_mult, cfg.attn_resolutions, cfg.dropout) == (
            128, (1, 2, 2, 2), (16,), 0.1
        )
        assert cfg.resblock_type == "biggan" and cfg.skip_rescale and cfg.init_scale == 0.0
    deep = [PAPER_CONFIGS[n] for n in ("cifar10_ddpmpp_deep_vp", "cifar10_ncsnpp_deep_ve")]
    assert [c.num_res_blocks for c in deep] == [8, 8]
    hq = PAPER_CONFIGS["celebahq256_ncsnpp_ve"]
    assert (hq.image_size, hq.ch_mult, hq.num_res_blocks, hq.dropout) == (
        256, (1, 1, 2, 2, 2, 2, 2), 2, 0.0
    )
    assert (hq.progressive, hq.progressive_input) == ("output_skip", "input_skip")


# ------------------------------------------------------------------------- book configs


def test_book_config_sizes():
    sizes = {k: _n_params(UNet(c)) for k, c in BOOK_CONFIGS.items()}
    print(sizes)
    assert 0.3e6 <= sizes["mnist28_ddpmpp"] <= 2e6  # a few MB of float32 weights to ship
    assert 0.2e6 <= sizes["digits8_ddpmpp"] <= 0.5e6


@pytest.mark.parametrize("name", list(BOOK_CONFIGS))
def test_book_forward_shape_and_determinism(name):
    cfg = BOOK_CONFIGS[name]
    x, t = _inputs(cfg, 3)
    state = torch.get_rng_state()
    a, b, c = UNet(cfg, generator=0).eval(), UNet(cfg, generator=0).eval(), UNet(cfg, generator=1)
    assert torch.equal(torch.get_rng_state(), state), "construction touched global random state"
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    with torch.no_grad():
        out_a, out_b, out_c = a(x, t), b(x, t), c.eval()(x, t)
    assert out_a.shape == x.shape
    assert torch.equal(out_a, out_b)
    assert not torch.allclose(out_a, out_c, rtol=1e-3, atol=0)


def test_class_conditional_uses_labels():
    # init_scale 1: with score_sde's near-zero last convs, conditioning barely moves the output
    cfg = dataclasses.replace(BOOK_CONFIGS["digits8_ddpmpp"], num_classes=10, init_scale=1.0)
    model = UNet(cfg).eval()
    x, t = _inputs(cfg, 4)
    y0, y1 = torch.zeros(4, dtype=torch.long), torch.tensor([1, 2, 3, 9])
    out0, out1 = model(x, t, y0), model(x, t, y1)
    assert out0.shape == x.shape
    assert ((out0 - out1).abs().amax() / out0.abs().amax()) > 1e-2
    out1.square().sum().backward()
    grad = model.label_embed.weight.grad
    assert grad[[1, 2, 3, 9]].abs().sum() > 0 and grad[0].abs().sum() == 0
    with pytest.raises(ValueError, match="y"):
        model(x, t)  # missing labels
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        model(x, t, torch.tensor([0, 1, 2, 10]))
    with pytest.raises(ValueError, match="y"):
        model(x, t, y1.float())
    with pytest.raises(ValueError, match="y"):
        model(x, t, y1[:3])
    with pytest.raises(ValueError, match="unconditional"):
        UNet(BOOK_CONFIGS["digits8_ddpmpp"])(x, t, y1)


def test_forward_rejects_bad_inputs():
    cfg = _tiny()
    model = UNet(cfg)
    x, t = _inputs(cfg, 2)
    with pytest.raises(ValueError, match="x must have shape"):
        model(x[:, :1], t)
    with pytest.raises(ValueError, match="x must have shape"):
        model(F.pad(x, (0, 8, 0, 8)), t)
    with pytest.raises(ValueError, match="t must have shape"):
        model(x, t[:1])


# ------------------------------------------------------------------------- every code path


@pytest.mark.parametrize(
    "progressive, progressive_input, combine",
    [(p, pi, c) for p in ("none", "output_skip", "residual")
     for pi in ("none", "input_skip", "residual")
     for c in (("sum", "cat") if pi == "input_skip" else ("sum",))],
)
def test_progressive_variants_run_and_use_every_parameter(progressive, progressive_input, combine):
    for resblock_type, fir, embedding in itertools.product(
        ("biggan", "ddpm"), (True, False), ("fourier", "positional")
    ):
        cfg = _tiny(progressive=progressive, progressive_input=progressive_input,
                    progressive_combine=combine, resblock_type=resblock_type, fir=fir,
                    embedding_type=embedding, ch_mult=(1, 2, 2))
        model = UNet(cfg)
        x, t = _inputs(cfg, 2)
        out = model(x, t)
        assert out.shape == x.shape
        out.square().sum().backward()
        unused = [n for n, p in model.named_parameters() if p.grad is None]
        assert not unused, (cfg, unused)


# ------------------------------------------------------------------------- FIR resampling


def _upfirdn_numpy(x, k, up, down, pad0, pad1):
    """upfirdn by its definition, one output pixel at a time (x [H, W], k [kh, kw])."""
    h, w = x.shape
    u = np.zeros((h * up, w * up))
    u[::up, ::up] = x  # zero insertion
    padded = np.pad(u, [(max(pad0, 0), max(pad1, 0))] * 2)  # negative padding crops
    padded = padded[max(-pad0, 0): padded.shape[0] - max(-pad1, 0),
                    max(-pad0, 0): padded.shape[1] - max(-pad1, 0)]
    kh, kw = k.shape
    out_h = (padded.shape[0] - kh) // down + 1
    out_w = (padded.shape[1] - kw) // down + 1
    out = np.zeros((out_h, out_w))
    for i in range(out_h):
        for j in range(out_w):
            acc = 0.0
            for a in range(kh):
                for b in range(kw):  # convolution: the kernel is flipped
                    acc += padded[i * down + a, j * down + b] * k[kh - 1 - a, kw - 1 - b]
            out[i, j] = acc
    return out


@pytest.mark.parametrize(
    "up, down, pad", [(1, 1, (1, 2)), (2, 1, (2, 1)), (1, 2, (1, 1)), (2, 2, (0, 3)),
                      (3, 1, (2, 0)), (1, 2, (-1, 2)), (2, 1, (3, -1))],
)
def test_upfirdn2d_matches_numpy_loops(up, down, pad):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 7, 7))
    k = rng.normal(size=(3, 4))  # asymmetric and non-square: flips and axes must be right
    got = upfirdn2d(torch.from_numpy(x), torch.from_numpy(k), up=up, down=down, pad=pad).numpy()
    want = np.stack([
        np.stack([_upfirdn_numpy(x[b, c], k, up, down, *pad) for c in range(3)]) for b in range(2)
    ])
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_fir_resampling_keeps_constants_and_shapes():
    k = fir_kernel_2d((1, 3, 3, 1)).double()
    assert torch.isclose(k.sum(), torch.tensor(1.0, dtype=torch.float64))
    x = torch.full((1, 2, 16, 16), 0.7, dtype=torch.float64)
    up, down = upsample_2d(x, k), downsample_2d(x, k)
    assert up.shape == (1, 2, 32, 32) and down.shape == (1, 2, 8, 8)
    # zero padding outside the image: only the borders see it
    torch.testing.assert_close(up[..., 2:-2, 2:-2], torch.full_like(up[..., 2:-2, 2:-2], 0.7))
    torch.testing.assert_close(down[..., 1:-1, 1:-1], torch.full_like(down[..., 1:-1, 1:-1], 0.7))
    round_trip = downsample_2d(upsample_2d(x, k), k)
    assert round_trip.shape == x.shape
    torch.testing.assert_close(round_trip[..., 2:-2, 2:-2], x[..., 2:-2, 2:-2])
    assert not torch.allclose(round_trip[..., 0, 0], x[..., 0, 0])


def test_fused_fir_conv_equals_unfused_inside():
    g = torch.Generator().manual_seed(0)
    k = fir_kernel_2d((1, 3, 3, 1)).double()
    x = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    w = torch.randn(5, 3, 3, 3, generator=g, dtype=torch.float64)
    fused_up, plain_up = upsample_conv_2d(x, w, k), F.conv2d(upsample_2d(x, k), w, padding=1)
    assert fused_up.shape == plain_up.shape == (2, 5, 16, 16)
    torch.testing.assert_close(fused_up[..., 1:-1, 1:-1], plain_up[..., 1:-1, 1:-1])
    fused_down = conv_downsample_2d(x, w, k)
    plain_down = downsample_2d(F.conv2d(x, w, padding=1), k)
    assert fused_down.shape == plain_down.shape == (2, 5, 4, 4)
    torch.testing.assert_close(fused_down[..., 1:-1, 1:-1], plain_down[..., 1:-1, 1:-1])


def test_fir_channels_last_and_bf16_autocast():
    g = torch.Generator().manual_seed(0)
    k = fir_kernel_2d((1, 3, 3, 1))
    x = torch.randn(2, 8, 8, 8, generator=g)
    w = torch.randn(4, 8, 3, 3, generator=g)
    xc = x.contiguous(memory_format=torch.channels_last)
    for fn in (lambda v: upsample_2d(v, k), lambda v: downsample_2d(v, k),
               lambda v: upsample_conv_2d(v, w, k), lambda v: conv_downsample_2d(v, w, k)):
        ref = fn(x)
        torch.testing.assert_close(fn(xc), ref)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = fn(xc)
        assert low.dtype == torch.bfloat16
        torch.testing.assert_close(low.float(), ref, rtol=0.05, atol=0.05 * ref.abs().max().item())


def test_model_channels_last_and_bf16_autocast():
    cfg = _tiny(fir=True, progressive_input="residual")
    model = UNet(cfg).eval()
    x, t = _inputs(cfg, 2)
    with torch.no_grad():
        ref = model(x, t)
        model_cl = model.to(memory_format=torch.channels_last)
        torch.testing.assert_close(model_cl(x.contiguous(memory_format=torch.channels_last), t), ref,
                                   rtol=1e-4, atol=1e-5 * ref.abs().max().item())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, t)
    assert torch.isfinite(low).all()
    assert (low.float() - ref).abs().max() < 0.1 * ref.abs().max()


# ------------------------------------------------------------------------- blocks and init


def test_attention_block_equals_naive_softmax_attention():
    channels = 16
    block = AttnBlock(channels, skip_rescale=True, init_scale=1.0).double()
    init_weights(block, torch.Generator().manual_seed(0))
    with torch.no_grad():  # non-trivial norm affine parameters
        block.norm.weight.uniform_(0.5, 1.5)
        block.norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, channels, 5, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    h = F.group_norm(x, block.norm.num_groups, block.norm.weight, block.norm.bias, eps=1e-6)
    wq, wk, wv = block.qkv.weight.chunk(3)
    bq, bk, bv = block.qkv.bias.chunk(3)
    q = torch.einsum("bchw,dc->bdhw", h, wq) + bq[:, None, None]
    k = torch.einsum("bchw,dc->bdhw", h, wk) + bk[:, None, None]
    v = torch.einsum("bchw,dc->bdhw", h, wv) + bv[:, None, None]
    logits = torch.einsum("bchw,bcij->bhwij", q, k) / math.sqrt(channels)
    weights = torch.softmax(logits.reshape(2, 5, 3, 15), dim=-1).reshape(2, 5, 3, 5, 3)
    attended = torch.einsum("bhwij,bcij->bchw", weights, v)
    out = torch.einsum("bchw,dc->bdhw", attended, block.proj_out.weight)
    out = out + block.proj_out.bias[:, None, None]
    want = (x + out) / math.sqrt(2.0)
    torch.testing.assert_close(block(x), want, rtol=1e-10, atol=1e-10)
    assert (want - x / math.sqrt(2.0)).abs().max() > 0.1  # the attention path matters here


def test_variance_scaling_matches_ddpm_init():
    g = torch.Generator().manual_seed(0)
    w = torch.empty(256, 128, 3, 3)
    variance_scaling_(w, 1.0, g)
    fan_avg = (256 + 128) * 9 / 2
    assert w.abs().max() <= math.sqrt(3 / fan_avg)
    assert abs(w.var().item() * fan_avg - 1.0) < 0.02
    variance_scaling_(w, 0.0, g)  # score_sde: scale 0 means 1e-10
    assert 0 < w.abs().max() <= math.sqrt(3e-10 / fan_avg)


def test_model_init_follows_score_sde():
    model = UNet(BOOK_CONFIGS["mnist28_ddpmpp"])
    # output conv and every residual branch's last conv start near zero (init_scale 0 -> 1e-10)
    assert 0 < model.conv_out.weight.abs().max() < 1e-4
    block = model.down[1].blocks[0]
    assert 0 < block.conv1.weight.abs().max() < 1e-4
    assert torch.equal(block.conv0.bias, torch.zeros_like(block.conv0.bias))
    c_in, c_out = block.conv0.in_channels, block.conv0.out_channels
    var = block.conv0.weight.var().item() * (c_in + c_out) * 9 / 2
    assert 0.9 < var < 1.1
    # q, k, v are three C x C matrices with init scale 0.1 (score_sde's NIN default)
    attn = model.mid_attn
    channels = attn.norm.num_channels
    for chunk in attn.qkv.weight.chunk(3):
        assert 0.9 < chunk.var().item() * channels / 0.1 < 1.1
    assert model.norm_out.num_groups == min(model.norm_out.num_channels // 4, 32)
    assert model.norm_out.eps == 1e-6


def test_timestep_embedding_formula():
    t = torch.tensor([0.0, 3.0])
    emb = timestep_embedding(t, 8)
    freqs = torch.tensor([10000.0 ** (-i / 3) for i in range(4)])
    torch.testing.assert_close(emb[0], torch.cat([torch.zeros(4), torch.ones(4)]))
    torch.testing.assert_close(emb[1], torch.cat([torch.sin(3 * freqs), torch.cos(3 * freqs)]))
    assert timestep_embedding(t, 9).shape == (2, 9)


# ------------------------------------------------------------------------- checkpointing


def test_activation_checkpointing_gives_same_gradients(monkeypatch):
    calls = []

    def counting_checkpoint(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return torch.utils.checkpoint.checkpoint(*args, **kwargs)

    monkeypatch.setattr(unet_module, "checkpoint", counting_checkpoint)
    cfg = _tiny(dropout=0.2, num_classes=3)  # dropout: recomputation must replay its masks
    x, t = _inputs(cfg, 3)
    y = torch.tensor([0, 2, 1])
    grads = []
    for flag in (False, True):
        model = UNet(dataclasses.replace(cfg, checkpointing=flag), generator=0).train()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(123)
            model(x, t, y).square().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert calls and set(calls) == {False}
    for name, g0 in grads[0].items():
        torch.testing.assert_close(grads[1][name], g0, rtol=1e-5, atol=1e-6 * g0.abs().max()
                                   + 1e-12, msg=name)


# ------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"image_size": 30}, "image_size"),
        ({"attn_resolutions": (5,)}, "attn_resolutions"),
        ({"progressive": "skip"}, "progressive"),
        ({"progressive_input": "residuals"}, "progressive_input"),
        ({"progressive_combine": "max"}, "progressive_combine"),
        ({"num_channels": 0}, "num_channels"),
        ({"embedding_type": "learned"}, "embedding_type"),
        ({"resblock_type": "resnet"}, "resblock_type"),
        ({"arch": "unet"}, "arch"),
        ({"dropout": 1.0}, "dropout"),
        ({"conv_size": 5}, "conv_size"),
        ({"nf": 24, "ch_mult": (1, 2, 4)}, "nf"),  # a 144-channel concat: no valid GroupNorm
        ({"fir_kernel": (1,)}, "fir_kernel"),
        ({"ch_mult": ()}, "ch_mult"),
        ({"num_classes": -1}, "num_classes"),
        ({"fir": "yes"}, "fir"),
        ({"num_res_blocks": 2.0}, "num_res_blocks"),
    ],
)
def test_config_errors_name_the_field(changes, field):
    with pytest.raises(ValueError, match=rf"UNetConfig\.{field}:"):
        dataclasses.replace(BOOK_CONFIGS["mnist28_ddpmpp"], **changes)


def test_config_accepts_yaml_lists_and_build_model_dispatches():
    cfg = UNetConfig(**{**dataclasses.asdict(_tiny()), "ch_mult": [1, 2], "attn_resolutions": [4]})
    assert cfg.ch_mult == (1, 2) and cfg.attn_resolutions == (4,)
    assert isinstance(build_model(dataclasses.replace(cfg, arch="ddpmpp")), UNet)
    with pytest.raises(ValueError, match="not the config of a registered model"):
        build_model(SimpleNamespace(name="mlp"))
    mutated = _tiny()
    mutated.progressive = "bogus"  # validated again when the model is built
    with pytest.raises(ValueError, match=r"UNetConfig\.progressive:"):
        UNet(mutated)

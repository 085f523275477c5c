"""The U-Net diagram (lsgm_edu.nets.diagram) against the network `UNet` actually builds.

`unet_layout` reads only the config; the oracle here is the built model, observed while it
runs: forward hooks record every residual and attention block's module name, input and output
shape, so resolutions, channels, block and attention counts and the channels of each skip
tensor (a decoder block's input minus the decoder state it is concatenated to) come from the
computation, not from the config. Paper-size models run on the `meta` device (shapes only).
"""

from __future__ import annotations

import dataclasses

import matplotlib
import pytest
import torch

from lsgm_edu.configs import load_config
from lsgm_edu.nets import UNet, build_model
from lsgm_edu.nets.diagram import draw_unet, unet_layout
from lsgm_edu.nets.layers import AttnBlock, ResnetBlockBigGAN, ResnetBlockDDPM

matplotlib.use("Agg")
import matplotlib.pyplot as plt

CONFIGS = {
    "mnist28_ddpmpp_vp": load_config("mnist28_ddpmpp_vp").model,
    "cifar10_ddpmpp_vp": load_config("cifar10_ddpmpp_vp").model,
    "cifar10_ncsnpp_ve": load_config("cifar10_ncsnpp_ve").model,
    # small variants that move what the diagram shows: attention at 14x14, three blocks,
    # DDPM blocks with strided convs, and NCSN++'s concatenated input pyramid (doubled skips)
    "mnist28_attn14_ddpm": dataclasses.replace(
        load_config("mnist28_ddpmpp_vp").model, attn_resolutions=(14,), num_res_blocks=3,
        resblock_type="ddpm", ch_mult=(1, 2, 3)),
    "tiny_input_skip_cat": dataclasses.replace(
        load_config("mnist28_ddpmpp_vp").model, ch_mult=(1, 2), image_size=16,
        attn_resolutions=(8,), progressive_input="input_skip", progressive_combine="cat",
        fir=True),
}
RESBLOCKS = (ResnetBlockBigGAN, ResnetBlockDDPM)


def trace(model: UNet) -> list[tuple[str, str, tuple, tuple]]:
    """(module name, kind, input shape, output shape) of every block call, in execution order."""
    calls, handles = [], []
    for name, module in model.named_modules():
        if isinstance(module, (*RESBLOCKS, AttnBlock)):
            kind = "attn" if isinstance(module, AttnBlock) else "res"
            handles.append(module.register_forward_hook(
                lambda m, args, out, name=name, kind=kind:
                calls.append((name, kind, tuple(args[0].shape), tuple(out.shape)))))
    cfg = model.config
    device = next(model.parameters()).device
    x = torch.zeros(1, cfg.num_channels, cfg.image_size, cfg.image_size, device=device)
    with torch.no_grad():
        model(x, torch.zeros(1, device=device))
    for h in handles:
        h.remove()
    return calls


def observed_levels(model: UNet) -> list[dict]:
    """Per encoder level (index into model.down), what the run showed."""
    calls = trace(model)
    n = len(model.down)
    levels = [{"resolution": None, "channels": set(), "down_blocks": 0, "up_blocks": 0,
               "down_attention": 0, "up_attention": 0, "skip_channels": []} for _ in range(n)]
    previous_out = None
    for name, kind, shape_in, shape_out in calls:
        part, index = name.split(".")[0], name.split(".")[1] if "." in name else None
        if part == "down" and ".blocks." in name:
            lv = levels[int(index)]
            lv["down_blocks"] += 1
            lv["channels"].add(shape_out[1])
            lv["resolution"] = shape_out[2]
        elif part == "down" and ".attns." in name:
            levels[int(index)]["down_attention"] += 1
        elif part == "up":
            lv = levels[n - 1 - int(index)]  # model.up runs from the bottom level upwards
            if ".blocks." in name:
                lv["up_blocks"] += 1
                lv["channels"].add(shape_out[1])
                assert shape_in[2] == lv["resolution"], name
                lv["skip_channels"].append(shape_in[1] - previous_out[1])
            elif name.endswith(".attn"):
                lv["up_attention"] += 1
        previous_out = shape_out
    return levels


def built(cfg) -> UNet:
    big = cfg.image_size * cfg.nf > 1000
    if big:
        with torch.device("meta"):
            return build_model(cfg)
    return build_model(cfg)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_layout_equals_the_built_network(name):
    cfg = CONFIGS[name]
    model = built(cfg)
    layout = unet_layout(cfg)
    observed = observed_levels(model)
    assert len(layout.levels) == len(observed) == len(model.down)
    for lv, ob in zip(layout.levels, observed, strict=True):
        assert lv.resolution == ob["resolution"]
        assert {lv.channels} == ob["channels"]
        assert (lv.down_blocks, lv.up_blocks) == (ob["down_blocks"], ob["up_blocks"])
        assert (lv.down_attention, lv.up_attention) == (ob["down_attention"], ob["up_attention"])
        # decoder blocks consume the skips last in, first out
        assert list(lv.skip_channels) == ob["skip_channels"][::-1]
    # the middle: ResBlock, attention, ResBlock at the bottom resolution
    mids = [c for c in trace(model) if c[0].startswith("mid_")]
    assert [c[1] for c in mids] == ["res", "attn", "res"]
    assert {c[3][2] for c in mids} == {layout.levels[-1].resolution}
    assert layout.out_channels == model.config.output_channels


def test_layout_of_a_model_is_its_config_layout():
    cfg = CONFIGS["mnist28_ddpmpp_vp"]
    assert unet_layout(build_model(cfg)) == unet_layout(cfg)
    assert unet_layout(cfg).attention_resolutions == (7,)
    assert unet_layout(CONFIGS["cifar10_ddpmpp_vp"]).attention_resolutions == (16,)
    with pytest.raises(TypeError, match="UNetConfig or a UNet"):
        unet_layout(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("name", ["mnist28_ddpmpp_vp", "cifar10_ddpmpp_vp"])
def test_drawing_shows_every_level(name):
    cfg = CONFIGS[name]
    fig, ax = plt.subplots()
    try:
        layout = draw_unet(ax, cfg, title=name)
        texts = [t.get_text() for t in ax.texts]
        boxes = [p for p in ax.patches if type(p).__name__ == "Rectangle"]
        assert len(boxes) == 2 * len(layout.levels) + 1  # encoder, decoder, middle
        orange = [b for b in boxes if b.get_facecolor()[2] < 0.8]
        assert len(orange) == 2 * len(layout.attention_resolutions) + 1
        for lv in layout.levels:
            head = f"{lv.resolution}×{lv.resolution}, {lv.channels} ch"
            assert sum(t.startswith(head) for t in texts) >= 2, head
            assert any(t.startswith(f"{len(lv.skip_channels)} skips") for t in texts)
        assert ax.get_title() == name
    finally:
        plt.close(fig)

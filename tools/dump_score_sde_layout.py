#!/usr/bin/env python3
"""Write tests/data/score_sde_layouts.json: the official NCSN++ state-dict layouts, measured.

    python tools/dump_score_sde_layout.py --reference /tmp/sde_ref [--out tests/data/score_sde_layouts.json]

`--reference` is a folder holding a `models/` package with yang-song/score_sde_pytorch's
`models/ncsnpp.py`, `layerspp.py`, `layers.py`, `up_or_down_sampling.py`, `utils.py` and
`ema.py` (the reference code is read from there and never copied into this repository; its
CUDA `upfirdn2d` op may be replaced by the op's pure-PyTorch path `upfirdn2d_native`). For
the five paper configs the tool builds the official `NCSNpp` from the values of the official
config files (`OFFICIAL_CONFIGS` below) and records its `state_dict()` names, shapes and
kinds, in order; for the small configs of the conversion tests it also records the official
network's outputs on seeded weights and inputs (`official_weights`, the same rule as
tests/test_convert.py), so the tests compare our converted network against the reference
itself. Only names, shapes and numbers are written.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]

# config.model / config.data values of the official config files (ml_collections in the reference)
_BASE = {"nonlinearity": "swish", "conditional": True, "resamp_with_conv": True,
         "fir_kernel": [1, 3, 3, 1], "skip_rescale": True, "resblock_type": "biggan",
         "progressive_combine": "sum", "init_scale": 0.0, "fourier_scale": 16, "conv_size": 3,
         "attn_resolutions": (16,), "dropout": 0.1, "sigma_min": 0.01, "sigma_max": 50,
         "num_scales": 1000, "beta_min": 0.1, "beta_max": 20.0, "nf": 128, "ch_mult": (1, 2, 2, 2)}
_DDPMPP = {"fir": False, "progressive": "none", "progressive_input": "none",
           "embedding_type": "positional", "scale_by_sigma": False, "centered": True}
_NCSNPP = {"fir": True, "progressive": "none", "progressive_input": "residual",
           "embedding_type": "fourier", "scale_by_sigma": True, "centered": False}
OFFICIAL_CONFIGS = {
    "cifar10_ddpmpp_vp": ("configs/vp/cifar10_ddpmpp_continuous.py",
                          {**_BASE, **_DDPMPP, "num_res_blocks": 4}),
    "cifar10_ddpmpp_deep_vp": ("configs/vp/cifar10_ddpmpp_deep_continuous.py",
                               {**_BASE, **_DDPMPP, "num_res_blocks": 8}),
    "cifar10_ncsnpp_ve": ("configs/ve/cifar10_ncsnpp_continuous.py",
                          {**_BASE, **_NCSNPP, "num_res_blocks": 4}),
    "cifar10_ncsnpp_deep_ve": ("configs/ve/cifar10_ncsnpp_deep_continuous.py",
                               {**_BASE, **_NCSNPP, "num_res_blocks": 8}),
    "celebahq256_ncsnpp_ve": ("configs/ve/celebahq_256_ncsnpp_continuous.py",
                              {**_BASE, **_NCSNPP, "image_size": 256, "sigma_max": 348,
                               "num_scales": 2000, "dropout": 0.0, "num_res_blocks": 2,
                               "ch_mult": (1, 1, 2, 2, 2, 2, 2), "progressive": "output_skip",
                               "progressive_input": "input_skip"}),
}

# Small configs for round trips with real tensors: our config (a shipped config plus --set
# overrides) and the SDE the official score function uses: 1x8x8 images (the shape of the
# digits8x8 data set, which the config check asks for), two or three levels.
_TINY_MODEL = ["data.dataset=digits8x8", "model.image_size=8", "model.num_channels=1",
               "model.nf=16", "model.num_res_blocks=1", "model.attn_resolutions=[4]",
               "model.dropout=0.0"]
TINY = {
    "tiny_ncsnpp_ve": ("cifar10_ncsnpp_ve", [*_TINY_MODEL, "model.ch_mult=[1,2]"]),
    "tiny_ddpmpp_vp": ("cifar10_ddpmpp_vp", [*_TINY_MODEL, "model.ch_mult=[1,2]"]),
    "tiny_ncsnpp_skip_ve": ("celebahq256_ncsnpp_ve",
                            [*_TINY_MODEL, "model.ch_mult=[1,1,2]", "sde.N=1000"]),
    "tiny_ddpm_blocks_vp": ("cifar10_ddpmpp_vp",
                            [*_TINY_MODEL, "model.ch_mult=[1,2]", "model.resblock_type=ddpm",
                             "model.progressive=residual", "model.progressive_input=input_skip",
                             "model.progressive_combine=cat"]),
}
TIMES = [1e-3, 0.6]  # diffusion times of the recorded outputs (batch of 2)
WEIGHT_SEED, EMA_SEED, INPUT_SEED = 0, 1, 2


def official_weights(layout, seed: int) -> dict[str, torch.Tensor]:
    """Seeded float32 values for every parameter of an official layout (buffers left out)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape, kind in layout:
        if kind == "buffer":
            continue
        w = torch.randn(shape, generator=g, dtype=torch.float32)
        out[name] = w * (0.5 if len(shape) == 1 else 1 / math.sqrt(math.prod(shape[1:]) or 1))
    return out


def tiny_input(batch: int = 2):
    g = torch.Generator().manual_seed(INPUT_SEED)
    return torch.rand(batch, 1, 8, 8, generator=g, dtype=torch.float32)


def _official_config(values: dict):
    model = {k: v for k, v in values.items() if k not in ("centered", "num_channels")}
    model.setdefault("image_size", 32)
    model["name"] = "ncsnpp"
    data = SimpleNamespace(image_size=model.pop("image_size"),
                           num_channels=values.get("num_channels", 3), centered=values["centered"])
    return SimpleNamespace(model=SimpleNamespace(**model), data=data,
                           training=SimpleNamespace(continuous=True))


def _from_ours(cfg) -> dict:
    """Official config values for one of our configs (the tiny ones)."""
    m, sde = cfg.model, cfg.sde
    ve = hasattr(sde, "sigma_max")
    values = {**_BASE, **{k: getattr(m, k) for k in (
        "nf", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "resamp_with_conv",
        "fir", "fir_kernel", "skip_rescale", "resblock_type", "progressive", "progressive_input",
        "progressive_combine", "init_scale", "embedding_type", "fourier_scale", "image_size",
        "num_channels")},
        "scale_by_sigma": ve, "centered": cfg.data.centered, "num_scales": sde.N}
    if ve:
        values.update(sigma_min=sde.sigma_min, sigma_max=sde.sigma_max)
    return values


def layout_of(model) -> list:
    """[name, shape, kind] of model.state_dict() in order; kind: param | frozen | buffer."""
    params = dict(model.named_parameters())
    rows = []
    for name, tensor in model.state_dict().items():
        kind = "buffer" if name not in params else "param" if params[name].requires_grad else "frozen"
        rows.append([name, list(tensor.shape), kind])
    # the EMA's shadow_params follow model.parameters() with requires_grad: check it is this order
    ema_order = [n for n, p in model.named_parameters() if p.requires_grad]
    assert ema_order == [n for n, _, k in rows if k == "param"]
    return rows


def _round(t: torch.Tensor) -> list:
    return [float(f"{v:.8g}") for v in t.flatten().tolist()]


def _tiny_outputs(ncsnpp, values, layout, sde_name, sde) -> dict:
    """The official network's raw output and score at TIMES, with the EMA weights."""
    weights = official_weights(layout, WEIGHT_SEED)
    ema = official_weights([r for r in layout if r[2] == "param"], EMA_SEED)
    x, t = tiny_input(), torch.tensor(TIMES, dtype=torch.float32)
    out = {}
    for what in ("raw", "score"):
        vals = dict(values)
        if what == "raw":  # the bare network: no input rescaling, no division by sigma
            vals.update(centered=True, scale_by_sigma=False)
        net = ncsnpp(_official_config(vals)).eval()
        state = {**weights, **ema, "sigmas": net.sigmas}
        net.load_state_dict(state, strict=True)
        with torch.no_grad():
            # sigma(t) and std(t) by score_sde's formulas, in float64: in float32, 1 - exp(-b)
            # at t = 1e-3 keeps only 3-4 digits (the GPU runs had that error; a test should not)
            t64 = t.double()
            if sde_name == "ve":  # score_sde get_score_fn, continuous VE: the net gets sigma(t)
                sigma = values["sigma_min"] * (values["sigma_max"] / values["sigma_min"]) ** t64
                out[what] = net(x, sigma.float())
            else:  # continuous VP: labels 999 t, score = -output / std
                h = net(x, 999 * t)
                if what == "score":
                    log_mean = (-0.25 * t64**2 * (sde.beta_max - sde.beta_min)
                                - 0.5 * t64 * sde.beta_min)
                    std = torch.sqrt(1.0 - torch.exp(2.0 * log_mean))
                    h = -h / std.float()[:, None, None, None]
                out[what] = h
    return {"times": TIMES, "input_seed": INPUT_SEED, "weight_seed": WEIGHT_SEED,
            "ema_seed": EMA_SEED, "raw": _round(out["raw"]), "score": _round(out["score"])}


def _compact_json(obj, indent: str = "") -> str:
    """JSON with one line per layout row and per list of numbers (diffs stay readable)."""
    if isinstance(obj, dict):
        inner = indent + " "
        items = [f"{inner}{json.dumps(k)}: {_compact_json(v, inner)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(obj, list) and obj and isinstance(obj[0], list):
        inner = indent + " "
        rows = [inner + json.dumps(r, separators=(",", ":")) for r in obj]
        return "[\n" + ",\n".join(rows) + "\n" + indent + "]"
    return json.dumps(obj, separators=(",", ":"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference", required=True, help="folder holding score_sde_pytorch's models/")
    p.add_argument("--out", default=str(REPO / "tests" / "data" / "score_sde_layouts.json"))
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(args.reference).resolve()))
    sys.path.insert(0, str(REPO))
    from models import ncsnpp as official  # the reference's package, from --reference

    from lsgm_edu.configs import load_config
    from lsgm_edu.registry import SDES

    torch.manual_seed(0)  # the official constructors draw their init from global state
    paper = {}
    for name, (source, values) in OFFICIAL_CONFIGS.items():
        net = official.NCSNpp(_official_config(values))
        paper[name] = {"official_config": source, "model": layout_of(net)}
        print(f"{name}: {len(paper[name]['model'])} tensors", file=sys.stderr)
    tiny = {}
    for name, (base, overrides) in TINY.items():
        cfg = load_config(base, overrides)
        values = _from_ours(cfg)
        layout = layout_of(official.NCSNpp(_official_config(values)))
        tiny[name] = {"base_config": base, "overrides": overrides, "model": layout,
                      "outputs": _tiny_outputs(official.NCSNpp, values, layout,
                                               SDES.name_of(cfg.sde), cfg.sde)}
    doc = {
        "about": "State-dict layouts of score_sde_pytorch's NCSNpp (models/ncsnpp.py at commit "
                 "c8c18d180ab99ebb8e5213bbc0b1e22e20a38e40; layerspp.py and "
                 "up_or_down_sampling.py as stored at 235991bc, with Upsample/Downsample taking "
                 "in_ch=None as that ncsnpp.py calls them and the CUDA upfirdn2d replaced by "
                 "upfirdn2d_native, and F.interpolate(x, size, mode='nearest') passed by keyword in "
                 "layerspp.Upsample), measured by running the reference code: "
                 "tools/dump_score_sde_layout.py. Names are NCSNpp.state_dict() keys, without "
                 "DataParallel's 'module.' prefix, in order; kind 'param' is in the EMA's "
                 "shadow_params (requires_grad, model.parameters() order), 'frozen' is a "
                 "Parameter with requires_grad=False (GaussianFourierProjection.W), 'buffer' the "
                 "sigmas buffer. 'tiny' configs: our config = base_config + overrides; outputs "
                 "of the official network with official_weights(model, weight_seed) overwritten "
                 "by official_weights(params, ema_seed) (the EMA, as ema.copy_to does) on "
                 "tiny_input(): 'raw' the bare network (centered, not scaled by sigma) at its "
                 "official time input (sigma(t) for Fourier features, 999 t positional), "
                 "'score' score_sde's get_score_fn(sde, continuous=True) at the config's SDE, with "
                 "its sigma(t) and std(t) formulas evaluated in float64.",
        "torch": torch.__version__,
        "paper": paper,
        "tiny": tiny,
    }
    text = _compact_json(doc)
    Path(args.out).write_text(text + "\n")
    print(f"wrote {args.out} ({len(text) // 1024} KiB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

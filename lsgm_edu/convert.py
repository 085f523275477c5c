"""Convert the official Score SDE checkpoints (yang-song/score_sde_pytorch) into lsgm_edu checkpoints.

    python -m lsgm_edu convert-score-sde --checkpoint checkpoint_26.pth --config cifar10_ncsnpp_ve --out converted

An official checkpoint is a `torch.save` dict {'model': the DataParallel state dict (names
`module.all_modules.17.Conv_0.weight`, the `sigmas` buffer), 'ema': {'decay', 'num_updates',
'shadow_params': [the EMA of each trainable parameter, in `model.parameters()` order]},
'optimizer', 'step'} (score_sde `utils.save_checkpoint`, `models/ema.py`). It is read with
`torch.load(weights_only=True)` only, so no Python object in it is ever run; each tensor is
mapped to our `UNet` through one explicit name table (`official_name_table`, built by walking
our network in the order `NCSNpp.__init__` fills its `all_modules` list) and checked, name and
shape, against the config asked for. The result is an ordinary lsgm_edu checkpoint that `sample`,
`eval` and `likelihood` load as they load a trained one: the EMA weights under `ema/score/`
(the raw weights under `score/` too with `raw=True`), the config in the sidecar.

One difference is kept, not hidden: score_sde's VE models output the score directly, net / σ(t)
with SMLD's σ(t) = σ_min (σ_max/σ_min)^t (`model.scale_by_sigma`), while ours predict ε and
divide by the exact std sqrt(σ(t)² - σ_min²): with the same weights our reading would be -σ/std
times theirs (-7.69 at t = 1e-3, -1.106 at t = 0.1 for σ_min = 0.01, σ_max = 50). A converted
VE checkpoint therefore records `parameterization: scale_by_sigma` in its sidecar, and the
`ScoreModel` built from it computes the reference's score; VP and sub-VP checkpoints are
ε-models as ours are (`parameterization: eps`).
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from lsgm_edu import checkpoint as ckpt
from lsgm_edu.configs import Config, load_config
from lsgm_edu.nets.layers import (
    AttnBlock,
    Combine,
    Downsample,
    ResnetBlockBigGAN,
    ResnetBlockDDPM,
    Upsample,
)
from lsgm_edu.nets.mlp import GaussianFourierProjection
from lsgm_edu.nets.unet import UNet, UNetConfig
from lsgm_edu.registry import MODELS, SDES

__all__ = [
    "OFFICIAL_FOLDERS",
    "Source",
    "cmd_convert_score_sde",
    "convert_score_sde",
    "official_layout",
    "official_name_table",
    "read_score_sde_checkpoint",
]

# score_sde's checkpoint folders (its README's Google Drive table) and the config of each here
OFFICIAL_FOLDERS = {
    "vp/cifar10_ddpmpp_continuous": "cifar10_ddpmpp_vp",
    "vp/cifar10_ddpmpp_deep_continuous": "cifar10_ddpmpp_deep_vp",
    "ve/cifar10_ncsnpp_continuous": "cifar10_ncsnpp_ve",
    "ve/cifar10_ncsnpp_deep_continuous": "cifar10_ncsnpp_deep_ve",
    "ve/celebahq_256_ncsnpp_continuous": "celebahq256_ncsnpp_ve",
}
# how the ScoreModel reads the converted network, by SDE (lsgm_edu.nets.precond.PARAMETERIZATIONS)
PARAMETERIZATION = {"vp": "eps", "subvp": "eps", "ve": "scale_by_sigma"}
_KEYS_REQUIRED, _KEYS_ALLOWED = {"model", "ema", "step"}, {"model", "ema", "step", "optimizer"}

# Official sub-module -> ours, per block, in the order the official block registers them
# (score_sde models/layerspp.py); "" is the module itself.
_RESBLOCK_BIGGAN = (("GroupNorm_0", "norm0"), ("Conv_0", "conv0"), ("Dense_0", "dense"),
                    ("GroupNorm_1", "norm1"), ("Conv_1", "conv1"), ("Conv_2", "shortcut"))
_RESBLOCK_DDPM = (*_RESBLOCK_BIGGAN[:5], ("NIN_0", "shortcut"))  # NIN_0: a 1x1 projection
_ATTN = (("GroupNorm_0", "norm"), ("NIN_0", "qkv"), ("NIN_1", "qkv"), ("NIN_2", "qkv"),
         ("NIN_3", "proj_out"))
_NIN_PARAMS = {"weight": "W", "bias": "b"}  # layers.NIN keeps W as [in, out], a transposed weight


class Source(NamedTuple):
    """Where one of our tensors comes from: official state-dict names (without `module.`), in
    order, and whether they are NIN layers (W [in, out] transposed; several concatenated along
    the output, as q, k, v into our fused `qkv`; a 1x1 convolution gets [out, in, 1, 1])."""

    names: tuple[str, ...]
    nin: bool = False


def _block_spec(module: nn.Module) -> tuple[tuple[str, str], ...]:
    """(official sub-module, our sub-module) pairs of one entry of score_sde's `all_modules`."""
    if isinstance(module, ResnetBlockBigGAN):
        return _RESBLOCK_BIGGAN
    if isinstance(module, ResnetBlockDDPM):
        return _RESBLOCK_DDPM
    if isinstance(module, AttnBlock):
        return _ATTN
    if isinstance(module, (Downsample, Upsample)):  # layerspp: Conv2d_0 (FIR) or Conv_0
        return (("Conv2d_0" if module.fir else "Conv_0", "conv"),)
    if isinstance(module, Combine):
        return (("Conv", "conv"),)
    if isinstance(module, (nn.Conv2d, nn.Linear, nn.GroupNorm, GaussianFourierProjection)):
        return (("", ""),)
    raise TypeError(f"official_name_table: no score_sde counterpart for {type(module).__name__}")


def _all_modules(net: UNet) -> list[tuple[str, nn.Module]]:
    """Our modules in the order of score_sde's `NCSNpp.all_modules` (models/ncsnpp.py)."""
    cfg, last = net.config, len(net.config.ch_mult) - 1
    out = [("fourier", net.fourier)] if net.fourier is not None else []
    out += [("temb_dense0", net.temb_dense0), ("temb_dense1", net.temb_dense1),
            ("conv_in", net.conv_in)]
    for i, level in enumerate(net.down):
        for j, (block, attn) in enumerate(zip(level.blocks, level.attns)):
            out.append((f"down.{i}.blocks.{j}", block))
            if isinstance(attn, AttnBlock):
                out.append((f"down.{i}.attns.{j}", attn))
        if i != last:
            out.append((f"down.{i}.downsample", level.downsample))
            # input_skip's parameter-free pyramid_downsample is an attribute outside the list
            if cfg.progressive_input == "input_skip":
                out.append((f"down.{i}.combine", level.combine))
            elif cfg.progressive_input == "residual":
                out.append((f"down.{i}.pyramid_down", level.pyramid_down))
    out += [("mid_block0", net.mid_block0), ("mid_attn", net.mid_attn),
            ("mid_block1", net.mid_block1)]
    for k, level in enumerate(net.up):
        i = last - k
        out += [(f"up.{k}.blocks.{j}", block) for j, block in enumerate(level.blocks)]
        if level.attn is not None:
            out.append((f"up.{k}.attn", level.attn))
        # output_skip's parameter-free pyramid_upsample is an attribute outside the list too
        if cfg.progressive == "output_skip" or (cfg.progressive == "residual" and i == last):
            out += [(f"up.{k}.pyramid_norm", level.pyramid_norm),
                    (f"up.{k}.pyramid_conv", level.pyramid_conv)]
        elif cfg.progressive == "residual":
            out.append((f"up.{k}.pyramid_up", level.pyramid_up))
        if i != 0:
            out.append((f"up.{k}.upsample", level.upsample))
    if cfg.progressive != "output_skip":
        out += [("norm_out", net.norm_out), ("conv_out", net.conv_out)]
    return out


def _meta_net(model_cfg: UNetConfig) -> UNet:
    with torch.device("meta"):  # names and shapes only: no memory, no initialization cost
        return UNet(model_cfg)


def _walk(model_cfg: UNetConfig) -> tuple[dict[str, Source], list[tuple[str, str]]]:
    """The name table and the official names in state-dict order, each with our name."""
    table: dict[str, Source] = {}
    order: list[tuple[str, str]] = []
    for index, (path, module) in enumerate(_all_modules(_meta_net(model_cfg))):
        for official_sub, our_sub in _block_spec(module):
            sub = getattr(module, our_sub) if our_sub else module
            if sub is None:  # e.g. no shortcut when the channels stay: none in score_sde either
                continue
            nin = official_sub.startswith("NIN_")
            for param in sub.state_dict():
                ours = ".".join(p for p in (path, our_sub, param) if p)
                official = ".".join(p for p in (f"all_modules.{index}", official_sub,
                                                _NIN_PARAMS[param] if nin else param) if p)
                prev = table.get(ours, Source(()))
                table[ours] = Source((*prev.names, official), nin)
                order.append((official, ours))
    return table, order


def official_name_table(model_cfg: UNetConfig) -> dict[str, Source]:
    """{our state-dict name: its `Source` in score_sde's NCSNpp} for a DDPM++ / NCSN++ config.

    Covers every tensor of `UNet(model_cfg).state_dict()`; built by walking our network in the
    order score_sde's `NCSNpp.__init__` appends to `all_modules` (Song et al. 2021, App. H).
    """
    table, _ = _walk(_check_unet(model_cfg))
    ours = set(_meta_net(model_cfg).state_dict())
    if set(table) != ours:  # a UNet part the walk does not know: a bug here, not in the file
        raise RuntimeError(f"official_name_table: the walk misses {sorted(ours - set(table))[:3]}")
    return table


def _official_shape(our_shape: torch.Size, source: Source) -> tuple[int, ...]:
    if not source.nin:
        return tuple(our_shape)
    out = our_shape[0] // len(source.names)
    return (our_shape[1], out) if len(our_shape) > 1 else (out,)


def official_layout(cfg: Config) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, kind) of score_sde's `NCSNpp(config).state_dict()`, in order, for `cfg`:
    kind 'buffer' (the `sigmas` of num_scales = sde.N SMLD levels), 'frozen' (the Fourier
    features W, requires_grad=False, so not in the EMA) or 'param' (in `ema.shadow_params`)."""
    model_cfg = _unet_config(cfg)
    table, order = _walk(model_cfg)
    shapes = _meta_net(model_cfg).state_dict()
    rows = [("sigmas", (cfg.sde.N,), "buffer")]
    for official, ours in order:
        kind = "frozen" if ours == "fourier.W" else "param"
        rows.append((official, _official_shape(shapes[ours].shape, table[ours]), kind))
    return rows


def _unet_config(cfg: Config) -> UNetConfig:
    if MODELS.name_of(cfg.model) != "unet":
        raise ValueError(f"config {cfg.name!r}: score_sde checkpoints hold NCSN++ / DDPM++ "
                         f"networks (model.name: unet), this config has "
                         f"{MODELS.name_of(cfg.model)!r}")
    return _check_unet(cfg.model)


def _check_unet(model_cfg: UNetConfig) -> UNetConfig:
    """Refuse the UNet options score_sde's NCSNpp does not have."""
    if not isinstance(model_cfg, UNetConfig):
        raise TypeError(f"expected a UNetConfig, got {type(model_cfg).__name__}")
    if model_cfg.num_classes or model_cfg.out_channels or model_cfg.embedding_dim:
        raise ValueError("score_sde's NCSNpp has no class labels, no out_channels and a time "
                         "embedding of width nf; set model.num_classes, model.out_channels and "
                         "model.embedding_dim to 0")
    return model_cfg


# ------------------------------------------------------------------------------------ reading


def read_score_sde_checkpoint(path: str | Path) -> dict:
    """The dict of an official checkpoint, read with weights_only=True (tensors, numbers and
    containers only), its keys checked and DataParallel's `module.` stripped from 'model'."""
    path = Path(path)
    if not path.is_file():
        raise ckpt.CheckpointError(f"{path}: no such file; pass a score_sde checkpoint "
                                   f"(checkpoints/checkpoint_N.pth of an official run)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "weights_only" in str(e).lower():
            raise ckpt.CheckpointError(
                f"{path}: refusing to load: it holds Python objects other than tensors, numbers "
                f"and containers, which only an unrestricted unpickle (torch.load with "
                f"weights_only=False) can read, and an unpickle can run arbitrary code. An "
                f"official score_sde checkpoint holds none; this file is not one as saved by "
                f"score_sde_pytorch. If you trust it, load it yourself and torch.save only "
                f"{{'model': ..., 'ema': ..., 'step': ...}} with plain values, then convert that"
            ) from None
        raise ckpt.CheckpointError(f"{path}: not a torch.save file ({e}); is the download "
                                   f"complete?") from None
    except (RuntimeError, EOFError, ValueError) as e:
        raise ckpt.CheckpointError(f"{path}: unreadable torch.save file ({e}); the download is "
                                   f"truncated or the file is not a checkpoint") from None
    return _check_official(state, path)


def _check_official(state, path: Path) -> dict:
    if not isinstance(state, dict):
        raise ckpt.CheckpointError(f"{path}: holds a {type(state).__name__}, not score_sde's "
                                   f"checkpoint dict {{model, ema, optimizer, step}}")
    keys = set(state)
    if not _KEYS_REQUIRED <= keys or not keys <= _KEYS_ALLOWED:
        raise ckpt.CheckpointError(
            f"{path}: keys {sorted(map(str, keys))}, a score_sde checkpoint has 'model', 'ema', "
            f"'optimizer' and 'step' (missing {sorted(_KEYS_REQUIRED - keys)}, unexpected "
            f"{sorted(map(str, keys - _KEYS_ALLOWED))}); is it a checkpoints-meta/ or another "
            f"project's file?")
    model, ema = state["model"], state["ema"]
    if not isinstance(model, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model.items()):
        raise ckpt.CheckpointError(f"{path}: 'model' is not a state dict of named tensors")
    prefixed = [k.startswith("module.") for k in model]
    if any(prefixed) and not all(prefixed):
        first = next(k for k in model if not k.startswith("module."))
        raise ckpt.CheckpointError(f"{path}: 'model' mixes DataParallel 'module.' names with "
                                   f"others (first {first!r})")
    model = {k.removeprefix("module."): v for k, v in model.items()}
    if not isinstance(ema, dict) or not isinstance(ema.get("shadow_params"), (list, tuple)) or \
            not all(isinstance(v, torch.Tensor) for v in ema["shadow_params"]):
        raise ckpt.CheckpointError(f"{path}: 'ema' is not score_sde's ExponentialMovingAverage "
                                   f"state {{'decay', 'num_updates', 'shadow_params': [tensors]}}")
    step = state["step"]
    if isinstance(step, torch.Tensor) and step.numel() == 1:
        step = step.item()
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ckpt.CheckpointError(f"{path}: 'step' must be an int >= 0, got {step!r}")
    return {"model": model, "ema": dict(ema), "step": step}


# ------------------------------------------------------------------------------------ checking


def _mismatch(path, cfg: Config, what: str) -> ckpt.CheckpointError:
    hint = ", ".join(f"{folder} -> {name}" for folder, name in OFFICIAL_FOLDERS.items())
    return ckpt.CheckpointError(
        f"{path}: {what}; the checkpoint does not fit config {cfg.name!r}. Pass the config of "
        f"the checkpoint's score_sde folder ({hint})")


def _check_model(model: dict, layout, cfg: Config, path) -> None:
    """Every official name of the layout present with its shape and float32, none extra; the
    first difference, in the official order, is the error."""
    expected = {name: shape for name, shape, _ in layout}
    for name, shape, _ in layout:
        if name not in model:
            raise _mismatch(path, cfg, f"tensor module.{name} {list(shape)} is missing")
        got = model[name]
        if tuple(got.shape) != shape:
            raise _mismatch(path, cfg, f"tensor module.{name} has shape {list(got.shape)}, "
                                       f"config {cfg.name!r} expects {list(shape)}")
        if got.dtype != (torch.float64 if name == "sigmas" else torch.float32):
            raise _mismatch(path, cfg, f"tensor module.{name} is {got.dtype}, score_sde "
                                       f"saves float32 weights and float64 sigmas")
    extra = [name for name in model if name not in expected]
    if extra:
        raise _mismatch(path, cfg, f"{len(extra)} unexpected tensor(s), first module.{extra[0]} "
                                   f"{list(model[extra[0]].shape)}")
    _check_sigmas(model["sigmas"], cfg, path)


def _check_sigmas(sigmas: torch.Tensor, cfg: Config, path) -> None:
    """score_sde's `sigmas` buffer: exp(linspace(log sigma_max, log sigma_min, num_scales));
    for a VE config it must be the config's SDE (the VP configs keep the default 0.01 .. 50)."""
    if SDES.name_of(cfg.sde) != "ve":
        return
    want = torch.exp(torch.linspace(math.log(cfg.sde.sigma_max), math.log(cfg.sde.sigma_min),
                                    cfg.sde.N, dtype=torch.float64))
    if not torch.allclose(sigmas, want, rtol=1e-6, atol=0):
        raise _mismatch(path, cfg, f"its sigmas buffer runs from {sigmas[0].item():.6g} to "
                                   f"{sigmas[-1].item():.6g}, config {cfg.name!r} has sde "
                                   f"sigma_max={cfg.sde.sigma_max}, sigma_min={cfg.sde.sigma_min}")


def _ema_state(official: dict, layout, cfg: Config, path) -> dict:
    """The official state dict with the EMA's shadow_params in place of the trained parameters
    (what score_sde's `ema.copy_to(model.parameters())` gives; frozen W and buffers stay)."""
    names = [name for name, _, kind in layout if kind == "param"]
    shadow = official["ema"]["shadow_params"]
    if len(shadow) != len(names):
        raise _mismatch(path, cfg, f"ema.shadow_params holds {len(shadow)} tensors, the "
                                   f"config's network has {len(names)} trainable parameters")
    model = official["model"]
    for i, (name, tensor) in enumerate(zip(names, shadow)):
        if tensor.shape != model[name].shape or tensor.dtype != model[name].dtype:
            raise _mismatch(path, cfg, f"ema.shadow_params[{i}] is {tensor.dtype} "
                                       f"{list(tensor.shape)}, its parameter module.{name} is "
                                       f"{model[name].dtype} {list(model[name].shape)}")
    return {**model, **dict(zip(names, shadow))}


def _to_ours(state: dict, table: dict[str, Source], shapes: dict) -> dict[str, torch.Tensor]:
    """Our state dict from an official one (names without `module.`), through the table."""
    out = {}
    for ours, source in table.items():
        parts = [state[name] for name in source.names]
        if source.nin:  # W [in, out] -> [out, in]; q, k, v stacked; [out, in, 1, 1] for a conv
            parts = [p.t() if p.ndim == 2 else p for p in parts]
        tensor = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
        out[ours] = tensor.reshape(shapes[ours]).contiguous()
    return out


# ------------------------------------------------------------------------------------ converting


def _load_config(config) -> Config:
    return config if isinstance(config, Config) else load_config(config)


def convert_score_sde(path: str | Path, config, out_dir: str | Path, raw: bool = False, *,
                      force: bool = False) -> Path:
    """Convert score_sde checkpoint `path` for `config` (a shipped name, a YAML path or a
    `Config`) into `<out_dir>/<config name>_<checkpoint stem>.{safetensors,json}`; returns the
    sidecar. EMA weights under `ema/score/` (what `sample` and `eval` read); with `raw` the
    trained weights under `score/` too. An existing output is replaced only with `force`."""
    cfg = _load_config(config)
    _unet_config(cfg)  # the config's own problems first, before a large file is read
    path = Path(path)
    sde_name = SDES.name_of(cfg.sde)
    if sde_name not in PARAMETERIZATION:
        raise ValueError(f"config {cfg.name!r}: score_sde trains VP, sub-VP and VE SDEs, this "
                         f"config has sde {sde_name!r}")
    stem = Path(out_dir) / f"{cfg.name}_{path.stem}"
    _refuse_overwrite(stem, path, force)
    official = read_score_sde_checkpoint(path)
    layout = official_layout(cfg)
    _check_model(official["model"], layout, cfg, path)
    table = official_name_table(cfg.model)
    shapes = {k: v.shape for k, v in _meta_net(cfg.model).state_dict().items()}
    tensors = {f"ema/score/{k}": v for k, v in
               _to_ours(_ema_state(official, layout, cfg, path), table, shapes).items()}
    if raw:
        tensors.update({f"score/{k}": v for k, v in
                        _to_ours(official["model"], table, shapes).items()})
    bad = ckpt.non_finite_tensors(tensors)
    if bad:
        raise ckpt.CheckpointError(f"{path}: {len(bad)} tensor(s) hold NaN or inf (first "
                                   f"{bad[0]}); not converted")
    return ckpt.save_checkpoint(stem, tensors, _meta(cfg, official, path, raw))


def _meta(cfg: Config, official: dict, path: Path, raw: bool) -> dict:
    from lsgm_edu.train import STATE_LAYOUT  # the layout `load_score_model` reads

    ema = official["ema"]
    meta = {"step": official["step"], "config": cfg.to_dict(), "state_layout": STATE_LAYOUT,
            "models": ["score"], "parameterization": PARAMETERIZATION[SDES.name_of(cfg.sde)],
            "converted_from": {"code": "yang-song/score_sde_pytorch", "file": path.name,
                               "sha256": ckpt.sha256_file(path),
                               "ema_decay": _plain(ema.get("decay")),
                               "ema_num_updates": _plain(ema.get("num_updates"))},
            "torch": torch.__version__}
    if not raw:
        meta["kind"] = "ema"  # as `export` writes: only the weights to evaluate
    return meta


def _plain(value):
    """A JSON value for the sidecar (the EMA's decay / num_updates, which may be tensors)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    return value if isinstance(value, (int, float)) or value is None else str(value)


def _refuse_overwrite(stem: Path, source: Path, force: bool) -> None:
    for target in (stem.with_suffix(".json"), stem.with_suffix(".safetensors")):
        if target.exists() and target.resolve() == source.resolve():
            raise ValueError(f"--out would overwrite the checkpoint it reads ({source})")
        if target.is_dir():
            raise ValueError(f"{target} is a folder; choose another --out")
        if target.exists() and not force:
            raise ValueError(f"{target} exists; pass --force to replace it")


# ------------------------------------------------------------------------------------ command line


def cmd_convert_score_sde(args) -> int:
    """`python -m lsgm_edu convert-score-sde`: convert, then print where the result lies."""
    cfg = load_config(args.config, list(args.overrides))
    sidecar = convert_score_sde(args.checkpoint, cfg, args.out, raw=args.raw, force=args.force)
    print(f"wrote {sidecar.with_suffix('.safetensors')} and {sidecar.name} "
          f"(parameterization {PARAMETERIZATION[SDES.name_of(cfg.sde)]}); sample with: "
          f"python -m lsgm_edu sample --checkpoint {sidecar}")
    return 0

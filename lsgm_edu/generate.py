"""Sharded, resumable generation of an image folder, and FID / IS / KID of a folder, streamed.

The protocol of EDM's `generate.py` and `fid.py` (Karras et al. 2022): image i is drawn from
its own seed, so a folder of 50,000 PNGs is the same whatever the number of processes
(`torchrun`), and a killed run resumes where it stopped (images already written are kept,
each written atomically, so none is ever half a file). The folder's `generation.json` states
how its images were made (checkpoint and its SHA-256, EMA or raw weights, sampler, steps and
NFE, seed); `evaluate_images` streams the PNGs in index order through a feature extractor
(Inception for FID) and writes that protocol beside the numbers.

    torchrun --nproc-per-node 8 -m lsgm_edu generate --checkpoint CKPT --num-samples 50000 \
        --out DIR
    python -m lsgm_edu eval --images DIR --ref-stats cifar10_train.npz --inception-weights W

Which images are identical, and why. Image i uses one `torch.Generator` seeded by
`derived_seed(seed, 8, i)` for its prior draw and every step's noise (`PerSampleGenerators`),
the seeds `python -m lsgm_edu eval --checkpoint` uses, so `eval --images` of a folder measures
the images `eval --checkpoint` measures in memory. Batches are the index ranges
[k B, (k + 1) B) whatever the process count (rank r of W takes batches k = r, r + W, ...), so
the files do not depend on W for any sampler. Two samplers couple the rows of a batch: the
adaptive PF-ODE (`ode`, dopri5) shares its step-size control, and the Langevin corrector of
`pc` (n_corrector > 0) takes one step size from the batch means of |z| and |s|, as the Score
SDE reference does; their images depend on B (`generation.json` records it, and a resumed run
redraws a partly written batch whole, writing only its missing files). em, sscs and pc without
corrector draw each row independently: their images do not depend on B either, except for the
float round-off of batched network kernels (a convolution over a batch of 3 and over a batch
of 8 differ by about 1e-6 on a CPU; a pixel next to a rounding boundary can move one level).

An LSGM checkpoint (Vahdat et al. 2021) is sampled by `lsgm.sample_images`, the package's one
LSGM sampler: the top latent from the score prior (the PF-ODE by dopri5 at rtol = atol = --tol
by default, as the paper's FIDs: 1e-5 for CIFAR-10, 1e-2 for CelebA-HQ 256; or em, pc, sscs),
the lower latent groups from N(0, I), decoded to the mean of p(x | z) (LSGM's `NVAE.sample`
returns the decoder's mean; `eval --metric classifier-fid` measures the same images) and
written as round(255 clamp(mean, 0, 1)). Image i's generator draws its prior sample, its
per-step noise and its lower groups. The score prior takes its EMA weights, the VAE the
weights it was trained with (LSGM keeps no EMA of the VAE); generation.json says which.
LSGM's pc always runs one Langevin corrector, so pc and ode couple a batch's rows. A
stage-"vae" checkpoint (the VAE alone, no score prior) is refused.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import re
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# torch, numpy and the package's modules are imported inside the functions: `python -m
# lsgm_edu --help` registers this module's commands and must not wait for torch.

IMAGE_SEED_STREAM = 8  # image i from derived_seed(seed, 8, i): `eval --checkpoint`'s images too
KID_SEED_STREAM = 9  # KID subsets from derived_seed(seed, 9), as `eval --checkpoint`
REFERENCE_SUBSET_SEED = 0  # which training images keep their features for KID
GENERATION_FILE = "generation.json"
FORMAT = "lsgm_edu.generate/1"
METHODS = ("pc", "em", "ode", "sscs")
LSGM_TOL = 1e-5  # rtol = atol of an LSGM's latent PF-ODE (LSGM's CIFAR-10 FID; 1e-2 CelebA-HQ)
# what `lsgm.sample_latent` runs for pc (its fixed predictor, snr and one corrector per step)
_LSGM_PC = {"predictor": "euler_maruyama", "snr": 0.16, "n_corrector": 1}
LSGM_DECODER_OUTPUT = "mean"  # of p(x | z): LSGM's NVAE.sample, and `eval --metric classifier-fid`
# the 8-bit images an LSGM's FID compares with where it trains on fewer bits: LSGM's
# scripts/precompute_fid_statistics.py reads the data without the training's bit reduction
_LSGM_FID_REFERENCE = {"celebahq256_5bit": "celebahq256"}
_TEMPORARY = re.compile(r"\.\d+\.png\.[^/]*\.tmp")  # what a killed atomic PNG write leaves
# what must match for a folder's images to be one set (n may grow; batch_size is added for a
# batch-coupled sampler)
_SAME_SET_KEYS = ("format", "seed", "checkpoint_sha256", "weights", "sampler", "image_shape",
                  "num_levels", "config", "lsgm")


# --- which image, which seed, which process -----------------------------------------------


def image_path(out_dir, i: int) -> Path:
    """The file of image i: `out_dir/000123.png` (more digits past 999,999)."""
    return Path(out_dir) / f"{i:06d}.png"


def image_seed(seed: int, i: int) -> int:
    """The seed of image i's generator (its prior draw and all its per-step noise)."""
    from lsgm_edu.train import derived_seed

    return derived_seed(seed, IMAGE_SEED_STREAM, i)


def image_seeds(n: int, seed: int) -> list[int]:
    """The seeds of images 0 .. n-1."""
    return [image_seed(seed, i) for i in range(n)]


def shard_batches(n: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[range]:
    """Rank r's batches: the ranges [k B, (k + 1) B) of 0 .. n-1 with k = r, r + W, r + 2W, ...

    The batches themselves never depend on W, so neither do the images of a batch-coupled
    sampler (`batch_coupled`: the adaptive ODE, pc with a corrector).
    """
    starts = range(0, n, batch_size)
    return [range(s, min(s + batch_size, n)) for s in starts[rank::world_size]]


# --- PNG files -----------------------------------------------------------------------------


def write_png(path, image) -> Path:
    """Write a uint8 image [C, H, W] (C = 1 grey, 3 RGB) as a PNG, atomically."""
    import torch
    from PIL import Image

    from lsgm_edu import checkpoint as ckpt

    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"write_png: expected a uint8 image [C, H, W] with C = 1 or 3, got "
                         f"{image.dtype} {tuple(image.shape)}")
    array = image.permute(1, 2, 0).cpu().numpy()
    picture = Image.fromarray(array[..., 0] if image.shape[0] == 1 else array)
    return ckpt.atomic_write_bytes(path, lambda tmp: picture.save(tmp, format="PNG"))


def read_png(path) -> torch.Tensor:
    """A grey or RGB PNG as uint8 [C, H, W]; another mode (RGBA, palette, 16 bit) is an error."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as picture:
            picture.load()
            mode, array = picture.mode, np.array(picture)  # a writable copy
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{path}: not a readable PNG ({e}); delete it (and rerun generate "
                         f"to redraw it)") from None
    if mode not in ("L", "RGB"):
        raise ValueError(f"{path}: PNG mode {mode}; expected 8-bit grey (L) or RGB images")
    array = array[..., None] if mode == "L" else array
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def remove_stale_temporaries(out_dir) -> int:
    """Delete the temporary files a killed PNG write left (`.000123.png.*.tmp`); their count."""
    stale = [p for p in Path(out_dir).iterdir() if _TEMPORARY.fullmatch(p.name)]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def read_generation(out_dir) -> dict | None:
    """The folder's generation.json, or None where there is none."""
    path = Path(out_dir) / GENERATION_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); it is written atomically, so another "
                         f"program wrote it: restore it or use another folder") from None


# --- sampling ------------------------------------------------------------------------------


def batch_coupled(sampling) -> bool:
    """Whether the sampler couples the rows of a batch, so that an image depends on its
    batch-mates: the adaptive ODE (shared step sizes) and pc with a Langevin corrector (one
    step size from batch means, Song et al. 2021, Algorithm 5 as in their code)."""
    return sampling.method == "ode" or (sampling.method == "pc" and sampling.n_corrector > 0)


def sampling_config(cfg, method=None, steps=None, striding=None):
    """A copy of `cfg` whose sampling section takes method / steps / striding where given,
    checked by `configs.validate` (sscs on a VP model is a ConfigError)."""
    from lsgm_edu.configs import ConfigError, validate

    cfg = copy.deepcopy(cfg)
    given = {k: v for k, v in (("method", method), ("steps", steps), ("striding", striding))
             if v is not None}
    for key, value in given.items():
        setattr(cfg.sampling, key, value)
    try:
        validate(cfg)
    except ConfigError as e:
        flags = " ".join(f"{k}={v}" for k, v in given.items())
        raise ConfigError(f"{flags or 'the config'} does not fit this model: {e}") from None
    return cfg


def num_levels(cfg) -> int:
    """Grey levels of the config's data set (what samples are quantized back to)."""
    from lsgm_edu.data import DATASETS

    return DATASETS[cfg.data.dataset].num_levels


def is_lsgm(cfg) -> bool:
    """Whether `cfg` describes an LSGM (a VAE with a score prior on its top latent)."""
    from lsgm_edu.registry import MODELS

    return MODELS.name_of(cfg.model) == "lsgm"


def lsgm_sampler(sampling, tol: float | None) -> dict:
    """What `lsgm.sample_latent` runs for `sampling` (a config's sampling section) and rtol =
    atol = `tol` of the ODE, as generation.json records it: it takes method, steps and eps
    from the config, and fixes the rest (pc: Euler-Maruyama predictor, one Langevin corrector
    at snr 0.16; em and sscs on the uniform grid)."""
    m, ode, pc = sampling.method, sampling.method == "ode", sampling.method == "pc"
    return {"method": m, "solver": "dopri5" if ode else None,
            "rtol": tol if ode else None, "atol": tol if ode else None,
            "steps": None if ode else sampling.steps, "eps": sampling.eps,
            "striding": None if ode else "uniform",
            **{k: v if pc else None for k, v in _LSGM_PC.items()},
            "n_corrector": _LSGM_PC["n_corrector"] if pc else 0}


def decoder_mean_to_8bit(x: torch.Tensor) -> torch.Tensor:
    """An LSGM's decoder-mean images in [0, 1] -> uint8 round(255 clamp(x, 0, 1)), the rule of
    `eval --metric classifier-fid` (not quantized to the data's levels: LSGM feeds the mean
    itself to Inception)."""
    import torch

    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def _refuse_non_finite(x, indices, sampling) -> None:
    import torch

    bad = ~torch.isfinite(x.reshape(len(x), -1)).all(dim=1)
    if bool(bad.any()):
        which = [indices[j] for j in torch.nonzero(bad).flatten().tolist()]
        raise RuntimeError(
            f"sampling produced NaN/inf in images {which[:5]}{' ...' if len(which) > 5 else ''}"
            f" ({sampling.method}, {sampling.steps} steps): the sampler diverged; try "
            f"more steps or another method. Those images were not written")


def sample_lsgm_rows(models, sde, cfg, indices, seed: int, device=None, tol: float = LSGM_TOL):
    """Images `indices` of an LSGM (`train.load_lsgm`'s models) as 8-bit uint8 [B, C, H, W]
    on the CPU, and the NFE per image.

    `lsgm.sample_images` with one generator per row (`image_seed`), which draws the row's prior
    sample, its per-step noise and its lower latent groups: the top latent by the configured
    sampler (ODE at rtol = atol = tol), decoded to the mean of p(x | z), then
    `decoder_mean_to_8bit`.
    """
    import torch

    from lsgm_edu import lsgm
    from lsgm_edu.utils import PerSampleGenerators

    device = torch.device(device) if device is not None else next(models.parameters()).device
    generator = PerSampleGenerators.seeded([image_seed(seed, i) for i in indices], device)
    s = cfg.sampling
    x, nfe = lsgm.sample_images(models, sde, len(indices), method=s.method, use_mean=True,
                                generator=generator, steps=s.steps, eps=s.eps, rtol=tol,
                                atol=tol)
    _refuse_non_finite(x, indices, s)
    return decoder_mean_to_8bit(x).cpu(), float(nfe)


def sample_rows(score_model, sde, cfg, indices, seed: int, device=None, tol=None):
    """Images `indices` as 8-bit uint8 [B, C, H, W] on the CPU, and the NFE per image.

    Each row from its own generator (`image_seed`); samples are mapped to the data's levels
    with the rounding rule of the training discretization (`data.to_uint8`), then to 8 bits
    (`data.to_8bit`), as `eval --checkpoint` shows them to Inception. An LSGM (`cfg`, with
    `score_model` its {"vae", "sgm"}) is sampled by `sample_lsgm_rows` at `tol`.
    """
    import torch

    from lsgm_edu.data import to_8bit, to_uint8
    from lsgm_edu.train import sample_images
    from lsgm_edu.utils import PerSampleGenerators

    if is_lsgm(cfg):
        return sample_lsgm_rows(score_model, sde, cfg, indices, seed, device,
                                LSGM_TOL if tol is None else tol)
    device = torch.device(device) if device is not None else next(score_model.parameters()).device
    generator = PerSampleGenerators.seeded([image_seed(seed, i) for i in indices], device)
    x, nfe = sample_images(score_model, sde, cfg.sampling, len(indices), eps=cfg.sampling.eps,
                           generator=generator, device=device, return_nfe=True)
    _refuse_non_finite(x, indices, cfg.sampling)
    levels = num_levels(cfg)
    discretization = "dequantize" if cfg.data.dequantize else "scale"
    quantized = to_uint8(x, levels, discretization=discretization, centered=cfg.data.centered)
    return to_8bit(quantized, levels).cpu(), float(nfe)


# --- the protocol --------------------------------------------------------------------------


def _device_name(device: torch.device) -> str:
    import torch

    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"{device.type} ({platform.processor() or platform.machine()})"


def generation_protocol(cfg, n, seed, batch_size, world_size, device, *, checkpoint=None,
                        weights="ema", tol=None) -> dict:
    """What `generation.json` says about a folder's images (all but nfe and complete); for an
    LSGM (`is_lsgm(cfg)`, its ODE at rtol = atol = `tol`) also which weights each of its
    models took and how its images were decoded (key "lsgm")."""
    import torch

    from lsgm_edu import __version__
    from lsgm_edu import checkpoint as ckpt
    from lsgm_edu.data import DATASETS

    meta = _sidecar(checkpoint) if checkpoint is not None else {}
    s = cfg.sampling
    c, h, w = DATASETS[cfg.data.dataset].image_shape
    lsgm = is_lsgm(cfg)
    sampler = lsgm_sampler(s, tol) if lsgm else {
        "method": s.method, "steps": s.steps, "snr": s.snr, "n_corrector": s.n_corrector,
        "striding": s.striding, "eps": s.eps,
        **({"predictor": s.predictor} if s.method == "pc" else {})}
    coupled = batch_coupled(SimpleNamespace(**sampler))
    record = {
        "format": FORMAT,
        "model": "lsgm" if lsgm else "score",
        "n": n,
        "seed": seed,
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "checkpoint_sha256": None if checkpoint is None else ckpt.sha256_file(checkpoint),
        "tensors_sha256": meta.get("sha256"),
        "checkpoint_step": meta.get("step"),
        "weights": weights,
        "config": cfg.to_dict(),
        "dataset": cfg.data.dataset,
        "sampler": sampler,
        "image_shape": [c, h, w],
        "num_levels": DATASETS[cfg.data.dataset].num_levels,
        "batch_size": batch_size,
        "world_size": world_size,
        "device": _device_name(torch.device(device)),
        "lsgm_edu": __version__,
        "torch": torch.__version__,
    }
    batches = (f"batches are the index ranges [k * {batch_size}, (k + 1) * {batch_size}) on "
               f"any number of processes")
    coupling = ("; this sampler couples the rows of a batch (ODE step sizes, or the corrector's "
                "step size from batch means), so its images depend on batch_size"
                if coupled else "")
    if lsgm:
        record["lsgm"] = {**_lsgm_record(checkpoint, weights), "fid_reference_dataset":
                          _LSGM_FID_REFERENCE.get(cfg.data.dataset, cfg.data.dataset)}
        record["protocol"] = (
            f"image i is the file {{i:06d}}.png: an LSGM's top latent drawn from its score "
            f"prior by {_sampler_words(sampler)} with image i's own torch.Generator, seeded by "
            f"derived_seed({seed}, {IMAGE_SEED_STREAM}, i), for the prior draw, every step's "
            f"noise and the lower latent groups (N(0, I)); decoded by the VAE to the mean of "
            f"p(x | z), written as the 8-bit PNG round(255 clamp(mean, 0, 1)); {batches}"
            + coupling)
    else:
        record["protocol"] = (
            f"image i is the file {{i:06d}}.png, drawn with its own "
            f"torch.Generator seeded by derived_seed({seed}, {IMAGE_SEED_STREAM}, i) for its "
            f"prior draw and all its per-step noise; {batches}; samples mapped "
            f"to the data's {DATASETS[cfg.data.dataset].num_levels} levels by the inverse of "
            f"the training discretization "
            f"({'floor' if cfg.data.dequantize else 'round'}), written as 8-bit PNG" + coupling)
    return record


def fid_reference_dataset(generation: dict | None) -> str | None:
    """The data set whose training images a folder's FID compares with: the one it was trained
    on, or for an LSGM trained on fewer bits its 8-bit source (celebahq256 for 5-bit CelebA-HQ,
    as LSGM's FID statistics)."""
    if generation is None:
        return None
    return (generation.get("lsgm") or {}).get("fid_reference_dataset") or \
        generation.get("dataset")


def _sampler_words(sampler: dict) -> str:
    """A sampler record in words: "the PF-ODE (adaptive dopri5 at rtol = atol = 1e-05)" or
    "em with 100 steps"."""
    if sampler["method"] == "ode":
        return f"the PF-ODE (adaptive dopri5 at rtol = atol = {sampler.get('rtol')})"
    return f"{sampler['method']} with {sampler['steps']} steps"


def _lsgm_record(checkpoint, weights: str) -> dict:
    """Which weights an LSGM's score prior and VAE took (`train.load_lsgm`: a model's EMA where
    the checkpoint holds one and EMA weights were asked for) and how images are decoded."""
    names = _tensor_names(checkpoint) if checkpoint is not None else None

    def took(name):
        if names is None:
            return weights if name == "sgm" else None  # no checkpoint: as the caller says
        return "ema" if weights == "ema" and any(k.startswith(f"ema/{name}/") for k in names) \
            else "raw"

    return {"score_prior_weights": took("sgm"), "vae_weights": took("vae"),
            "decoder_output": LSGM_DECODER_OUTPUT,
            "image_mapping": "round(255 * clamp(decoder mean, 0, 1)) as uint8",
            "sampler_function": "lsgm_edu.lsgm.sample_images"}


def _tensor_names(checkpoint) -> list[str]:
    """The tensor names of a checkpoint (read from the safetensors header, not the tensors)."""
    from safetensors import safe_open

    sidecar = _sidecar_path(checkpoint)
    meta = _sidecar(sidecar)
    with safe_open(str(sidecar.parent / meta["tensors"]), "pt") as f:
        return list(f.keys())


def _sidecar_path(checkpoint) -> Path:
    """A checkpoint's .json sidecar, given it, its .safetensors file or its stem."""
    path = Path(checkpoint)
    return path.with_suffix(".json") if path.suffix in ("", ".safetensors") else path


def _sidecar(checkpoint) -> dict:
    try:
        return json.loads(_sidecar_path(checkpoint).read_text())
    except (OSError, ValueError):
        return {}


def _check_same_set(old: dict, new: dict, path: Path) -> None:
    """Refuse to add images to a folder whose images were made another way."""
    new = json.loads(json.dumps(new))  # tuples as lists, as the file holds them
    coupled = batch_coupled(SimpleNamespace(**new["sampler"]))
    keys = _SAME_SET_KEYS + (("batch_size",) if coupled else ())
    for key in keys:
        if old.get(key) != new.get(key):
            raise ValueError(
                f"{path} holds images made with another {key} ({_short(old.get(key))} there, "
                f"{_short(new.get(key))} now); resume with the same settings or choose another "
                f"--out" + (" (this sampler's images depend on the batch size)"
                            if key == "batch_size" else ""))


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_generate_args(n, out_dir, seed, batch_size) -> Path:
    for name, value, low in (("n", n, 1), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"generate_images: {name} must be an int >= {low}, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"generate_images: seed must be an int, got {seed!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} is a file; --out names the folder that receives the PNGs")
    return out_dir


def _check_lsgm_args(model, sde, cfg, method, striding, tol) -> float | None:
    """The ODE tolerance to sample with (None: not an ODE), or an error naming the argument
    that does not fit the checkpoint: an LSGM needs its score prior, takes no --striding, and
    --tol is the tolerance of its latent ODE only."""
    if not is_lsgm(cfg):
        if tol is not None:
            raise ValueError(f"generate: tol={tol} sets the latent PF-ODE tolerance of an LSGM; "
                             f"a score model's ODE runs at rtol = atol = 1e-5: leave --tol out")
        return None
    if sde is None or "sgm" not in model:
        raise ValueError("generate: a stage-'vae' LSGM checkpoint (the VAE alone, with its "
                         "N(0, I) prior): there is no score prior to sample; train stage 'lsgm' "
                         "from it (--stage lsgm --vae-checkpoint CKPT) and generate from that")
    if striding is not None:
        raise ValueError(f"generate: striding={striding!r}: an LSGM's em / pc / sscs run on the "
                         f"uniform grid of lsgm.sample_latent; leave --striding out")
    if method != "ode":
        if tol is not None:
            raise ValueError(f"generate: tol={tol} is the tolerance of the PF-ODE; "
                             f"{method} takes --steps (or use --method ode)")
        return None
    if tol is not None and not (isinstance(tol, (int, float)) and 0 < tol < 1):
        raise ValueError(f"generate: tol must be a number in (0, 1), got {tol!r}")
    return LSGM_TOL if tol is None else float(tol)


def _write_generation(out_dir: Path, record: dict) -> None:
    from lsgm_edu import checkpoint as ckpt

    record = {**record, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds")}
    ckpt.atomic_write_text(out_dir / GENERATION_FILE, json.dumps(record, indent=1) + "\n")


def _barrier(world_size: int) -> None:
    import torch

    if world_size > 1:
        torch.distributed.barrier()


def generate_images(score_model, sde, cfg, n: int, out_dir, *, seed: int = 0,
                    batch_size: int = 250, method: str | None = None, steps: int | None = None,
                    striding: str | None = None, tol: float | None = None, dist=None,
                    progress: bool = True, checkpoint=None, weights: str = "ema",
                    callback=None) -> dict:
    """Write images 0 .. n-1 of `score_model` as `out_dir/{i:06d}.png`, skipping those there.

    `score_model`: a ScoreModel (`train.load_score_model`), or an LSGM's {"vae", "sgm"} with
    its SDE and config (`train.load_lsgm`; `sample_lsgm_rows`, its ODE at rtol = atol = `tol`,
    default `LSGM_TOL`). Works in one process and under torchrun (`dist`:
    `train.setup_distributed()`'s `Dist`; every rank calls this with the same arguments).
    method / steps / striding override cfg.sampling. Rank 0 writes `generation.json` before
    the first image (complete: false) and again at the end (complete: true, with the NFE), and
    refuses a folder whose generation.json names other settings. `checkpoint` (a path) and
    `weights` ("ema" or "raw") are recorded there. `callback(i)` runs after image i is
    written. A batch-coupled sampler (`batch_coupled`) redraws a partly written batch whole.
    Returns the final generation record (on every rank).
    """
    import torch
    from tqdm.auto import tqdm

    from lsgm_edu.train import Dist

    out_dir = _check_generate_args(n, out_dir, seed, batch_size)
    dist = dist or Dist(device=next(score_model.parameters()).device)
    if method is not None and method not in METHODS:
        raise ValueError(f"generate_images: method {method!r} is not one of {', '.join(METHODS)}")
    tol = _check_lsgm_args(score_model, sde, cfg, method or cfg.sampling.method, striding, tol)
    cfg = sampling_config(cfg, method, steps, striding)
    record = generation_protocol(cfg, n, seed, batch_size, dist.world_size, dist.device,
                                 checkpoint=checkpoint, weights=weights, tol=tol)
    coupled = batch_coupled(SimpleNamespace(**record["sampler"]))
    old = read_generation(out_dir)
    if old is not None:
        _check_same_set(old, record, out_dir / GENERATION_FILE)
    elif out_dir.is_dir() and any(p.suffix == ".png" and p.stem.isdigit()
                                  for p in out_dir.iterdir()):
        raise ValueError(f"{out_dir} holds numbered PNGs but no {GENERATION_FILE}: they were "
                         f"not made by generate (or that file was removed); use an empty folder")
    _barrier(dist.world_size)  # every rank has read the old record before rank 0 replaces it
    if dist.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out_dir)
        _write_generation(out_dir, {**record, "complete": False,
                                    "nfe": None if old is None else old.get("nfe")})
    _barrier(dist.world_size)

    batches = shard_batches(n, batch_size, dist.rank, dist.world_size)
    todo = [[i for i in b if not image_path(out_dir, i).is_file()] for b in batches]
    nfe_sum, nfe_count = 0.0, 0
    bar = tqdm(total=sum(map(len, todo)), disable=not progress or not dist.main,
               desc="generate", unit="img")
    for batch, missing in zip(batches, todo):
        if not missing:
            continue
        rows = list(batch) if coupled else missing
        images, nfe = sample_rows(score_model, sde, cfg, rows, seed, dist.device, tol)
        nfe_sum, nfe_count = nfe_sum + nfe * len(rows), nfe_count + len(rows)
        wanted = set(missing)
        for i, image in zip(rows, images):
            if i in wanted:
                write_png(image_path(out_dir, i), image)
                bar.update(1)
                if callback is not None:
                    callback(i)
    bar.close()

    # score evaluations per image (the ODE's vary): this run's mean, the last run's if it drew
    # nothing; on the processes' device, which NCCL needs
    totals = torch.tensor([nfe_sum, float(nfe_count)], dtype=torch.float64, device=dist.device)
    if dist.world_size > 1:
        torch.distributed.all_reduce(totals)
    nfe = float(totals[0] / totals[1]) if totals[1] > 0 else (old or {}).get("nfe")
    _barrier(dist.world_size)
    missing = [i for i in range(n) if not image_path(out_dir, i).is_file()]
    if missing:
        raise RuntimeError(f"{out_dir}: {len(missing)} images missing after generation (first "
                           f"{missing[0]}); another process removes files here?")
    final = {**record, "complete": True, "nfe": nfe}
    if dist.main:
        _write_generation(out_dir, final)
    _barrier(dist.world_size)
    return final


# --- evaluation of a folder ----------------------------------------------------------------


def _count_images(image_dir: Path) -> int:
    """How many images 0, 1, 2, ... are in the folder (stops at the first gap)."""
    i = 0
    while image_path(image_dir, i).is_file():
        i += 1
    return i


def _check_evaluate_args(image_dir, n, batch_size, generation) -> tuple[Path, int]:
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise ValueError(f"{image_dir}: no such folder of images (make one with "
                         f"`python -m lsgm_edu generate --out {image_dir}`)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"evaluate_images: batch_size must be an int >= 1, got {batch_size!r}")
    if generation is not None and not generation.get("complete", False) and n is None:
        raise ValueError(f"{image_dir}: generation did not finish ({GENERATION_FILE} says "
                         f"complete: false); rerun the same generate command to finish it")
    if n is None:
        n = generation["n"] if generation is not None else _count_images(image_dir)
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"evaluate_images: need at least 2 images (000000.png, 000001.png, "
                         f"...) in {image_dir}, got n = {n!r}")
    gap = next((i for i in range(n) if not image_path(image_dir, i).is_file()), None)
    if gap is not None:
        raise ValueError(f"{image_dir}: {image_path(image_dir, gap).name} is missing (of {n} "
                         f"images); finish the folder with the generate command that made it")
    return image_dir, n


def stream_image_folder(image_dir, n: int, batch_size: int, shape=None):
    """uint8 batches [B, C, H, W] of images 0 .. n-1 in index order, one batch in memory.

    Every image must have `shape` (C, H, W), or that of image 0.
    """
    import torch

    shape = None if shape is None else tuple(shape)
    for start in range(0, n, batch_size):
        images = []
        for i in range(start, min(start + batch_size, n)):
            image = read_png(image_path(image_dir, i))
            shape = shape or tuple(image.shape)
            if tuple(image.shape) != shape:
                raise ValueError(
                    f"{image_path(image_dir, i)}: image of shape {tuple(image.shape)} (C, H, W), "
                    f"the folder's images are {shape}; remove it and rerun generate")
            images.append(image)
        yield torch.stack(images)
        del images


def kid_against_reference(features, reference, *, subsets=100, subset_size=1000, seed=0,
                          device=None):
    """(KID (mean, std) or None, how it was computed or why not), as `eval --checkpoint`."""
    import torch

    from lsgm_edu import metrics
    from lsgm_edu.train import seeded_generator

    if len(features) < 2:
        return None, "not computed (fewer than 2 sample features kept)"
    if reference.features is None or len(reference.features) < 2:
        return None, ("not computed: the reference statistics hold no features (TTUR / "
                      "pytorch-fid files keep only mu and sigma); recompute them from the "
                      "training set into a new file")
    ref = torch.from_numpy(reference.features)
    size = min(subset_size, len(features), len(ref))
    kid = metrics.kernel_inception_distance(
        features.to(device or "cpu"), ref.to(device or "cpu"), subsets=subsets,
        subset_size=size, generator=seeded_generator(seed, KID_SEED_STREAM))
    return kid, (f"unbiased MMD^2 with the kernel (x.y / d + 1)^3, mean and std over {subsets} "
                 f"subsets of {size} rows drawn without replacement (seed derived from {seed}),"
                 f" between the features of the first {len(features)} images and the "
                 f"{len(ref)} reference features stored in the statistics file")


def evaluate_images(image_dir, reference, feature_fn, *, n: int | None = None,
                    batch_size: int = 250, is_splits: int = 10, kid_features: int = 10_000,
                    kid_subsets: int = 100, kid_subset_size: int = 1000, seed: int = 0,
                    device=None, progress: bool = False, feature_extractor: str = "") -> dict:
    """FID / IS / KID of the PNGs 000000.png .. in `image_dir` against reference statistics.

    Streams the images in index order, `batch_size` at a time, through `feature_fn` (uint8
    [B, C, H, W] -> pool features, or (pool, logits) as `metrics.InceptionFeatures` gives)
    into `metrics.stream_sample_statistics`: FID from the running moments (Heusel et al.
    2017), IS over min(is_splits, n) contiguous splits, KID from the features of the first
    `kid_features` images against the reference's stored subset. `reference`: an ImageStats
    or a .npz path. n: all images generation.json names (or, without it, 0, 1, ... up to the
    first gap). Returns the result with its protocol (JSON-ready).
    """
    from lsgm_edu import checkpoint as ckpt
    from lsgm_edu import metrics

    generation = read_generation(image_dir) if Path(image_dir).is_dir() else None
    image_dir, n = _check_evaluate_args(image_dir, n, batch_size, generation)
    reference_path = None
    if not isinstance(reference, metrics.ImageStats):
        reference_path = Path(reference)
        reference = metrics.ImageStats.load(reference_path)
    shape = None if generation is None else generation.get("image_shape")
    splits = min(is_splits, n)
    got = metrics.stream_sample_statistics(
        stream_image_folder(image_dir, n, batch_size, shape), feature_fn, n, is_splits=splits,
        keep_features=min(kid_features, n), device=device, progress=progress,
        source=f"{n} images of {image_dir}")
    if got.stats.mu.shape != reference.mu.shape:
        raise ValueError(f"the reference statistics ({reference.source}) have feature dim "
                         f"{reference.mu.shape[0]}, the images {got.stats.mu.shape[0]}: use the "
                         f"feature extractor that made the reference statistics")
    fid = metrics.frechet_distance(got.stats.mu, got.stats.sigma, reference.mu, reference.sigma)
    kid, kid_protocol = kid_against_reference(got.features, reference, subsets=kid_subsets,
                                              subset_size=kid_subset_size, seed=seed,
                                              device=device)
    score = got.inception_score
    return {
        "images": str(image_dir),
        "n": n,
        "fid": fid,
        "inception_score": None if score is None else score[0],
        "inception_score_std": None if score is None else score[1],
        "kid": None if kid is None else kid[0],
        "kid_std": None if kid is None else kid[1],
        "reference_statistics": None if reference_path is None else str(reference_path),
        "reference_statistics_sha256": (None if reference_path is None
                                        else ckpt.sha256_file(reference_path)),
        "reference_source": reference.source,
        "reference_n": reference.n,
        "feature_extractor": feature_extractor or getattr(feature_fn, "__qualname__", ""),
        "generation": generation,
        "protocol": _evaluation_protocol(n, generation, reference, splits, kid_protocol,
                                         feature_extractor),
    }


def _evaluation_protocol(n, generation, reference, splits, kid_protocol, extractor) -> str:
    if generation is None:
        made = "images of unknown origin (no generation.json)"
    else:
        s, lsgm = generation["sampler"], generation.get("lsgm")
        steps = "adaptive dopri5" if s["method"] == "ode" else f"{s['steps']} steps"
        if s["method"] == "ode" and s.get("rtol") is not None:
            steps += f" at rtol = atol = {s['rtol']}"
        weights = (f"{generation['weights']} weights" if lsgm is None else
                   f"an LSGM (score prior: {lsgm['score_prior_weights']} weights, VAE: "
                   f"{lsgm['vae_weights']} weights, images the decoder's "
                   f"{lsgm['decoder_output']})")
        made = (f"{weights} of {generation['checkpoint']} (sha256 "
                f"{str(generation['checkpoint_sha256'])[:12]}...), sampler {s['method']} with "
                f"{steps}, NFE {generation.get('nfe')}, seed {generation['seed']}")
    bias = ("" if n >= 50_000 else f"; FID is biased upwards at {n} samples: the papers' "
            f"tables use 50,000 (Chong & Forsyth 2020)")
    return (f"FID of {n} 8-bit PNG images ({made}) against the reference statistics "
            f"({reference.source}, {reference.n or 'unknown number of'} images), features "
            f"of {extractor or 'the given feature function'}, streamed in index order into "
            f"running float64 moments; IS: {splits} contiguous splits of the logits; KID: "
            f"{kid_protocol}{bias}")


def reference_statistics(path, dataset, feature_fn, *, data_dir=None, kid_features=10_000,
                         device=None, progress=True):
    """Load the statistics at `path`, or compute them from the whole training set of
    `dataset` (8-bit images, features of a seeded random subset kept for KID) and save them
    there (when `path` is given)."""
    import torch

    from lsgm_edu import data as data_module
    from lsgm_edu import metrics

    if path is not None and Path(path).is_file():
        return metrics.ImageStats.load(path)
    if dataset is None:
        raise ValueError("no reference statistics: pass --ref-stats FILE.npz (the folder has no "
                         "generation.json naming its data set)")
    train_set = data_module.load_dataset(dataset, "train", data_dir)
    levels = train_set.num_levels
    loader = torch.utils.data.DataLoader(train_set, batch_size=250)
    k = min(kid_features, len(train_set))
    stats = metrics.compute_reference_statistics(
        (data_module.to_8bit(x, levels) for x, _ in loader), feature_fn, device=device,
        keep_features=k, seed=REFERENCE_SUBSET_SEED, progress=progress,
        source=f"{dataset} train, all {len(train_set)} images; features of a random subset of "
               f"{k} (seed {REFERENCE_SUBSET_SEED}) kept for KID")
    if path is not None:
        stats.save(path)
    return stats


# --- command line --------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {value}")
    return value


def add_generate_parser(sub, common=None) -> argparse.ArgumentParser:
    """Register `generate` on the subparsers `sub` (with `common`'s options, e.g. --debug)."""
    p = sub.add_parser("generate", parents=[common] if common is not None else [],
                       help="sample N images into a folder of PNGs (sharded under torchrun, "
                            "resumable), for eval --images")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, help="folder receiving 000000.png, 000001.png, ...")
    p.add_argument("--num-samples", "--n", dest="n", type=_positive_int,
                   help="number of images (default: the config's eval.num_samples, 50,000 for "
                        "the papers' configs); under torchrun write --num-samples, as torchrun "
                        "reads --n as an abbreviation of its own options")
    p.add_argument("--method", choices=METHODS, help="sampler (default: the config's)")
    p.add_argument("--striding", choices=["uniform", "quadratic"],
                   help="time grid of em / sscs (default: the config's)")
    p.add_argument("--steps", type=_positive_int, help="sampler steps (default: the config's)")
    p.add_argument("--tol", type=_tolerance,
                   help=f"LSGM with --method ode: rtol = atol of the latent PF-ODE (default "
                        f"{LSGM_TOL}, LSGM's CIFAR-10 FID; its CelebA-HQ 256 FID uses 1e-2)")
    p.add_argument("--seed", type=int, default=0, help="image i is drawn from a seed derived "
                   "from (seed, i)")
    p.add_argument("--batch-size", type=_positive_int, default=250,
                   help="images per batch and process (ode and pc-with-corrector images "
                        "depend on it)")
    p.add_argument("--weights", choices=["ema", "raw"], default="ema",
                   help="the EMA weights (the papers' protocol) or the raw training weights "
                        "(an LSGM: of its score prior; its VAE keeps the weights it has)")
    p.add_argument("--device", help="default: cuda:LOCAL_RANK if CUDA is available, else cpu")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.set_defaults(fn=cmd_generate)
    return p


def add_eval_images_options(p: argparse.ArgumentParser) -> None:
    """`eval --images DIR`: evaluate a folder written by `generate` instead of sampling."""
    p.add_argument("--images", metavar="DIR",
                   help="FID / IS / KID of the PNGs of a generate folder, streamed (no "
                        "--checkpoint); the result goes to --json or DIR/evaluation.json")


def is_lsgm_checkpoint(path) -> bool:
    """Whether a checkpoint's sidecar names an LSGM config (read without loading tensors)."""
    try:
        return _sidecar(path)["config"]["model"]["name"] == "lsgm"
    except (KeyError, TypeError):
        return False


def _refuse_vae_stage(path) -> None:
    """A stage-"vae" LSGM checkpoint holds the VAE alone: nothing for generate to sample."""
    models = _sidecar(path).get("models")
    if isinstance(models, list) and "sgm" not in models:
        raise ValueError(
            f"{path}: a stage-'vae' LSGM checkpoint (models {models}: the VAE alone, with its "
            f"N(0, I) prior), not an LSGM with a score prior; generate samples an LSGM's score "
            f"prior and decodes it: train stage 'lsgm' from this checkpoint (python -m lsgm_edu "
            f"train --config CONFIG --stage lsgm --vae-checkpoint {path}) and generate from "
            f"that (python -m lsgm_edu sample shows this VAE's own samples)")


def _load(checkpoint, ema: bool, device):
    """(model, sde, cfg) of a score-model or LSGM checkpoint, on `device`."""
    from lsgm_edu.train import load_lsgm, load_score_model

    if is_lsgm_checkpoint(checkpoint):
        return load_lsgm(checkpoint, ema=ema, device=device)
    model, cfg = load_score_model(checkpoint, ema=ema, device=device)
    return model, model.sde, cfg


def _rank_device(device: str | None) -> str | None:
    """--device for this process: `cuda` means cuda:LOCAL_RANK under torchrun."""
    if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def cmd_generate(args) -> int:
    import torch

    from lsgm_edu.train import setup_distributed

    tol = getattr(args, "tol", None)
    if is_lsgm_checkpoint(args.checkpoint):
        _refuse_vae_stage(args.checkpoint)
    elif tol is not None:  # before torchrun's process group is set up
        raise ValueError(f"--tol {tol}: the latent PF-ODE tolerance of an LSGM; "
                         f"{args.checkpoint} is a score model (its ODE runs at 1e-5)")
    dist = setup_distributed(_rank_device(args.device))
    # an exported file (kind "ema") holds only the EMA weights: those, whatever --weights says
    weights = "ema" if args.weights == "ema" or _sidecar(args.checkpoint).get("kind") == "ema" \
        else "raw"
    model, sde, cfg = _load(args.checkpoint, weights == "ema", dist.device)
    record = generate_images(
        model, sde, cfg, args.n or cfg.eval.num_samples, args.out, seed=args.seed,
        batch_size=args.batch_size, method=args.method, steps=args.steps,
        striding=args.striding, tol=tol, dist=dist, progress=not args.no_progress,
        checkpoint=args.checkpoint, weights=weights)
    if dist.main:
        print(json.dumps({"images": str(args.out), "n": record["n"], "model": record["model"],
                          "sampler": record["sampler"], "nfe": record["nfe"],
                          "weights": weights, "lsgm": record.get("lsgm")}))
    if dist.world_size > 1:
        torch.distributed.destroy_process_group()
    return 0


def cmd_eval_images(args) -> int:
    """`eval --images DIR`: FID / IS / KID of a generate folder with the Inception port."""
    from lsgm_edu import checkpoint as ckpt
    from lsgm_edu import metrics

    image_dir = Path(args.images)
    generation = read_generation(image_dir) if image_dir.is_dir() else None
    device = args.device or "cpu"
    extractor = metrics.InceptionFeatures(args.inception_weights).to(device)
    reference = reference_statistics(
        args.ref_stats, fid_reference_dataset(generation), extractor,
        data_dir=args.data_dir, kid_features=args.kid_features, device=device)
    result = evaluate_images(
        image_dir, args.ref_stats if args.ref_stats else reference, extractor,
        n=args.num_samples, batch_size=args.batch_size, kid_features=args.kid_features,
        kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size, seed=args.seed,
        device=device, progress=True,
        feature_extractor=f"pool3 (2048-d) and unbiased logits of torch-fidelity's port of the "
                          f"TF FID Inception (inception-2015-12-05), weights "
                          f"{extractor.weights_path}")
    text = json.dumps(result, indent=1, allow_nan=False)
    ckpt.atomic_write_text(args.json or image_dir / "evaluation.json", text + "\n")
    print(text)
    return 0


def main(argv=None) -> int:
    """`python -m lsgm_edu.generate ...`: the generate command alone (also under torchrun)."""
    parser = argparse.ArgumentParser(prog="python -m lsgm_edu.generate")
    sub = parser.add_subparsers(dest="command")
    add_generate_parser(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv if argv[:1] == ["generate"] else ["generate", *argv])
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())

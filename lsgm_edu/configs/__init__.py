"""Experiment configs: typed dataclasses loaded from YAML, checked before any compute.

`load_config("cifar10_ddpmpp_vp", overrides=["train.batch_size=64"])` reads the YAML file of that
name in this folder (or a path), applies `section.key=value` overrides (values parsed as YAML),
and returns a `Config`. An unknown key, a value of the wrong type or an impossible combination
raises `ConfigError` naming the key, so nothing is trained with a typo.

Sections that are parts name them: `sde: {name: vp, beta_min: 0.1, beta_max: 20.0, N: 1000}`
picks `lsgm_edu.sde.VPSDE` from `lsgm_edu.registry.SDES` and its keys are checked against the
constructor's own signature; `model: {name: unet, arch: ddpmpp, ...}` is a `UNetConfig`. To
switch a part, replace the whole section: `--set 'sde={name: ve, sigma_max: 50.0}'`.

Configs of the first format (`sde.name: vpsde | subvpsde | vesde` with `sde.eps` and
`sde.sampling_eps`, `model.name: ddpmpp | ncsnpp`), as in checkpoints written before the
registries, are converted with a `LegacyConfigWarning` that shows what changed; `python -m
lsgm_edu configs --convert OLD.yaml` prints the new form.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lsgm_edu.nets.unet import UNetConfig
from lsgm_edu.registry import MODELS, SDES, Registry, UnknownName

CONFIG_DIR = Path(__file__).resolve().parent
_RUN_NAME = re.compile(r"[^/\\.\x00][^/\\\x00]*")  # one folder name: no separator, no leading "."


class ConfigError(ValueError):
    """A config key is unknown, has the wrong type, or contradicts another key."""


class LegacyConfigWarning(UserWarning):
    """A config of the first format was converted; the message shows the new form."""


def part(registry: Registry, default: str):
    """A section that names its part: `{name: ..., **parameters}` of an entry of `registry`."""
    return field(default_factory=registry[default].params, metadata={"registry": registry})


@dataclass
class DataConfig:
    dataset: str = "cifar10"
    data_dir: str | None = None
    download: bool = False
    random_flip: bool = True
    centered: bool = True  # model sees [-1, 1] (True) or [0, 1] (False, the reference's VE setting)
    dequantize: bool = False  # uniform dequantization of the 8-bit data during training
    num_workers: int = 0


@dataclass
class TrainConfig:
    """Optimisation, EMA, precision and checkpointing (Song et al. 2021, App. D/H)."""

    n_iters: int = 1_300_000
    batch_size: int = 128  # global batch, split over DDP ranks
    micro_batch: int = 0  # rows per forward/backward in each process (gradient accumulation); 0: all
    eps: float = 1e-5  # smallest diffusion time in training and likelihood (Song et al. 2021)
    lr: float = 2e-4
    beta1: float = 0.9
    beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    warmup: int = 5000
    grad_clip: float = 1.0
    ema_rate: float = 0.9999
    reduce_mean: bool = False  # per-sample loss: mean over dimensions instead of sum
    likelihood_weighting: bool = False  # lambda(t) = g(t)^2 (Song et al. 2021b)
    importance_sampling: bool = False  # t ~ q(t) proportional to g^2/sigma^2, loss weighted by 1/q
    hsm: bool = True  # phase space: hybrid score matching (m0 integrated out); false: DSM, m0 drawn
    mixed_score: bool = False  # CLD's mixed score -m / Sigma_mm + network (momentum head only)
    seed: int = 0
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    compile: bool = False
    channels_last: bool = True  # CUDA only
    log_every: int = 50
    sample_every: int = 5000
    ckpt_every: int = 5000
    keep_last: int = 3
    sample_grid: int = 64  # images in each periodic sample grid


@dataclass
class SamplingConfig:
    method: str = "pc"  # pc | em | ode | sscs (phase-space SDEs of the complete recipe)
    # pc's predictor: reverse_diffusion | euler_maruyama (the reference's VE / VP configs);
    # auto: reverse diffusion when the steps equal the SDE's N, else Euler-Maruyama
    predictor: str = "auto"
    striding: str = "uniform"  # time grid of pc / em / sscs: uniform | quadratic
    eps: float = 1e-3  # where samplers stop (Song et al. 2021, App. C: 1e-3 VP, 1e-5 VE)
    steps: int = 1000
    snr: float = 0.16
    n_corrector: int = 1
    grid_steps: int = 200  # steps for the periodic sample grids during training


@dataclass
class EvalConfig:
    num_samples: int = 50_000  # FID protocol: 50k samples against training-set statistics
    batch_size: int = 500
    bpd_num_samples: int = 10_000


@dataclass
class LSGMTrainConfig:
    """LSGM's two training stages (Vahdat, Kreis & Kautz 2021), read when `model.name: lsgm`.

    Stage "vae" pre-trains the NVAE alone (the reference's train_vae.py): NELBO with KL warm-up
    from kl_const_coeff to kl_max_coeff over kl_anneal_portion of train.n_iters, KL balancing,
    spectral regularization. Stage "lsgm" trains the VAE and the score prior end to end from
    `vae_checkpoint` (train_vada.py): the SGM at train.lr with train.adam_eps and the EMA of
    train.ema_rate, the VAE at lr_vae with adam_eps_vae and no EMA; the KL coefficient rises
    from kl_const_coeff_lsgm to 1 over kl_anneal_portion_lsgm when kl_anneal_lsgm. With
    train_vae false (the reference without --train_vae, its "prior only" stage) the VAE is
    frozen in eval mode and only the score prior trains.
    """

    # stage "vae" (its own length and batch; the other train.* settings are shared)
    vae_pretrain_iters: int = 78_000  # train_vae.py --epochs x iterations per epoch
    vae_pretrain_batch_size: int = 256  # global batch of the VAE pre-training
    lr_vae_pretrain: float = 1e-2  # --learning_rate of train_vae.py (Adamax there, AdamW here)
    lr_min_vae_pretrain: float = 1e-4  # --learning_rate_min: cosine annealing's end
    kl_anneal_portion: float = 0.3  # --kl_anneal_portion
    kl_const_portion: float = 1e-4  # --kl_const_portion
    kl_const_coeff: float = 1e-4  # --kl_const_coeff
    kl_max_coeff: float = 1.0  # --kl_max_coeff
    kl_balance: bool = True  # NVAE's KL balancing during the warm-up
    weight_decay_norm_vae: float = 1e-2  # spectral regularization λ of the VAE (both stages)
    # stage "lsgm"
    vae_checkpoint: str | None = None  # the stage-"vae" checkpoint (sidecar .json) to start from
    train_vae: bool = True  # --train_vae; false: the VAE stays as loaded, only the prior trains
    lr_vae: float = 1e-4  # --learning_rate_vae
    lr_min_vae: float = 1e-5  # --learning_rate_min_vae (the SGM's rate stays at train.lr)
    adam_eps_vae: float = 1e-3  # the VAE's Adam eps (the SGM's is train.adam_eps)
    weight_decay_norm_sgm: float = 0.0  # --weight_decay_norm_dae (GroupNorm max|γ| terms)
    iw_sample_p: str = "drop_all_iw"  # the SGM's time sampler and weighting (lsgm.P_WEIGHTINGS)
    iw_sample_q: str = "reweight_p_samples"  # the VAE's: reweight_p_samples | ll_uniform | ll_iw
    disjoint_training: bool = False  # --disjoint_training: the VAE's and the SGM's t, ε independent
    time_eps: float = 0.01  # --time_eps: the smallest diffusion time of the cross-entropy
    kl_anneal_lsgm: bool = True  # --cont_kl_anneal
    kl_anneal_portion_lsgm: float = 0.1  # --kl_anneal_portion_vada
    kl_const_coeff_lsgm: float = 0.7  # --kl_const_coeff_vada
    drop_inactive_var: bool = False  # --drop_inactive_var: N(0, I) on channels of KL <= threshold
    inactive_threshold: float = 0.1  # nats per channel of the top latent (the reference's 0.1)
    inactive_batches: int = 1000  # training batches averaged to find them (the reference's cap)


@dataclass
class Config:
    """An experiment. `model` and `sde` are the parameter dataclasses of registered parts
    (`MODELS.name_of(cfg.model)`, `SDES.build(cfg.sde)`)."""

    name: str = "unnamed"
    model: Any = part(MODELS, "unet")  # noqa: RUF009 (a field); a UNetConfig for 'unet'
    sde: Any = part(SDES, "vp")  # noqa: RUF009
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    lsgm: LSGMTrainConfig = field(default_factory=LSGMTrainConfig)

    def to_dict(self) -> dict:
        """Nested plain data, as in the YAML files: each part's section starts with its name."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            registry = f.metadata.get("registry")
            if registry is not None:
                out[f.name] = {"name": registry.name_of(value), **dataclasses.asdict(value)}
            elif dataclasses.is_dataclass(value):
                out[f.name] = dataclasses.asdict(value)
            else:
                out[f.name] = value
        return out


_CHOICES = {
    "train.precision": ("auto", "bf16", "fp32"),
    "sampling.method": ("pc", "em", "ode", "sscs"),
    "sampling.predictor": ("auto", "reverse_diffusion", "euler_maruyama"),
    "sampling.striding": ("uniform", "quadratic"),
    "lsgm.iw_sample_p": ("ll_uniform", "ll_iw", "drop_all_uniform", "drop_all_iw",
                         "drop_sigma2t_uniform", "drop_sigma2t_iw"),
    "lsgm.iw_sample_q": ("reweight_p_samples", "ll_uniform", "ll_iw"),
}


def available_configs() -> list[str]:
    """Names of the configs shipped with the package."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _coerce(value, tp, key: str):
    """Check `value` against the annotation `tp`; return it converted (list -> tuple, int -> float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        item = args[0]
        return tuple(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads 1e-4 without a dot as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):  # no setting means anything at nan or inf
            raise ConfigError(f"{key}: expected a finite number, got {value}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported annotation {tp!r}")


def _build(cls, data, prefix: str, what: str = ""):
    """Instantiate dataclass `cls` from a mapping, rejecting unknown keys by name."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = list(fields)
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key '{full}'{hint}{what}")
        registry = fields[key].metadata.get("registry")
        tp = hints[key]
        if registry is not None:
            kwargs[key] = _build_part(registry, value, full)
        elif dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, full)
        else:
            kwargs[key] = _coerce(value, tp, full)
    missing = [k for k, f in fields.items() if k not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{prefix or 'config'}: missing required key(s) {', '.join(missing)}{what}")
    try:
        return cls(**kwargs)
    except ValueError as e:  # the class's own checks (UNetConfig.validate, the SDE constructor)
        msg = str(e).replace(f"{cls.__name__}.", f"{prefix}." if prefix else "")
        raise ConfigError(f"{prefix}: {msg}" if prefix and not msg.startswith(prefix) else msg) \
            from None


def _build_part(registry: Registry, data, prefix: str):
    """A section `{name: ..., **params}`: the named entry's parameter dataclass, checked."""
    if not isinstance(data, dict) or "name" not in data:
        raise ConfigError(f"{prefix}: expected a mapping with a 'name' (one of "
                          f"{', '.join(registry.names())}), got {data!r}")
    params = dict(data)
    name = params.pop("name")
    try:
        entry = registry[name]
    except UnknownName as e:
        raise ConfigError(f"{prefix}.name: {e}") from None
    try:
        obj = _build(entry.params, params, prefix, f"; {name!r} is {entry.signature}")
    except ConfigError as e:
        if str(e).startswith("unknown config key") and "did you mean" not in str(e):
            raise ConfigError(f"{e}. To switch the {registry.kind}, replace the whole section, "
                              f"e.g. --set '{prefix}={{name: {name}}}'") from None
        raise
    try:  # build it once: the constructor's own value checks run before any compute
        if registry is SDES:
            registry.build(obj)
    except ValueError as e:
        raise ConfigError(f"{prefix}: {e}") from None
    return obj


def _set_override(tree: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.lr=1e-4")
    path, raw = item.split("=", 1)
    keys = path.strip().split(".")
    if not all(keys):
        raise ConfigError(f"override {item!r}: empty key in {path!r}")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from None
    node = tree
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: '{k}' is a value, not a section")
        node = child
    node[keys[-1]] = value


def validate(cfg: Config) -> Config:
    """Cross-key checks that would otherwise fail after minutes of compute."""
    for key, allowed in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}")
    from lsgm_edu import data as data_module

    if cfg.data.dataset not in data_module.DATASETS:
        raise ConfigError(
            f"data.dataset: unknown dataset {cfg.data.dataset!r}; "
            f"known: {', '.join(sorted(data_module.DATASETS))}"
        )
    c, h, w = data_module.DATASETS[cfg.data.dataset].image_shape
    sde = SDES.build(cfg.sde)
    is_lsgm = MODELS.name_of(cfg.model) == "lsgm"  # its SDE diffuses the latent, not the image
    K = 1 if is_lsgm else sde.K
    if (cfg.model.num_channels, cfg.model.image_size) != (K * c, h) or h != w:
        state = "" if K == 1 else f" (the state of {K} phase components)"
        raise ConfigError(
            f"model.image_size/model.num_channels = {cfg.model.image_size}/"
            f"{cfg.model.num_channels} do not fit data.dataset {cfg.data.dataset!r} with images "
            f"{c}x{h}x{w}; set model.image_size={h} model.num_channels={K * c}{state}"
        )
    if not is_lsgm:
        _validate_phase_space(cfg, sde, c)
    _validate_sampler(cfg, sde)
    t = cfg.train
    positive = {
        "train.n_iters": t.n_iters, "train.batch_size": t.batch_size, "train.lr": t.lr,
        "train.log_every": t.log_every, "train.sample_every": t.sample_every,
        "train.ckpt_every": t.ckpt_every, "train.keep_last": t.keep_last,
        "sampling.steps": cfg.sampling.steps, "sampling.grid_steps": cfg.sampling.grid_steps,
        "eval.num_samples": cfg.eval.num_samples, "eval.batch_size": cfg.eval.batch_size,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be > 0, got {value}")
    for key, value in {"train.ema_rate": t.ema_rate, "train.beta1": t.beta1,
                       "train.beta2": t.beta2}.items():
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{key} must be in [0, 1), got {value}")
    for key, value in {"train.warmup": t.warmup, "train.grad_clip": t.grad_clip,
                       "train.sample_grid": t.sample_grid, "train.weight_decay": t.weight_decay,
                       "train.micro_batch": t.micro_batch,
                       "data.num_workers": cfg.data.num_workers}.items():
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    if t.micro_batch and t.batch_size % t.micro_batch:
        raise ConfigError(f"train.micro_batch={t.micro_batch} must divide train.batch_size="
                          f"{t.batch_size} (each process accumulates whole micro-batches)")
    if not t.adam_eps > 0:
        raise ConfigError(f"train.adam_eps must be > 0, got {t.adam_eps}")
    if not _RUN_NAME.fullmatch(cfg.name):
        raise ConfigError(f"name: {cfg.name!r} names the run folder runs/<name>, so it must be "
                          f"one folder name: no '/' or '\\', not starting with '.'")
    if not 0.0 < t.eps < 1.0 or not 0.0 < cfg.sampling.eps < 1.0:
        raise ConfigError("train.eps and sampling.eps must be in (0, 1)")
    if is_lsgm:
        _validate_lsgm(cfg, sde)
    if cfg.model.num_classes and cfg.data.dataset in ("celebahq256",):
        raise ConfigError(f"model.num_classes={cfg.model.num_classes}: {cfg.data.dataset} has no labels")
    return cfg


def _validate_phase_space(cfg: Config, sde, data_channels: int) -> None:
    """The score head, mixed score and sampler fit the SDE's phase components."""
    out = getattr(cfg.model, "out_channels", 0) or cfg.model.num_channels
    heads = {sde.K * data_channels: "state"}
    if sde.momentum_head_allowed:
        heads[data_channels] = "momentum"  # CLD: no noise on x, the x-score is never used
    if out not in heads:
        raise ConfigError(f"model.out_channels={out}: {SDES.name_of(cfg.sde)} needs the noise of "
                          f"the whole state ({sde.K * data_channels} channels)"
                          + (f" or of the momentum ({data_channels})" if len(heads) > 1 else ""))
    if cfg.train.mixed_score and heads[out] != "momentum":
        raise ConfigError("train.mixed_score is CLD's: it needs sde.name cld (or psld with "
                          "Gamma = 0) and a momentum head (model.out_channels = data channels)")
    if sde.K > 1 and not cfg.data.centered:
        raise ConfigError("data.centered must be true for a phase-space SDE (data in [-1, 1])")


def _validate_sampler(cfg: Config, sde) -> None:
    """The sampling method and striding fit the SDE."""
    if cfg.sampling.method == "sscs" and not sde.supports_splitting:
        raise ConfigError(f"sampling.method=sscs needs an SDE of the complete recipe (cld, psld), "
                          f"got {SDES.name_of(cfg.sde)}")
    if cfg.sampling.striding != "uniform" and cfg.sampling.method in ("ode", "pc"):
        raise ConfigError(f"sampling.striding={cfg.sampling.striding} is for em and sscs; "
                          f"{cfg.sampling.method} uses its own grid")


def _validate_lsgm(cfg: Config, sde) -> None:
    """An LSGM config: bounded data, a score prior on the state of the VAE's top latent, an SDE
    with a non-singular kernel at time_eps, sane stage settings."""
    lc = cfg.lsgm
    if cfg.data.centered or cfg.data.dequantize:
        raise ConfigError("data.centered and data.dequantize must be false for an LSGM: the VAE "
                          "reads images in [0, 1] and models the discrete pixels itself")
    sde_name = SDES.name_of(cfg.sde)
    latent = cfg.model.vae.top_latent_shape[0]
    if cfg.model.sgm.num_channels != sde.K * latent:
        raise ConfigError(f"model.sgm.num_channels={cfg.model.sgm.num_channels}: the {sde_name} "
                          f"prior diffuses the state of {sde.K} phase component(s) of the "
                          f"{latent}-channel top latent; set {sde.K * latent}")
    from lsgm_edu.lsgm import takes_time_samplers

    if not takes_time_samplers(sde, lc.iw_sample_p, lc.iw_sample_q):
        raise ConfigError(f"lsgm.iw_sample_p={lc.iw_sample_p} / iw_sample_q={lc.iw_sample_q}: "
                          f"the importance samplers of t are derived for a VP-type SDE (vp, "
                          f"geometric_vp); a {sde_name} prior takes uniform t (iw_sample_p "
                          f"drop_all_uniform or ll_uniform, iw_sample_q reweight_p_samples or "
                          f"ll_uniform)")
    if not 0.0 <= lc.time_eps < 1.0 or not _kernel_scale_positive(sde, lc.time_eps):
        raise ConfigError(f"lsgm.time_eps={lc.time_eps}: need 0 <= time_eps < 1 with a non-zero "
                          f"kernel variance there (0.01 for vp; 0 works for geometric_vp)")
    for key in ("vae_pretrain_iters", "vae_pretrain_batch_size", "lr_vae_pretrain", "lr_vae",
                "adam_eps_vae", "kl_max_coeff"):
        if not getattr(lc, key) > 0:
            raise ConfigError(f"lsgm.{key} must be > 0, got {getattr(lc, key)}")
    for key, top in (("lr_min_vae_pretrain", "lr_vae_pretrain"), ("lr_min_vae", "lr_vae")):
        if not 0 <= getattr(lc, key) <= getattr(lc, top):
            raise ConfigError(f"lsgm.{key} must lie in [0, lsgm.{top}], got {getattr(lc, key)}")
    for key in ("kl_anneal_portion", "kl_const_portion", "kl_anneal_portion_lsgm"):
        if not 0.0 <= getattr(lc, key) <= 1.0:
            raise ConfigError(f"lsgm.{key} must be in [0, 1], got {getattr(lc, key)}")
    if not 0.0 <= lc.kl_const_coeff <= lc.kl_max_coeff or not 0.0 <= lc.kl_const_coeff_lsgm <= 1:
        raise ConfigError("lsgm.kl_const_coeff must lie in [0, kl_max_coeff] and "
                          "lsgm.kl_const_coeff_lsgm in [0, 1]")
    if lc.weight_decay_norm_vae < 0 or lc.weight_decay_norm_sgm < 0:
        raise ConfigError("lsgm.weight_decay_norm_vae and lsgm.weight_decay_norm_sgm must be >= 0")
    if lc.disjoint_training and lc.iw_sample_q == "reweight_p_samples":
        raise ConfigError("lsgm.disjoint_training draws the VAE's own t: set lsgm.iw_sample_q to "
                          "ll_iw or ll_uniform (LSGM's CelebA-HQ recipe uses ll_iw)")
    if lc.disjoint_training and not lc.train_vae:
        raise ConfigError("lsgm.disjoint_training is a way to train the VAE with the prior; with "
                          "lsgm.train_vae=false only the prior trains: drop one of the two")
    if not lc.inactive_threshold >= 0 or not lc.inactive_batches >= 1:
        raise ConfigError(f"lsgm.inactive_threshold must be >= 0 and lsgm.inactive_batches >= 1, "
                          f"got {lc.inactive_threshold} and {lc.inactive_batches}")


def _kernel_scale_positive(sde, t: float) -> bool:
    """Whether the kernel of `sde` at time t has a non-singular covariance."""
    import torch

    try:
        L = sde.marginal_scale(torch.tensor([t], dtype=torch.float64))
    except ValueError:  # a singular covariance has no Cholesky factor
        return False
    return bool((torch.diagonal(L.reshape(1, sde.K, sde.K), dim1=-2, dim2=-1).abs() > 0).all())


_LEGACY_SDES = {"vpsde": "vp", "subvpsde": "subvp", "vesde": "ve"}
_LEGACY_ARCHS = ("ddpmpp", "ncsnpp")


def convert_legacy(tree: dict) -> tuple[dict, list[str]]:
    """(tree in the current format, what changed) for a config of the first format.

    First format: `sde: {name: vpsde|subvpsde|vesde, beta_min, beta_max, sigma_min, sigma_max,
    N, eps, sampling_eps}` (every SDE's keys, the unused ones ignored) and `model: {name:
    ddpmpp|ncsnpp, ...}`. Now: `sde: {name: vp|subvp|ve, <that constructor's arguments>}`,
    `train.eps`, `sampling.eps`, and `model: {name: unet, arch: ddpmpp|ncsnpp, ...}`.
    """
    tree, notes = copy.deepcopy(tree), []
    sde = tree.get("sde")
    if isinstance(sde, dict):
        for old, section in (("eps", "train"), ("sampling_eps", "sampling")):
            if old in sde:
                value = sde.pop(old)
                target = tree.setdefault(section, {}) or {}
                tree[section] = target
                if isinstance(target, dict):
                    target.setdefault("eps", value)
                notes.append(f"sde.{old} -> {section}.eps")
        if sde.get("name") in _LEGACY_SDES:
            new = _LEGACY_SDES[sde["name"]]
            keep = {f.name for f in dataclasses.fields(SDES[new].params)}
            dropped = sorted(k for k in sde if k not in keep and k != "name")
            tree["sde"] = {"name": new, **{k: v for k, v in sde.items() if k in keep}}
            notes.append(f"sde.name {sde['name']} -> {new}"
                         + (f" (dropped {', '.join(dropped)}: {new} does not use them)"
                            if dropped else ""))
    model = tree.get("model")
    if isinstance(model, dict) and model.get("name") in _LEGACY_ARCHS:
        arch = model.pop("name")
        tree["model"] = {"name": "unet", **model, "arch": arch}
        notes.append(f"model.name {arch} -> model.name unet, model.arch {arch}")
    return tree, notes


def config_from_dict(tree: dict, name: str = "unnamed", *, source: str = "config") -> Config:
    """Build and validate a `Config` from a nested mapping (as read from YAML).

    A first-format tree is converted (`convert_legacy`) with a `LegacyConfigWarning`.
    """
    tree, notes = convert_legacy(dict(tree))
    if notes:
        new = yaml.safe_dump({k: tree[k] for k in ("model", "sde", "train", "sampling")
                              if k in tree}, sort_keys=False, default_flow_style=None)
        warnings.warn(LegacyConfigWarning(
            f"{source} is in the first config format; converted ({'; '.join(notes)}). Write it "
            f"in the current format (python -m lsgm_edu configs --convert FILE):\n{new}"),
            stacklevel=3)
    tree.setdefault("name", name)
    return validate(_build(Config, tree, ""))


def read_yaml(path: str | Path):
    """The YAML file at `path`, or a ConfigError naming the file, line and problem."""
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{at}: {problem}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the config ({e})") from None


def load_config(name_or_path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load a shipped config by name (see `available_configs()`) or a YAML file by path."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(available_configs())
        raise ConfigError(f"no config {str(name_or_path)!r}: not a YAML file; shipped configs: {known}")
    tree = read_yaml(path)
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for item in overrides or []:
        _set_override(tree, item)
    return config_from_dict(tree, name=path.stem, source=str(path))


__all__ = [
    "Config", "ConfigError", "DataConfig", "EvalConfig", "LegacyConfigWarning", "SamplingConfig",
    "TrainConfig", "UNetConfig", "available_configs", "config_from_dict", "convert_legacy",
    "load_config", "validate",
]

"""Training: one loop around an objective, with EMA, warmup, clipping, bf16, DDP, exact resume.

`train(cfg, out_dir)` runs the Score SDE recipe (Song et al. 2021, App. D/H) by default: the
`DSM` objective on the U-Net of `cfg.model`, AdamW with a linear learning-rate warmup,
gradient-norm clipping and an EMA of the weights. The loop itself knows nothing of DSM: it trains
*named* models (`ModelSpec`: module, learning rate, warmup, clipping, EMA rate), one AdamW per
model, and calls `objective(models, batch, generator) -> (loss [B], logs)` (lsgm_edu.objectives)
through `train_step`, so LSGM's VAE + latent score model plug into the same loop. The same code
runs on a laptop CPU (fp32) and on GPUs (bf16 autocast, channels_last, optional torch.compile)
and under `torchrun` with DistributedDataParallel (gloo on CPU, nccl on GPU).

Every random draw of step k (data order, flips, dequantization noise, t, z, dropout) comes from
generators seeded by (seed, k) and is drawn for the *global* batch before each rank takes its
slice, so (i) a run resumed from a checkpoint continues bit for bit, and (ii) N ranks with
global batch B compute what one process with batch B computes (dropout aside: its masks come
from the global RNG, reseeded per step and rank). The same holds for gradient accumulation:
`train.micro_batch` splits each process's rows into micro-batches that keep their rows of the
global draws (`micro_batches`), so the paper's global batch runs on fewer or smaller GPUs.

Checkpoint tensors are named by model: `<model>/<param>`, `ema/<model>/<param>` and
`opt/<model>/<param>/<state>` (Adam's state by parameter name, not by position).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import functools
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch import nn
from tqdm.auto import tqdm

from lsgm_edu import checkpoint as ckpt
from lsgm_edu import data as data_module
from lsgm_edu.configs import Config, ConfigError, config_from_dict, convert_legacy
from lsgm_edu.nets import build_model
from lsgm_edu.nets.precond import ScoreModel
from lsgm_edu.objectives import DSM, Batch, BatchGenerator, LSGMObjective, VAEObjective
from lsgm_edu.registry import MODELS, SDES
from lsgm_edu.run_folder import RunFolder

STATE_LAYOUT = 2  # checkpoint tensors named <model>/..., ema/<model>/..., opt/<model>/<param>/...


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN/Inf; no checkpoint was written after it."""


# --- building blocks ------------------------------------------------------------------------


def build_sde(cfg_sde):
    """The forward SDE of a config's `sde` section (`lsgm_edu.registry.SDES`)."""
    return SDES.build(cfg_sde)


def init_model(cfg: Config) -> nn.Module:
    """The network of `cfg.model`, initialised from a generator seeded by `train.seed`."""
    return build_model(cfg.model, generator=seeded_generator(cfg.train.seed, 0))


def build_score_model(cfg: Config, sde=None) -> ScoreModel:
    """s(x, t, y) = -net(x, c(t), y) / σ_t with the U-Net of `cfg.model`."""
    sde = sde if sde is not None else build_sde(cfg.sde)
    return score_model_of(build_model(cfg.model), sde, cfg)


def score_model_of(net: nn.Module, sde, cfg: Config, parameterization: str = "eps") -> ScoreModel:
    """The ε-parameterized score of `net` as `cfg` trains it (data centering, mixed score);
    `parameterization` as a checkpoint's sidecar records it ("scale_by_sigma": converted from
    score_sde's VE models, lsgm_edu.convert)."""
    return ScoreModel(net, sde, centered=cfg.data.centered, mixed_score=cfg.train.mixed_score,
                      parameterization=parameterization)


def derived_seed(seed: int, *keys: int) -> int:
    """A 61-bit seed that depends on (seed, *keys) only."""
    h = seed & 0xFFFFFFFF
    for k in keys:
        h = (h * 1_000_003 + int(k) + 0x9E3779B9) % (2**61 - 1)
    return h


def seeded_generator(seed: int, *keys: int, device="cpu") -> torch.Generator:
    """A generator seeded by (seed, *keys): the same keys always give the same stream."""
    g = torch.Generator(device=device)
    g.manual_seed(derived_seed(seed, *keys))
    return g


def global_batch_indices(n: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Dataset indices of global batch `step`: a fresh seeded permutation per epoch, drop_last."""
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise ConfigError(
            f"train.batch_size={batch_size} is larger than the dataset ({n} images); lower it"
        )
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=seeded_generator(seed, 1, epoch))
    return perm[k * batch_size : (k + 1) * batch_size]


class StepBatches(torch.utils.data.Sampler):
    """Yields this rank's slice of the global batch for steps start..stop-1 (a batch_sampler)."""

    def __init__(self, n, batch_size, seed, start, stop, rank=0, world_size=1):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start, self.stop, self.rank, self.world = start, stop, rank, world_size
        self.local = batch_size // world_size

    def __len__(self):
        return max(self.stop - self.start, 0)

    def __iter__(self):
        for step in range(self.start, self.stop):
            idx = global_batch_indices(self.n, self.batch_size, step, self.seed)
            yield idx[self.rank * self.local : (self.rank + 1) * self.local].tolist()


def warmup_lr(lr: float, warmup: int, step: int) -> float:
    """Linear warmup over `warmup` steps to `lr` (Song et al. 2021, App. D)."""
    return lr if warmup <= 0 else lr * min((step + 1) / warmup, 1.0)


def cosine_lr(lr: float, lr_min: float, warmup: int, total: int, step: int) -> float:
    """Linear warmup to `lr`, then cosine annealing to `lr_min` at step `total` (NVAE / LSGM's
    CosineAnnealingLR, per step instead of per epoch)."""
    if step < warmup:
        return warmup_lr(lr, warmup, step)
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * progress))


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA ('auto' or 'bf16'), none (fp32) on CPU."""
    if precision == "fp32" or device.type != "cuda":
        return None
    return torch.bfloat16


# --- distributed ----------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str | None = None) -> Dist:
    """Read torchrun's environment; init gloo (CPU) or nccl (CUDA) when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local, dev)


def _all_reduce_mean(v: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world_size > 1:
        v = v.clone()
        dist.all_reduce(v)
        v /= d.world_size
    return v


def _check_same_start(start: int, ckpt_dir: Path, d: Dist) -> None:
    """Every process must resume from the same step: with several nodes, --out has to be on a
    filesystem they all share (rank 0 alone writes the checkpoints)."""
    if d.world_size == 1:
        return
    steps = torch.tensor([start, -start], dtype=torch.int64, device=d.device)
    dist.all_reduce(steps, op=dist.ReduceOp.MAX)
    low, high = -int(steps[1]), int(steps[0])
    if low != high:
        raise ckpt.CheckpointError(
            f"{ckpt_dir}: the processes resume from different steps ({low} to {high}; rank "
            f"{d.rank} sees {start}): the run folder (--out) must be on a filesystem shared by "
            f"every node, since rank 0 alone writes it")


def _barrier(d: Dist) -> None:
    if d.world_size > 1:
        dist.barrier()


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover every process's rows: what nn.SyncBatchNorm
    does on CUDA, for CPU (gloo) runs, where it is not available. Mean, then variance, are summed
    over processes by differentiable all-reduces, so N processes compute what one process with
    the global batch computes; running statistics are updated as BatchNorm2d updates them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        dims, shape = (0, 2, 3), (1, -1, 1, 1)
        count = all_reduce(x.new_tensor([x.numel() / x.shape[1]]))
        mean = all_reduce(x.sum(dims)) / count
        var = all_reduce((x - mean.reshape(shape)).pow(2).sum(dims)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (self.momentum if self.momentum is not None
                     else 1.0 / float(self.num_batches_tracked))
                self.running_mean.lerp_(mean.detach(), m)
                self.running_var.lerp_(var.detach() * count / (count - 1).clamp_min(1), m)
        y = (x - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + self.eps)
        return y * self.weight.reshape(shape) + self.bias.reshape(shape) if self.affine else y


def synchronize_batchnorm(module: nn.Module, cuda: bool) -> nn.Module:
    """Batch statistics over all processes: nn.SyncBatchNorm on CUDA, `GlobalBatchNorm2d` on
    CPU. Parameters and buffers are shared with the originals (optimizers stay valid)."""
    if cuda:
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            new = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats)
            new.weight, new.bias = child.weight, child.bias
            new.running_mean, new.running_var = child.running_mean, child.running_var
            new.num_batches_tracked = child.num_batches_tracked
            new.train(child.training)
            setattr(module, name, new)
        else:
            synchronize_batchnorm(child, cuda)
    return module


# --- named models, their optimizers and EMAs ------------------------------------------------


@dataclass
class ModelSpec:
    """One model a run trains: the module, its AdamW settings, warmup, clipping and EMA rate.

    `grad_clip` 0 means no clipping; `ema_rate` None means no EMA copy. A `frozen` model is run
    and saved but not trained: eval mode, no gradients, no optimizer, no EMA (LSGM's prior-only
    stage keeps its VAE so).
    """

    module: nn.Module
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup: int = 0
    grad_clip: float = 0.0
    ema_rate: float | None = None
    lr_min: float | None = None  # with total_steps: cosine annealing to lr_min after the warmup
    total_steps: int = 0
    frozen: bool = False

    @classmethod
    def from_train_config(cls, module: nn.Module, tc, **changes) -> ModelSpec:
        """The settings of `cfg.train` (lr, betas, warmup, clipping, EMA), with `changes`."""
        kw = {"lr": tc.lr, "betas": (tc.beta1, tc.beta2), "eps": tc.adam_eps,
              "weight_decay": tc.weight_decay, "warmup": tc.warmup, "grad_clip": tc.grad_clip,
              "ema_rate": tc.ema_rate}
        return cls(module, **{**kw, **changes})

    def lr_at(self, step: int) -> float:
        if self.lr_min is not None:
            return cosine_lr(self.lr, self.lr_min, self.warmup, self.total_steps, step)
        return warmup_lr(self.lr, self.warmup, step)


@dataclass
class TrainingSetup:
    """What `train` trains: named models and the objective over them.

    `sample(models, n, generator)` (optional) returns n images in [0, 1] for the periodic grids
    from the EMA models; `result_model(models)` (optional) is what `TrainResult.score_model`
    holds; `prepare(models, batches, log)` (optional) runs once before step 0 of a fresh run
    (not on resume: the checkpoint holds what it did), `batches` being a function that yields
    training batches as the objective sees them; the EMA copies are then set to the models.
    """

    models: dict[str, ModelSpec]
    objective: Callable
    sample: Callable | None = None
    result_model: Callable | None = None
    prepare: Callable | None = None

    def __post_init__(self):
        for name in self.models:
            if not name or "/" in name or name in ("ema", "opt"):
                raise ValueError(f"TrainingSetup: model name {name!r} is not allowed "
                                 f"(no '/', not 'ema' or 'opt')")


def dsm_setup(cfg: Config, sde=None) -> TrainingSetup:
    """Score SDE training: the DSM objective on the network of `cfg.model`, named 'score'."""
    sde = sde if sde is not None else build_sde(cfg.sde)
    spec = ModelSpec.from_train_config(init_model(cfg), cfg.train)

    def sample(models, n, generator):
        net = models["score"]
        x = sample_images(score_model_of(net, sde, cfg), sde, cfg.sampling, n,
                          steps=cfg.sampling.grid_steps, eps=cfg.sampling.eps,
                          generator=generator, device=next(net.parameters()).device)
        return to_unit_range(x, cfg.data.centered)

    def result_model(models):
        return score_model_of(models["score"], sde, cfg).eval()

    return TrainingSetup({"score": spec}, DSM.from_config(cfg, sde), sample, result_model)


STAGES = ("vae", "lsgm")


def _is_lsgm(cfg: Config) -> bool:
    return MODELS.name_of(cfg.model) == "lsgm"


def _check_stage(cfg: Config, stage: str | None) -> None:
    if _is_lsgm(cfg) and stage not in STAGES:
        raise ConfigError(f"{cfg.name}: an LSGM trains in two stages; choose --stage vae (the "
                          f"VAE alone) or --stage lsgm (end to end from lsgm.vae_checkpoint), "
                          f"got {stage!r}")
    if not _is_lsgm(cfg) and stage is not None:
        raise ConfigError(f"{cfg.name}: --stage {stage} is for LSGM configs (model.name: lsgm); "
                          f"this one trains a {MODELS.name_of(cfg.model)!r} with DSM")


def stage_config(cfg: Config, stage: str | None) -> Config:
    """The config a stage trains with: for LSGM's stage "vae", train.n_iters / batch_size /
    lr / adam_eps are lsgm.vae_pretrain_iters / vae_pretrain_batch_size / lr_vae_pretrain /
    adam_eps_vae; otherwise `cfg` itself."""
    _check_stage(cfg, stage)
    if stage != "vae":
        return cfg
    lc = cfg.lsgm
    train_cfg = dataclasses.replace(cfg.train, n_iters=lc.vae_pretrain_iters,
                                    batch_size=lc.vae_pretrain_batch_size,
                                    lr=lc.lr_vae_pretrain, adam_eps=lc.adam_eps_vae)
    return dataclasses.replace(cfg, train=train_cfg)


def training_setup(cfg: Config, stage: str | None = None) -> TrainingSetup:
    """DSM for a U-Net config; for an LSGM, `vae_setup` (stage "vae") or `lsgm_setup`."""
    _check_stage(cfg, stage)
    if stage == "vae":
        return vae_setup(cfg)
    if stage == "lsgm":
        return lsgm_setup(cfg)
    return dsm_setup(cfg)


def vae_setup(cfg: Config) -> TrainingSetup:
    """LSGM's first stage: the NVAE of `cfg.model.vae` alone ('vae', no EMA, the learning rate
    annealed to lsgm.lr_min_vae_pretrain), `VAEObjective`.

    The NVAE is initialised as `build_model(cfg.model)` initialises it (the same stream)."""
    from lsgm_edu.vae import NVAE

    vae = NVAE(cfg.model.vae, generator=seeded_generator(cfg.train.seed, 0))
    spec = ModelSpec.from_train_config(vae, cfg.train, ema_rate=None,
                                       lr_min=cfg.lsgm.lr_min_vae_pretrain,
                                       total_steps=cfg.train.n_iters)

    def sample(models, n, generator):
        return models["vae"].sample(n, generator, use_mean=True)

    return TrainingSetup({"vae": spec}, VAEObjective.from_config(cfg), sample,
                         lambda models: models["vae"])


def lsgm_setup(cfg: Config, sde=None) -> TrainingSetup:
    """LSGM end to end: 'vae' (from lsgm.vae_checkpoint, at lsgm.lr_vae annealed to lr_min_vae,
    with adam_eps_vae, no EMA; frozen when not lsgm.train_vae) and 'sgm' (the mixed score, at
    train.lr with the EMA of train.ema_rate), `LSGMObjective`."""
    from lsgm_edu import lsgm

    sde = sde if sde is not None else build_sde(cfg.sde)
    models = build_model(cfg.model, generator=seeded_generator(cfg.train.seed, 0), sde=sde)
    if not cfg.lsgm.train_vae and not cfg.lsgm.vae_checkpoint:
        raise ConfigError("lsgm.train_vae=false freezes the VAE, so it needs a trained one: set "
                          "lsgm.vae_checkpoint (--vae-checkpoint) to a stage-'vae' checkpoint")
    if cfg.lsgm.vae_checkpoint:
        ckpt.load_module_state(models["vae"], load_vae_weights(cfg.lsgm.vae_checkpoint, cfg),
                               f"lsgm.vae_checkpoint={cfg.lsgm.vae_checkpoint}", "vae/")
    tc, lc = cfg.train, cfg.lsgm
    specs = {"vae": ModelSpec.from_train_config(models["vae"], tc, lr=lc.lr_vae,
                                                eps=lc.adam_eps_vae, ema_rate=None,
                                                lr_min=lc.lr_min_vae, total_steps=tc.n_iters,
                                                frozen=not lc.train_vae),
             "sgm": ModelSpec.from_train_config(models["sgm"], tc)}

    def sample(models, n, generator):
        images, _ = lsgm.sample_images(models, sde, n, method=cfg.sampling.method,
                                       steps=cfg.sampling.grid_steps, eps=cfg.sampling.eps,
                                       generator=generator)
        return images

    def drop_inactive_channels(models, batches, log) -> None:
        """LSGM's `--drop_inactive_var`: channels of the top latent whose average KL is at most
        lsgm.inactive_threshold nats stay N(0, I) in the score prior (`MixedScore.set_active`)."""
        active = lsgm.active_channels(models["vae"], batches(lc.inactive_batches),
                                      lc.inactive_threshold)
        models["sgm"].set_active(active)
        log(f"drop_inactive_var: {int(active.sum())} of {active.numel()} top-latent channels "
            f"active (KL > {lc.inactive_threshold:g} nat); the others stay N(0, I)")

    return TrainingSetup(specs, LSGMObjective.from_config(cfg, sde), sample,
                         lambda models: nn.ModuleDict(models),
                         prepare=drop_inactive_channels if lc.drop_inactive_var else None)


def load_vae_weights(path: str | Path, cfg: Config) -> dict[str, torch.Tensor]:
    """The VAE tensors of a stage-"vae" (or LSGM) checkpoint, after checking that it holds the
    VAE of `cfg.model.vae`."""
    tensors, meta = ckpt.load_checkpoint(path)
    saved = meta.get("config", {}).get("model", {}).get("vae")
    now = _function_keys(json.loads(json.dumps(dataclasses.asdict(cfg.model.vae))))
    if saved is None:
        raise ConfigError(f"lsgm.vae_checkpoint={path}: not a checkpoint of an LSGM's VAE "
                          f"(its config has no model.vae); train one with --stage vae")
    saved = _function_keys(saved)
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs now {v!r}" for k, v in now.items()
             if saved.get(k) != v]
    if diffs:
        raise ConfigError(f"lsgm.vae_checkpoint={path}: its VAE differs from model.vae in "
                          + "; ".join(diffs))
    state = _part(tensors, "vae/")
    if not state:
        raise ckpt.CheckpointError(f"{path}: no 'vae/' tensors in this checkpoint")
    return state


class TrainState:
    """The named modules, one AdamW and (optionally) one EMA copy per trained model, on `device`.

    `forward` holds what the objective calls: the modules themselves, or their DDP / compiled
    wrappers (`wrap`); `modules` stay the raw modules that are saved and averaged; `specs` holds
    the trained models only (a frozen one is in `modules`, eval mode, without optimizer or EMA).
    """

    def __init__(self, specs: dict[str, ModelSpec], device="cpu"):
        self.specs = {n: s for n, s in specs.items() if not s.frozen}  # the trained models
        self.modules = {n: s.module.to(device) for n, s in specs.items()}
        for name in specs.keys() - self.specs.keys():
            self.modules[name].requires_grad_(False).eval()
        self.optimizers = {
            n: torch.optim.AdamW(self.modules[n].parameters(), lr=s.lr, betas=s.betas,
                                 eps=s.eps, weight_decay=s.weight_decay)
            for n, s in self.specs.items()}
        self.emas = {n: copy.deepcopy(self.modules[n]).requires_grad_(False)
                     for n, s in self.specs.items() if s.ema_rate is not None}
        self.forward = dict(self.modules)

    def sync_emas(self) -> None:
        """Set every EMA copy to its model (after a change made before step 0)."""
        for name, ema in self.emas.items():
            ema.load_state_dict(self.modules[name].state_dict())

    def wrap(self, fn: Callable[[nn.Module], nn.Module]) -> None:
        """Wrap the trained models (DDP, compile); frozen ones are called as they are."""
        self.forward = {n: fn(m) if n in self.specs else m for n, m in self.modules.items()}

    def eval_models(self) -> dict[str, nn.Module]:
        """The EMA copy of each model where it has one, else the model."""
        return {n: self.emas.get(n, m) for n, m in self.modules.items()}

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat {name: tensor} of every model, EMA and Adam state, for safetensors."""
        out = {}
        for name, module in self.modules.items():
            out.update({f"{name}/{k}": v for k, v in module.state_dict().items()})
            if name in self.emas:
                out.update({f"ema/{name}/{k}": v for k, v in self.emas[name].state_dict().items()})
            opt = self.optimizers.get(name)
            for pname, p in module.named_parameters():
                for k, v in (opt.state.get(p, {}) if opt else {}).items():
                    out[f"opt/{name}/{pname}/{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
        return out

    def load_tensors(self, tensors: dict, *, optimizers: bool = True,
                     source: str = "checkpoint") -> None:
        """Inverse of `tensors` (strict: every model and EMA tensor present, of its shape and
        dtype; `source` names the checkpoint in errors)."""
        saved = {k.split("/", 1)[0] for k in tensors if not k.startswith(("ema/", "opt/"))}
        if saved != set(self.modules):
            raise ckpt.CheckpointError(
                f"the checkpoint holds models {sorted(saved)}, this run trains "
                f"{sorted(self.modules)}")
        for name, module in self.modules.items():
            ckpt.load_module_state(module, _part(tensors, f"{name}/"), source, f"{name}/")
            if name in self.emas:
                ckpt.load_module_state(self.emas[name], _part(tensors, f"ema/{name}/"), source,
                                       f"ema/{name}/")
            if not optimizers or name not in self.optimizers:
                continue
            params = dict(module.named_parameters())
            state: dict[str, dict] = {}
            for key, v in _part(tensors, f"opt/{name}/").items():
                pname, k = key.rsplit("/", 1)
                if pname not in params:
                    raise ckpt.CheckpointError(f"optimizer state of unknown parameter {name}/{pname}")
                state.setdefault(pname, {})[k] = v
            opt = self.optimizers[name]
            for pname, s in state.items():
                p = params[pname]
                opt.state[p] = {k: (v.to(p.device) if k != "step" else v) for k, v in s.items()}

    def optimizer_meta(self) -> dict:
        return {n: [{k: v for k, v in g.items() if k != "params"} for g in o.param_groups]
                for n, o in self.optimizers.items()}


def _part(tensors: dict, prefix: str) -> dict:
    n = len(prefix)
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix)}


def ema_update(ema: nn.Module, model: nn.Module, rate: float) -> None:
    """θ_ema <- rate θ_ema + (1 - rate) θ; buffers are copied."""
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1.0 - rate)
        for e, b in zip(ema.buffers(), model.buffers()):
            e.copy_(b)


@dataclass
class StepStats:
    loss: float  # batch mean over all processes
    grad_norms: dict[str, float]
    lrs: dict[str, float]
    logs: dict[str, float]


def micro_batches(batch: Batch, generator: BatchGenerator, micro_batch: int):
    """(Batch, BatchGenerator, weight) for each micro-batch of `micro_batch` rows of this
    process's batch (`micro_batch` 0: the batch itself, weight 1).

    Every micro-batch's generator starts where the step's does and keeps its own rows of the
    same global draws, so the micro-batches see exactly the random numbers of the full batch;
    `weight` (rows / batch rows) makes the summed gradients the full batch's mean gradient.
    """
    rows = len(batch.x)
    if not micro_batch or micro_batch >= rows:
        yield batch, generator, 1.0
        return
    if rows % micro_batch:
        raise ValueError(f"train.micro_batch={micro_batch} must divide the {rows} rows each "
                         f"process trains on (train.batch_size / processes)")
    offset = generator.rank_slice.start or 0
    state = generator.generator.get_state()
    for lo in range(0, rows, micro_batch):
        hi = lo + micro_batch
        gen = torch.Generator(device=generator.generator.device)
        gen.set_state(state)
        part = Batch(batch.x[lo:hi], None if batch.y is None else batch.y[lo:hi], batch.step)
        yield (part, BatchGenerator(gen, generator.global_size,
                                    slice(offset + lo, offset + hi), generator.device),
               micro_batch / rows)


def _no_sync(state: TrainState, sync: bool):
    """DDP's `no_sync` for every wrapped model unless `sync`: gradients of all but the last
    micro-batch accumulate locally and are all-reduced once."""
    stack = contextlib.ExitStack()
    if not sync:
        for module in state.forward.values():
            if hasattr(module, "no_sync"):
                stack.enter_context(module.no_sync())
    return stack


def backward_losses(loss, state: TrainState, weight: float = 1.0) -> torch.Tensor:
    """Backpropagate `weight` × the batch-mean loss; returns the loss that is logged."""
    if isinstance(loss, dict):  # each model descends its own loss (LSGM: the VAE q, the SGM p)
        _check_model_losses(loss, state)
        parts = [(n, loss[n]) for n in loss if n in state.specs]  # a frozen model's: not descended
        for i, (name, part) in enumerate(parts):
            (part.float().mean() * weight).backward(
                inputs=list(state.modules[name].parameters()), retain_graph=i < len(parts) - 1)
        return parts[0][1]  # logged as "loss": the first trained model's
    (loss.float().mean() * weight).backward()
    return loss


def train_step(state: TrainState, objective, batch: Batch, generator: BatchGenerator, step: int,
               *, amp_dtype: torch.dtype | None = None, reduce: Callable | None = None,
               micro_batch: int = 0) -> StepStats:
    """One optimisation step: objective forward (autocast), backward, per-model clipping, the
    NaN guard, one AdamW step per model at its warmup learning rate, the EMAs.

    `micro_batch` > 0 accumulates the gradient over micro-batches of that many rows
    (`micro_batches`): the same step as the whole batch, up to float summation order, when the
    objective draws all its randomness from `generator` (dropout masks and batch statistics
    differ). `reduce` averages a tensor over processes (identity for one process). Raises
    `TrainingDiverged` before any update when the loss or a gradient norm is not finite.
    """
    device_type = batch.x.device.type
    for opt in state.optimizers.values():
        opt.zero_grad(set_to_none=True)
    parts = list(micro_batches(batch, generator, micro_batch))
    scalars = 0.0
    for i, (part, part_generator, weight) in enumerate(parts):
        amp = torch.autocast(device_type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
        with _no_sync(state, sync=i == len(parts) - 1):
            with amp:
                loss, logs = objective(state.forward, part, part_generator)
            loss = backward_losses(loss, state, weight)
        scalars = scalars + weight * torch.stack(
            [loss.detach().float().mean()]
            + [torch.as_tensor(v).detach().float().mean().to(loss.device) for v in logs.values()])
    grad_norms = {}
    for name, spec in state.specs.items():
        clip = spec.grad_clip
        grad_norms[name] = torch.nn.utils.clip_grad_norm_(state.modules[name].parameters(),
                                                          clip if clip > 0 else math.inf)
    values = (reduce(scalars) if reduce else scalars).tolist()
    stats = StepStats(loss=values[0], grad_norms={n: float(g) for n, g in grad_norms.items()},
                      lrs={n: s.lr_at(step) for n, s in state.specs.items()},
                      logs=dict(zip(logs, values[1:])))
    if not all(math.isfinite(v) for v in [stats.loss, *stats.grad_norms.values()]):
        norms = ", ".join(f"{n}={v}" for n, v in stats.grad_norms.items())
        raise TrainingDiverged(f"step {step}: loss={stats.loss} grad_norm({norms}) is not finite; "
                               f"stopped before the update")
    for name, opt in state.optimizers.items():
        for g in opt.param_groups:
            g["lr"] = stats.lrs[name]
        opt.step()
    for name, ema in state.emas.items():
        ema_update(ema, state.modules[name], state.specs[name].ema_rate)
    return stats


def _check_model_losses(losses: dict, state: TrainState) -> None:
    if set(losses) != set(state.modules):
        raise ValueError(f"the objective returned losses for {sorted(losses)}, the run trains "
                         f"{sorted(state.modules)}: give one loss per trained model")


# Model keys that change memory and time, not the function a model computes: a run may resume,
# or load a VAE, with them changed.
RUNTIME_ONLY_KEYS = ("checkpointing",)


def _function_keys(config: dict) -> dict:
    """`config` without RUNTIME_ONLY_KEYS, at any depth."""
    return {k: _function_keys(v) if isinstance(v, dict) else v for k, v in config.items()
            if k not in RUNTIME_ONLY_KEYS}


def _field_default(section, key: str):
    """The default of field `key` of a config dataclass, as JSON data (None if it has none)."""
    fields = {f.name: f for f in dataclasses.fields(section)}
    if key not in fields:
        return None
    f = fields[key]
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return None
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    return json.loads(json.dumps(value))


def _same_training_problem(saved: dict, cfg: Config) -> None:
    """A resumed run must train the same model on the same data with the same SDE."""
    saved = convert_legacy(saved)[0]
    now = json.loads(json.dumps(cfg.to_dict()))  # tuples -> lists, as in the sidecar
    if "model" in saved:
        saved = {**saved, "model": _function_keys(saved["model"])}
        now = {**now, "model": _function_keys(now["model"])}
    def saved_value(section, k):  # a key the checkpoint's code did not have yet: its default
        if k in saved[section]:
            return saved[section][k]
        return _field_default(getattr(cfg, section), k)

    diffs = [
        f"{section}.{k}: checkpoint {saved_value(section, k)!r} vs now {now[section][k]!r}"
        for section in ("model", "sde", "data")
        for k in now[section]
        if section in saved and k != "data_dir" and saved_value(section, k) != now[section][k]
    ]
    diffs += [
        f"train.{k}: checkpoint {saved['train'].get(k)!r} vs now {now['train'][k]!r}"
        for k in ("batch_size", "seed")
        if saved.get("train", {}).get(k) != now["train"][k]
    ]
    if diffs:
        raise ConfigError(
            "cannot resume: the config differs from the checkpoint's in " + "; ".join(diffs)
            + ". Use a new --out directory to start a different run."
        )


# --- logging --------------------------------------------------------------------------------


class CSVLog:
    """log.csv: one row per logged step; columns fixed by the first row (or the file's header).

    On resume, rows past the checkpoint's step are dropped (a killed run may have logged beyond
    its last checkpoint).
    """

    def __init__(self, path: Path, start: int, main: bool = True):
        self.path, self.fields, self.file, self.writer = path, None, None, None
        if not main:
            return
        if path.is_file():
            with open(path) as f:
                reader = csv.DictReader(f)
                rows = [r for r in reader if int(r["step"]) <= start]
                self.fields = reader.fieldnames
            if self.fields:
                text = ",".join(self.fields) + "\n" + "".join(
                    ",".join(str(r[k]) for k in self.fields) + "\n" for r in rows)
                ckpt.atomic_write_text(path, text)
        self.file = open(path, "a", newline="")  # noqa: SIM115 (closed by close())

    def write(self, row: dict) -> None:
        if self.file is None:
            return
        if self.writer is None:
            if self.fields is None:
                self.fields = list(row)
                csv.writer(self.file).writerow(self.fields)
            self.writer = csv.DictWriter(self.file, self.fields)
        if set(row) != set(self.fields):
            raise ValueError(f"{self.path}: columns {sorted(row)} differ from the log's "
                             f"{self.fields}; log to a new --out directory")
        self.writer.writerow(row)
        self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


def read_log(path: str | Path) -> dict[str, list[float]]:
    """Columns of a training CSV log as lists of floats (step, loss, grad_norm/<model>, ...)."""
    with open(path) as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        fields = reader.fieldnames or []
    return {k: [float(r[k]) for r in rows] for k in fields}


def plot_loss_curve(log_path: str | Path, out_png: str | Path) -> Path:
    """Matplotlib loss and gradient-norm curves of a training log (written atomically)."""
    from matplotlib.figure import Figure  # no pyplot: a notebook's backend stays as it is

    from lsgm_edu.viz import save_figure

    log = read_log(log_path)
    fig = Figure(figsize=(9, 3.2))
    a, b = fig.subplots(1, 2)
    a.plot(log["step"], log["loss"], lw=1)
    a.set(xlabel="step", ylabel="loss (per sample)", yscale="log", title="training loss")
    for i, key in enumerate(k for k in log if k.startswith("grad_norm/")):
        b.plot(log["step"], log[key], lw=1, color=f"C{i + 1}", label=key.split("/", 1)[1])
    b.set(xlabel="step", ylabel="gradient norm", yscale="log", title="gradient norm")
    b.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    return save_figure(fig, out_png)


# --- sampling -------------------------------------------------------------------------------


@torch.no_grad()
def sample_images(score_model, sde, cfg_sampling, n, *, steps=None, y=None, generator=None,
                  device=None, progress=False, eps=1e-3, return_nfe=False):
    """n samples [n, C, H, W] in model space with the sampler of `cfg.sampling` (in phase space
    the data of the sampled state); with `return_nfe`, also the score evaluations per sample
    (measured for the adaptive ODE)."""
    from lsgm_edu import samplers

    mc = score_model.net.config
    shape = (n, mc.num_channels, mc.image_size, mc.image_size)
    steps = steps or cfg_sampling.steps
    score_fn = (lambda x, t: score_model(x, t, y)) if y is not None else score_model
    kw = {"eps": eps, "generator": generator, "device": device, "progress": progress}
    striding = getattr(cfg_sampling, "striding", "uniform")
    if cfg_sampling.method == "pc":
        predictor = getattr(cfg_sampling, "predictor", "auto")
        if predictor == "auto":
            predictor = "reverse_diffusion" if steps == sde.N else "euler_maruyama"
        x = samplers.predictor_corrector(sde, score_fn, shape, steps, cfg_sampling.snr,
                                         cfg_sampling.n_corrector, predictor=predictor, **kw)
        nfe = steps * (1 + cfg_sampling.n_corrector)
    elif cfg_sampling.method == "em":
        x = samplers.euler_maruyama(sde, score_fn, shape, steps, striding=striding, **kw)
        nfe = steps
    elif cfg_sampling.method == "sscs":
        x, nfe = samplers.sscs(sde, score_fn, shape, steps, striding=striding, **kw), steps
    else:
        kw.pop("progress")
        x, nfe = samplers.probability_flow(sde, score_fn, shape, return_nfe=True, **kw)
    x = sde.project(x)  # the data of the state (x itself for K = 1)
    return (x, nfe) if return_nfe else x


def save_image_grid(images01: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Save images in [0, 1] as one PNG grid, atomically."""
    from torchvision.utils import save_image

    nrow = nrow or max(int(math.sqrt(images01.shape[0])), 1)
    return ckpt.atomic_write_bytes(
        path, lambda tmp: save_image(images01.float().clamp(0, 1).cpu(), tmp, nrow=nrow,
                                     padding=1, format="png"))


def to_unit_range(x: torch.Tensor, centered: bool) -> torch.Tensor:
    return (x + 1) / 2 if centered else x


# --- the loop -------------------------------------------------------------------------------


@dataclass
class TrainResult:
    step: int
    out_dir: Path
    checkpoint: Path | None
    loss: float
    score_model: Any  # setup.result_model(EMA models): for DSM the EMA ScoreModel, ready to sample
    log_path: Path
    models: dict[str, nn.Module] = field(default_factory=dict)  # EMA (or raw) models, eval mode


def _prepare_batch(x_uint8, step_gen, cfg, num_levels, rank_slice, device):
    """Flips, dequantization and scaling (`lsgm_edu.data`), with the noise drawn for the global
    batch, then sliced."""
    b = cfg.train.batch_size
    x = x_uint8.to(device)
    flip = torch.rand(b, generator=step_gen)[rank_slice] < 0.5
    info = data_module.DATASETS.get(cfg.data.dataset)
    if info is not None and info.binarize:  # a fresh Bernoulli draw of every image, every step
        u = torch.rand((b, *x.shape[1:]), generator=step_gen)[rank_slice].to(device)
        x = data_module.binarize(x, num_levels, noise=u)
        x = 2 * x - 1 if cfg.data.centered else x
    else:
        noise = (torch.rand((b, *x.shape[1:]), generator=step_gen)[rank_slice].to(device)
                 if cfg.data.dequantize else None)
        x = data_module.to_model(x, num_levels, centered=cfg.data.centered, noise=noise,
                                 discretization="dequantize" if cfg.data.dequantize else "scale")
    return data_module.random_flip(x, flip=flip.to(device)) if cfg.data.random_flip else x


def _training_batches(dataset, cfg: Config, num_levels: int, device, n: int):
    """The first n global training batches (the dataset's order, no shuffling) prepared as the
    trainer prepares them, with noise seeded by derived_seed(seed, 7)."""
    b = cfg.train.batch_size
    count = min(n, len(dataset) // b)
    if count < 1:
        raise ConfigError(f"train.batch_size={b} exceeds the {len(dataset)} images of the "
                          f"training set")
    gen = seeded_generator(cfg.train.seed, 7)
    for k in range(count):
        x = torch.stack([torch.as_tensor(dataset[i][0]) for i in range(k * b, (k + 1) * b)])
        yield _prepare_batch(x, gen, cfg, num_levels, slice(None), device)


def train(cfg: Config, out_dir: str | Path, *, resume: bool = True, device: str | None = None,
          dataset=None, progress: bool = True, log=print,
          setup: TrainingSetup | None = None, stage: str | None = None) -> TrainResult:
    """Train `cfg` into `out_dir`; with `resume`, continue from its newest valid checkpoint.

    out_dir gets config.yaml, log.csv, TensorBoard events, loss.png, samples/ and checkpoints/.
    `dataset` overrides `cfg.data` (any dataset of (uint8 [C,H,W], label) with `num_levels`).
    `setup` (default `training_setup(cfg, stage)`: DSM for a U-Net, LSGM's stage "vae" or
    "lsgm" for an LSGM) names the models and the objective; everything else (batches, seeds,
    steps, checkpoints, logs) comes from `cfg` (for an LSGM stage, `stage_config(cfg, stage)`).
    The folder is locked while the run holds it (`RunFolder`); a start that fails leaves it as
    it was. In one process, Ctrl-C stops after the current step, saves a checkpoint there and
    raises `TrainingInterrupted` (a second Ctrl-C stops at once).
    """
    cfg = stage_config(cfg, stage)
    d = setup_distributed(device)
    tc = cfg.train
    if tc.batch_size % d.world_size:
        raise ConfigError(
            f"train.batch_size={tc.batch_size} is not divisible by the {d.world_size} processes"
        )
    if tc.micro_batch and (tc.batch_size // d.world_size) % tc.micro_batch:
        raise ConfigError(
            f"train.micro_batch={tc.micro_batch} does not divide the "
            f"{tc.batch_size // d.world_size} rows of each of the {d.world_size} processes "
            f"(train.batch_size={tc.batch_size}); pick a divisor of it")
    if dataset is None:
        dataset = data_module.load_dataset(cfg.data.dataset, "train", cfg.data.data_dir,
                                           download=cfg.data.download)
    if tc.batch_size > len(dataset):
        raise ConfigError(f"train.batch_size={tc.batch_size} is larger than the training set "
                          f"({len(dataset)} images of {cfg.data.dataset}); lower it")
    setup = setup if setup is not None else training_setup(cfg, stage)
    state = TrainState(setup.models, d.device)
    folder = RunFolder.open(out_dir) if d.main else None
    try:
        _barrier(d)
        return _train(cfg, Path(out_dir), folder, d, state, setup, dataset, resume, progress, log)
    except BaseException:
        if folder is not None:
            folder.discard()  # a failed start: nothing of this run stays behind
        raise
    finally:
        if folder is not None:
            folder.close()


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a training run; the message says where and how to resume."""


class _StopAfterStep:
    """While active (one process, main thread): the first SIGINT asks the loop to stop after
    the current step, the second raises KeyboardInterrupt at once."""

    def __init__(self, enabled: bool):
        self.enabled, self.requested, self._previous = enabled, False, None

    def __enter__(self):
        import signal
        import threading

        if (self.enabled and threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN):  # nohup, `cmd &`
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupt: stopping after this step and saving a checkpoint (Ctrl-C again to "
              "stop at once)", file=sys.stderr)

    def __exit__(self, *exc):
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _train(cfg, out, folder, d, state, setup, dataset, resume, progress, log) -> TrainResult:
    tc = cfg.train
    num_levels = getattr(dataset, "num_levels", 256)
    ckpt_dir = out / "checkpoints"
    log_path = out / "log.csv"
    start, last_ckpt = 0, None
    found = ckpt.latest_checkpoint(ckpt_dir, warn=log if d.main else (lambda *_: None)) \
        if resume else None
    if found is not None:
        tensors, meta = found
        if meta.get("state_layout") != STATE_LAYOUT:
            raise ckpt.CheckpointError(
                f"{ckpt_dir}: the checkpoint was written before named models (tensors model/..., "
                f"opt/<index>/...); convert it with lsgm_edu.train.migrate_checkpoint(OLD.json, "
                f"NEW_STEM) and resume from a folder holding the converted one")
        _same_training_problem(meta["config"], cfg)
        last_ckpt = ckpt.checkpoint_stem(ckpt_dir, int(meta["step"])).with_suffix(".json")
        state.load_tensors(tensors, source=str(last_ckpt))
        start = int(meta["step"])
        if d.main:
            log(f"resuming from step {start} ({last_ckpt})")
    elif resume and ckpt.list_checkpoints(ckpt_dir):
        raise ckpt.CheckpointError(f"{ckpt_dir}: no usable checkpoint to resume from")
    _check_same_start(start, ckpt_dir, d)
    if found is None and setup.prepare is not None:
        setup.prepare(state.modules,
                      functools.partial(_training_batches, dataset, cfg, num_levels, d.device),
                      log if d.main else (lambda *_: None))
        state.sync_emas()
    if d.main:
        ckpt.atomic_write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    cuda = d.device.type == "cuda"
    if cuda and tc.channels_last:
        for m in state.modules.values():
            m.to(memory_format=torch.channels_last)

    def wrap(module):
        if d.world_size > 1:  # batch statistics over all processes (the VAE's BN)
            module = synchronize_batchnorm(module, cuda)
        if d.world_size > 1:
            module = nn.parallel.DistributedDataParallel(
                module, device_ids=[d.device.index] if cuda else None)
        return torch.compile(module) if (tc.compile and cuda) else module

    state.wrap(wrap)
    amp_dtype = resolve_precision(tc.precision, d.device)
    local = tc.batch_size // d.world_size
    rank_slice = slice(d.rank * local, (d.rank + 1) * local)

    def reduce(v):
        return _all_reduce_mean(v, d)

    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=StepBatches(len(dataset), tc.batch_size, tc.seed, start,
                                           tc.n_iters, d.rank, d.world_size),
        num_workers=cfg.data.num_workers, pin_memory=cuda,
    )
    writer = None
    if d.main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tensorboard"), purge_step=start)
    csv_log = CSVLog(log_path, start, main=d.main)

    loss_value, t0, last_log_t, last_log_step = float("nan"), time.time(), None, start
    done = start
    bar = tqdm(total=tc.n_iters, initial=start, disable=not (progress and d.main), desc="train",
               dynamic_ncols=True)
    stop = _StopAfterStep(enabled=d.world_size == 1)
    try:
        with stop:
            for step, (x_uint8, y) in enumerate(loader, start=start):
                gen = seeded_generator(tc.seed, 2, step)
                x0 = _prepare_batch(x_uint8, gen, cfg, num_levels, rank_slice, d.device)
                if cuda and tc.channels_last and x0.ndim == 4:
                    x0 = x0.contiguous(memory_format=torch.channels_last)
                batch = Batch(x0, y.to(d.device) if cfg.model.num_classes else None, step)
                torch.manual_seed(derived_seed(tc.seed, 3, step, d.rank))  # dropout masks
                try:
                    stats = train_step(state, setup.objective, batch,
                                       BatchGenerator(gen, tc.batch_size, rank_slice, d.device),
                                       step, amp_dtype=amp_dtype, reduce=reduce,
                                       micro_batch=tc.micro_batch)
                except TrainingDiverged as e:
                    raise TrainingDiverged(f"{e}, {_last_good(last_ckpt)}. Lower train.lr, check "
                                           f"the data scaling, or try train.precision=fp32."
                                           ) from None
                if folder is not None:
                    folder.started()
                loss_value = stats.loss
                done = step + 1
                bar.update(1)
                if d.main and (done % tc.log_every == 0 or done == tc.n_iters or stop.requested):
                    now = time.time()
                    dt = now - (last_log_t or t0)
                    ips = tc.batch_size * (done - last_log_step) / max(dt, 1e-9)
                    last_log_t, last_log_step = now, done
                    scalars = {"loss": loss_value,
                               **{f"grad_norm/{n}": v for n, v in stats.grad_norms.items()},
                               **{f"lr/{n}": v for n, v in stats.lrs.items()}, **stats.logs}
                    csv_log.write({"step": done, **{k: f"{v:.6g}" for k, v in scalars.items()},
                                   "images_per_s": f"{ips:.4g}",
                                   "elapsed_s": f"{now - t0:.2f}"})
                    for k, v in {**scalars, "images_per_s": ips}.items():
                        writer.add_scalar(f"train/{k}", v, done)
                    bar.set_postfix(loss=f"{loss_value:.4g}")
                if done % tc.ckpt_every == 0 or done == tc.n_iters or stop.requested:
                    if d.main:
                        last_ckpt = _save(ckpt_dir, done, cfg, state, d, last_ckpt)
                        plot_loss_curve(log_path, out / "loss.png")
                    _barrier(d)
                if stop.requested:
                    raise TrainingInterrupted(
                        f"interrupted at step {done}: saved {last_ckpt}; continue with --resume")
                if d.main and tc.sample_grid and setup.sample and done % tc.sample_every == 0:
                    _save_grid(out, done, cfg, state, setup, log)
    except KeyboardInterrupt as e:
        if isinstance(e, TrainingInterrupted):
            raise
        raise TrainingInterrupted(
            f"interrupted during step {done + 1}: {_last_good(last_ckpt)}; continue from it "
            f"with --resume") from None
    finally:
        bar.close()
        csv_log.close()
        if writer:
            writer.close()
    models = {n: m.eval() for n, m in state.eval_models().items()}
    return TrainResult(step=max(tc.n_iters, start), out_dir=out, checkpoint=last_ckpt,
                       loss=loss_value, log_path=log_path, models=models,
                       score_model=setup.result_model(models) if setup.result_model else None)


def _last_good(last_ckpt) -> str:
    return f"the last good checkpoint is {last_ckpt or 'none (none written yet)'}"


def _save(ckpt_dir, step, cfg, state: TrainState, d, last_ckpt=None):
    """Write checkpoint `step`, unless a parameter or EMA value is not finite: then raise
    `TrainingDiverged` naming the last checkpoint that is (nothing non-finite is saved)."""
    tensors = state.tensors()
    bad = ckpt.non_finite_tensors(tensors)
    if bad:
        raise TrainingDiverged(
            f"step {step}: {len(bad)} tensor(s) of the model hold NaN or inf (first {bad[0]}); "
            f"not saved, {_last_good(last_ckpt)}. Lower train.lr or try train.precision=fp32.")
    meta = {
        "step": step,
        "config": cfg.to_dict(),
        "state_layout": STATE_LAYOUT,
        "models": list(state.modules),
        "optimizers": state.optimizer_meta(),
        "rng": {"scheme": "seeded_generator(seed, stream, step)", "seed": cfg.train.seed},
        "world_size": d.world_size,
        "torch": torch.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path = ckpt.save_checkpoint(ckpt.checkpoint_stem(ckpt_dir, step), tensors, meta)
    ckpt.prune_checkpoints(ckpt_dir, cfg.train.keep_last)
    return path


def _save_grid(out, step, cfg, state: TrainState, setup: TrainingSetup, log=print):
    """The periodic sample grid of the EMA models; one holding NaN/inf is reported, not saved
    (it would be a black grid that looks like a result)."""
    models = state.eval_models()
    was_training = {n: m.training for n, m in models.items()}
    for m in models.values():
        m.eval()
    images = setup.sample(models, cfg.train.sample_grid, seeded_generator(cfg.train.seed, 4, step))
    for n, m in models.items():
        m.train(was_training[n])
    bad = int((~torch.isfinite(images.reshape(len(images), -1)).all(dim=1)).sum())
    if bad:
        log(f"step {step}: the sample grid has NaN/inf in {bad} of {len(images)} images (the "
            f"sampler diverges on the EMA model); grid not saved")
        return
    save_image_grid(images, out / "samples" / f"step_{step:08d}.png")


# --- loading trained models -----------------------------------------------------------------


def _legacy_tensors(tensors: dict, cfg: Config) -> dict:
    """Tensors of the first layout (model/, ema/, opt/<index>/) renamed to the model 'score'."""
    names = [n for n, _ in build_model(cfg.model).named_parameters()]  # the old index order
    out = {}
    for k, v in tensors.items():
        section, rest = k.split("/", 1)
        if section == "model":
            out[f"score/{rest}"] = v
        elif section == "ema":
            out[f"ema/score/{rest}"] = v
        elif section == "opt":
            i, state_key = rest.split("/", 1)
            out[f"opt/score/{names[int(i)]}/{state_key}"] = v
        else:
            raise ckpt.CheckpointError(f"unexpected tensor {k!r} in a first-layout checkpoint")
    return out


def migrate_checkpoint(path: str | Path, out_stem: str | Path) -> Path:
    """Rewrite a checkpoint of the first format (config and tensor names) in the current one.

    Tensors `model/...`, `ema/...`, `opt/<index>/...` become `score/...`, `ema/score/...`,
    `opt/score/<parameter name>/...` with the same values, bit for bit; the config is converted
    by `lsgm_edu.configs.convert_legacy`. Returns the new sidecar `<out_stem>.json`.
    """
    tensors, meta = ckpt.load_checkpoint(path)
    if meta.get("state_layout") == STATE_LAYOUT:
        raise ckpt.CheckpointError(f"{path}: already in the current layout")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = config_from_dict(meta["config"], name=meta["config"].get("name", "unnamed"))
    new_meta = {k: v for k, v in meta.items() if k not in ("format", "tensors", "sha256")}
    new_meta.update(config=cfg.to_dict(), state_layout=STATE_LAYOUT, models=["score"])
    if "param_groups" in new_meta:
        new_meta["optimizers"] = {"score": new_meta.pop("param_groups")}
    return ckpt.save_checkpoint(out_stem, _legacy_tensors(tensors, cfg), new_meta)


def load_lsgm(path: str | Path, *, ema: bool = True, device="cpu"):
    """(models, sde, Config) of an LSGM checkpoint: {"vae", "sgm"} in eval mode, the SGM's EMA
    weights where it has them (`ema`); a stage-"vae" checkpoint gives {"vae"} and sde None."""
    tensors, meta = ckpt.load_checkpoint(path)
    cfg = config_from_dict(meta["config"], name=meta["config"].get("name", "unnamed"),
                           source=f"{path} (sidecar config)")
    if not _is_lsgm(cfg):
        raise ConfigError(f"{path}: a checkpoint of a {MODELS.name_of(cfg.model)!r} model, not of "
                          f"an LSGM; load it with load_score_model")
    sde = build_sde(cfg.sde)
    models = build_model(cfg.model, sde=sde)
    names = meta.get("models", ["vae"])
    for name in names:
        prefix = f"ema/{name}/" if ema and any(k.startswith(f"ema/{name}/") for k in tensors) \
            else f"{name}/"
        state = _finite_state(_part(tensors, prefix), path, prefix)
        ckpt.load_module_state(models[name], state, str(path), prefix)
    if "sgm" not in names:
        models = nn.ModuleDict({"vae": models["vae"]})
    return models.to(device).eval(), (sde if "sgm" in names else None), cfg


def _finite_state(state: dict, path, prefix: str) -> dict:
    """`state`, or a CheckpointError when a weight is NaN or inf (it could only sample NaN)."""
    bad = ckpt.non_finite_tensors(state)
    if bad:
        raise ckpt.CheckpointError(
            f"{path}: {len(bad)} tensor(s) hold NaN or inf (first {prefix}{bad[0]}); the run "
            f"diverged before this checkpoint: use an earlier one")
    return state


def load_score_model(path: str | Path, *, ema: bool = True, device="cpu", name: str = "score"):
    """(ScoreModel, Config) from a training checkpoint or an exported EMA file (`export_ema`).

    `name` picks the model of a multi-model checkpoint. A checkpoint of the first format
    is converted in memory with a warning (`migrate_checkpoint` converts the files).
    """
    tensors, meta = ckpt.load_checkpoint(path)
    cfg = config_from_dict(meta["config"], name=meta["config"].get("name", "unnamed"),
                           source=f"{path} (sidecar config)")
    if meta.get("state_layout") != STATE_LAYOUT:
        warnings.warn(f"{path}: checkpoint of the first layout (tensors model/..., ema/...); "
                      f"convert it once with lsgm_edu.train.migrate_checkpoint", stacklevel=2)
        tensors, name = _legacy_tensors(tensors, cfg), "score"
    sde = build_sde(cfg.sde)
    net = build_model(cfg.model)
    prefix = f"ema/{name}/" if (ema or meta.get("kind") == "ema") else f"{name}/"
    state = _part(tensors, prefix)
    if not state:
        raise ckpt.CheckpointError(f"{path}: no '{prefix}' tensors in this checkpoint")
    ckpt.load_module_state(net, _finite_state(state, path, prefix), str(path), prefix)
    return score_model_of(net.to(device).eval(), sde, cfg,
                          meta.get("parameterization", "eps")), cfg


def export_ema(checkpoint_path: str | Path, out_stem: str | Path, note: str = "",
               evaluation: dict | None = None) -> Path:
    """Write only the weights to evaluate and the config (what the book ships):
    `<out_stem>.{safetensors,json}`. Each model keeps its EMA weights, or its weights where it
    has no EMA (an LSGM's VAE); optimizer states are dropped. `evaluation` (e.g. the JSON of
    `eval`) is kept in the sidecar."""
    tensors, meta = ckpt.load_checkpoint(checkpoint_path)
    ema_tensors = {k: v for k, v in tensors.items() if k.startswith("ema/")}
    for name in meta.get("models", []):
        if not any(k.startswith(f"ema/{name}/") for k in tensors):
            ema_tensors.update({k: v for k, v in tensors.items() if k.startswith(f"{name}/")})
    _finite_state(ema_tensors, checkpoint_path, "")  # never ship weights that hold NaN or inf
    small = {"kind": "ema", "step": meta["step"], "config": meta["config"], "note": note,
             "torch": meta.get("torch"), "exported_from": Path(checkpoint_path).name,
             "state_layout": meta.get("state_layout"), "models": meta.get("models"),
             "parameterization": meta.get("parameterization"), "evaluation": evaluation}
    return ckpt.save_checkpoint(out_stem, ema_tensors, {k: v for k, v in small.items()
                                                        if v is not None})


def summary(result: TrainResult) -> str:
    return json.dumps({"step": result.step, "loss": result.loss,
                       "checkpoint": str(result.checkpoint)})

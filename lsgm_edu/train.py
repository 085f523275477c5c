"""Training score models on images: DSM with EMA, warmup, clipping, bf16, DDP, exact resume.

`train(cfg, out_dir)` runs the Score SDE recipe (Song et al. 2021, App. D/H): Adam(W) with a
linear learning-rate warmup, gradient-norm clipping, an EMA of the weights, continuous-time
denoising score matching with the σ² (ε) or likelihood weighting. The same code runs on a
laptop CPU (fp32) and on GPUs (bf16 autocast, channels_last, optional torch.compile) and under
`torchrun` with DistributedDataParallel (gloo on CPU, nccl on GPU).

Every random draw of step k (data order, flips, dequantization noise, t, z, dropout) comes from
generators seeded by (seed, k) and is drawn for the *global* batch before each rank takes its
slice, so (i) a run resumed from a checkpoint continues bit for bit, and (ii) N ranks with
global batch B compute what one process with batch B computes (dropout aside: its masks come
from the global RNG, reseeded per step and rank).
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch import nn
from tqdm.auto import tqdm

from lsgm_edu import checkpoint as ckpt
from lsgm_edu import data as data_module
from lsgm_edu.configs import Config, ConfigError, config_from_dict
from lsgm_edu.losses import (
    LikelihoodImportanceSampler,
    LikelihoodWeighting,
    SigmaSquaredWeighting,
    UniformTimeSampler,
    denoising_score_matching,
)
from lsgm_edu.nets import build_model
from lsgm_edu.nets.precond import ScoreModel
from lsgm_edu.sde import VESDE, VPSDE, SubVPSDE


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN/Inf; no checkpoint was written after it."""


# --- building blocks ------------------------------------------------------------------------


def build_sde(cfg_sde):
    """The forward SDE named by `cfg.sde`."""
    if cfg_sde.name == "vpsde":
        return VPSDE(beta_min=cfg_sde.beta_min, beta_max=cfg_sde.beta_max, N=cfg_sde.N)
    if cfg_sde.name == "subvpsde":
        return SubVPSDE(beta_min=cfg_sde.beta_min, beta_max=cfg_sde.beta_max, N=cfg_sde.N)
    if cfg_sde.name == "vesde":
        return VESDE(sigma_min=cfg_sde.sigma_min, sigma_max=cfg_sde.sigma_max, N=cfg_sde.N)
    raise ConfigError(f"sde.name: unknown SDE {cfg_sde.name!r}")


def init_model(cfg: Config) -> nn.Module:
    """The U-Net of `cfg.model`, initialised from a generator seeded by `train.seed`."""
    return build_model(cfg.model, generator=seeded_generator(cfg.train.seed, 0))


def build_score_model(cfg: Config, sde=None) -> ScoreModel:
    """s(x, t, y) = -net(x, c(t), y) / σ_t with the U-Net of `cfg.model`."""
    sde = sde if sde is not None else build_sde(cfg.sde)
    return ScoreModel(build_model(cfg.model), sde, centered=cfg.data.centered)


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


def ema_update(ema: nn.Module, model: nn.Module, rate: float) -> None:
    """θ_ema <- rate θ_ema + (1 - rate) θ; buffers are copied."""
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1.0 - rate)
        for e, b in zip(ema.buffers(), model.buffers()):
            e.copy_(b)


def learning_rate(cfg_train, step: int) -> float:
    """Linear warmup over `warmup` steps to `lr` (Song et al. 2021, App. D)."""
    if cfg_train.warmup <= 0:
        return cfg_train.lr
    return cfg_train.lr * min((step + 1) / cfg_train.warmup, 1.0)


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


def _barrier(d: Dist) -> None:
    if d.world_size > 1:
        dist.barrier()


# --- state <-> checkpoint -------------------------------------------------------------------


def state_tensors(model: nn.Module, ema: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Flat {name: tensor} of model, EMA and Adam state for safetensors."""
    out = {f"model/{k}": v for k, v in model.state_dict().items()}
    out.update({f"ema/{k}": v for k, v in ema.state_dict().items()})
    for i, p in enumerate(model.parameters()):
        for k, v in opt.state.get(p, {}).items():
            out[f"opt/{i}/{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return out


def load_state_tensors(tensors: dict, model: nn.Module, ema: nn.Module, opt=None) -> None:
    """Inverse of `state_tensors` (strict: every model/EMA key must be present)."""

    def part(prefix):
        n = len(prefix)
        return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix)}

    model.load_state_dict(part("model/"))
    ema.load_state_dict(part("ema/"))
    if opt is not None:
        params = list(model.parameters())
        state = {}
        for key, v in part("opt/").items():
            i, name = key.split("/", 1)
            state.setdefault(int(i), {})[name] = v
        for i, s in state.items():
            p = params[i]
            opt.state[p] = {k: (v.to(p.device) if k != "step" else v) for k, v in s.items()}


def _same_training_problem(saved: dict, cfg: Config) -> None:
    """A resumed run must train the same model on the same data with the same SDE."""
    now = json.loads(json.dumps(cfg.to_dict()))  # tuples -> lists, as in the sidecar
    diffs = [
        f"{section}.{k}: checkpoint {saved[section][k]!r} vs now {now[section][k]!r}"
        for section in ("model", "sde", "data")
        for k in now[section]
        if section in saved and k != "data_dir" and saved[section].get(k) != now[section][k]
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

CSV_FIELDS = ["step", "loss", "grad_norm", "lr", "images_per_s", "elapsed_s"]


def _truncate_log(path: Path, step: int) -> None:
    """Drop CSV rows past `step` (a killed run may have logged beyond its last checkpoint)."""
    if not path.is_file():
        return
    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
    text = ",".join(CSV_FIELDS) + "\n" + "".join(
        ",".join(str(r[k]) for k in CSV_FIELDS) + "\n" for r in rows
    )
    ckpt.atomic_write_text(path, text)


def read_log(path: str | Path) -> dict[str, list[float]]:
    """Columns of a training CSV log as lists of floats."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return {k: [float(r[k]) for r in rows] for k in CSV_FIELDS}


def plot_loss_curve(log_path: str | Path, out_png: str | Path) -> Path:
    """Matplotlib loss and gradient-norm curves of a training log (written atomically)."""
    from matplotlib.figure import Figure  # no pyplot: a notebook's backend stays as it is

    from lsgm_edu.viz import save_figure

    log = read_log(log_path)
    fig = Figure(figsize=(9, 3.2))
    a, b = fig.subplots(1, 2)
    a.plot(log["step"], log["loss"], lw=1)
    a.set(xlabel="step", ylabel="loss (per sample)", yscale="log", title="DSM loss")
    b.plot(log["step"], log["grad_norm"], lw=1, color="C1")
    b.set(xlabel="step", ylabel="gradient norm", yscale="log", title="gradient norm")
    fig.tight_layout()
    return save_figure(fig, out_png)


# --- sampling -------------------------------------------------------------------------------


@torch.no_grad()
def sample_images(score_model, sde, cfg_sampling, n, *, steps=None, y=None, generator=None,
                  device=None, progress=False, eps=1e-3):
    """n samples [n, C, H, W] in model space with the sampler of `cfg.sampling`."""
    from lsgm_edu import samplers

    mc = score_model.net.config
    shape = (n, mc.num_channels, mc.image_size, mc.image_size)
    steps = steps or cfg_sampling.steps
    score_fn = (lambda x, t: score_model(x, t, y)) if y is not None else score_model
    kw = {"eps": eps, "generator": generator, "device": device, "progress": progress}
    if cfg_sampling.method == "pc":
        predictor = "reverse_diffusion" if steps == sde.N else "euler_maruyama"
        return samplers.predictor_corrector(sde, score_fn, shape, steps, cfg_sampling.snr,
                                            cfg_sampling.n_corrector, predictor=predictor, **kw)
    if cfg_sampling.method == "em":
        return samplers.euler_maruyama(sde, score_fn, shape, steps, **kw)
    kw.pop("progress")
    return samplers.probability_flow(sde, score_fn, shape, **kw)


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


def training_loss(score_model, sde, x0, t, z, labels, weighting, t_sampler, cfg_train,
                  amp_dtype=None) -> torch.Tensor:
    """Batch mean of the DSM loss 1/2 λ(t)|s(x_t, t) + z/σ_t|² (Song et al. 2021, eq. 7).

    With importance sampling each term is weighted by 1/q(t); with reduce_mean it is divided
    by the number of dimensions (the reference's `reduce_mean`). bf16 autocast if `amp_dtype`.
    """
    amp = torch.autocast(x0.device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    with amp:
        per_sample = denoising_score_matching(
            lambda x, tt: score_model(x, tt, labels), sde, x0, t, weighting, noise=z)
    if cfg_train.importance_sampling:
        per_sample = per_sample * t_sampler.weight(t)
    if cfg_train.reduce_mean:
        per_sample = per_sample / x0[0].numel()
    return per_sample.float().mean()


@dataclass
class TrainResult:
    step: int
    out_dir: Path
    checkpoint: Path | None
    loss: float
    score_model: ScoreModel  # the EMA weights, ready to sample
    log_path: Path


def _prepare_batch(x_uint8, step_gen, cfg, num_levels, rank_slice, device):
    """Flips, dequantization and scaling, with noise drawn for the global batch then sliced."""
    b = cfg.train.batch_size
    x = x_uint8.to(device=device, dtype=torch.float32)
    shape = (b,) + tuple(x.shape[1:])
    flip = torch.rand(b, generator=step_gen)[rank_slice] < 0.5
    if cfg.data.dequantize:
        u = torch.rand(shape, generator=step_gen)[rank_slice].to(device)
        x01 = (x + u) / num_levels
    else:
        x01 = x / (num_levels - 1)
    if cfg.data.random_flip:
        x01 = torch.where(flip.to(device).view(-1, 1, 1, 1), x01.flip(-1), x01)
    return data_module.to_centered(x01) if cfg.data.centered else x01


def train(cfg: Config, out_dir: str | Path, *, resume: bool = True, device: str | None = None,
          dataset=None, progress: bool = True, log=print) -> TrainResult:
    """Train `cfg` into `out_dir`; with `resume`, continue from its newest valid checkpoint.

    out_dir gets config.yaml, log.csv, TensorBoard events, loss.png, samples/ and checkpoints/.
    `dataset` overrides `cfg.data` (any dataset of (uint8 [C,H,W], label) with `num_levels`).
    """
    d = setup_distributed(device)
    out = Path(out_dir)
    tc = cfg.train
    if tc.batch_size % d.world_size:
        raise ConfigError(
            f"train.batch_size={tc.batch_size} is not divisible by the {d.world_size} processes"
        )
    if dataset is None:
        dataset = data_module.load_dataset(cfg.data.dataset, "train", cfg.data.data_dir,
                                           download=cfg.data.download)
    num_levels = getattr(dataset, "num_levels", 256)
    ckpt_dir = out / "checkpoints"
    log_path = out / "log.csv"

    sde = build_sde(cfg.sde)
    net = init_model(cfg).to(d.device)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=tc.lr, betas=(tc.beta1, tc.beta2),
                            eps=tc.adam_eps, weight_decay=tc.weight_decay)

    start, last_ckpt = 0, None
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_dir.glob(".*.tmp") if ckpt_dir.is_dir() else []:
            stale.unlink(missing_ok=True)
    _barrier(d)
    found = ckpt.latest_checkpoint(ckpt_dir, warn=log if d.main else (lambda *_: None)) \
        if resume else None
    if found is not None:
        tensors, meta = found
        _same_training_problem(meta["config"], cfg)
        load_state_tensors(tensors, net, ema, opt)
        start = int(meta["step"])
        last_ckpt = ckpt.checkpoint_stem(ckpt_dir, start).with_suffix(".json")
        if d.main:
            log(f"resuming from step {start} ({last_ckpt})")
    elif resume and ckpt.list_checkpoints(ckpt_dir):
        raise ckpt.CheckpointError(f"{ckpt_dir}: no usable checkpoint to resume from")
    if d.main:
        ckpt.atomic_write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        _truncate_log(log_path, start)

    if d.device.type == "cuda" and tc.channels_last:
        net = net.to(memory_format=torch.channels_last)
    ddp = nn.parallel.DistributedDataParallel(
        net, device_ids=[d.device.index] if d.device.type == "cuda" else None
    ) if d.world_size > 1 else net
    forward_net = torch.compile(ddp) if (tc.compile and d.device.type == "cuda") else ddp
    score_model = ScoreModel(forward_net, sde, centered=cfg.data.centered)
    amp_dtype = resolve_precision(tc.precision, d.device)
    weighting = LikelihoodWeighting() if tc.likelihood_weighting else SigmaSquaredWeighting()
    t_sampler = (LikelihoodImportanceSampler(sde, eps=cfg.sde.eps) if tc.importance_sampling
                 else UniformTimeSampler(eps=cfg.sde.eps, T=sde.T))
    local = tc.batch_size // d.world_size
    rank_slice = slice(d.rank * local, (d.rank + 1) * local)

    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=StepBatches(len(dataset), tc.batch_size, tc.seed, start,
                                           tc.n_iters, d.rank, d.world_size),
        num_workers=cfg.data.num_workers, pin_memory=d.device.type == "cuda",
    )
    writer = None
    if d.main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tensorboard"), purge_step=start)
    new_log = not log_path.is_file()
    csv_file = open(log_path, "a", newline="") if d.main else None  # noqa: SIM115 (closed below)
    csv_writer = csv.writer(csv_file) if csv_file else None
    if csv_writer and new_log:
        csv_writer.writerow(CSV_FIELDS)

    step, loss_value, t0, last_log_t, last_log_step = start, float("nan"), time.time(), None, start
    bar = tqdm(total=tc.n_iters, initial=start, disable=not (progress and d.main), desc="train",
               dynamic_ncols=True)
    try:
        for step, (x_uint8, y) in enumerate(loader, start=start):
            gen = seeded_generator(tc.seed, 2, step)
            x0 = _prepare_batch(x_uint8, gen, cfg, num_levels, rank_slice, d.device)
            if d.device.type == "cuda" and tc.channels_last:
                x0 = x0.contiguous(memory_format=torch.channels_last)
            labels = y.to(d.device) if cfg.model.num_classes else None
            t = t_sampler.sample(tc.batch_size, gen, dtype=torch.float32)[rank_slice].to(d.device)
            z = torch.randn((tc.batch_size,) + tuple(x0.shape[1:]), generator=gen)[rank_slice]
            z = z.to(d.device)
            torch.manual_seed(derived_seed(tc.seed, 3, step, d.rank))  # dropout masks
            for g in opt.param_groups:
                g["lr"] = learning_rate(tc, step)
            loss = training_loss(score_model, sde, x0, t, z, labels, weighting, t_sampler, tc,
                                 amp_dtype)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            max_norm = tc.grad_clip if tc.grad_clip > 0 else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm)
            loss_global = _all_reduce_mean(loss.detach(), d)
            loss_value, grad_value = loss_global.item(), float(grad_norm)
            if not (math.isfinite(loss_value) and math.isfinite(grad_value)):
                raise TrainingDiverged(
                    f"step {step}: loss={loss_value} grad_norm={grad_value} is not finite; "
                    f"stopped before the update, the last good checkpoint is "
                    f"{last_ckpt or 'none (none written yet)'}. Lower train.lr, check the data "
                    f"scaling, or try train.precision=fp32."
                )
            opt.step()
            ema_update(ema, net, tc.ema_rate)
            done = step + 1
            bar.update(1)
            if d.main and (done % tc.log_every == 0 or done == tc.n_iters):
                now = time.time()
                dt = now - (last_log_t or t0)
                ips = tc.batch_size * (done - last_log_step) / max(dt, 1e-9)
                last_log_t, last_log_step = now, done
                row = [done, f"{loss_value:.6g}", f"{grad_value:.6g}",
                       f"{learning_rate(tc, step):.6g}", f"{ips:.4g}", f"{now - t0:.2f}"]
                csv_writer.writerow(row)
                csv_file.flush()
                writer.add_scalar("train/loss", loss_value, done)
                writer.add_scalar("train/grad_norm", grad_value, done)
                writer.add_scalar("train/lr", learning_rate(tc, step), done)
                writer.add_scalar("train/images_per_s", ips, done)
                bar.set_postfix(loss=f"{loss_value:.4g}")
            if done % tc.ckpt_every == 0 or done == tc.n_iters:
                if d.main:
                    last_ckpt = _save(ckpt_dir, done, cfg, net, ema, opt, d)
                    plot_loss_curve(log_path, out / "loss.png")
                _barrier(d)
            if d.main and tc.sample_grid and done % tc.sample_every == 0:
                _save_grid(out, done, cfg, ema, sde)
    finally:
        bar.close()
        if csv_file:
            csv_file.close()
        if writer:
            writer.close()
    ema_model = ScoreModel(ema, sde, centered=cfg.data.centered).eval()
    return TrainResult(step=max(tc.n_iters, start), out_dir=out,
                       checkpoint=last_ckpt, loss=loss_value, score_model=ema_model,
                       log_path=log_path)


def _save(ckpt_dir, step, cfg, net, ema, opt, d):
    meta = {
        "step": step,
        "config": cfg.to_dict(),
        "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
        "rng": {"scheme": "seeded_generator(seed, stream, step)", "seed": cfg.train.seed},
        "world_size": d.world_size,
        "torch": torch.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path = ckpt.save_checkpoint(ckpt.checkpoint_stem(ckpt_dir, step),
                                state_tensors(net, ema, opt), meta)
    ckpt.prune_checkpoints(ckpt_dir, cfg.train.keep_last)
    return path


def _save_grid(out, step, cfg, ema, sde):
    was_training = ema.training
    ema.eval()
    x = sample_images(ScoreModel(ema, sde, centered=cfg.data.centered), sde, cfg.sampling,
                      cfg.train.sample_grid,
                      steps=cfg.sampling.grid_steps, eps=cfg.sde.sampling_eps,
                      generator=seeded_generator(cfg.train.seed, 4, step),
                      device=next(ema.parameters()).device)
    ema.train(was_training)
    save_image_grid(to_unit_range(x, cfg.data.centered), out / "samples" / f"step_{step:08d}.png")


# --- loading trained models -----------------------------------------------------------------


def load_score_model(path: str | Path, *, ema: bool = True, device="cpu"):
    """(ScoreModel, Config) from a training checkpoint or an exported EMA file (`export_ema`)."""
    tensors, meta = ckpt.load_checkpoint(path)
    cfg = config_from_dict(meta["config"], name=meta["config"].get("name", "unnamed"))
    sde = build_sde(cfg.sde)
    net = build_model(cfg.model)
    prefix = "ema/" if (ema or meta.get("kind") == "ema") else "model/"
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not state:
        raise ckpt.CheckpointError(f"{path}: no '{prefix}' tensors in this checkpoint")
    net.load_state_dict(state)
    return ScoreModel(net.to(device).eval(), sde, centered=cfg.data.centered), cfg


def export_ema(checkpoint_path: str | Path, out_stem: str | Path, note: str = "") -> Path:
    """Write only the EMA weights and the config (what the book ships): `<out_stem>.{safetensors,json}`."""
    tensors, meta = ckpt.load_checkpoint(checkpoint_path)
    ema_tensors = {k: v for k, v in tensors.items() if k.startswith("ema/")}
    small = {"kind": "ema", "step": meta["step"], "config": meta["config"], "note": note,
             "torch": meta.get("torch"), "exported_from": Path(checkpoint_path).name}
    return ckpt.save_checkpoint(out_stem, ema_tensors, small)


def summary(result: TrainResult) -> str:
    return json.dumps({"step": result.step, "loss": result.loss,
                       "checkpoint": str(result.checkpoint)})

"""Training-step throughput: images/s, peak memory and estimated model FLOP utilization.

One full optimisation step, `lsgm_edu.train.train_step` as the trainer runs it (the DSM
objective forward + backward, gradient clipping, AdamW, EMA), on synthetic images of the config's
shape, timed after warm-up. For an LSGM config it is the end-to-end stage "lsgm" step
(`training_setup(cfg, "lsgm")`: the VAE and the latent score prior, each descending its own loss,
the VAE initialised at random since no lsgm.vae_checkpoint is read).
FLOPs per step are counted once with torch.utils.flop_counter (matmuls and convolutions,
forward + backward). MFU = achieved FLOP/s / peak FLOP/s, where the peak is the GPU's dense
bf16 (or fp32) datasheet figure, or on CPU the FLOP/s of a large fp32 matmul measured here
(so CPU "MFU" is relative to what this machine's BLAS reaches, not a datasheet).

    python benchmarks/train_step.py                                   # the book configs on CPU
    python benchmarks/train_step.py --config cifar10_ddpmpp_vp --batch-size 128 --compile
    python benchmarks/train_step.py --config lsgm_cifar10_fid --batch-size 2 --steps 3
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from lsgm_edu.configs import load_config
from lsgm_edu.data import DATASETS
from lsgm_edu.objectives import Batch, BatchGenerator
from lsgm_edu.registry import MODELS
from lsgm_edu.train import (
    TrainState,
    backward_losses,
    resolve_precision,
    train_step,
    training_setup,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, utc_now, write_results

# Dense (no sparsity) tensor-core peaks from NVIDIA's datasheets, FLOP/s.
GPU_PEAKS = {
    "H100 SXM": {"bf16": 989.4e12, "fp32": 66.9e12},
    "H100 PCIe": {"bf16": 756.0e12, "fp32": 51.2e12},
    "H200": {"bf16": 989.4e12, "fp32": 66.9e12},
    "A100": {"bf16": 312.0e12, "fp32": 19.5e12},
}
BOOK_RUNS = [("digits8_ddpmpp_vp", 128), ("mnist28_ddpmpp_vp", 64), ("cifar10_ddpmpp_vp", 8),
             ("lsgm_cifar10_fid", 2)]


def is_lsgm(cfg) -> bool:
    return MODELS.name_of(cfg.model) == "lsgm"


def gpu_peak(name: str, precision: str) -> float | None:
    if "H100" in name:
        key = "H100 SXM" if ("SXM" in name or "HBM3" in name) else "H100 PCIe"
        return GPU_PEAKS[key][precision]
    for key, peaks in GPU_PEAKS.items():
        if key in name:
            return peaks[precision]
    return None


def cpu_matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench(config: str, batch_size: int, steps: int, warmup: int, device: str, precision: str,
          compile_model: bool, checkpointing: bool, overrides: list[str]) -> dict:
    lsgm = is_lsgm(load_config(config))
    flag = str(checkpointing).lower()  # the U-Net's, and an LSGM's VAE and score prior's
    sections = ["model.vae", "model.sgm"] if lsgm else ["model"]
    end_to_end = ["lsgm.train_vae=true"] if lsgm else []  # the step timed, with a random VAE
    cfg = load_config(config, [f"train.batch_size={batch_size}", f"train.precision={precision}",
                               *[f"{s}.checkpointing={flag}" for s in sections], *end_to_end,
                               *overrides])
    dev = torch.device(device)
    setup = training_setup(cfg, "lsgm" if lsgm else None)
    state = TrainState(setup.models, dev)
    cuda = dev.type == "cuda"
    if cuda and cfg.train.channels_last:
        for net in state.modules.values():
            net.to(memory_format=torch.channels_last)
    if compile_model and cuda:
        state.wrap(torch.compile)
    amp_dtype = resolve_precision(cfg.train.precision, dev)
    g = torch.Generator().manual_seed(0)
    shape = DATASETS[cfg.data.dataset].image_shape  # the data (phase space adds momenta)
    x0 = torch.rand((batch_size, *shape), generator=g)
    x0 = (x0 * 2 - 1 if cfg.data.centered else x0).to(dev)  # model space: [-1, 1] or [0, 1]
    if cuda and cfg.train.channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    labels = (torch.randint(0, cfg.model.num_classes, (batch_size,), generator=g).to(dev)
              if cfg.model.num_classes else None)
    batch = Batch(x0, labels)
    steps_done = [0]

    def step():
        stats = train_step(state, setup.objective, Batch(x0, labels, steps_done[0]),
                           BatchGenerator(g, batch_size, device=dev), steps_done[0],
                           amp_dtype=amp_dtype)
        steps_done[0] += 1
        return stats

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:  # eager, uncompiled count of one step's forward and backward
        loss, _ = setup.objective(state.modules, batch, BatchGenerator(g, batch_size, device=dev))
        backward_losses(loss, state)
    for opt in state.optimizers.values():
        opt.zero_grad(set_to_none=True)
    flops = counter.get_total_flops()

    t_compile = _timed(lambda: (step(), sync()))
    for _ in range(warmup):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    achieved = flops / median
    if cuda:
        peak_name = "bf16" if amp_dtype is not None else "fp32"
        peak = gpu_peak(torch.cuda.get_device_name(dev), peak_name)
        memory = {"peak_allocated_gib": torch.cuda.max_memory_allocated(dev) / 2**30}
        peak_source = f"datasheet dense {peak_name}"
    else:
        peak = cpu_matmul_peak()
        memory = {"peak_rss_gib_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                  / 2**20}
        peak_source = "measured fp32 2048x2048 matmul on this machine"
    per_model = {n: sum(p.numel() for p in m.parameters()) for n, m in state.modules.items()}
    return {
        "config": config, "batch_size": batch_size, "parameters": sum(per_model.values()),
        **({"parameters_per_model": per_model} if len(per_model) > 1 else {}),
        "precision": "bf16 autocast" if amp_dtype is not None else "fp32",
        "compile": bool(compile_model and cuda), "activation_checkpointing": checkpointing,
        "channels_last": bool(cuda and cfg.train.channels_last),
        "steps_timed": steps, "step_s_median": median, "step_s_min": min(times),
        "first_step_s": t_compile, "images_per_s": batch_size / median,
        "flops_per_step": flops, "achieved_tflops": achieved / 1e12,
        "peak_tflops": peak / 1e12 if peak else None, "peak_source": peak_source,
        "mfu": achieved / peak if peak else None, **memory,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="one config (default: the book configs, CIFAR-10 DDPM++ and "
                   "LSGM's best-FID CIFAR-10 model)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA)")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--name", help="result file name (default train_step_<device>.json)")
    args = p.parse_args(argv)
    runs = [(args.config, args.batch_size or 128)] if args.config else BOOK_RUNS
    t0 = time.time()
    results = []
    for config, batch in runs:
        r = bench(config, batch, args.steps, args.warmup, args.device, args.precision,
                  args.compile, args.checkpointing, args.overrides)
        results.append(r)
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"{config:22s} batch {batch:4d}: {r['images_per_s']:9.1f} img/s, "
              f"{r['step_s_median'] * 1e3:8.1f} ms/step, {r['achieved_tflops']:.3f} TFLOP/s, "
              f"MFU {mfu}")
    summary = {
        "benchmark": "train_step",
        "date": utc_now(),
        "machine": machine(args.device),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "results": results,
        "total_wall_s": time.time() - t0,
    }
    dev_kind = "cpu" if args.device == "cpu" else "gpu"
    out = Path(args.out) / (args.name or f"train_step_{dev_kind}.json")
    write_results(summary, out)
    print(json.dumps({"written": str(out), "total_wall_s": summary["total_wall_s"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What every benchmark records: the machine it ran on and the date, written atomically."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

import torch

from lsgm_edu.checkpoint import atomic_write_text


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(device: str = "cpu") -> dict:
    """Platform, CPU, cores, torch threads and versions, and the accelerator if one is used."""
    import torchdiffeq

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchdiffeq": torchdiffeq.__version__,
        "device": device,
    }
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda)
    return info


def utc_now() -> str:
    """The UTC date and time, to the second (ISO 8601): every result's `date`."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_results(report: dict, path: str | Path) -> Path:
    """Write a benchmark's JSON atomically (a crash leaves the previous results, never half a
    file), creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, json.dumps(report, indent=1) + "\n")


TRAIN_SUBSET_STREAM = 9  # the seed stream of the training-image subsets of `fid_floor`


def fid_floor(fid, train: torch.Tensor, n: int, seed: int) -> dict:
    """The classifier-FID of real training images against the reference, for disjoint seeded
    random subsets of n images (image sets of a sample's size: the metric's floor and its own
    sampling noise at that n). Random, not the first n: the mnist5k splits are sorted by label.
    `fid(images)` computes the metric; returns the mean, s.d. and the draws."""
    from lsgm_edu.train import seeded_generator

    order = torch.randperm(len(train), generator=seeded_generator(seed, TRAIN_SUBSET_STREAM))
    size = min(n, len(train))
    draws = [fid(train[order[i : i + size]]) for i in range(0, len(train) - size + 1, size)]
    return {"classifier_fid": sum(draws) / len(draws),
            "classifier_fid_sd": float(torch.tensor(draws).std()) if len(draws) > 1 else None,
            "classifier_fid_draws": draws, "n": size}


"""Trainer: exact resume after kill -9, corrupt checkpoints, pickle refusal, NaN stop, DDP = 1 process."""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lsgm_edu import checkpoint as ckpt
from lsgm_edu.configs import load_config
from lsgm_edu.train import TrainingDiverged, global_batch_indices, init_model, train

# A small digits model: quick steps, yet every code path of the trainer (EMA, warmup, clipping,
# flips, dequantization, DSM, checkpoints) runs.
TINY = [
    "model.nf=16", "model.ch_mult=[1, 2]", "model.num_res_blocks=1", "model.attn_resolutions=[4]",
    "train.batch_size=16", "train.warmup=5", "train.log_every=1", "train.sample_every=1000000",
    "train.ema_rate=0.9", "data.dequantize=true",
]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _cli(out: Path, steps: int, ckpt_every: int, *extra: str, resume=False, launcher=None):
    sets = [*TINY, f"train.n_iters={steps}", f"train.ckpt_every={ckpt_every}", *extra]
    cmd = (launcher or [sys.executable, "-m", "lsgm_edu"]) + [
        "train", "--config", "digits8_ddpmpp_vp", "--out", str(out), "--no-progress"]
    for s in sets:
        cmd += ["--set", s]
    return cmd + (["--resume"] if resume else [])


def _final_tensors(out: Path) -> dict:
    step, sidecar = ckpt.list_checkpoints(out / "checkpoints")[-1]
    tensors, _meta = ckpt.load_checkpoint(sidecar)
    return {"step": step, **tensors}


def _logged_step(log: Path) -> int:
    try:
        lines = log.read_text().strip().splitlines()
        return int(lines[-1].split(",")[0]) if len(lines) > 1 else 0
    except (FileNotFoundError, ValueError):
        return 0


def test_batches_are_a_seeded_permutation_per_epoch():
    n, b = 50, 8
    per_epoch = n // b
    epoch0 = torch.cat([global_batch_indices(n, b, s, seed=3) for s in range(per_epoch)])
    assert len(set(epoch0.tolist())) == per_epoch * b  # no repeats within an epoch
    assert torch.equal(global_batch_indices(n, b, 2, seed=3), global_batch_indices(n, b, 2, 3))
    assert not torch.equal(global_batch_indices(n, b, 0, 3), global_batch_indices(n, b, per_epoch, 3))


def test_exact_resume_after_kill9(tmp_path):
    steps, every = 160, 10
    ref, run = tmp_path / "uninterrupted", tmp_path / "killed"
    subprocess.run(_cli(ref, steps, every), check=True, env=ENV, capture_output=True, text=True)

    kill_at = random.Random().randint(15, 120)
    proc = subprocess.Popen(_cli(run, steps, every), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while _logged_step(run / "log.csv") < kill_at and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, f"the run finished before the kill at step {kill_at}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = _logged_step(run / "log.csv")
    saved = ckpt.list_checkpoints(run / "checkpoints")
    assert saved and saved[-1][0] < steps, f"killed at {killed_at}, checkpoints {saved}"

    res = subprocess.run(_cli(run, steps, every, resume=True), check=False, env=ENV, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"resuming from step {saved[-1][0]}" in res.stdout + res.stderr

    a, b = _final_tensors(ref), _final_tensors(run)
    assert a.keys() == b.keys() and a["step"] == b["step"] == steps
    for k in a:
        if k.startswith(("model/", "ema/", "opt/")):
            assert torch.equal(a[k], b[k]), f"{k} differs after kill at step {killed_at}"
    # the log was cut back to the checkpoint and continued: one row per step, in order
    logged = [int(line.split(",")[0]) for line in (run / "log.csv").read_text().splitlines()[1:]]
    assert logged == list(range(1, steps + 1))


def test_refuses_to_overwrite_a_run_without_resume(tmp_path):
    subprocess.run(_cli(tmp_path, 4, 2), check=True, env=ENV, capture_output=True)
    res = subprocess.run(_cli(tmp_path, 4, 2), check=False, env=ENV, capture_output=True, text=True)
    assert res.returncode == 2 and "--resume" in res.stderr


def _tiny_cfg(*extra):
    return load_config("digits8_ddpmpp_vp", [*TINY, *extra])


def test_corrupt_checkpoint_is_reported_and_previous_one_used(tmp_path):
    cfg = _tiny_cfg("train.n_iters=6", "train.ckpt_every=2", "train.keep_last=5")
    train(cfg, tmp_path, progress=False, log=lambda *a: None)
    saved = ckpt.list_checkpoints(tmp_path / "checkpoints")
    assert [s for s, _ in saved] == [2, 4, 6]
    newest = saved[-1][1].with_suffix(".safetensors")
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncate
    with pytest.raises(ckpt.CheckpointError, match="truncated or corrupt"):
        ckpt.load_checkpoint(saved[-1][1])
    warnings = []
    _tensors, meta = ckpt.latest_checkpoint(tmp_path / "checkpoints", warn=warnings.append)
    assert meta["step"] == 4 and "step 6" in warnings[0] and newest.name in warnings[0]
    saved[1][1].write_text("{not json")  # a corrupt sidecar is skipped the same way
    warnings.clear()
    _, meta = ckpt.latest_checkpoint(tmp_path / "checkpoints", warn=warnings.append)
    assert meta["step"] == 2 and len(warnings) == 2 and "corrupt checkpoint sidecar" in warnings[1]
    logs = []
    result = train(cfg, tmp_path, progress=False, log=logs.append)
    assert result.step == 6 and any("resuming from step 2" in m for m in logs)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_checkpoint_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "executed"
    for name in ("model.pt", "step_00000001.safetensors"):
        path = tmp_path / name
        path.write_bytes(pickle.dumps({"weights": _Exploit(marker)}))
        if path.suffix == ".safetensors":
            sidecar = {"format": ckpt.FORMAT, "tensors": path.name, "step": 1,
                       "sha256": ckpt.sha256_file(path)}
            ckpt.atomic_write_text(path.with_suffix(".json"), json.dumps(sidecar))
        with pytest.raises(ckpt.CheckpointError, match="never unpickles"):
            ckpt.load_checkpoint(path)
    assert not marker.exists()


def test_nan_loss_stops_and_keeps_good_checkpoints(tmp_path):
    cfg = _tiny_cfg("train.n_iters=50", "train.ckpt_every=1", "train.warmup=0", "train.lr=1e30",
                    "train.grad_clip=0")
    with pytest.raises(TrainingDiverged, match=r"not finite.*last good checkpoint"):
        train(cfg, tmp_path, progress=False, log=lambda *a: None)
    saved = ckpt.list_checkpoints(tmp_path / "checkpoints")
    for _, sidecar in saved:
        tensors, _ = ckpt.load_checkpoint(sidecar)
        assert all(torch.isfinite(v).all() for k, v in tensors.items() if k.startswith("model/"))


def test_training_writes_logs_curves_grids_and_lowers_the_loss(tmp_path):
    cfg = _tiny_cfg("train.n_iters=60", "train.ckpt_every=20", "train.sample_every=60",
                    "train.sample_grid=4", "sampling.grid_steps=5", "train.warmup=10",
                    "train.lr=2e-3", "train.keep_last=2")
    import matplotlib

    before = matplotlib.get_backend()
    matplotlib.use("svg")  # stands in for a notebook's inline backend, which train must not switch
    try:
        result = train(cfg, tmp_path, progress=False, log=lambda *a: None)
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
    rows = (tmp_path / "log.csv").read_text().splitlines()
    assert rows[0].startswith("step,loss") and len(rows) == 61
    losses = [float(r.split(",")[1]) for r in rows[1:]]
    assert sum(losses[-10:]) < 0.8 * sum(losses[:10])
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "checkpoints")] == [40, 60]  # keep 2
    assert (tmp_path / "samples" / "step_00000060.png").is_file()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    x = torch.randn(3, 1, 8, 8)
    assert result.score_model(x, torch.full((3,), 0.5)).shape == x.shape


def test_ddp_two_processes_equal_one_process(tmp_path):
    extra = ["model.dropout=0.0"]
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(_cli(one, 6, 6, *extra), check=True, env=ENV, capture_output=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2", "-m", "lsgm_edu"]
    res = subprocess.run(_cli(two, 6, 6, *extra, launcher=torchrun), check=False, env=ENV,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    a, b = _final_tensors(one), _final_tensors(two)
    worst = max((a[k] - b[k]).abs().max().item() for k in a if k.startswith("model/"))
    assert worst < 1e-6, f"2-process DDP differs from 1 process by {worst}"
    init = init_model(load_config("digits8_ddpmpp_vp", [*TINY, *extra])).state_dict()
    moved = max((a[f"model/{k}"] - v).abs().max().item() for k, v in init.items())
    assert moved > 1e-3, "the weights did not train, so their equality would prove nothing"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_channels_last_compile_trains(tmp_path):
    cfg = _tiny_cfg("train.n_iters=20", "train.ckpt_every=20", "train.compile=true",
                    "train.lr=2e-3")
    result = train(cfg, tmp_path, device="cuda", progress=False, log=lambda *a: None)
    rows = (tmp_path / "log.csv").read_text().splitlines()[1:]
    losses = [float(r.split(",")[1]) for r in rows]
    assert all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0]
    x = torch.randn(2, 1, 8, 8, device="cuda")
    assert result.score_model(x, torch.full((2,), 0.5, device="cuda")).dtype == torch.float32

"""Trainer: exact resume after kill -9, corrupt checkpoints, pickle refusal, NaN stop, DDP = 1
process, for DSM and for a toy objective over two models with two optimizers; checkpoints
of the first format."""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from lsgm_edu import checkpoint as ckpt
from lsgm_edu.configs import ConfigError, LegacyConfigWarning, config_from_dict, load_config
from lsgm_edu.data import shipped_file
from lsgm_edu.train import (
    TrainingDiverged,
    _same_training_problem,
    global_batch_indices,
    init_model,
    load_score_model,
    migrate_checkpoint,
    read_log,
    train,
)

# A small digits model: quick steps, yet every code path of the trainer (EMA, warmup, clipping,
# flips, dequantization, DSM, checkpoints) runs.
TINY = [
    "model.nf=16", "model.ch_mult=[1, 2]", "model.num_res_blocks=1", "model.attn_resolutions=[4]",
    "train.batch_size=16", "train.warmup=5", "train.log_every=1", "train.sample_every=1000000",
    "train.ema_rate=0.9", "data.dequantize=true",
]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
TWO_MODELS = Path(__file__).resolve().parent / "_two_models.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _cli(out: Path, steps: int, ckpt_every: int, *extra: str, resume=False, launcher=None):
    sets = [*TINY, f"train.n_iters={steps}", f"train.ckpt_every={ckpt_every}", *extra]
    cmd = (launcher or [sys.executable, "-m", "lsgm_edu"]) + [
        "train", "--config", "digits8_ddpmpp_vp", "--out", str(out), "--no-progress"]
    for s in sets:
        cmd += ["--set", s]
    return cmd + (["--resume"] if resume else [])


def _toy(out: Path, steps: int, ckpt_every: int, resume=False, launcher=None):
    """Command of the two-model toy run (tests/_two_models.py)."""
    cmd = (launcher or [sys.executable]) + [str(TWO_MODELS), str(out), str(steps), str(ckpt_every)]
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


def _kill_and_resume(command, tmp_path, steps, every, seed, kill_range):
    """Run `command(out, resume)` uninterrupted and killed with SIGKILL at a step drawn from
    `seed`, then resumed; both must end with bit-identical tensors and one log row per step."""
    ref, run = tmp_path / "uninterrupted", tmp_path / "killed"
    subprocess.run(command(ref, False), check=True, env=ENV, capture_output=True, text=True)

    kill_at = random.Random(seed).randint(*kill_range)
    proc = subprocess.Popen(command(run, False), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while _logged_step(run / "log.csv") < kill_at and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    assert proc.poll() is None, f"the run finished before the kill at step {kill_at} (seed {seed})"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = _logged_step(run / "log.csv")
    saved = ckpt.list_checkpoints(run / "checkpoints")
    assert saved and saved[-1][0] < steps, f"killed at {killed_at}, checkpoints {saved}"

    res = subprocess.run(command(run, True), check=False, env=ENV, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"resuming from step {saved[-1][0]}" in res.stdout + res.stderr

    a, b = _final_tensors(ref), _final_tensors(run)
    assert a.keys() == b.keys() and a["step"] == b["step"] == steps
    for k in a.keys() - {"step"}:
        assert torch.equal(a[k], b[k]), f"{k} differs after kill at step {killed_at} (seed {seed})"
    # the log was cut back to the checkpoint and continued: one row per step, in order
    logged = [int(line.split(",")[0]) for line in (run / "log.csv").read_text().splitlines()[1:]]
    assert logged == list(range(1, steps + 1))
    return a


@pytest.mark.slow
def test_exact_resume_after_kill9(tmp_path, replay_seed):
    tensors = _kill_and_resume(lambda out, resume: _cli(out, 160, 10, resume=resume), tmp_path,
                               160, 10, replay_seed, (15, 120))
    assert {k.split("/")[0] for k in tensors if k != "step"} == {"score", "ema", "opt"}


@pytest.mark.slow
def test_two_models_two_optimizers_resume_exactly_after_kill9(tmp_path, replay_seed):
    tensors = _kill_and_resume(lambda out, resume: _toy(out, 300, 10, resume=resume), tmp_path,
                               300, 10, replay_seed, (15, 200))
    # a model per name, an EMA only where configured, Adam state by parameter name
    assert {k.rsplit("/", 1)[0] for k in tensors if k.startswith("ema/")} == {"ema/decoder"}
    assert "opt/encoder/0.weight/exp_avg" in tensors and "opt/decoder/2.bias/exp_avg_sq" in tensors


@pytest.mark.slow
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
        assert all(torch.isfinite(v).all() for k, v in tensors.items() if k.startswith("score/"))


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


@pytest.mark.slow
def ddp_two_processes_equal_one_process(tmp_path, *extra: str) -> dict:
    """Train 6 steps with one process and with two (torchrun); the weights must agree to 1e-6.
    Returns the one-process run's tensors."""
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(_cli(one, 6, 6, *extra), check=True, env=ENV, capture_output=True)
    res = subprocess.run(_cli(two, 6, 6, *extra, launcher=[*TORCHRUN, "-m", "lsgm_edu"]),
                         check=False, env=ENV, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    a, b = _final_tensors(one), _final_tensors(two)
    worst = max((a[k] - b[k]).abs().max().item() for k in a if k.startswith("score/"))
    assert worst < 1e-6, f"2-process DDP differs from 1 process by {worst}"
    return a


def test_ddp_two_processes_equal_one_process(tmp_path):
    extra = ["model.dropout=0.0"]
    a = ddp_two_processes_equal_one_process(tmp_path, *extra)
    init = init_model(load_config("digits8_ddpmpp_vp", [*TINY, *extra])).state_dict()
    moved = max((a[f"score/{k}"] - v).abs().max().item() for k, v in init.items())
    assert moved > 1e-3, "the weights did not train, so their equality would prove nothing"


@pytest.mark.slow
def test_two_models_ddp_two_processes_equal_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(_toy(one, 8, 8), check=True, env=ENV, capture_output=True)
    res = subprocess.run(_toy(two, 8, 8, launcher=TORCHRUN), check=False, env=ENV,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    a, b = _final_tensors(one), _final_tensors(two)
    assert a.keys() == b.keys()
    for k in a:
        if k != "step" and not k.endswith("/step"):
            assert (a[k] - b[k]).abs().max().item() < 1e-6, k
    log = read_log(one / "log.csv")  # each optimizer ran its own warmup to its own rate
    assert log["lr/encoder"][-1] == 3e-3 and log["lr/decoder"][-1] == 1e-3
    assert log["lr/encoder"][0] == pytest.approx(1e-3) and "code_norm" in log
    assert all(math.isfinite(v) for v in log["loss"])


def test_train_step_steps_each_model_with_its_own_optimizer():
    sys.path.insert(0, str(TWO_MODELS.parent))
    from _two_models import toy_config, toy_setup

    from lsgm_edu.objectives import Batch, BatchGenerator
    from lsgm_edu.train import TrainState, train_step

    cfg = toy_config(4, 4)
    setup = toy_setup(cfg)
    state = TrainState(setup.models)
    before = {k: v.clone() for k, v in state.tensors().items()}
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    stats = train_step(state, setup.objective, Batch(x), BatchGenerator(
        torch.Generator().manual_seed(1), 8), step=5)  # past the encoder's 3 warmup steps
    assert stats.lrs == {"encoder": 3e-3, "decoder": 1e-3} and "code_norm" in stats.logs
    after = state.tensors()
    assert not torch.equal(after["encoder/0.weight"], before["encoder/0.weight"])
    assert not torch.equal(after["ema/decoder/0.weight"], before["ema/decoder/0.weight"])
    assert "ema/encoder/0.weight" not in after  # no EMA configured for the encoder
    # Adam's first step moves every weight by about lr: the two rates show in the updates
    d_enc = (after["encoder/0.weight"] - before["encoder/0.weight"]).abs().max().item()
    d_dec = (after["decoder/0.weight"] - before["decoder/0.weight"]).abs().max().item()
    assert d_enc == pytest.approx(stats.lrs["encoder"], rel=0.01)
    assert d_dec == pytest.approx(stats.lrs["decoder"], rel=0.01)


def test_first_format_config_is_converted_with_a_warning():
    old = load_config("cifar10_ncsnpp_ve").to_dict()
    old["model"] = {**{k: v for k, v in old["model"].items() if k not in ("name", "arch")},
                    "name": "ncsnpp"}
    old["sde"] = {"name": "vesde", "beta_min": 0.1, "beta_max": 20.0, "sigma_min": 0.01,
                  "sigma_max": 50.0, "N": 1000, "eps": 1e-5, "sampling_eps": 2e-5}
    del old["train"]["eps"], old["sampling"]["eps"]
    with pytest.warns(LegacyConfigWarning, match="sde.name vesde -> ve") as w:
        cfg = config_from_dict(old, name="cifar10_ncsnpp_ve")
    assert "dropped beta_max, beta_min" in str(w[0].message)
    assert cfg.to_dict() == {**load_config("cifar10_ncsnpp_ve").to_dict(),
                             "sampling": {**cfg.to_dict()["sampling"], "eps": 2e-5}}
    assert cfg.model.arch == "ncsnpp" and cfg.train.eps == 1e-5


def test_shipped_checkpoint_loads_and_first_format_migrates_bit_for_bit(tmp_path):
    shipped = shipped_file("checkpoints/mnist28_ddpmpp_vp.json")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the shipped files are in the current format
        model, cfg = load_score_model(shipped)
    tensors, meta = ckpt.load_checkpoint(shipped)
    assert meta["state_layout"] == 2 and all(k.startswith("ema/score/") for k in tensors)
    assert meta["config"]["sde"]["name"] == "vp" and cfg.sampling.eps == 1e-3
    # write it back in the first format, as the trainer wrote it before, and migrate it
    old_cfg = dict(meta["config"], sde={"name": "vpsde", "beta_min": 0.1, "beta_max": 20.0,
                                        "sigma_min": 0.01, "sigma_max": 50.0, "N": 1000,
                                        "eps": 1e-5, "sampling_eps": 1e-3},
                   model={**{k: v for k, v in meta["config"]["model"].items() if k != "arch"},
                          "name": "ddpmpp"})
    old_meta = {"kind": "ema", "step": meta["step"], "config": old_cfg}
    old = ckpt.save_checkpoint(tmp_path / "old", {f"ema/{k[len('ema/score/'):]}": v
                                                  for k, v in tensors.items()}, old_meta)
    with pytest.warns(UserWarning, match="first"):
        legacy_model, _ = load_score_model(old)
    new = migrate_checkpoint(old, tmp_path / "new")
    migrated, new_meta = ckpt.load_checkpoint(new)
    assert migrated.keys() == tensors.keys()
    assert all(torch.equal(migrated[k].view(torch.uint8), tensors[k].view(torch.uint8))
               for k in tensors)
    # the migrated config is the shipped one as today's loader reads it (fields added since
    # the checkpoint was written take their defaults in both)
    assert new_meta["config"] == json.loads(json.dumps(cfg.to_dict()))
    for a, b in zip(model.state_dict().values(), legacy_model.state_dict().values()):
        assert torch.equal(a, b)


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


def test_resume_reads_a_key_an_older_checkpoint_lacks_as_its_default():
    """A config key added after a run started (model.out_channels) must not block its resume:
    missing from the checkpoint means the default; a real difference is still refused."""
    cfg = _tiny_cfg()
    saved = json.loads(json.dumps(cfg.to_dict()))
    del saved["model"]["out_channels"]
    _same_training_problem(saved, cfg)
    with pytest.raises(ConfigError, match="model.out_channels: checkpoint 0 vs now 1"):
        _same_training_problem(saved, _tiny_cfg("model.out_channels=1"))


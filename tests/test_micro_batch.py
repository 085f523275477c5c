"""Gradient accumulation (`train.micro_batch`): micro-batches give the full batch's step, alone
and under DDP, and a micro-batched run resumes bit for bit."""

from __future__ import annotations

import subprocess

import pytest
import torch
from test_train import ENV, TORCHRUN, _cli, _final_tensors, _tiny_cfg

from lsgm_edu import checkpoint as ckpt
from lsgm_edu.configs import ConfigError
from lsgm_edu.objectives import Batch, BatchGenerator
from lsgm_edu.train import micro_batches, train

NO_DROPOUT = "model.dropout=0.0"  # dropout masks come from the global RNG, not the batch's draws


def _run(out, *extra):
    cfg = _tiny_cfg(NO_DROPOUT, *extra)
    train(cfg, out, progress=False, log=lambda *a: None)
    return _final_tensors(out)


def _worst(a: dict, b: dict, prefix: str = "score/") -> float:
    keys = [k for k in a if k.startswith(prefix)]
    assert keys and a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in keys)


def test_micro_batches_take_their_rows_of_the_global_draws():
    """Each micro-batch sees its rows of the data and of every random draw of the full batch."""
    x = torch.arange(8.0).reshape(8, 1)
    full = BatchGenerator(torch.Generator().manual_seed(5), 16, slice(8, 16))
    want = BatchGenerator(torch.Generator().manual_seed(5), 16, slice(8, 16)).randn(3)
    parts = list(micro_batches(Batch(x, torch.arange(8), 3), full, 2))
    assert [w for *_, w in parts] == [0.25] * 4
    assert torch.equal(torch.cat([b.x for b, _, _ in parts]), x)
    assert torch.equal(torch.cat([b.y for b, _, _ in parts]), torch.arange(8))
    assert all(b.step == 3 for b, _, _ in parts)
    assert torch.equal(torch.cat([g.randn(3) for _, g, _ in parts]), want)
    (only, gen, weight), = micro_batches(Batch(x), full, 0)
    assert only.x is x and gen is full and weight == 1.0
    with pytest.raises(ValueError, match="must divide the 8 rows"):
        list(micro_batches(Batch(x), full, 3))


def test_four_micro_batches_equal_one_full_batch(tmp_path):
    steps = ["train.n_iters=6", "train.ckpt_every=6"]
    full = _run(tmp_path / "full", *steps)
    micro = _run(tmp_path / "micro", *steps, "train.micro_batch=4")  # batch 16: 4 x 4 rows
    worst = _worst(full, micro)
    assert worst < 1e-6, f"4 micro-batches differ from the full batch by {worst}"
    assert _worst(full, micro, "ema/") < 1e-6
    init = _tiny_cfg(NO_DROPOUT)
    from lsgm_edu.train import init_model

    moved = max((full[f"score/{k}"] - v).abs().max().item()
                for k, v in init_model(init).state_dict().items())
    assert moved > 1e-3, "the weights did not train, so their equality would prove nothing"


def test_micro_batched_run_resumes_bit_for_bit(tmp_path):
    ref = _run(tmp_path / "ref", "train.n_iters=8", "train.ckpt_every=4", "train.micro_batch=8")
    _run(tmp_path / "split", "train.n_iters=4", "train.ckpt_every=4", "train.micro_batch=8")
    resumed = _run(tmp_path / "split", "train.n_iters=8", "train.ckpt_every=4",
                   "train.micro_batch=8")
    assert ref.keys() == resumed.keys() and resumed["step"] == 8
    for k in ref.keys() - {"step"}:
        assert torch.equal(ref[k], resumed[k]), k
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "split" / "checkpoints")] == [4, 8]


@pytest.mark.slow
def test_two_processes_with_micro_batches_equal_one_process_with_the_full_batch(tmp_path):
    """DDP with 2 processes x 2 micro-batches of 4 rows (gradients all-reduced once per step,
    `no_sync` before) takes one process's full-batch step."""
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(_cli(one, 6, 6, NO_DROPOUT), check=True, env=ENV, capture_output=True)
    res = subprocess.run(_cli(two, 6, 6, NO_DROPOUT, "train.micro_batch=4",
                              launcher=[*TORCHRUN, "-m", "lsgm_edu"]),
                         check=False, env=ENV, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    worst = _worst(_final_tensors(one), _final_tensors(two))
    assert worst < 1e-6, f"2 processes x 2 micro-batches differ from 1 process by {worst}"


def test_micro_batch_that_does_not_divide_the_batch_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="train.micro_batch=5 must divide train.batch_size=16"):
        _tiny_cfg("train.micro_batch=5")
    with pytest.raises(ConfigError, match="train.micro_batch must be >= 0"):
        _tiny_cfg("train.micro_batch=-1")

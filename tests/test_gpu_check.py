"""benchmarks/gpu_check.py: it refuses to start without CUDA, and its parts (throughput, a
killed-and-resumed run, the samplers) run end to end on a tiny CPU plan, so the script works
the day a GPU is lent."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_check


def test_gpu_check_refuses_to_start_without_cuda(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path), "--work", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "torch.cuda.is_available() is False" in err
    assert not list(tmp_path.iterdir()), "nothing is written when it refuses"


@pytest.mark.slow
def test_gpu_check_parts_run_on_a_tiny_cpu_plan(tmp_path):
    plan = gpu_check.tiny_cpu_plan()
    report = gpu_check.run_check(plan, tmp_path)
    failed = {k: report[k].get("error") for k in ("train_step", "resume", "sampling")
              if not report[k]["ok"]}
    assert not failed, failed
    assert report["all_ok"] and "tests" not in report
    (row,) = report["train_step"]["results"]
    assert row["images_per_s"] > 0 and row["flops_per_step"] > 0
    resume = report["resume"]
    assert 0 < resume["killed_at_logged_step"] < plan.resume_steps
    assert resume["resumed_from"] is not None and resume["resumed_from"] < plan.resume_steps
    assert resume["bitwise_equal"] and resume["max_abs_weight_diff"] == 0.0  # CPU: deterministic
    assert set(report["sampling"]) >= {"pc", "em", "ode"}
    for method in ("pc", "em", "ode"):
        assert report["sampling"][method]["finite"] and report["sampling"][method]["nfe"] > 0

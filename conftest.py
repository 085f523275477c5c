"""Repo-wide pytest plugin: per-notebook durations and the chapters' fast-mode time budgets.

Notebook cells run as nbval items; their setup/call/teardown times are summed per notebook and
written to .build/notebook-durations.{json,md}, so a person can read how long each chapter took.
A chapter over its budget fails the run (the budgets are the issue's acceptance limits).
"""

from __future__ import annotations

import json
import os
import platform
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
REPORT_DIR = ROOT / ".build"
# Seconds on 2 CPU cores in fast mode, by chapter number (the issues' acceptance limits);
# a chapter not listed gets the default.
BUDGET_BY_NUMBER_S = {1: 60.0, **{n: 90.0 for n in range(2, 8)}}
DEFAULT_BUDGET_S = 120.0


def _budget(notebook: str) -> float:
    prefix = notebook[:2]
    if not prefix.isdigit():
        return DEFAULT_BUDGET_S
    return BUDGET_BY_NUMBER_S.get(int(prefix), DEFAULT_BUDGET_S)

_durations: dict[str, float] = defaultdict(float)


def _notebook_of(nodeid: str) -> str | None:
    path = nodeid.split("::", 1)[0]
    return Path(path).stem if path.endswith(".ipynb") else None


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    notebook = _notebook_of(report.nodeid)
    if notebook is not None:
        _durations[notebook] += report.duration


def _over_budget() -> list[str]:
    return [
        f"{name}: {secs:.1f} s > budget {_budget(name):.0f} s"
        for name, secs in sorted(_durations.items())
        if secs > _budget(name)
    ]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not _durations:
        return
    REPORT_DIR.mkdir(exist_ok=True)
    record = {
        "fast_mode": os.environ.get("LSGM_EDU_FAST", "0"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "seconds": {k: round(v, 2) for k, v in sorted(_durations.items())},
        "budgets": {k: _budget(k) for k in sorted(_durations)},
    }
    (REPORT_DIR / "notebook-durations.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = ["| notebook | seconds | budget |", "|---|---:|---:|"]
    lines += [f"| {k} | {v:.1f} | {record['budgets'][k]:.0f} |" for k, v in record["seconds"].items()]
    (REPORT_DIR / "notebook-durations.md").write_text("\n".join(lines) + "\n")
    if _over_budget() and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not _durations:
        return
    terminalreporter.section("notebook durations (fast mode)")
    for name, secs in sorted(_durations.items()):
        terminalreporter.write_line(f"{secs:7.1f} s  {name}")
    terminalreporter.write_line(f"written to {REPORT_DIR / 'notebook-durations.md'}")
    for line in _over_budget():
        terminalreporter.write_line(f"OVER BUDGET: {line}", red=True)

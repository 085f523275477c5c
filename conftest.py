"""Repo-wide pytest plugin: per-notebook durations, the chapters' fast-mode time budgets, and
the executed notebooks that the book checks reuse.

Notebook cells run as nbval items; their setup/call/teardown times are summed per notebook and
written to .build/notebook-durations.{json,md}, so a person can read how long each chapter took.
A chapter over its budget fails the run (the budgets are the issue's acceptance limits).

Each chapter is executed once per run, by nbval: when every cell of a notebook passed, the
notebook with the outputs nbval received is written to .build/executed/<chapter>.ipynb, and the
website check (tools/check_book.py --outputs) renders those instead of executing the chapters
again. Tests marked `after_notebooks` run after the notebooks, so that they find them, and the
fixture `chapter_seconds` gives them the chapter times measured in the same run (their
timeouts scale with those, so a busy machine slows both alike instead of failing the checks).
"""

from __future__ import annotations

import copy
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
EXECUTED_DIR = REPORT_DIR / "executed"
_executed: dict[str, Path] = {}  # chapter stem -> executed notebook written in this run
_cells_ok: dict[str, int] = defaultdict(int)  # chapter stem -> code cells that passed


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "after_notebooks: run after the notebook items of the same run (uses "
        "their executed outputs and measured times)")


def _is_notebook_cell(item: pytest.Item) -> bool:
    return type(item).__name__ == "IPyNbCell"


def pytest_collection_modifyitems(session, config, items: list[pytest.Item]) -> None:
    if any(_is_notebook_cell(i) for i in items):
        late = [i for i in items if i.get_closest_marker("after_notebooks")]
        if late:
            items[:] = [i for i in items if not i.get_closest_marker("after_notebooks")] + late


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    notebook = _notebook_of(item.nodeid)
    if notebook is not None and getattr(item, "cell_num", None) == 0:
        # a new run of this chapter: outputs of an earlier run must not be mistaken for it
        _executed.pop(notebook, None)
        _cells_ok[notebook] = 0
        (EXECUTED_DIR / f"{notebook}.ipynb").unlink(missing_ok=True)


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    notebook = _notebook_of(item.nodeid)
    if notebook is None or not _is_notebook_cell(item):
        return
    if nextitem is not None and nextitem.parent is item.parent:
        return
    import nbformat

    nb = copy.deepcopy(item.parent.nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    outputs = getattr(item.parent, "_lsgm_outputs", {})
    if _cells_ok[notebook] != len(code) or len(outputs) != len(code):
        return  # a cell failed or did not run: no outputs for the book check
    for i, cell in enumerate(code):
        cell.outputs = [nbformat.from_dict(o) for o in outputs[i]]
        cell.execution_count = i + 1
    nb.metadata["lsgm_edu"] = {"executed_by": "nbval",
                               "fast_mode": os.environ.get("LSGM_EDU_FAST", "0")}
    EXECUTED_DIR.mkdir(parents=True, exist_ok=True)
    path = EXECUTED_DIR / f"{notebook}.ipynb"
    tmp = path.with_suffix(".tmp")
    nbformat.write(nb, tmp)
    tmp.replace(path)
    _executed[notebook] = path


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    if call.when != "call" or not _is_notebook_cell(item):
        return
    report = outcome.get_result()
    notebook = _notebook_of(item.nodeid)
    if report.passed and notebook is not None:
        _cells_ok[notebook] += 1
        outs = [dict(o) for o in (getattr(item, "test_outputs", None) or [])]
        for o in outs:  # as nbformat wants them
            if o.get("output_type") == "execute_result":
                o.setdefault("execution_count", item.cell_num + 1)
                o.setdefault("metadata", {})
            elif o.get("output_type") == "display_data":
                o.setdefault("metadata", {})
        if not hasattr(item.parent, "_lsgm_outputs"):
            item.parent._lsgm_outputs = {}
        item.parent._lsgm_outputs[item.cell_num] = outs


@pytest.fixture(scope="session")
def executed_chapters() -> dict[str, Path]:
    """Chapter stem -> notebook with the outputs of its run in this session (filled as the
    notebooks run; tests marked `after_notebooks` see all of them)."""
    return _executed


@pytest.fixture(scope="session")
def notebooks_run():
    """Stems of the notebooks nbval started in this session, whether or not they passed
    (a live view)."""
    return _cells_ok.keys()


@pytest.fixture(scope="session")
def chapter_seconds():
    """`seconds(stem) -> (seconds, where from)`: the chapter's fast-mode time measured in this
    run, else in the last run (.build/notebook-durations.json), else its budget."""
    def seconds(stem: str) -> tuple[float, str]:
        if _executed.get(stem) and _durations.get(stem):
            return _durations[stem], "measured in this run"
        try:
            record = json.loads((REPORT_DIR / "notebook-durations.json").read_text())
            return float(record["seconds"][stem]), "measured in the last run"
        except (OSError, ValueError, KeyError, TypeError):
            return _budget(stem), "its budget (not measured)"
    return seconds


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

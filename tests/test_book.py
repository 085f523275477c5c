"""The book as a whole: offline validation, the website build, `make lab`, every chapter
rendered in JupyterLab.

- the offline strict build (tools/check_book.py) passes on the real book and fails, naming
  the culprit, on a copy with a broken cross-reference, citation, directive or role;
- the website build renders every chapter with outputs: from the notebooks nbval executed in
  the same run (`--outputs .build/executed`), so `make test` executes each chapter once for
  both; run alone, this file executes them as `jupyter book build --execute` does;
- a build that times out, is interrupted or killed leaves no process behind;
- no chapter, as jupytext reads it into a notebook, splits a MyST directive across cells (what
  a code cell written inside a dropdown turns into: raw MyST in JupyterLab), and the check
  flags a broken copy of chapter 8 and the fixture tests/data/split_directive.md, in the
  browser too;
- the `make lab` command serves JupyterLab, with the chapters opening as notebooks;
- in headless Chromium, every chapter double-clicked in JupyterLab opens as a notebook, and
  renders with the outputs nbval saved in the same run (.build/executed/) with typeset math,
  resolved cross-references, no raw MyST (closed dropdowns and markdown code blocks included),
  no directive split across cells, figures and no error; chapter 1 (LSGM_EDU_BROWSER_RUN
  picks others) is run top to bottom in JupyterLab instead, widgets included. One JupyterLab and
  one Chromium serve all chapters (tools/screenshot_book.py, run once by a session fixture; the
  per-chapter tests read its results). Screenshots in .build/screenshots/.

The tests marked `after_notebooks` run after the notebooks, whose executed copies they use;
timeouts scale with the chapter times nbval measured in the same run (fixture
`chapter_seconds` of the root conftest.py), so a busy machine slows the checks without failing
them. A chapter with no executed copy from this run fails its browser test, saying why.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
CHAPTER1 = REPO / "book" / "01_scores_and_langevin.md"
CHAPTERS = sorted((REPO / "book").glob("[0-9][0-9]_*.md"))
SCREENSHOTS = REPO / ".build" / "screenshots"
SPLIT_FIXTURE = REPO / "tests" / "data" / "split_directive.md"  # code cells inside directives
sys.path.insert(0, str(TOOLS))
from screenshot_book import find_chromium, free_port, split_directives

PYTHON = sys.executable  # the project's environment (.venv) when run by `make test`


def run_tool(cmd: list[str], timeout: float, env: dict | None = None,
             cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a tool in a session of its own; past `timeout` it gets SIGTERM (so it ends what it
    started), then the whole session SIGKILL. Never leaves the tool running."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, env=env, cwd=cwd, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_process_group(proc)
        out, err = proc.communicate()
        err += f"\n(test harness: stopped after {timeout:.0f} s)"
    finally:
        if proc.poll() is None:
            stop_process_group(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_check_book(root: Path | None = None, *extra: str,
                   timeout: float = 540) -> subprocess.CompletedProcess:
    """check_book.py with its own timeout shorter than the harness's, so it ends its build."""
    cmd = [PYTHON, str(TOOLS / "check_book.py"), "--timeout", str(timeout), *extra]
    if root is not None:
        cmd += ["--root", str(root)]
    return run_tool(cmd, timeout + 120, env=dict(os.environ, LSGM_EDU_FAST="1"))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- offline validation ---------------------------------------------------------------------

def test_book_validates_offline():
    before = sha256(REPO / "myst.yml")
    res = run_check_book()
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"the book does not validate:\n{out}"
    assert "Book check passed" in out
    assert sha256(REPO / "myst.yml") == before, "check_book.py must not modify myst.yml"


@pytest.mark.slow
@pytest.mark.after_notebooks
def test_book_renders_like_the_website(executed_chapters, notebooks_run, chapter_seconds):
    """The website build renders every chapter with its outputs and no error.

    In `make test` the chapters were just executed by nbval, which saved them with outputs:
    the build renders those (Jupyter Book 2 shows a notebook's stored outputs), instead of
    executing every chapter a second time. Run on its own, it executes them like `make site`
    (`jupyter book build --execute`), with a timeout scaled to the chapters' measured times.
    """
    stems = [c.stem for c in CHAPTERS]
    failed = sorted(s for s in stems if s in notebooks_run and s not in executed_chapters)
    if failed:  # nbval reports why; executing them again here would only repeat it, slowly
        pytest.skip(f"chapters that failed under nbval in this run: {', '.join(failed)}")
    if all(s in executed_chapters for s in stems):
        folder = executed_chapters[stems[0]].parent
        res = run_check_book(None, "--outputs", str(folder))
    else:
        total = sum(chapter_seconds(s)[0] for s in stems)
        res = run_check_book(None, "--execute", timeout=300 + 3 * total)
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"building the book with its outputs failed:\n{out}"
    assert "Book check passed" in out


def fake_outputs(chapter: Path, folder: Path) -> Path:
    """An executed notebook for `chapter`, as nbval writes it, with a made-up output per cell."""
    import jupytext
    import nbformat

    nb = jupytext.read(chapter)
    for i, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=f"output {i}\n")]
        cell.execution_count = i + 1
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{chapter.stem}.ipynb"
    nbformat.write(nb, path)
    return path


@pytest.mark.parametrize("case", ["fresh", "stale", "error", "missing"])
def test_book_check_uses_stored_outputs(book_copy: Path, tmp_path: Path, case: str):
    """--outputs renders stored outputs, and refuses stale, failed or missing ones."""
    folder = tmp_path / "executed"
    chapters = sorted((book_copy / "book").glob("[0-9][0-9]_*.md"))
    for chapter in chapters:
        fake_outputs(chapter, folder)
    first = chapters[0]
    if case == "stale":
        text = first.read_text(encoding="utf-8")
        first.write_text(text.replace("```{code-cell}", "```{code-cell}\n# edited", 1),
                         encoding="utf-8")
    elif case == "error":
        import nbformat

        nb = nbformat.read(folder / f"{first.stem}.ipynb", as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        code[1].outputs = [nbformat.v4.new_output("error", ename="ValueError",
                                                  evalue="boom", traceback=[])]
        nbformat.write(nb, folder / f"{first.stem}.ipynb")
    elif case == "missing":
        (folder / f"{first.stem}.ipynb").unlink()
    res = run_check_book(book_copy, "--outputs", str(folder))
    out = res.stdout + res.stderr
    if case == "fresh":
        assert res.returncode == 0, out
        assert "Book check passed" in out
        return
    assert res.returncode != 0, f"{case} outputs passed the check:\n{out}"
    assert first.name in out
    expected = {"stale": "stale", "error": "ValueError: boom", "missing": "no executed notebook"}
    assert expected[case] in out, out


# --- a build never outlives the check -------------------------------------------------------

SLEEPY_CHAPTER = """---
kernelspec:
  display_name: Python 3 (ipykernel)
  language: python
  name: python3
---

# A chapter that never ends

```{{code-cell}} ipython3
import os, pathlib, time
pathlib.Path({marker!r}).write_text(str(os.getpid()))
time.sleep(900)
```
"""


def processes_with(variable: str, value: str) -> dict[int, str]:
    """Live processes whose environment has variable=value: pid -> command line."""
    found, marker = {}, f"{variable}={value}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            if stat[stat.rindex(")") + 2] in "ZX":
                continue
            if marker in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
                found[int(entry)] = cmdline.replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue
    return found


def wait_until_gone(variable: str, value: str, timeout: float = 30) -> dict[int, str]:
    deadline = time.monotonic() + timeout
    while (left := processes_with(variable, value)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")
@pytest.mark.parametrize("how", ["timeout", "interrupt", "killed"])
def test_book_check_leaves_no_process(tmp_path: Path, how: str):
    """`check_book.py --execute` that times out, gets Ctrl-C or is killed (as by a caller's
    timeout) leaves no jupyter-book, Jupyter server or kernel running."""
    project = tmp_path / "project"
    (project / "book").mkdir(parents=True)
    marker = tmp_path / "kernel.pid"
    (project / "book" / "01_sleepy.md").write_text(SLEEPY_CHAPTER.format(marker=str(marker)))
    (project / "myst.yml").write_text(
        "version: 1\nproject:\n  title: sleepy\n  toc:\n    - file: book/01_sleepy.md\n"
        "site:\n  template: book-theme\n")
    probe = secrets.token_hex(8)  # inherited by everything the check starts
    env = dict(os.environ, LSGM_EDU_LEAK_PROBE=probe)
    timeout = 45 if how == "timeout" else 600
    cmd = [PYTHON, str(TOOLS / "check_book.py"), "--execute", "--root", str(project),
           "--timeout", str(timeout)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        if how != "timeout":
            deadline = time.monotonic() + 240
            while not marker.exists() and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.5)
            assert marker.exists(), "the kernel never started:\n" + proc.communicate()[0]
            time.sleep(1)
            os.kill(proc.pid, signal.SIGINT if how == "interrupt" else signal.SIGKILL)
        out, _ = proc.communicate(timeout=timeout + 120)
        left = wait_until_gone("LSGM_EDU_LEAK_PROBE", probe)
        assert not left, (f"processes left running after the check ({how}):\n"
                          + "\n".join(f"  {pid}: {cmd}" for pid, cmd in left.items())
                          + f"\ncheck_book output:\n{out}")
        if marker.exists():  # the kernel, found by its pid (not only by its environment)
            kernel = Path(f"/proc/{int(marker.read_text())}/stat")
            assert not kernel.exists() or kernel.read_text().split(") ")[1][0] in "ZX", (
                f"the kernel survived: {kernel}")
        if how == "timeout":
            assert proc.returncode == 1 and "timed out" in out, out
        elif how == "interrupt":
            assert proc.returncode == 130, out
    finally:
        for pid in processes_with("LSGM_EDU_LEAK_PROBE", probe):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def book_copy(tmp_path: Path) -> Path:
    """The project as the book build sees it (myst.yml, book/, the package for includes)."""
    root = tmp_path / "project"
    root.mkdir()
    ignore = shutil.ignore_patterns("*.ipynb", "_build", ".ipynb_checkpoints", "__pycache__")
    shutil.copy2(REPO / "myst.yml", root / "myst.yml")
    for folder in ("book", "lsgm_edu"):
        shutil.copytree(REPO / folder, root / folder, ignore=ignore)
    return root


def append(path: Path, text: str) -> None:
    path.write_text(path.read_text(encoding="utf-8") + "\n" + text + "\n", encoding="utf-8")


BREAKAGES = {
    # name: (file to edit, (old, new) to replace or None, text to append or None, culprit)
    "cross-reference": ("book/index.md", ("](#ch-scores-langevin)", "](#no-such-label)"), None,
                        "no-such-label"),
    "equation-reference": ("book/01_scores_and_langevin.md", None,
                           "As {eq}`eq-no-such-equation` shows.", "eq-no-such-equation"),
    "citation": ("book/01_scores_and_langevin.md", None,
                 "As shown by {cite:p}`nosuchauthor2099`.", "nosuchauthor2099"),
    "directive": ("book/01_scores_and_langevin.md", None,
                  ":::{nosuchdirective}\nbody\n:::", "nosuchdirective"),
    "role": ("book/01_scores_and_langevin.md", None, "A {nosuchrole}`x` here.", "nosuchrole"),
    "duplicate-label": ("book/01_scores_and_langevin.md", None,
                        "(ch-scores-langevin)=\n## Again", "ch-scores-langevin"),
    "notebook-download": ("book/13_scaling_up.md",
                          (("downloads:\n  - file: ../_build/notebooks/13_scaling_up.ipynb\n"
                            "    title: Notebook (.ipynb)\n"), ""), None,
                          "book/13_scaling_up.md: the page offers"),
    "chapter-not-in-index": ("book/index.md", ("](#ch-scaling)", "](https://example.org)"),
                             None, "13_scaling_up.md: not listed in book/index.md"),
}


@pytest.mark.parametrize("kind", list(BREAKAGES))
def test_book_check_fails_on_broken_book(book_copy: Path, kind: str):
    rel, replace, extra, culprit = BREAKAGES[kind]
    target = book_copy / rel
    if replace is not None:
        text = target.read_text(encoding="utf-8")
        assert replace[0] in text, f"{rel} no longer contains {replace[0]!r}; update this test"
        target.write_text(text.replace(replace[0], replace[1], 1), encoding="utf-8")
    if extra is not None:
        append(target, extra)
    res = run_check_book(book_copy)
    out = res.stdout + res.stderr
    assert res.returncode != 0, f"a broken {kind} passed the check:\n{out}"
    assert "Book check FAILED" in out
    assert culprit in out, f"the failure does not name {culprit!r}:\n{out}"


def test_book_check_flags_chapter_missing_from_toc(book_copy: Path):
    shutil.copy2(book_copy / "book" / "01_scores_and_langevin.md",
                 book_copy / "book" / "99_not_in_toc.md")
    res = run_check_book(book_copy)
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert "99_not_in_toc.md" in out and "toc" in out


# --- each chapter says how long it runs -----------------------------------------------------
# The line under each title is written from benchmarks/results/chapter_times_{default,fast}_cpu.json
# (`python benchmarks/chapter_times.py [--fast]`, then `--write-chapters`).

def test_chapters_state_their_measured_running_time():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import chapter_times

    measured = chapter_times.measured_seconds()
    for chapter in CHAPTERS:
        name = chapter.relative_to(REPO).as_posix()
        assert name in measured, f"{name} has no measured running time in both modes: run " \
            f"benchmarks/chapter_times.py {name} (and with --fast), then --write-chapters"
        lines = chapter_times.RUNNING_TIME.findall(chapter.read_text())
        assert lines == [chapter_times.running_time_line(*measured[name])], \
            f"{name}: its running-time line is not the measured one (or is missing); run " \
            "python benchmarks/chapter_times.py --write-chapters"


def test_running_time_line_goes_under_the_title_once():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from chapter_times import running_time_line, with_running_time

    text = "(ch-x)=\n# Title\n\nIntro.\n"
    once = with_running_time(text, running_time_line(250.0, 21.4))
    assert once == ("(ch-x)=\n# Title\n\n**Running time.** About 4 min in the default mode on two "
                    "CPU cores; 21 s in fast mode (`LSGM_EDU_FAST=1`, what the tests run). Measured "
                    "with `benchmarks/chapter_times.py`.\n\nIntro.\n")
    again = with_running_time(once, running_time_line(30.0, 9.6))
    assert again.count("**Running time.**") == 1 and "Under a minute" in again and "10 s" in again
    with pytest.raises(ValueError, match="no '# Title' line"):
        with_running_time("no title here\n", "x")


# --- no directive split across notebook cells ----------------------------------------------
# A code cell written inside a directive (a dropdown holding a solution's code) is split by
# jupytext: the directive's two ends land in different markdown cells, and JupyterLab shows
# them, and everything after a lone closing fence, as raw text. Exercise solutions put their
# code in a hidden cell after the dropdown instead (`:tags: [hide-cell]`).

def test_no_chapter_splits_a_directive():
    """Every chapter, as jupytext reads it into a notebook, keeps each directive in one
    markdown cell (tools/screenshot_book.py `split_directives`; the browser check applies it
    to the notebook JupyterLab opened too)."""
    import jupytext

    found = {c.name: split_directives(jupytext.read(c).cells) for c in CHAPTERS}
    found = {name: problems for name, problems in found.items() if problems}
    assert not found, "directives split across notebook cells (a code cell inside a " \
        "directive? put it after the directive, tagged hide-cell):\n" + "\n".join(
            f"{name}: {p}" for name, problems in found.items() for p in problems)


def test_solutions_are_collapsed_in_jupyterlab():
    """Every exercise-solution cell (source starting "# Solution to Exercise") opens collapsed
    in JupyterLab (`jupyter.source_hidden` / `outputs_hidden`), hidden on the website
    (`hide-cell`), and runs under `viz.solution_output()`, whose output is one closed
    <details> (JupyterLab shows the outputs of every cell it runs): a reader sees the solution
    only when they ask for it, Run All included."""
    import jupytext

    solutions, open_ = 0, []
    for chapter in CHAPTERS:
        for i, cell in enumerate(jupytext.read(chapter).cells):
            if cell.cell_type != "code" or not cell.source.startswith("# Solution to Exercise"):
                continue
            solutions += 1
            hidden = cell.metadata.get("jupyter", {})
            code = [line for line in cell.source.splitlines() if not line.startswith("#")]
            if not (hidden.get("source_hidden") and hidden.get("outputs_hidden")
                    and "hide-cell" in cell.metadata.get("tags", [])
                    and code[0] == "with viz.solution_output():"):
                open_.append(f"{chapter.name} cell {i}: {cell.source.splitlines()[0]}")
    assert solutions >= 40 and not open_, open_


def test_split_directive_check_flags_fixture():
    """tests/data/split_directive.md: a code cell inside a `::::{dropdown}` (split in two),
    one inside a ````{dropdown}` and one inside a ```{dropdown}` (left in the markdown as
    text); a correct ```{note}` for contrast."""
    import jupytext

    nb = jupytext.read(SPLIT_FIXTURE)
    problems = split_directives(nb.cells)
    # (then an open solution and a citation JupyterLab cannot resolve, for the browser check)
    assert [c.cell_type for c in nb.cells] == ["markdown", "code", "markdown", "code", "markdown",
                                               "code", "markdown"]
    assert any(p.startswith("cell 3 (markdown): opens a fence it does not close") and
               "{dropdown}" in p for p in problems), problems
    assert any(p.startswith("cell 5 (markdown): starts with a bare fence") for p in problems), \
        problems
    assert sum(p.startswith("cell 5 (markdown): holds a code cell as text")
               for p in problems) == 2, problems
    assert not any("{note}" in p or "{admonition}" in p for p in problems), problems
    # the code cells themselves are fine; a code cell that starts with a fence is not
    assert split_directives([{"cell_type": "code", "source": "print(1)\n"}]) == []
    assert split_directives([{"cell_type": "code", "source": "```{code-cell}\nx = 1\n```"}])


def test_split_directive_check_flags_broken_chapter(tmp_path: Path):
    """A copy of chapter 8 with one solution's hidden code cell moved back inside its
    dropdown, as the chapter once had it, is flagged; the chapter itself is not."""
    import jupytext

    chapter = REPO / "book" / "08_score_models_for_images.md"
    text = chapter.read_text(encoding="utf-8")
    pattern = re.compile(r"^::::\n\n(```\{code-cell\} ipython3\n[^`]*?hide-cell.*?^```\n)",
                         flags=re.MULTILINE | re.DOTALL)
    assert pattern.search(text), (f"{chapter.name} no longer has a dropdown followed by a "
                                  "hidden solution cell; update this test")
    broken = tmp_path / chapter.name
    broken.write_text(pattern.sub(lambda m: "\n" + m[1] + "::::\n", text, count=1),
                      encoding="utf-8")
    assert split_directives(jupytext.read(chapter).cells) == []
    problems = split_directives(jupytext.read(broken).cells)
    assert any("opens a fence it does not close '::::{dropdown}" in p for p in problems), problems
    assert any("starts with a bare fence" in p and "'::::'" in p for p in problems), problems


# --- make lab -------------------------------------------------------------------------------

def lab_command(port: int, token: str) -> list[str]:
    """What `make lab` runs, with the test's port and token."""
    args = ["--no-browser", f"--port={port}", f"--ServerApp.token={token}",
            "--ServerApp.port_retries=0"]
    return ["make", "--no-print-directory", "lab", "LAB_ARGS=" + " ".join(args)]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def stop_process_group(proc: subprocess.Popen) -> int | None:
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            return proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    return proc.poll()


def check_lab(base: str, token: str, proc: subprocess.Popen, log_path: Path) -> None:
    status, deadline = None, time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            status, _ = http_get(f"{base}/lab?token={token}", timeout=3)
            if status == 200:
                break
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.5)
    assert status == 200, (f"JupyterLab did not answer 200 (got {status}, exit code "
                           f"{proc.poll()}):\n{log_path.read_text()[-3000:]}")

    # the chapter is served as a notebook (jupytext's contents manager)...
    status, body = http_get(f"{base}/api/contents/{CHAPTER1.name}?type=notebook"
                            f"&content=1&token={token}", timeout=30)
    assert status == 200, body[:500]
    cells = json.loads(body)["content"]["cells"]
    assert any(c["cell_type"] == "code" for c in cells)
    # ...and a double-click opens .md files with the Jupytext Notebook viewer
    status, body = http_get(f"{base}/lab/api/settings/"
                            f"@jupyterlab/docmanager-extension:plugin?token={token}")
    assert status == 200, body[:500]
    plugin = json.loads(body)  # overrides.json changes the schema's defaults
    viewers = (plugin["settings"].get("defaultViewers")
               or plugin["schema"]["properties"]["defaultViewers"].get("default", {}))
    assert viewers.get("markdown") == "Jupytext Notebook", (
        f"defaultViewers is {viewers}; run `python tools/install_lab_settings.py`")


def test_make_lab_serves_the_book(tmp_path: Path):
    port, token = free_port(), secrets.token_hex(16)
    env = dict(os.environ, JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "workspaces"),
               JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"))
    with open(tmp_path / "lab.log", "w") as log:
        proc = subprocess.Popen(lab_command(port, token), cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            check_lab(f"http://127.0.0.1:{port}", token, proc, tmp_path / "lab.log")
            # the reader's notebook `make lab` built beside the chapter: citations written out
            status, body = http_get(f"http://127.0.0.1:{port}/api/contents/"
                                    f"{CHAPTER1.stem}.ipynb?content=1&token={token}", timeout=30)
        finally:
            code = stop_process_group(proc)
    assert code is not None, "JupyterLab did not exit after SIGTERM/SIGKILL"
    assert status == 200, body[:500]
    notebook = json.loads(body)["content"]
    markdown = ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "markdown"]
    assert markdown[-1].startswith("## References") and "et al." in "".join(markdown)
    assert not [m for m in markdown if "{cite" in m]
    assert "jupytext" not in notebook["metadata"]  # not paired with the chapter


# --- every chapter in a real browser --------------------------------------------------------

# Chapters the browser test runs top to bottom in JupyterLab (Run All): by number, or "all".
# Chapter 1 is short and has widgets, so running it proves the kernel and widget path; every
# other chapter is rendered from the notebook nbval executed in the same run.
UI_RUN = os.environ.get("LSGM_EDU_BROWSER_RUN", "1")


def run_in_ui(chapter: Path) -> bool:
    wanted = {w.strip() for w in UI_RUN.split(",")}
    return "all" in wanted or str(int(chapter.name[:2])) in {w.lstrip("0") for w in wanted}


@pytest.fixture(scope="session")
def jupyterlab_run(request, tmp_path_factory, executed_chapters, notebooks_run,
                   chapter_seconds) -> dict | None:
    """One screenshot_book.py run (one JupyterLab, one Chromium) for every chapter the browser
    tests selected: chapter name -> {"result": its checks or None, "missing": why it was not
    visited, "before": its sha256, "output": the tool's output}. None without Chromium."""
    if find_chromium() is None:
        return None
    selected = [item.callspec.params["chapter"] for item in request.session.items
                if getattr(item, "originalname", "") == "test_chapter_renders_in_jupyterlab"]
    # Run on its own (no notebook ran in this session), the check runs every chapter in the UI,
    # as test_book_renders_like_the_website then executes the chapters itself.
    to_run = [c for c in selected if run_in_ui(c) or not notebooks_run]
    missing = {}
    for c in selected:
        if c in to_run or c.stem in executed_chapters:
            continue
        missing[c.name] = (
            f"no executed notebook of {c.name}: " + (
                "its notebook cells failed under nbval in this run (see those failures)"
                if c.stem in notebooks_run else
                "its notebook did not run in this pytest session (others did). Run the notebooks in the same "
                "invocation, as `make test` does (pytest tests .build/notebooks --nbval-lax), or "
                "set LSGM_EDU_BROWSER_RUN=all to run the chapters in JupyterLab instead"))
    visit = [c for c in selected if c.name not in missing]
    run = {c.name: {"result": None, "missing": missing.get(c.name), "before": sha256(c),
                    "output": ""} for c in selected}
    if not visit:
        return run
    results = tmp_path_factory.mktemp("jupyterlab") / "results.json"
    cmd = [PYTHON, str(TOOLS / "screenshot_book.py"), *map(str, visit), "--outdir",
           str(SCREENSHOTS), "--fast", "--results", str(results)]
    if len(to_run) < len(visit):
        folders = {executed_chapters[c.stem].parent for c in visit if c not in to_run}
        assert len(folders) == 1, folders
        cmd += ["--outputs", str(folders.pop())]
        cmd += [arg for c in to_run for arg in ("--run", str(c))]
    # Running all cells in JupyterLab takes 1-2x the nbval time; the margin covers a machine
    # that got busier since the chapter's time was measured. Rendering a saved notebook and
    # screenshotting it takes seconds.
    timing = [(c.name, *chapter_seconds(c.stem)) for c in to_run]
    run_timeout = max([120 + 4 * seconds for _, seconds, _ in timing], default=120)
    if to_run:
        cmd += ["--timeout", f"{run_timeout:.0f}"]
    total = 240 + len(to_run) * (run_timeout + 120) + 90 * (len(visit) - len(to_run))
    res = run_tool(cmd, timeout=total, cwd=REPO)
    output = (res.stdout + res.stderr + f"\n(exit status {res.returncode}; harness timeout "
              f"{total:.0f} s; run-all timeout {run_timeout:.0f} s from "
              + (", ".join(f"{n}: {s:.0f} s, {src}" for n, s, src in timing) or "no chapter run")
              + ")")
    try:
        record = json.loads(results.read_text())
    except (OSError, ValueError):
        record = {"chapters": {}}
    for c in visit:
        run[c.name]["result"] = record["chapters"].get(c.relative_to(REPO).as_posix())
        run[c.name]["output"] = output
    return run


@pytest.mark.browser
@pytest.mark.after_notebooks
@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.stem for c in CHAPTERS])
def test_chapter_renders_in_jupyterlab(chapter: Path, jupyterlab_run):
    """The chapter opens as a notebook in JupyterLab, and renders with its outputs: typeset
    math, no raw MyST, images, no error (one JupyterLab run for all chapters: the first of
    these tests takes the time of all of them)."""
    if find_chromium() is None:
        message = ("headless Chromium not found (/usr/bin/chromium or `chromium` on PATH); "
                   "install it with `apt-get install -y chromium`")
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(message + " -- CI must run the browser test")
        pytest.skip(message)
    run = jupyterlab_run[chapter.name]
    if run["missing"]:
        pytest.fail(run["missing"], pytrace=False)
    result = run["result"]
    assert result is not None, (f"the JupyterLab run did not get to {chapter.name}:\n"
                                + run["output"][-6000:])
    log = "\n".join(result["log"])
    assert result["ok"] and result["passed"], (
        f"{chapter.name} failed in JupyterLab ({result['mode']}):\n{log}\n\nFAILED: "
        + "; ".join(result["failed"]))
    assert result["mode"] == ("run" if run_in_ui(chapter) else "outputs"), log
    if result["mode"] == "run":
        assert any(p.startswith("every code cell ran") for p in result["passed"]), log
    assert sha256(chapter) == run["before"], "opening the chapter in JupyterLab modified it"

    import matplotlib.image

    tag = f"chapter{int(chapter.name[:2])}"
    shots = [Path(p) for p in result["screenshots"]]
    assert shots[0].name == f"jupyterlab_{tag}_notebook.png", shots
    assert len(shots) >= 2 and all(p.name.startswith(f"offline_{tag}_rendered")
                                   for p in shots[1:]), shots
    for png in shots:
        assert png.is_file() and png.stat().st_size > 20_000, f"{png} missing or tiny"
        img = matplotlib.image.imread(png)
        assert img.shape[0] >= 600 and img.shape[1] >= 800, f"{png}: {img.shape}"
        assert img[..., :3].std() > 0.05, f"{png} is (nearly) blank"


@pytest.mark.browser
def test_jupyterlab_check_flags_split_directive(tmp_path: Path):
    """The browser check, on tests/data/split_directive.md run in JupyterLab, fails the
    raw-MyST check (the halves of the split directives show as text, the markdown after a
    lone closing fence as a code block), the split-directive check, the citation check (a
    role JupyterLab cannot resolve) and the solution check (a solution left open), and passes
    the rest."""
    if find_chromium() is None:
        pytest.skip("headless Chromium not found")
    results = tmp_path / "results.json"
    res = run_tool([PYTHON, str(TOOLS / "screenshot_book.py"), str(SPLIT_FIXTURE), "--fast",
                    "--outdir", str(tmp_path / "shots"), "--results", str(results),
                    "--timeout", "120", "--max-shots", "2"], timeout=420, cwd=REPO)
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    result = json.loads(results.read_text())["chapters"][SPLIT_FIXTURE.relative_to(REPO)
                                                         .as_posix()]
    raw = next((f for f in result["failed"] if f.startswith("no raw MyST syntax")), "")
    assert raw and all(s in raw for s in ("{dropdown}", "{code-cell}", ":::")), out
    split = next((f for f in result["failed"] if f.startswith("no MyST directive split")), "")
    assert "opens a fence it does not close" in split and "starts with a bare fence" in split, out
    # a citation role the reader's notebook leaves as it is: "Citation Not Found" in JupyterLab
    cite = next((f for f in result["failed"] if f.startswith("citations render")), "")
    assert "1 unresolved citation role" in cite, out
    # a solution cell without its collapsing options shows its code
    solution = next((f for f in result["failed"] if f.startswith("exercise solutions")), "")
    assert "Solution to Exercise 4" in solution, out
    # nothing else is wrong with it but its lack of images
    assert len(result["failed"]) == 5 and any(f.startswith("at least one image output")
                                               for f in result["failed"]), result["failed"]
    assert any(p.startswith("every code cell ran") for p in result["passed"]), out

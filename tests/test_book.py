"""The book as a whole: offline validation, `make lab`, and chapter 1 rendered in JupyterLab.

- the offline strict build (tools/check_book.py) passes on the real book and fails, naming
  the culprit, on a copy with a broken cross-reference, citation, directive or role;
- the `make lab` command serves JupyterLab, with the chapters opening as notebooks;
- headless Chromium opens chapter 1 in JupyterLab, runs it, and finds rendered math,
  resolved cross-references and figures (screenshots in .build/screenshots/).
"""

from __future__ import annotations

import hashlib
import json
import os
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
sys.path.insert(0, str(TOOLS))
from screenshot_book import find_chromium, free_port

PYTHON = sys.executable  # the project's environment (.venv) when run by `make test`


def run_check_book(root: Path | None = None) -> subprocess.CompletedProcess:
    cmd = [PYTHON, str(TOOLS / "check_book.py"), "--timeout", "240"]
    if root is not None:
        cmd += ["--root", str(root)]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- offline validation ---------------------------------------------------------------------

def test_book_validates_offline():
    before = sha256(REPO / "myst.yml")
    start = time.monotonic()
    res = run_check_book()
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"the book does not validate:\n{out}"
    assert "Book check passed" in out
    assert time.monotonic() - start < 120
    assert sha256(REPO / "myst.yml") == before, "check_book.py must not modify myst.yml"


@pytest.mark.slow
def test_book_executes_like_the_website():
    """`jupyter book build --execute` (what `make site` runs) executes every chapter."""
    res = subprocess.run(
        [PYTHON, str(TOOLS / "check_book.py"), "--execute"], check=False, capture_output=True,
        text=True, timeout=900, stdin=subprocess.DEVNULL, env=dict(os.environ, LSGM_EDU_FAST="1"))
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"executing the book failed:\n{out}"


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
        finally:
            code = stop_process_group(proc)
    assert code is not None, "JupyterLab did not exit after SIGTERM/SIGKILL"


# --- every chapter in a real browser --------------------------------------------------------

@pytest.mark.browser
@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.stem for c in CHAPTERS])
def test_chapter_renders_in_jupyterlab(chapter: Path):
    if find_chromium() is None:
        message = ("headless Chromium not found (/usr/bin/chromium or `chromium` on PATH); "
                   "install it with `apt-get install -y chromium`")
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(message + " -- CI must run the browser test")
        pytest.skip(message)
    before = sha256(chapter)
    res = subprocess.run(
        [PYTHON, str(TOOLS / "screenshot_book.py"), str(chapter), "--outdir", str(SCREENSHOTS),
         "--fast", "--timeout", "240"],
        check=False, capture_output=True, text=True, timeout=500, stdin=subprocess.DEVNULL,
        cwd=REPO)
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"{chapter.name} failed in JupyterLab:\n{out}"
    assert "all" in out and "checks passed" in out
    assert sha256(chapter) == before, "running the chapter in JupyterLab modified the file"

    import matplotlib.image

    tag = f"chapter{int(chapter.name[:2])}"
    shots = [SCREENSHOTS / f"jupyterlab_{tag}_notebook.png",
             *sorted(SCREENSHOTS.glob(f"offline_{tag}_rendered*.png"))]
    assert len(shots) >= 2, out
    for png in shots:
        assert png.is_file() and png.stat().st_size > 20_000, f"{png} missing or tiny"
        img = matplotlib.image.imread(png)
        assert img.shape[0] >= 600 and img.shape[1] >= 800, f"{png}: {img.shape}"
        assert img[..., :3].std() > 0.05, f"{png} is (nearly) blank"

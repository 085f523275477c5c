#!/usr/bin/env python3
"""Open chapters in JupyterLab in headless Chromium, check they render, screenshot them.

    python tools/screenshot_book.py                    # chapter 1, run in the UI
    python tools/screenshot_book.py book/[0-9]*.md --fast          # every chapter, each run
    python tools/screenshot_book.py book/[0-9]*.md --fast --outputs .build/executed \
        --run book/01_scores_and_langevin.md          # saved outputs; only chapter 1 is run

One `jupyter lab` serves all the chapters given (127.0.0.1, a free port, a random token, no
browser, the repository as root folder, the JupyterLab settings of tools/jupyterlab installed)
and one headless Chromium visits them in turn. For each chapter it

(a) double-clicks the chapter in JupyterLab's file browser, checks it opened as a NOTEBOOK
    (not as a text file) with code cells, and saves `jupyterlab_chapterN_notebook.png`;
(b) opens the chapter's reader's notebook (tools/reader_notebook.py: what `make notebooks`
    writes, citations rendered, written to a temporary folder under the root) and renders it
    with outputs, in one of two ways:
    - run in the UI (every chapter by default; with --outputs, the chapters named by --run):
      runs all cells from the Run menu, waits until every code cell has run and the kernel is
      idle, and checks that the ipywidgets render;
    - from its executed notebook (--outputs DIR: DIR/<stem>.ipynb, as the notebook tests save
      them to .build/executed/): those outputs are attached; nothing is executed. A missing or
      stale executed notebook (its code cells differ from the chapter's) fails the chapter;
    then checks that no cell raised, that math is typeset, that MyST cross-references,
    roles and directives are resolved (no raw `[](#`, `{eq}`, `{math}`, `:::{`, `{dropdown}`,
    lone fences... left in the rendered markdown, its code blocks included), that citations
    read author-year with a References list (no "Citation Not Found"), that every exercise
    solution is collapsed (code and outputs hidden), that no directive
    is split across cells (`split_directives`: what jupytext makes of a code cell written
    inside a directive; tests/test_book.py applies it to every chapter offline too) and
    that there is at least one image output, and saves the whole notebook as
    `offline_chapterN_rendered_01.png`, `_02.png`, ... (one per screen, top to bottom).

Nothing is written to the chapters: autosave is off and each file is checked unchanged. The
server and every process it started (kernels included) are stopped at the end, also when this
tool is interrupted or killed (a watchdog ends them). `--results FILE` writes each chapter's
checks as JSON (the tests read it). Exit status 0 when every check passed, 1 otherwise, with
the failed checks listed. Needs Chromium (Debian: `apt-get install chromium`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
sys.path.insert(0, str(TOOLS))
import install_lab_settings
import reader_notebook
from check_book import BUILD_ID_VAR, end_build, start_watchdog

CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]

# JupyterLab user settings for this run only (a temporary settings dir): never write to the
# chapter, render every cell (no windowing, so the checks see the whole notebook), stop a
# notebook's kernel when it is closed (one server visits every chapter), no news.
USER_SETTINGS = {
    "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none", "kernelShutdown": True},
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false",
                                                    "checkForUpdates": False},
}

# Directive names, for spotting them as raw text.
DIRECTIVES = ("dropdown|code-cell|admonition|note|tip|hint|important|warning|caution|attention|"
              "danger|error|seealso|figure|image|table|list-table|csv-table|math|code|"
              "code-block|glue|tab-set|tab-item|card|grid|grid-item|margin|sidebar|topic|aside|"
              "embed|include|iframe|div|exercise|solution|proof|prf:[a-z]+|bibliography|mermaid")
# Literal MyST syntax that must not survive rendering of a markdown cell.
UNRENDERED = [r"\[\]\(#", r"\{math\}", r"\{eq\}`", r"\{ref\}`", r"\{numref\}`", r"\{cite(:[pt])?\}`",
              r"```\{", r":::\{", r"^\(\S+\)=$",
              # a directive's name, or a lone fence line: half a directive shown as text
              rf"\{{({DIRECTIVES})\}}", r"^\s*(:{3,}|`{3,})\s*$"]
# Literal MyST syntax that must not show up inside a code block of a markdown cell either (a
# markdown cell that starts with a directive's closing fence renders what follows as a code
# block). The chapters' own code blocks (```bash) hold no fence lines.
UNRENDERED_IN_CODE_BLOCKS = [r"```\{", r":::\{", rf"\{{({DIRECTIVES})\}}",
                             r"^\s*(:{3,}|`{3,})", r"^:(tags|class|label|name|open):"]

# A fence line: backticks or colons (3 or more), then a directive `{name}` with its argument,
# or a code block's language, or nothing.
FENCE = re.compile(r"^ {0,3}(?P<fence>`{3,}|:{3,})\s*(?:\{(?P<name>[^}\s]+)\}|(?P<info>[^`\s]*))"
                   r"(?P<rest>.*)$")
# Directives whose body is text (not markdown), as a plain code block's is.
LITERAL = {"code-cell", "code", "code-block", "sourcecode", "math", "raw", "mermaid"}


def _fence(line: str) -> tuple[str, int, str | None, bool] | None:
    """(fence character, its length, directive name, bare) of a fence line, else None."""
    m = FENCE.match(line)
    if not m:
        return None
    rest = (m["info"] or "") + m["rest"]
    if m["fence"][0] == "`" and "`" in rest:  # inline code, not a fence
        return None
    return m["fence"][0], len(m["fence"]), m["name"], m["name"] is None and not rest.strip()


def _fence_end(lines: list[str], k: int) -> int | None:
    """The line that closes the fence opened on line k (a closing fence: the same character,
    at least as long, nothing after it), None when it is never closed. A backtick fence holds
    text until then (CommonMark); a colon fence holds markdown, with fences of its own."""
    char, length, _, _ = _fence(lines[k])
    j = k + 1
    while j < len(lines):
        f = _fence(lines[j])
        if f and f[3] and f[0] == char and f[1] >= length:
            return j
        if f and char == ":" and not (f[3] and f[0] == ":"):  # a nested fence
            end = _fence_end(lines, j)
            if end is None:
                return None
            j = end
        j += 1
    return None


def _fence_problems(lines: list[str]) -> list[tuple[str, str]]:
    problems = []
    k = 0
    while k < len(lines):
        f = _fence(lines[k])
        if f is None:
            k += 1
            continue
        char, _, name, bare = f
        if bare and char == ":":
            problems.append(("closes a directive it did not open", lines[k]))
            k += 1
            continue
        if name == "code-cell":  # jupytext left it inside a directive: text, never run
            problems.append(("holds a code cell as text", lines[k]))
        end = _fence_end(lines, k)
        if end is None:
            problems.append(("opens a fence it does not close", lines[k]))
            k += 1
            continue
        if name is not None and name not in LITERAL:  # the body is markdown
            problems += _fence_problems(lines[k + 1:end])
        k = end + 1
    return problems


def split_directives(cells) -> list[str]:
    """The cells of a notebook (jupytext's reading of a chapter, or the notebook as JupyterLab
    holds it: items with `cell_type` (or `type`) and `source`) that carry half of a MyST
    directive: a markdown cell that starts with a bare fence, leaves a fence open, closes one
    it never opened, or holds a `{code-cell}`; a code cell whose source starts with a fence or
    a directive. This is what jupytext makes of a code cell written inside a directive: from
    `::::{dropdown}` ... ```{code-cell} ... `::::` the directive's two ends land in different
    markdown cells, which JupyterLab shows as raw text; from ````{dropdown}` ... ```{code-cell}
    ... ```` the code cell stays in the markdown, as text that never runs. Returns one line per
    problem ("cell 41 (markdown): ..."), empty when none."""
    problems = []
    for i, cell in enumerate(cells, 1):
        kind = cell.get("cell_type") or cell.get("type")
        source = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
        lines = source.splitlines()
        head = next((n for n, line in enumerate(lines) if line.strip()), None)
        if head is None:
            continue
        first = _fence(lines[head])
        if kind == "code":
            if first or re.match(rf"\s*\{{({DIRECTIVES})\}}", lines[head]):
                problems.append(f"cell {i} (code): starts with MyST directive syntax "
                                f"{lines[head].strip()[:60]!r}")
            continue
        if kind != "markdown":
            continue
        found = []
        if first and first[3]:  # the closing half of a directive opened in an earlier cell
            why = "starts with a bare fence (the end of a directive opened in another cell)"
            found.append((why, lines[head]))
            head += 1
        found += _fence_problems(lines[head:])
        problems += [f"cell {i} (markdown): {what} {line.strip()[:60]!r}" for what, line in found]
    return problems


def find_chromium() -> str | None:
    for candidate in ("/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chapter_tag(path: Path) -> str:
    m = re.match(r"(\d+)", path.name)
    return f"chapter{int(m.group(1))}" if m else path.stem


class LabServer:
    """`jupyter lab` in its own process group, with throw-away config and settings dirs."""

    def __init__(self, root: Path, log_path: Path, fast: bool):
        self.root = root
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.tmp = Path(tempfile.mkdtemp(prefix="screenshot_lab_"))
        self.log_path = log_path
        self.fast = fast
        self.proc: subprocess.Popen | None = None
        # every process of this server (kernels included: they run in sessions of their own)
        # carries the id, so stop() ends them all; the watchdog does it if we are killed
        self.build_id = uuid.uuid4().hex
        self.watchdog: subprocess.Popen | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90.0) -> None:
        settings = self.tmp / "user-settings"
        for name, value in USER_SETTINGS.items():
            f = settings / f"{name}.jupyterlab-settings"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(json.dumps(value))
        env = dict(
            os.environ,
            JUPYTER_CONFIG_DIR=str(self.tmp / "config"),
            JUPYTER_RUNTIME_DIR=str(self.tmp / "runtime"),
            JUPYTERLAB_SETTINGS_DIR=str(settings),
            JUPYTERLAB_WORKSPACES_DIR=str(self.tmp / "workspaces"),
            PYDEVD_DISABLE_FILE_VALIDATION="1",
            **{BUILD_ID_VAR: self.build_id},
        )
        if self.fast:
            env["LSGM_EDU_FAST"] = "1"
        cmd = [
            sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1",
            f"--port={self.port}", f"--ServerApp.token={self.token}",
            f"--ServerApp.root_dir={self.root}", "--ServerApp.port_retries=0",
            "--LabApp.expose_app_in_browser=True",
            # the executed copies (--outputs) are opened from a folder under .build
            "--ContentsManager.allow_hidden=True",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        ]
        if hasattr(os, "getuid") and os.getuid() == 0:
            cmd.append("--allow-root")
        self.log = open(self.log_path, "w")  # noqa: SIM115 - open for the server's lifetime
        self.watchdog = start_watchdog(self.build_id)
        self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        url = f"{self.base}/api/status?token={self.token}"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with {self.proc.returncode}; "
                                   f"log: {self.log_path}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"jupyter lab did not answer within {timeout:.0f} s; "
                           f"log: {self.log_path}")

    def shutdown_kernels(self) -> None:
        """Kernels run in sessions of their own: ask the server to stop them first."""
        try:
            with urllib.request.urlopen(f"{self.base}/api/kernels?token={self.token}",
                                        timeout=5) as r:
                kernels = json.loads(r.read())
            for k in kernels:
                req = urllib.request.Request(
                    f"{self.base}/api/kernels/{k['id']}?token={self.token}", method="DELETE")
                urllib.request.urlopen(req, timeout=15).close()
        except (urllib.error.URLError, OSError, ValueError) as err:
            print(f"  (could not shut the kernels down through the API: {err})")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.shutdown_kernels()
            for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        # whatever is left: the process group, and kernels in sessions of their own
        end_build(self.proc, self.build_id)
        if self.watchdog is not None:
            self.watchdog.stdin.close()
            try:
                self.watchdog.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.watchdog.kill()
        if getattr(self, "log", None):
            self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


# JavaScript run in the page through the exposed JupyterLab application object.
JS_PANEL = """
() => {
  const app = window.jupyterapp;
  if (!app) return null;
  const w = app.shell.currentWidget;
  if (!w || !w.context) return {kind: w ? w.constructor.name : null};
  const nb = w.content;
  const cells = nb && nb.model && nb.model.cells ? Array.from(nb.model.cells) : [];
  const sc = w.context.sessionContext;
  return {
    kind: w.hasClass('jp-NotebookPanel') ? 'notebook' : (w.hasClass('jp-FileEditor') ?
          'editor' : w.node.className),
    path: w.context.path,
    ready: w.context.isReady,
    factory: w.context && app.docRegistry ? (w.title.label) : null,
    kernel: sc && sc.session && sc.session.kernel ? sc.session.kernel.status : null,
    kernelName: sc && sc.session && sc.session.kernel ? sc.session.kernel.name : null,
    dirty: w.context.model.dirty,
    cells: cells.map(c => ({
      type: c.type,
      count: c.type === 'code' ? c.executionCount : null,
      outputs: c.type === 'code' ? c.outputs.toJSON().map(o => ({
        type: o.output_type,
        ename: o.ename || null, evalue: o.evalue || null,
        mimes: o.data ? Object.keys(o.data) : [],
      })) : [],
    })),
  };
}
"""

JS_RENDER = """
() => {
  const nb = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook');
  if (!nb) return null;
  // jupyterlab-myst renders a markdown cell into `.myst`; stock JupyterLab into
  // `.jp-MarkdownOutput` (then MyST syntax would show up raw, which the checks catch)
  const md = Array.from(nb.querySelectorAll(
      '.jp-MarkdownCell.jp-mod-rendered .myst, .jp-MarkdownCell.jp-mod-rendered .jp-MarkdownOutput'));
  return {
    // the prose only: typeset math and code spans may legitimately read like "p(x)="
    markdownText: md.map(e => {
      const c = e.cloneNode(true);
      c.querySelectorAll('.katex, mjx-container, .MathJax, code, pre').forEach(x => x.remove());
      // a closed dropdown (<details>) has no innerText: check what it holds too
      c.querySelectorAll('details').forEach(d => { d.open = true; });
      c.style.cssText = 'position:absolute;left:-99999px;top:0;width:900px';
      document.body.appendChild(c);  // innerText needs layout
      const t = c.innerText;
      c.remove();
      return t;
    }),
    // code blocks of the rendered markdown: a cell that begins with a directive's closing
    // fence renders the rest of it as one
    markdownCode: md.flatMap(e => Array.from(e.querySelectorAll('pre')).map(p => p.textContent)),
    // the cells as JupyterLab (jupytext) made them: a directive split across cells shows here
    cells: (() => {
      const w = window.jupyterapp.shell.currentWidget;
      const cells = w && w.content && w.content.model ? Array.from(w.content.model.cells) : [];
      return cells.map(c => ({type: c.type, source: c.sharedModel.getSource()}));
    })(),
    mystCells: nb.querySelectorAll('.jp-MarkdownCell .myst').length,
    math: nb.querySelectorAll('mjx-container, .MathJax, .katex').length,
    images: nb.querySelectorAll('.jp-OutputArea .jp-RenderedImage img').length,
    widgets: Array.from(nb.querySelectorAll('.jp-OutputArea-output'))
      .filter(e => e.querySelector(':scope > .jupyter-widgets') ||
                   /Error displaying widget|Loading widget/.test(e.innerText))
      .map(e => ({rendered: !!e.querySelector(':scope > .jupyter-widgets'),
                  text: e.innerText.slice(0, 200)})),
    codeCells: nb.querySelectorAll('.jp-CodeCell').length,
    markdownCells: nb.querySelectorAll('.jp-MarkdownCell').length,
    xrefNotFound: Array.from(nb.querySelectorAll('[title="Cross Reference Not Found"]'))
      .map(e => e.innerText.trim()),
    citeNotFound: nb.querySelectorAll('[title="Citation Not Found"]').length,
    references: Array.from(nb.querySelectorAll('.jp-MarkdownCell h2'))
      .some(h => h.textContent.trim().startsWith('References')),
    // exercise solutions: collapsed (input and outputs) until the reader opens them
    solutions: (() => {
      const w = window.jupyterapp.shell.currentWidget;
      const cells = w && w.content && w.content.widgets ? Array.from(w.content.widgets) : [];
      const shown = e => !!e && e.getClientRects().length > 0;
      // an output reveals the answer unless all it shows is a closed <details> summary
      // (lsgm_edu.viz.solution_output gathers a solution's prints and figures into one)
      const reveals = o => {
        if (!shown(o)) return false;
        // a figure inside a closed <details> is hidden, whatever layout boxes it still reports
        if (Array.from(o.querySelectorAll('img, canvas, svg'))
            .some(e => shown(e) && !e.closest('details:not([open])'))) return true;
        const c = o.cloneNode(true);
        c.querySelectorAll('details:not([open]) > summary').forEach(x => x.remove());
        c.querySelectorAll('details:not([open])').forEach(x => x.replaceChildren());
        return c.textContent.trim().length > 0;
      };
      return cells.filter(c => c.model.type === 'code' &&
                          c.model.sharedModel.getSource().startsWith('# Solution to Exercise'))
        .map(c => ({title: c.model.sharedModel.getSource().split('\\n')[0],
                    inputHidden: c.inputHidden, outputHidden: c.outputHidden,
                    outputs: c.model.outputs.length,
                    codeShown: shown(c.node.querySelector('.jp-InputArea-editor')),
                    outputShown: Array.from(c.node.querySelectorAll('.jp-OutputArea-output'))
                      .some(reveals),
                    revealed: Array.from(c.node.querySelectorAll('.jp-OutputArea-output'))
                      .filter(reveals).map(o => o.outerHTML.slice(0, 300))}));
    })(),
    links: md.flatMap(e => Array.from(e.querySelectorAll('a')))
      // an equation's own permalink "(n)" is an anchor, not a cross-reference
      .filter(a => !/^Link to this/.test(a.getAttribute('title') || ''))
      // textContent: a link in a closed dropdown has no innerText
      .map(a => ({text: a.textContent.trim(), href: a.getAttribute('href') || '',
                  context: (a.closest('p, li, div') ? a.closest('p, li, div').outerHTML : '').slice(0, 400)})),
  };
}
"""


# Fire a JupyterLab command without awaiting it (a command that opens a dialog never resolves).
COMMAND_JS = "(id) => { window.jupyterapp.commands.execute(id); return true; }"


class Checks:
    """The checks of one chapter, with the lines printed for it (the tests show them)."""

    def __init__(self, mode: str = ""):
        self.mode = mode  # "run" (run in the UI) or "outputs" (its executed notebook)
        self.failed: list[str] = []
        self.passed: list[str] = []
        self.log: list[str] = []
        self.screenshots: list[Path] = []
        self.seconds = 0.0
        self.run_all_seconds: float | None = None  # Run All to idle, when run in the UI
        self.done = False  # visited (whether or not the checks passed)

    def say(self, line: str) -> None:
        print(line, flush=True)
        self.log.append(line)

    def check(self, ok: bool, what: str, detail: str = "") -> bool:
        (self.passed if ok else self.failed).append(what + (f" ({detail})" if detail else ""))
        self.say(f"  [{'ok' if ok else 'FAIL'}] {what}" + (f": {detail}" if detail else ""))
        return ok

    def as_json(self) -> dict:
        return {"mode": self.mode, "ok": not self.failed, "passed": self.passed,
                "failed": self.failed, "seconds": round(self.seconds, 1),
                "run_all_seconds": (None if self.run_all_seconds is None
                                    else round(self.run_all_seconds, 1)),
                "screenshots": [str(p) for p in self.screenshots], "log": self.log}


def wait_for(page, predicate_js: str, timeout_s: float, poll_s: float = 1.0, arg=None):
    """Poll a JS predicate (returns a truthy value when done) until it holds or time runs out."""
    deadline = time.monotonic() + timeout_s
    value = None
    while time.monotonic() < deadline:
        value = page.evaluate(predicate_js, arg)
        if value:
            return value
        time.sleep(poll_s)
    return value


def click_run_all(page) -> str:
    """Run > Run All Cells from the menu bar (as a reader would); the command as fallback."""
    try:
        page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).first.click(
            timeout=5000)
        page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).first.click(
            timeout=5000)
        return "menu Run > Run All Cells"
    except Exception:  # noqa: BLE001 - any UI hiccup: use the command itself
        page.keyboard.press("Escape")
        page.evaluate(COMMAND_JS, "notebook:run-all-cells")
        return "command notebook:run-all-cells"


def screenshot_notebook(page, outdir: Path, tag: str, max_shots: int) -> list[Path]:
    """Scroll the notebook one screen at a time, a PNG per screen."""
    scroller = ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-WindowedPanel-outer"
    if not page.locator(scroller).count():
        scroller = ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook"
    geom = page.evaluate(
        """(sel) => { const e = document.querySelector(sel);
             const cells = e.querySelectorAll('.jp-Notebook-cell');
             const last = cells[cells.length - 1];
             const top = e.getBoundingClientRect().top;
             const bottom = last ? last.getBoundingClientRect().bottom - top + e.scrollTop
                                 : e.scrollHeight;
             return {h: Math.min(e.scrollHeight, Math.ceil(bottom) + 20), v: e.clientHeight}; }""",
        scroller)
    step = max(200, int(geom["v"] * 0.9))
    n = min(max_shots, 1 + max(0, (geom["h"] - geom["v"] + step - 1) // step))
    shots = []
    for i in range(n):
        page.evaluate("([sel, y]) => { document.querySelector(sel).scrollTop = y; }",
                      [scroller, i * step])
        time.sleep(0.05)  # the screenshot waits for the next frame; everything is rendered
        path = outdir / f"offline_{tag}_rendered_{i + 1:02d}.png"
        page.screenshot(path=str(path), caret="initial")
        shots.append(path)
    if geom["h"] > geom["v"] + (n - 1) * step:
        print(f"  note: notebook is taller than {max_shots} screens; later part not captured")
    return shots


# The panel whose document is `path`, once it is the current one and loaded.
PANEL_AT_JS = ("(path) => { const f = " + JS_PANEL + "; const r = f();"
               " return r && r.path === path && r.ready ? r : null; }")

# Show the file browser in `folder` (a page reused from the previous chapter has it hidden).
FILE_BROWSER_JS = """
async (folder) => {
  const app = window.jupyterapp;
  await app.commands.execute('filebrowser:go-to-path', {path: folder || '/'});
  app.shell.activateById('filebrowser');
  return true;
}
"""

# Close every document (and stop its kernel); nothing is saved (autosave is off, and a closed
# document is not written either).
CLOSE_ALL_JS = """
async () => {
  const app = window.jupyterapp;
  const widgets = Array.from(app.shell.widgets('main'));
  for (const w of widgets) {
    const sc = w.sessionContext || (w.context && w.context.sessionContext);
    if (sc && sc.session) {
      await Promise.race([sc.shutdown().catch(() => null),
                          new Promise(r => setTimeout(r, 15000))]);
    }
    w.dispose();
  }
  return widgets.length;
}
"""

# Rendering progress of the current notebook: markdown cells rendered by jupyterlab-myst,
# image outputs in the model and images decoded on the page, typeset math elements.
PROGRESS_JS = """
() => {
  const w = window.jupyterapp.shell.currentWidget;
  const nb = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook');
  if (!w || !w.content || !w.content.model || !nb) return null;
  let images = 0;
  for (const c of w.content.model.cells) {
    if (c.type !== 'code') continue;
    for (const o of c.outputs.toJSON()) {
      if (o.data && ['image/png', 'image/jpeg', 'image/gif'].some(m => m in o.data)) images++;
    }
  }
  const imgs = Array.from(nb.querySelectorAll('.jp-OutputArea .jp-RenderedImage img'));
  const onScreen = Array.from(nb.querySelectorAll('.jp-MarkdownCell'))
    .filter(c => c.getBoundingClientRect().top < window.innerHeight);
  return {
    markdown: nb.querySelectorAll('.jp-MarkdownCell').length,
    rendered: nb.querySelectorAll('.jp-MarkdownCell.jp-mod-rendered .myst').length,
    onScreen: onScreen.length,
    onScreenRendered: onScreen.filter(c => c.querySelector('.myst')).length,
    images, decoded: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
    math: nb.querySelectorAll('mjx-container, .MathJax, .katex').length,
  };
}
"""


def wait_rendered(page, timeout_s: float, first_screen: bool = False) -> dict | None:
    """Until every markdown cell is rendered (with `first_screen`, those on the first screen),
    every image output decoded and the number of typeset math elements stopped changing (or
    time runs out): the last progress seen."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        now = page.evaluate(PROGRESS_JS)
        done = now and last and now == last and (
            now["onScreenRendered"] >= now["onScreen"] if first_screen else
            now["rendered"] >= now["markdown"] and now["decoded"] >= now["images"])
        if done:
            return now
        last = now
        time.sleep(0.5)
    return last


def open_by_double_click(page, server: LabServer, chapter: Path, checks: Checks) -> dict | None:
    """(a): the chapter, double-clicked in the file browser, opens as a notebook with code
    cells. Returns the panel's state, None when it did not open as a notebook."""
    rel = chapter.relative_to(server.root).as_posix()
    folder = chapter.parent.relative_to(server.root).as_posix()
    folder = "" if folder == "." else folder
    if page.url.startswith(f"{server.base}/lab"):
        try:  # the page of the previous chapter: JupyterLab is loaded already
            page.evaluate(FILE_BROWSER_JS, folder)
        except Exception:  # noqa: BLE001 - load the page again instead
            page.goto(f"{server.base}/lab/tree/{folder}?token={server.token}",
                      wait_until="load")
    else:
        page.goto(f"{server.base}/lab/tree/{folder}?token={server.token}", wait_until="load")
    page.wait_for_selector("#jp-main-dock-panel", timeout=60000)
    item = page.locator(".jp-DirListing-item", has_text=chapter.name).first
    try:
        item.wait_for(timeout=30000)
        item.dblclick()
        how = "double-click in the file browser"
    except Exception:  # noqa: BLE001 - no file browser item: open by URL, as /lab/tree does
        page.goto(f"{server.base}/lab/tree/{rel}?token={server.token}", wait_until="load")
        how = "/lab/tree URL"
    info = wait_for(page, PANEL_AT_JS, 60, poll_s=0.5, arg=rel)
    opened = bool(info) and info.get("kind") == "notebook"
    checks.check(opened, f"opens as a notebook on {how} (Jupytext Notebook viewer)",
                 f"got {info.get('kind') if info else 'nothing'} for {rel}")
    if not opened:
        return None
    n_code = sum(c["type"] == "code" for c in info["cells"])
    checks.check(n_code > 0, "has code cells", f"{n_code} code, "
                 f"{sum(c['type'] == 'markdown' for c in info['cells'])} markdown")
    return info


def check_rendered(page, checks: Checks, code: list[dict], live_widgets: bool,
                   cites: bool = False) -> None:
    """The checks of (b) on the current notebook, `code` being its code cells' state and
    `cites` whether the chapter cites anything."""
    errors = [f"code cell {i}: {o['ename']}: {o['evalue']}" for i, c in enumerate(code, 1)
              for o in c["outputs"] if o["type"] == "error"]
    checks.check(not errors, "no cell raised", "; ".join(errors)[:500])
    render = page.evaluate(JS_RENDER) or {}
    checks.check(render.get("math", 0) > 0, "math is typeset (MathJax/KaTeX elements)",
                 f"{render.get('math', 0)} elements")
    text = "\n".join(render.get("markdownText", []))
    raw = sorted({m.group(0).strip() for pat in UNRENDERED
                  for m in re.finditer(pat, text, flags=re.MULTILINE)})
    in_code = "\n".join(render.get("markdownCode", []))
    raw += sorted({m.group(0).strip() for pat in UNRENDERED_IN_CODE_BLOCKS
                   for m in re.finditer(pat, in_code, flags=re.MULTILINE)} - set(raw))
    checks.check(render.get("mystCells", 0) > 0, "markdown is rendered by jupyterlab-myst",
                 f"{render.get('mystCells', 0)}/{render.get('markdownCells', 0)} markdown cells")
    checks.check(not raw, "no raw MyST syntax (roles, directives, labels) in rendered markdown",
                 "raw syntax left: " + ", ".join(raw) if raw else
                 f"{len(render.get('markdownText', []))} rendered markdown cells")
    split = split_directives(render.get("cells", []))
    checks.check(bool(render.get("cells")) and not split,
                 "no MyST directive split across cells (a code cell written inside a directive)",
                 "; ".join(split)[:600] if split else f"{len(render.get('cells', []))} cells")
    # jupyterlab-myst does not read references.bib: the reader's notebook has the citations
    # written out (tools/reader_notebook.py); a role left in it shows as "Citation Not Found"
    checks.check(not render.get("citeNotFound") and render.get("references", False) == cites,
                 "citations render as author-year, with a References list",
                 f"{render.get('citeNotFound', 0)} unresolved citation role(s); References "
                 f"list {'shown' if render.get('references') else 'absent'}, the chapter "
                 f"{'cites' if cites else 'cites nothing'}")
    # Opened, a solution shows neither code nor outputs. Run in the UI, JupyterLab shows the
    # outputs of every cell it executes (CodeCell.execute unhides them), so a solution's
    # output must itself be collapsed (a closed <details>, lsgm_edu.viz.solution_output).
    solutions = render.get("solutions", [])
    ran = live_widgets
    def why(s):  # what of a solution shows (empty: it is collapsed)
        return ", ".join(w for w, bad in (
            ("input not hidden", not s["inputHidden"]), ("code visible", s["codeShown"]),
            (f"output visible: {s.get('revealed')}", s["outputShown"]),
            ("output not hidden", not ran and not s["outputHidden"])) if bad)

    shown = [f'{s["title"]} ({why(s)})' for s in solutions if why(s)]
    checks.check(not shown, "exercise solutions are collapsed (code and outputs)",
                 "shown: " + "; ".join(shown) if shown else
                 f"{len(solutions)} solution cell(s), "
                 f"{sum(s['outputs'] > 0 for s in solutions)} with outputs")
    # `[](#label)` with no target renders as a link whose text is "#label"; `{eq}` and
    # friends as a "Cross Reference Not Found" marker.
    unresolved = [f'{a["href"]} (in "{a.get("context", "")[:400]}")'
                  for a in render.get("links", [])
                  if a["href"].startswith("#") and (not a["text"] or a["text"] == a["href"])]
    unresolved += render.get("xrefNotFound", [])
    checks.check(not unresolved, "cross-references resolve in JupyterLab",
                 "unresolved: " + ", ".join(unresolved)[:300] if unresolved else
                 f"{sum(a['href'].startswith('#') for a in render.get('links', []))} internal links")
    widget_outputs = sum(WIDGET_MIME in o["mimes"] for c in code for o in c["outputs"])
    if live_widgets and widget_outputs:
        widgets = render.get("widgets", [])
        broken = [w["text"] for w in widgets
                  if not w["rendered"] or re.search(r"Error displaying widget|Loading widget",
                                                    w["text"])]
        checks.check(len(widgets) >= widget_outputs and not broken,
                     "ipywidgets render (live widgets below the static figures)",
                     f"{len(widgets) - len(broken)}/{widget_outputs} widget outputs rendered"
                     + (f"; broken: {broken[:3]}" if broken else ""))
    checks.check(render.get("images", 0) > 0, "at least one image output",
                 f"{render.get('images', 0)} images")


def take_screenshots(page, checks: Checks, outdir: Path, tag: str, max_shots: int) -> None:
    page.evaluate("() => { const s = window.jupyterapp.shell;"
                  " if (!s.leftCollapsed) s.collapseLeft(); return true; }")
    time.sleep(0.5)
    shots = screenshot_notebook(page, outdir, tag, max_shots)
    checks.screenshots += shots
    checks.say(f"  wrote {len(shots)} screenshot(s): {shots[0].name} ... {shots[-1].name}")


def run_in_ui(page, checks: Checks, outdir: Path, tag: str, timeout: float,
              max_shots: int, cites: bool) -> None:
    """(b) for a chapter run in the UI: its reader's notebook is open."""
    # outputs saved in the notebook would make cells look executed already
    stale = page.evaluate(
        "() => { const w = window.jupyterapp.shell.currentWidget; let n = 0;"
        " for (const c of w.content.model.cells) { if (c.type !== 'code') continue;"
        "   if (c.executionCount !== null || c.outputs.length) n++;"
        "   c.outputs.clear(); c.executionCount = null; }"
        " return n; }")
    if stale:
        checks.say(f"  cleared saved outputs of {stale} cell(s)")
    kernel = wait_for(page, "() => { const f = " + JS_PANEL + "; const r = f();"
                      " return r && r.kernel === 'idle' ? r : null; }", 90)
    checks.check(bool(kernel), "kernel started and idle",
                 (kernel or {}).get("kernelName") or "no kernel")
    how = click_run_all(page)
    checks.say(f"  running all cells ({how}), timeout {timeout:.0f} s")
    t0 = time.monotonic()
    done_js = ("() => { const f = " + JS_PANEL + "; const r = f(); if (!r || !r.cells) return null;"
               " const code = r.cells.filter(c => c.type === 'code');"
               " const errored = code.some(c => c.outputs.some(o => o.type === 'error'));"
               " const all = code.every(c => c.count !== null && c.count !== undefined);"
               " return ((all || errored) && r.kernel === 'idle') ? r : null; }")
    time.sleep(2)
    state = wait_for(page, done_js, timeout, poll_s=2.0)
    elapsed = time.monotonic() - t0
    checks.run_all_seconds = elapsed
    if not state:
        state = page.evaluate("() => { const f = " + JS_PANEL + "; return f(); }")
    code = [c for c in (state or {}).get("cells", []) if c["type"] == "code"]
    ran = sum(c["count"] is not None for c in code)
    checks.check(bool(code) and ran == len(code), "every code cell ran",
                 f"{ran}/{len(code)} in {elapsed:.0f} s"
                 + ("" if state and state.get("kernel") == "idle" else ", kernel still busy"))
    time.sleep(1)  # late widget views
    wait_rendered(page, 30)  # late typesetting / image decoding
    check_rendered(page, checks, code, live_widgets=True, cites=cites)
    take_screenshots(page, checks, outdir, tag, max_shots)


WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


def reader_copy(chapter: Path, outputs: Path | None, dest: Path,
                bib: reader_notebook.Bibliography) -> tuple[Path | None, str]:
    """The chapter as readers open it (tools/reader_notebook.py: citations rendered), with the
    outputs of `outputs/<stem>.ipynb` attached when `outputs` is given, written to
    `dest/<stem>.ipynb` beside links to the chapter's folders (images/), so that relative links
    resolve. Returns (path, "") or (None, why there is none)."""
    import nbformat

    nb = reader_notebook.reader_notebook(chapter, bib)
    if outputs is not None:
        stored_path = outputs / f"{chapter.stem}.ipynb"
        if not stored_path.is_file():
            return None, (f"no executed notebook {stored_path} (the chapter's notebook test "
                          "did not run in this session, or one of its cells failed)")
        stored = nbformat.read(stored_path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        ran = [c for c in stored.cells if c.cell_type == "code"]
        if [c.source for c in code] != [c.source for c in ran]:
            return None, (f"the outputs in {stored_path} are stale (its code cells differ from "
                          "the chapter's); run the chapter again")
        for cell, done in zip(code, ran):
            cell.outputs = done.get("outputs", [])
            cell.execution_count = done.get("execution_count")
            for out in cell.outputs:
                if out.get("output_type") == "execute_result":  # its prompt: Out[n], as run
                    out["execution_count"] = cell.execution_count
                # No widget state is saved with the outputs (there is no kernel to ask for
                # it): show what a static view shows, the text fallback, not "model not found".
                data = out.get("data", {})
                if WIDGET_MIME in data and len(data) > 1:
                    del data[WIDGET_MIME]
    dest.mkdir(parents=True, exist_ok=True)
    for entry in chapter.parent.iterdir():
        if entry.is_dir() and not entry.name.startswith(".") and not (dest / entry.name).exists():
            (dest / entry.name).symlink_to(entry, target_is_directory=True)
    path = dest / f"{chapter.stem}.ipynb"
    nbformat.write(nb, path)
    return path, ""


def open_notebook(page, server: LabServer, checks: Checks, copy: Path) -> bool:
    """Open the reader's notebook `copy` in JupyterLab (the Notebook viewer)."""
    rel = copy.relative_to(server.root).as_posix()
    page.evaluate("(path) => { window.jupyterapp.commands.execute('docmanager:open',"
                  " {path, factory: 'Notebook'}); return true; }", rel)
    info = wait_for(page, PANEL_AT_JS, 60, poll_s=0.5, arg=rel)
    if not checks.check(bool(info) and info.get("kind") == "notebook",
                        "the reader's notebook opens in JupyterLab",
                        f"{rel}: {info.get('kind') if info else 'nothing'}"):
        return False
    page.wait_for_selector(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell", timeout=30000)
    return True


def render_outputs(page, checks: Checks, outdir: Path, tag: str, max_shots: int,
                   cites: bool) -> None:
    """(b) for a chapter with an executed copy, open: check it, screenshot it."""
    progress = wait_rendered(page, 60) or {}
    checks.say(f"  rendered {progress.get('rendered')}/{progress.get('markdown')} markdown "
               f"cells, {progress.get('decoded')}/{progress.get('images')} image outputs")
    state = page.evaluate("() => { const f = " + JS_PANEL + "; return f(); }") or {}
    code = [c for c in state.get("cells", []) if c["type"] == "code"]
    check_rendered(page, checks, code, live_widgets=False, cites=cites)
    take_screenshots(page, checks, outdir, tag, max_shots)


def visit_chapter(page, server: LabServer, chapter: Path, checks: Checks, copy: Path | None,
                  outdir: Path, timeout: float, max_shots: int) -> None:
    """(a) the chapter opens as a notebook on double-click; (b) its reader's notebook `copy`
    (with outputs, or run in the UI) renders and passes the checks."""
    tag = chapter_tag(chapter)
    for old in outdir.glob(f"offline_{tag}_rendered*.png"):
        old.unlink()
    checks.say(f"{chapter.relative_to(server.root).as_posix()}: opening in JupyterLab"
               + (" (outputs from its executed notebook)" if checks.mode == "outputs" else
                  " (to run it)"))
    info = open_by_double_click(page, server, chapter, checks)
    if info is None:
        page.screenshot(path=str(outdir / f"jupyterlab_{tag}_notebook.png"))
        return
    page.wait_for_selector(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell", timeout=30000)
    wait_rendered(page, 30, first_screen=True)
    first = outdir / f"jupyterlab_{tag}_notebook.png"
    page.screenshot(path=str(first))
    checks.screenshots.append(first)
    checks.say(f"  wrote {first}")
    page.evaluate(CLOSE_ALL_JS)
    if copy is None or not open_notebook(page, server, checks, copy):
        return
    cites = bool(reader_notebook.CITE.search(chapter.read_text(encoding="utf-8")))
    if checks.mode == "run":
        run_in_ui(page, checks, outdir, tag, timeout, max_shots, cites)
    else:
        render_outputs(page, checks, outdir, tag, max_shots, cites)


class BrowserPages:
    """One headless Chromium for every chapter; one page, kept from chapter to chapter (a
    JupyterLab load is seconds) and replaced after a chapter that went wrong."""

    def __init__(self, pw, chromium: str, viewport: dict):
        self.browser = pw.chromium.launch(executable_path=chromium, headless=True,
                                          args=CHROMIUM_ARGS)
        self.viewport = viewport
        self.context = None
        self.page = None
        self.errors: list[str] = []

    def get(self):
        if self.page is None:
            self.context = self.browser.new_context(viewport=self.viewport)
            self.page = self.context.new_page()
            self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        return self.page

    def discard(self) -> None:
        if self.context is not None:
            try:
                self.context.close()
            except Exception as err:  # noqa: BLE001 - a broken context: the browser ends it
                print(f"  (could not close the browser context: {err})")
        self.context = self.page = None

    def close(self) -> None:
        self.discard()
        self.browser.close()


COPIES_PREFIX = "screenshot_book_"


def remove_stale_copies(folder: Path) -> None:
    """Folders of executed copies left by runs that were killed (named after their pid)."""
    for old in folder.glob(f"{COPIES_PREFIX}*_*"):
        try:
            os.kill(int(old.name[len(COPIES_PREFIX):].split("_")[0]), 0)
        except ProcessLookupError:
            shutil.rmtree(old, ignore_errors=True)
        except (ValueError, PermissionError):
            continue


def write_results(path: Path | None, results: dict[Path, Checks], root: Path,
                  error: str = "") -> None:
    if path is None:
        return
    record = {"error": error, "chapters": {
        c.relative_to(root).as_posix(): checks.as_json() for c, checks in results.items()
        if checks.done}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)


RUN_ALL_BUDGET_S = 120.0  # a reader's Run All of a chapter in fast mode, on two cores


def run_all_table(timed: dict[Path, float], fast: bool) -> str:
    """Markdown table: each chapter's Run All time in JupyterLab against the budget."""
    mode = "fast" if fast else "default"
    lines = [f"Run All in JupyterLab ({mode} mode, {os.cpu_count()} CPU cores)", "",
             f"| chapter | Run All (s) | within {RUN_ALL_BUDGET_S:.0f} s |", "|---|---:|:---:|"]
    lines += [f"| {c.name} | {s:.1f} | {'yes' if s <= RUN_ALL_BUDGET_S else 'NO'} |"
              for c, s in timed.items()]
    return "\n".join(lines)


def write_timings(path: Path, timed: dict[Path, float], fast: bool, root: Path) -> None:
    """The Run All table as a benchmark result (benchmarks/_common: machine, date, atomic)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from _common import machine, utc_now, write_results

    write_results({
        "what": "a reader's Run All of each chapter in JupyterLab (tools/screenshot_book.py): "
                "seconds from the Run menu to every code cell run and the kernel idle",
        "mode": "fast (LSGM_EDU_FAST=1)" if fast else "default",
        "budget_s": RUN_ALL_BUDGET_S,
        "machine": machine("cpu"),
        "date": utc_now(),
        "chapters": {c.relative_to(root).as_posix(): round(s, 1) for c, s in timed.items()},
    }, path)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("chapters", nargs="*", type=Path,
                        default=[REPO / "book" / "01_scores_and_langevin.md"],
                        help="chapter .md files (default: book/01_scores_and_langevin.md)")
    parser.add_argument("--outdir", type=Path, default=REPO / ".build" / "screenshots")
    parser.add_argument("--root", type=Path, default=None,
                        help="JupyterLab root folder (default: the repository, or the "
                             "chapter's parent's parent when it lies outside it)")
    parser.add_argument("--outputs", type=Path, default=None, metavar="DIR",
                        help="render each chapter with the outputs of DIR/<stem>.ipynb (as "
                             "the notebook tests save them in .build/executed) instead of "
                             "running it in the UI; a chapter without one fails")
    parser.add_argument("--run", type=Path, action="append", default=[], metavar="CHAPTER",
                        help="with --outputs: run this chapter in the UI all the same "
                             "(repeatable; it needs no executed notebook)")
    parser.add_argument("--results", type=Path, default=None, metavar="FILE",
                        help="write each chapter's checks, screenshots and log here as JSON")
    parser.add_argument("--timeout", type=float, default=240.0,
                        help="seconds allowed for running all cells of one chapter")
    parser.add_argument("--fast", action="store_true",
                        help="run the kernel with LSGM_EDU_FAST=1 (the tests' fast mode)")
    parser.add_argument("--max-shots", type=int, default=40,
                        help="at most this many scrolled screenshots per chapter")
    parser.add_argument("--timings", type=Path, default=None, metavar="FILE",
                        help="write the Run All time of each chapter run in the UI as JSON "
                             "(with the machine), e.g. benchmarks/results/run_all_fast_cpu.json")
    parser.add_argument("--width", type=int, default=1440)
    parser.add_argument("--height", type=int, default=1000)
    args = parser.parse_args(argv)

    # SIGTERM (e.g. a test harness's timeout) unwinds through the `finally` that stops the server
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))

    chapters = [c.resolve() for c in args.chapters]
    to_run = {c.resolve() for c in args.run}
    missing = [str(c) for c in chapters + sorted(to_run) if not c.is_file()]
    if missing:
        print(f"screenshot_book: no such chapter: {', '.join(missing)}", file=sys.stderr)
        return 2
    if to_run - set(chapters):
        print(f"screenshot_book: --run names chapters not given: "
              f"{', '.join(str(c) for c in sorted(to_run - set(chapters)))}", file=sys.stderr)
        return 2
    root = (args.root or (REPO if all(REPO in c.parents for c in chapters)
                          else chapters[0].parent.parent)).resolve()
    outside = [str(c) for c in chapters if root not in c.parents]
    if outside:
        print(f"screenshot_book: chapters outside the root {root}: {outside}", file=sys.stderr)
        return 2
    chromium = find_chromium()
    if chromium is None:
        print("screenshot_book: Chromium not found (/usr/bin/chromium or `chromium` on PATH); "
              "install it with `apt-get install -y chromium`", file=sys.stderr)
        return 3
    outdir = args.outdir.resolve()
    outdir.mkdir(parents=True, exist_ok=True)

    settings = install_lab_settings.target_path(sys.prefix)
    wanted = json.loads(install_lab_settings.SOURCE.read_text())
    if not install_lab_settings.is_installed(settings, wanted):
        install_lab_settings.install(settings, wanted)
        print(f"installed the book's JupyterLab settings into {settings}")

    from playwright.sync_api import sync_playwright

    digests = {c: hashlib.sha256(c.read_bytes()).hexdigest() for c in chapters}
    results: dict[Path, Checks] = {
        c: Checks("outputs" if args.outputs is not None and c not in to_run else "run")
        for c in chapters}
    # the reader's notebooks (with outputs, or to run): under the root, for JupyterLab
    remove_stale_copies(root / ".build")
    (root / ".build").mkdir(exist_ok=True)
    copies_dir = Path(tempfile.mkdtemp(prefix=f"{COPIES_PREFIX}{os.getpid()}_",
                                       dir=root / ".build"))
    bib = reader_notebook.Bibliography()
    server = LabServer(root, outdir / "jupyterlab_server.log", fast=args.fast)
    try:
        server.start()
        print(f"jupyter lab on {server.base} (root {root}, log {server.log_path})", flush=True)
        with sync_playwright() as pw:
            pages = BrowserPages(pw, chromium, {"width": args.width, "height": args.height})
            try:
                for chapter in chapters:
                    checks = results[chapter]
                    t0 = time.monotonic()
                    folder = copies_dir / chapter.parent.relative_to(root)
                    outputs = args.outputs.resolve() if checks.mode == "outputs" else None
                    copy, problem = reader_copy(chapter, outputs, folder, bib)
                    checks.check(copy is not None, "has an executed notebook to render"
                                 if outputs else "its reader's notebook is built",
                                 problem or str(copy.relative_to(root)))
                    pages.errors.clear()
                    page = pages.get()
                    try:
                        visit_chapter(page, server, chapter, checks, copy, outdir,
                                      args.timeout, args.max_shots)
                        page.evaluate(CLOSE_ALL_JS)
                    except Exception as err:  # noqa: BLE001 - report, keep the evidence
                        shot = outdir / f"error_{chapter_tag(chapter)}.png"
                        try:
                            page.screenshot(path=str(shot))
                        except Exception as shot_err:  # noqa: BLE001
                            checks.say(f"  (no error screenshot: {shot_err})")
                        checks.check(False, "the browser session finished",
                                     f"{type(err).__name__}: {err}; see {shot}")
                        pages.discard()  # a fresh page for the next chapter
                        server.shutdown_kernels()  # that page's kernels
                    finally:
                        if pages.errors:
                            checks.say(f"  page errors: {pages.errors[:5]}")
                        checks.seconds = time.monotonic() - t0
                        checks.done = True
                        checks.say(f"  ({checks.seconds:.0f} s)")
                        # as it goes: a caller that stops this run still finds what it did
                        write_results(args.results, results, root)
            finally:
                pages.close()
    except RuntimeError as err:
        print(f"screenshot_book: {err}", file=sys.stderr)
        write_results(args.results, results, root, error=str(err))
        return 1
    finally:
        server.stop()
        shutil.rmtree(copies_dir, ignore_errors=True)

    ok = True
    for chapter, checks in results.items():
        if hashlib.sha256(chapter.read_bytes()).hexdigest() != digests[chapter]:
            checks.check(False, "the chapter file was left unchanged")
        if checks.failed:
            ok = False
            print(f"\n{chapter.name}: {len(checks.failed)} check(s) FAILED:", file=sys.stderr)
            for f in checks.failed:
                print(f"  - {f}", file=sys.stderr)
        else:
            print(f"{chapter.name}: all {len(checks.passed)} checks passed")
    write_results(args.results, results, root)
    timed = {c: r.run_all_seconds for c, r in results.items() if r.run_all_seconds is not None}
    if timed:
        print(run_all_table(timed, args.fast))
        if args.timings is not None:
            write_timings(args.timings, timed, args.fast, root)
    print(f"screenshots in {outdir}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

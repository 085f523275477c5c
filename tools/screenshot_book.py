#!/usr/bin/env python3
"""Open a chapter in JupyterLab in headless Chromium, run it, check it renders, screenshot it.

    python tools/screenshot_book.py                       # chapter 1 into .build/screenshots
    python tools/screenshot_book.py book/02_x.md --outdir DIR --timeout 300 --fast

For each chapter it starts `jupyter lab` on 127.0.0.1 (a free port, a random token, no browser,
the repository as root folder, the JupyterLab settings of tools/jupyterlab installed), then:

(a) double-clicks the chapter in JupyterLab's file browser, checks it opened as a NOTEBOOK
    (not as a text file) with code cells, and saves `jupyterlab_chapterN_notebook.png`;
(b) runs all cells from the Run menu, waits until every code cell has run and the kernel is
    idle, then checks that no cell raised, that math is typeset, that MyST cross-references
    and roles are resolved (no raw `[](#`, `{eq}`, `{math}`... left in the rendered markdown)
    and that there is at least one image output, and saves the whole notebook as
    `offline_chapterN_rendered_01.png`, `_02.png`, ... (one per screen, top to bottom).

Nothing is written to the chapter: autosave is off and the file is checked unchanged. The
server is always stopped (terminate, then kill). Exit status 0 when every check passed, 1
otherwise, with the failed checks listed. Needs Chromium (Debian: `apt-get install chromium`).
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
from check_book import BUILD_ID_VAR, end_build, start_watchdog

CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]

# JupyterLab user settings for this run only (a temporary settings dir): never write to the
# chapter, render every cell (no windowing, so the checks see the whole notebook), no news.
USER_SETTINGS = {
    "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false",
                                                    "checkForUpdates": False},
}

# Literal MyST syntax that must not survive rendering of a markdown cell.
UNRENDERED = [r"\[\]\(#", r"\{math\}", r"\{eq\}`", r"\{ref\}`", r"\{numref\}`", r"\{cite(:[pt])?\}`",
              r"```\{", r":::\{", r"^\(\S+\)=$"]


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
      c.style.cssText = 'position:absolute;left:-99999px;top:0;width:900px';
      document.body.appendChild(c);  // innerText needs layout
      const t = c.innerText;
      c.remove();
      return t;
    }),
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
    links: md.flatMap(e => Array.from(e.querySelectorAll('a')))
      // an equation's own permalink "(n)" is an anchor, not a cross-reference
      .filter(a => !/^Link to this/.test(a.getAttribute('title') || ''))
      .map(a => ({text: a.innerText.trim(), href: a.getAttribute('href') || '',
                  context: (a.closest('p, li, div') ? a.closest('p, li, div').outerHTML : '').slice(0, 400)})),
  };
}
"""


# Fire a JupyterLab command without awaiting it (a command that opens a dialog never resolves).
COMMAND_JS = "(id) => { window.jupyterapp.commands.execute(id); return true; }"


class Checks:
    def __init__(self):
        self.failed: list[str] = []
        self.passed: list[str] = []

    def check(self, ok: bool, what: str, detail: str = "") -> bool:
        (self.passed if ok else self.failed).append(what + (f" ({detail})" if detail else ""))
        print(f"  [{'ok' if ok else 'FAIL'}] {what}" + (f": {detail}" if detail else ""),
              flush=True)
        return ok


def wait_for(page, predicate_js: str, timeout_s: float, poll_s: float = 1.0):
    """Poll a JS predicate (returns a truthy value when done) until it holds or time runs out."""
    deadline = time.monotonic() + timeout_s
    value = None
    while time.monotonic() < deadline:
        value = page.evaluate(predicate_js)
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
    for old in outdir.glob(f"offline_{tag}_rendered*.png"):
        old.unlink()
    shots = []
    for i in range(n):
        page.evaluate("([sel, y]) => { document.querySelector(sel).scrollTop = y; }",
                      [scroller, i * step])
        time.sleep(0.6)
        path = outdir / f"offline_{tag}_rendered_{i + 1:02d}.png"
        page.screenshot(path=str(path))
        shots.append(path)
    if geom["h"] > geom["v"] + (n - 1) * step:
        print(f"  note: notebook is taller than {max_shots} screens; later part not captured")
    return shots


def run_chapter(page, server: LabServer, chapter: Path, outdir: Path, timeout: float,
                max_shots: int) -> Checks:
    checks = Checks()
    rel = chapter.relative_to(server.root).as_posix()
    tag = chapter_tag(chapter)
    print(f"{rel}: opening in JupyterLab", flush=True)
    # (a) a double-click in the file browser opens it as a notebook, with code cells
    folder = chapter.parent.relative_to(server.root).as_posix()
    folder = "" if folder == "." else folder
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
    info = wait_for(page, "() => { const f = " + JS_PANEL + "; const r = f();"
                    " return r && r.path && r.ready ? r : null; }",
                    60)
    opened = bool(info) and info.get("kind") == "notebook" and info.get("path") == rel
    checks.check(opened, f"opens as a notebook on {how} (Jupytext Notebook viewer)",
                 f"got {info.get('kind') if info else 'nothing'} for {rel}")
    if not opened:
        page.screenshot(path=str(outdir / f"jupyterlab_{tag}_notebook.png"))
        return checks
    n_code = sum(c["type"] == "code" for c in info["cells"])
    checks.check(n_code > 0, "has code cells", f"{n_code} code, "
                 f"{sum(c['type'] == 'markdown' for c in info['cells'])} markdown")
    # outputs saved in a paired .ipynb would make cells look executed already
    stale = page.evaluate(
        "() => { const w = window.jupyterapp.shell.currentWidget; let n = 0;"
        " for (const c of w.content.model.cells) { if (c.type !== 'code') continue;"
        "   if (c.executionCount !== null || c.outputs.length) n++;"
        "   c.outputs.clear(); c.executionCount = null; }"
        " return n; }")
    if stale:
        print(f"  cleared saved outputs of {stale} cell(s) (from a paired .ipynb)")
    kernel = wait_for(page, "() => { const f = " + JS_PANEL + "; const r = f();"
                      " return r && r.kernel === 'idle' ? r : null; }", 90)
    checks.check(bool(kernel), "kernel started and idle",
                 (kernel or {}).get("kernelName") or "no kernel")
    page.wait_for_selector(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell", timeout=30000)
    time.sleep(2)  # let markdown/math finish typesetting
    first = outdir / f"jupyterlab_{tag}_notebook.png"
    page.screenshot(path=str(first))
    print(f"  wrote {first}")

    # (b) run everything, wait for the kernel to finish
    how = click_run_all(page)
    print(f"  running all cells ({how}), timeout {timeout:.0f} s", flush=True)
    t0 = time.monotonic()
    done_js = ("() => { const f = " + JS_PANEL + "; const r = f(); if (!r || !r.cells) return null;"
               " const code = r.cells.filter(c => c.type === 'code');"
               " const errored = code.some(c => c.outputs.some(o => o.type === 'error'));"
               " const all = code.every(c => c.count !== null && c.count !== undefined);"
               " return ((all || errored) && r.kernel === 'idle') ? r : null; }")
    time.sleep(2)
    state = wait_for(page, done_js, timeout, poll_s=2.0)
    elapsed = time.monotonic() - t0
    if not state:
        state = page.evaluate("() => { const f = " + JS_PANEL + "; return f(); }")
    code = [c for c in (state or {}).get("cells", []) if c["type"] == "code"]
    ran = sum(c["count"] is not None for c in code)
    checks.check(bool(code) and ran == len(code), "every code cell ran",
                 f"{ran}/{len(code)} in {elapsed:.0f} s"
                 + ("" if state and state.get("kernel") == "idle" else ", kernel still busy"))
    errors = [f"code cell {i}: {o['ename']}: {o['evalue']}" for i, c in enumerate(code, 1)
              for o in c["outputs"] if o["type"] == "error"]
    checks.check(not errors, "no cell raised", "; ".join(errors)[:500])
    time.sleep(3)  # late typesetting / image decoding

    render = page.evaluate(JS_RENDER) or {}
    checks.check(render.get("math", 0) > 0, "math is typeset (MathJax/KaTeX elements)",
                 f"{render.get('math', 0)} elements")
    text = "\n".join(render.get("markdownText", []))
    raw = sorted({m.group(0) for pat in UNRENDERED
                  for m in re.finditer(pat, text, flags=re.MULTILINE)})
    checks.check(render.get("mystCells", 0) > 0, "markdown is rendered by jupyterlab-myst",
                 f"{render.get('mystCells', 0)}/{render.get('markdownCells', 0)} markdown cells")
    checks.check(not raw, "no raw MyST syntax (roles, directives, labels) in rendered markdown",
                 "raw syntax left: " + ", ".join(raw) if raw else
                 f"{len(render.get('markdownText', []))} rendered markdown cells")
    # `[](#label)` with no target renders as a link whose text is "#label"; `{eq}` and
    # friends as a "Cross Reference Not Found" marker. Citations are not checked here:
    # jupyterlab-myst does not read references.bib (check_book.py checks them).
    unresolved = [f'{a["href"]} (in "{a.get("context", "")[:400]}")'
                  for a in render.get("links", [])
                  if a["href"].startswith("#") and (not a["text"] or a["text"] == a["href"])]
    unresolved += render.get("xrefNotFound", [])
    checks.check(not unresolved, "cross-references resolve in JupyterLab",
                 "unresolved: " + ", ".join(unresolved)[:300] if unresolved else
                 f"{sum(a['href'].startswith('#') for a in render.get('links', []))} internal links")
    widget_outputs = sum("application/vnd.jupyter.widget-view+json" in o["mimes"]
                         for c in code for o in c["outputs"])
    if widget_outputs:
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

    page.evaluate("() => { const s = window.jupyterapp.shell;"
                  " if (!s.leftCollapsed) s.collapseLeft(); return true; }")
    time.sleep(1)
    shots = screenshot_notebook(page, outdir, tag, max_shots)
    print(f"  wrote {len(shots)} screenshot(s): {shots[0].name} ... {shots[-1].name}")
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("chapters", nargs="*", type=Path,
                        default=[REPO / "book" / "01_scores_and_langevin.md"],
                        help="chapter .md files (default: book/01_scores_and_langevin.md)")
    parser.add_argument("--outdir", type=Path, default=REPO / ".build" / "screenshots")
    parser.add_argument("--root", type=Path, default=None,
                        help="JupyterLab root folder (default: the repository, or the "
                             "chapter's parent's parent when it lies outside it)")
    parser.add_argument("--timeout", type=float, default=240.0,
                        help="seconds allowed for running all cells of one chapter")
    parser.add_argument("--fast", action="store_true",
                        help="run the kernel with LSGM_EDU_FAST=1 (the tests' fast mode)")
    parser.add_argument("--max-shots", type=int, default=40,
                        help="at most this many scrolled screenshots per chapter")
    parser.add_argument("--width", type=int, default=1440)
    parser.add_argument("--height", type=int, default=1000)
    args = parser.parse_args(argv)

    # SIGTERM (e.g. a test harness's timeout) unwinds through the `finally` that stops the server
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))

    chapters = [c.resolve() for c in args.chapters]
    missing = [str(c) for c in chapters if not c.is_file()]
    if missing:
        print(f"screenshot_book: no such chapter: {', '.join(missing)}", file=sys.stderr)
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
    server = LabServer(root, outdir / "jupyterlab_server.log", fast=args.fast)
    results: dict[Path, Checks] = {}
    try:
        server.start()
        print(f"jupyter lab on {server.base} (root {root}, log {server.log_path})", flush=True)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, headless=True,
                                         args=CHROMIUM_ARGS)
            try:
                for chapter in chapters:
                    context = browser.new_context(
                        viewport={"width": args.width, "height": args.height})
                    page = context.new_page()
                    console_errors: list[str] = []
                    page.on("pageerror", lambda e, sink=console_errors: sink.append(str(e)))
                    try:
                        results[chapter] = run_chapter(page, server, chapter, outdir,
                                                       args.timeout, args.max_shots)
                    except Exception as err:  # noqa: BLE001 - report, keep the evidence
                        shot = outdir / f"error_{chapter_tag(chapter)}.png"
                        try:
                            page.screenshot(path=str(shot))
                        except Exception as shot_err:  # noqa: BLE001
                            print(f"  (no error screenshot: {shot_err})")
                        results[chapter] = Checks()
                        results[chapter].check(False, "the browser session finished",
                                               f"{type(err).__name__}: {err}; see {shot}")
                    finally:
                        if console_errors:
                            print(f"  page errors: {console_errors[:5]}")
                        context.close()
            finally:
                browser.close()
    except RuntimeError as err:
        print(f"screenshot_book: {err}", file=sys.stderr)
        return 1
    finally:
        server.stop()

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
    print(f"screenshots in {outdir}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

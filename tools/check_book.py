#!/usr/bin/env python3
"""Validate the book offline: no broken cross-reference, citation, directive or role.

Runs Jupyter Book 2 (mystmd) in strict mode on a temporary copy of the project, with the site
template swapped for a local do-nothing one (tools/offline_site_template) so nothing is
downloaded. The real myst.yml is never modified.

    python tools/check_book.py            # exit 0 when the book is clean, 1 with a list of errors
    python tools/check_book.py --root DIR # check another copy of the project (used by the tests)
    LSGM_EDU_FAST=1 python tools/check_book.py --execute   # and run every notebook, as
                                          # `jupyter book build --execute` does for the website
    python tools/check_book.py --outputs .build/executed   # the website with the outputs of
                                          # the notebooks `make test` just ran (no re-execution)

It also fails when a chapter is missing from the toc or is not linked from the index page.
A build never outlives the check: on a timeout, an exception, Ctrl-C, SIGTERM or even SIGKILL
of this process (through a watchdog), every process the build started is ended, the Jupyter
server and its kernels included (run_supervised).

Why not just `jupyter book build --site --strict`: offline it fails while fetching the theme;
and mystmd's strict summary forgets errors raised while a page is first parsed (an unknown
directive is printed as an error but the exit code stays 0), so every error line of the build
log counts here, not only the exit code.
"""

from __future__ import annotations

import argparse
import fnmatch
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import reader_notebook
import yaml

TOOLS = Path(__file__).resolve().parent
OFFLINE_TEMPLATE = TOOLS / "offline_site_template"

# Raised to errors on top of whatever myst.yml says, so the check stays strict even if the
# project config is loosened. (An unknown citation key is an error in mystmd already.)
REQUIRED_ERROR_RULES = [
    "reference-target-resolves",
    "reference-syntax-valid",
    "identifier-is-unique",
    "directive-known",
    "directive-argument-correct",
    "directive-body-correct",
    "role-known",
    "role-body-correct",
    "math-renders",
    "image-exists",
    "bib-file-exists",
    "citation-renders",
    "footnote-references-definition",
    "toc-contents-exist",
    "include-content-loads",
]

# What is not copied into the temporary project (generated, large or irrelevant).
IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "venv", ".build", "_build", "node_modules", "__pycache__", "*.pyc",
    ".ipynb_checkpoints", ".pytest_cache", ".ruff_cache", "runs", "*.ipynb", "*.egg-info",
    "*.safetensors", "*.pt", "*.ckpt",
)

# `directive-options-correct` stays a warning in mystmd, because jupytext writes cell metadata
# into a code-cell's option block (`tags: [hide-cell]`, `jupyter: {source_hidden: true}`) that
# mystmd reports but handles (the list form of tags works). Every other option warning, such as
# a misspelt `:lable:` or an option a directive does not have, fails the check here.
JUPYTEXT_CELL_METADATA = {
    "tags", "jupyter", "editable", "deletable", "slideshow", "collapsed", "scrolled",
    "execution", "vscode", "pycharm", "papermill", "id",
}
OPTION_WARNING = re.compile(
    r'(unexpected option|duplicate option|value is not an? \w+ for option|option) '
    r'"(?P<option>[^"]+)"[^()]*\(in (?P<directive>[^)]+)\)')

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
ERROR_MARK = "\u26d4"  # ⛔, how mystmd prefixes an error
WARN_MARK = "\u26a0"  # ⚠️
# First characters of mystmd's log entries (📖 built, 📚 project, 🌎 site, 💿 execute, 🚀, 🪐).
LOG_ENTRY_START = {ERROR_MARK, WARN_MARK, "\U0001F4D6", "\U0001F4DA", "\U0001F30E",
                   "\U0001F4BF", "\U0001F680", "\U0001FA90"}


def toc_files(toc: list) -> list[str]:
    """All `file:` entries of a myst.yml toc, depth first."""
    out: list[str] = []
    for entry in toc or []:
        if isinstance(entry, dict):
            if "file" in entry:
                out.append(entry["file"])
            out.extend(toc_files(entry.get("children", [])))
    return out


def prepare(root: Path, work: Path) -> dict:
    """Copy the project to `work`, point it at the offline template, return its config."""
    config_path = root / "myst.yml"
    if not config_path.is_file():
        raise SystemExit(f"check_book: no myst.yml in {root}")
    shutil.copytree(root, work, ignore=IGNORE, dirs_exist_ok=True)
    config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    config.setdefault("site", {})["template"] = str(OFFLINE_TEMPLATE)
    project = config.setdefault("project", {})
    rules = list(project.get("error_rules") or [])
    unscoped = {
        (r if isinstance(r, str) else r.get("id", r.get("rule")))
        for r in rules
        if isinstance(r, str) or not (r.get("keys") or r.get("key"))
    }
    rules += [{"id": rule, "severity": "error"} for rule in REQUIRED_ERROR_RULES
              if rule not in unscoped]
    project["error_rules"] = rules
    (work / "myst.yml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return config


def write_download_notebooks(root: Path) -> list[Path]:
    """The chapters' reader's notebooks (tools/reader_notebook.py, no outputs) in
    `root/_build/notebooks/`: the website offers each chapter as one (its `downloads`). The
    citations come from the first bibliography of `root/myst.yml`."""
    config = yaml.safe_load((root / "myst.yml").read_text(encoding="utf-8")) or {}
    bibs = (config.get("project") or {}).get("bibliography") or []
    chapters = sorted((root / "book").glob("[0-9][0-9]_*.md"))
    return reader_notebook.build(chapters, root / "_build" / "notebooks",
                                 reader_notebook.Bibliography(root / bibs[0] if bibs else None))


def chapters_missing_from_index(root: Path, toc: list[str]) -> list[str]:
    """Chapters of the toc that the first page (the book's index) does not link to.

    A chapter is linked by its label, the `(ch-...)=` line above its title: `[...](#ch-...)`.
    """
    if not toc or not (root / toc[0]).is_file():
        return []
    index = (root / toc[0]).read_text(encoding="utf-8")
    missing = []
    for rel in toc[1:]:
        if not re.match(r"^\d\d_", Path(rel).name) or not (root / rel).is_file():
            continue
        text = (root / rel).read_text(encoding="utf-8")
        label = re.search(r"^\(([^()\s]+)\)=\s*$", text, flags=re.MULTILINE)
        if label is None:
            missing.append(f"{rel}: no `(label)=` above its title, so {toc[0]} cannot link it")
        elif f"](#{label.group(1)})" not in index:
            missing.append(f"{rel}: not listed in {toc[0]} (no link to #{label.group(1)})")
    return missing


def _set_toc_file(toc: list, old: str, new: str) -> None:
    for entry in toc or []:
        if isinstance(entry, dict):
            if os.path.normpath(entry.get("file", "")) == os.path.normpath(old):
                entry["file"] = new
            _set_toc_file(entry.get("children", []), old, new)


def attach_outputs(root: Path, work: Path, config: dict, outputs: Path) -> list[str]:
    """Build each chapter from its executed notebook instead of executing it again.

    For every chapter in the toc that has code cells, `outputs/<stem>.ipynb` must hold the
    outputs of a run of exactly its current code cells (the notebook tests write them to
    .build/executed/). The chapter as jupytext reads it, with those outputs attached, replaces
    the .md in the temporary project, and the toc points at it; Jupyter Book 2 renders the
    stored outputs of a notebook it does not execute. Returns the problems found (a missing or
    stale notebook, an error output), which stop the check before the build.
    """
    import jupytext
    import nbformat

    problems = []
    project = config["project"]
    for rel in toc_files(project.get("toc", [])):
        if not re.match(r"^\d\d_", Path(rel).name) or not rel.endswith(".md"):
            continue
        nb = jupytext.read(root / rel)
        code = [c for c in nb.cells if c.cell_type == "code"]
        if not code:
            continue
        stored_path = outputs / (Path(rel).stem + ".ipynb")
        if not stored_path.is_file():
            problems.append(f"{rel}: no executed notebook {stored_path} (run the chapters "
                            "first, as `make test` does, or check with --execute)")
            continue
        stored = nbformat.read(stored_path, as_version=4)
        ran = [c for c in stored.cells if c.cell_type == "code"]
        if [c.source for c in code] != [c.source for c in ran]:
            problems.append(f"{rel}: the outputs in {stored_path} are stale (its code cells "
                            "differ from the chapter's); run the chapters again")
            continue
        for i, (cell, done) in enumerate(zip(code, ran)):
            tags = cell.metadata.get("tags", [])
            for out in done.get("outputs", []):
                if out.get("output_type") == "error" and "raises-exception" not in tags:
                    problems.append(f"{rel}: code cell {i} raised {out.get('ename')}: "
                                    f"{out.get('evalue')} (in {stored_path})")
            cell.outputs = done.get("outputs", [])
            cell.execution_count = done.get("execution_count")
        nb.metadata.pop("jupytext", None)  # mystmd warns about its keys
        target = (work / rel).with_suffix(".ipynb")
        nbformat.write(nb, target)
        (work / rel).unlink()
        _set_toc_file(project["toc"], rel, os.path.relpath(target, work))
    # myst.yml excludes the generated book/*.ipynb, which are now the pages
    project["exclude"] = [p for p in project.get("exclude", [])
                          if not fnmatch.fnmatch("book/x.ipynb", p)]
    (work / "myst.yml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return problems


def rendered_outputs(page: dict) -> int:
    """Number of code-cell outputs in a built page (mystmd's `output` nodes)."""
    count, stack = 0, [page.get("mdast", page)]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("type") == "output" and (node.get("jupyter_data") or node.get("data")):
                count += 1
            stack.extend(node.get("children", []) or [])
        elif isinstance(node, list):
            stack.extend(node)
    return count


def chapters_missing_from_toc(root: Path, toc: list[str]) -> list[str]:
    listed = {os.path.normpath(f) for f in toc}
    chapters = sorted(
        os.path.relpath(p, root) for p in glob.glob(str(root / "book" / "[0-9][0-9]_*.md"))
    )
    return [c for c in chapters if os.path.normpath(c) not in listed]


def execution_env(env: dict, scratch: Path) -> dict:
    """Environment in which `jupyter book build --execute` can start its Jupyter server.

    mystmd runs `python -m jupyter_server` with the first `python` on PATH: make it this
    environment's; and as root that server needs allow_root, which no CLI flag reaches, so a
    config dir under `scratch` says so.
    """
    env = dict(env)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    if hasattr(os, "getuid") and os.getuid() == 0:
        config_dir = scratch / "jupyter-config-root"
        config_dir.mkdir(parents=True, exist_ok=True)
        (config_dir / "jupyter_server_config.json").write_text(
            '{"ServerApp": {"allow_root": true}}\n')
        env["JUPYTER_CONFIG_DIR"] = str(config_dir)
    return env


# Every process a build starts carries this variable (with a fresh id) in its environment, so it
# can be found after its parent died or it moved to a session of its own: jupyter_client starts
# each kernel in a new session, out of reach of the build's process group.
BUILD_ID_VAR = "LSGM_EDU_BUILD_ID"


def _proc_stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, pgid, sid) of a process from /proc, None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[2]), int(fields[3])


def build_processes(build_id: str, root_pid: int | None = None) -> list[int]:
    """Live processes of a build: those whose environment carries `build_id`, and (while
    `root_pid` is known) its descendants and the members of its process group and session."""
    if not os.path.isdir("/proc"):
        return []
    marker = f"{BUILD_ID_VAR}={build_id}".encode()
    table: dict[int, tuple[str, int, int, int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _proc_stat(int(entry))) is not None:
            table[int(entry)] = st
    found: set[int] = set()
    for pid, (state, _ppid, pgid, sid) in table.items():
        if state in "ZX" or pid == os.getpid():
            continue
        if root_pid is not None and root_pid in (pid, pgid, sid):
            found.add(pid)
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0"):
            found.add(pid)
    if root_pid is not None:  # descendants that left the group and dropped the variable
        grew = True
        while grew:
            more = {pid for pid, st in table.items()
                    if st[1] in found | {root_pid} and st[0] not in "ZX"} - found
            found |= more - {os.getpid()}
            grew = bool(more)
    return sorted(found)


def end_build(proc: subprocess.Popen | None, build_id: str, grace: float = 5.0) -> list[int]:
    """End every process of a build: SIGTERM (a Jupyter server then stops its kernels), SIGKILL
    whatever is left after `grace` seconds, until none is found. Returns the pids it signalled."""
    root = proc.pid if proc is not None else None
    signalled: set[int] = set()
    if not os.path.isdir("/proc"):  # no way to list processes: the process group is all we know
        if root is not None:
            kill_group(root, signal.SIGTERM)
        return []
    for attempt in range(6):
        pids = build_processes(build_id, root)
        if not pids:
            break
        sig = signal.SIGTERM if attempt == 0 else signal.SIGKILL
        for pid in pids:
            try:
                os.kill(pid, sig)
                signalled.add(pid)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + (grace if attempt == 0 else 5.0)
        while time.monotonic() < deadline:
            if proc is not None:
                proc.poll()  # reap our own child, or it stays a zombie
            if not any(_alive(pid) for pid in pids):
                break
            time.sleep(0.1)
    if proc is not None:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    return sorted(signalled)


def _alive(pid: int) -> bool:
    st = _proc_stat(pid)
    return st is not None and st[0] not in "ZX"


def start_watchdog(build_id: str) -> subprocess.Popen | None:
    """A helper that ends the build's processes once this process is gone, however it ends
    (even SIGKILL, e.g. from a caller's timeout): it waits for EOF on a pipe only we hold."""
    if not os.path.isdir("/proc"):
        return None
    code = (f"import sys; sys.path.insert(0, {str(TOOLS)!r}); import check_book; "
            f"sys.stdin.buffer.read(); check_book.end_build(None, {build_id!r})")
    env = {k: v for k, v in os.environ.items() if k != BUILD_ID_VAR}
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)


def run_supervised(cmd: list[str], cwd: Path, env: dict, timeout: float | None = None,
                   capture: bool = True) -> tuple[int, str]:
    """Run a build so that none of its processes outlives it, on every way out: normal exit,
    timeout (exit status 124), an exception, Ctrl-C or SIGTERM/SIGHUP to this process (the
    exception propagates after the cleanup) and, through a watchdog, SIGKILL.

    mystmd leaves the Jupyter server it starts for --execute running after the build, and that
    server starts each kernel in a session of its own; so the build runs in a new session and
    every process tagged with this build's id is ended afterwards (end_build)."""
    build_id = uuid.uuid4().hex
    env = dict(env, **{BUILD_ID_VAR: build_id})
    watchdog = start_watchdog(build_id)
    proc = None
    previous = {}

    def raise_exit(signum, _frame):
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            previous[sig] = signal.signal(sig, raise_exit)
    try:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.STDOUT if capture else None,
            text=True, encoding="utf-8", errors="replace", start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
            return proc.returncode, out or ""
        except subprocess.TimeoutExpired:
            end_build(proc, build_id)
            out, _ = proc.communicate()
            return 124, (out or "") + f"\n{ERROR_MARK} build timed out after {timeout:.0f} s"
    finally:
        end_build(proc, build_id)
        if watchdog is not None:
            watchdog.stdin.close()  # nothing left for it to do
            try:
                watchdog.wait(timeout=30)
            except subprocess.TimeoutExpired:
                watchdog.kill()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_build(work: Path, timeout: float, execute: bool = False) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "jupyter_book", "build", "--site", "--strict"]
    env = dict(os.environ, NO_COLOR="1", FORCE_COLOR="0")
    if execute:
        cmd.append("--execute")
        env = execution_env(env, work / ".scratch")
    rc, out = run_supervised(cmd, work, env, timeout)
    return rc, ANSI.sub("", out)


def kill_group(pgid: int, sig: int) -> None:
    """Signal every process left in a process group (SIGKILL after 10 s)."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return
    if sig != signal.SIGKILL:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except (ProcessLookupError, PermissionError):
                return
            time.sleep(0.2)
        kill_group(pgid, signal.SIGKILL)


def collect(log: str, mark: str) -> list[str]:
    """Unique log lines that carry `mark`, with the continuation note lines folded in."""
    seen: dict[str, None] = {}
    lines = log.splitlines()
    for i, line in enumerate(lines):
        if mark not in line:
            continue
        text = line.strip().lstrip("-").strip()
        if text.endswith(":"):  # e.g. a traceback follows: keep it, up to the next log entry
            more = []
            for follow in lines[i + 1:i + 40]:
                if follow[:2].strip() and follow.lstrip()[:1] in LOG_ENTRY_START:
                    break
                if follow.startswith(("  - ", "Site has ")):
                    break
                more.append("      " + follow.rstrip())
            text += "\n" + "\n".join(m for m in more if m.strip())
        text = text.replace(ERROR_MARK + "\ufe0f", "").replace(WARN_MARK + "\ufe0f", "")
        text = text.replace(ERROR_MARK, "").replace(WARN_MARK, "").strip()
        # mystmd prints each problem twice: once while building (with file:line) and once in
        # the strict summary (file as a heading). Keep the located form.
        seen.setdefault(text, None)
    located = [t for t in seen if re.match(r"^\S+\.(md|ipynb|bib|yml)\b", t)]
    first = {t: t.splitlines()[0] for t in seen}
    bare = [t for t in seen if t not in located
            and not any(first[t] in first[loc] for loc in located)]
    return located + [b for b in bare if not b.startswith("Site has ")]


def built_pages(content: Path) -> dict[str, dict]:
    """The pages the build wrote (_build/site/content/*.json), by source path."""
    pages = {}
    for page in content.glob("*.json"):
        data = json.loads(page.read_text(encoding="utf-8"))
        pages[str(data.get("location", "")).lstrip("/")] = data
    return pages


def missing_outputs(pages: dict[str, dict], toc: list[str]) -> list[str]:
    """Chapters with code cells whose built page shows no output at all."""
    problems = []
    for rel in toc:
        if not re.match(r"^\d\d_", Path(rel).name):
            continue
        data = pages.get(rel)
        if data is None:
            problems.append(f"{rel}: no page was built for it")
        elif data.get("kind") == "Notebook" and rendered_outputs(data) == 0:
            problems.append(f"{rel}: the built page shows no code-cell output")
    return problems


def missing_downloads(pages: dict[str, dict], toc: list[str]) -> list[str]:
    """Chapters whose page does not offer their notebook (.ipynb) for download (the
    `downloads` of the chapter's front matter)."""
    problems = []
    for rel, data in pages.items():
        if rel not in toc or not re.match(r"^\d\d_", Path(rel).name):
            continue
        offered = {d.get("filename") for d in data["frontmatter"].get("downloads") or []
                   if d.get("static")}
        wanted = Path(rel).stem + ".ipynb"
        if wanted not in offered:
            problems.append(f"{rel}: the page offers {sorted(offered) or 'no download'}, "
                            f"not {wanted}; add it to the chapter's front matter `downloads:` "
                            f"(file: ../_build/notebooks/{wanted})")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=TOOLS.parent,
                        help="project root holding myst.yml (default: this repository)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary build folder and print its path")
    parser.add_argument("--execute", action="store_true",
                        help="also execute the notebooks as the website build does (slower; "
                             "set LSGM_EDU_FAST=1 for fast mode); a cell that raises fails")
    parser.add_argument("--outputs", type=Path, default=None, metavar="DIR",
                        help="build the chapters with the stored outputs of DIR/<chapter>.ipynb "
                             "(executed notebooks, as the notebook tests write them to "
                             ".build/executed) instead of executing them again")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds (default 900)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print the full build log")
    args = parser.parse_args(argv)
    if args.execute and args.outputs:
        parser.error("--execute and --outputs exclude each other")
    root = args.root.resolve()
    # Ctrl-C interrupts even where this process was started with SIGINT ignored (a background
    # job of a non-interactive shell), which Python would otherwise leave ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return check(root, args)
    except KeyboardInterrupt:
        print("check_book: interrupted; the build's processes were ended", file=sys.stderr)
        return 130


def check(root: Path, args: argparse.Namespace) -> int:
    start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="check_book_"))
    try:
        config = prepare(root, work)
        toc = toc_files(config.get("project", {}).get("toc", []))
        problems: list[str] = []
        for missing in chapters_missing_from_toc(root, toc):
            problems.append(f"{missing}: chapter is not in the toc of myst.yml, so it is "
                            "neither built nor checked")
        for f in toc:
            if not (root / f).is_file():
                problems.append(f"myst.yml: toc lists {f}, which does not exist")
        problems += chapters_missing_from_index(root, toc)
        try:
            write_download_notebooks(work)
        except reader_notebook.CitationError as err:
            problems.append(str(err))

        if args.outputs is not None:
            unusable = attach_outputs(root, work, config, args.outputs.resolve())
            if unusable:  # building without the outputs would prove nothing
                problems += unusable
                print(f"\nBook check FAILED ({len(problems)} problem(s)):", file=sys.stderr)
                for p in problems:
                    print(f"  - {p}", file=sys.stderr)
                return 1
            toc = toc_files(config.get("project", {}).get("toc", []))
        rc, log = run_build(work, args.timeout, execute=args.execute)
        if args.verbose:
            print(log)
        errors = collect(log, ERROR_MARK)
        warnings = []
        for w in collect(log, WARN_MARK):
            m = OPTION_WARNING.search(w)
            if m is None:
                warnings.append(w)
            elif m["directive"] == "code-cell" and m["option"] in JUPYTEXT_CELL_METADATA:
                continue  # jupytext's own cell metadata, see JUPYTEXT_CELL_METADATA
            else:
                errors.append(w)
        problems += errors
        if rc != 0 and not errors:
            problems.append(f"jupyter book build exited {rc} without naming an error; log:\n{log}")

        content = work / "_build" / "site" / "content"
        built = {p.stem for p in content.glob("*.json")} if content.is_dir() else set()
        if rc == 0 and not built:
            problems.append("the build wrote no page content (_build/site/content is empty)")
        if rc == 0:
            pages = built_pages(content)
            if args.outputs is not None or args.execute:
                problems += missing_outputs(pages, toc)
            problems += missing_downloads(pages, toc)

        elapsed = time.monotonic() - start
        for w in warnings:
            print(f"warning: {w}")
        if problems:
            print(f"\nBook check FAILED ({len(problems)} problem(s), {elapsed:.1f} s):",
                  file=sys.stderr)
            for p in problems:
                print(f"  - {p}", file=sys.stderr)
            print("\nReproduce with: python tools/check_book.py -v", file=sys.stderr)
            return 1
        print(f"Book check passed: {len(toc)} page(s) in the toc, {len(built)} built, no broken "
              f"reference, citation, directive or role ({elapsed:.1f} s).")
        return 0
    finally:
        if args.keep:
            print(f"build folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

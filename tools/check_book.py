#!/usr/bin/env python3
"""Validate the book offline: no broken cross-reference, citation, directive or role.

Runs Jupyter Book 2 (mystmd) in strict mode on a temporary copy of the project, with the site
template swapped for a local do-nothing one (tools/offline_site_template) so nothing is
downloaded. The real myst.yml is never modified.

    python tools/check_book.py            # exit 0 when the book is clean, 1 with a list of errors
    python tools/check_book.py --root DIR # check another copy of the project (used by the tests)
    LSGM_EDU_FAST=1 python tools/check_book.py --execute   # and run every notebook, as
                                          # `jupyter book build --execute` does for the website

Why not just `jupyter book build --site --strict`: offline it fails while fetching the theme;
and mystmd's strict summary forgets errors raised while a page is first parsed (an unknown
directive is printed as an error but the exit code stays 0), so every error line of the build
log counts here, not only the exit code.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def run_build(work: Path, timeout: float, execute: bool = False) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "jupyter_book", "build", "--site", "--strict"]
    env = dict(os.environ, NO_COLOR="1", FORCE_COLOR="0")
    if execute:
        cmd.append("--execute")
        env = execution_env(env, work / ".scratch")
    # Its own process group: mystmd leaves the Jupyter server it starts for --execute running
    # after the build, so the whole group is ended afterwards.
    proc = subprocess.Popen(
        cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, text=True, encoding="utf-8", errors="replace",
        start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        kill_group(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        rc = 124
        out = (out or "") + f"\n{ERROR_MARK} build timed out after {timeout:.0f} s"
    finally:
        kill_group(proc.pid, signal.SIGTERM)
    return rc, ANSI.sub("", out or "")


def kill_group(pgid: int, sig: int) -> None:
    """Signal every process left in the build's process group (SIGKILL after 10 s)."""
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=TOOLS.parent,
                        help="project root holding myst.yml (default: this repository)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary build folder and print its path")
    parser.add_argument("--execute", action="store_true",
                        help="also execute the notebooks as the website build does (slower; "
                             "set LSGM_EDU_FAST=1 for fast mode); a cell that raises fails")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds (default 900)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print the full build log")
    args = parser.parse_args(argv)
    root = args.root.resolve()

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

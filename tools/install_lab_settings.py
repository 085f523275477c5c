#!/usr/bin/env python3
"""Make JupyterLab open the book's MyST Markdown chapters as notebooks on double-click.

Merges tools/jupyterlab/overrides.json into <sys.prefix>/share/jupyter/lab/settings/
overrides.json of the Python that runs this script (the project's .venv), keeping any settings
already there. Run it with the environment's own Python after installing JupyterLab:

    .venv/bin/python tools/install_lab_settings.py          # install / update
    .venv/bin/python tools/install_lab_settings.py --check  # exit 1 if not installed
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "jupyterlab" / "overrides.json"


def target_path(prefix: str | os.PathLike = sys.prefix) -> Path:
    return Path(prefix) / "share" / "jupyter" / "lab" / "settings" / "overrides.json"


def merge(base: dict, extra: dict) -> dict:
    """Recursive dict merge; values from `extra` win."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def is_installed(target: Path, wanted: dict) -> bool:
    try:
        current = json.loads(target.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return merge(current, wanted) == current


def install(target: Path, wanted: dict) -> None:
    current: dict = {}
    if target.is_file():
        try:
            current = json.loads(target.read_text(encoding="utf-8") or "{}")
        except ValueError as err:
            raise SystemExit(f"install_lab_settings: {target} is not valid JSON ({err}); "
                             "fix or remove it and run again") from err
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".overrides.", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(merge(current, wanted), f, indent=2)
        f.write("\n")
    os.replace(tmp, target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefix", default=sys.prefix,
                        help="environment prefix (default: this Python's, %(default)s)")
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if missing")
    args = parser.parse_args(argv)
    wanted = json.loads(SOURCE.read_text(encoding="utf-8"))
    target = target_path(args.prefix)
    if args.check:
        ok = is_installed(target, wanted)
        print(f"{target}: {'installed' if ok else 'NOT installed'}")
        return 0 if ok else 1
    install(target, wanted)
    print(f"JupyterLab settings installed: {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Build the website: `jupyter book build --html --execute`, made to work from `make site`.

    python tools/build_site.py                 # _build/html (downloads the book theme once)
    python tools/build_site.py --site          # only the site content (_build/site; offline)
    python tools/build_site.py --no-execute    # without running the notebooks
    python tools/build_site.py -- --strict     # extra arguments for `jupyter book build`

What it adds to the plain command: each chapter's downloadable notebook is written first
(_build/notebooks/, tools/reader_notebook.py: citations in author-year form); the notebooks
are executed by a Jupyter server that mystmd starts with the first `python` on PATH, so this environment's bin folder goes first on
PATH; as root that server needs `allow_root` (set through a scratch JUPYTER_CONFIG_DIR); and
mystmd leaves that server running after the build (and the server starts each kernel in a
session of its own), so the build runs supervised (check_book.run_supervised): every process
it started is ended afterwards, on Ctrl-C and SIGTERM too. Exits with the build's status.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))
from check_book import execution_env, run_supervised, write_download_notebooks

REPO = TOOLS.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--site", action="store_true",
                        help="build the site content only (no theme download), not --html")
    parser.add_argument("--no-execute", action="store_true", help="do not run the notebooks")
    parser.add_argument("extra", nargs="*", help="more arguments for `jupyter book build`")
    args = parser.parse_args(argv)

    cmd = [sys.executable, "-m", "jupyter_book", "build", "--site" if args.site else "--html"]
    env = dict(os.environ)
    if not args.no_execute:
        cmd.append("--execute")
        env = execution_env(env, REPO / ".build")
    cmd += args.extra
    write_download_notebooks(REPO)  # _build/notebooks/: each chapter's `downloads`
    print("+", " ".join(cmd[1:]), flush=True)
    try:
        return run_supervised(cmd, REPO, env, capture=False)[0]
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

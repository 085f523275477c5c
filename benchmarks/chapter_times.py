"""How long each chapter takes to run top to bottom, in default or fast mode.

    python benchmarks/chapter_times.py                     # default mode, every chapter
    python benchmarks/chapter_times.py --fast              # fast mode (LSGM_EDU_FAST=1)
    python benchmarks/chapter_times.py book/08_*.md        # some chapters (merged into the JSON)

Each chapter's reader's notebook (tools/reader_notebook.py) is executed by a fresh Jupyter
kernel (nbclient), one chapter at a time, the wall time from the first
cell to the last is recorded. Results go to benchmarks/results/chapter_times_<mode>_cpu.json,
merged with the chapters measured before (each with its own date and machine). The "Running
time" line at the top of each chapter quotes the default-mode number (tests/test_book.py checks
that they agree).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO / "benchmarks"))
import reader_notebook
from _common import machine, utc_now, write_results

CHAPTERS = sorted((REPO / "book").glob("[0-9][0-9]_*.md"))


def results_path(fast: bool, out: Path) -> Path:
    return out / f"chapter_times_{'fast' if fast else 'default'}_cpu.json"


def run_chapter(chapter: Path, fast: bool, timeout: float) -> float:
    """Seconds to execute the chapter's notebook top to bottom in a fresh kernel."""
    import nbclient

    nb = reader_notebook.reader_notebook(chapter, reader_notebook.Bibliography())
    env = dict(os.environ, LSGM_EDU_FAST="1" if fast else "0")
    # the chapter's relative paths (images/) resolve from book/, as in JupyterLab
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                     resources={"metadata": {"path": str(chapter.parent)}})
    start = time.perf_counter()
    client.execute(env=env)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("chapters", nargs="*", type=Path, default=CHAPTERS)
    parser.add_argument("--fast", action="store_true", help="fast mode (LSGM_EDU_FAST=1)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per cell")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    path = results_path(args.fast, args.out)
    report = json.loads(path.read_text()) if path.is_file() else {}
    report.update(
        what="wall seconds to run each chapter top to bottom in a fresh kernel "
             "(benchmarks/chapter_times.py)",
        mode="fast (LSGM_EDU_FAST=1)" if args.fast else "default",
    )
    chapters = report.setdefault("chapters", {})
    torch.set_num_threads(min(2, torch.get_num_threads()))
    for chapter in args.chapters:
        chapter = chapter.resolve()
        seconds = run_chapter(chapter, args.fast, args.timeout)
        chapters[chapter.relative_to(REPO).as_posix()] = {
            "seconds": round(seconds, 1), "date": utc_now(), "machine": machine("cpu")}
        print(f"{chapter.name}: {seconds:.1f} s", flush=True)
        report["chapters"] = dict(sorted(chapters.items()))
        write_results(report, path)  # after each chapter: a long run keeps what it measured
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

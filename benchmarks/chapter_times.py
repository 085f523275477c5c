"""How long each chapter takes to run top to bottom, in default or fast mode.

    python benchmarks/chapter_times.py                     # default mode, every chapter
    python benchmarks/chapter_times.py --fast              # fast mode (LSGM_EDU_FAST=1)
    python benchmarks/chapter_times.py book/08_*.md        # some chapters (merged into the JSON)
    python benchmarks/chapter_times.py --save DIR          # also keep the executed notebooks
    python benchmarks/chapter_times.py --write-chapters    # only rewrite the chapters' lines

Each chapter's reader's notebook (tools/reader_notebook.py) is executed by a fresh Jupyter
kernel (nbclient), one chapter at a time, the wall time from the first
cell to the last is recorded. Results go to benchmarks/results/chapter_times_<mode>_cpu.json,
merged with the chapters measured before (each with its own date and machine). The "Running
time" line under each chapter's title quotes both results (`running_time_line`;
tests/test_book.py checks that every chapter's line is the one the JSON gives).
"""

from __future__ import annotations

import argparse
import json
import os
import re
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


RUNNING_TIME = re.compile(r"^\*\*Running time\.\*\*.*$", re.MULTILINE)


def minutes(seconds: float) -> str:
    return "Under a minute" if seconds < 60 else f"About {round(seconds / 60)} min"


def running_time_line(default_s: float, fast_s: float) -> str:
    """The line under a chapter's title that says how long it runs (both modes, this JSON)."""
    return (f"**Running time.** {minutes(default_s)} in the default mode on two CPU cores; "
            f"{round(fast_s)} s in fast mode (`LSGM_EDU_FAST=1`, what the tests run). "
            "Measured with `benchmarks/chapter_times.py`.")


def measured_seconds(out: Path = REPO / "benchmarks" / "results") -> dict[str, tuple[float, float]]:
    """{chapter path: (default seconds, fast seconds)} for every chapter measured in both modes."""
    paths = [results_path(fast, out) for fast in (False, True)]
    modes = [json.loads(p.read_text())["chapters"] if p.is_file() else {} for p in paths]
    return {name: (modes[0][name]["seconds"], modes[1][name]["seconds"])
            for name in modes[0] if name in modes[1]}


def with_running_time(text: str, line: str) -> str:
    """The chapter's text with `line` under its title (replacing the line there before)."""
    if RUNNING_TIME.search(text):
        return RUNNING_TIME.sub(line, text, count=1)
    title = re.search(r"^# .*\n", text, re.MULTILINE)
    if title is None:
        raise ValueError("the chapter has no '# Title' line to put its running time under")
    return f"{text[:title.end()]}\n{line}\n{text[title.end():]}"


def write_chapters(out: Path = REPO / "benchmarks" / "results") -> None:
    """Write each measured chapter's running-time line from the two JSONs."""
    for name, (default_s, fast_s) in measured_seconds(out).items():
        path = REPO / name
        text = path.read_text()
        new = with_running_time(text, running_time_line(default_s, fast_s))
        if new != text:
            path.write_text(new)
            print(f"updated {name}")


def run_chapter(chapter: Path, fast: bool, timeout: float, save: Path | None = None) -> float:
    """Seconds to execute the chapter's notebook top to bottom in a fresh kernel; with `save`,
    the executed notebook is written there (to read the numbers the chapter quotes)."""
    import nbclient

    nb = reader_notebook.reader_notebook(chapter, reader_notebook.Bibliography())
    env = dict(os.environ, LSGM_EDU_FAST="1" if fast else "0")
    # the chapter's relative paths (images/) resolve from book/, as in JupyterLab
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                     resources={"metadata": {"path": str(chapter.parent)}})
    start = time.perf_counter()
    client.execute(env=env)
    seconds = time.perf_counter() - start
    if save is not None:
        import nbformat

        save.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, save / f"{chapter.stem}.ipynb")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("chapters", nargs="*", type=Path, default=CHAPTERS)
    parser.add_argument("--fast", action="store_true", help="fast mode (LSGM_EDU_FAST=1)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per cell")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--save", type=Path, help="folder for the executed notebooks")
    parser.add_argument("--write-chapters", action="store_true",
                        help="only write each chapter's running-time line from the JSONs")
    args = parser.parse_args(argv)
    if args.write_chapters:
        write_chapters(args.out)
        return 0
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
        load_before = os.getloadavg()[0]
        seconds = run_chapter(chapter, args.fast, args.timeout, args.save)
        # the 1-minute load average before and after: above ~2 on two cores, something else ran
        load = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        chapters[chapter.relative_to(REPO).as_posix()] = {
            "seconds": round(seconds, 1), "date": utc_now(), "machine": machine("cpu"),
            "load_average_1min": load}
        print(f"{chapter.name}: {seconds:.1f} s", flush=True)
        report["chapters"] = dict(sorted(chapters.items()))
        write_results(report, path)  # after each chapter: a long run keeps what it measured
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

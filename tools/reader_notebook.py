#!/usr/bin/env python3
"""The chapters as readers open them in JupyterLab: notebooks with the citations rendered.

jupyterlab-myst renders MyST in JupyterLab but does not read BibTeX, so a `{cite:t}` role shows
as its raw key there. `make notebooks` (and `make lab`) therefore writes each chapter
book/NN_name.md as the notebook book/NN_name.ipynb with every citation written out in
author-year form, linked to the paper, and a "References" list of the chapter's citations at
its end, formatted by pybtex from book/references.bib. The website keeps mystmd's own
bibliography. The .md stays the source: the .ipynb is not paired with it, so a reader's saved
notebook never rewrites the chapter.

    python tools/reader_notebook.py book/[0-9]*.md                 # book/NN_name.ipynb
    python tools/reader_notebook.py --out .build/notebooks book/[0-9]*.md

An existing notebook keeps the outputs of every cell whose code is unchanged. Notebooks are
written atomically.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIBLIOGRAPHY = REPO / "book" / "references.bib"

# {cite}`a`, {cite:p}`a,b`, {cite:t}`a`: mystmd's citation roles
CITE = re.compile(r"\{cite(?::(?P<kind>[pt]))?\}`(?P<keys>[^`]+)`")
REFERENCES_HEADING = "## References"


class CitationError(ValueError):
    """A citation key that the bibliography does not hold."""


def _plain(latex: str) -> str:
    from pybtex.richtext import Text

    return Text.from_latex(latex).render_as("text")


def _surname(person) -> str:
    return _plain(" ".join(person.prelast_names + person.last_names))


def author_year(entry) -> tuple[str, str]:
    """("Song et al.", "2021"): the names and year of an author-year citation (APA style, as
    the website shows them: one or two surnames, else the first and "et al.")."""
    people = entry.persons.get("author") or entry.persons.get("editor") or []
    names = [_surname(p) for p in people]
    if not names:
        who = _plain(entry.fields.get("title", "Anonymous"))
    elif len(names) == 1:
        who = names[0]
    elif len(names) == 2:
        who = f"{names[0]} & {names[1]}"
    else:
        who = f"{names[0]} et al."
    return who, entry.fields.get("year", "n.d.")


class Bibliography:
    """The entries of a .bib file, with their author-year labels (2020a, 2020b when two
    entries would read the same) and links."""

    def __init__(self, path: Path | None = BIBLIOGRAPHY):
        """`path` None: no entries (a project without a bibliography)."""
        from pybtex.database import BibliographyData, parse_file

        self.path = None if path is None else Path(path)
        self.data = BibliographyData() if path is None else parse_file(str(self.path))
        labels = {key: author_year(e) for key, e in self.data.entries.items()}
        same: dict[tuple[str, str], list[str]] = {}
        for key, label in labels.items():
            same.setdefault(label, []).append(key)
        self.labels = dict(labels)
        for label, keys in same.items():
            if len(keys) > 1:
                for suffix, key in zip("abcdefghijklmnopqrstuvwxyz", sorted(keys)):
                    self.labels[key] = (label[0], label[1] + suffix)

    def link(self, key: str) -> str:
        fields = self.data.entries[key].fields
        if "doi" in fields:
            return "https://doi.org/" + fields["doi"]
        if "url" in fields:
            return fields["url"]
        if fields.get("archiveprefix", "").lower() == "arxiv" and "eprint" in fields:
            return "https://arxiv.org/abs/" + fields["eprint"]
        return ""

    def check(self, keys: list[str], where: str) -> None:
        unknown = [k for k in keys if k not in self.data.entries]
        if unknown:
            raise CitationError(f"{where}: unknown citation key(s) {', '.join(unknown)}; add them "
                                f"to {self.path or 'a bibliography'} or fix the spelling")


def _linked(text: str, url: str) -> str:
    return f"[{text}]({url})" if url else text


def render_citations(markdown: str, bib: Bibliography, where: str = "") -> tuple[str, list[str]]:
    """The markdown with each citation role written out: {cite:t} as "Song et al. (2021)",
    {cite:p} (and {cite}) as "(Song et al., 2021; Ho et al., 2020)"; and the keys it cites."""
    cited: list[str] = []

    def one(m: re.Match) -> str:
        keys = [k.strip() for k in m["keys"].split(",") if k.strip()]
        bib.check(keys, where)
        cited.extend(k for k in keys if k not in cited)
        if m["kind"] == "t":
            return ", ".join(_linked(f"{bib.labels[k][0]} ({bib.labels[k][1]})", bib.link(k))
                             for k in keys)
        return "(" + "; ".join(_linked(f"{bib.labels[k][0]}, {bib.labels[k][1]}", bib.link(k))
                               for k in keys) + ")"

    return CITE.sub(one, markdown), cited


def reference_list(keys: list[str], bib: Bibliography) -> str:
    """A "References" section: the cited entries formatted by pybtex, sorted by author-year."""
    from pybtex.plugin import find_plugin

    style = find_plugin("pybtex.style.formatting", "plain")(label_style="alpha")
    ordered = sorted(keys, key=lambda k: (bib.labels[k][0].lower(), bib.labels[k][1]))
    formatted = {e.key: e.text.render_as("markdown")
                 for e in style.format_entries(bib.data.entries[k] for k in ordered)}
    lines = [REFERENCES_HEADING, "",
             "The works this chapter cites (the website lists them with abstracts).", ""]
    lines += [f"- {' '.join(formatted[k].split())}" for k in ordered]
    return "\n".join(lines)


def reader_notebook(chapter: Path, bib: Bibliography):
    """The chapter as a notebook (jupytext), citations rendered, References appended, and no
    pairing with the .md (so saving it never rewrites the chapter)."""
    import jupytext
    import nbformat

    nb = jupytext.read(chapter)
    cited: list[str] = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown":
            cell.source, keys = render_citations(cell.source, bib, f"{chapter} cell {i}")
            cited.extend(k for k in keys if k not in cited)
    if cited:
        nb.cells.append(nbformat.v4.new_markdown_cell(reference_list(cited, bib)))
    nb.metadata.pop("jupytext", None)
    return nb


def keep_outputs(nb, old):
    """`nb` with the outputs of `old` attached to each code cell whose source is unchanged."""
    saved: dict[str, list] = {}
    for cell in old.cells:
        if cell.cell_type == "code" and cell.get("outputs"):
            saved.setdefault(cell.source, []).append(cell)
    for cell in nb.cells:
        if cell.cell_type == "code" and saved.get(cell.source):
            done = saved[cell.source].pop(0)
            cell.outputs = done.outputs
            cell.execution_count = done.get("execution_count")
    return nb


def write_notebook(nb, path: Path) -> None:
    """Write atomically: a reader never finds half a notebook."""
    import nbformat

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".ipynb.tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            nbformat.write(nb, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build(chapters: list[Path], out: Path | None, bib: Bibliography) -> list[Path]:
    import nbformat

    written = []
    for chapter in chapters:
        path = (out or chapter.parent) / f"{chapter.stem}.ipynb"
        nb = reader_notebook(chapter, bib)
        if path.is_file():
            try:
                nb = keep_outputs(nb, nbformat.read(path, as_version=4))
            except (OSError, ValueError) as err:
                print(f"{path}: unreadable ({err}); writing it afresh without outputs",
                      file=sys.stderr)
        write_notebook(nb, path)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("chapters", nargs="+", type=Path, help="MyST chapters (book/NN_*.md)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the notebooks (default: beside each chapter)")
    parser.add_argument("--bib", type=Path, default=BIBLIOGRAPHY)
    args = parser.parse_args(argv)
    missing = [str(c) for c in args.chapters if not c.is_file()]
    if missing:
        parser.error(f"no such chapter: {', '.join(missing)}")
    try:
        build(args.chapters, args.out, Bibliography(args.bib))
    except CitationError as err:
        print(f"reader_notebook: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

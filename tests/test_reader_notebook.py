"""tools/reader_notebook.py: the chapters as readers open them in JupyterLab, with the
citations written out in author-year form and a References list (jupyterlab-myst cannot read
references.bib)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
from reader_notebook import (
    CITE,
    REFERENCES_HEADING,
    Bibliography,
    CitationError,
    author_year,
    build,
    reader_notebook,
    render_citations,
)

CHAPTERS = sorted((REPO / "book").glob("[0-9][0-9]_*.md"))

BIB = r"""
@article{solo2001,
  author = {Hyv{\"a}rinen, Aapo},
  title = {One Author},
  journal = {J},
  year = {2001},
  url = {https://example.org/solo}
}
@article{pair2002,
  author = {Song, Yang and Ermon, Stefano},
  title = {Two Authors},
  journal = {J},
  year = {2002},
  doi = {10.1000/pair}
}
@article{many2003a,
  author = {Ho, Jonathan and Jain, Ajay and Abbeel, Pieter},
  title = {Three Authors, First},
  journal = {J},
  year = {2003},
  eprint = {2006.11239},
  archivePrefix = {arXiv}
}
@article{many2003b,
  author = {Ho, Jonathan and Salimans, Tim and Gritsenko, Alexey},
  title = {Three Authors, Second},
  journal = {J},
  year = {2003}
}
"""


@pytest.fixture(scope="module")
def bib(tmp_path_factory) -> Bibliography:
    path = tmp_path_factory.mktemp("bib") / "refs.bib"
    path.write_text(BIB)
    return Bibliography(path)


def test_author_year_labels(bib):
    """One surname, two joined by "&", three or more as "et al."; LaTeX accents decoded; the
    same names and year told apart by a, b in key order."""
    assert author_year(bib.data.entries["solo2001"]) == ("Hyvärinen", "2001")
    assert bib.labels["pair2002"] == ("Song & Ermon", "2002")
    assert bib.labels["many2003a"] == ("Ho et al.", "2003a")
    assert bib.labels["many2003b"] == ("Ho et al.", "2003b")


def test_links_prefer_doi_then_url_then_arxiv(bib):
    assert bib.link("pair2002") == "https://doi.org/10.1000/pair"
    assert bib.link("solo2001") == "https://example.org/solo"
    assert bib.link("many2003a") == "https://arxiv.org/abs/2006.11239"
    assert bib.link("many2003b") == ""


def test_render_citations_textual_and_parenthetical(bib):
    text, keys = render_citations(
        "As {cite:t}`pair2002` show, and others {cite:p}`solo2001, many2003a` and "
        "{cite}`many2003b` agree; {cite:t}`pair2002` again.", bib)
    assert text == (
        "As [Song & Ermon (2002)](https://doi.org/10.1000/pair) show, and others "
        "([Hyvärinen, 2001](https://example.org/solo); "
        "[Ho et al., 2003a](https://arxiv.org/abs/2006.11239)) and (Ho et al., 2003b) agree; "
        "[Song & Ermon (2002)](https://doi.org/10.1000/pair) again.")
    assert keys == ["pair2002", "solo2001", "many2003a", "many2003b"]


def test_unknown_key_is_a_clear_error(bib):
    with pytest.raises(CitationError, match=r"ch\.md cell 3: unknown citation key\(s\) nope"):
        render_citations("see {cite:p}`solo2001,nope`", bib, "ch.md cell 3")


def _chapter(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "01_demo.md"
    path.write_text("---\njupytext:\n  text_representation:\n    extension: .md\n"
                    "    format_name: myst\nkernelspec:\n  display_name: Python 3\n"
                    "  language: python\n  name: python3\n---\n\n" + body)
    return path


def test_reader_notebook_lists_the_cited_works_once(tmp_path, bib):
    chapter = _chapter(tmp_path, "# Demo\n\nFirst {cite:t}`pair2002`.\n\n```{code-cell} ipython3"
                                 "\nx = 1\n```\n\nThen {cite:p}`many2003a,pair2002`.\n")
    nb = reader_notebook(chapter, bib)
    assert "jupytext" not in nb.metadata  # not paired: saving it never rewrites the chapter
    refs = nb.cells[-1]
    assert refs.cell_type == "markdown" and refs.source.startswith(REFERENCES_HEADING)
    items = [line for line in refs.source.splitlines() if line.startswith("- ")]
    assert len(items) == 2  # the two cited works, each once, by author then year
    assert "Jonathan Ho" in items[0] and "Yang Song" in items[1]
    assert not any(CITE.search(c.source) for c in nb.cells if c.cell_type == "markdown")
    nbformat.validate(nb)


def test_build_keeps_outputs_of_unchanged_cells(tmp_path, bib):
    chapter = _chapter(tmp_path, "# Demo\n\n```{code-cell} ipython3\nx = 1\n```\n\n"
                                 "```{code-cell} ipython3\nprint(x)\n```\n")
    (path,) = build([chapter], tmp_path / "out", bib)
    nb = nbformat.read(path, as_version=4)
    nb.cells[2].outputs = [nbformat.v4.new_output("stream", name="stdout", text="1\n")]
    nb.cells[2].execution_count = 2
    nbformat.write(nb, path)
    # the chapter changes its first cell: the second keeps its output, the first has none
    chapter.write_text(chapter.read_text().replace("x = 1", "x = 2"))
    build([chapter], tmp_path / "out", bib)
    again = nbformat.read(path, as_version=4)
    code = [c for c in again.cells if c.cell_type == "code"]
    assert code[0].source == "x = 2" and code[0].outputs == []
    assert code[1].outputs[0]["text"] == "1\n" and code[1].execution_count == 2
    assert not list((tmp_path / "out").glob(".*tmp"))  # written atomically


def test_every_chapter_reads_author_year(tmp_path):
    """The real book: every citation of every chapter is written out, and each chapter that
    cites ends with its References list."""
    bib = Bibliography()
    for path in build(CHAPTERS, tmp_path, bib):
        nb = nbformat.read(path, as_version=4)
        chapter = REPO / "book" / f"{path.stem}.md"
        cites = CITE.search(chapter.read_text())
        left = [c.source for c in nb.cells if c.cell_type == "markdown"
                and re.search(r"\{cite", c.source)]
        assert not left, f"{path.name}: citation roles left: {left[:1]}"
        assert nb.cells[-1].source.startswith(REFERENCES_HEADING) == bool(cites), path.name

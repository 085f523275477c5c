"""The book and the package share one version, stated the same everywhere; the licence too."""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path

import yaml

import lsgm_edu

ROOT = Path(__file__).resolve().parents[1]


def test_one_version_for_package_citation_and_changelog():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    first_entry = re.search(r"^## (\S+) — (\d{4}-\d\d-\d\d)$",
                            (ROOT / "CHANGELOG.md").read_text(), re.MULTILINE)
    assert first_entry is not None
    assert cff["version"] == first_entry.group(1) == lsgm_edu.__version__ == version("lsgm_edu")
    assert str(cff["date-released"]) == first_entry.group(2)


def test_the_license_is_mit_wherever_it_is_stated():
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert yaml.safe_load((ROOT / "CITATION.cff").read_text())["license"] == "MIT"
    assert yaml.safe_load((ROOT / "myst.yml").read_text())["project"]["license"] == "MIT"
    assert 'license = "MIT"' in (ROOT / "pyproject.toml").read_text()


def test_the_readme_cites_the_current_version():
    readme = (ROOT / "README.md").read_text()
    assert f"version = {{{lsgm_edu.__version__}}}" in readme

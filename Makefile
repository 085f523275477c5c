# lsgm_edu: every target installs what it needs into a local virtual environment (.venv).
#   make lab    open the book in JupyterLab (chapters open as notebooks)
#   make test   unit tests, every chapter executed in fast mode, offline book validation
#   make site   build the website with Jupyter Book 2 (downloads its theme once: needs internet)
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
# torch is installed first so pip does not pick a build we did not ask for; pyproject only
# declares a range (torch>=2.4, torchvision>=0.19). The pair must match; override, e.g. on
# aarch64: make test TORCH_SPEC='torch==2.9.1 torchvision==0.24.1'
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.lsgm_edu-installed
BUILD := .build
CHAPTERS := $(sort $(wildcard book/[0-9][0-9]_*.md))
# JupyterLab refuses to run as root unless told; CI and containers run as root.
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)
LAB_ARGS ?=
PYTEST_ARGS ?=

.PHONY: help install lab notebooks test test-heavy check-book screenshots timing site bench gpu-check clean

help:
	@sed -n '2,5p' Makefile | sed 's/^# *//'

$(STAMP): pyproject.toml Makefile tools/jupyterlab/overrides.json
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[book,dev]"
	$(PY) tools/install_lab_settings.py
	touch $(STAMP)

install: $(STAMP)

# The chapters as readers open them: book/NN_slug.ipynb (git-ignored), citations written out in
# author-year form with a References list at the end (jupyterlab-myst cannot read
# references.bib), not paired with the .md (saving never rewrites a chapter). A notebook is
# rebuilt only when its chapter, the bibliography or the tool is newer, keeping the outputs of
# unchanged cells; a notebook the reader saved since is left as it is.
NOTEBOOKS := $(CHAPTERS:.md=.ipynb)
notebooks: $(NOTEBOOKS)

book/%.ipynb: book/%.md book/references.bib tools/reader_notebook.py | $(STAMP)
	$(PY) tools/reader_notebook.py $<

lab: notebooks
	$(BIN)/jupyter lab book/ --ip=127.0.0.1 $(ROOT_FLAG) $(LAB_ARGS)

# Chapters run as notebooks under nbval in fast mode, once each: per-notebook times go to
# $(BUILD)/notebook-durations.md, and each chapter whose cells all passed is saved with its
# outputs to $(BUILD)/executed/ (root conftest.py). The book tests marked `after_notebooks`
# run after the notebooks and use those saved outputs instead of executing the chapters again:
# the website check renders them (tools/check_book.py --outputs), and the browser check (one
# JupyterLab, one headless Chromium, tools/screenshot_book.py) opens every chapter as a notebook
# and renders it with them; only chapter 1 is run again, in the UI (Run All), with a timeout
# scaled to its time just measured, so a busy machine slows the check instead of failing it.
# pytest exits non-zero when it collects nothing.
test: $(STAMP)
	$(BIN)/ruff check lsgm_edu tests tools benchmarks conftest.py
	rm -rf $(BUILD)/notebooks
	$(PY) tools/reader_notebook.py --out $(BUILD)/notebooks $(CHAPTERS)
	LSGM_EDU_FAST=1 $(PY) -m pytest tests $(BUILD)/notebooks --nbval-lax -m "not heavy" \
	  --durations=15 $(PYTEST_ARGS)

# The paper-size models' forward and backward passes on the CPU (minutes each, ~10 GiB).
test-heavy: $(STAMP)
	$(PY) -m pytest tests -m heavy --durations=0 $(PYTEST_ARGS)

# Offline: broken cross-references, citations, directives or roles fail, and chapters missing
# from the toc or from book/index.md (tests run it too). With outputs from `make test`:
#   $(PY) tools/check_book.py --outputs $(BUILD)/executed
check-book: $(STAMP)
	$(PY) tools/check_book.py

# Each chapter opened in JupyterLab, run there (Run All) and screenshotted in headless Chromium
# (one server for all) into $(BUILD)/screenshots/. To render the outputs `make test` saved
# instead of running the chapters again:
#   $(PY) tools/screenshot_book.py --fast --outputs $(BUILD)/executed $(CHAPTERS)
screenshots: $(STAMP)
	LSGM_EDU_FAST=1 $(PY) tools/screenshot_book.py --fast $(CHAPTERS)

# A reader's Run All of every chapter in JupyterLab, fast mode, timed against the two-minute
# budget (a benchmark, minutes): prints the table, saves it with the machine to
# benchmarks/results/run_all_fast_cpu.json.
timing: $(STAMP)
	LSGM_EDU_FAST=1 $(PY) tools/screenshot_book.py --fast --max-shots 1 --timeout 600 \
	  --outdir $(BUILD)/timing --timings benchmarks/results/run_all_fast_cpu.json $(CHAPTERS)

# jupyter book build --html --execute, with the fixes in tools/build_site.py (allow-root, cleanup)
site: $(STAMP)
	$(PY) tools/build_site.py

# Every CPU benchmark with its defaults (gpu_check needs CUDA: `make gpu-check`).
bench: $(STAMP)
	@ls benchmarks/[a-z]*.py >/dev/null 2>&1 || { echo "no benchmarks yet"; exit 0; }
	for b in benchmarks/[a-z]*.py; do [ $$b = benchmarks/gpu_check.py ] || $(PY) $$b || exit 1; done

# On a CUDA machine: the gpu tests, training throughput (bf16, with and without torch.compile),
# a killed-and-resumed run and the samplers, into benchmarks/results/gpu_check_<device>.json.
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py

clean:
	rm -rf $(BUILD) _build book/_build book/*.ipynb

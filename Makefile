# Two entry points (see README.md):  make demo   |   make test
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sscflow-installed

.PHONY: setup demo test lint clean

$(STAMP): pyproject.toml deploy/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build
	$(PY) -m pip install --quiet torch==2.13.0
	# every other package at the versions in deploy/constraints.txt, as in the images
	$(PY) -m pip install --quiet -c deploy/constraints.txt -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/sscflow demo

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check sscflow tests benchmarks

clean:
	rm -rf $(VENV) demo .pytest_cache

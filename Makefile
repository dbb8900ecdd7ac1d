# mlscore_jax: every target installs what it needs into .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test lint format clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

test: install
	$(PY) -m pytest -q tests

lint: install
	$(VENV)/bin/ruff check mlscore_jax tests experiments configs
	$(VENV)/bin/ruff format --check mlscore_jax tests experiments configs

format: install
	$(VENV)/bin/ruff format mlscore_jax tests experiments configs
	$(VENV)/bin/ruff check --fix mlscore_jax tests experiments configs

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache

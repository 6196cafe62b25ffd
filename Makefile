# Quick start: `make demo` then `make test`. Both create/reuse .venv and install everything.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

$(STAMP): pyproject.toml setup.py Makefile $(wildcard src/sparsen/engine/kernels/*.c src/sparsen/engine/kernels/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: 2.13.0 is the CPU build available locally; a looser spec pulls a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	# headless Chromium for the report's browser test (Debian's package; needs root, as here and in CI)
	command -v chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } || \
		echo "warning: could not install chromium; tests/test_report.py needs it"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sparsen demo --out report

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf report profile eval.json .pytest_cache

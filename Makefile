# Quick start: `make demo` then `make test`. Both create/reuse .venv and install everything.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PEERS := $(VENV)/.peers

.PHONY: demo test lint clean peers

$(STAMP): pyproject.toml setup.py Makefile $(wildcard src/sparsen/engine/kernels/*.c src/sparsen/engine/kernels/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: 2.13.0 is the CPU build available locally; a looser spec pulls a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	# headless Chromium and its WebDriver for the browser tests (Debian's packages; need root, as here and in CI):
	# installed when either is missing
	{ command -v chromium && command -v chromedriver; } >/dev/null 2>&1 || \
		{ apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; } || \
		echo "warning: could not install chromium + chromium-driver; tests/test_report.py and tests/test_sae_dashboard.py need them"
	# the Python documentation (Debian's python3.11-doc): the training corpus of `sparsen experiment --full`
	test -d /usr/share/doc/python3.11/html || \
		{ apt-get update -qq && apt-get install -y -qq python3.11-doc >/dev/null; } || \
		echo "warning: could not install python3.11-doc; \`sparsen experiment --full\` trains on it"
	touch $(STAMP)

# llama.cpp, `sparsen bench`'s peer (no test uses it, so `make test` skips its ~5-minute build): llama-cpp-python
# rebuilt for this CPU's own extensions, without the AMX path that crashes on some of our machines, then checked in a
# child process (src/sparsen/engine/llamacpp_build.py; skipped once done)
$(PEERS): $(STAMP)
	$(PY) -m sparsen.engine.llamacpp_build || echo "warning: the llama.cpp build failed; \`sparsen bench --vs llamacpp\` will say so"
	touch $(PEERS)

peers: $(PEERS)

demo: $(STAMP) $(PEERS)
	$(VENV)/bin/sparsen demo --out report

test: $(STAMP)
	$(PY) -m pytest -q --durations=15

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf report profile eval.json .pytest_cache

# `make demo`, `make lint`, `make test` and `make bench` each set up what they need on a fresh machine, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: setup data browser demo lint test test-fast bench clean

# The demo needs vitlab's runtime dependencies only; the tests and benchmarks add the `dev` extra (timm,
# transformers, ...), which the demo would otherwise spend minutes installing.
$(VENV)/.runtime: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed: $(VENV)/.runtime
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

# Debian's Fashion-MNIST package; without root or apt, vitlab falls back to torchvision's download.
data:
	@if [ ! -d $(FMNIST) ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; fi

# Debian's Chromium and its WebDriver for the serve page's browser test; without root or apt, that test skips.
browser:
	@if ! command -v chromedriver >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && apt-get install -y -qq chromium chromium-driver; fi

demo: $(VENV)/.runtime data
	$(PY) -m vitlab demo --out runs/demo

lint: setup
	$(PY) -m ruff check src tests benchmarks

test: setup data browser
	$(PY) -m pytest -q

# Skips the tests marked `slow` (training runs, subprocesses, large models) for a quick check while editing.
test-fast: setup data
	$(PY) -m pytest -q -m "not slow"

# Throughput against timm and Hugging Face on identical weights, about 6 minutes on 2 idle cores in fp32, then
# the same rows under bf16 autocast on a CPU with bf16 units; prints a markdown table and writes JSON to
# benchmarks/results/.
bench: setup
	$(PY) benchmarks/throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache

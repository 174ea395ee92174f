# Set-up, demo, tests and benchmarks. `make demo` and `make test` are the README's Quick start.
PYTHON ?= python3
VENV ?= .venv
# On a machine without a GPU install a CPU build of torch (here torch==2.13.0 is a local CPU wheel;
# elsewhere add TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"). GPU users: see README.
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
PIP := $(VENV)/bin/python -m pip

.PHONY: setup demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/mrisynth demo

test: setup
	$(VENV)/bin/python -m pytest -q

# speed (~15 min), then quality (~40 min), then the downstream segmentation check on the quality
# run's predictions (~25 min), on a quiet 2-core CPU; each publishes its summary to docs/results/
# (work files stay in the git-ignored benchmarks/results/), then the trade-off figure.
bench: setup
	$(PIP) install -q -e ".[bench,onnx]"
	$(VENV)/bin/python benchmarks/speed.py --publish
	$(VENV)/bin/python benchmarks/quality.py --publish --out benchmarks/results/quality
	$(VENV)/bin/python benchmarks/downstream.py --quality-run benchmarks/results/quality --publish
	$(VENV)/bin/python benchmarks/plot_tradeoff.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache

# mamlkit: two commands for a reader (`make lab`, `make test`), a few more for maintainers.
# Everything runs inside .venv, created on first use from pyproject.toml (+ constraints.txt).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.mamlkit-installed

# Small models on small CPUs: one torch thread, and OpenMP threads that sleep instead of
# spin-waiting (2 spinning threads on 2 vCPUs were measured 10-30x slower). Override freely.
export OMP_NUM_THREADS ?= 1
export OMP_WAIT_POLICY ?= PASSIVE

# torch's CPU build (about 1 GB) rather than PyPI's default CUDA build on Linux (about 5 GB):
# PyTorch's CPU wheel index is added where it answers within 3 s; where it does not (CI, offline
# mirrors) pip's own indexes are used, quietly. Choose another build with, e.g.,
# `make TORCH_INDEX=https://download.pytorch.org/whl/cu126`, or `make TORCH_INDEX=` for PyPI's.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_INDEX_FLAG = $(if $(TORCH_INDEX),$(shell $(PYTHON) -c "import urllib.request; urllib.request.urlopen('$(TORCH_INDEX)', timeout=3)" >/dev/null 2>&1 && echo --extra-index-url $(TORCH_INDEX)))

# JupyterLab refuses to start as root (containers, CI boxes) unless told it may.
LAB_FLAGS ?= $(if $(filter 0,$(shell id -u)),--allow-root)

# Headless runs (tests, re-execution, the book) skip the live slider cells: each has a static twin,
# and a widget cell can block a headless kernel client (jupyter/nbclient#312).
HEADLESS := MAMLKIT_HEADLESS=1
CELL_TIMEOUT ?= 300

.PHONY: install lab test test-compiled notebooks verify lint bench reproduce book book-check clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@echo "First run: creating $(VENV) and installing mamlkit with torch 2.13.0 (CPU build), JupyterLab"
	@echo "and the test tools from pyproject.toml + constraints.txt (a few minutes, about 1 GB; once)."
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_INDEX_FLAG) -c constraints.txt -e '.[dev]'
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

## lab: open JupyterLab on the notebooks (the main job: read and run them)
lab: install
	$(BIN)/jupyter lab notebooks/ $(LAB_FLAGS)

## test: unit tests, doctests and every notebook under nbval (quick mode), on two processes
test: install
	$(HEADLESS) MAMLKIT_QUICK=1 $(BIN)/python -m pytest -n 2 --dist loadfile --nbval-cell-timeout=$(CELL_TIMEOUT)

## test-compiled: every method on both compiled backends against the per-task engines (slow: cold compiles)
test-compiled: install
	$(BIN)/python -m pytest -m slow tests/test_compiled.py

## notebooks: re-execute every notebook in place, headless (regenerates committed outputs)
notebooks: install
	$(HEADLESS) $(BIN)/jupyter nbconvert --to notebook --execute --inplace \
		--ExecutePreprocessor.timeout=$(CELL_TIMEOUT) notebooks/*.ipynb

## verify: the derivations' identities and each family of code they rely on (38 checks, seconds)
verify: install
	$(BIN)/python -m mamlkit verify

## bench: the meta-gradient beside compiled torch.func, JAX, higher, torchopt; the conv net; ranks; long inner loops (writes benchmarks/results/)
bench: install
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[bench]'
	$(BIN)/python benchmarks/bench_meta.py
	$(BIN)/python benchmarks/bench_conv.py
	$(BIN)/python benchmarks/bench_distributed.py
	$(BIN)/python benchmarks/bench_long_loops.py
	$(BIN)/python benchmarks/bench_threads.py

## reproduce: the MAML paper's sinusoid experiment, all methods (writes results/sinusoid/)
reproduce: install
	$(BIN)/python -m mamlkit reproduce sinusoid

## book: an offline HTML book of the notebooks from their stored outputs (installs the `book` extra)
book: install
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[book]'
	$(BIN)/jupyter-book build . --config book/_config.yml --toc book/_toc.yml --path-output book --warningiserror --quiet
	@echo "$(CURDIR)/book/_build/html/index.html"

## book-check: open every page in headless Chromium (Debian: apt-get install chromium), offline
book-check: book
	$(BIN)/python book/check_book.py book/_build/html

## lint: ruff (rules and formatting, 100 columns) on the package, tests, benchmarks and the book check
lint: install
	$(BIN)/ruff check mamlkit tests benchmarks book
	$(BIN)/ruff format --check mamlkit tests benchmarks book

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info book/_build

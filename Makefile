# Every command a user needs; `make help` lists them. The first use of any
# target creates .venv and installs the project from pyproject.toml.
# PYTHON=/path/to/python uses that interpreter instead of creating .venv.
# ARGS="..." passes Hydra overrides through, e.g. make train ARGS="model.weights=null".

SHELL := /bin/bash
PYTHON ?=
ARGS ?=
TESTS ?= tests
PORT ?= 6006
MLFLOW_PORT ?= 5000

ifeq ($(strip $(PYTHON)),)
PY := .venv/bin/python
STAMP := .venv/.installed
else
PY := $(PYTHON)
STAMP := .make/installed-$(subst /,_,$(PYTHON))
endif

.DEFAULT_GOAL := help
.PHONY: help setup train lint test test-fast bench tensorboard mlflow-ui clean-runs

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
ifeq ($(strip $(PYTHON)),)
	python3 -m venv .venv
endif
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,mlflow]'
	@mkdir -p $(dir $@) && touch $@

setup: $(STAMP) ## create .venv and install the project (train and test do this themselves)

train: $(STAMP) ## train (writes sample data into data/ if it has no images); ARGS="overrides"
	$(PY) -m pipeline $(ARGS)

lint: $(STAMP) ## ruff (lint and format check) and mypy, as CI runs them; settings in pyproject.toml
	$(PY) -m ruff check pipeline tests
	$(PY) -m ruff format --check pipeline tests
	$(PY) -m mypy

# Two test processes: half of an end-to-end test is single-threaded start-up and
# tracing, so one process leaves a core idle (timings: docs/speed.md).
# Whole files go to one process so module fixtures (one training run each) run once.
# --no-loadscope-reorder: hand the files out in collection order, longest first
# (tests/conftest.py), not xdist's order by number of tests, which left the kill
# campaign (two tests, 4 minutes) running alone at the end.
JOBS ?= 2

test: $(STAMP) ## run the whole test suite (unit + end-to-end); TESTS=path narrows it, JOBS=1 runs it in one process
	$(PY) -m pytest -n $(JOBS) --dist loadfile --no-loadscope-reorder $(TESTS)

test-fast: $(STAMP) ## the quick check: everything but the end-to-end tests (marked e2e); TESTS=, JOBS= as for test
	$(PY) -m pytest -n $(JOBS) --dist loadfile --no-loadscope-reorder -m "not e2e" $(TESTS)

bench: $(STAMP) ## pipeline vs the classic recipe, and where the time goes (not a test); ARGS=--quick
	$(PY) -m pipeline.bench $(ARGS)

tensorboard: $(STAMP) ## TensorBoard over outputs/ and multirun/ on localhost:6006 (PORT=...); installs it once
	@$(PY) -c "import tensorboard" 2>/dev/null || $(PY) -m pip install --quiet -e '.[tensorboard]'
	@mkdir -p outputs multirun
	$(PY) -m tensorboard.main --logdir_spec outputs:outputs,multirun:multirun --host localhost --port $(PORT)

mlflow-ui: $(STAMP) ## the MLflow UI over the local store (logger=mlflow's default, mlruns.db) on localhost:5000 (MLFLOW_PORT=...)
	$(PY) -m mlflow ui --backend-store-uri sqlite:///mlruns.db --host 127.0.0.1 --port $(MLFLOW_PORT)

clean-runs: ## delete outputs/ and multirun/ (Hydra's logs); never touches ckpt/, model/ or data/
	rm -rf outputs multirun

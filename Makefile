# The two commands of the README: `make run` and `make test`. Both set up what they need.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
RUN_STAMP  := $(VENV)/.run-installed
TEST_STAMP := $(VENV)/.test-installed

.PHONY: run test lint typecheck pytest install migrate simulate load bench soak clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "agentserve needs Python >= 3.11 (set PYTHON=python3.11)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(RUN_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	@touch $@

$(TEST_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $@ $(RUN_STAMP)

install: $(RUN_STAMP)

## make run: start the service on http://127.0.0.1:8000 (SQLite, in-process cache, simulator)
run: $(RUN_STAMP)
	$(BIN)/agentserve serve

## make test: ruff, mypy and the whole pytest suite
test: lint typecheck pytest

lint: $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(TEST_STAMP)
	$(BIN)/mypy

pytest: $(TEST_STAMP)
	$(BIN)/pytest

## make load: load test: LLM simulator upstream + service + locust (LOAD_USERS, LOAD_DURATION, ...)
load: $(TEST_STAMP)
	VENV=$(VENV) bash scripts/load.sh

## make bench: wrk against a bare app, the I/O floor and the service (< 5 min); make soak: 5 min
bench: $(TEST_STAMP)
	$(BIN)/python bench/run.py

soak: $(TEST_STAMP)
	$(BIN)/python bench/soak.py

migrate: $(RUN_STAMP)
	$(BIN)/agentserve migrate

simulate: $(RUN_STAMP)
	$(BIN)/agentserve simulate --port 9100

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache

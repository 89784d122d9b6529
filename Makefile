# The two commands of the README: `make run` and `make test`. Both install what they need
# from uv.lock (through uv, itself installed from PyPI into .tools/), so every machine runs
# the versions that were tested.
PYTHON     ?= python3
UV_VERSION := 0.13.9
TOOLS      := .tools
UV         := $(TOOLS)/bin/uv
BIN        := .venv/bin

# uv uses this interpreter for .venv and never downloads one of its own.
export UV_PYTHON := $(PYTHON)
export UV_PYTHON_DOWNLOADS := never

.PHONY: run test lint typecheck layers pytest sync sync-run lock migrate simulate load bench soak wheel clean

$(UV):
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "agentserve needs Python >= 3.11 (set PYTHON=python3.11)")'
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet --disable-pip-version-check "uv==$(UV_VERSION)"

## the runtime dependencies only (what `make run` needs)
sync-run: $(UV)
	$(UV) sync --locked --no-dev --inexact

## everything, dev tools included; fails when pyproject.toml and uv.lock disagree
sync: $(UV)
	$(UV) sync --locked

## make lock: upgrade every locked dependency within pyproject.toml's ranges
lock: $(UV)
	$(UV) lock --upgrade

## make run: start the service on http://127.0.0.1:8000 (SQLite, in-process cache, simulator)
run: sync-run
	$(BIN)/agentserve serve

## make test: ruff, mypy, the layer contract and the whole pytest suite
test: lint typecheck layers pytest

lint: sync
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: sync
	$(BIN)/mypy

layers: sync
	$(BIN)/lint-imports

pytest: sync
	$(BIN)/pytest

## make wheel: build the distribution into dist/
wheel: $(UV)
	$(UV) build --wheel --out-dir dist

## make load: load test: LLM simulator upstream + service + locust (LOAD_USERS, LOAD_DURATION, ...)
load: sync
	VENV=.venv bash scripts/load.sh

## make bench: wrk against a bare app, the I/O floor and the service (< 5 min); make soak: 5 min
bench: sync
	$(BIN)/python bench/run.py

soak: sync
	$(BIN)/python bench/soak.py

migrate: sync-run
	$(BIN)/agentserve migrate

simulate: sync-run
	$(BIN)/agentserve simulate --port 9100

clean:
	rm -rf .venv $(TOOLS) var dist .mypy_cache .ruff_cache .pytest_cache

# Vesalius: `make demo` and `make test` create .venv (Python 3.11, pip) when it is missing.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1

.PHONY: demo test test-fast bench venv clean

$(BIN)/vesalius: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch is pinned to the CPU build that pip finds locally; never leave it unpinned.
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(BIN)/vesalius

venv: $(BIN)/vesalius

demo: $(BIN)/vesalius
	$(BIN)/vesalius demo --out vesalius-demo

test: $(BIN)/vesalius
	$(BIN)/python -m pytest -q --durations=30

test-fast: $(BIN)/vesalius
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(BIN)/vesalius
	$(BIN)/python bench/dp_overhead.py --modes registered,hooks --threads 1

clean:
	rm -rf vesalius-demo vesalius-out .pytest_cache

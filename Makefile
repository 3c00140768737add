# busfed: `make demo` and `make test` work from a fresh clone; both create .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-fast lint bench clean

venv: $(STAMP)

# One pip command for everything: flwr pins protobuf, cryptography and fastapi tightly, and
# torch===2.13.0 must come from the registry (its torchvision does not load with the local
# +cpu wheel).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/busfed demo --out out/demo --replace

# Two workers: the federation tests (one xdist group, tests/conftest.py) run one after
# another on one, mostly waiting on heartbeats and timeouts; the rest run on the other.
test: $(STAMP)
	$(BIN)/python -m pytest -q -ra -n 2 --dist loadgroup

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -ra -m "not e2e"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python benchmarks/dp_step.py
	$(BIN)/python benchmarks/round_time.py

clean:
	rm -rf out .pytest_cache .mypy_cache .ruff_cache

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
# pip's own lines (Collecting, Downloading with a bar, Installing) are the progress; the
# venv is about 6 GB, 2.7 GB of it the CUDA libraries torch 2.13.0 from PyPI depends on
# (a CPU-only torch with a torchvision that loads beside it does not resolve from PyPI on
# x86_64: README, "Installing").
$(STAMP): pyproject.toml
	@echo "busfed: creating $(VENV): torch, torchvision, Flower, MLflow, Opacus, PyAV and the"
	@echo "dev tools, about 6 GB; usually 5-10 minutes (longer on a busy machine)."
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install --progress-bar on -e ".[dev]"
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

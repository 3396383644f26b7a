# Two commands set everything up from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# CPU build of torch by default; on a GPU machine: make install TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>"
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test test-fast lint typecheck pytest demo clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install $(TORCH_SPEC)
	$(PY) -m pip install -e '.[test]'
	touch $@

install: $(VENV)/.installed

lint: install
	$(VENV)/bin/ruff check orchestrator jobs bench tests
	$(VENV)/bin/ruff format --check orchestrator jobs bench tests

typecheck: install
	$(VENV)/bin/mypy

pytest: install
	$(PY) -m pytest

test: lint typecheck pytest

# The unit tier only (no Ray, no gloo, no servers, no subprocesses): about a minute.
# Tiers: unit, dist, ray, e2e (pyproject.toml); e.g. `.venv/bin/python -m pytest -m dist`.
test-fast: install
	$(PY) -m pytest -m "unit and not slow" -q

# make demo STORE=s3: data, checkpoints and report on an embedded S3 server (SeaweedFS).
STORE ?= local
DEMO_FLAGS := $(if $(filter s3,$(STORE)),--object-store,)

demo: install
	$(PY) -m jobs.demo $(DEMO_FLAGS)

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache

# Two commands on a fresh machine: `make serve` (every pattern, embedded defaults) and
# `make test` (the whole suite). Both run `setup` first; setup is idempotent.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Reinstall when the dependency files change; otherwise setup is a few seconds.
DEPS_STAMP := $(VENV)/.deps-$(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-12)
PYTEST_ARGS ?=

.PHONY: setup deps artifacts serve serve-cluster test chaos lint format bench loadtest serve-config clean

setup: deps artifacts

deps: $(DEPS_STAMP)

$(DEPS_STAMP): pyproject.toml constraints.txt
	@echo "[setup 1/3] virtual environment in $(VENV)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "[setup 2/3] installing the project with pinned dependencies (constraints.txt)"
	@echo "            first run: torch and ray are large; this takes a few minutes"
	scripts/install_deps.sh $(PY)
	@rm -f $(VENV)/.deps-*
	@touch $@

artifacts: deps
	@echo "[setup 3/3] default model artifacts and seed data (built only when missing)"
	$(PY) -m scripts.build_artifacts

serve: setup
	$(PY) -m scripts.serve_all

# The same apps on three raylets on this machine (head, accelerator and general nodes): model
# stages on the accelerator node, ingresses and I/O elsewhere; prints where each replica landed.
# GCS_REDIS=127.0.0.1:6379 keeps the GCS's tables in that Redis (GCS fault tolerance): a GCS
# that dies is started again 5 s later and reloads the cluster from it.
serve-cluster: setup
	$(PY) -m scripts.serve_all --nodes 3 $(if $(GCS_REDIS),--gcs-redis $(GCS_REDIS))

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# Reliability under faults, on a cluster of its own: every app redeployed both ways and every
# deployment's replica killed under load, dependency outages, a 10-minute soak with a replica of
# every app killed each minute, a long schema-driven fuzz; prints one table, writes
# reliability/report/chaos.json and fails when a goal is missed (about 45 minutes on 2 cores).
# CHAOS_ARGS="--minutes 3 --only kill,soak" for a shorter run; the same runs as pytest tests:
# `pytest --chaos -m chaos tests/reliability tests/cluster`.
CHAOS_ARGS ?=
chaos: setup
	$(PY) -m reliability.chaos $(CHAOS_ARGS)

lint: deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy core

format: deps
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

serve-config: deps
	$(PY) -m scripts.build_serve_config

bench: setup
	@for b in patterns/*/bench/benchmark.py; do \
		echo "== $$b"; $(PY) -m $$(echo $${b%.py} | tr / .) || exit 1; \
	done

# monolith vs microservices vs Serve on two workloads, alternated rounds, open-loop load, cost
# per 1M; report in loadtests/report/ (raw Locust files in loadtests/report/raw/, git-ignored).
# `make loadtest ARGS=--quick` is the smoke run.
loadtest: setup
	$(PY) -m loadtests.compare $(LOADTEST_ARGS) $(ARGS)

clean:
	rm -rf $(VENV) artifacts .pytest_cache .ruff_cache .mypy_cache

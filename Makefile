# agentcloud_clone — `make run` starts the product, `make test` runs every test tier.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
# mongoeco (the embedded MongoDB-wire server) needs Python >= 3.13; pyenv ships 3.13.0 on our machines.
PYTHON313 ?= $(shell for p in $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.1[3-9]*/bin/python3 python3.13 python3; do \
  "$$p" -c 'import sys; sys.exit(sys.version_info < (3, 13))' 2>/dev/null && { command -v "$$p"; break; }; done)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
SYSTEM_PACKAGES := redis-server chromium curl
PYTEST_ARGS ?=
# `make chaos`: seconds of faults (the seed is printed first; CHAOS_SEED=N repeats a run's choices).
CHAOS_SECONDS ?= 180

.PHONY: install system-packages run cli worker test test-fast test-integration contract chaos lint format bench clean

install: system-packages $(VENV)/.installed

system-packages:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v curl >/dev/null || missing="$$missing curl"; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	fi

$(VENV)/.installed: pyproject.toml
	@if [ -z "$(PYTHON313)" ]; then echo "Python 3.13 not found: install it (e.g. 'pyenv install 3.13') or set PYTHON313=/path/to/python3.13" >&2; exit 1; fi
	@[ -x $(BIN)/python ] || $(PYTHON313) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[embedded,ops,test]'
	@touch $@

# Supervised until Ctrl-C; HOST, PORT, MONGO_PORT, REDIS_PORT, MONGO_URI, REDIS_URL, WORKERS, VAR_DIR (README).
run: install
	$(BIN)/python -m devtools.run

# The admin CLI, e.g. `make cli ARGS="apikeys create demo@example.com"`; it finds a running `make run` itself.
cli: install
	@$(BIN)/flask --app app $(ARGS)

worker: install
	$(BIN)/python -m workers

# The in-process tier on two pytest-xdist workers (each with servers of its own), then the tiers of real
# processes one test at a time, so their processes never compete with another test's for the two cores.
TEST_JOBS ?= 2
test: install lint
	$(BIN)/python -m pytest -q -n $(TEST_JOBS) -m "not integration and not browser and not contract" $(PYTEST_ARGS)
	$(BIN)/python -m pytest -q --durations=15 -m "integration or browser or contract" $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -q -m "not integration and not browser and not contract" $(PYTEST_ARGS)

test-integration: install
	$(BIN)/python -m pytest -q -m integration $(PYTEST_ARGS)

contract: install
	$(BIN)/python -m devtools.contract

# Random kills and stops of every process under a mixed workload, then the invariants (README, "Reliability").
# `make test` runs a bounded version (tests/integration/test_chaos.py, about a minute).
chaos: install
	$(BIN)/python -m devtools.chaos --duration $(CHAOS_SECONDS) $(if $(CHAOS_SEED),--seed $(CHAOS_SEED))

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Every benchmark part on servers of its own, about 25 minutes on 2 cores (docs/PERFORMANCE.md); e.g.
# `make bench BENCH_ARGS="--parts load_tier"` for one part, `BENCH_ARGS=--quick` for a small smoke run.
BENCH_ARGS ?=
bench: install
	@command -v wrk >/dev/null || { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq wrk >/dev/null; }
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) var test-artifacts bench/results .pytest_cache .ruff_cache

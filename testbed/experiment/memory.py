"""Host memory of an experiment cell: the memory model's estimate and what the host has.

A cell trains in-process: every client, the server and the optimizers live in ONE process,
so its peak is the sum of the holders' training memory (runner/methods/memory.py, the same model
ARMSC plans with) plus one runtime. The experiment runner checks the estimate against the
memory the cells may use before it starts one (testbed/experiment/run.py): a cell that
cannot fit even alone is refused with one line, one that fits only once others finish
waits. The estimate is an upper bound by design: memory is counted for batches padded to
``max_len`` (E2E has examples that long, so the longest example would not lower it),
HSplitLoRA's server for the shallowest split of every client, and logits at every
position; each cell records its measured peak RSS next to the estimate (``result.json``),
so the bound can be checked (docs/experiments.md quotes both), and ``--memory`` raises the
limit when the bound is known to be loose.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from runner.config import CENTRAL_METHODS, HETERO_METHODS, SPLIT_METHODS, TrainConfig
from runner.emulation.devices import DeviceSpec
from runner.methods.memory import (
    DEFAULT_RESERVE,
    ELEMENT,
    MemoryEstimate,
    ModelCosts,
    client_memory,
    server_memory,
)
from runner.model import lora

MEMINFO = Path("/proc/meminfo")
# One cell process's runtime: a client's (runner.methods.memory.DEFAULT_RESERVE) plus the CLI, the
# data pipeline and the scorer it also imports. Measured: a tiny-llama cell peaks at
# 480-490 MiB, nearly all of it runtime.
CELL_RESERVE = max(DEFAULT_RESERVE, 512 * 2**20)


def _names(costs: ModelCosts, targets: Sequence[str]) -> list[str]:
    """Candidate weights of ``targets`` (short names) in every block, from the costs alone."""
    table = lora.PROJECTIONS[costs.family]
    suffixes = {table[t] for t in targets if t in table}
    return [n for n in costs.shapes if n.split(".", 3)[-1] in suffixes]


def estimate_cell(cfg: TrainConfig, costs: ModelCosts,
                  devices: Sequence[DeviceSpec] | None = None,
                  seq: int | None = None) -> MemoryEstimate:
    """Predicted peak host memory of one in-process training run of ``cfg`` with batches of
    ``seq`` tokens (default ``max_len``).

    Parts: one cell runtime (:data:`CELL_RESERVE`); each client's training memory (whole
    model for fedlora / hetlora, ``[0, k)`` for split methods; HSplitLoRA's clients at most
    their budget or the deepest split at the top rank, whichever is smaller); the server's
    (blocks ``[k, L)`` + head; HSplitLoRA's server holds every block); the logits of the
    head at every position (value + gradient) for holders that compute the loss themselves.
    """
    L, n = costs.num_layers, (1 if cfg.method in CENTRAL_METHODS else cfg.clients)
    batch, seq = cfg.batch_size, min(seq or cfg.max_len, cfg.max_len)
    tokens = batch * seq
    top = max([r for r in cfg.rank_set if r > 0] + [cfg.rank])
    rank = top if cfg.method in HETERO_METHODS else cfg.rank
    ranks = {name: rank for name in _names(costs, cfg.targets)}
    logits = tokens * costs.vocab * ELEMENT * 2

    def train(k: int, r: dict[str, int]) -> int:
        return client_memory(costs, k, r, batch, seq, reserve=0).total

    parts = {"runtime_reserve": CELL_RESERVE}
    if cfg.method == "ft":  # every weight trains: value, gradient and two AdamW moments
        weights = costs.embed_bytes + L * costs.block_bytes + costs.head_bytes
        parts["model"] = 4 * weights + int(tokens * L * costs.act_bytes_per_token_block)
        parts["logits"] = logits
    elif cfg.method in SPLIT_METHODS:
        if cfg.method == "splitlora":
            k = cfg.split if cfg.split is not None else max(1, L // 4)
            parts["clients"] = n * train(k, ranks)
            splits = [k] * n
        else:  # ARMSC decides; bounded by each budget and the deepest split
            lo = (cfg.split_bounds or (max(1, L // 8), L - 1))[0]
            deepest = train(L - 1, ranks)
            budgets = [d.memory_bytes - DEFAULT_RESERVE for d in (devices or [])][:n]
            parts["clients"] = sum(min(deepest, max(b, 0)) for b in budgets) if budgets \
                else n * deepest
            splits = [lo] * n
        server = server_memory(costs, splits, ranks, batch, seq, reserve=0).parts
        if cfg.method != "splitlora":  # the server keeps the whole merged model
            server["blocks"] = L * costs.block_bytes + costs.head_bytes + costs.embed_bytes
        parts["server"] = sum(server.values())
    else:  # fedlora, hetlora, cenlora: whole-model holders computing their own loss
        parts["clients"] = n * (train(L, ranks) + costs.head_bytes)
        parts["logits"] = logits
    return MemoryEstimate(parts)


def available_memory(meminfo: Path = MEMINFO) -> int | None:
    """Memory this process could still use: ``MemAvailable``, bounded by the cgroup limit
    less its usage when the process runs in a memory-limited cgroup. None when unknown."""
    found: list[int] = []
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        from runner.emulation.budget import cgroup_budget
        from runner.emulation.resources import cgroup_usage

        limit = cgroup_budget()
        if limit is not None:
            usage = cgroup_usage()
            found.append(limit.bytes - (usage.current if usage is not None else 0))
    except Exception:  # noqa: BLE001 - an unreadable cgroup is "no limit known"
        pass
    return min(found) if found else None


def cpu_count() -> int:
    """CPUs this process may run on (affinity), for the per-cell thread count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def fmt_mib(n: float) -> str:
    """Bytes as MiB or GiB for one-line messages."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


__all__ = ["available_memory", "cpu_count", "estimate_cell", "fmt_mib"]

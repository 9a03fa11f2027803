"""ARMSC: adaptive rank and model-splitting configuration (docs/method.md "ARMSC").

Split points minimise the estimated synchronous step time (makespan)

    max_i(client compute_i + 2 * activation bytes / bandwidth_i + latency_i)
    + server compute(sum over clients of their remaining blocks)

subject to ``M_client(k_i, minimal ranks) <= M_i``. Ranks then fill the memory left, by
importance gained per byte. A trigger with hysteresis decides when to recompute.

Design choices (ours, not the paper's):

* The makespan is minimised exactly: for every candidate client-time bound ``T`` each
  client takes the deepest feasible split whose time fits in ``T`` (deeper = less server
  work), and the best ``T`` wins.
* "Minimal ranks" means the smallest non-zero rank of the rank set on the reference
  targets (``q``, ``v``) of the client's blocks: every client can train at least that.
* Utility of rank ``r`` on ``W`` is ``I(W) * log2(1 + r)`` (diminishing returns), so the
  greedy spreads ranks over important weights instead of maxing out one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from runner.emulation.devices import DeviceSpec
from runner.methods.importance import adapter_bytes, lora_activation_bytes, relative_change
from runner.methods.memory import ModelCosts, client_memory, server_memory
from runner.model.lora import RankMap, block_of

DEFAULT_RANKS = (0, 2, 4, 8, 16)


@dataclass
class Plan:
    """One configuration: per-client split points and ranks, server ranks, estimates."""

    splits: list[int]
    client_ranks: list[RankMap]
    server_ranks: RankMap
    makespan: float
    client_memory: list[int]
    budgets: list[int]
    violations: list[str] = field(default_factory=list)

    def global_client_ranks(self) -> RankMap:
        """Largest client-side rank per weight (for reports)."""
        out: RankMap = {}
        for ranks in self.client_ranks:
            for n, r in ranks.items():
                out[n] = max(out.get(n, 0), r)
        return out


def client_time(costs: ModelCosts, dev: DeviceSpec, k: int, tokens: int) -> float:
    """Client compute for blocks [0, k) plus sending acts and receiving their gradient."""
    compute = tokens * k * costs.flops_per_token_block / dev.flops
    comm = 2 * tokens * costs.hidden * 4 / dev.bandwidth + dev.latency
    return compute + comm


def server_time(costs: ModelCosts, server: DeviceSpec, splits: Sequence[int], tokens: int) -> float:
    blocks = sum(costs.num_layers - k for k in splits)
    head = 6.0 * costs.hidden * costs.vocab  # forward+backward of the LM head per token
    return tokens * (blocks * costs.flops_per_token_block + len(splits) * head) / server.flops


def makespan(costs: ModelCosts, devices: Sequence[DeviceSpec], server: DeviceSpec,
             splits: Sequence[int], tokens: int) -> float:
    slowest = max(client_time(costs, d, k, tokens) for d, k in zip(devices, splits, strict=True))
    return slowest + server_time(costs, server, splits, tokens)


def minimal_ranks(names: Sequence[str], rank_set: Sequence[int]) -> RankMap:
    smallest = min(r for r in rank_set if r > 0)
    return {n: smallest for n in names}


def choose_splits(costs: ModelCosts, devices: Sequence[DeviceSpec], server: DeviceSpec,
                  tokens: int, base_ranks: RankMap, bounds: tuple[int, int], batch: int,
                  seq: int, reserve: int | None = None) -> tuple[list[int], list[str]]:
    """Split points minimising the makespan under each client's memory budget.

    ``reserve`` None: the costs' own (``ModelCosts.reserve``: the CUDA context where the
    costs were calibrated on a GPU, runner/methods/memory.py ``planning_costs``).

    A client whose budget cannot hold even the shallowest split gets the lower bound and a
    logged violation (the run goes on; it is an emulation).
    """
    lo, hi = bounds
    feasible: list[list[int]] = []
    violations: list[str] = []
    for dev in devices:
        ks = [k for k in range(lo, hi + 1)
              if client_memory(costs, k, base_ranks, batch, seq, reserve).total
              <= dev.memory_bytes]
        if not ks:
            violations.append(f"{dev.name}: budget {dev.memory_bytes / 2**20:.0f} MiB holds no "
                              f"split in [{lo},{hi}]; using {lo}")
            ks = [lo]
        feasible.append(ks)
    candidates = sorted({client_time(costs, d, k, tokens)
                         for d, ks in zip(devices, feasible, strict=True) for k in ks})
    best: tuple[float, list[int]] | None = None
    for bound in candidates:
        splits = []
        for dev, ks in zip(devices, feasible, strict=True):
            fitting = [k for k in ks if client_time(costs, dev, k, tokens) <= bound + 1e-12]
            if not fitting:
                break
            splits.append(max(fitting))
        else:
            value = makespan(costs, devices, server, splits, tokens)
            if best is None or value < best[0] - 1e-12:
                best = (value, splits)
    assert best is not None
    return best[1], violations


def allocate_ranks(costs: ModelCosts, names: Sequence[str], importance: Mapping[str, float],
                   free_bytes: int, rank_set: Sequence[int], tokens: int,
                   start: RankMap | None = None) -> RankMap:
    """Greedy: raise ranks in the rank set by importance gained per byte until memory is used.

    ``start`` (e.g. the minimal ranks) is granted first and its bytes are assumed to be
    already counted in ``free_bytes``' complement.
    """
    levels = sorted(set(rank_set) | {0})
    ranks: RankMap = {n: (start or {}).get(n, 0) for n in names}
    left = free_bytes

    def cost(name: str, r: int) -> int:
        d_in, d_out = costs.shapes[name]
        if r == 0:
            return 0
        return adapter_bytes(d_in, d_out, r) + lora_activation_bytes(d_in, r, tokens)

    while True:
        best: tuple[float, str, int, int] | None = None
        for n in names:
            value = importance.get(n, 0.0)
            if value <= 0:
                continue
            cur = ranks[n]
            nxt = next((r for r in levels if r > cur), None)
            if nxt is None:
                continue
            extra = cost(n, nxt) - cost(n, cur)
            if extra > left:
                continue
            gain = value * (math.log2(1 + nxt) - math.log2(1 + cur))
            score = gain / max(extra, 1)
            if best is None or score > best[0]:
                best = (score, n, nxt, extra)
        if best is None:
            return {n: r for n, r in ranks.items() if r > 0}
        _, n, r, extra = best
        ranks[n] = r
        left -= extra


def plan(costs: ModelCosts, devices: Sequence[DeviceSpec], server: DeviceSpec,
         importance: Mapping[str, float], candidates: Sequence[str], *, batch: int, seq: int,
         rank_set: Sequence[int] = DEFAULT_RANKS, bounds: tuple[int, int] | None = None,
         reference_targets: Sequence[str] = (), reserve: int | None = None,
         fixed_splits: Sequence[int] | None = None, mem_seq: int | None = None) -> Plan:
    """Full ARMSC decision: split points (unless fixed), client ranks, server ranks.

    ``seq``: the sequence length step *times* are estimated for (a typical batch);
    ``mem_seq`` (default ``seq``): the one memory is planned for. A budget is a hard limit,
    so callers pass the longest padded batch a client can draw."""
    tokens = batch * seq
    mseq = mem_seq or seq
    bounds = bounds or (1, costs.num_layers - 1)
    base_names = [n for n in candidates if any(n.endswith(t) for t in reference_targets)]
    base = minimal_ranks(base_names, rank_set) if base_names else {}
    if fixed_splits is None:
        splits, violations = choose_splits(costs, devices, server, tokens, base, bounds, batch,
                                           mseq, reserve)
    else:
        splits, violations = list(fixed_splits), []
    client_ranks, used = [], []
    for dev, k in zip(devices, splits, strict=True):
        mine = [n for n in candidates if block_of(n) < k]
        start = {n: r for n, r in base.items() if block_of(n) < k}
        fixed = client_memory(costs, k, start, batch, mseq, reserve).total
        ranks = allocate_ranks(costs, mine, importance, dev.memory_bytes - fixed, rank_set,
                               batch * mseq, start=start)
        total = client_memory(costs, k, ranks, batch, mseq, reserve).total
        if total > dev.memory_bytes:
            violations.append(f"{dev.name}: predicted {total / 2**20:.0f} MiB exceeds budget "
                              f"{dev.memory_bytes / 2**20:.0f} MiB")
        client_ranks.append(ranks)
        used.append(total)
    server_names = [n for n in candidates if block_of(n) >= min(splits)]
    server_start = {n: r for n, r in base.items() if block_of(n) >= min(splits)}
    server_fixed = server_memory(costs, splits, server_start, batch, seq, reserve).total
    server_ranks = allocate_ranks(costs, server_names, importance,
                                  server.memory_bytes - server_fixed, rank_set,
                                  tokens * len(devices), start=server_start)
    return Plan(splits=list(splits), client_ranks=client_ranks, server_ranks=server_ranks,
                makespan=makespan(costs, devices, server, splits, tokens),
                client_memory=used, budgets=[d.memory_bytes for d in devices],
                violations=violations)


@dataclass
class Trigger:
    """When to recompute (docs/method.md "ARMSC: Trigger") and whether to apply a new split
    (hysteresis)."""

    tau: float = 0.2
    budget_tolerance: float = 0.10
    hysteresis: float = 0.10
    importance: dict[str, float] | None = None
    budgets: list[int] | None = None
    members: tuple[str, ...] | None = None

    def reason(self, importance: Mapping[str, float], budgets: Sequence[int],
               members: Sequence[str]) -> str | None:
        """Why a reconfiguration is due now, or None."""
        if self.importance is None:
            return "initial"
        if tuple(members) != self.members:
            return "membership"
        if self.budgets is not None and any(
                abs(b - a) > self.budget_tolerance * a for a, b in
                zip(self.budgets, budgets, strict=True)):
            return "budget"
        if relative_change(self.importance, importance) > self.tau:
            return "importance"
        return None

    def accept(self, importance: Mapping[str, float], budgets: Sequence[int],
               members: Sequence[str]) -> None:
        """Remember the state a configuration was computed from."""
        self.importance = dict(importance)
        self.budgets = list(budgets)
        self.members = tuple(members)

    def apply_new_splits(self, old_makespan: float, new_makespan: float) -> bool:
        """Hysteresis: move split points only for a > ``hysteresis`` makespan improvement."""
        return new_makespan < (1.0 - self.hysteresis) * old_makespan

"""Fair comparison: every method of an experiment meets the same per-device memory budgets.

HSplitLoRA fits each client's budget itself (ARMSC picks its split point and ranks) and
HetLoRA picks each client's rank from its budget (runner/methods/hetlora.py). A method with
ONE configuration for all clients would otherwise run at its defaults whatever the devices, so
a comparison could pit a budget-respecting method against one that silently needs more
memory than the weakest device has. Here such a method gets the largest configuration that
fits the smallest device, measured with the same memory model (runner/methods/memory.py
``client_memory``, planned for the longest batch a client can draw, as ARMSC plans):

* ``fedlora`` (whole model on every client): the largest rank of the rank set that fits;
* ``splitlora`` (one split point and one rank): the largest rank for which some split point
  in ARMSC's bounds fits; among the split points that fit at that rank, the one with the
  shortest estimated synchronous step (ARMSC's makespan, runner/methods/armsc.py, all clients at
  that split) -- the objective HSplitLoRA's own splits optimise, so neither method is given
  a split the other's planner would call slow -- or, with ``fairness.split: deepest``, the
  deepest one.

A setting the experiment file gives explicitly (``split``, ``rank``) is kept; when even the
smallest configuration does not fit, the smallest is used and each client whose budget it
exceeds is recorded as a budget violation (docs/method.md "Budget violations": a method that
does not fit is still run, and the violation is shown in reports), as hetlora records its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from runner.config import CENTRAL_METHODS, HETERO_METHODS, TrainConfig
from runner.emulation.devices import DeviceSpec
from runner.methods import armsc, registry
from runner.methods.memory import ModelCosts, client_memory
from runner.model import lora

FIXED_CONFIG_METHODS = registry.having(fixed_config=True)  # splitlora, fedlora
MIB = 2**20


@dataclass
class FairChoice:
    """What a fixed-configuration method was given, and why."""

    method: str
    rule: str  # how the configuration was chosen (one phrase, for the report)
    split: int | None
    rank: int
    smallest_device: str
    budget_bytes: int  # the smallest device's budget
    predicted_bytes: int  # the memory model's peak of one client at this configuration
    mem_seq: int  # sequence length memory was planned for
    kept: list[str] = field(default_factory=list)  # settings the experiment fixed
    violations: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def describe(method: str) -> str:
    """How a method meets the budgets when nothing is chosen for it here (report text)."""
    if method in HETERO_METHODS:
        return ("per client by its budget (ARMSC)" if method != "hetlora"
                else "per client rank by its budget (full model; violations recorded)")
    if method in CENTRAL_METHODS:
        return "centralised (no device budget)"
    return "uniform"


def choose(cfg: TrainConfig, model_config: Any, devices: Sequence[DeviceSpec],
           server: DeviceSpec, mem_seq: int, fixed: Sequence[str] = (),
           split_rule: str = "makespan") -> FairChoice | None:
    """The configuration of ``cfg.method`` under the smallest of ``devices``' budgets, or
    None for a method that sizes itself per client (hsplitlora*, hetlora) or has no device
    (cenlora, ft). ``fixed``: settings the experiment gave, kept as they are."""
    if cfg.method not in FIXED_CONFIG_METHODS:
        return None
    costs = ModelCosts.from_config(model_config)
    L = costs.num_layers
    clients = list(devices)[: cfg.clients]
    smallest = min(clients, key=lambda d: d.memory_bytes)
    names = lora.weight_names(model_config, range(L), cfg.targets)
    positive = sorted({r for r in cfg.rank_set if r > 0} | {cfg.rank}, reverse=True)
    ranks = [cfg.rank] if "rank" in fixed else positive

    def need(k: int, r: int) -> int:
        return client_memory(costs, k, {n: r for n in names}, cfg.batch_size, mem_seq).total

    kept = [k for k in ("split", "rank") if k in fixed]
    if cfg.method == "fedlora":
        splits = [L]
        rule = "largest rank that fits the smallest device"
    else:
        lo, hi = cfg.split_bounds or (max(1, L // 8), L - 1)
        default = cfg.split if cfg.split is not None else max(1, L // 4)
        splits = [default] if "split" in fixed else list(range(lo, hi + 1))
        rule = ("largest rank that fits the smallest device, then the "
                + ("deepest fitting split" if split_rule == "deepest"
                   else "fitting split with the shortest estimated step (ARMSC's makespan)"))
    tokens = cfg.batch_size * cfg.plan_seq
    for r in ranks:
        fits = [k for k in splits if need(k, r) <= smallest.memory_bytes]
        if not fits:
            continue
        if cfg.method == "fedlora":
            k = L
        elif split_rule == "deepest":
            k = max(fits)
        else:
            k = min(fits, key=lambda s: (armsc.makespan(costs, clients, server,
                                                        [s] * len(clients), tokens), -s))
        return FairChoice(cfg.method, rule, None if cfg.method == "fedlora" else k, r,
                          smallest.name, smallest.memory_bytes, need(k, r), mem_seq, kept)
    # Nothing fits: the smallest configuration, and every client it overflows is recorded.
    r = min(ranks)
    k = L if cfg.method == "fedlora" else min(splits)
    predicted = need(k, r)
    what = "full model" if cfg.method == "fedlora" else f"split {k}"
    violations = [f"{d.name}: {cfg.method} {what} at rank {r} needs {predicted / MIB:.1f} MiB, "
                  f"exceeds budget {d.memory_bytes / MIB:.1f} MiB"
                  for d in clients if predicted > d.memory_bytes]
    return FairChoice(cfg.method, rule + " (none fits: the smallest configuration)",
                      None if cfg.method == "fedlora" else k, r, smallest.name,
                      smallest.memory_bytes, predicted, mem_seq, kept, violations)


__all__ = ["FIXED_CONFIG_METHODS", "FairChoice", "choose", "describe"]

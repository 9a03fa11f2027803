"""What HSplitLoRA (runner/methods/hsplitlora.py) and HetLoRA (runner/methods/hetlora.py)
share in-process: :class:`HeteroTrainer`, the trainer of methods whose clients differ in their
devices (docs/method.md "ARMSC: Inputs": budgets, compute, links) and so in their split
points and ranks.

The core builds the clients' data and holders, reads or emulates the devices, and keeps what
both methods record: budget violations, reconfiguration events (split points, ranks, planned
memory per client), each client's own aggregation bytes for the virtual clock, and the padded
methods' resynchronisation of a returning client. A subclass attaches the models
(``_build_holders``), aggregates, and saves.

Design choices (ours):

* The server keeps every block (the whole merged model): it can hand blocks to any client
  and is the authoritative copy of merged weights. Its memory is not budget-limited here.
* The IWI tracker and the ARMSC trigger exist for every heterogeneous method (the distributed
  server checkpoints them), though only HSplitLoRA uses them.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from runner import seeds
from runner.dataset import data as data_mod
from runner.emulation.devices import GB, DeviceSpec, load_availability, load_devices, paper_spread
from runner.errors import ConfigError
from runner.methods import aggregation as agg
from runner.methods import armsc, importance
from runner.methods.memory import (
    DEFAULT_RESERVE,
    ModelCosts,
    client_memory,
    memory_seq,
    planning_costs,
)
from runner.model import lora, split
from runner.model.models import load_config
from runner.trainer import Holder, Trainer, grad_scaler, make_optimizer


def emulated_devices(costs: ModelCosts, n: int, batch: int, seq: int,
                     targets: tuple[str, ...] = ("q", "v"),
                     hold_seq: int | None = None) -> tuple[list[DeviceSpec], DeviceSpec]:
    """The paper's 5-20 GB client spread, rescaled to this model's training footprint.

    Design choice (for runs without a devices file; a profile's devices, testbed/profiles.py,
    replace it): a client with ``G`` GB out of the paper's 20 GB top device gets the same
    fraction ``G/20`` of the model's full training footprint (above the runtime reserve) at
    the longest batch the run draws (``hold_seq``, default ``seq``: memory is planned for
    it, so the top device holds the whole model as the paper's does), but never less than
    the shallowest client needs (block 0 adapted at rank 8): the paper's 5 GB device does
    train its shallowest split, and on a model whose embeddings outweigh a quarter of it
    (the tiny test models) the bare fraction would not hold that split, so no plan could fit
    the weakest device and it would never train (docs/method.md "Budget violations").
    Compute is edge-class and grows with the budget; the server is a datacentre GPU.
    """
    names = [n for n in costs.shapes if n.endswith(("q_proj", "v_proj", "c_attn"))]
    full = client_memory(costs, costs.num_layers, {x: 8 for x in names}, batch,
                         hold_seq or seq).total
    floor = client_memory(costs, 1, {x: 8 for x in names if lora.block_of(x) == 0}, batch,
                          hold_seq or seq).total
    clients = []
    for i, gb in enumerate(paper_spread(n)):
        budget = max(floor, int(DEFAULT_RESERVE + (gb / 20.0) * (full - DEFAULT_RESERVE)))
        clients.append(DeviceSpec(f"client{i}", budget, flops=0.5e12 * gb / 5.0,
                                  bandwidth=12.5e6 * (1 + i), latency=0.02))
    return clients, DeviceSpec("server", 80 * GB, flops=100e12, bandwidth=1.25e9, latency=0.001)


class _PerClient:
    """Each client's own aggregation bytes, ``{name: [up, down]}``, for the virtual clock
    (runner/emulation/vtime.py: a client's link carries its own adapters, not an equal share)."""

    def __init__(self) -> None:
        self.bytes: dict[str, list[int]] = {}

    def add(self, name: str, up: int = 0, down: int = 0) -> None:
        mine = self.bytes.setdefault(name, [0, 0])
        mine[0] += up
        mine[1] += down


def _linear(model: nn.Module, name: str) -> nn.Module:
    return importance.base_linears(model, [name])[name]


class HeteroTrainer(Trainer):
    """The shared part of the trainers of ``hsplitlora`` (its ablations) and ``hetlora``."""

    # ------------------------------------------------------------------------- set-up
    def _build(self) -> None:
        cfg, info = self.cfg, self.info
        self.offline: set[str] = set()  # Trainer.__init__ sets it again after _build
        self.config = load_config(info.path)
        self.costs = ModelCosts.from_config(self.config)
        self.candidates = lora.candidates(self.config, cfg.candidates, cfg.targets)
        self.ref_targets = tuple(lora.weight_names(self.config, [0], cfg.targets))
        self.ref_suffixes = tuple(n.split(".", 3)[-1] for n in self.ref_targets)
        if cfg.devices:
            self.devices, server = load_devices(Path(cfg.devices))
            if len(self.devices) < cfg.clients:
                raise ConfigError(f"{cfg.devices} describes {len(self.devices)} clients; "
                                  f"--clients is {cfg.clients}")
            self.devices = self.devices[: cfg.clients]
            self.server_dev = server or emulated_devices(self.costs, 1, cfg.batch_size,
                                                         cfg.plan_seq)[1]
        L = info.num_layers
        self.bounds = cfg.split_bounds or (max(1, L // 8), L - 1)
        self.tracker = importance.ImportanceTracker(cfg.steps)
        self.trigger = armsc.Trigger(tau=cfg.tau)
        self.reconfigurations = 0
        self.violations: list[str] = []
        self.moved_bytes = 0
        self.probe_bytes = 0  # HSplitLoRA's IWI probes: activations up, gradients down
        tokens = cfg.batch_size * cfg.plan_seq
        self.weight_costs = {n: importance.weight_cost(*self.costs.shapes[n], cfg.rank, tokens)
                             for n in self.candidates}
        shards = self.prep.shards
        total = sum(len(s) for s in shards)
        encoded = [data_mod.encode_frame(self.prep.tokenizer, s, cfg.max_len) for s in shards]
        self.mem_seq = memory_seq(cfg.plan_seq, (len(ex["input_ids"]) for ex_list in encoded
                                                 for ex in ex_list))
        if not cfg.devices:
            self.devices, self.server_dev = emulated_devices(
                self.costs, cfg.clients, cfg.batch_size, cfg.plan_seq, hold_seq=self.mem_seq)
        # What ARMSC plans with: on a CUDA device the memory model calibrated there, at the
        # training precision on the batches memory is planned for (per-block activation
        # bytes from the CUDA allocator, the CUDA context as the runtime reserve: docs/gpu.md
        # "Budgets"); on the CPU the analytic costs as before (bit-identical plans).
        self.costs = planning_costs(self.config, self.device, path=info.path,
                                    precision=cfg.precision, batch=cfg.batch_size,
                                    seq=self.mem_seq, targets=cfg.targets, rank=cfg.rank)
        for i, (shard, examples) in enumerate(zip(shards, encoded, strict=True)):
            self.clients.append(Holder(
                name=f"client{i}", seg=None,  # type: ignore[arg-type]  # set just below
                ranks={}, weight=len(shard) / total, n_examples=len(shard),
                batches=data_mod.ClientBatches(
                    examples, cfg.batch_size, self.pad_id, seed=seeds.batch_stream(cfg.seed, i),
                    multiple=data_mod.length_multiple(cfg.precision)),
                scaler=grad_scaler(cfg.precision, self.device)))
        self._build_holders()
        for h in self.all_holders():
            h.seg.model.train()

    def _budget_violation(self, step: int, message: str) -> None:
        self.violations.append(message)
        self._event("budget_violation", step=step, detail=message)

    def _build_holders(self) -> None:
        """Load every holder's model and attach its first adapters (the method's own)."""
        raise NotImplementedError

    def _reinit(self, h: Holder, ranks: lora.RankMap, step: int) -> None:
        if hasattr(h.seg.model, "peft_config"):
            h.seg.model = h.seg.model.unload()
        h.ranks = lora.attach_lora(h.seg, ranks, alpha=self.cfg.lora_alpha,
                                   dropout=self.cfg.lora_dropout,
                                   seed=seeds.adapter_init(self.cfg.seed, step))
        made = make_optimizer(h.seg.model, self.cfg, start_step=step)
        h.opt, h.sched = made if made is not None else (None, None)
        h.seg.model.train()

    def _sync_blocks(self, seg: split.Segment, first_new: int) -> int:
        """Copy the server's current (merged) block weights into ``seg``; returns the bytes
        of blocks at or above ``first_new`` (what a real hand-over would send)."""
        assert self.server is not None
        server_state = {n.replace(".base_layer", ""): t for n, t in
                        split.base_model(self.server.seg.model).state_dict().items()}
        moved = 0
        with torch.no_grad():
            for name, p in split.base_model(seg.model).named_parameters():
                key = name.replace(".base_layer", "")
                if ".layers." in key and key in server_state:
                    p.copy_(server_state[key])
                    if lora.block_of(key) >= first_new:
                        moved += p.numel() * p.element_size()
        return moved

    def resync(self, h: Holder, step: int) -> None:
        """A returning client gets the largest-rank client's adapter truncated to its rank
        (HetLoRA, padded FedAvg; NAA: runner/methods/hsplitlora.py)."""
        src = self.eval_holder()
        if src is h:
            return
        theirs, mine = lora.adapter_state(src.seg.model), lora.adapter_state(h.seg.model)
        with torch.no_grad():
            for key, t in mine.items():
                if key in theirs:
                    r = t.shape[0] if key.endswith("lora_A") else t.shape[1]
                    t.copy_(theirs[key][:r] if key.endswith("lora_A") else theirs[key][:, :r])

    def eval_holder(self) -> Holder:
        """HetLoRA: the online client with the largest ranks holds the untruncated aggregate."""
        online = self._online() or self.clients
        return max(online, key=lambda h: sum(h.ranks.values()))

    def _log_config(self, step: int, reason: str, splits: list[int],
                    plan: armsc.Plan | None = None) -> None:
        self.reconfigurations += 1
        clients = {}
        for i, (h, k) in enumerate(zip(self.clients, splits, strict=True)):
            clients[h.name] = {
                "split": k, "rank_sum": sum(h.ranks.values()), "adapted": len(h.ranks),
                "memory_bytes": plan.client_memory[i] if plan else client_memory(
                    self.costs, k, h.ranks, self.cfg.batch_size, self.mem_seq).total,
                "budget_bytes": self.devices[i].memory_bytes,
            }
        server = ({"rank_sum": sum(self.server.ranks.values()), "adapted": len(self.server.ranks)}
                  if self.server is not None else None)
        self._event("reconfigure", step=step, reason=reason, clients=clients, server=server,
                    makespan=plan.makespan if plan else None)

    # -------------------------------------------------------------------- aggregation
    def _factors(self, h: Holder, name: str, weight: float,
                 states: dict[str, dict[str, torch.Tensor]]) -> agg.Factors | None:
        if h.name not in states:
            states[h.name] = lora.adapter_state(h.seg.model)
        state = states[h.name]
        if f"{name}.lora_A" not in state:
            return None
        r = h.ranks[name]
        return agg.Factors(A=state[f"{name}.lora_A"].detach(), B=state[f"{name}.lora_B"].detach(),
                           scale=self.cfg.lora_alpha / r, weight=weight)

    def _online(self) -> list[Holder]:
        return [h for h in self.clients if h.name not in self.offline]

    def _record_aggregate(self, step: int, rule: str, online: list[Holder],
                          own: _PerClient) -> dict[str, Any]:
        """The aggregation's event and its metrics record (bytes moved, which reports sum),
        the same for every rule; the totals are the clients' own bytes added up."""
        up = sum(u for u, _ in own.bytes.values())
        down = sum(d for _, d in own.bytes.values())
        self._event("aggregate", step=step, rule=rule, participants=[h.name for h in online],
                    bytes_up=up, bytes_down=down)
        if self.run is not None:
            self.run.metric(kind="aggregate", step=step, client="server", bytes_sent=down,
                            bytes_received=up)
        return {"bytes_up": up, "bytes_down": down, "per_client": own.bytes}

    def set_budget(self, index: int, memory_bytes: int) -> None:
        """A client's memory budget changed (reported by the device): ARMSC's trigger sees
        the change at the next aggregation (docs/method.md "ARMSC: Trigger": more than 10 %)."""
        self.devices[index] = replace(self.devices[index], memory_bytes=int(memory_bytes))

    def clock_devices(self) -> tuple[list[DeviceSpec], DeviceSpec, list[Any]]:
        """The devices ARMSC plans for also drive the virtual clock (with the device file's
        availability entries when there is a file)."""
        n = len(self.clients)
        avail = load_availability(Path(self.cfg.devices))[:n] if self.cfg.devices else []
        return list(self.devices), self.server_dev, avail

    # ---------------------------------------------------------------------- reporting
    def summary_extra(self) -> dict[str, Any]:
        return {
            "reconfigurations": self.reconfigurations,
            "budget_violations": len(self.violations),
            "block_handover_bytes": self.moved_bytes,
            "probe_bytes": self.probe_bytes,
            "client_splits": [h.seg.end for h in self.clients],
            "client_rank_sums": [sum(h.ranks.values()) for h in self.clients],
            "client_budgets": [d.memory_bytes for d in self.devices],
        }

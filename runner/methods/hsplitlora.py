"""HSplitLoRA (docs/method.md "IWI", "ARMSC", "NAA") and its ablations, in-process.

HSplitLoRA round (docs/method.md), every ``I`` steps after the SplitLoRA steps:

1. NAA: for each adapted weight, concatenate the participants' factors, merge
   ``dW = sum_j p_j s_j B_j A_j`` into the frozen weight of every holder of that block;
2. IWI: probe importance on one batch per client (client-side weights on the clients' data,
   server-side weights on the server), smooth it, form the data-weighted global importance;
3. ARMSC: if the trigger fires, recompute ranks (and split points, subject to hysteresis);
4. re-initialise every adapter at its (new) rank with fresh optimizer state; a client whose
   split point moved reloads its segment and receives the current merged weights of the
   blocks it takes over from the server (bytes counted).

The probe's client and server halves (:func:`probe_forward`, :func:`probe_backward`,
:func:`probe_server`) are shared with the distributed runtime (hsplitlora_server.py,
hsplitlora_client.py). What HetLoRA shares with it is runner/methods/hetero.py.

Design choices (ours):

* NAA participants are the holders that trained an adapter on the weight (rank > 0);
  weights are renormalised over them. A holder with rank 0 contributes no factors.
* The final adapter is exported in PEFT format as a low-rank factorisation (SVD) of the
  total merged update ``W_now - W_pretrained`` with ``alpha = r`` (scaling 1), cut at the
  weight's true rank: NAA (docs/method.md "NAA") makes every merge a product of concatenated
  factors of rank ``sum_j r_j``, so the update is a sum of such products and its rank is at
  most the sum of the ranks merged into it (``merged_ranks``, kept per weight). A cut at
  a relative tolerance alone kept the fp32 rounding noise of ``W_now`` as extra singular
  values, up to full rank (an adapter larger than the model it adapts).
* ``hsplitlora-no-naa`` plans once at the start and keeps ranks fixed, aggregating with
  padded FedAvg (truncated back to each holder's rank): without NAA's merge there is no
  clean point at which ranks could change.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import save_file

from runner import device as placement
from runner import seeds
from runner.config import TrainConfig
from runner.methods import aggregation as agg
from runner.methods import armsc, importance, registry
from runner.methods.hetero import HeteroTrainer, _linear, _PerClient
from runner.methods.memory import client_memory
from runner.model import lora, split
from runner.rundir import RunDir
from runner.trainer import Holder, grad_scaler, server_chunks, tensor_bytes


@dataclass
class Probe:
    """Importance numerators of one probe round, per probed client and the server's;
    ``records``: per probed client what the round cost it, in the train records' fields
    (``client``, ``seq_tokens``, ``tokens``, ``bytes_sent``: activations, mask and labels
    up; ``bytes_received``: their gradient down), charged to the virtual clock and to the
    bytes moved in both engines (:meth:`HSplitLoRATrainer._charge_probe`)."""

    holders: list[Holder]
    clients: list[dict[str, float]]
    server: dict[str, float]
    records: list[dict[str, Any]]


def probe_record(name: str, mask: torch.Tensor, labels: torch.Tensor, up: int,
                 down: int) -> dict[str, Any]:
    """One client's share of a probe round, counted as a training step's record is."""
    return {"client": name, "seq_tokens": int(mask.numel()),
            "tokens": int((labels[:, 1:] != -100).sum()), "bytes_sent": up,
            "bytes_received": down}


class HSplitLoRATrainer(HeteroTrainer):
    """Trainer for ``hsplitlora`` and its ablations (``-no-iwi``, ``-no-armsc``, ``-no-naa``)."""

    # ------------------------------------------------------------------------- set-up
    def _build_holders(self) -> None:
        # Per adapted weight, the sum of the NAA ranks merged into it so far: the bound on the
        # rank of its update that :meth:`save` cuts the exported factorisation at. Set here
        # since both engines build through this (the distributed server's shadow trainer
        # too, whose checkpoint carries it: runner/methods/hsplitlora_server.py).
        self.merged_ranks: dict[str, int] = {}
        # probes run before the virtual clock existed: (records, blocks), charged when it
        # starts (clock_started)
        self.uncharged_probes: list[tuple[list[dict[str, Any]], dict[str, int]]] = []
        cfg, L = self.cfg, self.info.num_layers
        fixed = not self.traits.armsc
        k0 = cfg.split if cfg.split is not None else max(1, L // 4)
        base = armsc.minimal_ranks(
            [n for n in self.candidates if n.endswith(self.ref_suffixes)], cfg.rank_set)
        if fixed:
            splits = [k0] * len(self.clients)
        else:
            splits, violations = armsc.choose_splits(
                self.costs, self.devices, self.server_dev, cfg.batch_size * cfg.plan_seq,
                base, self.bounds, cfg.batch_size, self.mem_seq)
            for v in violations:
                self._budget_violation(0, v)
        for h, k in zip(self.clients, splits, strict=True):
            h.seg = split.load_client(self.info.path, k, cfg.precision, self.frozen,
                                      self.device)
        self.server = Holder(name="server", seg=split.load_segment(
            self.info.path, 0, L, embed=False, head=True, precision=cfg.precision,
            shared=self.frozen, device=self.device), ranks={},
            scaler=grad_scaler(cfg.precision, self.device))
        self.initial_plan()

    def initial_plan(self) -> None:
        """Probe importance on the split but not yet adapted model, plan, attach adapters.

        The distributed server (runner/methods/hsplitlora_server.py) calls this once its
        clients have joined, since the probe needs their data."""
        imp = self._importance(step=0)
        plan = self._plan(imp, [h.seg.end for h in self.clients])
        self.trigger.accept(imp, [d.memory_bytes for d in self.devices],
                            [h.name for h in self.clients])
        self._apply(plan, step=0, reason="initial")

    # ------------------------------------------------------------------ configuration
    def _plan(self, imp: dict[str, float], splits: list[int]) -> armsc.Plan:
        cfg = self.cfg
        if not self.traits.armsc:
            ranks = {n: cfg.rank for n in self.candidates if n.endswith(self.ref_suffixes)}
            used = [client_memory(self.costs, k, ranks, cfg.batch_size, self.mem_seq).total
                    for k in splits]
            return armsc.Plan(
                splits=splits, client_ranks=[{n: r for n, r in ranks.items()
                                              if lora.block_of(n) < k} for k in splits],
                server_ranks={n: r for n, r in ranks.items() if lora.block_of(n) >= min(splits)},
                makespan=armsc.makespan(self.costs, self.devices, self.server_dev, splits,
                                        cfg.batch_size * cfg.plan_seq),
                client_memory=used, budgets=[d.memory_bytes for d in self.devices],
                violations=[f"{d.name}: predicted {m / 2**20:.0f} MiB exceeds budget "
                            f"{d.memory_bytes / 2**20:.0f} MiB (fixed split and rank)"
                            for d, m in zip(self.devices, used, strict=True)
                            if m > d.memory_bytes])
        return armsc.plan(self.costs, self.devices, self.server_dev, imp, self.candidates,
                          batch=cfg.batch_size, seq=cfg.plan_seq, mem_seq=self.mem_seq,
                          rank_set=cfg.rank_set,
                          bounds=self.bounds, reference_targets=self.ref_suffixes,
                          fixed_splits=splits)

    def _apply(self, plan: armsc.Plan, step: int, reason: str) -> None:
        """(Re-)initialise all adapters at the plan's ranks with fresh optimizers."""
        for h, k, ranks in zip(self.clients, plan.splits, plan.client_ranks, strict=True):
            if h.seg.end != k:
                self._move_split(h, k, step)
            self._reinit(h, ranks, step)
        self._reinit(self.server, plan.server_ranks, step)
        for v in plan.violations:
            self._budget_violation(step, v)
        # a client this plan cannot fit (even ARMSC's shallowest split at its minimal ranks,
        # or the ablations' fixed ones) sits out until a plan fits it
        for h, need, budget in zip(self.clients, plan.client_memory, plan.budgets,
                                   strict=True):
            if need > budget:
                self.not_runnable(step, h.name, need, budget)
            else:
                self.runnable(h.name)
        self.plan = plan
        self._log_config(step, reason, plan.splits, plan)

    def _move_split(self, h: Holder, k: int, step: int) -> None:
        """Reload a client at a new split point with the server's current merged weights."""
        old = h.seg.end
        seg = split.load_client(self.info.path, k, self.cfg.precision, self.frozen,
                                self.device)
        moved = self._sync_blocks(seg, old)
        h.seg = seg
        self.moved_bytes += moved
        self._event("split_moved", step=step, client=h.name, old=old, new=k, bytes=moved)

    def resync(self, h: Holder, step: int) -> None:
        """A returning client gets the merged weights it missed and fresh adapters (NAA), or
        the largest-rank client's adapter truncated to its rank (padded FedAvg)."""
        if self.server is not None and self.traits.naa:
            if hasattr(h.seg.model, "peft_config"):
                h.seg.model = h.seg.model.unload()
            self._sync_blocks(h.seg, h.seg.end)
            self._reinit(h, h.ranks, step)
            return
        super().resync(h, step)

    # --------------------------------------------------------------------- importance
    def _probe(self, holders: list[Holder], step: int) -> Probe:
        """Numerators ``sum <dL/dy, W x>`` on one batch per client, without touching any
        parameter gradient (autograd.grad w.r.t. input leaves only); dropout off. Each
        client's batch comes from its own probe stream (seeds.probe_batch), never from its
        training stream."""
        server = self.server
        assert server is not None
        for h in self.all_holders():
            h.seg.model.eval()
        try:
            batches = [placement.to(self.probe_batch(h, step), h.seg.device) for h in holders]
            forwards = [probe_forward(h.seg, b, self.client_candidates(h.seg.end))
                        for h, b in zip(holders, batches, strict=True)]
            grads, server_nums = probe_server(
                server.seg, [(f.acts, b["attention_mask"], b["labels"], h.seg.end)
                             for h, b, f in zip(holders, batches, forwards, strict=True)],
                self.server_candidates([h.seg.end for h in holders]), self.cfg.server_chunk)
            nums = [probe_backward(f, g) for f, g in zip(forwards, grads, strict=True)]
        finally:
            for h in self.all_holders():
                h.seg.model.train()
        records = [probe_record(h.name, b["attention_mask"], b["labels"],
                                tensor_bytes(f.acts, b["attention_mask"], b["labels"]),
                                tensor_bytes(g))
                   for h, b, f, g in zip(holders, batches, forwards, grads, strict=True)]
        return Probe(holders, nums, server_nums, records)

    def clock_started(self) -> None:
        """The initial probe, which ran before the clock existed, takes its time now."""
        if self.vclock is not None:
            for records, blocks in self.uncharged_probes:
                self.vclock.probe(records, blocks)
        self.uncharged_probes = []

    def probe_batch(self, h: Holder, step: int) -> dict[str, torch.Tensor]:
        """Client ``h``'s probe batch at ``step``: the batch a distributed client draws for
        the same probe (runner/methods/hsplitlora_client.py)."""
        assert h.batches is not None
        return h.batches.sample(seeds.probe_batch(self.cfg.seed, self.clients.index(h), step))

    def _charge_probe(self, step: int, probe: Probe, asked: list[Holder]) -> None:
        """A probe round costs what a training step of the probed clients costs: the same
        forward, the server's forward and backward, a backward that (as a LoRA step's)
        computes activation gradients only, and the activations and gradients on the links.
        Both engines charge it here, to the virtual clock and to the bytes moved (the
        ``probe`` event, which analysis/derive.py's bytes_moved reads), so a method that
        probes pays for it in every comparison of time and traffic."""
        up = sum(int(r["bytes_sent"]) for r in probe.records)
        down = sum(int(r["bytes_received"]) for r in probe.records)
        self.probe_bytes += up + down
        virtual: dict[str, Any] = {}
        if self.vclock is not None and probe.records:
            before = self.vclock.now
            self.vclock.probe(probe.records, self.client_blocks())
            virtual = {"virtual_s": round(self.vclock.now - before, 6),
                       "virtual_time": round(self.vclock.now, 6)}
        elif probe.records:  # the initial probe comes before the clock: charged at its start
            self.uncharged_probes.append((probe.records, self.client_blocks()))
        done = {h.name for h in probe.holders}
        self._event("probe", step=step, clients=[h.name for h in probe.holders],
                    missing=[h.name for h in asked if h.name not in done],
                    bytes_up=up, bytes_down=down, **virtual)

    def client_candidates(self, k: int) -> list[str]:
        """The candidate weights a client with split point ``k`` scores."""
        return [n for n in self.candidates if lora.block_of(n) < k]

    def server_candidates(self, splits: list[int]) -> list[str]:
        """The candidate weights the server scores: its blocks from the lowest split up."""
        lo = min(splits)
        return [n for n in self.candidates if lora.block_of(n) >= lo]

    def _importance(self, step: int) -> dict[str, float]:
        """Smoothed global importance (uniform for the no-iwi ablation)."""
        if not self.traits.iwi:
            return {n: 1.0 for n in self.candidates}
        asked = self._online() or self.clients
        probe = self._probe(asked, step)
        self._charge_probe(step, probe, asked)
        if not probe.holders:  # nobody answered (distributed): keep the last importance
            return dict(self.tracker.values) if self.tracker.values else {
                n: 1.0 for n in self.candidates}
        weights = [h.weight for h in probe.holders]
        splits = [h.seg.end for h in probe.holders]
        holders = []
        for h, nums in zip(probe.holders, probe.clients, strict=True):
            cur = importance.current_importance(nums, self.weight_costs)
            holders.append((cur, {n: h.weight for n in cur}))
        server_cur = importance.current_importance(probe.server, self.weight_costs)
        holders.append((server_cur, {
            n: agg.participants(lora.block_of(n), splits, weights)[1] for n in server_cur}))
        return self.tracker.update(importance.global_importance(holders), step)

    # -------------------------------------------------------------------- aggregation
    def aggregate(self, step: int) -> dict[str, Any]:
        if self.traits.aggregation == registry.PADDED_FEDAVG:
            return self._aggregate_padded(step)
        return self._aggregate_naa(step)

    def _participants(self, name: str, online: list[Holder]) -> list[tuple[Holder, float]]:
        layer = lora.block_of(name)
        splits = [h.seg.end for h in online]
        weights = [h.weight for h in online]
        idx, server_w = agg.participants(layer, splits, weights)
        out = [(online[i], online[i].weight) for i in idx]
        if server_w > 0 and self.server is not None:
            out.append((self.server, server_w))
        return out

    def _weight_parts(self, online: list[Holder]):
        """Per adapted weight: its name and the NAA participants' ``(holder, factors)``."""
        states: dict[str, dict[str, torch.Tensor]] = {}
        for name in sorted({n for h in online + [self.server] for n in h.ranks}):
            yield name, [(h, f) for h, w in self._participants(name, online)
                         if (f := self._factors(h, name, w, states)) is not None]

    def _aggregate_naa(self, step: int) -> dict[str, int]:
        online = self._online()
        if not online:
            return {"bytes_up": 0, "bytes_down": 0}
        own = _PerClient()
        for name, parts in self._weight_parts(online):
            if not parts:
                continue
            factors = [f for _, f in parts]
            b_cat, a_cat = agg.naa_concat(factors)
            delta = b_cat @ a_cat  # agg.naa_delta, kept in factors for the wire
            d_in, d_out = self.costs.shapes[name]
            wire, _ = agg.wire_bytes(d_out, d_in, sum(f.rank for f in factors))
            holders = [h for h in online if lora.block_of(name) < h.seg.end]
            self.merged_ranks[name] = self.merged_ranks.get(name, 0) + int(a_cat.shape[0])
            self._merged(name, b_cat, a_cat, delta, holders)
            merged: set[int] = set()  # shared block weights (shadows) take a merge once
            for h in holders + [self.server]:
                lin = _linear(h.seg.model, name)
                if lin.weight.data_ptr() not in merged:
                    merged.add(lin.weight.data_ptr())
                    agg.merge_into(lin.weight, delta,
                                   transposed=type(lin).__name__ == "Conv1D")
            for h, f in parts:
                if h is not self.server:
                    own.add(h.name, up=tensor_bytes(f.A, f.B))
            for h in holders:
                own.add(h.name, down=wire)
        return self._record_aggregate(step, "naa", online, own)

    def _merged(self, name: str, b_cat: torch.Tensor, a_cat: torch.Tensor, delta: torch.Tensor,
                holders: list[Holder]) -> None:
        """Hook: NAA computed ``delta = b_cat @ a_cat`` for ``name``, merged by ``holders``
        (and the server). The distributed server ships it to the clients from here."""

    def _aggregate_padded(self, step: int) -> dict[str, int]:
        """Ablation: padded FedAvg of A and B over participants, truncated to each rank."""
        online = self._online()
        own = _PerClient()
        for name, parts in self._weight_parts(online):
            if len(parts) < 2:
                continue
            a, b = agg.padded_fedavg([f for _, f in parts])
            for h, f in parts:
                mine = lora.adapter_state(h.seg.model)
                with torch.no_grad():
                    mine[f"{name}.lora_A"].copy_(a[: f.rank])
                    mine[f"{name}.lora_B"].copy_(b[:, : f.rank])
                if h is not self.server:
                    own.add(h.name, up=tensor_bytes(f.A, f.B),
                            down=tensor_bytes(a[: f.rank], b[:, : f.rank]))
        return self._record_aggregate(step, "padded-fedavg", online, own)

    def after_aggregate(self, step: int) -> dict[str, int]:
        """IWI + ARMSC + re-initialisation (NAA methods only)."""
        if not self.traits.naa:
            return {}
        done = step + 1
        moved_before = self.moved_bytes
        # The merged weights now carry the adapters' update: re-initialise the adapters
        # (B = 0) before probing, so the probe sees the merged model exactly once.
        for h in self.all_holders():
            self._reinit(h, h.ranks, done)
        if done >= self.cfg.steps:  # the last aggregation: no step follows to plan for, so
            return {"bytes_up": 0, "bytes_down": 0}  # no IWI probe and no ARMSC re-plan
        imp = self._importance(done)
        members = [h.name for h in self._online()]
        budgets = [d.memory_bytes for d in self.devices]
        reason = self.trigger.reason(imp, budgets, members)
        splits = [h.seg.end for h in self.clients]
        if reason is not None and self.traits.armsc:
            cfg = self.cfg
            base = armsc.minimal_ranks(
                [n for n in self.candidates if n.endswith(self.ref_suffixes)], cfg.rank_set)
            candidate, _ = armsc.choose_splits(
                self.costs, self.devices, self.server_dev, cfg.batch_size * cfg.plan_seq, base,
                self.bounds, cfg.batch_size, self.mem_seq)
            old = armsc.makespan(self.costs, self.devices, self.server_dev, splits,
                                 cfg.batch_size * cfg.plan_seq)
            new = armsc.makespan(self.costs, self.devices, self.server_dev, candidate,
                                 cfg.batch_size * cfg.plan_seq)
            # Hysteresis only between feasible configurations: a split point that no longer
            # fits its (changed) budget moves whatever the makespan says.
            unfit = any(k != c and client_memory(self.costs, k, base, cfg.batch_size,
                                                 self.mem_seq).total > d.memory_bytes
                        for k, c, d in zip(splits, candidate, self.devices, strict=True))
            if unfit or self.trigger.apply_new_splits(old, new):
                splits = candidate
            plan = self._plan(imp, splits)
            self.trigger.accept(imp, budgets, members)
            self._apply(plan, step=done, reason=reason)
        moved = self.moved_bytes - moved_before
        return {"bytes_up": 0, "bytes_down": moved}

    # ---------------------------------------------------------------------- reporting
    def save(self, run: RunDir) -> Path:
        """PEFT export of the merged update (NAA) at each weight's true rank; the ablation
        without NAA saves its adapters as splitlora does.

        The server holds every block and takes every merge, so its weights are the whole
        model's. A run saves right after its last aggregation, whose re-initialisation left
        every live adapter at ``B = 0``: the merged weights are the whole model then.
        """
        if self.server is None or not self.traits.naa:
            return super().save(run)
        return save_merged_delta(run.adapters("final"), self.server.seg,
                                 self.info.path, self.cfg, self.candidates, self.merged_ranks)


@dataclass
class ProbeForward:
    """A client's half of an importance probe, kept until the server's gradient returns."""

    probe: importance.ImportanceProbe
    leaf: torch.Tensor
    acts: torch.Tensor


def probe_forward(seg: split.Segment, batch: dict[str, torch.Tensor],
                  names: list[str]) -> ProbeForward:
    """Client side of the IWI probe: run the segment with hooks on ``names`` from a leaf that
    requires grad (so the backward reaches every hooked output). The caller sets eval mode."""
    p = importance.ImportanceProbe(seg.model, names)
    with torch.enable_grad(), p:
        leaf = split.embed(seg, batch["input_ids"]).detach().requires_grad_(True)
        acts = split.run_blocks(seg, leaf, batch["attention_mask"], 0, seg.end)
    return ProbeForward(p, leaf, acts)


def probe_backward(fwd: ProbeForward, grad: torch.Tensor) -> dict[str, float]:
    """Client side, second half: back-propagate the server's gradient; the tensor hooks the
    forward attached fill the numerators. No parameter gradient is touched."""
    with torch.enable_grad():
        torch.autograd.grad(fwd.acts, [fwd.leaf], grad_outputs=grad.to(fwd.acts.dtype))
    return dict(fwd.probe.numerators)


def probe_server(seg: split.Segment,
                 payloads: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]],
                 names: list[str], chunk: int = 0) -> tuple[list[torch.Tensor], dict[str, float]]:
    """Server side of the IWI probe for client payloads ``(acts, mask, labels, k)``: one
    loss over every probed batch (mean over all their target tokens), hooks on ``names``;
    returns the gradient w.r.t. each client's activations and the server's numerators.

    ``chunk`` > 0 (``cfg.server_chunk``, as in ``Trainer.server_step``) differentiates the
    payloads that many at a time, each chunk's graph freed before the next: every payload's
    part of the loss depends on its own activations only, so each gradient is the same, bit
    for bit, and the numerators (sums over the hooked outputs) the same up to float summation
    order; the server's memory for the probe stops growing with the number of clients.
    """
    s_probe = importance.ImportanceProbe(seg.model, names)
    total = sum(int((labels[:, 1:] != -100).sum()) for _, _, labels, _ in payloads)
    grads: list[torch.Tensor] = []
    with torch.enable_grad(), s_probe:
        for part in server_chunks(len(payloads), chunk):
            part_payloads = payloads[part]
            wires = [a.detach().requires_grad_(True) for a, _, _, _ in part_payloads]
            loss = None
            for (_, mask, labels, k), w in zip(part_payloads, wires, strict=True):
                hidden = split.run_blocks(seg, w, mask, k, seg.end)
                rows, _ = split.head_row_losses(seg, hidden, labels)
                part = rows.sum() / max(total, 1)
                loss = part if loss is None else loss + part
            assert loss is not None
            grads.extend(torch.autograd.grad(loss, wires))
    return grads, dict(s_probe.numerators)


def save_merged_delta(out: Path, server: split.Segment, base_path: Path, cfg: TrainConfig,
                      names: list[str], merged_ranks: Mapping[str, int] | None = None,
                      tol: float = 1e-6) -> Path:
    """Write ``W_now - W_pretrained`` of every changed weight as a PEFT LoRA adapter.

    The factorisation is an SVD cut at ``merged_ranks[name]`` singular values, the sum of
    the ranks NAA merged into the weight (docs/method.md "NAA": each merge is ``B_cat A_cat`` of
    that rank, so the update has at most that rank), and below ``tol`` times the largest
    (an update of lower rank still). What the cut drops is the rounding noise of the fp32
    merges: the kept rank-``R`` part is the best approximation of the measured difference,
    off by no more than that noise's norm. A weight missing from ``merged_ranks`` (or
    ``None``: nothing known) is cut at ``tol`` only. ``lora_alpha = r`` per weight so the
    scaling is 1 and ``B A`` is the update.

    The live adapters are dropped (``unload``): callers save right after an aggregation,
    when they are fresh (``B = 0``); one that is not would be lost, so it is an error.
    """
    # the pretrained weights on the merged ones' device: the difference and its SVD run
    # there; the file gets CPU tensors (device-independent)
    where = server.device
    originals: dict[str, torch.Tensor] = {}
    for f in sorted(Path(base_path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for n in names:
                key = f"{n}.weight"
                if key in sf.keys():  # noqa: SIM118 - safe_open has no __contains__
                    originals[n] = sf.get_tensor(key).to(device=where, dtype=torch.float32)
    live = [k for k, t in lora.adapter_state(server.model).items()
            if k.endswith("lora_B") and bool(t.detach().ne(0).any())]
    if live:
        raise RuntimeError(f"save_merged_delta: live adapters not merged yet ({live[:3]}...); "
                           "save right after an aggregation")
    model = server.model.unload() if hasattr(server.model, "peft_config") else server.model
    state, ranks = {}, {}
    for n in names:
        lin = importance.base_linears(model, [n])[n]
        w = lin.weight.detach().float()
        delta = w - originals[n]
        if type(lin).__name__ == "Conv1D":
            delta = delta.T
        if float(delta.abs().max()) == 0.0:
            continue
        u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
        r = int((s > tol * s[0]).sum())
        if merged_ranks is not None and n in merged_ranks:
            r = min(r, int(merged_ranks[n]))
        if r == 0:
            continue
        root = s[:r].sqrt()
        b = (u[:, :r] * root).float().cpu().contiguous()
        a = (root[:, None] * vh[:r]).float().cpu().contiguous()
        state[f"base_model.model.{n}.lora_A.weight"] = a
        state[f"base_model.model.{n}.lora_B.weight"] = b
        ranks[n] = r
    server.model = model
    out.mkdir(parents=True, exist_ok=True)
    config = LoraConfig(r=max(ranks.values()), lora_alpha=max(ranks.values()), lora_dropout=0.0,
                        target_modules=sorted(ranks), rank_pattern=ranks, alpha_pattern=ranks,
                        fan_in_fan_out=server.family == "gpt2", task_type="CAUSAL_LM",
                        base_model_name_or_path=str(base_path))
    config.save_pretrained(str(out))
    save_file(state, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "ranks.json").write_text(json.dumps(dict(sorted(ranks.items())), indent=1))
    return out

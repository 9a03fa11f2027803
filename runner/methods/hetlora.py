"""HetLoRA (Cho et al. 2024; docs/method.md "Baselines"), in-process: every client holds the whole
model with its own rank; aggregation zero-pads the adapters to the largest rank, averages them
weighted by data and sparsity, and truncates each back to its holder's rank.

Design choice (ours): each client gets the largest rank in the rank set whose predicted
full-model training memory fits its budget (uniform over the targets). What HSplitLoRA shares
with it is runner/methods/hetero.py.
"""

from __future__ import annotations

from pathlib import Path

import torch

from runner import seeds
from runner.methods import aggregation as agg
from runner.methods.hetero import HeteroTrainer, _PerClient
from runner.methods.memory import client_memory
from runner.model import lora, split
from runner.rundir import RunDir
from runner.trainer import make_optimizer, tensor_bytes


class HetLoRATrainer(HeteroTrainer):
    """Trainer for ``hetlora``: whole-model clients, a rank per client from its budget."""

    # ------------------------------------------------------------------------- set-up
    def _build_holders(self) -> None:
        cfg = self.cfg
        names = lora.weight_names(self.config, range(self.info.num_layers), cfg.targets)
        for h, dev in zip(self.clients, self.devices, strict=True):
            fits = [r for r in sorted(cfg.rank_set) if r > 0 and client_memory(
                self.costs, self.info.num_layers, {n: r for n in names}, cfg.batch_size,
                self.mem_seq).total <= dev.memory_bytes]
            rank = max(fits) if fits else min(r for r in cfg.rank_set if r > 0)
            if not fits:
                self._budget_violation(0, f"{h.name}: full model at rank {rank} exceeds budget "
                                          f"{dev.memory_bytes / 2**20:.0f} MiB")
                self.not_runnable(0, h.name, client_memory(
                    self.costs, self.info.num_layers, {n: rank for n in names},
                    cfg.batch_size, self.mem_seq).total, dev.memory_bytes)
            h.seg = split.load_unsplit(self.info.path, cfg.precision, self.frozen, self.device)
            h.ranks = lora.attach_lora(h.seg, {n: rank for n in names}, alpha=cfg.lora_alpha,
                                       dropout=cfg.lora_dropout,
                                       seed=seeds.adapter_init(cfg.seed))
            h.opt, h.sched = make_optimizer(h.seg.model, cfg)
        self._log_config(0, "initial", [self.info.num_layers] * len(self.clients))

    # -------------------------------------------------------------------- aggregation
    def aggregate(self, step: int) -> dict[str, int]:
        online = self._online()
        own = _PerClient()
        states: dict[str, dict[str, torch.Tensor]] = {}
        names = sorted({n for h in online for n in h.ranks})
        for name in names:
            parts = [(h, f) for h in online
                     if (f := self._factors(h, name, h.weight, states)) is not None]
            if not parts:
                continue
            new = agg.hetlora_aggregate([f for _, f in parts])
            for (h, f), (a, b) in zip(parts, new, strict=True):
                mine = lora.adapter_state(h.seg.model)
                with torch.no_grad():
                    mine[f"{name}.lora_A"].copy_(a)
                    mine[f"{name}.lora_B"].copy_(b)
                own.add(h.name, up=tensor_bytes(f.A, f.B), down=tensor_bytes(a, b))
        return self._record_aggregate(step, "hetlora", online, own)

    # ---------------------------------------------------------------------- reporting
    def save(self, run: RunDir) -> Path:
        """The adapter of the online client with the largest ranks after the last aggregation
        (as fedlora's client 0)."""
        best = self.eval_holder()
        out = run.adapters("final")
        lora.save_peft_adapter(out, [best.seg], best.ranks, alpha=self.cfg.lora_alpha,
                               dropout=self.cfg.lora_dropout, base_path=str(self.info.path))
        return out

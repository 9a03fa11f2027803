"""The client side that HSplitLoRA (runner/methods/hsplitlora_client.py) and HetLoRA share in
a distributed run (docs/protocol.md, "HSplitLoRA"); HetLoRA's clients use it as it is.

:class:`HeteroClientHooks` plug into the SplitLoRA client engine (:class:`runner.client.Client`,
through runner/methods/hooks.py):

* the client has no model until the server's plan arrives: ``resync`` (at join, after a
  restart or a server roll-back) carries its split point, its ranks, the step whose seed
  initialises its adapters, and the current merged weights of its blocks (padded rules: its
  adapters); the client loads only blocks ``[0, k)`` from disk (a small device never holds
  the whole model; HetLoRA: ``k = L``);
* ``plan`` (ARMSC): new split point and ranks; blocks it takes over arrive with their
  current weights from the server; adapters re-initialised with fresh optimizer state;
* ``set`` (hetlora, hsplitlora-no-naa): this client's share of the padded aggregate.

Every message is applied once: plans by a version the server increments, shares by
aggregation step; repeats find nothing to do.
"""

from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import torch

from runner import seeds
from runner.distributed import control
from runner.distributed import protocol as P
from runner.methods import hetero_wire
from runner.methods.hooks import ClientHooks
from runner.model import lora, split
from runner.trainer import make_optimizer

if TYPE_CHECKING:
    from runner.client import Client

log = logging.getLogger("runner.client")


def block_state(seg: split.Segment) -> dict[str, torch.Tensor]:
    """A segment's frozen block weights keyed as in the unwrapped model (no peft names)."""
    return {name.replace(".base_layer", ""): p
            for name, p in split.base_model(seg.model).named_parameters()
            if ".layers." in name and "lora_" not in name}


class HeteroClientHooks(ClientHooks):
    """Client of hetlora, and what the hsplitlora client builds on: split point, ranks and
    merged weights (or adapters) come from the server."""

    snapshots = False  # a roll-back receives the checkpoint's merged weights and plan from
    # the server, which determine the whole state after an aggregation
    # applied by :meth:`apply` (the operations are registered by runner/methods/hetero_wire.py)
    handled: tuple[type, ...] = (hetero_wire.Plan, hetero_wire.SetAdapters)

    def __init__(self, client: Client):
        super().__init__(client)
        self.plan_version = -1  # last plan applied
        self.need_plan = -1  # plan the announced step builds on
        self.reinit_step = 0
        # hetlora / hsplitlora-no-naa: AdamW lives across aggregations, and a roll-back's
        # resync carries adapters, not the moments: keep them per aggregation (the last
        # three, as runner/client.py does), so a resumed run continues exactly.
        self.opt_snapshots: OrderedDict[int, dict[str, Any]] = OrderedDict()

    def load_model(self) -> tuple[split.Segment | None, lora.RankMap]:
        return None, {}

    def status(self) -> dict[str, Any]:
        seg = self.client.holder.seg
        return dict(plan=self.plan_version, split=seg.end if seg is not None else None)

    def shapes(self, h: P.Header) -> dict[str, list[int | None]] | None:
        if h.kind is P.Kind.GRAD:
            return {P.GRAD: [self.client.cfg.batch_size, None, self.client.hidden]}
        return None  # merge / plan / resync layouts depend on the plan; checked on apply

    # ------------------------------------------------------------------------ model
    def _reinit(self, ranks: lora.RankMap, step: int) -> None:
        """HeteroTrainer._reinit: adapters at ``ranks`` seeded by ``step``, fresh optimizer
        continuing the run's schedule at ``step``."""
        c = self.client
        h, cfg = c.holder, c.cfg
        if hasattr(h.seg.model, "peft_config"):
            h.seg.model = h.seg.model.unload()
        h.ranks = lora.attach_lora(h.seg, ranks, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                                   seed=seeds.adapter_init(cfg.seed, step))
        made = make_optimizer(h.seg.model, cfg, start_step=step)
        h.opt, h.sched = made if made is not None else (None, None)
        h.seg.model.train()
        self.reinit_step = step
        c.adapter_shapes = {k: list(v.shape) for k, v in lora.adapter_state(h.seg.model).items()}

    def _load_segment(self, k: int, weights: dict[str, torch.Tensor], keep_old: bool) -> None:
        """Blocks ``[0, k)`` from disk, then (``keep_old``) this client's current weights of
        the blocks it keeps, then ``weights`` from the server (merged or handed-over)."""
        c = self.client
        L = c.info.num_layers
        if not 1 <= k <= L:
            raise ValueError(f"split point {k} outside [1, {L}]")
        # k = L: the whole model (hetlora clients)
        p = c.cfg.precision
        new = (split.load_unsplit(c.info.path, p, device=c.device) if k == L
               else split.load_client(c.info.path, k, p, device=c.device))
        target = block_state(new)
        bad = [n for n, t in weights.items()
               if n not in target or tuple(target[n].shape) != tuple(t.shape)]
        if bad:
            raise ValueError(f"weight {bad[0]!r} does not fit split point {k}")
        with torch.no_grad():
            if keep_old and c.holder.seg is not None:
                for name, t in block_state(c.holder.seg).items():
                    if name in target:
                        target[name].copy_(t)
            for name, t in weights.items():
                target[name].copy_(t)
        c.holder.seg = new

    # ---------------------------------------------------------------------- messages
    def handle(self, msg: P.Message, ctrl: control.Control | None) -> bool:
        c = self.client
        if isinstance(ctrl, self.handled):
            if ctrl.epoch != c.epoch:
                return True  # from before a server restart, or ahead of our resync
            op = control.op_name(ctrl)
            try:
                c.busy = (op, msg.step)
                self.apply(ctrl, msg.tensors)
            except ValueError as e:  # a layout that does not fit our blocks: not applied
                log.warning("%s of step %d not applied: %s", op, msg.step, e)
            finally:
                c.busy = None
            return True
        # the server sends each client its own share (set, merge), never a broadcast aggregate
        return msg.kind is P.Kind.GLOBAL

    def apply(self, ctrl: control.Control, tensors: dict[str, torch.Tensor]) -> None:
        """One of the operations in :attr:`handled`, of this client's epoch."""
        if isinstance(ctrl, hetero_wire.SetAdapters):
            self.set_adapters(ctrl.step, tensors)
        else:
            assert isinstance(ctrl, hetero_wire.Plan)
            self.plan(ctrl, tensors)

    def after_handle(self, msg: P.Message, ctrl: control.Control | None) -> None:
        c = self.client
        if isinstance(ctrl, control.Step) and ctrl.step == c.announced:
            self.need_plan = max(self.need_plan, -1 if ctrl.plan is None else ctrl.plan)

    def set_adapters(self, step: int, tensors: dict[str, torch.Tensor]) -> None:
        """hetlora / hsplitlora-no-naa: this client's adapters after the aggregation (the
        padded average truncated to its ranks)."""
        c = self.client
        if step <= c.global_step or c.holder.seg is None:
            return
        self._load_adapters(tensors)
        c.pending = None
        c.global_step = step
        self._snapshot_optimizer(step)

    def _snapshot_optimizer(self, step: int) -> None:
        """AdamW moments and schedule as of aggregation ``step`` (padded methods only: with
        NAA every aggregation re-initialises adapters and optimizer, so there is nothing to
        keep)."""
        h = self.client.holder
        if self.client.traits.naa or h.opt is None or h.sched is None:
            return
        self.opt_snapshots[step] = {"opt": copy.deepcopy(h.opt.state_dict()),
                                    "sched": copy.deepcopy(h.sched.state_dict()),
                                    "drawn": self.client.drawn, "reinit": self.reinit_step}
        while len(self.opt_snapshots) > 3:
            self.opt_snapshots.popitem(last=False)

    def _restore_optimizer(self, g: int, drawn: int) -> bool:
        """After a roll-back to aggregation ``g``: its AdamW state, when this process kept it
        and its stream position is the server's (else the moments start afresh)."""
        snap = self.opt_snapshots.get(g)
        h = self.client.holder
        if (snap is None or snap["drawn"] != drawn or snap["reinit"] != self.reinit_step
                or h.opt is None or h.sched is None):
            return False
        h.opt.load_state_dict(copy.deepcopy(snap["opt"]))
        h.sched.load_state_dict(copy.deepcopy(snap["sched"]))
        return True

    def _load_adapters(self, tensors: dict[str, torch.Tensor]) -> None:
        model = self.client.holder.seg.model
        mine = lora.adapter_state(model)
        for k, v in tensors.items():
            if k not in mine or tuple(mine[k].shape) != tuple(v.shape):
                raise ValueError(f"adapter {k!r} {tuple(v.shape)} does not fit this client")
        lora.load_adapter_state(model, tensors)

    def plan(self, p: hetero_wire.Plan, tensors: dict[str, torch.Tensor]) -> None:
        """ARMSC: new split point and ranks (blocks taken over arrive with the message)."""
        c, spec = self.client, p.spec
        if spec.version <= self.plan_version or c.holder.seg is None:
            return
        if spec.split != c.holder.seg.end:
            old = c.holder.seg.end
            self._load_segment(spec.split, tensors, keep_old=True)
            log.info("split point %d -> %d (%d tensors handed over)", old, spec.split,
                     len(tensors))
        self._reinit(spec.ranks, spec.reinit)
        self.plan_version = spec.version

    def resync(self, r: control.Resync, tensors: dict[str, torch.Tensor]) -> None:
        """Join, rejoin or roll back: segment at the plan's split point with the server's
        merged weights, adapters at the plan's ranks, stream at the server's position."""
        with self.client.working("resync", r.global_):
            self._resync(r, tensors)

    def _resync(self, r: control.Resync, tensors: dict[str, torch.Tensor]) -> None:
        c = self.client
        try:  # the plan is this method's part of the core resync: validated here, first
            plan = hetero_wire.plan_of(r)
        except control.ControlError as e:
            log.warning("resync of aggregation %d refused: %s", r.global_, e)
            return
        if plan is None:
            log.warning("resync without a plan; ignored")
            return
        g = r.global_
        adapters = {k: v for k, v in tensors.items() if k.endswith((".lora_A", ".lora_B"))}
        weights = {k: v for k, v in tensors.items() if k not in adapters}
        try:
            self._load_segment(plan.split, weights, keep_old=False)
            self._reinit(plan.ranks, plan.reinit)
            self._load_adapters(adapters)  # hetlora / no-naa: the aggregate's share
        except ValueError as e:
            log.warning("resync not applied: %s", e)
            return
        self.plan_version = self.need_plan = plan.version
        drawn = r.drawn
        if r.mode == "rollback":
            if not c.traits.naa:
                how = "exact" if self._restore_optimizer(g, drawn) else "fresh"
                log.info("optimizer state of aggregation %d: %s", g, how)
            c._reset_stream(drawn)
            c.done_step = c.announced = c.uploaded = c.need_global = g
            c.sit_out = -1  # the resumed server announces who sits out again
            c.compute = None  # its steps after g are undone: no resources record for them
        elif c.fresh:
            c._reset_stream(drawn)
        c.pending = None
        self.rounds_over()
        c.global_step = g
        if r.epoch is not None:
            c.epoch = r.epoch
        c.synced = True
        log.info("resynchronised (%s) at aggregation %d: split %d, %d adapted weights",
                 r.mode, g, c.holder.seg.end, len(c.holder.ranks))

    def rounds_over(self) -> None:
        """A resync applied: exchanges of the method's own in flight are over (HSplitLoRA's
        probes)."""

    def advance(self) -> bool:
        c = self.client
        if not c.synced or c.holder.seg is None:
            return True
        return self.plan_version < self.need_plan

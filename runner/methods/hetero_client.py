"""A client process of a distributed HSplitLoRA run (method.md "IWI", "ARMSC", "NAA").

:class:`HeteroClientHooks` plug into the SplitLoRA client engine (:class:`runner.client.Client`,
through runner/methods/hooks.py) with what HSplitLoRA puts on the wire (docs/protocol.md,
"HSplitLoRA"):

* the client has no model until the server's plan arrives: ``resync`` (at join, after a
  restart or a server roll-back) carries its split point, its ranks, the step whose seed
  initialises its adapters, and the current merged weights of its blocks; the client loads
  only blocks ``[0, k)`` from disk (a small device never holds the whole model);
* ``merge`` (after every aggregation): the NAA factors ``[p_j s_j B_j | ...]``,
  ``[A_j; ...]`` (or the dense ``dW`` when smaller) of every adapted weight in its blocks;
  the client adds ``dW`` to its frozen weights and re-initialises its adapters (B = 0);
* ``probe``: one IWI probe batch: forward with importance hooks, activations up, the
  server's gradient back, the numerators ``sum <dL/dy, W x>`` of its weights up;
* ``plan`` (ARMSC): new split point and ranks; blocks it takes over arrive with their
  current weights from the server; adapters re-initialised with fresh optimizer state.

Every message is applied once: merges are keyed by aggregation step, plans by a version the
server increments, probes by step; repeats find nothing to do (a repeated probe request
re-sends the cached answer).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import torch

from runner import seeds
from runner.distributed import control
from runner.distributed import protocol as P
from runner.distributed.transport import TransportError
from runner.methods import aggregation as agg
from runner.methods import importance
from runner.methods.hetero import ProbeForward, probe_backward, probe_forward
from runner.methods.hooks import ClientHooks
from runner.model import lora, split
from runner.model.models import load_config as load_model_config
from runner.trainer import make_optimizer

if TYPE_CHECKING:
    from runner.client import Client

log = logging.getLogger("runner.client")
HANDLED = (control.Merge, control.Probe, control.Plan, control.SetAdapters)


def block_state(seg: split.Segment) -> dict[str, torch.Tensor]:
    """A segment's frozen block weights keyed as in the unwrapped model (no peft names)."""
    return {name.replace(".base_layer", ""): p
            for name, p in split.base_model(seg.model).named_parameters()
            if ".layers." in name and "lora_" not in name}


class HeteroClientHooks(ClientHooks):
    """HSplitLoRA client: split point, ranks and merged weights come from the server."""

    snapshots = False  # a roll-back receives the checkpoint's merged weights and plan from
    # the server, which determine the whole state after an aggregation

    def __init__(self, client: Client):
        super().__init__(client)
        self.candidates: list[str] = []
        self.plan_version = -1  # last plan applied
        self.need_plan = -1  # plan the announced step builds on
        self.reinit_step = 0
        self.probe_req: tuple[int, int] | None = None  # (probe step, global it follows)
        self.probe_fwd: tuple[int, ProbeForward, dict[str, Any]] | None = None
        self.probe_done: tuple[int, dict[str, float], int] | None = None  # step, nums, drawn
        # hetlora / hsplitlora-no-naa: AdamW lives across aggregations, and a roll-back's
        # resync carries adapters, not the moments: keep them per aggregation (the last
        # three, as runner/client.py does), so a resumed run continues exactly.
        self.opt_snapshots: OrderedDict[int, dict[str, Any]] = OrderedDict()

    def load_model(self) -> tuple[split.Segment | None, lora.RankMap]:
        self.candidates = lora.all_candidates(load_model_config(self.client.info.path))
        return None, {}

    def status(self) -> dict[str, Any]:
        seg = self.client.holder.seg
        return dict(plan=self.plan_version, split=seg.end if seg is not None else None,
                    probe=self.probe_done[0] if self.probe_done else None)

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
        new = (split.load_unsplit(c.info.path, p) if k == L
               else split.load_client(c.info.path, k, p))
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
        c, meta = self.client, msg.meta
        if isinstance(ctrl, HANDLED):
            if ctrl.epoch != c.epoch:
                return True  # from before a server restart, or ahead of our resync
            op = meta["op"]
            try:
                c.busy = (op, msg.step)
                if isinstance(ctrl, control.Merge):
                    self.merge(ctrl, msg.tensors)
                elif isinstance(ctrl, control.Probe):
                    self.on_probe(ctrl)
                elif isinstance(ctrl, control.SetAdapters):
                    self.set_adapters(ctrl.step, msg.tensors)
                else:
                    self.plan(ctrl, msg.tensors)
            except ValueError as e:  # a layout that does not fit our blocks: not applied
                log.warning("%s of step %d not applied: %s", op, msg.step, e)
            finally:
                c.busy = None
            return True
        if msg.kind is P.Kind.GRAD and meta.get("probe"):
            self.probe_grad(msg)
            return True
        # HSplitLoRA sends merges per client, never a broadcast aggregate
        return msg.kind is P.Kind.GLOBAL

    def after_handle(self, msg: P.Message, ctrl: control.Control | None) -> None:
        c = self.client
        if isinstance(ctrl, control.Step):
            step = ctrl.step
            if step == c.announced:
                self.need_plan = max(self.need_plan, -1 if ctrl.plan is None else ctrl.plan)
            # Training at or past a probe's step means that probe round is over (we were
            # late, or its requests arrived after a resync): drop it.
            if self.probe_req is not None and step >= self.probe_req[0]:
                self.probe_req = None
            if self.probe_fwd is not None and step >= self.probe_fwd[0]:
                self.probe_fwd = None

    def merge(self, m: control.Merge, tensors: dict[str, torch.Tensor]) -> None:
        """NAA: ``W <- W + dW`` for every adapted weight of our blocks, then fresh adapters."""
        c = self.client
        step, forms = m.step, m.forms
        if step <= c.global_step or c.holder.seg is None:
            return
        linears = importance.base_linears(c.holder.seg.model, list(forms))
        deltas = {}
        for name, form in forms.items():
            lin = linears.get(name)
            if lin is None:
                raise ValueError(f"{name!r} is not in blocks [0, {c.holder.seg.end})")
            parts = ([f"{name}.B", f"{name}.A"] if form == "factors" else [f"{name}.delta"])
            if any(x not in tensors for x in parts):
                raise ValueError(f"{name}: missing {parts}")
            if form == "factors":
                b, a = tensors[parts[0]], tensors[parts[1]]
                if b.ndim != 2 or a.ndim != 2 or b.shape[1] != a.shape[0]:
                    raise ValueError(f"{name}: factors {tuple(b.shape)} x {tuple(a.shape)}")
                delta = b @ a
            else:
                delta = tensors[parts[0]]
            transposed = type(lin).__name__ == "Conv1D"
            want = tuple(lin.weight.shape[::-1] if transposed else lin.weight.shape)
            if tuple(delta.shape) != want:
                raise ValueError(f"{name}: update {tuple(delta.shape)}, weight {want}")
            deltas[name] = (lin, delta, transposed)
        for lin, delta, transposed in deltas.values():
            agg.merge_into(lin.weight, delta, transposed=transposed)
        self._reinit(c.holder.ranks, m.reinit)
        c.pending = None
        c.global_step = step
        log.info("merged %d weights of aggregation %d", len(deltas), step)

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

    def plan(self, p: control.Plan, tensors: dict[str, torch.Tensor]) -> None:
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
        c, plan = self.client, r.plan
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
        self.probe_req = self.probe_fwd = self.probe_done = None
        c.global_step = g
        if r.epoch is not None:
            c.epoch = r.epoch
        c.synced = True
        log.info("resynchronised (%s) at aggregation %d: split %d, %d adapted weights",
                 r.mode, g, c.holder.seg.end, len(c.holder.ranks))

    # ------------------------------------------------------------------------ probes
    def on_probe(self, pr: control.Probe) -> None:
        step = pr.step
        if self.probe_done is not None and self.probe_done[0] == step:
            self._send_numerators()  # our answer got lost
        elif self.probe_fwd is not None and self.probe_fwd[0] == step:
            self._send_probe_acts()  # our activations got lost
        elif self.probe_fwd is None:
            self.probe_req = (step, pr.global_)

    def advance(self) -> bool:
        c = self.client
        if not c.synced or c.holder.seg is None:
            return True
        if self.probe_req is not None:
            if c.global_step >= self.probe_req[1] and c.pending is None:
                self._probe_forward(self.probe_req[0])
            return True
        return self.probe_fwd is not None or self.plan_version < self.need_plan

    def _probe_forward(self, step: int) -> None:
        with self.client.working("probe", step):
            self._probe_forward_now(step)

    def _probe_forward_now(self, step: int) -> None:
        c = self.client
        seg = c.holder.seg
        batch = c.batches.next()
        c.drawn += 1
        seg.model.eval()
        try:
            fwd = probe_forward(seg, batch, [n for n in self.candidates
                                             if lora.block_of(n) < seg.end])
        finally:
            seg.model.train()
        tensors = {P.ACTS: fwd.acts.detach(), P.MASK: batch["attention_mask"],
                   P.LABELS: batch["labels"]}
        self.probe_fwd = (step, fwd, tensors)
        self.probe_req = None
        self._send_probe_acts()

    def _send_probe_acts(self) -> None:
        c = self.client
        assert c.t is not None and self.probe_fwd is not None
        step, _, tensors = self.probe_fwd
        try:
            c.t.send(P.Kind.ACT, step, tensors, {"probe": True, "drawn": c.drawn,
                                                 "inc": c.incarnation, "epoch": c.epoch},
                     wire=c.rt.options.wire)
        except TransportError as e:
            log.warning("probe activations of step %d not sent: %s", step, e)

    def probe_grad(self, msg: P.Message) -> None:
        c = self.client
        if self.probe_fwd is None or self.probe_fwd[0] != msg.step:
            return
        step, fwd, _ = self.probe_fwd
        grad = msg.tensors[P.GRAD]
        if grad.shape != fwd.acts.shape:
            log.warning("probe gradient of step %d has shape %s, activations %s; ignored",
                        step, tuple(grad.shape), tuple(fwd.acts.shape))
            return
        with c.working("probe", step):
            nums = probe_backward(fwd, grad)
        self.probe_fwd = None
        self.probe_done = (step, {n: v for n, v in nums.items() if math.isfinite(v)},
                           c.drawn)
        self._send_numerators()

    def _send_numerators(self) -> None:
        c = self.client
        assert c.t is not None and self.probe_done is not None
        step, nums, drawn = self.probe_done
        try:
            c.t.send(P.Kind.ADAPT, step, {}, {"probe": step, "importance": nums,
                                              "drawn": drawn, "inc": c.incarnation,
                                              "epoch": c.epoch, "sent": time.time()})
        except TransportError as e:
            log.warning("importance of step %d not sent: %s", step, e)

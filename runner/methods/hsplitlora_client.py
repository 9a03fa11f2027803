"""A client process of a distributed HSplitLoRA run (docs/method.md "IWI", "ARMSC", "NAA").

:class:`HSplitLoRAClientHooks` plug into the SplitLoRA client engine
(:class:`runner.client.Client`, through runner/methods/hooks.py) with what HSplitLoRA puts on
the wire (docs/protocol.md, "HSplitLoRA"); what HetLoRA's clients share with them (``resync``,
``plan``, the padded rules' ``set``) is runner/methods/hetero_client.py:

* the client has no model until the server's plan arrives: ``resync`` (at join, after a
  restart or a server roll-back) carries its split point, its ranks, the step whose seed
  initialises its adapters, and the current merged weights of its blocks; the client loads
  only blocks ``[0, k)`` from disk (a small device never holds the whole model);
* ``merge`` (after every aggregation): the NAA factors ``[p_j s_j B_j | ...]``,
  ``[A_j; ...]`` (or the dense ``dW`` when smaller) of every adapted weight in its blocks;
  the client adds ``dW`` to its frozen weights and re-initialises its adapters (B = 0);
* ``probe``: one IWI probe batch (from its own probe stream, never its training batches):
  forward with importance hooks, activations up, the server's gradient back, the
  numerators ``sum <dL/dy, W x>`` of its weights up;
* ``plan`` (ARMSC): new split point and ranks; blocks it takes over arrive with their
  current weights from the server; adapters re-initialised with fresh optimizer state.

Every message is applied once: merges are keyed by aggregation step, plans by a version the
server increments, probes by step; repeats find nothing to do (a repeated probe request
re-sends the cached answer).
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any

import torch

from runner import device as placement
from runner import seeds
from runner.distributed import control
from runner.distributed import protocol as P
from runner.distributed.transport import TransportError
from runner.methods import aggregation as agg
from runner.methods import hetero_wire, importance
from runner.methods.hetero_client import HeteroClientHooks
from runner.methods.hsplitlora import ProbeForward, probe_backward, probe_forward
from runner.model import lora, split
from runner.model.models import load_config as load_model_config

if TYPE_CHECKING:
    from runner.client import Client

log = logging.getLogger("runner.client")


class HSplitLoRAClientHooks(HeteroClientHooks):
    """HSplitLoRA client: NAA merges and IWI probes on top of the plans and resyncs."""

    handled = (hetero_wire.Merge, hetero_wire.Probe, *HeteroClientHooks.handled)

    def __init__(self, client: Client):
        super().__init__(client)
        self.candidates: list[str] = []
        self.probe_req: tuple[int, int] | None = None  # (probe step, global it follows)
        self.probe_fwd: tuple[int, ProbeForward, dict[str, Any]] | None = None
        self.probe_done: tuple[int, dict[str, float], int] | None = None  # step, nums, drawn

    def load_model(self) -> tuple[split.Segment | None, lora.RankMap]:
        cfg = self.client.cfg
        self.candidates = lora.candidates(load_model_config(self.client.info.path),
                                          cfg.candidates, cfg.targets)
        return super().load_model()

    def status(self) -> dict[str, Any]:
        return {**super().status(),
                "probe": self.probe_done[0] if self.probe_done else None}

    # ---------------------------------------------------------------------- messages
    def handle(self, msg: P.Message, ctrl: control.Control | None) -> bool:
        if msg.kind is P.Kind.GRAD and hetero_wire.is_probe_grad(msg):
            self.probe_grad(msg)
            return True
        return super().handle(msg, ctrl)

    def apply(self, ctrl: control.Control, tensors: dict[str, torch.Tensor]) -> None:
        if isinstance(ctrl, hetero_wire.Merge):
            self.merge(ctrl, tensors)
        elif isinstance(ctrl, hetero_wire.Probe):
            self.on_probe(ctrl)
        else:
            super().apply(ctrl, tensors)

    def after_handle(self, msg: P.Message, ctrl: control.Control | None) -> None:
        super().after_handle(msg, ctrl)
        if isinstance(ctrl, control.Step):
            step = ctrl.step
            # Training at or past a probe's step means that probe round is over (we were
            # late, or its requests arrived after a resync): drop it.
            if self.probe_req is not None and step >= self.probe_req[0]:
                self.probe_req = None
            if self.probe_fwd is not None and step >= self.probe_fwd[0]:
                self.probe_fwd = None

    def merge(self, m: hetero_wire.Merge, tensors: dict[str, torch.Tensor]) -> None:
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

    def rounds_over(self) -> None:
        self.probe_req = self.probe_fwd = self.probe_done = None

    # ------------------------------------------------------------------------ probes
    def on_probe(self, pr: hetero_wire.Probe) -> None:
        step = pr.step
        if self.probe_done is not None and self.probe_done[0] == step:
            self._send_numerators()  # our answer got lost
        elif self.probe_fwd is not None and self.probe_fwd[0] == step:
            self._send_probe_acts()  # our activations got lost
        elif self.probe_fwd is None:
            self.probe_req = (step, pr.global_)

    def advance(self) -> bool:
        c = self.client
        if c.synced and c.holder.seg is not None:
            if self.probe_req is not None:
                if c.global_step >= self.probe_req[1] and c.pending is None:
                    self._probe_forward(self.probe_req[0])
                return True
            if self.probe_fwd is not None:
                return True
        return super().advance()

    def _probe_forward(self, step: int) -> None:
        with self.client.working("probe", step):
            self._probe_forward_now(step)

    def _probe_forward_now(self, step: int) -> None:
        c = self.client
        seg = c.holder.seg
        # the probe stream, not the training stream: c.drawn does not move
        assert c.batches is not None
        batch = placement.to(c.batches.sample(seeds.probe_batch(c.cfg.seed, c.index, step)),
                             seg.device)
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

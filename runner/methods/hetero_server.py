"""The server of a distributed HSplitLoRA run (method.md "IWI", "ARMSC", "NAA"), its
ablations and HetLoRA.

:class:`HeteroServerHooks` plug into the SplitLoRA server engine (:class:`runner.server.Server`,
through runner/methods/hooks.py); the training maths is the in-process
:class:`runner.methods.hetero.HeteroTrainer`, unchanged: the trainer's
client holders are *shadows* of the real clients (same split point, ranks and merged block
weights; their adapters are loaded from the clients' uploads at every aggregation). Only the
steps that need a client's data or state go over the wire (docs/protocol.md, "HSplitLoRA"):

1. training steps: as SplitLoRA, but each client at its own split point (the server batches
   equal split points together, deepest first, exactly as in-process);
2. aggregation: the clients upload their adapters; NAA runs on the shadows and the server's
   blocks; each client receives ``merge``: the concatenated factors (or the dense update
   when smaller) of the weights in its blocks, merges them and re-initialises its adapters;
3. IWI: ``probe``: each online client runs one probe batch with importance hooks and sends
   the boundary activations; the server runs its blocks with its own hooks, returns the
   gradients, and the clients send their numerators back;
4. ARMSC: the trainer re-plans; every client receives ``plan`` (split point, ranks, the step
   that seeds its adapters) and, if its split point moved up, the current weights of the
   blocks it takes over (the bytes are counted as in-process).

A returning or restarted client is resynchronised with its plan and the current merged
weights of its blocks; after ``--resume`` every client rolls back to the checkpoint's merged
weights and plan (written after every aggregation), which determine the whole state.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from runner.distributed import control
from runner.distributed import protocol as P
from runner.distributed.runtime import meta_int
from runner.emulation.vtime import StepClock
from runner.methods import aggregation as agg
from runner.methods.hetero import HeteroTrainer, Probe, _linear, probe_server
from runner.methods.hooks import ServerHooks
from runner.model import lora, split
from runner.trainer import Holder

if TYPE_CHECKING:
    from runner.server import Peer, Server

log = logging.getLogger("runner.server")


class ShadowTrainer(HeteroTrainer):
    """HeteroTrainer whose clients are shadows of remote processes.

    The initial plan waits for the clients (its probe needs their data); probes go through
    the server (``net``: the hooks, which own the probe round); NAA's per-weight results and
    split moves are recorded for the wire.
    """

    def __init__(self, cfg: Any, net: HeteroServerHooks, prepared: Any):
        self.net = net
        self.deferred = True
        super().__init__(cfg, None, None, prepared)

    def initial_plan(self) -> None:
        if not self.deferred:
            super().initial_plan()

    def _probe(self, holders: list[Holder]) -> Probe:
        return self.net.probe_round(holders)

    def _merged(self, name: str, b_cat: torch.Tensor, a_cat: torch.Tensor, delta: torch.Tensor,
                holders: list[Holder]) -> None:
        self.net.outbox.append((name, b_cat, a_cat, delta, {h.name for h in holders}))

    def _move_split(self, h: Holder, k: int, step: int) -> None:
        self.net.moved.setdefault(h.name, h.seg.end)
        super()._move_split(h, k, step)

    def summary_extra(self) -> dict[str, Any]:
        """Plus the IWI probes' bytes (in-process runs do not count them)."""
        return {**super().summary_extra(), "probe_bytes": self.net.probe_bytes}


class HeteroServerHooks(ServerHooks):
    """Server side of hsplitlora (and its ablations) and hetlora."""

    def __init__(self, server: Server):
        super().__init__(server)
        self.outbox: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, set[str]]] = []
        self.moved: dict[str, int] = {}  # client -> split point before this round's moves
        self.merged_names: set[str] = set()  # weights that differ from the pretrained ones
        self.plan_version = 0  # 0: split points without adapters (before the first probe)
        self.plan_reinit = 0
        self.plan_sent_at = 0.0
        self.probe_at = 0
        self.probe_step: int | None = None
        self.probe_expected: set[str] = set()
        self.probe_acts: dict[str, P.Message] = {}
        self.probe_nums: dict[str, dict[str, float]] = {}
        self.probe_bytes = 0
        self.shapes: dict[str, dict[str, list[int]]] = {}
        self.build_violations: list[str] = []
        self.by_name: dict[str, Peer] = {}

    def make_trainer(self) -> ShadowTrainer:
        return ShadowTrainer(self.server.cfg, self, self.server.prep)

    def ready(self) -> None:
        self.build_violations = list(self.htr.violations)
        self.by_name = {p.name: p for p in self.server.peers.values()}
        self._refresh_shapes()

    @property
    def naa(self) -> bool:
        """NAA methods merge and re-plan after every aggregation; hetlora and
        hsplitlora-no-naa send each client its share of a padded average instead."""
        return self.server.traits.naa

    @property
    def htr(self) -> ShadowTrainer:
        tr = self.server.tr
        assert isinstance(tr, ShadowTrainer)
        return tr

    def shadow(self, p: Peer) -> Holder:
        return self.server.tr.clients[p.index]

    def split_of(self, p: Peer) -> int:
        return self.shadow(p).seg.end

    def upload_shapes(self, h: P.Header) -> dict[str, list[int]]:
        if h.meta.get("probe") is not None:
            return {}  # importance numerators travel in the meta
        return self.shapes.get(h.client, {})

    def _refresh_shapes(self) -> None:
        self.shapes = {p.cid: {k: list(v.shape) for k, v in
                               lora.adapter_state(self.shadow(p).seg.model).items()}
                       for p in self.server.peers.values()}

    # ------------------------------------------------------------------------ start
    def joined(self, p: Peer) -> bool:
        """Resynchronised by this server (its epoch)."""
        return p.online and bool(p.status.get("synced")) \
            and p.status.get("epoch") == self.server.epoch

    def start(self) -> None:
        """The initial plan (probe on the clients' data, ARMSC, adapters), unless resumed."""
        tr = self.htr
        if self.plan_version > 0:
            return  # resumed: the checkpoint holds the plan
        for v in self.build_violations:  # found before the run directory was open
            self.server.event("budget_violation", step=0, detail=v)
        tr.deferred = False
        if tr.server is not None:  # hetlora has no server segment and plans nothing
            self._sync_offline()
            self.probe_at = 0
            tr.initial_plan()
        self.publish_plan(0)

    def _sync_offline(self) -> None:
        self.server.tr.offline = {p.name for p in self.server.peers.values() if not p.online}

    # ------------------------------------------------------------------- messages
    def on_act(self, p: Peer, msg: P.Message) -> bool:
        if not msg.meta.get("probe"):
            return False
        if msg.step == self.probe_step and p.cid in self.probe_expected:
            if p.cid not in self.probe_acts:
                self.probe_acts[p.cid] = msg
                p.drawn = meta_int(msg.meta, "drawn", p.drawn)
        elif msg.step > self.probe_at:
            self.server._reject(p, msg, "future-step", f"probe activations for step {msg.step}")
        return True

    def on_adapt(self, p: Peer, msg: P.Message) -> bool:
        if msg.meta.get("probe") is None:
            return False
        if msg.step != self.probe_step or p.cid not in self.probe_acts:
            return True  # late or repeated
        nums = msg.meta.get("importance")
        mine = set(self.htr.client_candidates(self.split_of(p)))
        if not isinstance(nums, dict) or not all(
                k in mine and isinstance(v, int | float) and not isinstance(v, bool)
                and math.isfinite(v) for k, v in nums.items()):
            self.server._reject(p, msg, "bad-meta", "importance must map this client's "
                                                    "candidate weights to finite numbers")
            return True
        self.probe_nums.setdefault(p.cid, {k: float(v) for k, v in nums.items()})
        p.drawn = meta_int(msg.meta, "drawn", p.drawn)
        return True

    def budget_changed(self, p: Peer, old: int | None, new: int,
                       meta: dict[str, Any]) -> None:
        """A budget change feeds ARMSC (method.md "Trigger"): an injected budget is the
        device's new budget as stated; a measured one (NVML, cgroup) scales the planned
        budget by its change since the first report (what it measures includes the runtime
        reserve and the emulation's rescaling, so only its ratio carries over)."""
        dev = self.htr.devices[p.index]
        if meta.get("budget_source") == "injected":
            target = new
        elif old is not None:
            target = int(dev.memory_bytes * new / old)
        else:
            return  # the first measured report is the baseline of the planned budget
        if target != dev.memory_bytes:
            self.htr.set_budget(p.index, target)
            self.server.event("armsc_budget", step=max(self.server.current, 0), client=p.name,
                              previous_bytes=dev.memory_bytes, budget_bytes=target,
                              source=str(meta.get("budget_source", "?")))

    def stale(self, p: Peer, status: dict[str, Any], now: float) -> bool:
        """A client that missed a plan (lost message, pause) is resynchronised."""
        return (status.get("busy") is None and meta_int(status, "plan") < self.plan_version
                and now - max(self.plan_sent_at, self.server.awake_at) > self.global_grace())

    def step_plan(self) -> int | None:
        return self.plan_version

    # ------------------------------------------------------------------------ probe
    def probe_round(self, holders: list[Holder]) -> Probe:
        """IWI over the wire for the online clients among ``holders`` (one batch each)."""
        s, tr = self.server, self.htr
        step = self.probe_at
        peers = [self.by_name[h.name] for h in holders if self.by_name[h.name].online]
        self.probe_step, self.probe_acts, self.probe_nums = step, {}, {}
        self.probe_expected = {p.cid for p in peers}

        def ask(p: Peer) -> None:
            s.tell(control.Probe(step, s.global_step, s.epoch), to=p.cid)

        for p in peers:
            ask(p)
        s.wait_for(lambda: [p for p in peers if p.online and p.cid not in self.probe_acts],
                   step, "probe", ask)
        answered = [p for p in peers if p.cid in self.probe_acts]
        server_nums: dict[str, float] = {}
        if answered:
            msgs = [self.probe_acts[p.cid] for p in answered]
            srv = tr.server
            assert srv is not None
            srv.seg.model.eval()
            try:
                grads, server_nums = probe_server(
                    srv.seg, [(m.tensors[P.ACTS], m.tensors[P.MASK], m.tensors[P.LABELS],
                               self.split_of(p)) for p, m in zip(answered, msgs, strict=True)],
                    tr.server_candidates([self.split_of(p) for p in answered]))
            finally:
                srv.seg.model.train()
            sent = {}

            def give(p: Peer) -> None:
                sent[p.cid] = s.send(P.Kind.GRAD, step, {P.GRAD: grads[answered.index(p)]},
                                     {"probe": True}, to=p.cid, wire=s.o.wire)

            for p in answered:
                give(p)
            s.wait_for(lambda: [p for p in answered
                                if p.online and p.cid not in self.probe_nums],
                       step, "probe", give)
            self.probe_bytes += sum(m.nbytes for m in msgs) + sum(
                x.nbytes for x in sent.values() if x is not None)
        done = [p for p in answered if p.cid in self.probe_nums]
        s.event("probe", step=step, clients=[p.name for p in done],
                missing=[p.name for p in peers if p not in done])
        self.probe_step = None
        s.global_sent_at = time.monotonic()
        return Probe([self.shadow(p) for p in done], [self.probe_nums[p.cid] for p in done],
                     server_nums)

    # ------------------------------------------------------------------ aggregation
    def aggregate(self, step: int, participants: list[str]) -> dict[str, Any]:
        """Uploads -> shadows; NAA; merges out; IWI probe; ARMSC plan out."""
        s, tr = self.server, self.htr
        got = s.collect_uploads(step, participants)
        names = {p.name for p in got}
        tr.offline = {h.name for h in tr.clients if h.name not in names}
        for p in got:
            msg = s.adapts[p.cid]
            lora.load_adapter_state(self.shadow(p).seg.model, msg.tensors)
            p.agg_drawn = meta_int(msg.meta, "drawn", p.drawn)
        self.outbox = []
        bytes_ = tr.aggregate(step) if got else {"bytes_up": 0, "bytes_down": 0}
        s.global_step = step
        if not self.naa:
            return self._aggregate_padded(step, got, bytes_)
        # Online clients that did not take part (they joined or were skipped this round)
        # still hold blocks that changed: their shadows take the server's merged weights,
        # and they get the same merge message.
        late = [p for p in s.peers.values() if p.online and p.name not in names]
        for p in late:
            seg = self.shadow(p).seg
            if hasattr(seg.model, "peft_config"):  # after_aggregate re-attaches adapters
                seg.model = seg.model.unload()
            tr._sync_blocks(seg, seg.end)
        self._send_merges(step, got + late)
        self.probe_at, self.moved = step + 1, {}
        extra = tr.after_aggregate(step)
        for p in s.peers.values():
            p.agg_drawn = p.drawn
            p.agg_opt_steps = p.opt_steps
        self.publish_plan(step + 1)
        self._sync_offline()
        return {**bytes_, **{k: bytes_.get(k, 0) + extra.get(k, 0)
                             for k in ("bytes_up", "bytes_down")}}

    def _aggregate_padded(self, step: int, got: list[Peer],
                          bytes_: dict[str, Any]) -> dict[str, Any]:
        """hetlora / hsplitlora-no-naa: every participant gets its shadow's adapters (the
        aggregate truncated to its ranks); an online client that did not take part is
        resynchronised (the in-process returning client's rule)."""
        s = self.server
        for p in got:
            state = {k: v.detach() for k, v in
                     lora.adapter_state(self.shadow(p).seg.model).items()}
            s.tell(control.SetAdapters(step, s.epoch), to=p.cid, tensors=state)
        s.global_sent_at = time.monotonic()
        for p in s.peers.values():
            if p.online and p not in got:
                self.send_resync(p)
            p.agg_drawn, p.agg_opt_steps = p.drawn, p.opt_steps
        self.htr.after_aggregate(step)  # nothing to re-plan for these rules
        self._sync_offline()
        return bytes_

    def _send_merges(self, step: int, got: list[Peer]) -> None:
        """Each participant gets the NAA result of the weights in its blocks (method.md: the
        concatenated factors, the dense update only when that is smaller)."""
        s = self.server
        for name, *_ in self.outbox:
            self.merged_names.add(name)
        for p in got:
            tensors: dict[str, torch.Tensor] = {}
            forms: dict[str, str] = {}
            for name, b_cat, a_cat, delta, _ in self.outbox:
                if lora.block_of(name) >= self.split_of(p):
                    continue
                _, form = agg.wire_bytes(delta.shape[0], delta.shape[1], a_cat.shape[0])
                forms[name] = form
                if form == "factors":
                    tensors[f"{name}.B"], tensors[f"{name}.A"] = b_cat, a_cat
                else:
                    tensors[f"{name}.delta"] = delta
            s.tell(control.Merge(step, forms, step + 1, s.epoch), to=p.cid, tensors=tensors)
        s.global_sent_at = time.monotonic()

    def block_weights(self, first: int, end: int, only: set[str] | None = None
                      ) -> dict[str, torch.Tensor]:
        """The server's current weights of blocks ``[first, end)`` keyed as a client's
        unwrapped model names them (``only``: just these weight names, without ``.weight``)."""
        srv = self.server.tr.server
        out: dict[str, torch.Tensor] = {}
        if srv is None:
            return out
        for name, t in split.base_model(srv.seg.model).named_parameters():
            key = name.replace(".base_layer", "")
            if ".layers." not in key or "lora_" in key:
                continue
            if first <= lora.block_of(key) < end and (
                    only is None or key.removesuffix(".weight") in only):
                out[key] = t.detach()
        return out

    def _plan_spec(self, h: Holder) -> control.PlanSpec:
        return control.PlanSpec(self.plan_version, h.seg.end, dict(h.ranks), self.plan_reinit)

    def publish_plan(self, reinit: int) -> None:
        """A new plan version to every online client; moved blocks travel with it."""
        s = self.server
        self.plan_version += 1
        self.plan_reinit = reinit
        self._refresh_shapes()
        for p in s.peers.values():
            if not p.online:
                continue  # resynchronised with the current plan when it returns
            h = self.shadow(p)
            old = self.moved.get(p.name, h.seg.end)
            tensors = self.block_weights(old, h.seg.end) if h.seg.end > old else {}
            s.tell(control.Plan(reinit, self._plan_spec(h), s.epoch), to=p.cid, tensors=tensors)
        self.moved = {}
        self.plan_sent_at = time.monotonic()

    def send_resync(self, p: Peer) -> None:
        """Plan + merged weights of the client's blocks + stream position.

        "rejoin": the shadow is re-initialised like the in-process trainer's returning
        client (merged weights, fresh adapters seeded by the step it returns at); "rollback"
        (after ``--resume``): the checkpoint's plan, whose seed step is in the plan.
        """
        s = self.server
        mode = "rollback" if s.resumed and p.status.get("epoch") != s.epoch else "rejoin"
        h = self.shadow(p)
        if mode == "rejoin" and self.plan_version > 0 and s.closed_step >= 0:
            s.tr.resync(h, s.closed_step + 1)
            self._refresh_shapes()
            plan = replace(self._plan_spec(h), reinit=s.closed_step + 1)
        else:
            plan = self._plan_spec(h)
        drawn = p.agg_drawn if mode == "rollback" else p.drawn
        tensors = self.block_weights(0, h.seg.end, self.merged_names) if self.naa else {
            k: v.detach() for k, v in lora.adapter_state(h.seg.model).items()}
        s.tell(control.Resync(mode, s.global_step, drawn, 0, s.epoch, plan), to=p.cid,
               tensors=tensors)
        p.last_repair = time.monotonic()

    # ------------------------------------------------------------------ checkpoints
    def model_state(self) -> dict[str, Any]:
        """Merged weights, plan and the trainer's IWI/ARMSC state: right after an
        aggregation every adapter is fresh (seeded by the plan's step), so this is all."""
        tr = self.htr
        srv = tr.server
        clone = lora.adapter_state
        return {
            "weights": {n: _linear(srv.seg.model, n).weight.detach().clone()
                        for n in sorted(self.merged_names)} if srv is not None else {},
            # hetlora / no-naa: adapters and the server's optimizer live across aggregations
            "adapters": None if self.naa else [
                {k: v.detach().clone() for k, v in clone(h.seg.model).items()}
                for h in tr.all_holders()],
            "server_opt": (srv.opt.state_dict() if srv is not None and srv.opt is not None
                           and not self.naa else None),
            "server_sched": (srv.sched.state_dict() if srv is not None and srv.sched is not None
                             and not self.naa else None),
            "splits": [h.seg.end for h in tr.clients], "ranks": [dict(h.ranks) for h in tr.clients],
            "server_ranks": dict(srv.ranks) if srv is not None else {},
            "plan_version": self.plan_version,
            "plan_reinit": self.plan_reinit, "tracker": tr.tracker, "trigger": tr.trigger,
            "plan": tr.plan if hasattr(tr, "plan") else None,
            "reconfigurations": tr.reconfigurations, "violations": list(tr.violations),
            "moved_bytes": tr.moved_bytes, "probe_bytes": self.probe_bytes}

    def load_model_state(self, state: dict[str, Any]) -> None:
        tr = self.htr
        srv = tr.server
        with torch.no_grad():
            for n, w in state["weights"].items():
                assert srv is not None
                _linear(srv.seg.model, n).weight.copy_(w)
        self.merged_names = set(state["weights"])
        self.plan_version, self.plan_reinit = state["plan_version"], state["plan_reinit"]
        tr.deferred = False
        for h, k, ranks in zip(tr.clients, state["splits"], state["ranks"], strict=True):
            if h.seg.end != k:
                h.seg = split.load_client(tr.info.path, k, tr.cfg.precision, tr.frozen)
            if hasattr(h.seg.model, "peft_config"):
                h.seg.model = h.seg.model.unload()
            if srv is not None:
                tr._sync_blocks(h.seg, 0)
            tr._reinit(h, ranks, self.plan_reinit)
        if srv is not None:
            tr._reinit(srv, state["server_ranks"], self.plan_reinit)
        if state["adapters"] is not None:
            for h, adapters in zip(tr.all_holders(), state["adapters"], strict=True):
                lora.load_adapter_state(h.seg.model, adapters)
            if srv is not None and srv.opt is not None and state["server_opt"] is not None:
                srv.opt.load_state_dict(state["server_opt"])
                srv.sched.load_state_dict(state["server_sched"])
        tr.tracker, tr.trigger = state["tracker"], state["trigger"]
        if state["plan"] is not None:
            tr.plan = state["plan"]
        tr.reconfigurations = state["reconfigurations"]
        tr.violations = list(state["violations"])
        tr.moved_bytes = state["moved_bytes"]
        self.probe_bytes = state["probe_bytes"]
        self._refresh_shapes()

    # ----------------------------------------------------------------------- report
    def make_clock(self) -> StepClock | None:
        """The devices ARMSC plans for (the devices file, or the emulated spread)."""
        from runner.methods.memory import ModelCosts

        s = self.server
        devices, server, _ = self.htr.clock_devices()
        return StepClock(ModelCosts.from_config(self.htr.config), [h.name for h in s.tr.clients],
                         devices, server, seed=s.cfg.seed, agg_interval=s.cfg.agg_interval)

    def global_grace(self) -> float:
        """A merge or a plan takes a client a moment (loading blocks, re-attaching
        adapters): give it longer before a stale global step or plan counts as lost."""
        return max(self.server.o.repair_interval, 10 * self.server.o.heartbeat, 5.0)

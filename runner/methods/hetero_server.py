"""The server side that HSplitLoRA (runner/methods/hsplitlora_server.py) and HetLoRA
(runner/methods/hetlora_server.py) share in a distributed run.

:class:`HeteroServerHooks` plug into the SplitLoRA server engine (:class:`runner.server.Server`,
through runner/methods/hooks.py); the training maths is the in-process trainer of the method
(runner/methods/hsplitlora.py, runner/methods/hetlora.py), unchanged: the trainer's client
holders are *shadows* of the real clients (same split point, ranks and merged block weights;
their adapters are loaded from the clients' uploads at every aggregation). Only the steps that
need a client's data or state go over the wire (docs/protocol.md, "HSplitLoRA").

Shared here: the shadows, plans (``plan``: split point, ranks, the step that seeds the
adapters; blocks a client takes over travel with it), the padded rules' aggregation (each
participant gets its share of the aggregate, ``set``: hetlora and hsplitlora-no-naa), budget
changes for ARMSC, resynchronisation and checkpoints.

A returning or restarted client is resynchronised with its plan and the current merged
weights of its blocks (or, padded rules, its adapters); after ``--resume`` every client rolls
back to the checkpoint's merged weights and plan (written after every aggregation), which
determine the whole state.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from runner.distributed import control
from runner.distributed import protocol as P
from runner.emulation.vtime import StepClock
from runner.methods import hetero_wire
from runner.methods.hetero import HeteroTrainer, _linear
from runner.methods.hooks import ServerHooks
from runner.model import lora, split
from runner.trainer import Holder

if TYPE_CHECKING:
    from runner.distributed.liveness import Peer
    from runner.server import Server



class ShadowTrainer(HeteroTrainer):
    """A method's trainer whose clients are shadows of remote processes (the base of
    ``HSplitLoRAShadow``, ``HetLoRAShadow``: ``class X(ShadowTrainer, TheMethodsTrainer)``).

    It knows nothing of the network: what its aggregation did that the clients must learn
    is left in fields the hooks read after it (``moved``: client -> split point before this
    round's block moves); a round that needs the clients is a callable the hooks inject
    (HSplitLoRA's probe). ``deferred``: the initial plan waits for the clients (HSplitLoRA's
    probe needs their data).
    """

    # The shadows mirror remote segments of one model: one copy of each frozen block for all
    # of them and the server segment (issue 15 part 4: a copy per client grew the server
    # with the number of clients). An offline shadow thus sees merges it has not received;
    # nothing reads a shadow's base weights while its client is away, and on return the
    # client is resynchronised from the server's weights anyway.
    share_blocks = True

    def __init__(self, cfg: Any, prepared: Any):
        self.deferred = True
        self.moved: dict[str, int] = {}
        self.early_unfit: list[tuple[int, str, int, int]] = []
        super().__init__(cfg, None, None, prepared)

    def not_runnable(self, step: int, name: str, need: int, budget: int) -> None:
        """As in-process (the server holds the client back: Server.apply_budgets); one found
        while the shadows are built, before the run directory is open, is logged when the
        run starts (HeteroServerHooks.start)."""
        if self.run is None:
            self.early_unfit.append((step, name, need, budget))
            self.unfit[name] = "pending"
            return
        super().not_runnable(step, name, need, budget)


class HeteroServerHooks(ServerHooks):
    """Server side shared by hsplitlora (and its ablations) and hetlora; a method's subclass
    names its shadow trainer (``shadow_class``), or builds it (``make_trainer``: HSplitLoRA's
    takes the probe round)."""

    shadow_class: type[ShadowTrainer]

    def __init__(self, server: Server):
        super().__init__(server)
        self.merged_names: set[str] = set()  # weights that differ from the pretrained ones
        self.plan_version = 0  # 0: split points without adapters (before the first probe)
        self.plan_reinit = 0
        self.plan_sent_at = 0.0
        self.shapes: dict[str, dict[str, list[int]]] = {}
        self.build_violations: list[str] = []
        self.by_name: dict[str, Peer] = {}

    def make_trainer(self) -> ShadowTrainer:
        return self.shadow_class(self.server.cfg, self.server.prep)

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
        """Each client's own adapters (the shapes of its shadow's)."""
        return self.shapes.get(h.client, {})

    def _refresh_shapes(self) -> None:
        self.shapes = {p.cid: {k: list(v.shape) for k, v in
                               lora.adapter_state(self.shadow(p).seg.model).items()}
                       for p in self.server.peers.values()}

    # ------------------------------------------------------------------------ start
    def joined(self, p: Peer) -> bool:
        """Resynchronised by this server (its epoch)."""
        return p.online and p.status.synced and p.status.epoch == self.server.epoch

    def start(self) -> None:
        """The initial plan (HSplitLoRA: a probe on the clients' data, ARMSC, adapters),
        unless resumed."""
        tr = self.htr
        if self.plan_version > 0:
            return  # resumed: the checkpoint holds the plan
        for v in self.build_violations:  # found before the run directory was open
            self.server.event("budget_violation", step=0, detail=v)
        for step, name, need, budget in tr.early_unfit:
            tr.unfit.pop(name, None)
            tr.not_runnable(step, name, need, budget)
        tr.early_unfit = []
        tr.deferred = False
        self.plan_first()
        self.publish_plan(0)

    def plan_first(self) -> None:
        """Work before the first plan goes out (HSplitLoRA: probe and plan); the first plan
        is the shadows' split points and ranks as built."""

    def _sync_offline(self) -> None:
        self.server.tr.offline = {p.name for p in self.server.peers.values() if not p.online}

    # ------------------------------------------------------------------- messages
    def budget_changed(self, p: Peer, old: int | None, new: int,
                       hb: control.Heartbeat) -> None:
        """A budget change feeds ARMSC (docs/method.md "ARMSC: Trigger"): an injected budget is the
        device's new budget as stated; a measured one (NVML, cgroup) scales the planned
        budget by its change since the first report (what it measures includes the runtime
        reserve and the emulation's rescaling, so only its ratio carries over)."""
        dev = self.htr.devices[p.index]
        if hb.budget_source == "injected":
            target = new
        elif old is not None:
            target = int(dev.memory_bytes * new / old)
        else:
            return  # the first measured report is the baseline of the planned budget
        if target != dev.memory_bytes:
            self.htr.set_budget(p.index, target)
            self.server.event("armsc_budget", step=max(self.server.current, 0), client=p.name,
                              previous_bytes=dev.memory_bytes, budget_bytes=target,
                              source=hb.budget_source)

    def stale(self, p: Peer, hb: control.Heartbeat, now: float) -> bool:
        """A client that missed a plan (lost message, pause) is resynchronised."""
        return (hb.busy is None and hb.plan < self.plan_version
                and now - max(self.plan_sent_at, self.server.live.awake_at) > self.global_grace())

    def step_plan(self) -> int | None:
        return self.plan_version

    # ------------------------------------------------------------------ aggregation
    def aggregate(self, step: int, participants: list[str]) -> dict[str, Any]:
        """Uploads -> shadows; the trainer's aggregation on them; its result out
        (:meth:`after_uploads`)."""
        s, tr = self.server, self.htr
        got = s.collect_uploads(step, participants)
        names = {p.name for p in got}
        tr.offline = {h.name for h in tr.clients if h.name not in names}
        for p in got:
            up = s.adapts[p.cid]
            lora.load_adapter_state(self.shadow(p).seg.model, up.tensors)
            p.agg_drawn = p.drawn if up.drawn is None else up.drawn
        bytes_ = tr.aggregate(step) if got else {"bytes_up": 0, "bytes_down": 0}
        s.global_step = step
        return self.after_uploads(step, got, bytes_)

    def after_uploads(self, step: int, got: list[Peer], bytes_: dict[str, Any]) -> dict[str, Any]:
        """The aggregation's result out to the clients (padded rules; NAA: hsplitlora)."""
        return self._aggregate_padded(step, got, bytes_)

    def _aggregate_padded(self, step: int, got: list[Peer],
                          bytes_: dict[str, Any]) -> dict[str, Any]:
        """hetlora / hsplitlora-no-naa: every participant gets its shadow's adapters (the
        aggregate truncated to its ranks); an online client that did not take part is
        resynchronised (the in-process returning client's rule)."""
        s = self.server
        for p in got:
            state = {k: v.detach() for k, v in
                     lora.adapter_state(self.shadow(p).seg.model).items()}
            s.tell(hetero_wire.SetAdapters(step, s.epoch), to=p.cid, tensors=state)
        s.global_sent_at = time.monotonic()
        for p in s.peers.values():
            if p.online and p not in got:
                self.send_resync(p)
            p.agg_drawn, p.agg_opt_steps = p.drawn, p.opt_steps
        self.htr.after_aggregate(step)  # nothing to re-plan for these rules
        self._sync_offline()
        return bytes_

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

    def _plan_spec(self, h: Holder) -> hetero_wire.PlanSpec:
        return hetero_wire.PlanSpec(self.plan_version, h.seg.end, dict(h.ranks),
                                    self.plan_reinit)

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
            old = self.htr.moved.get(p.name, h.seg.end)
            tensors = self.block_weights(old, h.seg.end) if h.seg.end > old else {}
            s.tell(hetero_wire.Plan(reinit, self._plan_spec(h), s.epoch), to=p.cid,
                   tensors=tensors)
        self.htr.moved = {}
        self.plan_sent_at = time.monotonic()

    def send_resync(self, p: Peer) -> None:
        """Plan + merged weights of the client's blocks + stream position.

        "rejoin": the shadow is re-initialised like the in-process trainer's returning
        client (merged weights, fresh adapters seeded by the step it returns at); "rollback"
        (after ``--resume``): the checkpoint's plan, whose seed step is in the plan.
        """
        s = self.server
        mode = "rollback" if s.resumed and p.status.epoch != s.epoch else "rejoin"
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
        s.tell(control.Resync(mode, s.global_step, drawn, 0, s.epoch, plan.to_meta()),
               to=p.cid, tensors=tensors)
        p.last_repair = time.monotonic()

    # ------------------------------------------------------------------ checkpoints
    def model_state(self) -> dict[str, Any]:
        """Merged weights, plan and the trainer's IWI/ARMSC state: right after an
        aggregation every adapter is fresh (seeded by the plan's step), so this is all."""
        tr = self.htr
        srv = tr.server
        clone = lora.adapter_state
        return {
            # the live tensors, not clones: checkpoint.write serialises them at once and the
            # dict dies with it; a clone doubled the merged model (~400 MB for SmolLM2) at
            # every aggregation, and glibc kept the freed copy (docs/benchmarks.md)
            "weights": {n: _linear(srv.seg.model, n).weight.detach()
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
            "moved_bytes": tr.moved_bytes, "probe_bytes": tr.probe_bytes}

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
                h.seg = split.load_client(tr.info.path, k, tr.cfg.precision, tr.frozen,
                                          tr.device)
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
        tr.probe_bytes = state["probe_bytes"]
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

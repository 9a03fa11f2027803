"""The server of a distributed HSplitLoRA run (docs/method.md "IWI", "ARMSC", "NAA") and its
ablations.

:class:`HSplitLoRAServerHooks` plug into the SplitLoRA server engine
(:class:`runner.server.Server`, through runner/methods/hooks.py); the training maths is the
in-process :class:`runner.methods.hsplitlora.HSplitLoRATrainer`, unchanged: the trainer's
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

What HetLoRA's server shares with this one (shadows, plans, the padded rules that
``hsplitlora-no-naa`` uses, resynchronisation, checkpoints) is runner/methods/hetero_server.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from runner.distributed import control
from runner.distributed import protocol as P
from runner.methods import aggregation as agg
from runner.methods import hetero_wire
from runner.methods.hetero_server import HeteroServerHooks, ShadowTrainer
from runner.methods.hsplitlora import HSplitLoRATrainer, Probe, probe_record, probe_server
from runner.model import lora
from runner.trainer import Holder, tensor_bytes

if TYPE_CHECKING:
    from runner.distributed.liveness import Peer
    from runner.server import Server


# name, B_cat, A_cat, the dense update (only when it is the wire form), the merging clients
Merged = tuple[str, torch.Tensor, torch.Tensor, torch.Tensor | None, set[str]]


class HSplitLoRAShadow(ShadowTrainer, HSplitLoRATrainer):
    """HSplitLoRATrainer on shadows: its probes are ``probe_round`` (the hooks' round over
    the wire, injected: one batch per online client among the holders -> their numerators
    and the server's); NAA's per-weight results (``merges``: name, B_cat, A_cat, delta,
    the clients that merge it) and split moves (``moved``) are recorded for the wire.
    """

    def __init__(self, cfg: Any, prepared: Any,
                 probe_round: Callable[[list[Holder], int], Probe]):
        self.probe_round = probe_round
        self.merges: list[Merged] = []
        super().__init__(cfg, prepared)

    def initial_plan(self) -> None:
        if not self.deferred:
            super().initial_plan()

    def _probe(self, holders: list[Holder], step: int) -> Probe:
        return self.probe_round(holders, step)

    def _merged(self, name: str, b_cat: torch.Tensor, a_cat: torch.Tensor, delta: torch.Tensor,
                holders: list[Holder]) -> None:
        # the dense dW only where it is what travels: every weight's dense update together
        # is the size of the merged blocks (~400 MB for SmolLM2), the factors a fraction
        _, form = agg.wire_bytes(b_cat.shape[0], a_cat.shape[1], a_cat.shape[0])
        self.merges.append((name, b_cat, a_cat, delta if form == "dense" else None,
                            {h.name for h in holders}))

    def _move_split(self, h: Holder, k: int, step: int) -> None:
        self.moved.setdefault(h.name, h.seg.end)
        super()._move_split(h, k, step)


class HSplitLoRAServerHooks(HeteroServerHooks):
    """Server side of hsplitlora and its ablations."""

    def __init__(self, server: Server):
        super().__init__(server)
        self.probe_at = 0
        self.probe_step: int | None = None
        self.probe_expected: set[str] = set()
        self.probe_acts: dict[str, control.ActReport] = {}
        self.probe_nums: dict[str, dict[str, float]] = {}

    def make_trainer(self) -> HSplitLoRAShadow:
        return HSplitLoRAShadow(self.server.cfg, self.server.prep, self.probe_round)

    @property
    def htr(self) -> HSplitLoRAShadow:
        tr = self.server.tr
        assert isinstance(tr, HSplitLoRAShadow)
        return tr

    def upload_shapes(self, h: P.Header) -> dict[str, list[int]]:
        if hetero_wire.is_probe_upload(h):
            return {}  # importance numerators travel in the meta
        return super().upload_shapes(h)

    def plan_first(self) -> None:
        """The initial plan: a probe on the clients' data, ARMSC, adapters."""
        self._sync_offline()
        self.probe_at = 0
        self.htr.initial_plan()

    # ------------------------------------------------------------------- messages
    def on_act(self, p: Peer, act: control.ActReport) -> bool:
        if not hetero_wire.is_probe_act(act):
            return False
        if act.step == self.probe_step and p.cid in self.probe_expected:
            if p.cid not in self.probe_acts:
                self.probe_acts[p.cid] = act
                p.drawn = p.drawn if act.drawn is None else act.drawn
        elif act.step > self.probe_at:
            self.server._reject(p, act.msg, "future-step",
                                f"probe activations for step {act.step}")
        return True

    def on_adapt(self, p: Peer, up: control.AdaptReport) -> bool:
        if not hetero_wire.is_probe_upload(up.msg):
            return False
        if up.step != self.probe_step or p.cid not in self.probe_acts:
            return True  # late or repeated
        nums = hetero_wire.importance(up)  # None: not a mapping of names to finite numbers
        mine = set(self.htr.client_candidates(self.split_of(p)))
        if nums is None or not all(k in mine for k in nums):
            self.server._reject(p, up.msg, "bad-meta", "importance must map this client's "
                                                       "candidate weights to finite numbers")
            return True
        self.probe_nums.setdefault(p.cid, dict(nums))
        p.drawn = p.drawn if up.drawn is None else up.drawn
        return True

    # ------------------------------------------------------------------------ probe
    def probe_round(self, holders: list[Holder], step: int) -> Probe:
        """IWI over the wire for the online clients among ``holders`` (one batch each, from
        each client's probe stream); what it cost is charged by the trainer
        (HSplitLoRATrainer._charge_probe), as in-process."""
        s, tr = self.server, self.htr
        assert step == self.probe_at, (step, self.probe_at)
        peers = [self.by_name[h.name] for h in holders if self.by_name[h.name].online]
        self.probe_step, self.probe_acts, self.probe_nums = step, {}, {}
        self.probe_expected = {p.cid for p in peers}

        def ask(p: Peer) -> None:
            s.tell(hetero_wire.Probe(step, s.global_step, s.epoch), to=p.cid)

        for p in peers:
            ask(p)
        s.wait_for(lambda: [p for p in peers if p.online and p.cid not in self.probe_acts],
                   step, "probe", ask)
        answered = [p for p in peers if p.cid in self.probe_acts]
        server_nums: dict[str, float] = {}
        grads: list[torch.Tensor] = []
        if answered:
            msgs = [self.probe_acts[p.cid] for p in answered]
            srv = tr.server
            assert srv is not None
            srv.seg.model.eval()
            try:
                grads, server_nums = probe_server(
                    srv.seg, [(m.tensors[P.ACTS], m.tensors[P.MASK], m.tensors[P.LABELS],
                               self.split_of(p)) for p, m in zip(answered, msgs, strict=True)],
                    tr.server_candidates([self.split_of(p) for p in answered]),
                    s.cfg.server_chunk)
            finally:
                srv.seg.model.train()
            sent = {}

            def give(p: Peer) -> None:
                sent[p.cid] = s.send(P.Kind.GRAD, step, {P.GRAD: grads[answered.index(p)]},
                                     hetero_wire.probe_grad_meta(), to=p.cid, wire=s.o.wire)

            for p in answered:
                give(p)
            s.wait_for(lambda: [p for p in answered
                                if p.online and p.cid not in self.probe_nums],
                       step, "probe", give)
        done = [p for p in answered if p.cid in self.probe_nums]
        # counted as the train records count a step (runner/server.py): tensors only
        item = 2 if s.o.wire else 4
        records = []
        for p in done:
            m = self.probe_acts[p.cid]
            mask, labels = m.tensors[P.MASK], m.tensors[P.LABELS]
            records.append(probe_record(
                p.name, mask, labels,
                m.tensors[P.ACTS].numel() * item + tensor_bytes(mask, labels),
                grads[answered.index(p)].numel() * item))
        self.probe_step = None
        s.global_sent_at = time.monotonic()
        return Probe([self.shadow(p) for p in done], [self.probe_nums[p.cid] for p in done],
                     server_nums, records)

    # ------------------------------------------------------------------ checkpoints
    def model_state(self) -> dict[str, Any]:
        """Plus the ranks NAA merged into each weight: the bound the final adapter is cut at
        (runner/methods/hsplitlora.py ``save_merged_delta``), which the merged weights alone
        no longer tell (their rounding noise is full-rank)."""
        return {**super().model_state(), "merged_ranks": dict(self.htr.merged_ranks)}

    def load_model_state(self, state: dict[str, Any]) -> None:
        """A checkpoint written before ``merged_ranks`` existed bounds each merged weight by
        its full rank (the export then cuts at the SVD tolerance alone, as it did)."""
        super().load_model_state(state)
        tr = self.htr
        known = state.get("merged_ranks")
        if known is None:
            known = {n: min(w.shape) for n, w in state["weights"].items()}
        tr.merged_ranks = {n: int(r) for n, r in known.items()}

    # ------------------------------------------------------------------ aggregation
    def aggregate(self, step: int, participants: list[str]) -> dict[str, Any]:
        """Uploads -> shadows; NAA; merges out; IWI probe; ARMSC plan out."""
        self.htr.merges = []
        return super().aggregate(step, participants)

    def after_uploads(self, step: int, got: list[Peer], bytes_: dict[str, Any]) -> dict[str, Any]:
        if not self.naa:
            return super().after_uploads(step, got, bytes_)
        s, tr = self.server, self.htr
        names = {p.name for p in got}
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
        self.probe_at, tr.moved = step + 1, {}
        extra = tr.after_aggregate(step)
        for p in s.peers.values():
            p.agg_drawn = p.drawn
            p.agg_opt_steps = p.opt_steps
        self.publish_plan(step + 1)
        self._sync_offline()
        return {**bytes_, **{k: bytes_.get(k, 0) + extra.get(k, 0)
                             for k in ("bytes_up", "bytes_down")}}

    def _send_merges(self, step: int, got: list[Peer]) -> None:
        """Each participant gets the NAA result of the weights in its blocks (docs/method.md
        "NAA: on the wire": the concatenated factors, the dense update only when smaller)."""
        s = self.server
        merges = self.htr.merges
        for name, *_ in merges:
            self.merged_names.add(name)
        for p in got:
            tensors: dict[str, torch.Tensor] = {}
            forms: dict[str, str] = {}
            for name, b_cat, a_cat, delta, _ in merges:
                if lora.block_of(name) >= self.split_of(p):
                    continue
                if delta is None:
                    forms[name] = "factors"
                    tensors[f"{name}.B"], tensors[f"{name}.A"] = b_cat, a_cat
                else:
                    forms[name] = "dense"
                    tensors[f"{name}.delta"] = delta
            s.tell(hetero_wire.Merge(step, forms, step + 1, s.epoch), to=p.cid,
                   tensors=tensors)
        s.global_sent_at = time.monotonic()
        # sent: nothing reads them again, and held they would live until the next round
        self.htr.merges = []

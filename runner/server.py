"""The server process of a distributed run: ``python -m runner.server [--resume]``.

Configured like a container starts it (environment variables + a JSON config, see
:mod:`runner.distributed.runtime`). The server owns the run directory (config snapshot,
``metrics.jsonl``, ``events.jsonl``, checkpoints, the final adapter: the same format as an
in-process run, so analysis works unchanged), the server segment with its optimizer, aggregation and
evaluation. The training maths is the in-process trainer's own code: :class:`ServerTrainer`
is a :class:`runner.trainer.Trainer` that holds the server segment and a *shadow* copy of the
client segment (loaded with the global client adapters after every aggregation) instead of
the clients, so ``server_step``, ``evaluate`` and ``save`` are reused unchanged.

A step (docs/protocol.md, "Runtime"):

1. broadcast ``step t begins`` to the online clients (config on ``s/config``);
2. collect their activations until every online participant answered or ``step_timeout``
   passed; the silent ones are marked offline (event ``client_offline``, reason
   ``step-timeout``); the round goes on with the answers it got;
3. ``Trainer.server_step`` on the payloads in client order (exactly the in-process batch),
   gradients back to each client, one ``train`` record per client;
4. at an aggregation step: collect the adapters the participants upload, FedAvg re-weighted
   over those that arrived, broadcast the result (``global``), checkpoint.

Faults are handled by comparing every client heartbeat with the server's own view and sending
the one message that repairs the difference (a repeated step announcement, a cached gradient,
``skip``, ``resync``, ``upload``, ``resend``); a step is applied at most once because every
answer is keyed by (client, step) on both sides.

What the server owns, each a concept of its own under runner/distributed/: the decoded
messages (control.py: what clients send is decoded once in :meth:`Server.dispatch`), the
repair policy (repair.py), liveness (liveness.py: wills, silences), the profile's per-round
dropout (dropout.py), resource records (usage.py: budgets, memory, compute times) and the
checkpoint (checkpoint.py). What a method changes is its hooks' (runner/methods/hooks.py).
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch

from runner import schedule
from runner.distributed import checkpoint, control
from runner.distributed import protocol as P
from runner.distributed.dropout import RoundDropout, away_ids
from runner.distributed.liveness import Liveness, Peer
from runner.distributed.repair import ServerView, repair
from runner.distributed.runtime import (
    RuntimeConfig,
    is_split,
    load_config,
    setup_logging,
)
from runner.distributed.transport import Transport, TransportError
from runner.distributed.usage import ResourceLog
from runner.emulation import gpu
from runner.emulation.vtime import StepClock, clock_devices
from runner.errors import UserError
from runner.methods import plugins, registry
from runner.methods.hooks import ServerHooks
from runner.methods.memory import ModelCosts
from runner.model import lora, split
from runner.model.models import load_config as load_model_config
from runner.rundir import CONFIG, RunDir, injected
from runner.trainer import Holder, Trainer, prepare, tensor_bytes

log = logging.getLogger("runner.server")


class ServerTrainer(Trainer):
    """The in-process trainer's server half plus a shadow client segment.

    The shadow holds the global client adapters (loaded after every aggregation); it is what
    ``evaluate`` runs the client blocks with and what ``save`` exports, exactly as the
    in-process trainer uses client 0 right after an aggregation. It never trains.
    """

    def _build(self) -> None:
        path, L = self.info.path, self.info.num_layers
        p = self.cfg.precision
        seg = (split.load_client(path, self.k, p, self.frozen, self.device) if self.k < L
               else split.load_unsplit(path, p, self.frozen, self.device))
        ranks = self._adapt(seg, self._ranks(seg.config))
        self.clients = [Holder(name="global", seg=seg, ranks=ranks)]
        if self.k < L:
            self.server = self._server_holder()
        for h in self.all_holders():
            h.seg.model.train()

    @property
    def shadow(self) -> Holder:
        return self.clients[0]


def _known(value: int | None, default: int) -> int:
    """A position a message reported, or ``default`` (what the server knew) without one."""
    return default if value is None else value


class Server:
    """One distributed run's server; :meth:`run` trains to the end and returns the summary."""

    def __init__(self, rt: RuntimeConfig):
        self.rt, self.cfg, self.o = rt, rt.train, rt.options
        # The method's server-side hooks (runner/methods/hooks.py): built first, since the
        # trainer they make may keep a pointer to them.
        self.hooks: ServerHooks = (plugins.hooks(self.cfg, "server") or ServerHooks)(self)
        self.prep = prepare(self.cfg)
        self.tr = self.hooks.make_trainer()
        self.split = is_split(self.cfg)
        self.hidden = int(load_model_config(self.prep.info.path).hidden_size)
        shards = self.prep.shards
        total = sum(len(s) for s in shards)
        self.traits = registry.traits(self.cfg)
        central = self.traits.central
        self.peers = {cid: Peer(cid, i, "central" if central else cid, len(shards[i]) / total)
                      for i, cid in enumerate(rt.clients)}
        self.full = self.traits.full  # whole weights travel instead of adapters
        self.adapter_shapes = {k: list(v.shape) for k, v in lora.trained_state(
            self.tr.clients[0].seg.model, self.full).items()}
        self.epoch = uuid.uuid4().hex[:12]
        self.resumed = False
        self.resume_clock: dict[str, float] | None = None  # the checkpoint's virtual clock
        self.start_step = 0
        self.current = -1  # step being (or last) collected
        self.closed_step = -1  # last step whose gradients went out
        self.closed_at = 0.0
        self.collecting = False
        self.step_started = 0.0
        self.expected: set[str] = set()
        # this step's answers: activations (split methods) or step records (local ones)
        self.answers: dict[str, control.ActReport | control.LocalRecord] = {}
        self.agg_step: int | None = None
        self.agg_expected: set[str] = set()
        self.adapts: dict[str, control.AdaptReport] = {}
        self.global_step = -1
        self.global_sent_at = 0.0
        self.totals = {"bytes_sent": 0, "bytes_received": 0}
        self.first: dict[str, float] | None = None
        self.last: dict[str, float] | None = None
        self._lock = threading.Lock()
        self.rejected = 0
        self.reasons: Counter[str] = Counter()
        self.offline_events = 0
        # set once run_finished is logged: the goodbyes that follow (wills, silences) are
        # not faults of the run and must not follow its last event
        self.finished = False
        self.run: RunDir | None = None
        self.t: Transport | None = None
        self.live = Liveness(self.o)  # wills, silences (runner/distributed/liveness.py)
        # budgets, measured memory, compute times (runner/distributed/usage.py)
        self.usage = ResourceLog(self.event, device=self.tr.device)
        self.dropout = RoundDropout.from_devices(  # runner/distributed/dropout.py
            self.cfg.devices, self.traits.central, self.peers.values(), self.cfg.seed,
            self.cfg.agg_interval)
        # clients not waited for at the start (a client lost for good must not cost a
        # join_timeout); they rejoin when they can: those offline at the checkpoint a resume
        # starts from, and those the host saw end before joining (wait_for_clients)
        self.gone: set[str] = set()
        self.hooks.ready()

    def default_trainer(self) -> Trainer:
        """SplitLoRA's training maths: the in-process trainer's server half + a shadow."""
        return ServerTrainer(self.cfg, None, None, prepared=self.prep)

    def split_of(self, p: Peer) -> int:
        """The split point of client ``p`` (the method's hooks say)."""
        return self.hooks.split_of(p)

    def upload_shapes(self, h: P.Header) -> dict[str, list[int]]:
        """The adapter tensors an upload (header ``h``) must carry: names and shapes."""
        return self.hooks.upload_shapes(h)

    # ---------------------------------------------------------------- per-round dropout
    def apply_budgets(self, step: int) -> None:
        """Clients whose device cannot hold their plan (the trainer's ``unfit``: no plan of
        the method fits, runner/trainer.py ``not_runnable``) sit out as in-process: away,
        named in ``away`` so they draw nothing (``client_offline``, reason
        ``not_runnable``), until a plan fits them again (``client_online``, resync)."""
        unfit = self.tr.unfit
        for p in self.peers.values():
            if p.name in unfit and not p.unfit:
                p.unfit = True
                was = p.online or not p.away
                p.away, p.online = True, False
                if was:
                    self.event("client_offline", step=step, client=p.name,
                               reason="not_runnable")
            elif p.unfit and p.name not in unfit:
                p.unfit, p.away = False, False
                if time.monotonic() - p.last_seen < self.o.offline_after:
                    p.online = True
                    self.event("client_online", step=step, client=p.name, resync=True)
                    self.send_resync(p)

    def apply_dropout(self, step: int) -> None:
        """The profile's per-round dropout, applied to the real clients before ``step``
        (runner/distributed/dropout.py): a client its round's seeded draw takes out sits the
        round out (``client_offline``, reason ``dropout``; announcements name it in
        ``away``, so it draws no batch and trains nothing), and one whose round is over
        comes back (``client_online``, resync with the current global state: the in-process
        returning client's rule)."""
        if not self.dropout:
            return
        if any(p.away for p in self.peers.values()):
            # after a long evaluation or checkpoint the heartbeats of the clients sitting
            # out wait in the inbox: read them before judging who is still alive
            self.pump(0.0)
        for p, leaves in self.dropout.turn(step, self.peers.values(), self.o.offline_after):
            if leaves:
                self.offline_events += 1
                self.event("client_offline", step=step, client=p.name, reason="dropout")
                log.info("%s sits out round %d (dropout)", p.cid, self.dropout.round_of(step))
            else:
                self.event("client_online", step=step, client=p.name, reason="dropout",
                           resync=True)
                self.send_resync(p)

    # ------------------------------------------------------------------ run directory
    def _snapshot(self) -> dict[str, Any]:
        import transformers

        p = self.prep
        return {"train": p.train_record(self.cfg), "model_path": str(p.info.path),
                "model_family": p.info.family, "num_layers": p.info.num_layers,
                "data_source": p.source, "data_sizes": {k: len(v) for k, v in p.frames.items()},
                "client_sizes": [len(s) for s in p.shards],
                "versions": {"python": platform.python_version(), "torch": torch.__version__,
                             "transformers": transformers.__version__},
                "argv": sys.argv,
                "runtime": {"backend": "mqtt", "broker": self.rt.broker.url,
                            "tls": self._tls_mode(),
                            "run_id": self.rt.run_id, "clients": self.rt.clients,
                            **asdict(self.o)}}

    def _tls_mode(self) -> str:
        """How the links of this run were protected (docs/security.md): off, on, mutual."""
        tls = self.rt.tls
        return "off" if tls is None else "mutual" if tls.mutual else "on"

    def open_run(self) -> None:
        path = self.rt.run_dir
        if self.rt.resume and (path / CONFIG).is_file():
            self.run = RunDir.open(path)
            self.tr.run = self.usage.run = self.run
            self._resume()
        else:
            self.run = RunDir.create(path, self._snapshot(), overwrite=self.o.overwrite)
            self.tr.run = self.usage.run = self.run

    def event(self, kind: str, **fields: Any) -> None:
        """Events come from the main thread and from the network thread (rejections)."""
        assert self.run is not None
        with self._lock:
            self.run.event(kind, **fields)

    def checkpoint(self, step: int) -> None:
        """Everything the server needs to continue after ``step``
        (runner/distributed/checkpoint.py, written atomically)."""
        assert self.run is not None
        checkpoint.write(self.run.path, checkpoint.ServerCheckpoint(
            step=step, global_step=self.global_step, model=self.hooks.model_state(),
            peers={p.cid: checkpoint.PeerPosition(p.agg_drawn, p.agg_opt_steps,
                                                  p.online or p.away)
                   for p in self.peers.values()},
            history=self.tr.history, totals=self.totals, first=self.first, last=self.last,
            rng=torch.get_rng_state(), elapsed=self.run.elapsed(),
            cuda_rng=checkpoint.cuda_rng_state(self.tr.device),  # None on the CPU
            vclock=self.tr.vclock.state() if self.tr.vclock is not None else None))

    def _resume(self) -> None:
        """Continue from the last checkpoint; drop metrics written after it."""
        assert self.run is not None
        self.resumed = True
        ckpt = checkpoint.read(self.run.path)
        g = -1
        if ckpt is not None:
            g = ckpt.step
            self.hooks.load_model_state(ckpt.model)
            self.global_step = ckpt.global_step
            for cid, pos in ckpt.peers.items():
                if cid in self.peers:
                    p = self.peers[cid]
                    p.drawn = p.agg_drawn = pos.drawn
                    p.opt_steps = p.agg_opt_steps = pos.opt_steps
                    if not pos.present:
                        self.gone.add(cid)
            self.tr.history = ckpt.history
            self.totals = ckpt.totals
            self.first, self.last = ckpt.first, ckpt.last
            torch.set_rng_state(ckpt.rng)
            checkpoint.restore_cuda_rng(ckpt.cuda_rng, self.tr.device)  # on CUDA only
            self.run.t0 = time.monotonic() - ckpt.elapsed
            self.resume_clock = ckpt.vclock  # restored once fit() has made the clock
        self.start_step = g + 1
        self.closed_step = g
        self.current = g
        rewind = checkpoint.rewind_metrics(self.run.path, g)
        self.event("server_resumed", step=self.start_step, checkpoint=ckpt is not None,
                   dropped_records=rewind.dropped, epoch=self.epoch,
                   reached_step=rewind.reached,
                   steps_rerun=max(0, rewind.reached - self.start_step),
                   down_s=None if rewind.down_s is None else round(rewind.down_s, 3))
        log.info("resumed at step %d (checkpoint: %s)", self.start_step, ckpt is not None)

    # ----------------------------------------------------------------------- network
    def _expect(self) -> P.Expect:
        b = self.cfg.batch_size

        def shapes(h: P.Header) -> dict[str, list[int | None]] | None:
            if h.kind is P.Kind.ACT:
                return {P.ACTS: [b, None, self.hidden], P.MASK: [b, None], P.LABELS: [b, None]}
            if h.kind is P.Kind.ADAPT:
                return dict(self.upload_shapes(h))  # type: ignore[arg-type]
            return None

        return P.Expect(run=self.rt.run_id, clients=frozenset(self.rt.clients),
                        hidden=self.hidden if self.split else None, shapes=shapes)

    def _on_reject(self, err: P.ProtocolError, topic: str) -> None:
        """Every refused payload: counted, and logged as an event with its reason (the first
        ``max_reject_events`` of a run; the counts by reason go to the summary)."""
        with self._lock:
            self.rejected += 1
            self.reasons[err.reason.value] += 1
            n = self.rejected
        if n <= self.o.max_reject_events:
            try:
                client = P.parse_topic(topic).client
            except P.ProtocolError:
                client = None
            self.event("message_rejected", reason=err.reason.value, detail=err.detail[:300],
                       topic=str(topic)[:200], client=client, step=self.current)

    def _reject(self, p: Peer, msg: P.Message, reason: str, detail: str) -> None:
        """A well-formed message that does not fit the run's state (application level)."""
        with self._lock:
            self.rejected += 1
            self.reasons[reason] += 1
        self.event("message_rejected", reason=reason, detail=detail, topic=msg.topic,
                   client=p.name, step=self.current)

    def connect(self) -> None:
        o = self.o
        deadline = time.monotonic() + o.join_timeout
        while True:
            t = Transport(self.rt.broker, self.rt.credentials, run=self.rt.run_id, me=P.SERVER,
                          expect=self._expect(), chunk_size=o.chunk_size,
                          reconnect=(0.1, o.reconnect_max), backend=o.mqtt, tls=self.rt.tls,
                          on_reject=self._on_reject, device=self.tr.device)
            try:
                self.t = t.connect(10.0)
                return
            except TransportError as e:
                if "refused" in str(e) or time.monotonic() > deadline:
                    raise
                log.info("broker not reachable yet (%s); retrying", e)
                time.sleep(1.0)

    def send(self, kind: P.Kind, step: int, tensors: dict[str, torch.Tensor] | None = None,
             meta: dict[str, Any] | None = None, to: str | None = None,
             wire: str | None = None) -> P.Message | None:
        """Send, surviving a broker outage (the repair loop re-sends what got lost)."""
        assert self.t is not None
        try:
            return self.t.send(kind, step, tensors, meta, to=to, wire=wire)
        except TransportError as e:
            log.warning("%s to %s (step %d) not sent: %s", kind.value, to or "all", step, e)
            return None

    def tell(self, ctrl: control.Control, to: str | None = None,
             tensors: dict[str, torch.Tensor] | None = None) -> P.Message | None:
        """Send a typed control operation (runner/distributed/control.py) as a ``config``
        message."""
        step, meta = control.encode(ctrl)
        return self.send(P.Kind.CONFIG, step, tensors, meta, to=to)

    # ---------------------------------------------------------------- message handling
    def pump(self, timeout: float) -> None:
        """Handle the messages that arrived (waiting up to ``timeout`` for the first), then
        check liveness: after a long computation the inbox holds heartbeats that arrived
        meanwhile, and a client must not be judged silent before they are read."""
        assert self.t is not None
        self.live.woke(time.monotonic())
        msg = self.t.recv(max(0.0, timeout))
        handled = 0
        while msg is not None and handled < 1000:
            self.dispatch(msg)
            handled += 1
            msg = self.t.recv(0.0)
        if msg is not None:
            self.dispatch(msg)
        now = time.monotonic()
        outage = self.live.link(self.t, now)
        if outage is not None and self.run is not None:
            # back after a broker restart or a network fault: recorded for the audit
            self.event("broker_reconnected", step=max(self.current, 0),
                       outage_s=round(outage, 3))
        for p, reason in self.live.gone(self.peers, self.t, now):
            self.set_offline(p, reason)
        self.live.last_pump = time.monotonic()

    def dispatch(self, msg: P.Message) -> None:
        p = self.peers.get(msg.client)
        if p is None:  # the receiver only lets our clients through; be safe anyway
            return
        if msg.kind is P.Kind.STATE:
            self.on_presence(p, control.decode_presence(msg))
            return
        p.last_seen = time.monotonic()
        try:  # decoded and validated once (runner/distributed/control.py)
            sender, report = control.decode_report(msg)
        except control.ControlError as e:
            self._reject(p, msg, "bad-meta", str(e))
            return
        if p.away:
            # sitting a round out: alive (last_seen), but no repairs and nothing to collect
            if isinstance(report, control.Heartbeat):
                p.status = report
            return
        if not p.online or sender.inc != p.inc:
            self.set_online(p, sender)
        if isinstance(report, control.Heartbeat):
            p.status = report
            self.on_budget(p, report)
            self.usage.client(p, report, self.start_step)
            self.on_status(p)
        elif isinstance(report, control.ActReport):
            self.on_act(p, report)
        elif isinstance(report, control.AdaptReport):
            self.on_adapt(p, report)

    def on_presence(self, p: Peer, st: control.Presence) -> None:
        """A ``state`` message: a client that finished as told, or went offline."""
        if st.state == "done":
            p.online = False  # finished as told: not a dropout
        elif st.state == "offline" and p.online:
            if st.reason == "lost":  # a last will: judged after a grace period (see pump)
                assert self.t is not None
                self.live.will(p.cid, time.monotonic(), self.t.disconnects)
            else:
                self.set_offline(p, st.reason)

    def on_budget(self, p: Peer, hb: control.Heartbeat) -> None:
        """A reported memory budget: recorded (runner/distributed/usage.py); a change goes
        to the method's hooks (ARMSC)."""
        change = self.usage.budget(p, hb, max(self.current, 0))
        if change is not None:
            self.hooks.budget_changed(p, *change, hb)

    def set_offline(self, p: Peer, reason: str) -> None:
        p.online = False
        if self.finished:
            return
        self.offline_events += 1
        self.event("client_offline", step=max(self.current, 0), client=p.name, reason=reason)
        log.warning("%s offline at step %d (%s)", p.cid, self.current, reason)

    def set_online(self, p: Peer, sender: control.Sender) -> None:
        inc = sender.inc
        if self.finished:  # back after the end: _say_done tells it to exit, nothing to log
            p.online, p.inc = True, inc
            return
        if p.online and p.inc is not None and inc != p.inc:
            self.set_offline(p, "restarted")  # a new process before its old one's will
        if p.inc is None:
            self.event("client_joined", step=max(self.current, 0), client=p.name,
                       incarnation=inc)
        else:
            reason = "restarted" if inc != p.inc else "returned"
            self.event("client_online", step=max(self.current, 0), client=p.name,
                       reason=reason, resync=True)
            log.info("%s back online at step %d (%s)", p.cid, self.current, reason)
        p.online, p.inc = True, inc
        p.status = control.Heartbeat(epoch=sender.epoch)
        self.send_resync(p)

    def send_resync(self, p: Peer) -> None:
        """Bring ``p`` to the current state (the method's hooks say how)."""
        self.hooks.send_resync(p)

    def default_resync(self, p: Peer) -> None:
        """Current global adapters + where the client's stream and optimizer should be.

        "rollback" after this server resumed from a checkpoint (the client returns to the
        checkpoint's state), "rejoin" otherwise (in-process semantics: a returning client
        receives the last aggregate).
        """
        mode = "rollback" if self.resumed and p.status.epoch != self.epoch else "rejoin"
        tensors = dict(self.tr.global_state) if self.tr.global_state is not None else None
        drawn, steps = ((p.agg_drawn, p.agg_opt_steps) if mode == "rollback"
                        else (p.drawn, p.opt_steps))
        self.tell(control.Resync(mode, self.global_step, drawn, steps, self.epoch), to=p.cid,
                  tensors=tensors)
        p.last_repair = time.monotonic()

    def on_status(self, p: Peer) -> None:
        """Compare a heartbeat with the server's view; repair one difference."""
        s = p.status
        # Local (non-split) methods report their step record in the heartbeat.
        rec = s.record
        if (not self.split and self.collecting and rec is not None
                and rec.step == self.current and p.cid in self.expected
                and p.cid not in self.answers):
            self.answers[p.cid] = rec
            p.drawn = _known(rec.drawn, p.drawn)
            p.opt_steps = _known(s.opt_steps, p.opt_steps)
        now = time.monotonic()
        if (now - p.last_repair < self.o.repair_interval
                or now - self.live.awake_at < self.o.repair_interval):
            return
        action = repair(s, ServerView(
            now=now, epoch=self.epoch, global_step=self.global_step,
            global_settled=now - max(self.global_sent_at, self.live.awake_at)
            > self.global_grace(),
            stale=self.stale(p, s, now), closed_step=self.closed_step, closed_at=self.closed_at,
            collecting=self.collecting, current=self.current, step_started=self.step_started,
            awaited=p.cid in self.expected and p.cid not in self.answers,
            agg_step=self.agg_step,
            upload_awaited=p.cid in self.agg_expected and p.cid not in self.adapts,
            repair_interval=self.o.repair_interval, heartbeat=self.o.heartbeat))
        if action is None:
            return
        p.last_repair = now
        log.info("repair %s for %s (status %s)", action, p.cid,
                 {"done": s.done, "pending": s.pending, "global": s.global_, "epoch": s.epoch})
        if action == "resync":
            self.send_resync(p)
        elif action == "answer":
            assert s.pending is not None
            self.answer_old(p, s.pending)
        elif action == "announce":
            self.announce(self.current, to=p.cid)
        elif action == "resend":
            self.tell(control.Resend(self.current), to=p.cid)
        elif action == "upload":
            assert self.agg_step is not None
            self.tell(control.Upload(self.agg_step), to=p.cid)

    def wait_for(self, missing: Callable[[], list[Peer]], step: int, what: str,
                 resend: Callable[[Peer], None] | None = None) -> None:
        """Handle messages until ``missing()`` is empty or ``step_timeout`` has passed; past
        it, wait on (up to ten times ``step_timeout``) while every missing client is alive
        and computing for ``step``; then the missing go offline (reason ``<what>-timeout``).
        ``resend``: asked again every ``repair_interval`` (the heartbeat repairs cover the
        training step and uploads; the IWI probe has its own)."""
        start = time.monotonic()
        deadline, hard, asked = start + self.o.step_timeout, start + 10 * self.o.step_timeout, start
        while waiting := missing():
            now = time.monotonic()
            if now >= deadline:
                if now < hard and all(self.live.working(p, step, now) for p in waiting):
                    self.pump(0.1)  # alive and computing: a slow device
                    continue
                for p in waiting:
                    self.set_offline(p, f"{what}-timeout")
                return
            if resend is not None and now - asked > self.o.repair_interval:
                for p in waiting:
                    resend(p)
                asked = now
            self.pump(min(0.1, deadline - now))

    def global_grace(self) -> float:
        """Seconds after the last aggregate went out before a client still behind it gets
        a resync (its copy was lost)."""
        return self.hooks.global_grace()

    def stale(self, p: Peer, hb: control.Heartbeat, now: float) -> bool:
        """Whether a client's reported state needs a resync (beyond the global step)."""
        return self.hooks.stale(p, hb, now)

    def answer_old(self, p: Peer, step: int) -> None:
        """Activations of a closed step: the cached gradient if that step was processed for
        this client (its gradient got lost), else ``skip`` (it came too late)."""
        if p.grad is not None and p.grad[0] == step:
            self.send(P.Kind.GRAD, step, {P.GRAD: p.grad[1]}, to=p.cid, wire=self.o.wire)
        else:
            self.tell(control.Skip(step), to=p.cid)
            self.event("step_skipped", step=step, client=p.name)

    def on_act(self, p: Peer, act: control.ActReport) -> None:
        if self.hooks.on_act(p, act):
            return
        t = act.step
        if self.collecting and t == self.current:
            if p.cid in self.answers:
                return  # a resend of what we have
            if p.cid in self.expected:
                self.answers[p.cid] = act
            else:  # came online after the step began: not part of this round
                self.answer_old(p, t)
            return
        if t <= self.closed_step:
            self.answer_old(p, t)
            return
        self._reject(p, act.msg, "future-step", f"activations for step {t}; current step is "
                                                f"{self.current}")

    def on_adapt(self, p: Peer, up: control.AdaptReport) -> None:
        if self.hooks.on_adapt(p, up):
            return
        if up.step == self.agg_step and p.cid in self.agg_expected:
            self.adapts.setdefault(p.cid, up)
        elif up.step > max(self.current, self.global_step):
            self._reject(p, up.msg, "future-step", f"adapters for step {up.step}")
        # else: a late or repeated upload of a finished aggregation; nothing to do

    # --------------------------------------------------------------------- the round
    def announce(self, step: int, to: str | None = None) -> None:
        self.tell(control.Step(step, self.global_step, self.epoch, self.resumed,
                               self.hooks.step_plan(), away_ids(self.peers.values())), to=to)

    def wait_online(self, what: str) -> None:
        deadline = time.monotonic() + self.o.join_timeout
        while not any(p.online for p in self.peers.values()):
            if time.monotonic() > deadline:
                raise UserError(f"no client online within {self.o.join_timeout} s ({what})")
            self.pump(0.2)

    def wait_for_clients(self) -> None:
        """At the start: every client, or as many as joined within ``join_timeout``. A client
        the host has seen end for good (its container OOM-killed before it joined: the
        watcher's ``inject/CLIENT.ended``) is not waited for: it would cost the whole
        ``join_timeout`` for nothing. One that joins later after all is taken in as any late
        joiner."""
        deadline = time.monotonic() + self.o.join_timeout
        while (not all(self.hooks.joined(p) for p in self.peers.values()
                       if p.cid not in self.gone)
               and time.monotonic() < deadline):
            self.pump(0.1)
            self._note_ended_before_joining()
        self.wait_online("at the start")

    def _note_ended_before_joining(self) -> None:
        """Add to ``gone`` each client not yet joined whose ``inject/CLIENT.ended`` marker
        exists (one ``client_not_awaited`` event each)."""
        assert self.run is not None
        for p in self.peers.values():
            if (p.cid not in self.gone and not self.hooks.joined(p)
                    and injected(self.run.path, p.name, "ended").exists()):
                self.gone.add(p.cid)
                self.event("client_not_awaited", client=p.name,
                           reason="ended before joining (the host saw its container end)")

    def train_step(self, step: int) -> list[dict[str, Any]]:
        self.apply_budgets(step)
        self.apply_dropout(step)
        if not any(p.online for p in self.peers.values()) and any(
                p.away for p in self.peers.values()):
            # every client sits this round out: an empty step, as in-process
            self.current = self.closed_step = step
            self.announce(step)
            return []
        self.wait_online(f"step {step}")
        self.current, self.answers, self.collecting = step, {}, True
        self.step_started = time.monotonic()
        participants = [p for p in self.peers.values() if p.online]
        self.expected = {p.cid for p in participants}
        self.announce(step)
        try:
            self.wait_for(lambda: [p for p in participants
                                   if p.online and p.cid not in self.answers], step, "step")
        finally:
            self.collecting = False
        answered = [p for p in participants if p.cid in self.answers]
        if not answered:
            self.closed_step = step
            return []
        records = self._server_half(step, answered) if self.split else \
            [self._local_record(p) for p in answered]
        self.closed_step = step
        self.closed_at = time.monotonic()
        return records

    def _local_record(self, p: Peer) -> dict[str, Any]:
        r = self.answers[p.cid]
        assert isinstance(r, control.LocalRecord)
        # the client's record without its stream position; its memory figures validated
        return {**r.fields, **self.usage.measured(p, r.usage), "client": p.name}

    def _server_half(self, step: int, answered: list[Peer]) -> list[dict[str, Any]]:
        msgs = [self.answers[p.cid] for p in answered]
        assert all(isinstance(m, control.ActReport) for m in msgs)
        payloads = [(m.tensors[P.ACTS], m.tensors[P.MASK], m.tensors[P.LABELS], self.split_of(p))
                    for p, m in zip(answered, msgs, strict=True)]
        t0 = time.perf_counter()
        grads, losses = self.tr.server_step(payloads)
        server_s = time.perf_counter() - t0
        item = 2 if self.o.wire else 4
        records = []
        for p, m, grad, (loss_sum, n) in zip(answered, msgs, grads, losses, strict=True):
            sent = self.send(P.Kind.GRAD, step, {P.GRAD: grad}, to=p.cid, wire=self.o.wire)
            p.grad = (step, grad)
            p.drawn = _known(m.drawn, p.drawn)
            p.opt_steps = _known(m.opt_steps, p.opt_steps) + 1
            acts = m.tensors[P.ACTS]
            up = acts.numel() * item + tensor_bytes(m.tensors[P.MASK], m.tensors[P.LABELS])
            records.append(dict(
                step=step, client=p.name, loss=loss_sum / max(n, 1), tokens=n,
                seq_tokens=int(m.tensors[P.MASK].numel()),
                bytes_sent=up, bytes_received=grad.numel() * item, lr=m.lr,
                compute_s=m.compute_s, server_s=server_s, wire_bytes_sent=m.msg.nbytes,
                wire_bytes_received=sent.nbytes if sent is not None else None,
                **self.usage.measured(p, m.usage)))
        return records

    def collect_uploads(self, step: int, participants: list[str]) -> list[Peer]:
        """Wait for the participants' adapter uploads of aggregation ``step`` (at most
        ``step_timeout``; the silent ones go offline); the peers whose upload arrived."""
        self.agg_step, self.adapts = step, {}
        self.step_started = time.monotonic()
        self.agg_expected = set(participants)
        expected = [self.peers[c] for c in participants]
        try:
            self.wait_for(lambda: [p for p in expected if p.online and p.cid not in self.adapts],
                          step, "aggregate")
        finally:
            self.agg_step = None
        return [p for p in self.peers.values() if p.cid in self.adapts]

    def aggregate(self, step: int, participants: list[str]) -> dict[str, Any]:
        """The method's aggregation after ``step``; bytes moved up and down."""
        return self.hooks.aggregate(step, participants)

    def default_aggregate(self, step: int, participants: list[str]) -> dict[str, int]:
        """FedAvg over the participants whose adapters arrived (Trainer.aggregate's formula,
        in client order, so the result is bit-identical to the in-process one)."""
        got = self.collect_uploads(step, participants)
        if not got:
            return {"bytes_up": 0, "bytes_down": 0}
        avg, weights = self.hooks.average([self.adapts[p.cid].tensors for p in got],
                                          [p.weight for p in got])
        for p in got:
            up = self.adapts[p.cid]
            p.agg_drawn = _known(up.drawn, p.drawn)
            p.agg_opt_steps = _known(up.opt_steps, p.opt_steps)
        self.tr.global_state = avg
        lora.load_trained_state(self.tr.shadow.seg.model, avg, self.full)
        self.global_step = step
        # ft: the one client holds these weights already; a whole model is not sent back
        self.send(P.Kind.GLOBAL, step, {} if self.full else avg, {"epoch": self.epoch})
        self.global_sent_at = time.monotonic()
        size = tensor_bytes(*avg.values())
        up = down = size * len(got)
        if not self.traits.central:
            self.event("aggregate", step=step, participants=[p.name for p in got],
                       weights=weights, bytes_up=up, bytes_down=down)
            assert self.run is not None
            self.run.metric(kind="aggregate", step=step, client="server", bytes_sent=down,
                            bytes_received=up)
            return {"bytes_up": up, "bytes_down": down}
        return {"bytes_up": 0, "bytes_down": 0}

    # ----------------------------------------------------------------------- the run
    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        assert self.run is not None
        if not self.resumed:
            self.event("run_started", method=cfg.method, clients=len(self.peers),
                       split=self.tr.k, runtime="mqtt", wire=self.o.wire or "float32")
        self.wait_for_clients()
        self.hooks.start()
        self.tr.vclock = self.hooks.make_clock()
        if self.tr.vclock is not None and self.resume_clock is not None:
            self.tr.vclock.restore(self.resume_clock)
        self.tr.clock_started()
        if self.first is None:
            self.first = self.last = self.tr.evaluate()
            self.tr._log_eval(0, self.first)
        t_start = time.perf_counter()
        for step in range(self.start_step, cfg.steps):
            t_step = time.monotonic()
            records = self.train_step(step)
            if self.tr.vclock is not None and all("seq_tokens" in r for r in records):
                self.tr.vclock.step(records, {p.name: self.split_of(p)
                                              for p in self.peers.values()},
                                    full_model=not self.split)
            for r in records:
                self.totals["bytes_sent"] += r["bytes_sent"]
                self.totals["bytes_received"] += r["bytes_received"]
                self.run.metric(kind="train", **r)
            if schedule.sync_due(cfg, step):
                agg = self.aggregate(step, [p.cid for p in self.peers.values()
                                            if p.cid in self.answers and p.online])
                self.totals["bytes_sent"] += agg["bytes_up"]
                self.totals["bytes_received"] += agg["bytes_down"]
                if self.tr.vclock is not None:
                    self.tr.vclock.aggregate(
                        [p.name for p in self.peers.values() if p.cid in self.answers],
                        agg["bytes_up"], agg["bytes_down"], agg.get("per_client"))
                self.checkpoint(step)
            done = step + 1
            line = f"step {done}/{cfg.steps}"
            if records:
                line += f" loss {sum(r['loss'] for r in records) / len(records):.4f}"
            if schedule.evaluates_after(cfg, done):
                self.last = self.tr.evaluate()
                self.tr._log_eval(done, self.last)
                line += f" val_ppl {self.last['val_ppl']:.3f}"
            self.usage.server(step, records[0].get("server_s") if records else None)
            log.info("%s (%d/%d clients)", line, len(records), len(self.peers))
            while (left := self.o.min_step_time - (time.monotonic() - t_step)) > 0:
                self.pump(min(left, 0.1))
        return self.finish(time.perf_counter() - t_start)

    def default_clock(self) -> StepClock | None:
        """Virtual time of the emulated devices (runner/emulation/vtime.py) when the run has a
        devices file (profile runs). Design choice: no availability here: in containers the
        profile's traces are applied to the containers in wall-clock time (testbed), and the
        clock restarts at 0 on ``--resume``."""
        if not self.cfg.devices or self.traits.central:
            return None
        names = [p.name for p in self.peers.values()]
        devices, server, _ = clock_devices(self.cfg.devices, len(names))
        return StepClock(ModelCosts.from_config(load_model_config(self.tr.info.path)), names,
                         devices, server, seed=self.cfg.seed,
                         agg_interval=self.cfg.agg_interval)

    def finish(self, train_time: float) -> dict[str, Any]:
        assert self.run is not None and self.first is not None and self.last is not None
        tr = self.tr
        summary = {
            "method": self.cfg.method, "steps": self.cfg.steps,
            "pretrained_val_ppl": self.first["val_ppl"], "final_val_ppl": self.last["val_ppl"],
            "final_val_loss": self.last["val_loss"], "train_time_s": train_time,
            "client_trainable_params": sum(lora.trainable_parameters(h.seg.model)
                                           for h in tr.clients) / len(tr.clients),
            "server_trainable_params": (lora.trainable_parameters(tr.server.seg.model)
                                        if tr.server is not None else 0),
            **self.totals,
            "runtime": "mqtt", "rejected_messages": self.rejected,
            "rejected_reasons": dict(self.reasons), "offline_events": self.offline_events,
            **({"virtual_time_s": tr.vclock.now} if tr.vclock is not None else {}),
            "not_runnable": sorted(tr.unfit),
            **tr.summary_extra(),
        }
        tr.save(self.run)
        self.run.write_summary(summary)
        self.finished = True
        self.event("run_finished", **{k: v for k, v in summary.items() if k != "method"})
        self._say_done()
        return summary

    def _say_done(self, wait: float = 5.0) -> None:
        """Tell the clients to exit; repeat for those that have not said "done" yet."""
        deadline = time.monotonic() + wait
        told = 0.0
        while time.monotonic() < deadline:
            live = [p for p in self.peers.values() if p.online]
            if not live:
                break
            if time.monotonic() - told > 1.0:
                self.tell(control.Done(self.cfg.steps))
                told = time.monotonic()
            self.pump(0.1)

    def close(self) -> None:
        if self.t is not None:
            self.t.close()


def make_server(rt: RuntimeConfig) -> Server:
    """The server of any method: the engine with the method's hooks (runner/methods)."""
    return Server(rt)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner.server",
                                     description="The server of a distributed run (env: "
                                                 "TESTBED_CONFIG, TESTBED_BROKER, ...)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in the config's run_dir from its checkpoint")
    args = parser.parse_args(argv)
    setup_logging("server")
    try:
        rt = load_config(me="server", resume=args.resume)
        # On a CUDA device the server's profile budget is its cap, as each client's
        # (docs/gpu.md "Caps"): set before its model loads; on the CPU nothing happens.
        gpu.cap_process(rt.train, None)
        server = make_server(rt)
        server.open_run()
        server.connect()
        try:
            summary = server.fit()
        finally:
            server.close()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log.info("finished: val PPL %.3f -> %.3f", summary["pretrained_val_ppl"],
             summary["final_val_ppl"])
    return 0


if __name__ == "__main__":
    sys.exit(main())


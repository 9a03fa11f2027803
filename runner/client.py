"""A client process of a distributed run: ``python -m runner.client``.

Configured by environment variables and a JSON config (:mod:`runner.distributed.runtime`). The
client owns its data shard (the same partitioning and batch-stream seed as
:func:`runner.trainer.prepare` / :class:`runner.trainer.Trainer`, so a distributed run
reproduces an in-process one), its model segment with its LoRA adapters, and its optimizer.

What it does is driven by the server's control messages (docs/protocol.md, "Runtime"):

* ``step t begins`` -> draw the next batch, run the client segment, send ``act`` (split
  methods); or run a whole local step and report its record in the next heartbeat
  (``fedlora`` / ``cenlora``, which have no server segment);
* ``grad`` for the pending step -> back-propagate, optimizer step; at an aggregation step
  upload the adapters (``adapt``) right away;
* ``global`` -> load the aggregated adapters (and remember an in-memory snapshot of adapters,
  optimizer and stream position, so a server that resumes from its checkpoint can roll the
  client back to exactly that state);
* ``skip`` / ``resync`` / ``upload`` / ``resend`` -> the server's repairs after a dropout, a
  lost message or a restart;
* a heartbeat thread reports the client's whole progress state every ``heartbeat`` seconds;
  the server compares it with its own and repairs what is missing. That single mechanism
  covers lost messages across broker restarts, paused processes and restarted clients.

Idempotency: a step's update is applied only when the client holds that step's pending
activations, and the pending entry is consumed by the first matching gradient; a repeated
gradient, step announcement or global finds nothing to do.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from runner import device as placement
from runner import rundir, schedule, seeds
from runner.dataset import data as data_mod
from runner.distributed import checkpoint, control
from runner.distributed import protocol as P
from runner.distributed.runtime import (
    RuntimeConfig,
    is_split,
    load_config,
    setup_logging,
)
from runner.distributed.transport import Transport, TransportError
from runner.emulation.resources import Meter, cuda_index
from runner.errors import UserError
from runner.methods import plugins, registry
from runner.methods.hooks import ClientHooks
from runner.model import lora, split
from runner.model.models import load_config as load_model_config
from runner.trainer import (
    Holder,
    grad_scaler,
    local_train_step,
    make_optimizer,
    prepare,
    split_point,
    tensor_bytes,
)

log = logging.getLogger("runner.client")


class Client:
    """One client's state machine; :meth:`run` is the process's main loop."""

    def __init__(self, rt: RuntimeConfig):
        self.rt = rt
        self.cfg = cfg = rt.train
        self.cid = rt.me
        self.index = rt.index(self.cid)
        self.split = is_split(cfg)
        prep = prepare(cfg)
        self.info = info = prep.info
        self.k = split_point(cfg, info) if self.split else info.num_layers
        # Where this client trains (docs/gpu.md "Device placement"): its segment, batches and
        # what it receives (the transport lands decoded tensors here).
        self.device = placement.resolve(cfg.device)
        # Design choice: LoRA dropout masks come from this process's own RNG, seeded per
        # client. The in-process trainer draws all clients' masks from one shared stream, so
        # runs match step for step only with lora_dropout = 0 (docs/protocol.md).
        torch.manual_seed(seeds.client_process(cfg.seed, self.index))
        self.traits = registry.traits(cfg)
        self.full = self.traits.full  # full fine-tuning: whole weights travel, not adapters
        # The method's client-side hooks (runner/methods/hooks.py): they may bring the model.
        self.hooks: ClientHooks = (plugins.hooks(cfg, "client") or ClientHooks)(self)
        seg, ranks = self.hooks.load_model()
        shards = prep.shards
        shard = shards[self.index]
        self.name = "central" if self.traits.central else self.cid
        self.examples = data_mod.encode_frame(prep.tokenizer, shard, cfg.max_len)
        self.pad_id = int(prep.tokenizer.pad_token_id)
        # HSplitLoRA clients get their segment from the server's plan (seg None until then).
        self.holder = Holder(name=self.name, seg=seg, ranks=ranks,  # type: ignore[arg-type]
                             n_examples=len(shard), weight=len(shard) / sum(len(s) for s in shards),
                             scaler=grad_scaler(cfg.precision, self.device))
        self.hidden = int(load_model_config(info.path).hidden_size)
        self._reset_stream(0)
        self._reset_optimizer(0)
        self.adapter_shapes: dict[str, list[int]] = {}
        if seg is not None:
            seg.model.train()
            self.adapter_shapes = {k: list(v.shape) for k, v in
                                   lora.trained_state(seg.model, self.full).items()}
        # progress state (reported in every heartbeat)
        self.incarnation = uuid.uuid4().hex[:12]
        self._budget_at, self._budget_cache = -1e9, None
        # measured memory (runner/emulation/resources.py), in heartbeats and acts: of the GPU
        # this client trains on (cuda:N), not the current one
        self.meter = Meter(device=cuda_index(self.device))
        # compute time of the last finished step: {"step", "forward_s", "backward_s",
        # "compute_s"} (heartbeats; the server turns each new one into a resources record)
        self.compute: dict[str, Any] | None = None
        self.epoch: str | None = None
        self.done_step = -1  # last step whose update was applied (or that was skipped)
        self.announced = -1  # latest step the server announced
        self.need_global = -1  # aggregation the announced step builds on
        self.global_step = -1  # last aggregation whose adapters we hold
        self.uploaded = -1
        self.sit_out = -1  # latest step the server told us to sit out (per-round dropout)
        self.pending: dict[str, Any] | None = None
        self.record: dict[str, Any] | None = None  # last local-step record (non-split methods)
        self.fresh = True  # nothing trained by this process yet
        self.synced = False  # the server has resynchronised this incarnation at least once
        self.finished = False
        # What the main thread is computing now, (what, step): heartbeats report it so the
        # server extends a deadline for a slow device rather than dropping a working one.
        self.busy: tuple[str, int] | None = None
        self.snapshots: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self._snapshot(-1)
        self.last_server = time.monotonic()
        self.t: Transport | None = None
        self._hb_stop = threading.Event()
        self._net_pause = 0.0  # seconds of injected network outage requested (SIGUSR1)

    def default_model(self) -> tuple[split.Segment | None, lora.RankMap]:
        """The client's segment with uniform adapters (SplitLoRA: split point L/4 or --split;
        fedlora/cenlora: the whole model)."""
        cfg, info = self.cfg, self.info
        seg = split.load_client(info.path, self.k, self.cfg.precision, device=self.device) \
            if self.split else split.load_unsplit(info.path, self.cfg.precision,
                                                  device=self.device)
        if self.full:  # Trainer._adapt for ft: every weight trains
            for p in seg.model.parameters():
                p.requires_grad_(True)
            return seg, {}
        ranks = lora.attach_lora(seg, lora.uniform_ranks(seg.config, cfg.rank, cfg.targets),
                                 alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                                 seed=seeds.adapter_init(cfg.seed))
        return seg, ranks

    # ------------------------------------------------------------------------ state
    def _reset_stream(self, drawn: int) -> None:
        """The batch stream at position ``drawn``: rebuilt from its seed (as in
        Trainer._build) and advanced, so a restarted client continues where it was."""
        self.batches = data_mod.ClientBatches(
            self.examples, self.cfg.batch_size, self.pad_id,
            seed=seeds.batch_stream(self.cfg.seed, self.index),
            multiple=data_mod.length_multiple(self.cfg.precision))
        for _ in range(drawn):
            self.batches.next()
        self.drawn = drawn

    def _reset_optimizer(self, opt_steps: int) -> None:
        """A fresh AdamW whose schedule continues at ``opt_steps`` (moments are lost with a
        crashed process; the learning-rate schedule is not)."""
        # A client whose segment comes from the server (HSplitLoRA) has none until then.
        opt = (make_optimizer(self.holder.seg.model, self.cfg, start_step=opt_steps)
               if self.holder.seg is not None else None)
        self.holder.opt, self.holder.sched = opt if opt is not None else (None, None)
        self.opt_start = self.opt_steps = opt_steps

    def _snapshot(self, step: int) -> None:
        """Keep adapters, optimizer and stream position as of aggregation ``step`` (the
        server's checkpoint points), for an exact roll-back after a server restart."""
        h = self.holder
        if not self.hooks.snapshots or h.seg is None:
            return  # the method's server sends the whole state on a roll-back
        opt = h.opt.state_dict() if h.opt is not None else None
        sched = h.sched.state_dict() if h.sched is not None else None
        snap: dict[str, Any] = {"drawn": self.drawn, "opt_steps": self.opt_steps,
                                "opt_start": self.opt_start}
        # On a GPU the LoRA dropout masks come from the device's generator: keep its state
        # so a roll-back draws the masks the uninterrupted run drew (runner/distributed/
        # checkpoint.py); a CPU client's snapshot is what it always was.
        cuda_rng = checkpoint.cuda_rng_state(self.device)
        if cuda_rng is not None:
            snap["cuda_rng"] = cuda_rng
        if self.full:
            if step < 0:
                return  # nothing trained yet: nothing to keep
            # ft: the weights come back from the server on a roll-back (its checkpoint holds
            # the uploaded model); AdamW's two moments are twice the model, too much to keep
            # in memory three times, so they go to disk (the client's own directory).
            path = self.state_dir / f"optimizer-{step}.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save({"opt": opt, "sched": sched}, tmp)
            os.replace(tmp, path)
            snap.update(adapters=None, path=path)
            keep = 2  # the server checkpoints the last aggregation or, killed before its
            # checkpoint was written, the one before
        else:
            snap.update(adapters={k: v.detach().clone()
                                  for k, v in lora.adapter_state(h.seg.model).items()},
                        opt=copy.deepcopy(opt), sched=copy.deepcopy(sched))
            keep = 3
        self.snapshots[step] = snap
        while len(self.snapshots) > keep:
            _, old = self.snapshots.popitem(last=False)
            if old.get("path") is not None:
                with contextlib.suppress(OSError):
                    old["path"].unlink()

    @property
    def state_dir(self) -> Path:
        """Where this client keeps state too large for memory (ft's optimizer snapshots):
        ``$TESTBED_STATE_DIR``, else ``RUN/clients/<id>`` (the run directory is this
        process's own or, in a container, a mount of its own)."""
        env = os.environ.get("TESTBED_STATE_DIR")
        return Path(env) if env else self.rt.run_dir / "clients" / self.cid

    def _restore(self, snap: dict[str, Any], tensors: dict[str, torch.Tensor]) -> bool:
        """Back to snapshot ``snap``: adapters (or, ft, the server's ``tensors``), AdamW
        moments and schedule, stream position. False when its file is gone (then the
        caller's approximate roll-back applies)."""
        h = self.holder
        if snap["adapters"] is None:  # ft: optimizer state on disk, weights from the server
            try:
                saved = torch.load(snap["path"], weights_only=False, map_location=self.device)
            except (OSError, RuntimeError, EOFError):
                return False
            if not tensors:
                return False
            lora.load_trained_state(h.seg.model, tensors, self.full)
            opt, sched = saved["opt"], saved["sched"]
        else:
            lora.load_adapter_state(h.seg.model, snap["adapters"])
            opt, sched = copy.deepcopy(snap["opt"]), copy.deepcopy(snap["sched"])
        # The schedule's lambda is not in its state dict: rebuild it with the same offset,
        # then the saved step count (last_epoch) continues from there.
        self._reset_optimizer(snap["opt_start"])
        if h.opt is not None and opt is not None:
            h.opt.load_state_dict(opt)
            h.sched.load_state_dict(sched)
        self.opt_steps = snap["opt_steps"]
        self._reset_stream(snap["drawn"])
        checkpoint.restore_cuda_rng(snap.get("cuda_rng"), self.device)  # on CUDA only
        return True

    def status(self) -> dict[str, Any]:
        """What the server needs to see to repair anything missing (docs/protocol.md)."""
        p = self.pending
        out: dict[str, Any] = {
            "inc": self.incarnation, "epoch": self.epoch, "done": self.done_step,
            "pending": p["step"] if p else None,
            "pending_age": round(time.monotonic() - p["since"], 3) if p else 0.0,
            "global": self.global_step, "uploaded": self.uploaded, "drawn": self.drawn,
            "opt_steps": self.opt_steps, "fresh": self.fresh, "synced": self.synced}
        if self.busy is not None:
            out["busy"] = list(self.busy)
        if self.record is not None:
            out["record"] = self.record
        budget = self._budget()
        if budget is not None:
            out["budget"], out["budget_source"] = budget.bytes, budget.source
        out.update(self.memory())
        if self.compute is not None:
            out["compute"] = self.compute
        out.update(self.hooks.status())
        return out

    def memory(self) -> dict[str, Any]:
        """Measured memory now and at its peak (runner/emulation/resources.py): the fields
        ``memory_current_bytes``, ``memory_peak_bytes``, ``memory_source`` (cgroup | rss |
        nvml | cuda) and the extra figures; {} if measuring fails."""
        try:
            return self.meter.sample().fields()
        except Exception:  # noqa: BLE001 - a measurement must never stop training
            return {}

    def _budget(self) -> Any:
        """This device's memory budget (runner/emulation/budget.py: NVML, cgroup, profile), re-read
        at most every second: it is reported in heartbeats so the server sees a change
        (docs/method.md "ARMSC: Trigger"). A budget injected into the run directory
        (``testbed inject budget``) comes first. None when no source answers."""
        now = time.monotonic()
        if now - self._budget_at < 1.0:
            return self._budget_cache
        from runner.emulation.budget import Budget
        from runner.emulation.gpu import process_budget
        from runner.errors import ConfigError

        injected = rundir.injected(self.rt.run_dir, self.cid, "budget")
        try:  # `testbed inject budget`: the device's budget as the emulation says it is now
            self._budget_cache = Budget(int(injected.read_text().strip()), "injected",
                                        str(injected))
            self._budget_at = now
            return self._budget_cache
        except (OSError, ValueError):
            pass

        try:  # the CPU's sources on the CPU; on a CUDA device its planned budget within
            # the GPU / MIG instance NVML finds by UUID (runner/emulation/gpu.py)
            self._budget_cache = process_budget(self.cfg, self.index)
        except (ConfigError, OSError, ValueError):
            self._budget_cache = None
        self._budget_at = now
        return self._budget_cache

    # ------------------------------------------------------------------------ network
    def _expect(self) -> P.Expect:
        return P.Expect(run=self.rt.run_id, clients=frozenset({self.cid}),
                        hidden=self.hidden if self.split else None, shapes=self.hooks.shapes)

    def default_shapes(self, h: P.Header) -> dict[str, list[int | None]] | None:
        """The tensors a message from the server must carry (SplitLoRA, FedAvg methods)."""
        if h.kind is P.Kind.GRAD:
            return {P.GRAD: [self.cfg.batch_size, None, self.hidden]}
        if h.kind is P.Kind.GLOBAL and self.full:
            return {}  # ft: the server does not send our own weights back
        if h.kind is P.Kind.GLOBAL or (h.kind is P.Kind.CONFIG and h.tensors):
            return dict(self.adapter_shapes)  # type: ignore[arg-type]
        return None

    def connect(self) -> Transport:
        """Connect, retrying while the broker is not up yet (containers start in any order)."""
        o = self.rt.options
        deadline = time.monotonic() + o.server_timeout
        while True:
            t = Transport(self.rt.broker, self.rt.credentials, run=self.rt.run_id, me=self.cid,
                          expect=self._expect(), chunk_size=o.chunk_size,
                          reconnect=(0.1, o.reconnect_max), backend=o.mqtt, tls=self.rt.tls,
                          device=self.device)
            try:
                return t.connect(10.0)
            except TransportError as e:
                if "refused" in str(e) or time.monotonic() > deadline:
                    raise
                log.info("broker not reachable yet (%s); retrying", e)
                time.sleep(1.0)

    def _heartbeats(self) -> None:
        assert self.t is not None
        while not self._hb_stop.is_set():
            if self.t.connected:
                try:
                    self.t.heartbeat(max(self.done_step, 0), **self.status())
                except (TransportError, ValueError, RuntimeError) as e:
                    log.debug("heartbeat not sent: %s", e)
            self._hb_stop.wait(self.rt.options.heartbeat)

    # --------------------------------------------------------------------------- loop
    def run(self) -> int:
        self.t = self.connect()
        log.info("%s connected to %s (incarnation %s)", self.cid, self.rt.broker.url,
                 self.incarnation)
        hb = threading.Thread(target=self._heartbeats, name="heartbeat", daemon=True)
        hb.start()
        try:
            while not self.finished:
                if self._net_pause:
                    self._network_outage()
                msg = self.t.recv(0.05)
                if msg is not None:
                    self.last_server = time.monotonic()
                    self.handle(msg)
                    continue  # drain the inbox before starting work
                self.advance()
                if time.monotonic() - self.last_server > self.rt.options.server_timeout:
                    log.error("no message from the server for %.0f s; giving up",
                              self.rt.options.server_timeout)
                    return 1
        except Exception as exc:  # a CUDA out-of-memory error under the per-process cap:
            from runner.emulation.gpu import BUDGET_EXCEEDED_EXIT, client_out_of_memory

            if not client_out_of_memory(self, exc):  # budget_exceeded, as a cgroup OOM
                raise
            return BUDGET_EXCEEDED_EXIT
        finally:
            self._hb_stop.set()
            if self.finished:
                with contextlib.suppress(TransportError, ValueError, RuntimeError):
                    self.t.set_state("done")
            self.t.close(timeout=1.0)  # short: on SIGTERM the broker may be going down too
        return 0

    def _network_outage(self) -> None:
        """Fault injection (``testbed inject dropout --mode disconnect``): drop the connection
        as a network failure would (the broker publishes our last will), stay away, come back.
        """
        assert self.t is not None
        seconds, self._net_pause = self._net_pause, 0.0
        log.warning("injected network outage for %.1f s", seconds)
        self.t.outage(seconds)  # abrupt: no DISCONNECT packet, so the will fires

    def handle(self, msg: P.Message) -> None:
        """Apply one message from the server (every branch is idempotent): the method's
        handlers first, then the engine's."""
        ctrl = None
        if msg.kind is P.Kind.CONFIG:
            try:  # decoded and validated once (runner/distributed/control.py)
                ctrl = control.decode(msg)
            except control.ControlError as e:
                log.warning("%s of step %d refused: %s", control.op_of(msg), msg.step, e)
                return
        if self.hooks.handle(msg, ctrl):
            return
        self._handle(msg, ctrl)
        self.hooks.after_handle(msg, ctrl)

    def _handle(self, msg: P.Message, ctrl: control.Control | None) -> None:
        if isinstance(ctrl, control.Step):
            if ctrl.rollback and ctrl.epoch != self.epoch:
                return  # wait for the server's roll-back resync first
            if self.epoch is None:
                self.epoch = ctrl.epoch
            if ctrl.step > self.announced:
                self.announced = ctrl.step
                self.need_global = ctrl.global_
            if self.cid in ctrl.away:
                self.sit_out = max(self.sit_out, ctrl.step)
        elif isinstance(ctrl, control.Skip):
            if self.pending is not None and self.pending["step"] == ctrl.step:
                log.info("step %d skipped by the server (late)", ctrl.step)
                self.pending = None
                self.done_step = max(self.done_step, ctrl.step)
        elif isinstance(ctrl, control.Resync):
            self.resync(ctrl, msg.tensors)
        elif isinstance(ctrl, control.Upload):
            if self.done_step == ctrl.step and self.pending is None:
                self.upload(ctrl.step)
        elif isinstance(ctrl, control.Resend):
            if self.pending is not None and self.pending["step"] == ctrl.step:
                self._send_act(self.pending)
        elif isinstance(ctrl, control.Done):
            self.finished = True
        elif msg.kind is P.Kind.GRAD:
            self.apply_grad(msg)
        elif msg.kind is P.Kind.GLOBAL and msg.step > self.global_step:
            lora.load_trained_state(self.holder.seg.model, msg.tensors, self.full)
            self.global_step = msg.step
            self._snapshot(msg.step)

    def advance(self) -> None:
        """Start the announced step when nothing is pending and the adapters it builds on
        have arrived (and the method's hooks have nothing to do or wait for)."""
        if self.sit_out >= self.announced > self.done_step and self.pending is None:
            # The server's per-round dropout: this device is away for the step. Nothing is
            # drawn or trained (as an in-process client that sits a round out), and it waits
            # for the server's resync when its round is over.
            log.info("sitting out step %d (dropout)", self.announced)
            self.done_step = self.announced
            self.synced = False
            return
        if self.hooks.advance():
            return
        if (not self.synced or self.pending is not None or self.announced <= self.done_step
                or self.global_step < self.need_global):
            return
        step = self.announced
        self.fresh = False
        if self.split:
            self._split_forward(step)
        else:
            self._local_step(step)

    # ------------------------------------------------------------------------- steps
    def _split_forward(self, step: int) -> None:
        with self.working("step", step):
            self._split_forward_now(step)

    @contextlib.contextmanager
    def working(self, what: str, step: int) -> Any:
        """Mark the main thread busy with ``what`` of ``step`` (reported in heartbeats)."""
        self.busy = (what, step)
        try:
            yield
        finally:
            self.busy = None

    def _split_forward_now(self, step: int) -> None:
        h = self.holder
        batch = placement.to(self.batches.next(), h.seg.device)
        self.drawn += 1
        t0 = time.perf_counter()
        acts = split.client_forward(h.seg, batch["input_ids"], batch["attention_mask"])
        pending = {"step": step, "acts": acts, "since": time.monotonic(),
                   "tensors": {P.ACTS: acts.detach(), P.MASK: batch["attention_mask"],
                               P.LABELS: batch["labels"]},
                   "meta": {"drawn": self.drawn, "opt_steps": self.opt_steps, "lr": h.lr,
                            "compute_s": time.perf_counter() - t0, "inc": self.incarnation,
                            "epoch": self.epoch, **self.memory()}}
        self.pending = pending
        self._send_act(pending)

    def _send_act(self, pending: dict[str, Any]) -> None:
        assert self.t is not None
        try:
            self.t.send(P.Kind.ACT, pending["step"], pending["tensors"], pending["meta"],
                        wire=self.rt.options.wire)
        except TransportError as e:  # the server asks again (resend) after reconnecting
            log.warning("activations of step %d not sent: %s", pending["step"], e)

    def apply_grad(self, msg: P.Message) -> None:
        p = self.pending
        if p is None or p["step"] != msg.step:
            return  # a repeat, or a step we no longer hold
        grad = msg.tensors[P.GRAD]
        if grad.shape != p["acts"].shape:
            log.warning("gradient of step %d has shape %s, activations %s; ignored",
                        msg.step, tuple(grad.shape), tuple(p["acts"].shape))
            return
        t0 = time.perf_counter()
        with self.working("grad", msg.step):
            self.holder.backward(p["acts"], grad.to(p["acts"].dtype))
            self.holder.step()
        backward = time.perf_counter() - t0
        forward = p["meta"].get("compute_s")
        self.compute = {"step": msg.step, "forward_s": forward, "backward_s": backward,
                        "compute_s": backward + (forward if isinstance(forward, float) else 0.0)}
        self.opt_steps += 1
        self.pending = None
        self.done_step = msg.step
        if schedule.sync_due(self.cfg, msg.step):
            self.upload(msg.step)

    def _local_step(self, step: int) -> None:
        """fedlora / cenlora: the whole model is here (Trainer._local_step)."""
        h = self.holder
        batch = self.batches.next()
        self.drawn += 1
        t0 = time.perf_counter()
        lr = h.lr
        with self.working("step", step):
            loss, n = local_train_step(h, batch, self.cfg.label_smoothing)
        self.opt_steps += 1
        self.done_step = step
        compute = time.perf_counter() - t0  # the whole step: it is in the record itself
        self.record = dict(step=step, client=self.name, loss=loss, tokens=n,
                           seq_tokens=int(batch["attention_mask"].numel()), bytes_sent=0,
                           bytes_received=0, lr=lr, compute_s=compute, drawn=self.drawn,
                           **self.memory())
        if self.t is not None:  # report at once rather than at the next heartbeat
            try:
                self.t.heartbeat(step, **self.status())
            except (TransportError, ValueError, RuntimeError) as e:
                log.debug("record heartbeat not sent: %s", e)
        if schedule.sync_due(self.cfg, step):
            self.upload(step)

    def upload(self, step: int) -> None:
        assert self.t is not None
        state = {k: v.detach() for k, v in
                 lora.trained_state(self.holder.seg.model, self.full).items()}
        try:
            self.t.send(P.Kind.ADAPT, step, state,
                        {"drawn": self.drawn, "opt_steps": self.opt_steps,
                         "inc": self.incarnation, "epoch": self.epoch,
                         "bytes": tensor_bytes(*state.values())})
            self.uploaded = step
        except TransportError as e:
            log.warning("adapters of step %d not sent: %s", step, e)

    def resync(self, r: control.Resync, tensors: dict[str, torch.Tensor]) -> None:
        """The server's resync, as the method's hooks apply it."""
        self.hooks.resync(r, tensors)

    def default_resync(self, r: control.Resync, tensors: dict[str, torch.Tensor]) -> None:
        """Rejoin (server continuous) or roll back (server resumed from its checkpoint)."""
        g, drawn, opt_steps = r.global_, r.drawn, r.opt_steps
        if r.mode == "rollback":
            snap = self.snapshots.get(g)
            if (snap is not None and (snap["drawn"], snap["opt_steps"]) == (drawn, opt_steps)
                    and self._restore(snap, tensors)):
                how = "exact"
            else:
                if tensors:
                    lora.load_trained_state(self.holder.seg.model, tensors, self.full)
                elif g < 0:
                    first = self.snapshots.get(-1)
                    lora.load_adapter_state(self.holder.seg.model,
                                            first["adapters"] if first is not None else {})
                self._reset_stream(drawn)
                self._reset_optimizer(opt_steps)
                how = "approximate"
            self.pending = None
            self.compute = None  # its steps after g are undone: no resources record for them
            self.done_step = self.announced = self.uploaded = g
            self.need_global = g
            self.sit_out = -1  # the resumed server announces who sits out again
            self.global_step = g
            log.info("rolled back to aggregation %d (%s)", g, how)
        else:
            if tensors:
                lora.load_trained_state(self.holder.seg.model, tensors, self.full)
            if self.fresh:
                self._reset_stream(drawn)
                self._reset_optimizer(opt_steps)
            self.global_step = max(self.global_step, g)
            log.info("resynchronised at aggregation %d", g)
        if r.epoch is not None:
            self.epoch = r.epoch
        self.synced = True
        if g not in self.snapshots:
            self._snapshot(g)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner.client",
                                     description="A client of a distributed run (env: "
                                                 "TESTBED_CONFIG, TESTBED_BROKER, ...)")
    parser.add_argument("--client-id", help="overrides TESTBED_CLIENT_ID")
    args = parser.parse_args(argv)
    from runner.emulation import gpu

    try:
        rt = load_config(me=args.client_id)
        if rt.me == "server":
            raise UserError("TESTBED_CLIENT_ID (or --client-id) must name a client")
        setup_logging(rt.me)
        from runner.emulation.cpu import fit_threads

        threads, quota = fit_threads()  # a 0.12-CPU device must not run 2 torch threads
        log.info("torch threads %d (CPU quota %s)", threads,
                 "none" if quota is None else f"{quota:.2f}")
        gpu.cap_process(rt.train, rt.index(rt.me))  # on a GPU: a memory cap sized to the budget
        client = Client(rt)  # the method's own handlers plug in (runner/methods/plugins.py)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a CUDA out-of-memory error while the model loads onto the GPU
        if not gpu.is_cuda_oom(e) or not gpu.starting_out_of_memory(rt, e):
            raise
        return gpu.BUDGET_EXCEEDED_EXIT

    def on_usr1(signum: int, frame: Any) -> None:
        # Injected network outage; the length comes from the run directory (see
        # testbed/backends/local.py); the main loop performs it outside the signal handler.
        path = rundir.injected(rt.run_dir, rt.me, "disconnect")
        try:
            client._net_pause = max(0.1, float(path.read_text().strip()))
        except (OSError, ValueError):
            client._net_pause = 5.0

    signal.signal(signal.SIGUSR1, on_usr1)
    signal.signal(signal.SIGTERM, lambda s, f: sys.exit(143))
    return client.run()


if __name__ == "__main__":
    sys.exit(main())

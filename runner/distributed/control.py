"""Typed control messages: what the server tells a client in ``config`` messages, and what
a client's heartbeats, activations, uploads and state messages say to the server.

Why: the operations used to travel as untyped meta dicts, built in one place and read field
by field (with defaults and type checks repeated) wherever they were handled. Here each
operation is a dataclass: the server builds one and :func:`encode` writes its meta; a client
calls :func:`decode` once per message, which validates every field (a control message comes
from the network: a malformed one is refused with :class:`ControlError`, never half
applied), and its handlers read typed fields. The wire format is docs/protocol.md's
("Control operations", "HSplitLoRA"), unchanged.

A method may add operations of its own: :func:`decode` returns None for an ``op`` it does not
know, and the method's client hooks read that message themselves (docs/extending.md).

The other direction (client -> server) is decoded once as well, by the server's dispatch:
:func:`decode_presence` for ``state`` messages, :func:`decode_report` for the rest: the
sender (its incarnation id is required: without one the message is refused with
:class:`ControlError`) and a :class:`Heartbeat`, :class:`ActReport` or :class:`AdaptReport`.
Their other fields are lenient as they always were: a missing or mistyped one takes the value
that changes nothing (None, the default), since a heartbeat must never crash the server.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from runner.distributed import protocol as P
from runner.distributed.repair import ClientStatus
from runner.emulation.resources import usage_fields

OP_STEP = "step"  # broadcast: step t begins (or, on a client's channel, a repeat for it)
OP_SKIP = "skip"  # to one client: your activations for step t came too late; drop them
OP_RESYNC = "resync"  # to one client: global adapters + stream/optimizer position
OP_UPLOAD = "upload"  # to one client: (re)send your adapters for aggregation step t
OP_RESEND = "resend"  # to one client: (re)send your activations for step t
OP_DONE = "done"  # broadcast: the run is over, exit
# HSplitLoRA (runner/methods/hsplitlora_server.py, hetero_server.py):
OP_MERGE = "merge"  # to one client: NAA factors of its blocks; merge, re-initialise adapters
OP_PROBE = "probe"  # to one client: run an importance probe batch (IWI)
OP_PLAN = "plan"  # to one client: split point + ranks (ARMSC), moved blocks' weights
OP_SET = "set"  # to one client: its adapters after a per-client aggregation (hetlora, no-naa)
FORMS = ("factors", "dense")  # how a merged update travels (runner/aggregation.wire_bytes)


class ControlError(ValueError):
    """A control message whose fields do not validate."""


def _int(meta: dict[str, Any], key: str, default: int | None = None) -> int:
    value = meta.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ControlError(f"{key!r} must be an integer, got {value!r}")
    return value


def _epoch(meta: dict[str, Any]) -> str | None:
    value = meta.get("epoch")
    if value is not None and not isinstance(value, str):
        raise ControlError(f"'epoch' must be a string, got {value!r}")
    return value


def _ranks(value: Any) -> dict[str, int]:
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
            for k, v in value.items()):
        raise ControlError("ranks must map weight names to non-negative integers")
    return dict(value)


@dataclass(frozen=True)
class PlanSpec:
    """A client's configuration (ARMSC): split point, ranks, the step seeding its adapters."""

    version: int
    split: int
    ranks: dict[str, int]
    reinit: int = 0

    def to_meta(self) -> dict[str, Any]:
        return {"version": self.version, "split": self.split, "ranks": dict(self.ranks),
                "reinit": self.reinit}

    @classmethod
    def from_meta(cls, meta: Any) -> PlanSpec:
        if not isinstance(meta, dict):
            raise ControlError("plan must be a mapping")
        return cls(_int(meta, "version"), _int(meta, "split"), _ranks(meta.get("ranks")),
                   _int(meta, "reinit", 0))


@dataclass(frozen=True)
class Step:
    """Step ``step`` begins; it builds on aggregation ``global_`` (and plan version ``plan``)."""

    step: int
    global_: int
    epoch: str | None
    rollback: bool = False
    plan: int | None = None  # HSplitLoRA: the plan version the step needs
    away: tuple[str, ...] = ()  # clients that sit this step out (per-round dropout)


@dataclass(frozen=True)
class Skip:
    step: int


@dataclass(frozen=True)
class Upload:
    step: int


@dataclass(frozen=True)
class Resend:
    step: int


@dataclass(frozen=True)
class Done:
    step: int


@dataclass(frozen=True)
class Resync:
    """Rejoin (``mode`` "rejoin") or roll back ("rollback") to aggregation ``global_``."""

    mode: str
    global_: int
    drawn: int
    opt_steps: int
    epoch: str | None
    plan: PlanSpec | None = None  # HSplitLoRA: the client's configuration


@dataclass(frozen=True)
class Merge:
    """NAA after aggregation ``step``: the update of each weight in ``forms``."""

    step: int
    forms: dict[str, str]
    reinit: int
    epoch: str | None


@dataclass(frozen=True)
class Probe:
    """Run an IWI probe batch for step ``step`` once merge ``global_`` is applied."""

    step: int
    global_: int
    epoch: str | None


@dataclass(frozen=True)
class Plan:
    step: int
    spec: PlanSpec
    epoch: str | None


@dataclass(frozen=True)
class SetAdapters:
    """This client's adapters after aggregation ``step`` (hetlora, hsplitlora-no-naa)."""

    step: int
    epoch: str | None


Control = Step | Skip | Upload | Resend | Done | Resync | Merge | Probe | Plan | SetAdapters


def encode(c: Control) -> tuple[int, dict[str, Any]]:
    """The ``config`` message's header step and meta for ``c`` (docs/protocol.md)."""
    if isinstance(c, Step):
        meta = {"op": OP_STEP, "step": c.step, "epoch": c.epoch, "rollback": c.rollback,
                **({} if c.plan is None else {"plan": c.plan}), "global": c.global_,
                **({"away": list(c.away)} if c.away else {})}
        return max(c.step, 0), meta
    simple = {Skip: OP_SKIP, Upload: OP_UPLOAD, Resend: OP_RESEND, Done: OP_DONE}
    if type(c) in simple:
        return max(c.step, 0), {"op": simple[type(c)], "step": c.step}  # type: ignore[union-attr]
    if isinstance(c, Resync):
        meta = {"op": OP_RESYNC, "mode": c.mode, "global": c.global_, "drawn": c.drawn,
                "opt_steps": c.opt_steps, "epoch": c.epoch}
        if c.plan is not None:
            meta["plan"] = c.plan.to_meta()
        return max(c.global_, 0), meta
    if isinstance(c, Merge):
        return c.step, {"op": OP_MERGE, "step": c.step, "reinit": c.reinit,
                        "forms": dict(c.forms), "epoch": c.epoch}
    if isinstance(c, Probe):
        return max(c.step, 0), {"op": OP_PROBE, "step": c.step, "epoch": c.epoch,
                                "global": c.global_}
    if isinstance(c, Plan):
        return c.step, {"op": OP_PLAN, "step": c.step, "epoch": c.epoch, **c.spec.to_meta()}
    if isinstance(c, SetAdapters):
        return c.step, {"op": OP_SET, "step": c.step, "epoch": c.epoch}
    raise TypeError(f"not a control message: {c!r}")


_OPS: dict[type, str] = {Step: OP_STEP, Skip: OP_SKIP, Upload: OP_UPLOAD, Resend: OP_RESEND,
                         Done: OP_DONE, Resync: OP_RESYNC, Merge: OP_MERGE, Probe: OP_PROBE,
                         Plan: OP_PLAN, SetAdapters: OP_SET}


def op_name(c: Control) -> str:
    """The wire name of ``c``'s operation (``busy`` in heartbeats names it too)."""
    return _OPS[type(c)]


def op_of(msg: P.Message) -> str | None:
    """The ``op`` a ``config`` message names (for a log line), or None."""
    op = msg.meta.get("op")
    return op if isinstance(op, str) else None


def decode(msg: P.Message) -> Control | None:
    """The typed operation of a ``config`` message; None for an ``op`` this module does not
    define (a method's own); :class:`ControlError` when a field does not validate.

    Operations addressed by the header step (merge, probe, plan, set) take it from there."""
    meta = msg.meta
    op = meta.get("op")
    if op == OP_STEP:
        away = meta.get("away", [])
        if not isinstance(away, list) or not all(isinstance(a, str) for a in away):
            raise ControlError(f"'away' must be a list of client ids, got {away!r}")
        return Step(_int(meta, "step"), _int(meta, "global", -1), _epoch(meta),
                    bool(meta.get("rollback")), _int(meta, "plan", -1), tuple(away))
    if op in (OP_SKIP, OP_UPLOAD, OP_RESEND, OP_DONE):
        cls = {OP_SKIP: Skip, OP_UPLOAD: Upload, OP_RESEND: Resend, OP_DONE: Done}[op]
        return cls(_int(meta, "step", -1))
    if op == OP_RESYNC:
        mode = meta.get("mode")
        if mode not in ("rejoin", "rollback"):
            raise ControlError(f"resync mode must be rejoin or rollback, got {mode!r}")
        plan = meta.get("plan")
        return Resync(mode, _int(meta, "global", -1), _int(meta, "drawn", 0),
                      _int(meta, "opt_steps", 0), _epoch(meta),
                      None if plan is None else PlanSpec.from_meta(plan))
    if op == OP_MERGE:
        forms = meta.get("forms")
        if not isinstance(forms, dict) or not all(
                isinstance(k, str) and v in FORMS for k, v in forms.items()):
            raise ControlError("merge forms must map weight names to factors or dense")
        return Merge(msg.step, dict(forms), _int(meta, "reinit", msg.step + 1), _epoch(meta))
    if op == OP_PROBE:
        return Probe(msg.step, _int(meta, "global", -1), _epoch(meta))
    if op == OP_PLAN:
        return Plan(msg.step, PlanSpec.from_meta(meta), _epoch(meta))
    if op == OP_SET:
        return SetAdapters(msg.step, _epoch(meta))
    return None


# ------------------------------------------------------------------- client -> server
def _opt_int(meta: dict[str, Any], key: str) -> int | None:
    """An int field, or None when absent or not an int (the reader keeps what it had)."""
    value = meta.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _opt_float(meta: dict[str, Any], key: str) -> float | None:
    value = meta.get(key)
    return float(value) if isinstance(value, int | float) else None


@dataclass(frozen=True)
class Sender:
    """Who sent a message: the client process's incarnation id and the server epoch it
    holds (None: none, or not a string)."""

    inc: str
    epoch: str | None = None


@dataclass(frozen=True)
class Presence:
    """A ``state`` message: ``done`` (exits as told), ``offline`` with a reason (``lost``: the
    broker published its last will), or another state the server ignores."""

    state: str | None
    reason: str = "offline"


def decode_presence(msg: P.Message) -> Presence:
    state = msg.meta.get("state")
    return Presence(state if isinstance(state, str) else None,
                    str(msg.meta.get("reason", "offline")))


@dataclass(frozen=True)
class ComputeReport:
    """A heartbeat's report of the last step a client finished: its compute times
    (``forward_s``, ``backward_s``, ``compute_s``, those that are numbers)."""

    step: int
    times: dict[str, float]


_MEMORY_PREFIXES = ("memory_", "cuda_", "host_memory_")


@dataclass(frozen=True)
class LocalRecord:
    """A local (non-split) method's step record, reported in heartbeats: its train record's
    fields (without ``drawn`` and the memory figures), the stream position and the validated
    memory figures (runner/emulation/resources.py ``usage_fields``)."""

    step: int | None
    drawn: int | None
    fields: dict[str, Any]
    usage: dict[str, Any]


@dataclass(frozen=True)
class Heartbeat(ClientStatus):
    """A client's heartbeat (runner/client.py ``status``): the state the repair policy
    compares (:class:`runner.distributed.repair.ClientStatus`) plus what the server records
    from it. The default value is a client the server knows nothing of yet."""

    opt_steps: int | None = None
    plan: int = -1  # HSplitLoRA / HetLoRA: the plan version it holds
    record: LocalRecord | None = None
    budget: int | None = None  # its memory budget (bytes; positive)
    budget_source: str = "?"
    compute: ComputeReport | None = None
    usage: dict[str, Any] = field(default_factory=dict)


def _record(value: Any) -> LocalRecord | None:
    if not isinstance(value, dict):
        return None
    drawn = _opt_int(value, "drawn")
    fields = {k: v for k, v in value.items()
              if k != "drawn" and not k.startswith(_MEMORY_PREFIXES)}
    step = value.get("step")
    return LocalRecord(step if isinstance(step, int) and not isinstance(step, bool) else None,
                       drawn, fields, usage_fields(value))


def _compute(value: Any) -> ComputeReport | None:
    if not isinstance(value, dict):
        return None
    step = value.get("step")
    if not isinstance(step, int) or isinstance(step, bool):
        return None
    return ComputeReport(step, {
        k: float(value[k]) for k in ("forward_s", "backward_s", "compute_s")
        if isinstance(value.get(k), int | float) and not isinstance(value.get(k), bool)})


def decode_heartbeat(meta: dict[str, Any]) -> Heartbeat:
    """A heartbeat's fields; any that is missing or of the wrong type takes its default."""
    busy, epoch = meta.get("busy"), meta.get("epoch")
    age = meta.get("pending_age", 0)
    budget = _opt_int(meta, "budget")
    plan = _opt_int(meta, "plan")
    return Heartbeat(
        synced=bool(meta.get("synced")), epoch=epoch if isinstance(epoch, str) else None,
        done=d if (d := _opt_int(meta, "done")) is not None else -1,
        pending=_opt_int(meta, "pending"),
        pending_age=float(age) if isinstance(age, int | float) else 0.0,
        global_=g if (g := _opt_int(meta, "global")) is not None else -1,
        busy=(str(busy[0]), busy[1]) if isinstance(busy, list) and len(busy) == 2
        and isinstance(busy[1], int) else None,
        opt_steps=_opt_int(meta, "opt_steps"), plan=-1 if plan is None else plan,
        record=_record(meta.get("record")),
        budget=budget if budget is not None and budget > 0 else None,
        budget_source=str(meta.get("budget_source", "?")),
        compute=_compute(meta.get("compute")), usage=usage_fields(meta))


@dataclass(frozen=True)
class _Carrying:
    """A decoded message that carries tensors: its step and tensors are the message's."""

    msg: P.Message

    @property
    def step(self) -> int:
        return self.msg.step

    @property
    def tensors(self) -> dict[str, Any]:
        return self.msg.tensors


@dataclass(frozen=True)
class ActReport(_Carrying):
    """An ``act`` message: the boundary activations (``msg.tensors``) and what the client
    says with them: its stream and optimizer position, learning rate, forward time, memory;
    ``probe``: an IWI probe's activations (HSplitLoRA) rather than a training step's."""

    msg: P.Message
    drawn: int | None = None
    opt_steps: int | None = None
    lr: float | None = None
    compute_s: float | None = None
    probe: bool = False
    usage: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AdaptReport(_Carrying):
    """An ``adapt`` message: the adapters uploaded for aggregation ``step`` (``msg.tensors``)
    and the client's stream and optimizer position; ``probe``: an IWI probe's numerators
    (``importance``: weight name -> finite number, None when the field does not validate)
    instead of adapters."""

    msg: P.Message
    drawn: int | None = None
    opt_steps: int | None = None
    probe: bool = False
    importance: dict[str, float] | None = None


def _importance(value: Any) -> dict[str, float] | None:
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool)
            and math.isfinite(v) for k, v in value.items()):
        return None
    return {k: float(v) for k, v in value.items()}


def is_probe_upload(h: P.Header) -> bool:
    """Whether an ``adapt`` message (its header, before the payload is read) carries IWI
    numerators in its meta rather than adapters."""
    return h.meta.get("probe") is not None


def probe_grad_meta() -> dict[str, Any]:
    """The meta of the gradient the server returns for a probe's activations."""
    return {"probe": True}


def is_probe_grad(msg: P.Message) -> bool:
    """Whether a ``grad`` message answers an IWI probe (:func:`probe_grad_meta`)."""
    return bool(msg.meta.get("probe"))


ClientReport = Heartbeat | ActReport | AdaptReport


def decode_report(msg: P.Message) -> tuple[Sender, ClientReport | None]:
    """The sender and the typed content of a client's message other than ``state``
    (None for a kind the server does not read); :class:`ControlError` without an
    incarnation id."""
    meta = msg.meta
    inc, epoch = meta.get("inc"), meta.get("epoch")
    if not isinstance(inc, str):
        raise ControlError(f"{msg.kind.value} without an incarnation id")
    sender = Sender(inc, epoch if isinstance(epoch, str) else None)
    if msg.kind is P.Kind.HB:
        return sender, decode_heartbeat(meta)
    if msg.kind is P.Kind.ACT:
        return sender, ActReport(msg, _opt_int(meta, "drawn"), _opt_int(meta, "opt_steps"),
                                 _opt_float(meta, "lr"), _opt_float(meta, "compute_s"),
                                 bool(meta.get("probe")), usage_fields(meta))
    if msg.kind is P.Kind.ADAPT:
        return sender, AdaptReport(msg, _opt_int(meta, "drawn"), _opt_int(meta, "opt_steps"),
                                   meta.get("probe") is not None,
                                   _importance(meta.get("importance")))
    return sender, None

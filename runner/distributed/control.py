"""Typed control messages: what the server tells a client in ``config`` messages, and what
a client's heartbeats, activations, uploads and state messages say to the server.

Why: the operations used to travel as untyped meta dicts, built in one place and read field
by field (with defaults and type checks repeated) wherever they were handled. Here each
operation is a dataclass: the server builds one and :func:`encode` writes its meta; a client
calls :func:`decode` once per message, which validates every field (a control message comes
from the network: a malformed one is refused with :class:`ControlError`, never half
applied), and its handlers read typed fields. The wire format is docs/protocol.md's
("Control operations"), unchanged.

Why a registry of operations: this is the core wire module, and it knows no method. It
defines the engine's own operations (step, skip, resync, upload, resend, done); a method
that needs messages of its own defines them beside its hooks, each a dataclass with its
encoder and decoder, and calls :func:`register` when its module is imported
(HSplitLoRA's and HetLoRA's merge, probe, plan and set: runner/methods/hetero_wire.py;
docs/extending.md). :func:`encode`, :func:`decode` and :func:`op_name` look the operation
up there, so adding one edits neither this module nor an engine. :func:`decode` returns None
for an ``op`` nobody registered in this process, and a method's client hooks may read such
a message themselves (``msg.meta``).

The other direction (client -> server) is decoded once as well, by the server's dispatch:
:func:`decode_presence` for ``state`` messages, :func:`decode_report` for the rest: the
sender (its incarnation id is required: without one the message is refused with
:class:`ControlError`) and a :class:`Heartbeat`, :class:`ActReport` or :class:`AdaptReport`.
Their other fields are lenient as they always were: a missing or mistyped one takes the value
that changes nothing (None, the default), since a heartbeat must never crash the server.
Fields only a method sends (HSplitLoRA's probe flags and importance numerators) are read by
that method from the report's message (runner/methods/hetero_wire.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Self, TypeVar

from runner.distributed import protocol as P
from runner.distributed.repair import ClientStatus
from runner.emulation.resources import usage_fields

OP_STEP = "step"  # broadcast: step t begins (or, on a client's channel, a repeat for it)
OP_SKIP = "skip"  # to one client: your activations for step t came too late; drop them
OP_RESYNC = "resync"  # to one client: global adapters + stream/optimizer position
OP_UPLOAD = "upload"  # to one client: (re)send your adapters for aggregation step t
OP_RESEND = "resend"  # to one client: (re)send your activations for step t
OP_DONE = "done"  # broadcast: the run is over, exit


class ControlError(ValueError):
    """A control message whose fields do not validate."""


# Field readers for decoders (a method's too): a value of the wrong type is refused.
def int_field(meta: dict[str, Any], key: str, default: int | None = None) -> int:
    """``meta[key]`` as an integer (``default`` when absent); :class:`ControlError` when it
    is not one (a bool is not)."""
    value = meta.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ControlError(f"{key!r} must be an integer, got {value!r}")
    return value


def epoch_field(meta: dict[str, Any]) -> str | None:
    """The server epoch a message names (None: none)."""
    value = meta.get("epoch")
    if value is not None and not isinstance(value, str):
        raise ControlError(f"'epoch' must be a string, got {value!r}")
    return value


# ------------------------------------------------------------------ the registry
E = TypeVar("E")


@dataclass(frozen=True)
class Op(Generic[E]):
    """A registered operation: its wire name (``meta.op``), its dataclass, ``encode``
    (instance -> the ``config`` message's header step and its meta without ``op``) and
    ``decode`` (the message's meta and the message -> instance; :class:`ControlError` for a
    field that does not validate)."""

    name: str
    cls: type[E]
    encode: Callable[[E], tuple[int, dict[str, Any]]]
    decode: Callable[[dict[str, Any], P.Message], E]


_BY_NAME: dict[str, Op[Any]] = {}
_BY_CLASS: dict[type, Op[Any]] = {}

# Any registered operation's dataclass: the engine's below, or a method's own.
Control = Any


def register(name: str, cls: type[E], encode: Callable[[E], tuple[int, dict[str, Any]]],
             decode: Callable[[dict[str, Any], P.Message], E]) -> Op[E]:
    """Add operation ``name`` carried by dataclass ``cls``. A name and a class are
    registered once (again with the same functions is a no-op: a module imported twice);
    another operation under a taken name or class is a ValueError, since two meanings of one
    ``op`` would decode each other's messages."""
    op = Op(name, cls, encode, decode)
    for taken in (_BY_NAME.get(name), _BY_CLASS.get(cls)):
        if taken is not None and taken != op:
            raise ValueError(f"control operation {name!r} ({cls.__name__}) clashes with the "
                             f"registered {taken.name!r} ({taken.cls.__name__})")
    _BY_NAME[name] = _BY_CLASS[cls] = op
    return op


def registered() -> dict[str, Op[Any]]:
    """The operations this process can encode and decode, by name (registration order)."""
    return dict(_BY_NAME)


def _op(c: Control) -> Op[Any]:
    op = _BY_CLASS.get(type(c))
    if op is None:
        raise TypeError(f"not a registered control operation: {c!r}")
    return op


def encode(c: Control) -> tuple[int, dict[str, Any]]:
    """The ``config`` message's header step and meta for ``c`` (docs/protocol.md); ``op``
    comes first, then the operation's fields."""
    op = _op(c)
    step, meta = op.encode(c)
    return step, {"op": op.name, **meta}


def op_name(c: Control) -> str:
    """The wire name of ``c``'s operation (``busy`` in heartbeats names it too)."""
    return _op(c).name


def op_of(msg: P.Message) -> str | None:
    """The ``op`` a ``config`` message names (for a log line), or None."""
    op = msg.meta.get("op")
    return op if isinstance(op, str) else None


def decode(msg: P.Message) -> Control | None:
    """The typed operation of a ``config`` message; None for an ``op`` not registered in
    this process (a method's own, read from ``msg.meta`` by its hooks);
    :class:`ControlError` when a field does not validate."""
    op = msg.meta.get("op")
    codec = _BY_NAME.get(op) if isinstance(op, str) else None
    return None if codec is None else codec.decode(msg.meta, msg)


# ------------------------------------------------------------- the engine's operations
@dataclass(frozen=True)
class Step:
    """Step ``step`` begins; it builds on aggregation ``global_`` (and, for a method with
    plans, plan version ``plan``: the hooks' ``step_plan``; None: no plans)."""

    step: int
    global_: int
    epoch: str | None
    rollback: bool = False
    plan: int | None = None
    away: tuple[str, ...] = ()  # clients that sit this step out (per-round dropout)


def _encode_step(c: Step) -> tuple[int, dict[str, Any]]:
    return max(c.step, 0), {"step": c.step, "epoch": c.epoch, "rollback": c.rollback,
                            **({} if c.plan is None else {"plan": c.plan}),
                            "global": c.global_, **({"away": list(c.away)} if c.away else {})}


def _decode_step(meta: dict[str, Any], msg: P.Message) -> Step:
    away = meta.get("away", [])
    if not isinstance(away, list) or not all(isinstance(a, str) for a in away):
        raise ControlError(f"'away' must be a list of client ids, got {away!r}")
    # absent: a step of a method without plans (written only when there is one)
    plan = int_field(meta, "plan") if "plan" in meta else None
    return Step(int_field(meta, "step"), int_field(meta, "global", -1), epoch_field(meta),
                bool(meta.get("rollback")), plan, tuple(away))


@dataclass(frozen=True)
class _AtStep:
    """An operation whose one field is the step it is about (the header's: at least 0)."""

    step: int

    def to_meta(self) -> tuple[int, dict[str, Any]]:
        return max(self.step, 0), {"step": self.step}

    @classmethod
    def from_meta(cls, meta: dict[str, Any], msg: P.Message) -> Self:
        return cls(int_field(meta, "step", -1))


@dataclass(frozen=True)
class Skip(_AtStep):
    """To one client: its activations for ``step`` came too late; drop them."""


@dataclass(frozen=True)
class Upload(_AtStep):
    """To one client: (re)send its adapters for aggregation ``step``."""


@dataclass(frozen=True)
class Resend(_AtStep):
    """To one client: (re)send its activations for ``step``."""


@dataclass(frozen=True)
class Done(_AtStep):
    """Broadcast: the run is over; exit."""


@dataclass(frozen=True)
class Resync:
    """Rejoin (``mode`` "rejoin") or roll back ("rollback") to aggregation ``global_``.

    ``plan``: the method's configuration of this client, as its meta (validated here only as
    a mapping: what it holds is the method's, which reads it; HSplitLoRA / HetLoRA:
    runner/methods/hetero_wire.py ``plan_of``)."""

    mode: str
    global_: int
    drawn: int
    opt_steps: int
    epoch: str | None
    plan: dict[str, Any] | None = None


def _encode_resync(c: Resync) -> tuple[int, dict[str, Any]]:
    meta: dict[str, Any] = {"mode": c.mode, "global": c.global_, "drawn": c.drawn,
                            "opt_steps": c.opt_steps, "epoch": c.epoch}
    if c.plan is not None:
        meta["plan"] = dict(c.plan)
    return max(c.global_, 0), meta


def _decode_resync(meta: dict[str, Any], msg: P.Message) -> Resync:
    mode = meta.get("mode")
    if mode not in ("rejoin", "rollback"):
        raise ControlError(f"resync mode must be rejoin or rollback, got {mode!r}")
    plan = meta.get("plan")
    if plan is not None and not isinstance(plan, dict):
        raise ControlError("plan must be a mapping")
    return Resync(mode, int_field(meta, "global", -1), int_field(meta, "drawn", 0),
                  int_field(meta, "opt_steps", 0), epoch_field(meta),
                  None if plan is None else dict(plan))


register(OP_STEP, Step, _encode_step, _decode_step)
register(OP_SKIP, Skip, Skip.to_meta, Skip.from_meta)
register(OP_RESYNC, Resync, _encode_resync, _decode_resync)
register(OP_UPLOAD, Upload, Upload.to_meta, Upload.from_meta)
register(OP_RESEND, Resend, Resend.to_meta, Resend.from_meta)
register(OP_DONE, Done, Done.to_meta, Done.from_meta)


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
    plan: int = -1  # a method with plans (HSplitLoRA, HetLoRA): the version it holds
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
    says with them: its stream and optimizer position, learning rate, forward time, memory."""

    msg: P.Message
    drawn: int | None = None
    opt_steps: int | None = None
    lr: float | None = None
    compute_s: float | None = None
    usage: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AdaptReport(_Carrying):
    """An ``adapt`` message: the adapters uploaded for aggregation ``step`` (``msg.tensors``)
    and the client's stream and optimizer position."""

    msg: P.Message
    drawn: int | None = None
    opt_steps: int | None = None


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
                                 usage_fields(meta))
    if msg.kind is P.Kind.ADAPT:
        return sender, AdaptReport(msg, _opt_int(meta, "drawn"), _opt_int(meta, "opt_steps"))
    return sender, None

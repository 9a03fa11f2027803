"""Typed control messages: what the server tells a client in ``config`` messages.

Why: the operations used to travel as untyped meta dicts, built in one place and read field
by field (with defaults and type checks repeated) wherever they were handled. Here each
operation is a dataclass: the server builds one and :func:`encode` writes its meta; a client
calls :func:`decode` once per message, which validates every field (a control message comes
from the network: a malformed one is refused with :class:`ControlError`, never half
applied), and its handlers read typed fields. The wire format is docs/protocol.md's
("Control operations", "HSplitLoRA"), unchanged.

A method may add operations of its own: :func:`decode` returns None for an ``op`` it does not
know, and the method's client hooks read that message themselves (docs/extending.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from runner.distributed import protocol as P

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

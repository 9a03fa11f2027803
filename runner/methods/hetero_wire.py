"""The messages of the heterogeneous methods (HSplitLoRA and its ablations, HetLoRA) on the
wire (docs/protocol.md, "HSplitLoRA"): their ``config`` operations (``merge``, ``probe``,
``plan``, ``set``), the plan a ``resync`` carries, and the fields of the IWI probe's
``act``, ``grad`` and ``adapt`` messages.

Why here and not in runner/distributed/control.py: that is the core wire module, and it
knows no method; a method defines its own messages and registers its operations there
(:func:`runner.distributed.control.register`). Importing this module registers them, and
every module that sends or handles them imports it: the hooks modules
(hetero_server.py, hetero_client.py and the HSplitLoRA ones built on them), which the
engines load (runner/methods/plugins.py) while they are built, before their transport
connects, so a process running one of these methods can decode them by the time a message
arrives. A process of another method never registers them: it decodes such a message as
an ``op`` it does not know (None), as it always ignored them.

The wire format is the one these operations always had (tests/test_control.py pins it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from runner.distributed import control
from runner.distributed import protocol as P
from runner.distributed.control import ControlError, epoch_field, int_field

OP_MERGE = "merge"  # to one client: NAA factors of its blocks; merge, re-initialise adapters
OP_PROBE = "probe"  # to one client: run an importance probe batch (IWI)
OP_PLAN = "plan"  # to one client: split point + ranks (ARMSC), moved blocks' weights
OP_SET = "set"  # to one client: its adapters after a per-client aggregation (hetlora, no-naa)
FORMS = ("factors", "dense")  # how a merged update travels (runner/aggregation.wire_bytes)


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
        return cls(int_field(meta, "version"), int_field(meta, "split"),
                   _ranks(meta.get("ranks")), int_field(meta, "reinit", 0))


def plan_of(r: control.Resync) -> PlanSpec | None:
    """The plan a ``resync`` carries (None: none); :class:`ControlError` when it does not
    validate (the client then applies nothing of that resync)."""
    return None if r.plan is None else PlanSpec.from_meta(r.plan)


# ---------------------------------------------------------------- operations
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


# Operations addressed by the header step (merge, probe, plan, set) decode it from there.
def _encode_merge(c: Merge) -> tuple[int, dict[str, Any]]:
    return c.step, {"step": c.step, "reinit": c.reinit, "forms": dict(c.forms),
                    "epoch": c.epoch}


def _decode_merge(meta: dict[str, Any], msg: P.Message) -> Merge:
    forms = meta.get("forms")
    if not isinstance(forms, dict) or not all(
            isinstance(k, str) and v in FORMS for k, v in forms.items()):
        raise ControlError("merge forms must map weight names to factors or dense")
    return Merge(msg.step, dict(forms), int_field(meta, "reinit", msg.step + 1),
                 epoch_field(meta))


def _encode_probe(c: Probe) -> tuple[int, dict[str, Any]]:
    return max(c.step, 0), {"step": c.step, "epoch": c.epoch, "global": c.global_}


def _decode_probe(meta: dict[str, Any], msg: P.Message) -> Probe:
    return Probe(msg.step, int_field(meta, "global", -1), epoch_field(meta))


def _encode_plan(c: Plan) -> tuple[int, dict[str, Any]]:
    return c.step, {"step": c.step, "epoch": c.epoch, **c.spec.to_meta()}


def _decode_plan(meta: dict[str, Any], msg: P.Message) -> Plan:
    return Plan(msg.step, PlanSpec.from_meta(meta), epoch_field(meta))


def _encode_set(c: SetAdapters) -> tuple[int, dict[str, Any]]:
    return c.step, {"step": c.step, "epoch": c.epoch}


def _decode_set(meta: dict[str, Any], msg: P.Message) -> SetAdapters:
    return SetAdapters(msg.step, epoch_field(meta))


control.register(OP_MERGE, Merge, _encode_merge, _decode_merge)
control.register(OP_PROBE, Probe, _encode_probe, _decode_probe)
control.register(OP_PLAN, Plan, _encode_plan, _decode_plan)
control.register(OP_SET, SetAdapters, _encode_set, _decode_set)


# ---------------------------------------------------- the IWI probe's other messages
def is_probe_act(act: control.ActReport) -> bool:
    """Whether an ``act`` message carries an IWI probe's activations (meta ``probe: true``)
    rather than a training step's."""
    return bool(act.msg.meta.get("probe"))


def is_probe_upload(h: P.Header | P.Message) -> bool:
    """Whether an ``adapt`` message (its header, before the payload is read, or the message)
    carries IWI numerators in its meta rather than adapters."""
    return h.meta.get("probe") is not None


def importance(up: control.AdaptReport) -> dict[str, float] | None:
    """A probe upload's numerators: weight name -> finite number; None when the field does
    not validate (lenient, as every report: the server refuses it, it does not crash)."""
    value = up.msg.meta.get("importance")
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool)
            and math.isfinite(v) for k, v in value.items()):
        return None
    return {k: float(v) for k, v in value.items()}


def probe_grad_meta() -> dict[str, Any]:
    """The meta of the gradient the server returns for a probe's activations."""
    return {"probe": True}


def is_probe_grad(msg: P.Message) -> bool:
    """Whether a ``grad`` message answers an IWI probe (:func:`probe_grad_meta`)."""
    return bool(msg.meta.get("probe"))

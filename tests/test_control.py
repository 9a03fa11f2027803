"""Typed control messages (runner/distributed/control.py): the wire meta of every operation as
docs/protocol.md gives it, decoding back to the same value, and refusal of bad fields."""

from __future__ import annotations

import json
from typing import Any

import pytest

from runner.distributed import control as C
from runner.distributed import protocol as P

SPEC = C.PlanSpec(version=3, split=2, ranks={"model.layers.0.self_attn.q_proj": 8}, reinit=7)
EXAMPLES: list[C.Control] = [
    C.Step(4, 3, "e1", rollback=True, plan=2), C.Step(0, -1, "e1"),
    C.Skip(4), C.Upload(5), C.Resend(6), C.Done(12),
    C.Resync("rejoin", 3, 40, 36, "e1"), C.Resync("rollback", -1, 0, 0, "e1", SPEC),
    C.Merge(5, {"w": "factors", "v": "dense"}, 6, "e1"), C.Probe(6, 5, "e1"),
    C.Plan(6, SPEC, "e1"), C.SetAdapters(5, "e1"),
]


def _message(step: int, meta: dict[str, Any]) -> P.Message:
    # through JSON, as on the wire
    return P.Message("run", "client0", P.Kind.CONFIG, step, 0, meta=json.loads(json.dumps(meta)))


@pytest.mark.parametrize("ctrl", EXAMPLES, ids=lambda c: type(c).__name__)
def test_round_trip(ctrl: C.Control) -> None:
    step, meta = C.encode(ctrl)
    back = C.decode(_message(step, meta))
    if isinstance(ctrl, C.Step) and ctrl.plan is None:
        assert back == C.Step(ctrl.step, ctrl.global_, ctrl.epoch, ctrl.rollback, -1)
    else:
        assert back == ctrl


def test_wire_meta_as_the_protocol_says() -> None:
    assert C.encode(C.Step(4, 3, "e1", False, 2)) == (
        4, {"op": "step", "step": 4, "epoch": "e1", "rollback": False, "plan": 2, "global": 3})
    assert C.encode(C.Skip(-1)) == (0, {"op": "skip", "step": -1})
    assert C.encode(C.Resync("rejoin", -1, 0, 0, "e1")) == (
        0, {"op": "resync", "mode": "rejoin", "global": -1, "drawn": 0, "opt_steps": 0,
            "epoch": "e1"})
    assert C.encode(C.Plan(6, SPEC, "e1"))[1] == {
        "op": "plan", "step": 6, "epoch": "e1", "version": 3, "split": 2,
        "ranks": {"model.layers.0.self_attn.q_proj": 8}, "reinit": 7}
    assert C.encode(C.Merge(5, {"w": "dense"}, 6, "e1")) == (
        5, {"op": "merge", "step": 5, "reinit": 6, "forms": {"w": "dense"}, "epoch": "e1"})


def test_defaults_of_absent_fields() -> None:
    assert C.decode(_message(3, {"op": "step", "step": 3})) == C.Step(3, -1, None, False, -1)
    assert C.decode(_message(5, {"op": "merge", "forms": {}})) == C.Merge(5, {}, 6, None)
    assert C.decode(_message(0, {"op": "somebody-elses"})) is None


@pytest.mark.parametrize("meta,match", [
    ({"op": "step", "step": "3"}, "'step' must be an integer"),
    ({"op": "step", "step": True}, "'step' must be an integer"),
    ({"op": "step", "step": 3, "epoch": 7}, "'epoch' must be a string"),
    ({"op": "resync", "mode": "sideways"}, "resync mode"),
    ({"op": "resync", "mode": "rejoin", "plan": {"version": 1, "split": 2, "ranks": {"w": -1}}},
     "ranks must map"),
    ({"op": "resync", "mode": "rejoin", "plan": [1, 2]}, "plan must be a mapping"),
    ({"op": "plan", "version": 1, "ranks": {}}, "'split' must be an integer"),
    ({"op": "merge", "forms": {"w": "zipped"}}, "factors or dense"),
    ({"op": "merge", "forms": None}, "factors or dense"),
])
def test_bad_fields_are_refused(meta: dict[str, Any], match: str) -> None:
    with pytest.raises(C.ControlError, match=match):
        C.decode(_message(1, meta))

"""Typed control messages (runner/distributed/control.py): the wire meta of every operation as
docs/protocol.md gives it, decoding back to the same value, and refusal of bad fields."""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Any

import pytest

from runner.distributed import control as C
from runner.distributed import protocol as P
from runner.distributed.repair import ClientStatus

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


# ------------------------------------------------------------------- client -> server
def _from_client(kind: P.Kind, meta: dict[str, Any], step: int = 3) -> P.Message:
    return P.Message("run", "client0", kind, step, 0, meta=json.loads(json.dumps(meta)))


def _status(hb: C.Heartbeat) -> ClientStatus:
    return ClientStatus(**{f.name: getattr(hb, f.name) for f in fields(ClientStatus)})


def test_heartbeat_decoding_is_defensive() -> None:
    s = C.decode_heartbeat({"synced": 1, "epoch": 7, "done": "4", "pending": True,
                            "pending_age": "x", "global": 2.0, "busy": ["grad"]})
    assert _status(s) == ClientStatus(synced=True, epoch=None, done=-1, pending=None,
                                      pending_age=0.0, global_=-1, busy=None)
    assert (s.opt_steps, s.plan, s.record, s.budget, s.compute, s.usage) == (
        None, -1, None, None, None, {})
    full = C.decode_heartbeat({"synced": True, "epoch": "e", "done": 4, "pending": 5,
                               "pending_age": 0.5, "global": 3, "busy": ["grad", 5]})
    assert _status(full) == ClientStatus(True, "e", 4, 5, 0.5, 3, ("grad", 5))


def test_heartbeat_records_budget_and_compute() -> None:
    hb = C.decode_heartbeat({
        "opt_steps": 7, "plan": 2, "budget": 2**30, "budget_source": "cgroup",
        "compute": {"step": 4, "forward_s": 0.5, "backward_s": None, "compute_s": 1},
        "memory_peak_bytes": 10, "memory_source": "rss",
        "record": {"step": 4, "loss": 1.5, "drawn": 9, "memory_peak_bytes": 10,
                   "memory_source": "rss"}})
    assert (hb.opt_steps, hb.plan, hb.budget, hb.budget_source) == (7, 2, 2**30, "cgroup")
    assert hb.compute == C.ComputeReport(4, {"forward_s": 0.5, "compute_s": 1.0})
    assert hb.usage["memory_bytes"] == 10
    assert hb.record is not None and (hb.record.step, hb.record.drawn) == (4, 9)
    assert hb.record.fields == {"step": 4, "loss": 1.5}  # memory figures only validated
    assert hb.record.usage["memory_bytes"] == 10
    assert C.decode_heartbeat({"budget": 0}).budget is None
    assert C.decode_heartbeat({"budget": True}).budget is None
    assert C.decode_heartbeat({"compute": {"step": "4"}}).compute is None


def test_reports_need_an_incarnation() -> None:
    with pytest.raises(C.ControlError, match="hb without an incarnation id"):
        C.decode_report(_from_client(P.Kind.HB, {"epoch": "e"}))
    sender, report = C.decode_report(_from_client(P.Kind.HB, {"inc": "i", "epoch": 7}))
    assert sender == C.Sender("i", None) and isinstance(report, C.Heartbeat)


def test_act_and_adapt_reports() -> None:
    _, act = C.decode_report(_from_client(P.Kind.ACT, {
        "inc": "i", "epoch": "e", "drawn": 3, "opt_steps": "x", "lr": 1e-3, "compute_s": 2}))
    assert isinstance(act, C.ActReport) and act.step == 3 and not act.probe
    assert (act.drawn, act.opt_steps, act.lr, act.compute_s) == (3, None, 1e-3, 2.0)
    _, up = C.decode_report(_from_client(P.Kind.ADAPT, {
        "inc": "i", "probe": 3, "importance": {"w": 1, "v": 0.5}}))
    assert isinstance(up, C.AdaptReport) and up.probe and up.importance == {"w": 1.0, "v": 0.5}
    for bad in ({"w": float("nan")}, {"w": True}, [1.0], None):
        _, up = C.decode_report(_from_client(P.Kind.ADAPT, {"inc": "i", "probe": 3,
                                                            "importance": bad}))
        assert isinstance(up, C.AdaptReport) and up.importance is None
    _, up = C.decode_report(_from_client(P.Kind.ADAPT, {"inc": "i", "drawn": 5}))
    assert isinstance(up, C.AdaptReport) and not up.probe and up.drawn == 5


def test_presence_and_op_names() -> None:
    assert C.decode_presence(_from_client(P.Kind.STATE, {"state": "offline"})) == \
        C.Presence("offline", "offline")
    assert C.decode_presence(_from_client(P.Kind.STATE, {"state": "offline",
                                                         "reason": "lost"})).reason == "lost"
    assert [C.op_name(c) for c in EXAMPLES[:3]] == ["step", "step", "skip"]

"""Typed control messages (runner/distributed/control.py and the heterogeneous methods' own,
runner/methods/hetero_wire.py): the wire meta of every operation as docs/protocol.md gives it,
decoding back to the same value, and refusal of bad fields."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pytest

from runner.distributed import control as C
from runner.distributed import protocol as P
from runner.distributed.repair import ClientStatus
from runner.methods import hetero_wire as W

ROOT = Path(__file__).resolve().parents[1]
SPEC = W.PlanSpec(version=3, split=2, ranks={"model.layers.0.self_attn.q_proj": 8}, reinit=7)
EXAMPLES: list[C.Control] = [
    C.Step(4, 3, "e1", rollback=True, plan=2), C.Step(0, -1, "e1"),
    C.Skip(4), C.Upload(5), C.Resend(6), C.Done(12),
    C.Resync("rejoin", 3, 40, 36, "e1"), C.Resync("rollback", -1, 0, 0, "e1", SPEC.to_meta()),
    W.Merge(5, {"w": "factors", "v": "dense"}, 6, "e1"), W.Probe(6, 5, "e1"),
    W.Plan(6, SPEC, "e1"), W.SetAdapters(5, "e1"),
]


def _message(step: int, meta: dict[str, Any]) -> P.Message:
    # through JSON, as on the wire
    return P.Message("run", "client0", P.Kind.CONFIG, step, 0, meta=json.loads(json.dumps(meta)))


@pytest.mark.parametrize("ctrl", EXAMPLES, ids=lambda c: type(c).__name__)
def test_round_trip(ctrl: C.Control) -> None:
    step, meta = C.encode(ctrl)
    assert C.decode(_message(step, meta)) == ctrl


def test_a_step_without_a_plan_decodes_without_one() -> None:
    """The step of a method without plans carries no ``plan``; it used to decode as plan
    version -1, so a round trip changed the value."""
    step, meta = C.encode(C.Step(4, 3, "e1"))
    assert "plan" not in meta
    assert C.decode(_message(step, meta)) == C.Step(4, 3, "e1", plan=None)
    assert C.decode(_message(0, {"op": "step", "step": 0, "plan": 0})) == \
        C.Step(0, -1, None, plan=0)
    with pytest.raises(C.ControlError, match="'plan' must be an integer"):
        C.decode(_message(0, {"op": "step", "step": 0, "plan": None}))


_M = "model.layers.0.self_attn.q_proj"
# Every registered operation, core and method ones: (instance, header step, meta as it is
# written on the wire, keys in that order). Written out, not derived from the encoders, so a
# change of the wire format fails here.
WIRE: list[tuple[C.Control, int, dict[str, Any]]] = [
    (C.Step(4, 3, "e1", rollback=True, plan=2, away=("client1",)), 4,
     {"op": "step", "step": 4, "epoch": "e1", "rollback": True, "plan": 2, "global": 3,
      "away": ["client1"]}),
    (C.Step(-1, -1, None), 0,
     {"op": "step", "step": -1, "epoch": None, "rollback": False, "global": -1}),
    (C.Skip(-1), 0, {"op": "skip", "step": -1}),
    (C.Upload(5), 5, {"op": "upload", "step": 5}),
    (C.Resend(6), 6, {"op": "resend", "step": 6}),
    (C.Done(12), 12, {"op": "done", "step": 12}),
    (C.Resync("rejoin", -1, 0, 0, "e1"), 0,
     {"op": "resync", "mode": "rejoin", "global": -1, "drawn": 0, "opt_steps": 0,
      "epoch": "e1"}),
    (C.Resync("rollback", 3, 40, 36, "e2", SPEC.to_meta()), 3,
     {"op": "resync", "mode": "rollback", "global": 3, "drawn": 40, "opt_steps": 36,
      "epoch": "e2", "plan": {"version": 3, "split": 2, "ranks": {_M: 8}, "reinit": 7}}),
    (W.Merge(5, {"w": "dense", "v": "factors"}, 6, "e1"), 5,
     {"op": "merge", "step": 5, "reinit": 6, "forms": {"w": "dense", "v": "factors"},
      "epoch": "e1"}),
    (W.Probe(6, 5, "e1"), 6, {"op": "probe", "step": 6, "epoch": "e1", "global": 5}),
    (W.Plan(6, SPEC, "e1"), 6,
     {"op": "plan", "step": 6, "epoch": "e1", "version": 3, "split": 2, "ranks": {_M: 8},
      "reinit": 7}),
    (W.SetAdapters(5, "e1"), 5, {"op": "set", "step": 5, "epoch": "e1"}),
]


def test_every_operation_keeps_its_wire_format() -> None:
    """Byte for byte: the same keys, values and order (the envelope writes meta as JSON in
    insertion order), and each decodes back to the same value."""
    project = {n for n, o in C.registered().items() if o.cls.__module__.startswith("runner.")}
    assert {C.op_name(c) for c, _, _ in WIRE} == project == {
        "step", "skip", "resync", "upload", "resend", "done", "merge", "probe", "plan", "set"}
    for ctrl, step, meta in WIRE:
        got_step, got = C.encode(ctrl)
        assert (got_step, json.dumps(got)) == (step, json.dumps(meta)), ctrl
        assert C.decode(_message(got_step, got)) == ctrl


def test_defaults_of_absent_fields() -> None:
    assert C.decode(_message(3, {"op": "step", "step": 3})) == C.Step(3, -1, None, False, None)
    assert C.decode(_message(5, {"op": "merge", "forms": {}})) == W.Merge(5, {}, 6, None)
    assert C.decode(_message(0, {"op": "somebody-elses"})) is None
    assert C.decode(_message(0, {"op": 7})) is None
    assert C.decode(_message(0, {})) is None


def test_the_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    # whatever this test registers is gone after it
    monkeypatch.setattr(C, "_BY_NAME", dict(C._BY_NAME))
    monkeypatch.setattr(C, "_BY_CLASS", dict(C._BY_CLASS))

    @dataclass(frozen=True)
    class Mine:
        step: int

    def enc(c: Mine) -> tuple[int, dict[str, Any]]:
        return c.step, {"step": c.step}

    def dec(meta: dict[str, Any], msg: P.Message) -> Mine:
        return Mine(C.int_field(meta, "step"))

    with pytest.raises(ValueError, match="clashes"):
        C.register("plan", Mine, enc, dec)  # a taken name
    with pytest.raises(ValueError, match="clashes"):
        C.register("mine", W.Plan, enc, dec)  # a taken class
    with pytest.raises(TypeError, match="not a registered"):
        C.encode(Mine(1))
    assert C.register("mine", Mine, enc, dec) == C.register("mine", Mine, enc, dec)
    assert C.registered()["mine"].cls is Mine
    assert C.encode(Mine(2)) == (2, {"op": "mine", "step": 2})
    assert C.decode(_message(2, {"op": "mine", "step": 2})) == Mine(2)
    assert C.op_name(Mine(2)) == "mine"


def test_the_hooks_modules_register_what_they_handle() -> None:
    """A client decodes before any handler runs, so the operations a method's client hooks
    handle must be registered by importing the hooks module (the engine imports it while it
    is built): checked in fresh interpreters, where nothing else imported them."""
    from runner.methods import registry

    paths = sorted({t.hooks["client"] for n in registry.names()
                    if "client" in (t := registry.get(n)).hooks})
    assert paths
    for path in paths:
        module, _, attr = path.partition(":")
        code = (f"from runner.distributed import control\n"
                f"from {module} import {attr} as H\n"
                f"ops = {{o.cls: n for n, o in control.registered().items()}}\n"
                f"print(' '.join(sorted(ops[c] for c in H.handled)))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             cwd=ROOT, check=True).stdout.split()
        assert out and set(out) <= {"merge", "probe", "plan", "set"}, (path, out)


@pytest.mark.parametrize("meta,match", [
    ({"op": "step", "step": "3"}, "'step' must be an integer"),
    ({"op": "step", "step": True}, "'step' must be an integer"),
    ({"op": "step", "step": 3, "epoch": 7}, "'epoch' must be a string"),
    ({"op": "resync", "mode": "sideways"}, "resync mode"),
    ({"op": "resync", "mode": "rejoin", "plan": [1, 2]}, "plan must be a mapping"),
    ({"op": "plan", "version": 1, "ranks": {}}, "'split' must be an integer"),
    ({"op": "merge", "forms": {"w": "zipped"}}, "factors or dense"),
    ({"op": "merge", "forms": None}, "factors or dense"),
])
def test_bad_fields_are_refused(meta: dict[str, Any], match: str) -> None:
    with pytest.raises(C.ControlError, match=match):
        C.decode(_message(1, meta))


def test_a_resync_plan_is_the_methods_to_validate() -> None:
    """The core resync carries the plan as a mapping; the heterogeneous client reads it
    (hetero_wire.plan_of) before it applies anything."""
    bad = {"version": 1, "split": 2, "ranks": {"w": -1}}
    r = C.decode(_message(1, {"op": "resync", "mode": "rejoin", "plan": bad}))
    assert isinstance(r, C.Resync) and r.plan == bad
    with pytest.raises(C.ControlError, match="ranks must map"):
        W.plan_of(r)
    assert W.plan_of(C.Resync("rejoin", 0, 0, 0, None, SPEC.to_meta())) == SPEC
    assert W.plan_of(C.Resync("rejoin", 0, 0, 0, None)) is None


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
    assert isinstance(act, C.ActReport) and act.step == 3 and not W.is_probe_act(act)
    assert (act.drawn, act.opt_steps, act.lr, act.compute_s) == (3, None, 1e-3, 2.0)
    _, act = C.decode_report(_from_client(P.Kind.ACT, {"inc": "i", "probe": True}))
    assert isinstance(act, C.ActReport) and W.is_probe_act(act)
    _, up = C.decode_report(_from_client(P.Kind.ADAPT, {
        "inc": "i", "probe": 3, "importance": {"w": 1, "v": 0.5}}))
    assert isinstance(up, C.AdaptReport) and W.is_probe_upload(up.msg)
    assert W.importance(up) == {"w": 1.0, "v": 0.5}
    for bad in ({"w": float("nan")}, {"w": True}, [1.0], None):
        _, up = C.decode_report(_from_client(P.Kind.ADAPT, {"inc": "i", "probe": 3,
                                                            "importance": bad}))
        assert isinstance(up, C.AdaptReport) and W.importance(up) is None
    _, up = C.decode_report(_from_client(P.Kind.ADAPT, {"inc": "i", "drawn": 5}))
    assert isinstance(up, C.AdaptReport) and not W.is_probe_upload(up.msg) and up.drawn == 5


def test_presence_and_op_names() -> None:
    assert C.decode_presence(_from_client(P.Kind.STATE, {"state": "offline"})) == \
        C.Presence("offline", "offline")
    assert C.decode_presence(_from_client(P.Kind.STATE, {"state": "offline",
                                                         "reason": "lost"})).reason == "lost"
    assert [C.op_name(c) for c in EXAMPLES[:3]] == ["step", "step", "skip"]

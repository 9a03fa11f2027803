"""Sustained faults in one run (issue 16): per-round dropout applied by the distributed
runtime, the combined scenario (scenarios/sustained-faults.yaml), the exactly-once audit.

Real parts: a per-run Mosquitto, the server and clients as processes
(testbed/backends/local.py), the tiny random Llama of the smoke profile with synthetic data.
The audit itself is a pure function over a run's records, tested first on hand-made records
that hold each defect.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from analysis.audit import audit_lines, audit_records
from runner.distributed import control as C
from runner.distributed.broker import find_mosquitto
from runner.rundir import RunDir, read_jsonl
from runner.trainer import Trainer
from testbed.backends.local import LocalRun
from testbed.cli import app
from tests.test_distributed import _cfg, _options, events, finish, train_losses

needs_mosquitto = pytest.mark.skipif(find_mosquitto() is None,
                                     reason="mosquitto not installed (apt-get install -y "
                                            "mosquitto)")
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------ the audit
def _train(step: int, client: str, wall: float) -> dict[str, Any]:
    return {"kind": "train", "step": step, "client": client, "loss": 1.0, "wall_time": wall}


def _clean_run(steps: int = 4) -> tuple[dict[str, Any], list[dict], list[dict]]:
    config = {"train": {"method": "splitlora", "steps": steps, "agg_interval": 2},
              "runtime": {"backend": "mqtt"}}
    metrics, evs = [], [{"event": "client_joined", "step": 0, "client": c}
                        for c in ("client0", "client1")]
    for s in range(steps):
        metrics += [_train(s, "client0", s + 1.0), _train(s, "client1", s + 1.0)]
        if (s + 1) % 2 == 0:
            metrics.append({"kind": "aggregate", "step": s, "client": "server"})
            evs.append({"event": "aggregate", "step": s, "time": 100.0 + s})
    return config, metrics, evs


def test_audit_of_a_clean_run_is_ok() -> None:
    a = audit_records(*_clean_run(), finished=True)
    assert a["ok"], a
    assert a["steps"]["trained"] == 4 and a["steps"]["duplicate"] == []
    assert (a["aggregations"]["expected"], a["aggregations"]["applied"]) == (2, 2)
    assert audit_lines(a)[0].startswith("exactly-once: OK")


def test_audit_finds_a_step_applied_twice_and_a_missing_aggregation() -> None:
    config, metrics, evs = _clean_run()
    metrics.append(_train(2, "client1", 3.5))  # the same (step, client) once more
    metrics = [m for m in metrics if not (m["kind"] == "aggregate" and m["step"] == 3)]
    a = audit_records(config, metrics, evs, finished=True)
    assert not a["ok"]
    assert a["steps"]["duplicate"] == [[2, "client1"]]
    assert a["aggregations"]["missing"] == [3]
    assert "FAILED" in audit_lines(a)[0]


def test_audit_finds_a_lost_step_but_not_one_every_client_sat_out() -> None:
    config, metrics, evs = _clean_run()
    metrics = [m for m in metrics if m.get("step") != 1 or m["kind"] != "train"]
    a = audit_records(config, metrics, evs, finished=True)
    assert a["steps"]["lost"] == [1] and not a["ok"]
    # the same hole, explained: both clients sat round 0 (steps 0-1) out... from step 1 on
    evs += [{"event": "client_offline", "step": 1, "client": c, "reason": "dropout"}
            for c in ("client0", "client1")]
    evs += [{"event": "client_online", "step": 2, "client": c, "reason": "dropout"}
            for c in ("client0", "client1")]
    a = audit_records(config, metrics, evs, finished=True)
    assert a["ok"] and a["steps"]["lost"] == [] and a["steps"]["empty"] == [1]
    assert a["faults"]["by_kind"]["dropout"]["client_steps_skipped"] == 2
    assert a["faults"]["by_kind"]["dropout"]["events"] == 2


def test_audit_counts_a_resume_as_rerun_not_as_twice() -> None:
    """Events of steps at or after a resume's step, written before it, were undone: the
    aggregation of step 3 logged twice (before the kill and after the resume) is re-run,
    not applied twice; the restart's cost comes from server_resumed."""
    config, metrics, evs = _clean_run(6)
    kill_at = next(i for i, e in enumerate(evs) if e.get("step") == 3)
    evs.insert(kill_at + 1, {"event": "server_resumed", "step": 2, "checkpoint": True,
                             "reached_step": 5, "steps_rerun": 3, "down_s": 4.5})
    evs.insert(kill_at + 2, {"event": "client_joined", "step": 1, "client": "client0"})
    evs.insert(kill_at + 3, {"event": "client_joined", "step": 1, "client": "client1"})
    evs.insert(kill_at + 4, {"event": "aggregate", "step": 3, "time": 200.0})
    a = audit_records(config, metrics, evs, finished=True)
    assert a["ok"], a
    assert a["aggregations"]["rerun"] == [3] and a["aggregations"]["duplicate"] == []
    (r,) = a["faults"]["server_restarts"]
    assert (r["resumed_at"], r["steps_rerun"], r["aggregations_rerun"], r["down_s"]) == (
        2, 3, 1, 4.5)
    # a duplicated aggregate *record* is still applied twice
    metrics.append({"kind": "aggregate", "step": 5, "client": "server"})
    assert audit_records(config, metrics, evs, finished=True)["aggregations"]["duplicate"] \
        == [5]


# ------------------------------------------------------------------ control message
def test_step_announcement_carries_who_sits_out() -> None:
    from runner.distributed import protocol as P

    step, meta = C.encode(C.Step(4, 3, "e1", away=("client1", "client2")))
    assert meta["away"] == ["client1", "client2"]
    msg = P.Message("r", P.SERVER, P.Kind.CONFIG, step, 1, {}, meta)
    assert C.decode(msg) == C.Step(4, 3, "e1", False, None, ("client1", "client2"))
    assert "away" not in C.encode(C.Step(4, 3, "e1"))[1]  # nobody away: the old format
    with pytest.raises(C.ControlError, match="away"):
        C.decode(P.Message("r", P.SERVER, P.Kind.CONFIG, 4, 1, {},
                           {**meta, "away": "client1"}))


# -------------------------------------------------------- per-round dropout, distributed
def _devices(path: Path, dropout: float) -> Path:
    dev = dict(memory_bytes=4e9, flops=1e12, bandwidth=1e8, latency=0.01,
               availability={"dropout": dropout})
    path.write_text(json.dumps({
        "clients": [dict(name=f"client{i}", **dev) for i in range(3)],
        "server": dict(name="server", memory_bytes=8e10, flops=1e14, bandwidth=1e9,
                       latency=0.001)}))
    return path


def _dropouts(evs: list[dict[str, Any]]) -> list[tuple[str, int, str]]:
    return sorted((e["event"], e["step"], e["client"]) for e in evs
                  if e["event"] in ("client_offline", "client_online")
                  and (e.get("reason") in (None, "dropout")))


@needs_mosquitto
@pytest.mark.timeout(300)
def test_profile_dropout_applies_to_processes_as_in_process(tmp_path: Path) -> None:
    """A devices file with a per-round dropout of 0.3 (seed 0: client0 out in round 0,
    clients 1 and 2 in round 2, everyone in round 3): the server draws the same rounds as
    the in-process clock, the clients sit them out (no batch drawn, nothing trained), the
    events are the in-process ones and the losses equal the in-process run's."""
    cfg = _cfg(steps=10, agg_interval=2, eval_every=2, seed=0,
               devices=str(_devices(tmp_path / "devices.json", 0.3)))
    with LocalRun(cfg, tmp_path / "run", _options()) as run:
        run.start()
        finish(run, timeout=200)
    ref_dir = tmp_path / "ref"
    Trainer(cfg, run=RunDir.create(ref_dir, {"train": {}})).fit()
    dist = train_losses(run.run_dir)
    ref = {(r["step"], r["client"]): r["loss"] for r in read_jsonl(ref_dir / "metrics.jsonl")
           if r["kind"] == "train"}
    assert set(dist) == set(ref)
    assert max(abs(dist[k] - ref[k]) for k in ref) <= 1e-5
    assert {c for s, c in ref if s in (0, 1)} == {"client1", "client2"}  # client0 sat out
    assert not [k for k in ref if k[0] in (6, 7)]  # round 3: everyone away
    got, want = _dropouts(events(run.run_dir)), _dropouts(read_jsonl(ref_dir / "events.jsonl"))
    assert got == want and len(got) >= 6, (got, want)
    logs = (run.run_dir / "logs" / "client0.log").read_text()
    assert "sitting out step 0 (dropout)" in logs
    audit = audit_records(json.loads((run.run_dir / "config.json").read_text()),
                          read_jsonl(run.run_dir / "metrics.jsonl"), events(run.run_dir),
                          finished=True)
    assert audit["ok"] and audit["steps"]["empty"] == [6, 7], audit
    assert audit["faults"]["by_kind"]["dropout"]["client_steps_skipped"] == \
        3 * 10 - len(dist)


# ------------------------------------------------------------- the combined scenario
@needs_mosquitto
@pytest.mark.timeout(600)
def test_sustained_faults_scenario_on_the_smoke_profile(tmp_path: Path) -> None:
    """scenarios/sustained-faults.yaml on the smoke profile: 30 % per-round dropout, client2
    killed for good, Mosquitto restarted, the server killed with kill -9 and resumed. The run
    completes, the audit finds no step or aggregation lost or applied twice and says what
    each fault cost; `testbed status` and `testbed report` show the audit."""
    out = tmp_path / "scenario"
    cli = CliRunner()
    res = cli.invoke(app, ["scenario", "run", "sustained-faults", "--profile", "smoke",
                           "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output + (
        (out / "logs" / "server.log").read_text()[-3000:] if (out / "logs").is_dir() else "")
    summary = json.loads(res.stdout)  # --json: the one object alone on stdout
    assert summary["steps"] == 12
    assert [f["kind"] for f in summary["injected"]] == [
        "client-lost", "broker-restart", "server-kill"]
    a = summary["audit"]
    assert a["ok"], a
    assert a["steps"]["duplicate"] == [] and a["steps"]["lost"] == []
    assert a["aggregations"]["duplicate"] == [] and a["aggregations"]["missing"] == []
    (restart,) = a["faults"]["server_restarts"]
    assert restart["checkpoint"] and restart["steps_rerun"] >= 0
    kinds = a["faults"]["by_kind"]
    assert kinds["dropout"]["events"] >= 1
    assert kinds["lost"]["events"] >= 1 or kinds["server-restart"]["client_steps_skipped"] > 0
    ev = events(out)
    assert Counter(e["event"] for e in ev)["server_resumed"] == 1
    assert any(e["event"] == "broker_reconnected" for e in ev)
    losses = train_losses(out)  # asserts each (step, client) once
    late = [s for s, c in losses if c == "client2"]
    assert late and max(late) < 8, "client2 trained after it was killed"

    st = cli.invoke(app, ["status", "--json", str(out)])
    assert st.exit_code == 0, st.output
    assert json.loads(st.output)["audit"]["ok"] is True
    text = cli.invoke(app, ["status", str(out)]).output
    assert "exactly-once: OK" in text and "server restart: resumed at step" in text
    rep = cli.invoke(app, ["report", str(out), "-o", str(tmp_path / "report.md")])
    assert rep.exit_code == 0, rep.output
    report = (tmp_path / "report.md").read_text()
    assert "## Exactly-once audit" in report and "exactly-once: OK" in report


def test_a_bad_scenario_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("dropout: 0.3\nfaults:\n  - {at_step: 2, kind: client-lost}\n")
    res = CliRunner().invoke(app, ["scenario", "run", str(bad), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "client-lost names a client" in res.output
    assert len(res.output.strip().splitlines()) == 1
    res = CliRunner().invoke(app, ["scenario", "run", "no-such-scenario"])
    assert res.exit_code == 2 and "sustained-faults" in res.output


# ------------------------------------------------------------------- detached watcher
def test_watcher_state_and_refusals_without_docker(tmp_path: Path) -> None:
    """The watcher's bookkeeping (the container side is tests/test_faults_containers.py):
    a recorded pid that is not a watcher (reused by another program) reads as exited and is
    never signalled; a local-backend run has no watcher to start (one line, exit 2)."""
    import os
    import subprocess
    import sys

    from testbed.backends import watcher

    run = tmp_path / "run"
    run.mkdir()
    state = {"backend": "compose", "run_id": "r", "run_dir": str(run), "project": "hsl-r",
             "clients": ["client0"], "watcher": {"pid": os.getpid(), "log": "x"}}
    (run / "testbed-state.json").write_text(json.dumps(state))
    assert watcher.state(run) == {"watcher": {"pid": os.getpid(), "state": "exited",
                                              "log": "x"}}
    assert watcher.stop(run) is False  # this test's own pid: not ours to stop
    (run / "testbed-state.json").write_text(json.dumps({**state, "backend": "local"}))
    proc = subprocess.run([sys.executable, "-m", "testbed.backends.watcher", str(run)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {run} was started with the local backend"]

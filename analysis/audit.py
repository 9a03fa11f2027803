"""Exactly-once audit of a run, read from its files alone (``config.json``, ``metrics.jsonl``,
``events.jsonl``).

Why: a distributed run survives dropouts, lost clients, broker restarts and a server killed
and resumed; each of those could make a step or an aggregation happen twice (a gradient
applied again after a repair) or not at all (a step lost in a restart), and neither shows in
a loss curve. The server keys every answer by (client, step) and rewrites ``metrics.jsonl``
on ``--resume`` so that each (step, client) stays once; this module checks that promise from
the outside, after the fact, and says what each fault cost. ``testbed status`` and
``testbed report`` show it (docs/run-format.md, "Exactly-once audit").

What it checks (``ok`` is all of them):

* every ``train`` record's (step, client) appears once (``duplicate_steps``);
* every step up to the run's end has a record, unless no client was online then by the
  events (``lost_steps`` lists those that were not explained);
* every aggregation the schedule asks for is in ``metrics.jsonl`` once, when any client
  trained in its step (``duplicate_aggregations``, ``missing_aggregations``), and in the
  events once after the roll-backs (an ``aggregate`` event of a step at or after a
  ``server_resumed`` step, written before it, was undone and re-run: counted under
  ``rerun``, not twice).

What the faults cost (``faults``): per server restart the steps and aggregations run again
and the outage (from the ``server_resumed`` event); per kind of client absence (``dropout``,
``lost``, ``step-timeout``, ...) the events, the (step, client) pairs skipped and the wall
time the steps where it happened took beyond the run's median step (steps right after an
aggregation, which also carry it, against their own median); per broker outage the
seconds the server was cut off (``broker_reconnected`` events).
"""

from __future__ import annotations

import json
import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from analysis.load import read_jsonl
from runner.errors import UserError

OFFLINE, ONLINE = "client_offline", ("client_online", "client_joined")


def _is_central(method: str) -> bool:
    from runner.methods import registry

    try:
        return registry.get(method).central
    except Exception:  # noqa: BLE001 - an unknown (plug-in) method: treat as federated
        return False


def aggregation_steps(steps: int, agg_interval: int, horizon: int) -> list[int]:
    """Steps after which a federated run aggregates (runner/schedule.py), below ``horizon``."""
    return [s for s in range(min(steps, horizon))
            if (s + 1) % agg_interval == 0 or s + 1 == steps]


def effective_events(events: list[dict[str, Any]]) -> tuple[list[dict[str, Any]],
                                                            list[dict[str, Any]]]:
    """(events that stand, events undone by a roll-back): a ``server_resumed`` at step r
    undoes the step-bearing events the server wrote before it whose step is >= r (those
    steps run again and log their events again); host events stand."""
    kept: list[dict[str, Any]] = []
    undone: list[dict[str, Any]] = []
    for e in events:
        if e.get("event") == "server_resumed":
            r = int(e.get("step", 0))
            still = []
            for old in kept:
                step = old.get("step")
                if isinstance(step, int) and step >= r and old.get("source") != "host":
                    undone.append(old)
                else:
                    still.append(old)
            kept = still
        kept.append(e)
    return kept, undone


def _offline_by_step(events: list[dict[str, Any]], clients: list[str], horizon: int
                     ) -> dict[str, list[str | None]]:
    """client -> for each step, the reason it was away at that step (None: online),
    replaying the standing joins, returns and departures (:func:`effective_events`) step by
    step; a resume makes every online client away ("server-restart") until it joins the new
    server, and one already away keeps its reason."""
    state: dict[str, str | None] = {c: "not-joined" for c in clients}
    changes: dict[int, list[tuple[str, str | None]]] = defaultdict(list)
    order: list[tuple[int, str | None, str]] = []
    floor = 0  # a resumed server logs its clients' joins at the checkpoint's step
    for e in events:
        kind = e.get("event")
        step = max(floor, int(e.get("step") or 0))
        if kind == "server_resumed":
            floor = step
            order.append((step, "server-restart", "*"))
        elif kind == OFFLINE and isinstance(e.get("client"), str):
            order.append((step, str(e.get("reason") or "offline"), e["client"]))
        elif kind in ONLINE and isinstance(e.get("client"), str):
            order.append((step, None, e["client"]))
    for step, reason, who in order:
        changes[step].append((who, reason))
    out: dict[str, list[str | None]] = {c: [] for c in clients}
    for s in range(horizon):
        for who, reason in changes.get(s, []):
            if who == "*":
                for c in clients:
                    if state[c] is None:
                        state[c] = reason
            elif who in state:
                state[who] = reason
        for c in clients:
            out[c].append(state[c])
    return out


def audit_records(config: dict[str, Any], metrics: list[dict[str, Any]],
                  events: list[dict[str, Any]], finished: bool) -> dict[str, Any]:
    """The audit of one run from its parsed files (see the module docstring)."""
    train = config.get("train", {})
    steps = int(train.get("steps") or 0)
    interval = max(1, int(train.get("agg_interval") or 1))
    central = _is_central(str(train.get("method", "")))
    records = [m for m in metrics if m.get("kind") == "train"]
    pairs = Counter((int(m["step"]), str(m["client"])) for m in records)
    trained = sorted({s for s, _ in pairs})
    horizon = steps if finished else (trained[-1] + 1 if trained else 0)
    clients = sorted({c for _, c in pairs} | {
        str(e["client"]) for e in events
        if e.get("event") in (OFFLINE, *ONLINE) and isinstance(e.get("client"), str)})
    duplicates = sorted([s, c] for (s, c), n in pairs.items() if n > 1)

    kept, undone = effective_events(events)
    away = _offline_by_step(kept, clients, horizon)
    empty = [s for s in range(horizon) if s not in set(trained)]
    lost = [s for s in empty if any(away[c][s] is None for c in clients)]

    aggregations: dict[str, Any] = {"expected": 0}
    if not central:
        expected = aggregation_steps(steps, interval, horizon)
        agg_records = Counter(int(m["step"]) for m in metrics if m.get("kind") == "aggregate")
        agg_events = Counter(int(e["step"]) for e in kept if e.get("event") == "aggregate")
        rerun = sorted(int(e["step"]) for e in undone if e.get("event") == "aggregate")
        had_training = set(trained)
        aggregations = {
            "expected": len(expected), "applied": len(agg_records),
            "duplicate": sorted({s for s, n in agg_records.items() if n > 1}
                                | {s for s, n in agg_events.items() if n > 1}),
            "missing": [s for s in expected if s in had_training and agg_records[s] == 0],
            "rerun": rerun}

    # step durations (wall time between the last records of consecutive trained steps)
    last_wall: dict[int, float] = {}
    for m in records:
        w = m.get("wall_time")
        if isinstance(w, int | float):
            s = int(m["step"])
            last_wall[s] = max(last_wall.get(s, w), float(w))
    walls = sorted(last_wall.items())
    durations = {s: w - pw for (ps, pw), (s, w) in zip(walls, walls[1:], strict=False)
                 if w >= pw}
    # A step right after an aggregation also carries it (and an evaluation, a probe round):
    # such steps are compared with their own kind, so a fault at a round's start is not
    # charged for the aggregation before it.
    agg_before = {s for s in durations if s - 1 in set(
        aggregation_steps(steps, interval, horizon) if not central else [])}
    plain = [d for s, d in durations.items() if s not in agg_before]
    after = [d for s, d in durations.items() if s in agg_before]
    median = statistics.median(plain) if plain else 0.0
    median_after = statistics.median(after) if after else median

    def excess(s: int) -> float:
        """Wall time step ``s`` took beyond the median step of its kind."""
        if s not in durations:
            return 0.0
        return max(0.0, durations[s] - (median_after if s in agg_before else median))

    kinds: dict[str, dict[str, Any]] = {}

    def kind(name: str) -> dict[str, Any]:
        return kinds.setdefault(name, {"events": 0, "client_steps_skipped": 0, "time_s": 0.0})

    for e in kept:
        if e.get("event") == OFFLINE:
            k = kind(str(e.get("reason") or "offline"))
            k["events"] += 1
            s = e.get("step")
            if isinstance(s, int):
                k["time_s"] += excess(s)
    per_client: dict[str, dict[str, int]] = {}
    for c in clients:
        for s in range(horizon):
            if (s, c) in pairs:
                continue
            reason = away[c][s] or "unexplained"
            kind(reason)["client_steps_skipped"] += 1
            row = per_client.setdefault(c, {})
            row[reason] = row.get(reason, 0) + 1
    restarts = []
    for e in events:
        if e.get("event") != "server_resumed":
            continue
        r = int(e.get("step", 0))
        n = e.get("steps_rerun")
        restarts.append({
            "resumed_at": r, "checkpoint": bool(e.get("checkpoint")),
            "reached_step": e.get("reached_step"),
            "steps_rerun": int(n) if isinstance(n, int) else None,
            "aggregations_rerun": sum(1 for u in undone if u.get("event") == "aggregate"
                                      and int(u.get("step", -1)) >= r),
            "down_s": e.get("down_s"),
            "rerun_time_s": round(sum(durations.get(s, 0.0) for s in range(
                r, r + int(n))), 3) if isinstance(n, int) else None})
    broker = [{"step": e.get("step"), "outage_s": e.get("outage_s")} for e in events
              if e.get("event") == "broker_reconnected"]
    if broker:
        k = kind("broker-restart")
        k["events"] += len(broker)
        k["time_s"] += sum(float(b["outage_s"] or 0.0) for b in broker)
    for k in kinds.values():
        k["time_s"] = round(k["time_s"], 3)
    agg_ok = not central and not aggregations["duplicate"] and not aggregations["missing"]
    return {
        "ok": not duplicates and not lost and (central or agg_ok),
        "finished": finished,
        "steps": {"total": steps, "audited": horizon, "trained": len(trained),
                  "empty": empty, "lost": lost, "duplicate": duplicates,
                  "records": len(records)},
        "aggregations": aggregations,
        "faults": {"server_restarts": restarts, "broker_outages": broker,
                   "by_kind": dict(sorted(kinds.items())),
                   "skipped_by_client": dict(sorted(per_client.items())),
                   "median_step_s": round(median, 3),
                   "median_step_after_aggregation_s": round(median_after, 3)}}


def audit_run(path: Path) -> dict[str, Any]:
    """The audit of the run directory ``path``."""
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} holds no readable config.json: {exc}") from None
    return audit_records(config, read_jsonl(path / "metrics.jsonl"),
                         read_jsonl(path / "events.jsonl"), (path / "summary.json").is_file())


def audit_lines(a: dict[str, Any]) -> list[str]:
    """The audit in a few plain lines (``testbed status``; markdown-safe for the report)."""
    st, ag, f = a["steps"], a["aggregations"], a["faults"]
    head = "exactly-once: OK" if a["ok"] else "exactly-once: FAILED"
    lines = [f"{head}: {st['trained']}/{st['audited']} steps trained, "
             f"{len(st['duplicate'])} (step, client) applied twice, "
             f"{len(st['lost'])} steps lost, {len(st['empty'])} without any client"]
    if ag.get("expected"):
        lines.append(f"aggregations: {ag['applied']} applied of {ag['expected']} scheduled, "
                     f"{len(ag['duplicate'])} twice, {len(ag['missing'])} missing, "
                     f"{len(ag['rerun'])} re-run after a roll-back")
    for r in f["server_restarts"]:
        lines.append(f"server restart: resumed at step {r['resumed_at']} (had reached "
                     f"{r['reached_step']}): {r['steps_rerun']} steps and "
                     f"{r['aggregations_rerun']} aggregations re-run, down "
                     f"{r['down_s']} s, re-run {r['rerun_time_s']} s")
    for name, k in f["by_kind"].items():
        lines.append(f"{name}: {k['events']} events, {k['client_steps_skipped']} client steps "
                     f"skipped, {k['time_s']:.1f} s beyond the median step")
    return lines

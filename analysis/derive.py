"""Quantities derived from the frames: curves, time to target, speed-ups, bytes, dropouts.

Kept apart from plotting so the report, the figures and the notebooks compute every number
the same way, and tests can check them without drawing anything.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from analysis.load import ID_COLUMNS, RunSet, finite
from runner.errors import UserError

OFFLINE_EVENTS = ("client_offline",)
ONLINE_EVENTS = ("client_online",)
MB = 1e6  # bytes per MB in figures and tables (decimal, as link bandwidths are quoted)
MIB = 2**20  # bytes per MiB for memory (as memory budgets are quoted)


def _column(df: pd.DataFrame, name: str) -> pd.Series:
    """A column, or an all-NaN one when no record carried the field."""
    return df[name] if name in df.columns else pd.Series(np.nan, index=df.index)


def training_start(rs: RunSet) -> dict[str, float]:
    """Per run, the wall time (s since the run started) at which training began.

    Design choice: the step-0 (pretrained) evaluation's ``wall_time``, i.e. after model
    loading and the first evaluation, which differ between methods for reasons unrelated
    to training speed; later periodic evaluations stay in (same cadence for every method).
    Without that record: the ``run_started`` event, else 0.
    """
    out: dict[str, float] = {}
    m, e = rs.metrics, rs.events
    for name in rs.names:
        start = 0.0
        if not m.empty:
            first = m[(m["run"] == name) & (m["kind"] == "eval") & (m["step"] == 0)]
            if not first.empty:
                out[name] = float(first["wall_time"].iloc[0])
                continue
        if not e.empty:
            started = e[(e["run"] == name) & (e["event"] == "run_started")]
            if not started.empty:
                start = float(started["wall_time"].iloc[0])
        out[name] = start
    return out


def evals(rs: RunSet) -> pd.DataFrame:
    """Evaluation records, sorted by run and step, with ``train_time_s`` (wall time since
    training began, see :func:`training_start`) and ``virtual_time`` (NaN when absent)."""
    m = rs.metrics
    cols = [*ID_COLUMNS, "step", "val_loss", "val_ppl", "wall_time", "train_time_s",
            "virtual_time"]
    if m.empty or "kind" not in m.columns:
        return pd.DataFrame(columns=cols)
    ev = m[m["kind"] == "eval"].copy()
    if ev.empty:
        return pd.DataFrame(columns=cols)
    start = training_start(rs)
    ev["train_time_s"] = ev["wall_time"] - ev["run"].map(start)
    ev["virtual_time"] = pd.to_numeric(_column(ev, "virtual_time"), errors="coerce")
    ev["val_ppl"] = pd.to_numeric(ev["val_ppl"], errors="coerce")
    order = {n: i for i, n in enumerate(rs.names)}
    ev = ev.sort_values(["run", "step"], key=lambda s: s.map(order) if s.name == "run" else s)
    return ev[cols].reset_index(drop=True)


def has_virtual_time(rs: RunSet) -> bool:
    """Whether any evaluation record carries a ``virtual_time`` (emulated clock)."""
    return bool(evals(rs)["virtual_time"].notna().any())


def final_ppl(rs: RunSet) -> pd.Series:
    """Validation PPL of each run's last evaluation (by step), indexed by run."""
    ev = evals(rs).dropna(subset=["val_ppl"])
    return ev.groupby("run", sort=False)["val_ppl"].last()


def default_target(rs: RunSet) -> float:
    """A target PPL every run reaches: the largest of the final PPLs.

    Design choice (issue #6): the slowest-converging run's final PPL, so each run has a
    time to target and speed-ups compare the same point of the curve.
    """
    finals = final_ppl(rs)
    if finals.empty:
        raise UserError("no run has an evaluation record yet, so there is no PPL to target; "
                        "pass --target-ppl or wait for the first evaluation")
    return float(finals.max())


def resolve_target(rs: RunSet, target: float | None) -> float:
    """The user's target PPL (checked), or :func:`default_target`."""
    if target is None:
        return default_target(rs)
    if not finite(target) or target <= 0:
        raise UserError(f"--target-ppl must be a positive number, got {target}")
    return float(target)


def resolve_baseline(rs: RunSet, baseline: str | None) -> str:
    """The baseline method: the user's (must be one of the runs'), else the first run's."""
    if baseline is None:
        return rs.runs[0].method
    if baseline not in rs.methods:
        raise UserError(f"--baseline {baseline} is not the method of any run given; "
                        f"choose one of {', '.join(rs.methods)}")
    return baseline


def time_to_target(rs: RunSet, target: float) -> pd.DataFrame:
    """Per run: steps, wall time and virtual time of the first evaluation with PPL <= target.

    No interpolation between evaluations: the resolution is the evaluation cadence, as in
    the papers' "time to converge". ``reached`` is False (and the times NaN) otherwise.
    """
    ev = evals(rs)
    rows = []
    for r in rs.runs:
        mine = ev[(ev["run"] == r.name) & (ev["val_ppl"] <= target)]
        row: dict[str, Any] = {"run": r.name, "method": r.method, "label": rs.labels[r.name],
                               "reached": not mine.empty, "steps": np.nan, "wall_s": np.nan,
                               "virtual_s": np.nan}
        if not mine.empty:
            hit = mine.iloc[0]
            row.update(steps=float(hit["step"]), wall_s=float(hit["train_time_s"]),
                       virtual_s=float(hit["virtual_time"]))
        rows.append(row)
    return pd.DataFrame(rows)


def speedups(rs: RunSet, target: float, baseline: str) -> pd.DataFrame:
    """:func:`time_to_target` plus speed-ups ``baseline time / run time`` (> 1 = faster).

    The baseline time is the mean over the baseline method's runs that reached the target
    (several seeds of one method average). A time of 0 (target met before training) or an
    unreached target gives NaN: no meaningful ratio.
    """
    ttt = time_to_target(rs, target)
    base = ttt[(ttt["method"] == baseline) & ttt["reached"]]
    for col, out in (("steps", "speedup_steps"), ("wall_s", "speedup_wall"),
                     ("virtual_s", "speedup_virtual")):
        ref = base[col].mean() if not base.empty else np.nan
        own = ttt[col].where(ttt[col] > 0)
        ttt[out] = ref / own if finite(ref) and ref > 0 else np.nan
    return ttt


def bytes_moved(rs: RunSet) -> pd.DataFrame:
    """Per run: bytes sent + received in train records (activations, gradients), in
    aggregate records (adapters), in ``split_moved`` events (frozen blocks handed to a
    client whose split point deepened, docs/method.md "ARMSC: Trigger") and in ``probe``
    events (HSplitLoRA's importance probes: activations up, gradients down), their total,
    and the total in MB."""
    m, e = rs.metrics, rs.events
    rows = []
    for r in rs.runs:
        mine = m[m["run"] == r.name] if not m.empty else m
        row: dict[str, Any] = {"run": r.name, "method": r.method, "label": rs.labels[r.name]}
        for kind in ("train", "aggregate"):
            part = mine[mine["kind"] == kind] if not mine.empty else mine
            total = 0.0
            for col in ("bytes_sent", "bytes_received"):
                if col in part.columns:
                    total += float(pd.to_numeric(part[col], errors="coerce").fillna(0).sum())
            row[f"{kind}_bytes"] = total
        handover = 0.0
        if not e.empty and "bytes" in e.columns:
            moved = e[(e["run"] == r.name) & (e["event"] == "split_moved")]["bytes"]
            handover = float(pd.to_numeric(moved, errors="coerce").fillna(0).sum())
        row["handover_bytes"] = handover
        probe = 0.0
        if not e.empty and "bytes_up" in e.columns:
            mine_e = e[(e["run"] == r.name) & (e["event"] == "probe")]
            for col in ("bytes_up", "bytes_down"):
                probe += float(pd.to_numeric(mine_e[col], errors="coerce").fillna(0).sum())
        row["probe_bytes"] = probe
        row["total_bytes"] = row["train_bytes"] + row["aggregate_bytes"] + handover + probe
        row["total_mb"] = row["total_bytes"] / MB
        rows.append(row)
    return pd.DataFrame(rows)


def clients(rs: RunSet, run: str) -> list[str]:
    """Clients of a run in natural order (client2 before client10): from train records,
    dropout events and aggregation participants, so a client that never trained shows."""
    names: set[str] = set()
    m, e = rs.metrics, rs.events
    if not m.empty:
        names.update(m[(m["run"] == run) & (m["kind"] == "train")]["client"].dropna())
    if not e.empty:
        mine = e[e["run"] == run]
        if "client" in mine.columns:
            names.update(mine[mine["event"].isin(OFFLINE_EVENTS + ONLINE_EVENTS)]["client"]
                         .dropna())
        if "participants" in mine.columns:
            for p in mine["participants"].dropna():
                names.update(p)
    return sorted(names, key=natural)


def natural(name: str) -> tuple[str, int]:
    """Sort key: the text, then the trailing number (client2 < client10)."""
    stem = name.rstrip("0123456789")
    digits = name[len(stem):]
    return (stem, int(digits) if digits else -1)


def run_steps(rs: RunSet, run: str) -> int:
    """Steps a run covers according to its records (fewer than configured for a killed
    run); the configured ``steps`` when there is no record yet."""
    m = rs.metrics
    done = 0
    if not m.empty:
        mine = m[m["run"] == run]
        train = mine[mine["kind"] == "train"]["step"]
        evaluated = mine[mine["kind"] == "eval"]["step"]
        if not train.empty:
            done = int(train.max()) + 1
        if not evaluated.empty:
            done = max(done, int(evaluated.max()))
    steps = rs.run(run).config.get("train", {}).get("steps")
    return done if done > 0 else int(steps) if finite(steps) else 0


def trained_intervals(rs: RunSet, run: str) -> dict[str, list[tuple[int, int]]]:
    """Per client, maximal runs of consecutive trained steps as ``[first, end)`` intervals."""
    m = rs.metrics
    out: dict[str, list[tuple[int, int]]] = {c: [] for c in clients(rs, run)}
    if m.empty:
        return out
    tr = m[(m["run"] == run) & (m["kind"] == "train")]
    for client, part in tr.groupby("client"):
        intervals: list[tuple[int, int]] = []
        for s in sorted(set(int(x) for x in part["step"])):
            if intervals and intervals[-1][1] == s:
                intervals[-1] = (intervals[-1][0], s + 1)
            else:
                intervals.append((s, s + 1))
        out[str(client)] = intervals
    return out


def offline_intervals(rs: RunSet) -> pd.DataFrame:
    """One row per offline period: ``client_offline`` to the next ``client_online``.

    ``end_step`` is the step the client trains again (it was away for ``[start, end)``);
    a client still away when the run ended has ``rejoined`` False and ``end_step`` = the
    run's last step, so the shading reaches the end of the plot.
    """
    e = rs.events
    cols = ["run", "method", "label", "client", "start_step", "end_step", "start_wall",
            "end_wall", "rejoined", "reason"]
    if e.empty or "client" not in e.columns:
        return pd.DataFrame(columns=cols)
    rows = []
    for name in rs.names:
        mine = e[(e["run"] == name) & e["event"].isin(OFFLINE_EVENTS + ONLINE_EVENTS)]
        open_: dict[str, dict[str, Any]] = {}
        for _, ev in mine.iterrows():
            client = str(ev["client"])
            if ev["event"] in OFFLINE_EVENTS and client not in open_:
                open_[client] = {"run": name, "method": rs.run(name).method,
                                 "label": rs.labels[name], "client": client,
                                 "start_step": int(ev["step"]), "start_wall": ev["wall_time"],
                                 "reason": ev.get("reason")}
            elif ev["event"] in ONLINE_EVENTS and client in open_:
                row = open_.pop(client)
                row.update(end_step=int(ev["step"]), end_wall=ev["wall_time"], rejoined=True)
                rows.append(row)
        last = run_steps(rs, name)
        for row in open_.values():
            row.update(end_step=max(last, row["start_step"] + 1), end_wall=np.nan,
                       rejoined=False)
            rows.append(row)
    if not rows:
        return pd.DataFrame(columns=cols)
    return pd.DataFrame(rows)[cols]


def static_split(rs: RunSet, run: str) -> int | None:
    """The run's configured split point (``run_started``'s ``split``, else the config's)."""
    e = rs.events
    if not e.empty and "split" in e.columns:
        started = e[(e["run"] == run) & (e["event"] == "run_started")]["split"].dropna()
        if not started.empty and finite(started.iloc[0]):
            return int(started.iloc[0])
    k = rs.run(run).config.get("train", {}).get("split")
    return int(k) if finite(k) else None


def reconfigurations(rs: RunSet, run: str) -> pd.DataFrame:
    """Per-client configuration over steps from ``reconfigure`` events (HSplitLoRA's ARMSC).

    Accepted event shapes, so the reader survives the runtime's format settling:
    ``clients`` = {client: {split, rank_sum, memory_bytes, budget_bytes, ...}} (what
    runner.methods.hetero writes), ``splits`` = {client: k}, or one ``client`` with ``split``.
    Returns one row per (step, client) with whatever fields the event carried.
    """
    e = rs.events
    rows: list[dict[str, Any]] = []
    if e.empty:
        return pd.DataFrame(columns=["step", "client"])
    for _, ev in e[(e["run"] == run) & (e["event"] == "reconfigure")].iterrows():
        step = int(ev["step"]) if finite(ev.get("step")) else 0
        per_client = ev.get("clients")
        splits = ev.get("splits")
        if isinstance(per_client, dict):
            rows.extend({"step": step, "client": c, **(v if isinstance(v, dict) else {})}
                        for c, v in per_client.items())
        elif isinstance(splits, dict):
            rows.extend({"step": step, "client": c, "split": k} for c, k in splits.items())
        elif isinstance(ev.get("client"), str):
            rows.append({"step": step, "client": ev["client"],
                         **{k: ev.get(k) for k in ("split", "rank_sum", "memory_bytes",
                                                   "budget_bytes") if finite(ev.get(k))}})
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=["step", "client"])


def _per_client_series(rs: RunSet, run: str, field_name: str) -> pd.DataFrame:
    """``field_name`` per client over steps: train records first, then reconfigurations."""
    m = rs.metrics
    if not m.empty and field_name in m.columns:
        tr = m[(m["run"] == run) & (m["kind"] == "train") & m[field_name].notna()]
        if not tr.empty:
            out = tr[["client", "step", field_name]].copy()
            return out.astype({field_name: int}).sort_values(["client", "step"]).reset_index(
                drop=True)
    rc = reconfigurations(rs, run)
    if rc.empty or field_name not in rc.columns:
        return pd.DataFrame(columns=["client", "step", field_name])
    rc = rc[["client", "step", field_name]].dropna()
    if field_name == "split":
        k0 = static_split(rs, run)
        if k0 is not None and (rc["step"] > 0).all():
            # The configured split holds until the first reconfiguration.
            rc = pd.concat([pd.DataFrame({"client": rc["client"].unique(), "step": 0,
                                          "split": k0}), rc])
    rc = rc.drop_duplicates(["client", "step"], keep="last").astype({field_name: int})
    return rc.sort_values(["client", "step"]).reset_index(drop=True)


def split_points(rs: RunSet, run: str) -> pd.DataFrame:
    """Per-client split point over steps (columns client, step, split) when the run records
    it per client: a ``split`` field on train records, else ``reconfigure`` events. Empty
    when split points are static (then :func:`static_split` says which)."""
    return _per_client_series(rs, run, "split")


def rank_sums(rs: RunSet, run: str) -> pd.DataFrame:
    """Per-client total LoRA rank over steps (columns client, step, rank_sum), from train
    records or ``reconfigure`` events; empty when ranks are fixed."""
    return _per_client_series(rs, run, "rank_sum")


def budget_violations(rs: RunSet) -> pd.DataFrame:
    """``budget_violation`` events (run, step, client, detail); the client is the event's
    ``client`` field or the "clientN:" prefix of its detail text."""
    e = rs.events
    cols = ["run", "label", "step", "client", "detail"]
    if e.empty:
        return pd.DataFrame(columns=cols)
    rows = []
    for _, ev in e[e["event"] == "budget_violation"].iterrows():
        detail = str(ev.get("detail") or "")
        client = ev.get("client") if isinstance(ev.get("client"), str) else None
        if client is None and ":" in detail:
            client = detail.split(":", 1)[0].strip() or None
        rows.append({"run": ev["run"], "label": ev["label"],
                     "step": int(ev["step"]) if finite(ev.get("step")) else 0,
                     "client": client, "detail": detail})
    return pd.DataFrame(rows, columns=cols)


BUDGET_EVENTS = ("client_budget", "budget_changed")


def _measured_memory(rs: RunSet, run: str) -> pd.DataFrame:
    """Metrics records of ``run`` that carry a measured ``memory_bytes`` (train and
    resources records of a distributed run: docs/run-format.md "Measured resources")."""
    m = rs.metrics
    if m.empty or "memory_bytes" not in m.columns:
        return pd.DataFrame()
    rec = m[(m["run"] == run) & m["memory_bytes"].notna()].copy()
    rec["memory_bytes"] = pd.to_numeric(rec["memory_bytes"], errors="coerce").astype(float)
    rec["budget_bytes"] = pd.to_numeric(_column(rec, "budget_bytes"),
                                        errors="coerce").astype(float)
    return rec.dropna(subset=["memory_bytes"])


def _reported_budgets(rs: RunSet, run: str) -> dict[str, float]:
    """Per client, the last budget it reported (``client_budget`` / ``budget_changed``)."""
    e = rs.events
    if e.empty or "budget_bytes" not in e.columns or "client" not in e.columns:
        return {}
    ev = e[(e["run"] == run) & e["event"].isin(BUDGET_EVENTS) & e["budget_bytes"].notna()]
    return {str(c): float(b) for c, b in zip(ev["client"], ev["budget_bytes"], strict=True)
            if isinstance(c, str)}


def memory(rs: RunSet) -> pd.DataFrame:
    """Per run and participant (clients, and the server when it measured itself): measured
    peak, planned peak and the budget, side by side.

    * ``measured_bytes``: the largest ``memory_bytes`` on the run's metrics records (what
      the processes measured: cgroup, RSS or GPU, ``memory_source`` says which), NaN when
      none was measured; ``measured_budget_bytes``: the budget on the record of that peak.
    * ``planned_bytes``: the largest per-client ``memory_bytes`` of ``reconfigure`` events
      (predicted by the memory model), NaN without them; ``planned_budget_bytes`` likewise.
    * ``peak_bytes`` / ``source``: measured when measured, else planned; ``budget_bytes``:
      the budget in force at that peak (else the last one the records, then the
      ``client_budget`` / ``budget_changed`` events, name); ``over_budget`` counts the
      records (or reconfigurations) above their own budget (docs/method.md "Budget
      violations": a method that does not fit is still run and the violation must be shown).

    Empty when no run carries memory figures.
    """
    cols = ["run", "method", "label", "client", "peak_bytes", "budget_bytes", "over_budget",
            "source", "measured_bytes", "measured_budget_bytes", "measured_over_budget",
            "memory_source", "planned_bytes", "planned_budget_bytes", "planned_over_budget"]
    rows = []
    for run in rs.names:
        measured = _measured_memory(rs, run)
        planned = reconfigurations(rs, run)
        if not planned.empty and "memory_bytes" in planned.columns:
            planned = planned[planned["memory_bytes"].notna()].copy()
            planned["memory_bytes"] = pd.to_numeric(planned["memory_bytes"],
                                                    errors="coerce").astype(float)
            planned["budget_bytes"] = pd.to_numeric(_column(planned, "budget_bytes"),
                                                    errors="coerce").astype(float)
        else:
            planned = pd.DataFrame()
        reported = _reported_budgets(rs, run)
        names = set(measured["client"].dropna()) if not measured.empty else set()
        names |= set(planned["client"].dropna()) if not planned.empty else set()
        for client in sorted(names, key=natural):
            row: dict[str, Any] = {"run": run, "method": rs.run(run).method,
                                   "label": rs.labels[run], "client": client}
            for what, frame in (("measured", measured), ("planned", planned)):
                part = frame[frame["client"] == client] if not frame.empty else frame
                if part.empty:
                    row.update({f"{what}_bytes": np.nan, f"{what}_budget_bytes": np.nan,
                                f"{what}_over_budget": 0})
                    continue
                peak = part.loc[part["memory_bytes"].idxmax()]
                budget = peak["budget_bytes"]
                if not finite(budget):
                    known = part["budget_bytes"].dropna()
                    budget = known.iloc[-1] if not known.empty else np.nan
                row.update({f"{what}_bytes": float(peak["memory_bytes"]),
                            f"{what}_budget_bytes": float(budget),
                            f"{what}_over_budget": int(
                                (part["memory_bytes"] > part["budget_bytes"]).sum())})
                if what == "measured":
                    src = part["memory_source"].dropna() if "memory_source" in part else []
                    row["memory_source"] = str(src.iloc[-1]) if len(src) else ""
            row.setdefault("memory_source", "")
            source = "measured" if finite(row["measured_bytes"]) else "planned"
            budget = row[f"{source}_budget_bytes"]
            if not finite(budget):
                other = row["planned_budget_bytes" if source == "measured"
                            else "measured_budget_bytes"]
                budget = other if finite(other) else reported.get(client, np.nan)
            row.update(peak_bytes=row[f"{source}_bytes"], budget_bytes=float(budget),
                       over_budget=row[f"{source}_over_budget"], source=source)
            rows.append(row)
    return pd.DataFrame(rows, columns=cols)


def equal_time(rs: RunSet) -> float:
    """The equal-wall-time horizon: the shortest training time (s since training began,
    :func:`training_start`) any run reached at its last evaluation; NaN without evals."""
    ev = evals(rs).dropna(subset=["train_time_s"])
    if ev.empty:
        return float("nan")
    return float(ev.groupby("run")["train_time_s"].max().min())


def ppl_at_time(rs: RunSet, seconds: float) -> pd.Series:
    """Each run's validation PPL at ``seconds`` of training: its last evaluation at or
    before then (a step function, no interpolation: what a user stopping the run at that
    time would have had), indexed by run."""
    ev = evals(rs).dropna(subset=["val_ppl", "train_time_s"])
    out = {}
    for name in rs.names:
        mine = ev[(ev["run"] == name) & (ev["train_time_s"] <= seconds + 1e-9)]
        out[name] = float(mine["val_ppl"].iloc[-1]) if not mine.empty else np.nan
    return pd.Series(out, dtype=float)


def comparison(rs: RunSet, target: float, baseline: str) -> pd.DataFrame:
    """The report's comparison table as numbers, one row per run (given order).

    Columns: final val PPL, val PPL at equal wall time (:func:`equal_time`), the five
    scores and the slot error rate SER (NaN if not evaluated), whether the target was
    reached, steps and wall time to target, speed-up (wall time) vs ``baseline``,
    client- and server-side trainable parameters (summary.json; NaN for a killed run: the
    capacity each method trains, so a comparison can tell method from capacity), bytes
    moved (MB), the largest measured peak memory of any client (MiB, :func:`memory`; NaN
    when not measured).
    """
    sp = speedups(rs, target, baseline).set_index("run")
    finals = final_ppl(rs)
    scores = rs.scores.set_index("run") if not rs.scores.empty else pd.DataFrame()
    summary = rs.summary.set_index("run") if not rs.summary.empty else pd.DataFrame()
    moved = bytes_moved(rs).set_index("run")
    at_equal = ppl_at_time(rs, equal_time(rs))
    mem = memory(rs)
    mem = mem[mem["client"] != "server"]
    client_peak = mem.groupby("run")["measured_bytes"].max() / MIB
    rows = []
    for r in rs.runs:
        n = r.name
        row: dict[str, Any] = {"run": n, "method": r.method, "label": rs.labels[n],
                               "final_val_ppl": finals.get(n, np.nan),
                               "ppl_equal_time": at_equal.get(n, np.nan)}
        for s in ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr", "SER"):
            row[s] = scores.at[n, s] if n in scores.index else np.nan
        row.update(reached=bool(sp.at[n, "reached"]), steps_to_target=sp.at[n, "steps"],
                   wall_s_to_target=sp.at[n, "wall_s"],
                   speedup_wall=sp.at[n, "speedup_wall"],
                   **{key: (summary.at[n, key] if n in summary.index
                            and key in summary.columns else np.nan)
                      for key in ("client_trainable_params", "server_trainable_params")},
                   bytes_mb=moved.at[n, "total_mb"],
                   client_peak_mib=client_peak.get(n, np.nan))
        rows.append(row)
    return pd.DataFrame(rows)

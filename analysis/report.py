"""A markdown report of one or many runs: the papers' comparison table plus the figures.

The table follows the SplitLoRA/HSplitLoRA papers' layout (method, PPL, the five E2E
scores, time to converge, client-side trainable parameters, communication), so a run of
the testbed can be read against their tables directly. Figures are written into
``<report stem>_figures/`` next to the report and embedded by relative path, so the
report directory can be moved or committed as a whole.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from analysis import derive
from analysis.figures import Plotted, plot_all
from analysis.load import RunSet, finite

# Column title, comparison() column, formatter. Score precision as the papers print them.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("Method", "label", "text"),
    ("Final val PPL", "final_val_ppl", ".3f"),
    ("Val PPL at equal time", "ppl_equal_time", ".3f"),
    ("BLEU", "BLEU", ".2f"),
    ("NIST", "NIST", ".4f"),
    ("METEOR", "METEOR", ".4f"),
    ("ROUGE-L", "ROUGE_L", ".2f"),
    ("CIDEr", "CIDEr", ".4f"),
    ("SER (%)", "SER", ".2f"),
    ("Steps to target", "steps_to_target", "steps"),
    ("Wall time to target (s)", "wall_s_to_target", ".1f"),
    ("Speed-up (wall)", "speedup_wall", "x"),
    ("Client trainable params", "client_trainable_params", ","),
    ("Server trainable params", "server_trainable_params", ","),
    ("Bytes moved (MB)", "bytes_mb", ".2f"),
    ("Peak client memory (MiB, measured)", "client_peak_mib", ".0f"),
)


def _cell(value: Any, fmt: str, reached: bool) -> str:
    """One table cell: blank when not measured, "not reached" for a missed target."""
    if fmt == "text":
        return str(value).replace("|", "\\|")
    if not finite(value):
        return "not reached" if fmt in ("steps", ".1f") and not reached else ""
    v = float(value)
    if fmt == "steps":
        return f"{int(v)}"
    if fmt == "x":
        return f"{v:.2f}×"
    if fmt == ",":  # a mean over clients for heterogeneous methods: round, don't truncate
        return f"{v:,.0f}"
    return format(v, fmt)


def markdown_table(table: pd.DataFrame) -> str:
    """:func:`analysis.derive.comparison` as a GitHub markdown table, numbers right-aligned."""
    head = "| " + " | ".join(t for t, _, _ in COLUMNS) + " |"
    rule = "|" + "|".join(":---" if f == "text" else "---:" for _, _, f in COLUMNS) + "|"
    lines = [head, rule]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(_cell(row[c], f, bool(row["reached"]))
                                       for _, c, f in COLUMNS) + " |")
    return "\n".join(lines)


def _mib(value: Any) -> str:
    return f"{float(value) / derive.MIB:.0f}" if finite(value) else ""


def memory_table(rs: RunSet) -> list[str]:
    """Per run and client: measured peak, how it was measured, the memory model's planned
    peak and the budget (MiB), as markdown lines; [] when no run carries memory figures."""
    mem = derive.memory(rs)
    if mem.empty:
        return []
    lines = ["| Method | Client | Measured peak (MiB) | Measured by | Planned (MiB) "
             "| Budget (MiB) | Over budget |",
             "|:---|:---|---:|:---|---:|---:|---:|"]
    for _, row in mem.iterrows():
        unit = "reconfiguration" if row["source"] == "planned" else "record"
        over = f"{row['over_budget']} {unit}(s)" if row["over_budget"] else ""
        lines.append(f"| {row['label']} | {row['client']} | {_mib(row['measured_bytes'])} "
                     f"| {row['memory_source']} | {_mib(row['planned_bytes'])} "
                     f"| {_mib(row['budget_bytes'])} | {over} |")
    return lines


def slot_error_table(rs: RunSet) -> list[str]:
    """Slot error rate per run and attribute (``eval/scores.json``'s ``slot_errors``, from
    runner/evaluation/slots.py), as markdown lines; [] when no run carries it. A cell is the SER of
    that attribute in % of its MR slots, "-" when no MR had the attribute."""
    evaluated = [(r, (r.scores or {}).get("slot_errors")) for r in rs.runs]
    evaluated = [(r, s) for r, s in evaluated if isinstance(s, dict)]
    if not evaluated:
        return []
    # Attributes in the order scores.json lists them (E2E order; runner.dataset.data, which imports
    # torch, stays out of analysis).
    attrs = list(dict.fromkeys(a for _, s in evaluated for a in s.get("per_attribute", {})))
    lines = ["| Method | MRs | SER (%) | missing | wrong | added | " + " | ".join(attrs) + " |",
             "|:---|" + "---:|" * (5 + len(attrs))]
    for r, s in evaluated:
        per = s.get("per_attribute", {})
        cells = [_cell((per.get(a) or {}).get("SER"), ".1f", True) or "-" for a in attrs]
        lines.append(f"| {rs.labels[r.name]} | {s.get('outputs', '')} | "
                     f"{_cell(s.get('SER'), '.2f', True)} | {s.get('missing', '')} | "
                     f"{s.get('wrong', '')} | {s.get('added', '')} | " + " | ".join(cells) + " |")
    return lines


def _caveats(rs: RunSet, warned: list[str]) -> list[str]:
    """Things a reader must know before trusting a row: killed runs, dropped records, and
    memory-budget violations and clients not runnable on their devices (docs/method.md
    "Budget violations")."""
    notes = [f"`{r.name}` has no summary.json: killed or still running; its numbers cover "
             "the records written so far." for r in rs.runs if r.summary is None]
    notes += list(warned)
    violations = derive.budget_violations(rs)
    for run, part in violations.groupby("run", sort=False):
        notes.append(f"`{run}`: {len(part)} memory-budget violation event(s), e.g. "
                     f"\"{part['detail'].iloc[0]}\" (marked on its timeline).")
    for r in rs.runs:
        unfit = (r.summary or {}).get("not_runnable") or []
        if unfit:
            notes.append(f"`{r.name}`: not runnable on their devices, so never trained: "
                         f"{', '.join(unfit)} (predicted memory over budget).")
    mem = derive.memory(rs)
    for _, row in mem[mem["over_budget"] > 0].iterrows():
        notes.append(f"`{row['run']}` {row['client']}: {row['source']} memory over budget "
                     f"in {row['over_budget']} "
                     f"{'reconfiguration' if row['source'] == 'planned' else 'record'}(s), peak "
                     f"{row['peak_bytes'] / derive.MIB:.0f} MiB vs "
                     f"{row['budget_bytes'] / derive.MIB:.0f} MiB.")
    return notes


def audit_section(rs: RunSet) -> list[str]:
    """The exactly-once audit of every distributed run (config.json has ``runtime``)."""
    from analysis.audit import audit_lines, audit_records

    lines: list[str] = []
    for r in rs.runs:
        if "runtime" not in r.config:
            continue
        a = audit_records(r.config, r.metrics, r.events, r.summary is not None)
        lines += [f"- **{rs.labels[r.name]}** (`{r.name}`): " + audit_lines(a)[0]]
        lines += [f"  - {line}" for line in audit_lines(a)[1:]]
    return lines


def write_report(rs: RunSet, out: Path, target: float | None = None,
                 baseline: str | None = None, warned: list[str] | None = None
                 ) -> tuple[Path, Plotted]:
    """Write the markdown report ``out`` and its figures; returns (report, figures).

    ``warned``: warning messages met while loading (truncated records), repeated in the
    report so they are not lost with the terminal output.
    """
    out = Path(out)
    if out.is_dir():  # `-o reports/` means "in there", as for `plot -o DIR`
        out = out / "report.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig_dir = out.parent / f"{out.stem}_figures"
    how = ("given with --target-ppl" if target is not None
           else "the largest final PPL, so every run reaches it")
    plotted = plot_all(rs, fig_dir, target, baseline)
    target, baseline = plotted.target, plotted.baseline
    table = derive.comparison(rs, target, baseline)
    lines = [
        "# Run comparison",
        "",
        f"Generated {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} by `testbed report` "
        f"from {len(rs.runs)} run(s).",
        "",
        f"- Target validation PPL: **{target:.4g}** ({how}); steps and wall time to target "
        "are those of the first evaluation at or below it (wall time counted from the end "
        "of the pretrained evaluation).",
        f"- Speed-up baseline: **{baseline}** (baseline time / run time; > 1 is faster).",
        f"- Equal wall time: **{derive.equal_time(rs):.0f} s** of training, the shortest any "
        "run took to its last evaluation; \"Val PPL at equal time\" is each run's last "
        "evaluation at or before then.",
        "- Scores (BLEU, NIST, METEOR, ROUGE-L, CIDEr) come from `testbed eval`; blank when "
        "the run was not evaluated. SER: slot error rate, the share of MR slots an output "
        "leaves out, gets wrong or adds to (lower is better; per attribute below). Bytes "
        "moved: sent + received in training and aggregation records, 1 MB = 10^6 bytes.",
        "",
        "## Results",
        "",
        markdown_table(table),
        "",
        "## Runs",
        "",
        "| Method | Run | Directory | Clients | Split k (per client if it varies) | Rank "
        "| Steps |",
        "|:---|:---|:---|---:|---:|---:|---:|",
    ]
    for r in rs.runs:
        t = r.config.get("train", {})
        k = derive.static_split(rs, r.name)
        layers = r.config.get("num_layers")
        k_text = ("" if k is None else "whole model" if finite(layers) and k >= int(layers)
                  else str(k))
        per_client = derive.split_points(rs, r.name)
        if not per_client.empty:  # ARMSC: the last split point of each client
            last = per_client.groupby("client")["split"].last()
            k_text = ", ".join(str(last[c]) for c in sorted(last.index, key=derive.natural))
        rank_text = ("adaptive" if not derive.rank_sums(rs, r.name).empty
                     else str(t.get("rank", "")))
        lines.append(f"| {rs.labels[r.name]} | {r.name} | `{r.path}` | {t.get('clients', '')} "
                     f"| {k_text} | {rank_text} "
                     f"| {derive.run_steps(rs, r.name)} |")
    slot_table = slot_error_table(rs)
    if slot_table:
        lines += ["", "## Slot errors", "",
                  "SER = (missing + wrong + added) / MR slots, in %, overall and per "
                  "attribute (runner/evaluation/slots.py: a rule-based matcher of the MR's "
                  "values, as in the E2E challenge's follow-up evaluations). missing: the "
                  "output does not mention the attribute; wrong: it gives another value "
                  "(\"family-friendly\" for familyFriendly[no]); added: a value the MR does not "
                  "have.", "",
                  *slot_table]
    memory = memory_table(rs)
    if memory:
        lines += ["", "## Memory per client", "",
                  "Measured: the peak the process or its container measured (cgroup = the "
                  "container's memory cgroup, rss = the process's resident set, nvml / cuda = "
                  "GPU memory); planned: the memory model's prediction in reconfigurations; "
                  "budget: the budget in force at the peak.", "", *memory]
    audits = audit_section(rs)
    if audits:
        lines += ["", "## Exactly-once audit", "",
                  "Distributed runs, read from their files (analysis/audit.py): each step and "
                  "aggregation applied once, and what each fault cost (steps re-run, client "
                  "steps skipped, time).", "", *audits]
    caveats = _caveats(rs, warned or [])
    if caveats:
        lines += ["", "## Caveats", ""] + [f"- {c}" for c in caveats]
    lines += ["", "## Figures", ""]
    for stem, png in plotted.figures.items():
        rel = png.relative_to(out.parent).as_posix()
        pdf = Path(rel).with_suffix(".pdf").as_posix()
        caption = plotted.captions[stem]
        lines += [f"### {caption.rstrip('.')}", "", f"![{caption}]({rel})", "",
                  f"[PDF]({pdf})", ""]
    if plotted.skipped:
        lines += ["Not drawn: " + "; ".join(f"{k} ({v})" for k, v in plotted.skipped.items())
                  + ".", ""]
    out.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return out, plotted


"""The markdown report of an experiment: per setting, one row per method with the mean and
95 % interval over seeds of PPL, time to the setting's and to the fixed target, trainable
parameters, bytes moved, budget violations and scores; each method's time against the
baseline's (geometric mean of the paired ratios with its interval, and a verdict); the
configuration each method got (fairness); the contrast between profiles; every cell; the
band figures. Every comparison shown carries the verdict of analysis/seeds.py ``verdict``.

Tables are also written as CSV (``<stem>_tables/cells.csv``, ``methods.csv``,
``contrast.csv``, ``pairwise.csv``) with the raw numbers (``*_mean``, ``*_ci``, ``*_n``; for
ratios ``*_gmean``, ``*_low``, ``*_high``, ``*_n``; ``*_verdict``), so a reader or a test can
check a figure without parsing markdown.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.experiment import (
    ExperimentDir,
    cell_table,
    contrast_table,
    group_table,
    pairwise_table,
    resolve_baseline,
    resolve_target,
)
from analysis.experiment_figures import plot_experiment
from analysis.load import finite
from analysis.seeds import GeoCI, MeanCI, fmt_ci, fmt_geo, verdict

# Column title, group_table stem, number format; a column is left out when no row has it.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("Final val PPL", "final_val_ppl", ".3f"),
    ("Best val PPL", "best_val_ppl", ".3f"),
    ("Steps", "steps_done", ".0f"),
    ("Virtual time to target (s)", "ttt_virtual_s", ".4g"),
    ("Wall time to target (s)", "ttt_wall_s", ".1f"),
    ("Virtual time to fixed target (s)", "fixed_ttt_virtual_s", ".4g"),
    ("Wall time to fixed target (s)", "fixed_ttt_wall_s", ".1f"),
    ("Client trainable params", "client_trainable_params", ",.0f"),
    ("Server trainable params", "server_trainable_params", ",.0f"),
    ("MB moved", "bytes_mb", ".1f"),
    ("Budget violations", "budget_violations", ".1f"),
    ("BLEU", "BLEU", ".2f"),
    ("NIST", "NIST", ".3f"),
    ("METEOR", "METEOR", ".4f"),
    ("ROUGE-L", "ROUGE_L", ".2f"),
    ("CIDEr", "CIDEr", ".3f"),
    ("SER (%)", "SER", ".2f"),
)


def _mean_ci(row: pd.Series, stem: str) -> MeanCI:
    return MeanCI(float(row[f"{stem}_mean"]), float(row[f"{stem}_ci"]), math.nan,
                  int(row[f"{stem}_n"]))


def _geo_ci(row: pd.Series, stem: str) -> GeoCI:
    return GeoCI(float(row[f"{stem}_gmean"]), float(row[f"{stem}_low"]),
                 float(row[f"{stem}_high"]), int(row[f"{stem}_n"]))


def _count(text: str, n: int, seeds: int) -> str:
    """``text (n=k)`` when some seeds lack the number (target not reached, killed)."""
    return f"{text} (n={n})" if text and n < seeds else text


def _ci(row: pd.Series, stem: str, fmt: str) -> str:
    ci = _mean_ci(row, stem)
    return _count(fmt_ci(ci, fmt), ci.n, int(row["seeds"]))


def _geo(ci: GeoCI, seeds: int, fmt: str = ".2f") -> str:
    return _count(fmt_geo(ci, fmt), ci.n, seeds)


def methods_markdown(groups: pd.DataFrame) -> list[str]:
    """The per-method table of one setting."""
    cols = [(t, s, f) for t, s, f in COLUMNS if groups[f"{s}_n"].sum() > 0]
    head = "| Method | Seeds | " + " | ".join(t for t, _, _ in cols) + " |"
    rule = "|:---|---:|" + "|".join("---:" for _ in cols) + "|"
    lines = [head, rule]
    for _, row in groups.iterrows():
        seeds = f"{row['finished']}/{row['seeds']}"
        cells = [_ci(row, s, f) for _, s, f in cols]
        lines.append(f"| {row['method']} | {seeds} | " + " | ".join(cells) + " |")
    return lines


def speedup_markdown(groups: pd.DataFrame, base: str) -> list[str]:
    """Each method's time to the setting's target and to the fixed target over the
    baseline's, paired by seed: the inverse of group_table's ``speedup_*`` /
    ``fixed_speedup_*`` (exact on the log scale: geometric mean inverted, interval ends
    swapped and inverted), so it reads the same way as the pairwise table (< 1: the method
    is faster), with the verdict of each."""
    rows = groups[groups["method"] != base]
    targets = [(label, prefix) for label, prefix in (("setting", ""), ("fixed", "fixed_"))
               if rows[f"{prefix}speedup_virtual_n"].sum() + rows[f"{prefix}speedup_wall_n"]
               .sum() > 0]
    if rows.empty or not targets:
        return []
    lines = [f"| Method | Target PPL | its time / {base}'s (virtual) | Verdict "
             f"| its time / {base}'s (wall) | Verdict |", "|:---|:---|---:|:---|---:|:---|"]
    for _, row in rows.iterrows():
        for label, prefix in targets:
            cells = []
            for kind in ("virtual", "wall"):
                ci = _geo_ci(row, f"{prefix}speedup_{kind}").inverse()
                cells += [_geo(ci, int(row["finished"])), verdict(ci)]
            tgt = row[f"{prefix}target_ppl"]
            lines.append(f"| {row['method']} | {label} ({_num(tgt, '.4g')}) | "
                         + " | ".join(cells) + " |")
    return lines


def pairwise_markdown(pairs: pd.DataFrame) -> list[str]:
    """pairwise_table's rows of one setting as a markdown table, with verdicts."""
    if pairs.empty:
        return []
    lines = ["| Method | Seed pairs | Final PPL minus base's | Verdict | Mean target PPL "
             "| its time / base's (virtual) | Verdict | its time / base's (wall) | Verdict |",
             "|:---|---:|---:|:---|---:|---:|:---|---:|:---|"]
    for _, row in pairs.iterrows():
        n = int(row["seeds"])
        diff = _mean_ci(row, "ppl_diff")
        cells = [_count(fmt_ci(diff, "+.3f"), diff.n, n), verdict(diff),
                 f"{row['target_mean']:.3f}"]
        for kind in ("virtual", "wall"):
            ci = _geo_ci(row, f"ratio_{kind}")
            cells += [_geo(ci, n), verdict(ci)]
        lines.append(f"| {row['method']} | {n} | " + " | ".join(cells) + " |")
    return lines


def config_markdown(groups: pd.DataFrame) -> list[str]:
    """What each method was configured with under the budgets (testbed/experiment/fairness.py)."""
    lines = ["| Method | Split | Rank | How it meets the budgets | Stopped by |",
             "|:---|---:|---:|:---|:---|"]
    for _, row in groups.iterrows():
        lines.append(f"| {row['method']} | {row['split']} | {row['rank']} | {row['fairness']} "
                     f"| {row['stop_reasons']} |")
    return lines


def _num(value: Any, fmt: str) -> str:
    return format(float(value), fmt) if finite(value) else ""


def cells_markdown(cells: pd.DataFrame) -> list[str]:
    """Every cell, one line (state, final PPL, steps, virtual time, time to target)."""
    lines = ["| Cell | Setting | Seed | State | Final val PPL | Steps | Virtual time (s) "
             "| Time to target (virtual s / wall s) | Stop | Violations | CPU (s) "
             "| Peak RSS / estimate (MiB) |",
             "|:---|:---|---:|:---|---:|---:|---:|---:|:---|---:|---:|---:|"]
    for _, c in cells.iterrows():
        state = "finished" if c["finished"] else ("killed / running" if c["started"]
                                                  else "not started")
        ttt = (f"{_num(c['ttt_virtual_s'], '.4g') or '-'} / {_num(c['ttt_wall_s'], '.1f')}"
               if c["reached"] else "not reached")
        lines.append(f"| {c['id']} | {c['setting']} | {c['seed']} | {state} "
                     f"| {_num(c['final_val_ppl'], '.3f')} | {_num(c['steps_done'], '.0f')} "
                     f"| {_num(c['virtual_time_s'], '.4g')} | {ttt} | {c['stop_reason']} "
                     f"| {_num(c['budget_violations'], '.0f')} | {_num(c['cpu_s'], '.0f')} "
                     f"| {_num(c['peak_rss_bytes'] / 2**20, '.0f')} / "
                     f"{_num(c['estimate_bytes'] / 2**20, '.0f')} |")
    return lines


def violations_markdown(exp: ExperimentDir, cells: pd.DataFrame) -> list[str]:
    """Per setting and method: which clients ran over their budget, with one detail each
    (hetlora's full-model clients, a fixed configuration nothing fits, an ARMSC plan above a
    budget); [] when no cell recorded a violation."""
    if exp.runs is None:
        return []
    from analysis.derive import budget_violations

    found = budget_violations(exp.runs)
    if found.empty:
        return []
    where = cells.set_index("id")[["setting", "method"]]
    found = found[found["run"].isin(where.index)]
    lines = ["| Setting | Method | Cells | Clients over budget | Example |",
             "|:---|:---|---:|:---|:---|"]
    found = found.assign(setting=found["run"].map(where["setting"]),
                         method=found["run"].map(where["method"]))
    for (setting, method), part in found.groupby(["setting", "method"], sort=False):
        clients = ", ".join(sorted({str(c) for c in part["client"].dropna()}))
        example = str(part["detail"].iloc[0]).replace("|", "\\|")
        lines.append(f"| {setting} | {method} | {part['run'].nunique()} | {clients} "
                     f"| {example} |")
    return lines


def write_experiment_report(exp: ExperimentDir, out: Path, target: float | None = None,
                            baseline: str | None = None, warned: list[str] | None = None
                            ) -> tuple[Path, list[Path]]:
    """Write the report, its CSV tables and figures; returns (report, files written)."""
    out = Path(out)
    if out.is_dir():
        out = out / "report.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    target = resolve_target(exp, target)
    base = resolve_baseline(exp, baseline)
    cells = cell_table(exp, target, base)
    groups = group_table(cells)
    contrast = contrast_table(cells, exp)
    pairwise = pairwise_table(exp, cells, base)
    tables = out.parent / f"{out.stem}_tables"
    tables.mkdir(exist_ok=True)
    written = []
    for name, frame in (("cells", cells), ("methods", groups), ("contrast", contrast),
                        ("pairwise", pairwise)):
        if not frame.empty:
            frame.to_csv(tables / f"{name}.csv", index=False)
            written.append(tables / f"{name}.csv")
    pngs, figures, skipped = plot_experiment(exp, cells, out.parent / f"{out.stem}_figures")
    m = exp.manifest
    stop = m.get("stop") or {}
    rules = ["at most the configured steps"]
    if stop.get("virtual_time"):
        rules.append(f"a virtual-time budget of {stop['virtual_time']:g} s")
    if stop.get("patience"):
        rules.append(f"early stopping after {stop['patience']} evaluations without a PPL "
                     f"improvement of more than {stop.get('min_delta', 0):g}")
    finished = int(cells["finished"].sum())
    lines = [
        f"# Experiment {exp.name}", "",
        f"Generated {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} by `testbed experiment "
        f"report` from `{exp.path}` ({finished} of {len(cells)} cells finished).", "",
    ]
    if m.get("description"):
        lines += [str(m["description"]).strip(), ""]
    lines += [
        f"- Grid: methods {', '.join(m.get('methods') or [])}; profiles "
        f"{', '.join(m.get('profiles') or []) or 'none (plain settings)'}; seeds "
        f"{', '.join(str(s) for s in m.get('seeds') or [])}; overrides "
        f"{', '.join(m.get('overrides') or [])}.",
        f"- Stopping: {'; '.join(rules)}.",
        "- Numbers are mean ± half-width of the 95 % Student-t confidence interval over the "
        "seeds that have the number (n shown when fewer than all); one seed: the value alone.",
        "- Ratios of times are paired by seed (the method's time / the baseline's of the same "
        "seed) and summarised as the geometric mean over seeds [95 % interval]: the t "
        "interval of the log-ratio, exponentiated, so it is asymmetric and the inverse "
        "ratio is exactly its inverse. Verdict: *lower* / *higher* when the 95 % interval "
        "excludes 0 (a difference) or 1 (a ratio), else *no difference detected*; one seed "
        "has no interval.",
        "- Target PPL per setting: " + (f"{target:.4g} (given)" if target is not None else
                                        "the largest final PPL of its finished cells that "
                                        "ended below their pretrained PPL (every such cell "
                                        "reaches it)") + "; time to target is the first "
        "evaluation after training began at or below it. Fixed target per setting: the "
        "loosest of the methods' best PPLs (the largest over methods of each one's lowest "
        "PPL after training began, over its finished seeds), which every method reaches in "
        "at least one seed.",
        "- Trainable parameters: per client (mean over clients) and on the server, from "
        "summary.json; MB moved: activations, gradients, adapters and handed-over blocks "
        "(10^6 bytes); budget violations: `budget_violation` events per cell (a "
        "configuration the memory model predicts above a device's budget).",
        "",
    ]
    for setting in dict.fromkeys(cells["setting"]):
        g = groups[groups["setting"] == setting]
        tgt = g["target_ppl"].iloc[0]
        fixed = g["fixed_target_ppl"].iloc[0]
        lines += [f"## Setting {setting}", "",
                  (f"Target PPL {tgt:.4g}" + (f"; fixed target PPL {fixed:.4g}"
                                              if finite(fixed) else "") + ".")
                  if finite(tgt) else "No evaluation yet.", "",
                  *methods_markdown(g), ""]
        speedups = speedup_markdown(g, base)
        if speedups:
            lines += [f"Time to target against {base}, paired by seed (the method's time / "
                      f"{base}'s; < 1: the method reaches the target sooner, verdict *lower*):",
                      "", *speedups, ""]
        pairs = pairwise_markdown(pairwise[pairwise["setting"] == setting]) \
            if not pairwise.empty else []
        if pairs:
            lines += [f"Against {base}, paired by seed: the final PPL difference, and the "
                      "time to the PPL both reach (per seed the target is the worse of the two "
                      f"final PPLs; the method's time / {base}'s, > 1: {base} is faster, "
                      "verdict *higher*):", "",
                      *pairs, ""]
        lines += ["Configuration under the budgets:", "", *config_markdown(g), ""]
    if not contrast.empty:
        c0 = contrast.iloc[0]
        lines += [f"## PPL rise from {c0['from']} to {c0['to']}", "",
                  "Final PPL on the second profile minus the first, paired by seed.", "",
                  "| Method | Override | PPL " + str(c0["from"]) + " | PPL " + str(c0["to"])
                  + " | Rise | Verdict |", "|:---|:---|---:|---:|---:|:---|"]
        for _, r in contrast.iterrows():
            rise = _mean_ci(r, "rise")
            lines.append(f"| {r['method']} | {r['override']} | {_num(r['from_mean'], '.3f')} "
                         f"| {_num(r['to_mean'], '.3f')} | {fmt_ci(rise, '+.3f')} "
                         f"| {verdict(rise)} |")
        lines.append("")
    over = violations_markdown(exp, cells)
    if over:
        lines += ["## Budget violations", "",
                  "Configurations the memory model predicts above a device's budget; the "
                  "run goes on (an emulation) and the violation is reported here.", "",
                  *over, ""]
    lines += ["## Cells", "", *cells_markdown(cells), ""]
    notes = list(warned or [])
    notes += [f"`{c['id']}` has not finished (killed, failed or running): its numbers are "
              "left out of the means." for _, c in cells.iterrows()
              if c["started"] and not c["finished"]]
    if notes:
        lines += ["## Caveats", "", *[f"- {n}" for n in notes], ""]
    lines += ["## Figures", ""]
    for stem, png in pngs.items():
        rel = png.relative_to(out.parent).as_posix()
        lines += [f"![{stem}]({rel})", "", f"[PDF]({Path(rel).with_suffix('.pdf').as_posix()})",
                  ""]
    if skipped:
        lines += ["Not drawn: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()) + ".", ""]
    lines += [f"Tables as CSV: `{tables.relative_to(out.parent).as_posix()}/`.", ""]
    out.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return out, [*written, *figures]


__all__ = ["cells_markdown", "config_markdown", "methods_markdown", "pairwise_markdown",
           "speedup_markdown", "write_experiment_report"]

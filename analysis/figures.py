"""Figures of one or many runs, written as PNG (screens, the report) and PDF (papers).

Why these choices:

- Figures are built on :class:`matplotlib.figure.Figure` with an Agg canvas, never through
  ``pyplot``: no global state, no GUI backend, nothing leaks between figures in a long
  command, and a notebook can still display the returned figure.
- Readable in print: 11-12 pt text at the saved size, TrueType fonts in the PDF, and every
  run differs by colour (Okabe-Ito, colour-blind safe) *and* by marker and line style, so
  a grey-scale print keeps the runs apart. Offline periods are grey *and* hatched.
- A figure whose data are absent (no ``virtual_time``, no ``memory_bytes``) is skipped with
  a reason, not drawn empty: an empty axis in a report reads as "measured zero".
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib as mpl
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from analysis import derive
from analysis.load import RunSet, finite
from runner.errors import UserError

COLORS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000",
          "#F0E442")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", "-.", ":")
TRAIN_COLOR = "#009E73"
OFFLINE_COLOR = "#BBBBBB"
AGG_COLOR = "#1F3A93"
VIOLATION_COLOR = "#C00000"
FIT_COLOR = "#0072B2"
OVER_COLOR = "#D55E00"
PLANNED_COLOR = "#56B4E9"
STYLE: dict[str, Any] = {
    "font.size": 11,
    "axes.labelsize": 12,
    "axes.titlesize": 12,
    "legend.fontsize": 10,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "lines.linewidth": 1.8,
    "lines.markersize": 6,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "pdf.fonttype": 42,  # TrueType: text stays text in the PDF (search, journal checks)
    "ps.fonttype": 42,
    "savefig.bbox": "tight",
    "savefig.dpi": 150,
    "hatch.linewidth": 0.8,
}
# x choice -> (evals column, axis label with unit, file stem, title noun)
PPL_AXES = {
    "step": ("step", "training step", "ppl_vs_step", "training step"),
    "wall": ("train_time_s", "wall time since training start (s)", "ppl_vs_wall_time",
             "wall time"),
    "virtual": ("virtual_time", "virtual (emulated) time (s)", "ppl_vs_virtual_time",
                "virtual time"),
}


@contextmanager
def style() -> Iterator[None]:
    """Our rcParams for the figures built inside, without touching the caller's."""
    with mpl.rc_context(STYLE):
        yield


def new_figure(width: float = 6.4, height: float = 4.0, **subplots: Any) -> tuple[Figure, Any]:
    """A Figure on an Agg canvas and its axes (``Figure.subplots`` arguments)."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(**subplots)


def run_styles(rs: RunSet) -> dict[str, dict[str, Any]]:
    """Per run: colour, marker, line style, label; fixed by run order, so every figure of
    one command shows a run the same way."""
    return {name: {"color": COLORS[i % len(COLORS)], "marker": MARKERS[i % len(MARKERS)],
                   "linestyle": LINESTYLES[i % len(LINESTYLES)], "label": rs.labels[name]}
            for i, name in enumerate(rs.names)}


def _bar_labels(ax: Any, labels: list[str]) -> None:
    """Category labels under bars, slanted when long so they never overlap."""
    ax.set_xticks(range(len(labels)))
    long = max((len(x) for x in labels), default=0) > 12 or len(labels) > 4
    ax.set_xticklabels(labels, rotation=25 if long else 0, ha="right" if long else "center")
    ax.grid(axis="x", visible=False)


def fig_ppl(rs: RunSet, x: str = "step", target: float | None = None) -> Figure | None:
    """Validation PPL against ``x``: "step", "wall" (s since training start) or "virtual".

    One line per run; the target PPL (if given) as a dashed line. None when no evaluation
    record has the x value (e.g. no ``virtual_time``).
    """
    col, xlabel, _, noun = PPL_AXES[x]
    ev = derive.evals(rs).dropna(subset=[col, "val_ppl"])
    if ev.empty:
        return None
    with style():
        fig, ax = new_figure()
        for name, st in run_styles(rs).items():
            mine = ev[ev["run"] == name]
            if mine.empty:
                continue
            ax.plot(mine[col], mine["val_ppl"], color=st["color"], marker=st["marker"],
                    linestyle=st["linestyle"], label=st["label"], markevery=_markevery(len(mine)))
        if target is not None:
            ax.axhline(target, color="#444444", linestyle=(0, (4, 3)), linewidth=1.2,
                       label=f"target PPL {target:.4g}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation perplexity (PPL)")
        ax.set_xlim(left=0)
        ax.set_title(f"Validation perplexity vs {noun}")
        ax.legend(frameon=False)
    return fig


def _markevery(n: int) -> int:
    """Markers on at most ~15 points: dense markers turn a line into a smear."""
    return max(1, n // 15)


def fig_speedup(rs: RunSet, target: float, baseline: str) -> Figure | None:
    """Speed-up to reach ``target`` PPL vs the ``baseline`` method, by steps and wall time
    (and virtual time when recorded): ``baseline time / run time``, higher is faster."""
    sp = derive.speedups(rs, target, baseline)
    measures = [("speedup_steps", "training steps"), ("speedup_wall", "wall time")]
    if sp["virtual_s"].notna().any():
        measures.append(("speedup_virtual", "virtual time"))
    styles = run_styles(rs)
    hatches = ("", "//", "..")
    with style():
        fig, ax = new_figure(max(6.4, 1.2 + 1.1 * len(sp) * len(measures) / 2), 4.2)
        width = 0.8 / len(measures)
        top = np.nanmax(sp[[m for m, _ in measures]].to_numpy(dtype=float), initial=1.0)
        for j, (col, what) in enumerate(measures):
            xs = np.arange(len(sp)) + (j - (len(measures) - 1) / 2) * width
            values = sp[col].to_numpy(dtype=float)
            colors = [styles[n]["color"] for n in sp["run"]]
            ax.bar(xs, np.nan_to_num(values), width * 0.95, color=colors, hatch=hatches[j],
                   edgecolor="white" if not hatches[j] else "#333333", linewidth=0.6,
                   label=f"by {what}")
            for xv, v, reached in zip(xs, values, sp["reached"], strict=True):
                text = f"{v:.2f}×" if finite(v) else ("not reached" if not reached else "n/a")
                ax.text(xv, (v if finite(v) else 0) + top * 0.02, text, ha="center",
                        va="bottom", fontsize=9, rotation=90 if not finite(v) else 0)
        ax.axhline(1.0, color="#444444", linewidth=1.0, linestyle=(0, (4, 3)))
        _bar_labels(ax, list(sp["label"]))
        ax.set_ylim(0, top * 1.25)
        ax.set_ylabel(f"speed-up vs {baseline} (×)")
        ax.set_title(f"Time to reach validation PPL ≤ {target:.4g} (higher is faster)")
        legend = [Patch(facecolor="white", edgecolor="#333333", hatch=hatches[j],
                        label=f"by {what}") for j, (_, what) in enumerate(measures)]
        ax.legend(handles=legend, frameon=False, loc="upper left", ncols=len(measures))
    return fig


def fig_bytes(rs: RunSet) -> Figure | None:
    """Data moved per run in MB: activations + gradients (train records), adapter traffic
    (aggregate records) and, when a run re-split or probed, the frozen blocks handed to
    clients and the importance probes' traffic."""
    moved = derive.bytes_moved(rs)
    if moved.empty:
        return None
    styles = run_styles(rs)
    parts = [("train_bytes", "activations + gradients (training)", None),
             ("aggregate_bytes", "adapters (aggregation)", "//"),
             ("handover_bytes", "frozen blocks handed over (re-split)", "xx"),
             ("probe_bytes", "importance probes (IWI)", "..")]
    parts = [p for p in parts if p[0] in ("train_bytes", "aggregate_bytes")
             or moved[p[0]].sum() > 0]
    with style():
        fig, ax = new_figure(max(6.4, 1.5 + 0.9 * len(moved)), 4.0)
        xs = np.arange(len(moved))
        colors = [styles[n]["color"] for n in moved["run"]]
        bottom = np.zeros(len(moved))
        handles = []
        for col, what, hatch in parts:
            values = moved[col].to_numpy(dtype=float) / derive.MB
            if hatch is None:
                ax.bar(xs, values, 0.6, color=colors, edgecolor="#333333", linewidth=0.6)
                handles.append(Patch(facecolor="#888888", edgecolor="#333333", label=what))
            else:
                ax.bar(xs, values, 0.6, bottom=bottom, color="white", edgecolor=colors,
                       hatch=hatch, linewidth=1.0)
                handles.append(Patch(facecolor="white", edgecolor="#333333", hatch=hatch,
                                     label=what))
            bottom += values
        for xv, t in zip(xs, bottom, strict=True):
            ax.text(xv, t + max(bottom.max(), 1e-9) * 0.02, _megabytes(t), ha="center",
                    va="bottom", fontsize=10)
        _bar_labels(ax, list(moved["label"]))
        ax.set_ylim(0, max(bottom.max(), 1e-3) * 1.18)
        ax.set_ylabel("data moved, sent + received (MB)")
        ax.set_title("Communication per run (1 MB = 10⁶ bytes)")
        fig.legend(handles=handles, frameon=False, loc="outside lower center",
                   ncols=min(len(handles), 2))
    return fig


def _megabytes(value: float) -> str:
    """MB with about three significant digits, and a plain 0 for no traffic at all."""
    if value == 0:
        return "0 MB"
    digits = 0 if value >= 100 else 1 if value >= 10 else 2 if value >= 1 else None
    return f"{value:.{digits}f} MB" if digits is not None else f"{value:.3g} MB"


def fig_timeline(rs: RunSet, run: str) -> Figure | None:
    """Per-client lanes of one run: training steps, offline periods, rejoins, aggregations
    and budget violations; below, when the run records them per client, each client's
    split point and total LoRA rank as step lines (HSplitLoRA's reconfigurations)."""
    clients = derive.clients(rs, run)
    if not clients:
        return None
    trained = derive.trained_intervals(rs, run)
    offline = derive.offline_intervals(rs)
    offline = offline[offline["run"] == run]
    violations = derive.budget_violations(rs)
    violations = violations[(violations["run"] == run) & violations["client"].isin(clients)]
    panels = [(derive.split_points(rs, run), "split", "split point k\n(blocks on client)"),
              (derive.rank_sums(rs, run), "rank_sum", "LoRA rank sum\n(client side)")]
    panels = [p for p in panels if not p[0].empty]
    steps = derive.run_steps(rs, run)
    layers = rs.run(run).config.get("num_layers")
    events = rs.events
    aggs: list[float] = []
    if not events.empty:
        mine = events[(events["run"] == run) & (events["event"] == "aggregate")]
        aggs = [float(s) + 1 for s in mine["step"].dropna()]
    lanes = len(clients)
    with style():
        height = 1.5 + 0.5 * lanes + 1.8 * len(panels)
        fig, axes = new_figure(7.2, height, nrows=1 + len(panels), sharex=True, squeeze=False,
                               gridspec_kw={"height_ratios": [max(lanes, 2) * 0.6]
                                            + [1.8] * len(panels)})
        ax = axes[0][0]
        for i, client in enumerate(clients):
            bars = [(a, b - a) for a, b in trained.get(client, [])]
            ax.broken_barh(bars, (i - 0.3, 0.6), facecolors=TRAIN_COLOR, edgecolor="none")
            for _, off in offline[offline["client"] == client].iterrows():
                ax.broken_barh([(off["start_step"], off["end_step"] - off["start_step"])],
                               (i - 0.45, 0.9), facecolors=OFFLINE_COLOR, hatch="///",
                               edgecolor="#555555", linewidth=0.8)
                if off["rejoined"]:
                    ax.plot([off["end_step"]], [i], marker=">", color="black", markersize=9,
                            linestyle="none", zorder=5)
        if aggs:
            # On top of the bars: an aggregation that falls inside a training stretch must show.
            ax.vlines(aggs, -0.5, lanes - 0.5, colors=AGG_COLOR, linestyles=(0, (1, 1.5)),
                      linewidth=1.4, zorder=4)
        if not violations.empty:
            ys = [clients.index(c) - 0.3 for c in violations["client"]]
            ax.plot(violations["step"], ys, marker="X", color=VIOLATION_COLOR,
                    markeredgecolor="white", markersize=8, linestyle="none", zorder=6,
                    clip_on=False)
        ax.set_yticks(range(lanes))
        ax.set_yticklabels(clients)
        ax.set_ylim(lanes - 0.5, -0.5)  # first client on top
        ax.set_xlim(0, max(steps, 1))
        ax.grid(axis="y", visible=False)
        ax.set_ylabel("client")
        static_k = None if any(c == "split" for _, c, _ in panels) else derive.static_split(
            rs, run)
        ax.set_title(_timeline_title(rs, run, static_k, layers))
        handles: list[Any] = [Patch(facecolor=TRAIN_COLOR, label="training")]
        if not offline.empty:
            handles.append(Patch(facecolor=OFFLINE_COLOR, hatch="///", edgecolor="#555555",
                                 label="offline"))
        if not offline.empty and offline["rejoined"].any():
            handles.append(Line2D([], [], marker=">", color="black", linestyle="none",
                                  markersize=9, label="rejoin (resync)"))
        if aggs:
            handles.append(Line2D([], [], color=AGG_COLOR, linestyle=(0, (1, 1.5)),
                                  linewidth=1.4, label="aggregation"))
        if not violations.empty:
            handles.append(Line2D([], [], marker="X", color=VIOLATION_COLOR, linestyle="none",
                                  markersize=8, label="over memory budget"))
        fig.legend(handles=handles, frameon=False, loc="outside lower center",
                   ncols=min(len(handles), 3 if len(handles) > 4 else 4))
        for (series, column, ylabel), pax in zip(panels, axes[1:, 0], strict=True):
            _client_steps(pax, series, column, clients, steps)
            pax.set_ylabel(ylabel)
            if column == "split":
                pax.set_ylim(0, int(layers or series[column].max()) + 0.5)
            else:
                # Start a little below 0 so a tiny rank (e.g. 4 of 250) is not on the spine.
                top = float(series[column].max())
                pax.set_ylim(-0.05 * top - 0.5, top * 1.12 + 1)
        axes[-1][0].set_xlabel("training step")
        if panels:
            axes[1][0].legend(frameon=False, ncols=min(lanes, 4), loc="lower right",
                              fontsize=9)
    return fig


def _client_steps(ax: Any, series: Any, column: str, clients: list[str], steps: int) -> None:
    """One post-step line per client of ``series[column]`` over steps, held to the end."""
    for j, client in enumerate(clients):
        part = series[series["client"] == client]
        if part.empty:
            continue
        xs = [*part["step"], steps]
        ys = [*part[column], part[column].iloc[-1]]
        # A small vertical offset per client keeps equal values apart (lines would hide).
        scale = 0.04 if column == "split" else 0.01 * max(float(series[column].max()), 1.0)
        offset = (j - 0.5 * (len(clients) - 1)) * scale
        ax.step(xs, np.asarray(ys, dtype=float) + offset, where="post",
                color=COLORS[j % len(COLORS)], linestyle=LINESTYLES[j % len(LINESTYLES)],
                label=client)
    ax.yaxis.get_major_locator().set_params(integer=True)


def _timeline_title(rs: RunSet, run: str, k: int | None, layers: Any) -> str:
    """"method [run]: client activity, split point k=.. of L blocks" (parts that apply)."""
    label = rs.labels[run]
    who = label if label == run or label.endswith(f"({run})") else f"{label} [{run}]"
    where = ""
    if k is not None and finite(layers):
        where = (f", split point k={k} of {layers} blocks" if k < int(layers)
                 else f", whole model ({layers} blocks) on each client")
    return f"{who}: client activity{where}"


def memory_bars(rs: RunSet) -> list[dict[str, Any]]:
    """What :func:`fig_memory` draws, per run panel: participants in order and, per
    participant, measured peak, planned peak and budget in MiB (NaN = none), whether the
    measured (else planned) peak is over its budget (``over``) and whether the plan is over
    the budget it was made for (``planned_over``). Kept apart so tests check the figure's
    data without reading pixels."""
    mem = derive.memory(rs)
    panels = []
    for run in dict.fromkeys(mem["run"]):
        part = mem[mem["run"] == run]
        mib = {k: part[f"{k}_bytes"].to_numpy(dtype=float) / derive.MIB
               for k in ("measured", "planned", "budget")}
        over = part["peak_bytes"].to_numpy(dtype=float) / derive.MIB > mib["budget"]
        planned_over = (part["planned_bytes"].to_numpy(dtype=float)
                        > part["planned_budget_bytes"].to_numpy(dtype=float))
        panels.append({"run": run, "label": rs.labels[run], "clients": list(part["client"]),
                       **mib, "over": over, "planned_over": planned_over,
                       "sources": sorted({s for s in part["memory_source"] if s})})
    return panels


def fig_memory(rs: RunSet) -> Figure | None:
    """Measured peak, planned peak and budget per client (MiB), side by side, one panel per
    run that records memory: the measured peak (docs/run-format.md "Measured resources") and
    the memory model's plan (``reconfigure`` events) as paired bars, the budget as a black
    line across the pair. A peak over budget is vermilion and cross-hatched, and the
    measured (else planned) bar is labelled "used / budget" because a 1 % overrun is
    invisible as a height. None when no run records memory."""
    panels = memory_bars(rs)
    if not panels:
        return None
    with style():
        n = sum(len(p["clients"]) for p in panels)
        width = max(6.4, 1.0 + 0.6 * len(panels) + 1.1 * n)
        fig, axes = new_figure(width, 4.4, ncols=len(panels), sharey=True, squeeze=False)
        top = max(float(np.nanmax(np.r_[p["measured"], p["planned"], p["budget"], 0.0]))
                  for p in panels)
        for ax, p in zip(axes[0], panels, strict=True):
            xs = np.arange(len(p["clients"]))
            both = np.isfinite(p["measured"]).any() and np.isfinite(p["planned"]).any()
            w = 0.36 if both else 0.6
            dx = w / 2 if both else 0.0
            measured_over = p["over"] & np.isfinite(p["measured"])
            planned_over = p["planned_over"]
            if np.isfinite(p["measured"]).any():
                ax.bar(xs - dx, np.nan_to_num(p["measured"]), w,
                       color=[OVER_COLOR if o else FIT_COLOR for o in measured_over],
                       hatch=["xx" if o else "" for o in measured_over], edgecolor="white",
                       linewidth=0)
            if np.isfinite(p["planned"]).any():
                ax.bar(xs + dx, np.nan_to_num(p["planned"]), w, color=PLANNED_COLOR,
                       hatch=["xx" if o else "//" for o in planned_over],
                       edgecolor=[OVER_COLOR if o else "white" for o in planned_over],
                       linewidth=0)
            half = (2 * w if both else w) / 2 + 0.05
            ax.hlines(p["budget"], xs - half, xs + half, colors="black", linewidth=2.2)
            many = len(xs) > 5
            for xv, u, pl, b in zip(xs, p["measured"], p["planned"], p["budget"], strict=True):
                used = u if finite(u) else pl
                if not finite(used):
                    continue
                text = f"{used:.0f} / {b:.0f}" if finite(b) else f"{used:.0f}"
                height = max(v for v in (u, pl, b, 0.0) if finite(v))
                ax.text(xv, height + top * 0.02, text, ha="center", va="bottom",
                        fontsize=8 if many else 9, rotation=90 if many else 0)
            _bar_labels(ax, p["clients"])
            how = []
            if np.isfinite(p["measured"]).any():
                how.append("measured" + (f": {', '.join(p['sources'])}" if p["sources"]
                                         else ""))
            if np.isfinite(p["planned"]).any():
                how.append("planned by the memory model")
            ax.set_title(f"{p['label']}\n({'; '.join(how)})", fontsize=11)
            ax.set_ylim(0, top * (1.3 if many else 1.18))
        axes[0][0].set_ylabel("peak memory (MiB)")
        fig.legend(handles=[
            Patch(facecolor=FIT_COLOR, label="measured peak"),
            Patch(facecolor=PLANNED_COLOR, hatch="//", edgecolor="white", label="planned"),
            Patch(facecolor=OVER_COLOR, hatch="xx", edgecolor="white", label="over budget"),
            Line2D([], [], color="black", linewidth=2.2, label="budget"),
            Patch(facecolor="none", edgecolor="none", label="labels: peak / budget (MiB)")],
            frameon=False, loc="outside lower center", ncols=5, fontsize=9)
    return fig


def _slug(text: str) -> str:
    """A file-name-safe version of a run name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "run"


def save(fig: Figure, out_dir: Path, stem: str) -> list[Path]:
    """Write ``stem.png`` and ``stem.pdf``; returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    with style():
        for ext in ("png", "pdf"):
            path = out_dir / f"{stem}.{ext}"
            fig.savefig(path)
            paths.append(path)
    return paths


@dataclass
class Plotted:
    """What :func:`plot_all` wrote, figure by figure, and what it skipped and why."""

    files: list[Path] = field(default_factory=list)
    figures: dict[str, Path] = field(default_factory=dict)  # stem -> PNG
    captions: dict[str, str] = field(default_factory=dict)  # stem -> one-line caption
    skipped: dict[str, str] = field(default_factory=dict)  # figure -> reason
    target: float = float("nan")
    baseline: str = ""


def plot_all(rs: RunSet, out_dir: Path, target: float | None = None,
             baseline: str | None = None) -> Plotted:
    """Every figure for these runs into ``out_dir`` (PNG + PDF each).

    ``target`` defaults to :func:`derive.default_target`, ``baseline`` to the first run's
    method. Figures without data are listed in ``skipped`` with the reason.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} is a file; pass a directory for the figures (-o DIR)")
    target = derive.resolve_target(rs, target)
    baseline = derive.resolve_baseline(rs, baseline)
    done = Plotted(target=target, baseline=baseline)

    def keep(stem: str, fig: Figure | None, caption: str, reason: str) -> None:
        if fig is None:
            done.skipped[stem] = reason
            return
        paths = save(fig, out_dir, stem)
        done.files.extend(paths)
        done.figures[stem] = paths[0]
        done.captions[stem] = caption

    for x, (_, xlabel, stem, _) in PPL_AXES.items():
        keep(stem, fig_ppl(rs, x, target), f"Validation perplexity vs {xlabel}.",
             "no evaluation record has virtual_time" if x == "virtual"
             else "no evaluation record yet")
    keep("speedup", fig_speedup(rs, target, baseline),
         f"Speed-up in reaching validation PPL ≤ {target:.4g}, relative to {baseline}.",
         "no run")
    for name in rs.names:
        keep(f"timeline_{_slug(name)}", fig_timeline(rs, name),
             f"Client activity of {rs.labels[name]}: training, offline periods, rejoins.",
             f"run {name} has no client records")
    keep("memory", fig_memory(rs),
         "Peak memory per client: measured, planned and budget.",
         "no record or reconfigure event carries memory_bytes")
    keep("bytes_moved", fig_bytes(rs), "Data moved per run, training and aggregation.",
         "no run")
    return done

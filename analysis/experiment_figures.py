"""Figures of an experiment: validation PPL vs step / virtual time / wall time per setting,
each method as its mean over seeds with a 95 % interval band, each seed a thin line.

Why both band and seeds: a band alone hides whether one odd seed makes it wide, the seeds
alone make the eye average by guesswork. The styling (colour-blind-safe colours plus line
styles, PNG + PDF, no pyplot) is analysis/figures.py's.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.experiment import ExperimentDir, bands
from analysis.figures import COLORS, LINESTYLES, new_figure, save, style

AXES = {  # x -> (evals column, axis label, file stem part, title noun)
    "step": ("step", "training step", "step", "step"),
    "virtual": ("virtual_time", "virtual (emulated) time (s)", "virtual_time", "virtual time"),
    "wall": ("train_time_s", "wall time since training start (s)", "wall_time", "wall time"),
}


def fig_bands(exp: ExperimentDir, cells: pd.DataFrame, setting: str, x: str,
              target: float | None = None, fixed_target: float | None = None
              ) -> Figure | None:
    """Mean PPL with its band per method against ``x``, the setting's target and the fixed
    target (analysis/experiment.py ``fixed_targets``) as horizontal lines; None when no cell
    has that x (e.g. no virtual clock)."""
    col, label, _, noun = AXES[x]
    curves = bands(exp, cells, setting, col)
    if not curves:
        return None
    methods = list(dict.fromkeys(cells["method"]))
    with style():
        fig, ax = new_figure(6.8, 4.2)
        for band in curves:
            i = methods.index(band.method)
            color, ls = COLORS[i % len(COLORS)], LINESTYLES[i % len(LINESTYLES)]
            for xs, ys in band.seeds.values():
                ax.plot(xs, ys, color=color, linewidth=0.7, alpha=0.45, linestyle="-")
            n = len(band.seeds)
            ax.plot(band.x, band.mean, color=color, linestyle=ls, linewidth=2.0,
                    label=f"{band.method} (mean of {n} seed{'s' if n != 1 else ''})")
            ok = np.isfinite(band.half)
            if ok.any():
                ax.fill_between(band.x[ok], (band.mean - band.half)[ok],
                                (band.mean + band.half)[ok], color=color, alpha=0.18,
                                linewidth=0)
        if target is not None and np.isfinite(target):
            ax.axhline(target, color="#444444", linestyle=(0, (4, 3)), linewidth=1.1,
                       label=f"target PPL {target:.4g}")
        if fixed_target is not None and np.isfinite(fixed_target) and fixed_target != target:
            ax.axhline(fixed_target, color="#444444", linestyle=(0, (1, 2)), linewidth=1.1,
                       label=f"fixed target PPL {fixed_target:.4g}")
        ax.set_xlabel(label)
        ax.set_ylabel("validation perplexity (PPL)")
        ax.set_xlim(left=0)
        ax.set_title(f"{exp.name} [{setting}]: PPL vs {noun}, mean ± 95 % CI, thin: seeds",
                     fontsize=11)
        ax.legend(frameon=False, fontsize=9)
    return fig


def slug(text: str) -> str:
    """A file-name-safe version of a setting name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "all"


def plot_experiment(exp: ExperimentDir, cells: pd.DataFrame, out_dir: Path
                    ) -> tuple[dict[str, Path], list[Path], dict[str, str]]:
    """Every figure: (stem -> PNG for the report, every file written, skipped -> reason)."""
    pngs: dict[str, Path] = {}
    files: list[Path] = []
    skipped: dict[str, str] = {}
    for setting in dict.fromkeys(cells["setting"]):
        mine = cells.loc[cells["setting"] == setting]
        target = float(mine["target_ppl"].iloc[0])
        fixed = (float(mine["fixed_target_ppl"].iloc[0]) if "fixed_target_ppl" in mine.columns
                 else None)
        for x, (_, _, part, _) in AXES.items():
            stem = f"ppl_vs_{part}_{slug(setting)}"
            fig = fig_bands(exp, cells, setting, x, target, fixed)
            if fig is None:
                skipped[stem] = ("no cell records virtual time" if x == "virtual"
                                 else "no evaluation yet")
                continue
            written = save(fig, out_dir, stem)
            files += written
            pngs[stem] = written[0]
    return pngs, files, skipped


__all__ = ["AXES", "fig_bands", "plot_experiment", "slug"]

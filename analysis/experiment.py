"""An experiment directory (``testbed experiment run``) as tables: per cell and per method
over seeds (mean and 95 % Student-t interval, analysis/seeds.py), curves with bands.

Reads only the compact per-cell files (:data:`COMPACT_FILES`: the manifest, and each cell's
config, metrics, events, summary and scores), never adapters or weights, so a committed
copy of them (``testbed experiment pack``) regenerates every table and figure on a fresh
clone. Like the rest of ``analysis``, it imports nothing that loads torch.

Definitions (docs/experiments.md):

* a *setting* is a (profile, override) pair; seeds of one method in one setting are
  aggregated, methods are compared within a setting;
* final / best val PPL: the last / lowest evaluation of a cell;
* time to target: the first evaluation at or below the target PPL (no interpolation, the
  evaluation cadence is the resolution), in steps, virtual seconds (the emulated devices'
  clock) and wall seconds since training began; the pretrained evaluation (step 0) never
  counts, since nothing has trained yet; the default target of a setting is the largest
  final PPL of its finished cells that ended below their pretrained PPL, so every cell that
  learned reaches it (a cell that ended at or above its start would otherwise set a target
  the pretrained model already meets, and every time to target would be 0);
* the fixed target of a setting (:func:`fixed_targets`): the loosest of the methods' best
  PPLs, i.e. the largest over methods of each method's lowest validation PPL after training
  began, over all its finished seeds; every method reaches it (in at least the seed that
  set its best), so time to it is defined for every method, whatever --target-ppl says;
* speed-ups are paired by seed: baseline time / method time for the same seed, summarised
  as the geometric mean over seeds with its 95 % interval (:func:`analysis.seeds.geo_mean_ci`:
  the t interval of the log-ratio, exponentiated), so the method's time / the baseline's is
  exactly the inverse, interval ends swapped (an arithmetic mean of ratios is not);
  differences (PPL) keep the arithmetic mean and its interval; every comparison also gets
  a verdict from its interval (:func:`analysis.seeds.verdict`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis import derive
from analysis.load import RunSet, finite, load_run
from analysis.seeds import geo_mean_ci, mean_ci, verdict
from runner.errors import UserError

MANIFEST = "experiment.json"
SOURCE = "experiment.yaml"
# What the report reads, relative to a cell directory (and the experiment's own files).
COMPACT_FILES = ("config.json", "metrics.jsonl", "events.jsonl", "summary.json",
                 "eval/scores.json", "cell.json", "result.json")
EXPERIMENT_FILES = (MANIFEST, SOURCE)
SCORES = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr", "SER")  # SER: slot error rate, %
# Per-cell numbers aggregated over seeds by their arithmetic mean (columns of cell_table).
AGGREGATED = ("final_val_ppl", "best_val_ppl", "steps_done", "virtual_time_s", "wall_time_s",
              "ttt_steps", "ttt_virtual_s", "ttt_wall_s", "fixed_ttt_steps",
              "fixed_ttt_virtual_s", "fixed_ttt_wall_s",
              "client_trainable_params", "server_trainable_params", "bytes_mb",
              "budget_violations", *SCORES)
# Per-cell ratios of times, aggregated by their geometric mean (analysis.seeds.geo_mean_ci):
# the baseline's time / the cell's, to the setting's target and to the fixed target.
RATIOS = ("speedup_virtual", "speedup_wall", "fixed_speedup_virtual", "fixed_speedup_wall")


@dataclass
class ExperimentDir:
    """An experiment directory as read from disk."""

    path: Path
    manifest: dict[str, Any]
    cells: pd.DataFrame  # the manifest's grid: id, method, profile, override, seed, dir
    runs: RunSet | None  # cells that have a config.json (started at least once)
    warnings: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return str(self.manifest.get("name") or self.path.name)

    @property
    def methods(self) -> list[str]:
        return list(self.manifest.get("methods") or self.cells["method"].unique())


def load_experiment_dir(path: str | Path) -> ExperimentDir:
    """Read the manifest and every cell that started.

    Raises:
        UserError: not an experiment directory, or no cell has started yet.
    """
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise UserError(f"{path} is not an experiment directory (no {MANIFEST}); pass the "
                        "--out of `testbed experiment run`")
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError as exc:
        raise UserError(f"{manifest_path} is not valid JSON ({exc})") from None
    cells = pd.DataFrame(manifest.get("cells") or [],
                         columns=["id", "method", "profile", "override", "seed", "dir"])
    if cells.empty:
        raise UserError(f"{manifest_path} lists no cells")
    cells["profile"] = cells["profile"].fillna("-")
    started = [r for r in cells.itertuples() if (path / r.dir / "config.json").is_file()]
    runs = RunSet([load_run(path / r.dir, r.id) for r in started]) if started else None
    return ExperimentDir(path, manifest, cells, runs)


def setting_name(profile: str, override: str, exp: ExperimentDir) -> str:
    """A setting's name in tables and figure files: the profile and/or the override, the
    parts that vary in this experiment (``all`` when neither does)."""
    parts = []
    if exp.manifest.get("profiles"):
        parts.append(profile)
    if len(exp.manifest.get("overrides") or []) > 1:
        parts.append(override)
    return "/".join(parts) or "all"


def _evals(exp: ExperimentDir) -> pd.DataFrame:
    if exp.runs is None:
        return pd.DataFrame(columns=["run", "step", "val_ppl", "train_time_s", "virtual_time"])
    return derive.evals(exp.runs)


def cell_table(exp: ExperimentDir, target: float | None = None,
               baseline: str | None = None) -> pd.DataFrame:
    """One row per cell of the grid (unstarted cells too, with NaNs): identity, whether it
    finished, its numbers, time to the setting's target (``ttt_*``) and to its fixed target
    (``fixed_ttt_*``, :func:`fixed_targets`), and the speed-ups vs ``baseline`` to each
    (``speedup_*``, ``fixed_speedup_*``: the baseline's finished cell of the same seed's
    time / this cell's; > 1: this cell is faster)."""
    rows = []
    ev = _evals(exp)
    rs = exp.runs
    moved = derive.bytes_moved(rs).set_index("run") if rs is not None else pd.DataFrame()
    violations = derive.budget_violations(rs) if rs is not None else pd.DataFrame()
    for c in exp.cells.itertuples():
        row: dict[str, Any] = {"id": c.id, "method": c.method, "profile": c.profile,
                               "override": c.override, "seed": int(c.seed),
                               "setting": setting_name(c.profile, c.override, exp)}
        run = next((r for r in rs.runs if r.name == c.id), None) if rs is not None else None
        row["started"] = run is not None
        row["finished"] = bool(run is not None and run.summary is not None)
        mine = ev[ev["run"] == c.id].dropna(subset=["val_ppl"]) if not ev.empty else ev
        row["final_val_ppl"] = float(mine["val_ppl"].iloc[-1]) if len(mine) else np.nan
        first = mine[mine["step"] == 0] if len(mine) else mine
        row["pretrained_val_ppl"] = float(first["val_ppl"].iloc[0]) if len(first) else np.nan
        row["best_val_ppl"] = float(mine["val_ppl"].min()) if len(mine) else np.nan
        trained = mine[mine["step"] > 0] if len(mine) else mine
        row["best_trained_val_ppl"] = (float(trained["val_ppl"].min()) if len(trained)
                                       else np.nan)
        row["steps_done"] = float(mine["step"].iloc[-1]) if len(mine) else np.nan
        vt = mine["virtual_time"].dropna() if len(mine) else pd.Series(dtype=float)
        row["virtual_time_s"] = float(vt.iloc[-1]) if len(vt) else np.nan
        row["wall_time_s"] = float(mine["train_time_s"].iloc[-1]) if len(mine) else np.nan
        summary = run.summary if run is not None and run.summary else {}
        row["stop_reason"] = summary.get("stop_reason", "steps" if summary else "")
        for key in ("client_trainable_params", "server_trainable_params"):
            row[key] = float(summary[key]) if finite(summary.get(key)) else np.nan
        row["bytes_mb"] = (float(moved.at[c.id, "total_mb"]) if c.id in moved.index
                           else np.nan)
        row["budget_violations"] = (float((violations["run"] == c.id).sum())
                                    if run is not None and not violations.empty
                                    else (0.0 if run is not None else np.nan))
        scores = ((run.scores or {}).get("scores") or {}) if run is not None else {}
        for s in SCORES:
            row[s] = float(scores[s]) if finite(scores.get(s)) else np.nan
        fair = ((run.config.get("train") or {}).get("extra") or {}).get("fairness") \
            if run is not None else None
        t = (run.config.get("train") or {}) if run is not None else {}
        row["split"] = (fair or {}).get("split", t.get("split"))
        row["rank"] = (fair or {}).get("rank", t.get("rank"))
        row["fairness"] = (fair or {}).get("rule", "")
        result = _read_result(exp.path / c.dir)  # cost of the cell (result.json)
        for key in ("cpu_s", "peak_rss_bytes", "estimate_bytes"):
            row[key] = float(result[key]) if finite(result.get(key)) else np.nan
        rows.append(row)
    table = pd.DataFrame(rows)
    targets = setting_targets(table, target)
    table["target_ppl"] = table["setting"].map(targets)
    table["fixed_target_ppl"] = table["setting"].map(fixed_targets(table))
    base = resolve_baseline(exp, baseline)
    for prefix, target_col in (("", "target_ppl"), ("fixed_", "fixed_target_ppl")):
        cols = [f"{prefix}ttt_steps", f"{prefix}ttt_virtual_s", f"{prefix}ttt_wall_s"]
        for col in cols:
            table[col] = np.nan
        table[f"{prefix}reached"] = False
        for i, c in table.iterrows():
            hit = first_at(ev, c["id"], c[target_col])
            if hit is not None:
                table.loc[i, cols] = [float(hit["step"]), float(hit["virtual_time"]),
                                      float(hit["train_time_s"])]
                table.loc[i, f"{prefix}reached"] = True
        for kind in ("virtual", "wall"):
            table[f"{prefix}speedup_{kind}"] = _speedups(table, base, f"{prefix}ttt_{kind}_s")
    return table


def _speedups(table: pd.DataFrame, base: str, col: str) -> list[float]:
    """Per cell: the time ``col`` of ``base``'s finished cell of the same setting and seed
    over the cell's own (NaN where either is missing or not positive)."""
    ref = table[(table["method"] == base) & table["finished"]].set_index(["setting", "seed"])[col]
    out = []
    for setting, seed, own in zip(table["setting"], table["seed"], table[col], strict=True):
        theirs = ref.get((setting, seed), np.nan)
        out.append(float(theirs) / float(own) if finite(own) and finite(theirs)
                   and own > 0 and theirs > 0 else np.nan)
    return out


def first_at(ev: pd.DataFrame, cell_id: str, target: float) -> pd.Series | None:
    """A cell's first evaluation after training began at or below ``target`` (the module
    docstring's time to target), None when it never got there."""
    if ev.empty or not finite(target):
        return None
    hit = ev[(ev["run"] == cell_id) & (ev["step"] > 0) & (ev["val_ppl"] <= target)]
    return hit.iloc[0] if len(hit) else None


def _read_result(cell_dir: Path) -> dict[str, Any]:
    """A cell's result.json (state, times, CPU seconds, peak RSS), {} when absent."""
    try:
        data = json.loads((cell_dir / "result.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def setting_targets(table: pd.DataFrame, target: float | None) -> dict[str, float]:
    """Target PPL per setting: ``target`` for all, else the largest final PPL of the
    setting's finished cells that ended below their pretrained PPL (every one of them
    reaches it; a killed cell's partial curve does not set it unless nothing has finished;
    a cell that did not improve does not set it, see the module docstring)."""
    out = {}
    for setting, part in table.groupby("setting", sort=False):
        done = part[part["finished"]]
        pool = done if len(done) else part
        learned = pool[pool["final_val_ppl"] < pool["pretrained_val_ppl"]]
        finals = (learned if len(learned) else pool)["final_val_ppl"].dropna()
        out[str(setting)] = float(target) if target is not None else (
            float(finals.max()) if len(finals) else np.nan)
    return out


def fixed_targets(table: pd.DataFrame) -> dict[str, float]:
    """The fixed target PPL per setting: the loosest of the methods' best PPLs, i.e. the
    largest over methods of each method's lowest validation PPL after training began
    (``best_trained_val_ppl``), over all its finished seeds (all its cells while none of the
    setting has finished); NaN where no cell has a trained evaluation.

    Why: the setting's target (:func:`setting_targets`) must be reached by every cell, so a
    weak method puts it near the pretrained PPL, and a per-pair target
    (:func:`pairwise_table`) differs from pair to pair; this one is one PPL per setting, as
    low as it can be while every method still reaches it (the worst method's best seed, at
    its best evaluation), so time to it is defined for every method. A method's other seeds
    may not reach it: their time is missing, and the count shows it."""
    out = {}
    for setting, part in table.groupby("setting", sort=False):
        done = part[part["finished"]]
        pool = done if len(done) else part
        bests = pool.groupby("method", sort=False)["best_trained_val_ppl"].min().dropna()
        out[str(setting)] = float(bests.max()) if len(bests) else np.nan
    return out


def resolve_baseline(exp: ExperimentDir, baseline: str | None) -> str:
    """``baseline`` (checked), else the experiment file's report.baseline, else the first
    method."""
    methods = exp.methods
    chosen = baseline or (exp.manifest.get("report") or {}).get("baseline") or methods[0]
    if chosen not in methods:
        raise UserError(f"--baseline {chosen} is not a method of this experiment; choose one "
                        f"of {', '.join(methods)}")
    return chosen


def resolve_target(exp: ExperimentDir, target: float | None) -> float | None:
    """``target`` (checked), else the file's report.target_ppl, else None (per setting)."""
    if target is None:
        target = (exp.manifest.get("report") or {}).get("target_ppl")
    if target is not None and (not finite(target) or float(target) <= 0):
        raise UserError(f"--target-ppl must be a positive number, got {target}")
    return None if target is None else float(target)


def group_table(cells: pd.DataFrame) -> pd.DataFrame:
    """Per (setting, method): number of seeds, finished seeds, and for every aggregated
    number (:data:`AGGREGATED`) its mean, interval half-width (``_ci``) and count (``_n``)
    over the seeds that have it, over finished cells only; for every ratio (:data:`RATIOS`)
    its geometric mean (``_gmean``), interval ends (``_low``, ``_high``), count (``_n``) and
    verdict (``_verdict``, :func:`analysis.seeds.verdict`); ``reached`` / ``fixed_reached``
    count the finished seeds that reached the setting's / the fixed target."""
    rows = []
    for (setting, method), part in cells.groupby(["setting", "method"], sort=False):
        row: dict[str, Any] = {"setting": setting, "method": method, "seeds": len(part),
                               "finished": int(part["finished"].sum()),
                               "reached": int((part["reached"] & part["finished"]).sum()),
                               "target_ppl": float(part["target_ppl"].iloc[0]),
                               "fixed_reached": int((part["fixed_reached"]
                                                     & part["finished"]).sum()),
                               "fixed_target_ppl": float(part["fixed_target_ppl"].iloc[0])}
        done = part[part["finished"]]  # a killed or running cell is not a result yet
        for col in AGGREGATED:
            ci = mean_ci(done[col].tolist())
            row[f"{col}_mean"], row[f"{col}_ci"], row[f"{col}_n"] = ci.mean, ci.half, ci.n
        for col in RATIOS:
            _put_ratio(row, col, done[col].tolist())
        for col in ("split", "rank", "fairness"):
            values = [v for v in part[col].tolist() if v is not None and v == v and v != ""]
            row[col] = ", ".join(dict.fromkeys(
                str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)
                for v in values))
        reasons = [r for r in part["stop_reason"].tolist() if isinstance(r, str) and r]
        row["stop_reasons"] = ", ".join(f"{k.replace('_', ' ')} ({reasons.count(k)})"
                                        for k in dict.fromkeys(reasons))
        rows.append(row)
    return pd.DataFrame(rows)


def _put_ratio(row: dict[str, Any], stem: str, values: list[float]) -> None:
    """``stem``'s geometric mean, interval ends, count and verdict into ``row``."""
    g = geo_mean_ci(values)
    row[f"{stem}_gmean"], row[f"{stem}_low"], row[f"{stem}_high"] = g.mean, g.low, g.high
    row[f"{stem}_n"], row[f"{stem}_verdict"] = g.n, verdict(g)


def _put_diff(row: dict[str, Any], stem: str, values: list[float]) -> None:
    """``stem``'s mean, interval half-width, count and verdict into ``row``."""
    ci = mean_ci(values)
    row[f"{stem}_mean"], row[f"{stem}_ci"], row[f"{stem}_n"] = ci.mean, ci.half, ci.n
    row[f"{stem}_verdict"] = verdict(ci)


def pairwise_table(exp: ExperimentDir, cells: pd.DataFrame, base: str) -> pd.DataFrame:
    """Each method against ``base``, paired by seed: the final PPL difference (``ppl_diff``,
    the method's minus ``base``'s: seeds differ in validation set and pretrained PPL more than
    methods do, so the paired difference is the comparison that can be significant), and the
    time to the PPL both reach.

    Why: one target for a whole setting must be one every cell reaches, so with a weak
    method in the grid it sits near the pretrained PPL and every method "converges" at its
    first evaluation. Per pair and seed the target here is the worse of the two final PPLs:
    the better method reaches it on the way, the other at its end (the paper's convergence
    speed-up is such a time to a common accuracy). ``ratio_*`` is the method's time over
    ``base``'s (> 1: ``base`` is faster), in virtual and wall seconds: geometric mean
    (``_gmean``) and interval ends (``_low``, ``_high``) over the seeds where both finished
    (:func:`analysis.seeds.geo_mean_ci`); ``ppl_diff`` has mean and half-width (``_mean``,
    ``_ci``); each has its count (``_n``) and verdict (``_verdict``)."""
    ev = _evals(exp)
    done = cells[cells["finished"]]

    def times(cell_id: str, target: float) -> tuple[float, float]:
        hit = first_at(ev, cell_id, target)
        return (np.nan, np.nan) if hit is None else (float(hit["virtual_time"]),
                                                     float(hit["train_time_s"]))

    rows = []
    for setting, part in done.groupby("setting", sort=False):
        ref = part[part["method"] == base].set_index("seed")
        for method, mine in part[part["method"] != base].groupby("method", sort=False):
            ratios: dict[str, list[float]] = {"virtual": [], "wall": []}
            targets, diffs = [], []
            for c in mine.itertuples():
                if c.seed not in ref.index or not finite(c.final_val_ppl):
                    continue
                b = ref.loc[c.seed]
                target = max(float(c.final_val_ppl), float(b["final_val_ppl"]))
                targets.append(target)
                diffs.append(float(c.final_val_ppl) - float(b["final_val_ppl"]))
                own, theirs = times(c.id, target), times(str(b["id"]), target)
                for i, kind in enumerate(("virtual", "wall")):
                    if finite(own[i]) and finite(theirs[i]) and own[i] > 0 and theirs[i] > 0:
                        ratios[kind].append(own[i] / theirs[i])
            if not targets:
                continue
            row: dict[str, Any] = {"setting": setting, "method": method, "base": base,
                                   "seeds": len(targets),
                                   "target_mean": float(np.mean(targets))}
            _put_diff(row, "ppl_diff", diffs)
            for kind, values in ratios.items():
                _put_ratio(row, f"ratio_{kind}", values)
            rows.append(row)
    return pd.DataFrame(rows)


def contrast_table(cells: pd.DataFrame, exp: ExperimentDir) -> pd.DataFrame:
    """report.contrast [from, to]: per method and override, final PPL(to) - PPL(from) paired
    by seed, with mean, interval and verdict (e.g. the PPL rise from homogeneous to
    heterogeneous)."""
    pair = (exp.manifest.get("report") or {}).get("contrast")
    if not pair:
        return pd.DataFrame()
    src, dst = pair
    rows = []
    finished = cells[cells["finished"]]
    for (method, override), part in finished.groupby(["method", "override"], sort=False):
        a = part[part["profile"] == src].set_index("seed")["final_val_ppl"]
        b = part[part["profile"] == dst].set_index("seed")["final_val_ppl"]
        diffs = [b[s] - a[s] for s in a.index if s in b.index and finite(a[s])
                 and finite(b[s])]
        row: dict[str, Any] = {"method": method, "override": override, "from": src,
                               "to": dst, "from_mean": mean_ci(a.tolist()).mean,
                               "to_mean": mean_ci(b.tolist()).mean}
        _put_diff(row, "rise", diffs)
        rows.append(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- curves
@dataclass
class Band:
    """One method's curve in one setting: x grid, mean, interval half-width (NaN where
    fewer than two seeds), and each seed's own points."""

    method: str
    x: np.ndarray
    mean: np.ndarray
    half: np.ndarray
    seeds: dict[int, tuple[np.ndarray, np.ndarray]]


def bands(exp: ExperimentDir, cells: pd.DataFrame, setting: str, x: str,
          points: int = 80) -> list[Band]:
    """Curves of ``setting`` against ``x`` (``step``, ``virtual_time`` or ``train_time_s``).

    On the step axis seeds share their evaluation steps: mean and interval per step over
    the seeds evaluated there. Finished cells only, once a method has any (a killed cell's
    partial curve would bend the band). On a time axis the seeds' evaluations fall at different
    times: each seed is interpolated linearly onto a common grid from 0 to the shortest
    seed's last time, and the band is taken point by point (beyond it a seed's curve is
    still drawn, thin).
    """
    ev = _evals(exp)
    out = []
    part = cells[cells["setting"] == setting]
    for method in dict.fromkeys(part["method"]):
        mine = part[part["method"] == method]
        if mine["finished"].any():  # finished seeds only, once there are any
            mine = mine[mine["finished"]]
        seeds: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for c in mine.itertuples():
            mine = ev[ev["run"] == c.id].dropna(subset=["val_ppl", x]) if not ev.empty else ev
            if len(mine):
                seeds[int(c.seed)] = (mine[x].to_numpy(float), mine["val_ppl"].to_numpy(float))
        if not seeds:
            continue
        if x == "step":
            grid = np.array(sorted({float(s) for xs, _ in seeds.values() for s in xs}))
            stats = []
            for s in grid:
                values = [ys[xs == s][0] for xs, ys in seeds.values() if (xs == s).any()]
                stats.append(mean_ci(values))
        else:
            end = min(float(xs[-1]) for xs, _ in seeds.values())
            grid = np.linspace(0.0, end, points) if end > 0 else np.array([0.0])
            curves = [np.interp(grid, xs, ys) for xs, ys in seeds.values()]
            stats = [mean_ci(col) for col in zip(*curves, strict=True)]
        out.append(Band(method, grid, np.array([s.mean for s in stats]),
                        np.array([s.half for s in stats]), seeds))
    return out


# ------------------------------------------------------------------------------ packing
def pack_experiment(src: str | Path, dest: str | Path) -> tuple[int, int]:
    """Copy the compact files of an experiment (:data:`EXPERIMENT_FILES`, the device files
    and each cell's :data:`COMPACT_FILES`) to ``dest``; returns (files, bytes).

    Raises:
        UserError: ``src`` is not an experiment directory, or ``dest`` holds other files.
    """
    src, dest = Path(src), Path(dest)
    if not (src / MANIFEST).is_file():
        raise UserError(f"{src} is not an experiment directory (no {MANIFEST})")
    if dest.exists() and any(dest.iterdir()):
        raise UserError(f"{dest} is not empty; pack into a new directory")
    manifest = json.loads((src / MANIFEST).read_text())
    names: list[Path] = [Path(n) for n in EXPERIMENT_FILES]
    names += sorted(p.relative_to(src) for p in (src / "devices").glob("*.json"))
    for cell in manifest.get("cells") or []:
        names += [Path(cell["dir"]) / n for n in COMPACT_FILES]
    files = size = 0
    for rel in names:
        if (src / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, dest / rel)
            files += 1
            size += (src / rel).stat().st_size
    return files, size


__all__ = ["AGGREGATED", "COMPACT_FILES", "RATIOS", "Band", "ExperimentDir", "bands",
           "cell_table", "contrast_table", "fixed_targets", "group_table", "load_experiment_dir",
           "pack_experiment", "pairwise_table", "resolve_baseline", "resolve_target",
           "setting_name"]

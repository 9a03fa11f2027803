"""Statistics of the experiment report (issue 29 part 5): ratios of times as geometric means
with the t interval of the log-ratio, their exact inversion, verdicts worded from the
interval, the fixed target PPL, and the cell / method / pairwise tables on a hand-made
experiment directory.

The oracles are independent of analysis/seeds.py: numpy for means and standard deviations,
Student-t quantiles from the standard table, and hand-traced times to target.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.experiment import (
    cell_table,
    fixed_targets,
    group_table,
    load_experiment_dir,
    pairwise_table,
)
from analysis.seeds import GeoCI, MeanCI, fmt_geo, geo_mean_ci, mean_ci, verdict

T975 = {2: 4.302652729911275, 4: 2.7764451051977987}  # Student t, 0.975 quantile (tables)
LOWER0, HIGHER0 = "lower: the 95 % interval excludes 0", "higher: the 95 % interval excludes 0"
LOWER1, HIGHER1 = "lower: the 95 % interval excludes 1", "higher: the 95 % interval excludes 1"
NONE, ONE = "no difference detected", "one seed: no interval"


def _geo_by_numpy(ratios: list[float]) -> tuple[float, float, float]:
    logs = np.log(np.asarray(ratios, dtype=float))
    n = len(logs)
    half = T975[n - 1] * logs.std(ddof=1) / math.sqrt(n)
    return (float(np.exp(logs.mean())), float(np.exp(logs.mean() - half)),
            float(np.exp(logs.mean() + half)))


# ----------------------------------------------------------------- geometric mean, interval
@pytest.mark.parametrize("ratios", [[1.2, 0.9, 1.5], [0.8, 1.1, 2.5, 1.7, 0.95]])
def test_geometric_mean_and_interval_match_numpy(ratios: list[float]) -> None:
    g = geo_mean_ci([*ratios, None, float("nan")])  # missing seeds are skipped
    mean, low, high = _geo_by_numpy(ratios)
    assert g.n == len(ratios)
    assert g.mean == pytest.approx(mean, rel=1e-12)
    assert g.low == pytest.approx(low, rel=1e-9)
    assert g.high == pytest.approx(high, rel=1e-9)
    assert g.mean / g.low == pytest.approx(g.high / g.mean, rel=1e-9)  # symmetric in log
    assert g.mean < float(np.mean(ratios))  # the arithmetic mean of ratios is biased up
    assert fmt_geo(g) == f"{mean:.2f} [{low:.2f}, {high:.2f}]"


def test_geometric_mean_of_one_value_none_and_bad_values() -> None:
    one = geo_mean_ci([1.25])
    assert (one.mean, one.n) == (1.25, 1) and math.isnan(one.low) and math.isnan(one.high)
    assert fmt_geo(one) == "1.25"
    empty = geo_mean_ci([None, float("nan")])
    assert empty.n == 0 and math.isnan(empty.mean) and fmt_geo(empty) == ""
    with pytest.raises(ValueError, match="positive"):
        geo_mean_ci([1.0, 0.0])


def test_inverse_ratios_give_the_inverse_statistic() -> None:
    a_over_b = [1.8, 1.3, 2.6, 1.5]
    g = geo_mean_ci(a_over_b)
    inv = geo_mean_ci([1 / r for r in a_over_b])
    assert inv.mean == pytest.approx(1 / g.mean, rel=1e-12)
    assert inv.low == pytest.approx(1 / g.high, rel=1e-12)  # the ends swap and invert
    assert inv.high == pytest.approx(1 / g.low, rel=1e-12)
    # numbers: by numpy with the table's t_{0.975,3} = 3.182446305284263
    logs = np.log(a_over_b)
    half = 3.182446305284263 * logs.std(ddof=1) / 2.0
    assert inv.mean == pytest.approx(math.exp(-logs.mean()), rel=1e-12)
    assert inv.low == pytest.approx(math.exp(-logs.mean() - half), rel=1e-9)
    back = g.inverse()  # the report's inversion is the same
    assert (back.mean, back.low, back.high, back.n) == pytest.approx(
        (inv.mean, inv.low, inv.high, inv.n), rel=1e-12)
    # what the arithmetic mean did: mean(A/B) * mean(B/A) is not 1
    assert np.mean(a_over_b) * np.mean([1 / r for r in a_over_b]) > 1.05
    assert verdict(g) == HIGHER1 and verdict(inv) == LOWER1


# ------------------------------------------------------------------------------- verdicts
def test_verdict_of_a_difference() -> None:
    assert verdict(mean_ci([1.0, 2.0, 3.0])) == NONE  # 2 +- 4.303 / sqrt(3): [-0.48, 4.48]
    assert verdict(mean_ci([2.0, 3.0, 4.0])) == HIGHER0  # [0.52, 5.48]
    assert verdict(mean_ci([-2.0, -3.0, -4.0])) == LOWER0
    assert verdict(mean_ci([-1.0, 1.0, 0.5])) == NONE
    assert verdict(MeanCI(-3.0, 1.0, math.nan, 3)) == LOWER0  # [-4, -2]
    assert verdict(MeanCI(3.0, 1.0, math.nan, 3)) == HIGHER0  # [2, 4]
    assert verdict(MeanCI(0.5, 1.0, math.nan, 3)) == NONE  # [-0.5, 1.5]
    assert verdict(mean_ci([0.7])) == ONE
    assert verdict(mean_ci([])) == ""
    assert verdict(MeanCI(-3.0, 1.0, math.nan, 3), level=0.9) == \
        "lower: the 90 % interval excludes 0"


def test_verdict_of_a_ratio_is_that_of_its_log() -> None:
    assert verdict(GeoCI(0.5, 0.4, 0.625, 3)) == LOWER1
    assert verdict(GeoCI(2.0, 1.6, 2.5, 3)) == HIGHER1
    assert verdict(GeoCI(1.1, 0.8, 1.5, 3)) == NONE
    assert verdict(geo_mean_ci([0.5])) == ONE
    for ratios in ([1.2, 1.3, 1.25], [0.7, 0.8, 0.75], [0.8, 1.3, 1.0]):
        logs = mean_ci(np.log(ratios).tolist())
        assert verdict(geo_mean_ci(ratios)) == verdict(logs).replace("excludes 0",
                                                                     "excludes 1")


# --------------------------------------------------------------------------- fixed target
def test_fixed_target_is_the_loosest_best_ppl() -> None:
    table = pd.DataFrame([
        # setting s: a's best over its seeds is 7.0, b's 9.8, c's 8.5 -> 9.8
        {"setting": "s", "method": "a", "finished": True, "best_trained_val_ppl": 8.0},
        {"setting": "s", "method": "a", "finished": True, "best_trained_val_ppl": 7.0},
        {"setting": "s", "method": "b", "finished": True, "best_trained_val_ppl": 10.0},
        {"setting": "s", "method": "b", "finished": True, "best_trained_val_ppl": 9.8},
        {"setting": "s", "method": "c", "finished": True, "best_trained_val_ppl": 8.5},
        # an unfinished cell does not count, not even for a method with nothing better
        {"setting": "s", "method": "c", "finished": False, "best_trained_val_ppl": 30.0},
        {"setting": "s", "method": "d", "finished": False, "best_trained_val_ppl": 40.0},
        # setting t: nothing finished yet, so the partial curves set it
        {"setting": "t", "method": "a", "finished": False, "best_trained_val_ppl": 12.0},
        {"setting": "t", "method": "b", "finished": False, "best_trained_val_ppl": 14.0},
        {"setting": "u", "method": "a", "finished": True, "best_trained_val_ppl": np.nan},
    ])
    targets = fixed_targets(table)
    assert targets["s"] == 9.8 and targets["t"] == 14.0 and math.isnan(targets["u"])


# ------------------------------------------------------------- a hand-made experiment
# Per cell: (step, val PPL, virtual time); wall time since start = 100 + step * WALL_STEP.
CURVES = {
    "a.seed0": [(0, 20.0, 0.0), (1, 12.0, 10.0), (2, 9.0, 20.0), (3, 8.0, 30.0)],
    "a.seed1": [(0, 21.0, 0.0), (1, 13.0, 11.0), (2, 10.0, 22.0), (3, 9.0, 33.0)],
    "a.seed2": [(0, 19.0, 0.0), (1, 11.0, 9.0), (2, 9.5, 18.0), (3, 7.0, 27.0)],
    "b.seed0": [(0, 20.0, 0.0), (1, 15.0, 12.0), (2, 11.0, 24.0), (3, 10.0, 36.0)],
    "b.seed1": [(0, 21.0, 0.0), (1, 16.0, 14.0), (2, 12.0, 28.0), (3, 11.5, 42.0)],
    "b.seed2": [(0, 19.0, 0.0), (1, 14.0, 10.0), (2, 10.5, 20.0), (3, 9.8, 30.0)],
}
WALL_STEP = {"a.seed0": 3.0, "a.seed1": 2.0, "a.seed2": 4.0,
             "b.seed0": 5.0, "b.seed1": 3.5, "b.seed2": 4.5}


def _experiment(root: Path) -> Path:
    cells = []
    for cell, curve in CURVES.items():
        method, seed = cell.split(".seed")
        d = root / "cells" / cell
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps({"train": {"method": "splitlora"}}))
        (d / "metrics.jsonl").write_text("".join(
            json.dumps({"kind": "eval", "step": s, "val_ppl": p, "val_loss": math.log(p),
                        "virtual_time": v,
                        "wall_time": 100.0 + s * WALL_STEP[cell]}) + "\n"
            for s, p, v in curve))
        (d / "summary.json").write_text(json.dumps({"steps_done": 3, "stop_reason": "steps"}))
        cells.append({"id": cell, "method": method, "profile": None, "override": "base",
                      "seed": int(seed), "dir": f"cells/{cell}"})
    (root / "experiment.json").write_text(json.dumps({
        "name": "synthetic", "methods": ["a", "b"], "profiles": [], "seeds": [0, 1, 2],
        "overrides": ["base"], "cells": cells, "report": {"baseline": "a"}}))
    return root


def _first(cell: str, target: float) -> tuple[float, float] | None:
    """(virtual, wall) time of the cell's first trained evaluation at or below target."""
    for s, p, v in CURVES[cell]:
        if s > 0 and p <= target:
            return v, s * WALL_STEP[cell]
    return None


def test_tables_on_a_hand_made_experiment(tmp_path: Path) -> None:
    exp = load_experiment_dir(_experiment(tmp_path / "exp"))
    cells = cell_table(exp, None, "a").set_index("id")
    assert not any(c.startswith("relative_") for c in cells.columns)
    target = max(c[-1][1] for c in CURVES.values())  # every cell learned: largest final
    fixed = max(min(c[-1][1] for n, c in CURVES.items() if n.startswith(m)) for m in "ab")
    assert (target, fixed) == (11.5, 9.8)
    assert set(cells["target_ppl"]) == {11.5} and set(cells["fixed_target_ppl"]) == {9.8}
    # time to the fixed target: b reaches it only in seed 2 (its best seed)
    assert cells.loc["a.seed1", "fixed_ttt_virtual_s"] == 33.0
    assert cells.loc["b.seed2", "fixed_ttt_virtual_s"] == 30.0
    assert cells["fixed_reached"].tolist() == [True, True, True, False, False, True]
    groups = group_table(cells.reset_index()).set_index("method")
    b = groups.loc["b"]
    for kind, i in (("virtual", 0), ("wall", 1)):
        speedups = [_first(f"a.seed{s}", target)[i] / _first(f"b.seed{s}", target)[i]
                    for s in range(3)]
        mean, low, high = _geo_by_numpy(speedups)
        assert b[f"speedup_{kind}_gmean"] == pytest.approx(mean, rel=1e-12)
        assert b[f"speedup_{kind}_low"] == pytest.approx(low, rel=1e-9)
        assert b[f"speedup_{kind}_high"] == pytest.approx(high, rel=1e-9)
        assert b[f"speedup_{kind}_n"] == 3
        assert b[f"fixed_speedup_{kind}_n"] == 1  # only seed 2 of b reaches the fixed target
        assert b[f"fixed_speedup_{kind}_gmean"] == pytest.approx(
            _first("a.seed2", fixed)[i] / _first("b.seed2", fixed)[i])
        assert b[f"fixed_speedup_{kind}_verdict"] == ONE
        assert b[f"fixed_ttt_{kind}_s_n"] == 1
    # virtual speed-ups 20/24, 22/42, 9/20: the interval contains 1
    assert b["speedup_virtual_verdict"] == NONE
    a = groups.loc["a"]  # the baseline against itself
    assert (a["speedup_virtual_gmean"], a["speedup_virtual_low"], a["speedup_virtual_high"],
            a["speedup_virtual_verdict"]) == (1.0, 1.0, 1.0, NONE)
    assert a["fixed_ttt_virtual_s_mean"] == pytest.approx(np.mean([20.0, 33.0, 18.0]))
    # A/B and B/A: the same experiment with b as the baseline gives the exact inverse
    swapped = group_table(cell_table(exp, None, "b")).set_index("method").loc["a"]
    assert swapped["speedup_virtual_gmean"] == pytest.approx(1 / b["speedup_virtual_gmean"],
                                                             rel=1e-12)
    assert swapped["speedup_virtual_low"] == pytest.approx(1 / b["speedup_virtual_high"],
                                                           rel=1e-12)
    assert swapped["speedup_virtual_high"] == pytest.approx(1 / b["speedup_virtual_low"],
                                                            rel=1e-12)

    # pairwise: per seed the target is the worse final (b's), b over a
    pairs = pairwise_table(exp, cells.reset_index(), "a").set_index("method")
    row = pairs.loc["b"]
    finals = {c: curve[-1][1] for c, curve in CURVES.items()}
    diffs = [finals[f"b.seed{s}"] - finals[f"a.seed{s}"] for s in range(3)]
    half = T975[2] * np.std(diffs, ddof=1) / math.sqrt(3)
    assert row["ppl_diff_mean"] == pytest.approx(np.mean(diffs), rel=1e-12)
    assert row["ppl_diff_ci"] == pytest.approx(half, rel=1e-9)
    assert row["ppl_diff_verdict"] == HIGHER0  # 2.0, 2.5, 2.8: b ends worse
    ratios = [_first(f"b.seed{s}", finals[f"b.seed{s}"])[0]
              / _first(f"a.seed{s}", finals[f"b.seed{s}"])[0] for s in range(3)]
    assert ratios == pytest.approx([36 / 20, 42 / 22, 30 / 18])
    mean, low, high = _geo_by_numpy(ratios)
    assert (row["ratio_virtual_gmean"], row["ratio_virtual_low"],
            row["ratio_virtual_high"]) == pytest.approx((mean, low, high), rel=1e-9)
    assert row["ratio_virtual_verdict"] == HIGHER1  # b is slower in every seed
    back = pairwise_table(exp, cell_table(exp, None, "b"), "b").set_index("method").loc["a"]
    assert back["ratio_virtual_gmean"] == pytest.approx(1 / mean, rel=1e-12)
    assert (back["ratio_virtual_low"], back["ratio_virtual_high"]) == pytest.approx(
        (1 / high, 1 / low), rel=1e-9)
    assert back["ratio_virtual_verdict"] == LOWER1
    assert back["ppl_diff_verdict"] == LOWER0


def test_report_shows_intervals_and_verdicts(tmp_path: Path) -> None:
    from analysis.experiment_report import write_experiment_report

    exp = load_experiment_dir(_experiment(tmp_path / "exp"))
    out, _ = write_experiment_report(exp, tmp_path / "report.md")
    text = out.read_text()
    assert "Target PPL 11.5; fixed target PPL 9.8." in text
    # the method's time / a's at the setting's target: the inverse of the speed-ups
    inv = geo_mean_ci([24 / 20, 42 / 22, 20 / 9])
    assert f"| b | setting (11.5) | {fmt_geo(inv)} | {NONE} |" in text
    assert f"| b | fixed (9.8) | {30 / 18:.2f} (n=1) | {ONE} |" in text
    ratio = geo_mean_ci([36 / 20, 42 / 22, 30 / 18])
    assert f"| {fmt_geo(ratio)} | {HIGHER1} |" in text
    assert f"| {HIGHER0} |" in text  # the PPL difference
    methods = pd.read_csv(tmp_path / "report_tables" / "methods.csv")
    assert {"speedup_virtual_gmean", "speedup_virtual_low", "speedup_virtual_high",
            "fixed_target_ppl", "fixed_ttt_virtual_s_mean"} <= set(methods.columns)
    assert not [c for c in methods.columns if c.startswith(("relative_", "speedup_virtual_m"))]

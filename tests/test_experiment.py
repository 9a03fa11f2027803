"""Experiments (issue 13): grid runner, stopping rules, fairness, seed statistics, report.

The acceptance test runs a small grid (tiny-llama, synthetic data, 2 methods x 2 seeds),
kills the runner while a cell trains, resumes, and checks the report's means and 95 %
intervals against plain arithmetic on the cells' metrics files (t quantile from the table,
no numpy or scipy). The rest is fast: statistics, the stopping rules inside the trainer,
the fairness rule, the memory check, and one-line validation errors.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from analysis.seeds import fmt_ci, mean_ci, t_quantile
from runner.stopping import Stopper
from testbed.experiment.spec import ExperimentError, parse_experiment

REPO = Path(__file__).resolve().parents[1]
T975 = {1: 12.706204736, 2: 4.302652730, 3: 3.182446305, 4: 2.776445105, 9: 2.262157163,
        29: 2.045229642}  # Student t, 0.975 quantile (standard tables)


# ------------------------------------------------------------------------- statistics
def test_t_quantiles_match_the_table() -> None:
    for df, value in T975.items():
        assert t_quantile(0.975, df) == pytest.approx(value, rel=1e-7)
    assert t_quantile(0.025, 3) == pytest.approx(-T975[3], rel=1e-7)


def test_mean_ci_by_hand() -> None:
    ci = mean_ci([1.0, 2.0, 4.0, None, float("nan")])  # missing values are skipped
    sd = math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    assert (ci.n, ci.mean) == (3, pytest.approx(7 / 3))
    assert ci.half == pytest.approx(T975[2] * sd / math.sqrt(3), rel=1e-9)
    one = mean_ci([5.0])
    assert one.mean == 5.0 and math.isnan(one.half)
    assert mean_ci([]).n == 0
    assert fmt_ci(mean_ci([-3.0, -4.0]), "+.2f") == f"-3.50 ± {T975[1] * 0.5:.2f}"
    assert fmt_ci(one, "+.1f") == "+5.0" and fmt_ci(mean_ci([]), ".1f") == ""


# ---------------------------------------------------------------------- stopping rules
def test_stopper_early_stopping_and_virtual_time() -> None:
    s = Stopper(max_steps=100, patience=2, min_delta=0.5)
    assert not s.after_eval(0, 10.0)  # the reference
    assert not s.after_eval(5, 9.0)  # improved by more than 0.5
    assert not s.after_eval(10, 8.8)  # stale 1 (best 8.8 remembered anyway)
    assert s.after_eval(15, 8.7)  # stale 2: stop
    assert s.reason == "early_stopping" and s.best_ppl == 8.7 and s.best_step == 15
    v = Stopper(max_steps=100, virtual_time=3.0)
    assert not v.after_step(2.9) and not v.after_step(None) and v.after_step(3.0)
    assert v.summary(7) == {"steps_done": 7, "stop_reason": "virtual_time",
                            "best_val_ppl": None, "best_step": 0}


def _devices_file(path: Path, n: int = 2) -> Path:
    clients = [{"name": f"client{i}", "memory_bytes": 10**10, "flops": 1e9 * (i + 1),
                "bandwidth": 1e6, "latency": 0.01} for i in range(n)]
    path.write_text(json.dumps({"clients": clients}))
    return path


def test_trainer_stops_early_and_on_virtual_time(tmp_path: Path) -> None:
    from runner.config import TrainConfig
    from runner.rundir import RunDir, read_jsonl
    from runner.trainer import Trainer

    base = dict(method="splitlora", model="tiny-llama", data="synthetic", clients=2, steps=12,
                batch_size=2, agg_interval=2, eval_every=2, eval_max_examples=8,
                lora_dropout=0.0)
    # Early stopping: no evaluation can improve by 1e6 PPL, so patience 2 stops at step 4.
    cfg = TrainConfig(**base, early_stop_patience=2, early_stop_min_delta=1e6)
    run = RunDir.create(tmp_path / "early", {"train": cfg.to_dict()})
    summary = Trainer(cfg, run).fit()
    assert (summary["steps_done"], summary["stop_reason"]) == (4, "early_stopping")
    events = read_jsonl(run.path / "events.jsonl")
    rule = next(e for e in events if e["event"] == "stop_rule")
    assert rule["patience"] == 2 and rule["virtual_time_applies"] is False
    stopped = next(e for e in events if e["event"] == "stopped")
    assert stopped["step"] == 4 and stopped["stale_evaluations"] == 2
    # Virtual time: the run ends after the first step whose end passes the budget, with an
    # aggregation and an evaluation right there.
    cfg = TrainConfig(**base, devices=str(_devices_file(tmp_path / "dev.json")),
                      stop_virtual_time=1e-9)
    run = RunDir.create(tmp_path / "vt", {"train": cfg.to_dict()})
    summary = Trainer(cfg, run).fit()
    assert (summary["steps_done"], summary["stop_reason"]) == (1, "virtual_time")
    metrics = read_jsonl(run.path / "metrics.jsonl")
    assert [m["step"] for m in metrics if m["kind"] == "eval"] == [0, 1]
    assert [m["step"] for m in metrics if m["kind"] == "aggregate"] == [0]
    assert summary["virtual_time_s"] >= 1e-9


# --------------------------------------------------------------------------- fairness
def test_fairness_gives_the_largest_configuration_that_fits_the_smallest_device() -> None:
    from runner.config import TrainConfig
    from runner.emulation.devices import DeviceSpec
    from runner.methods.memory import ModelCosts, client_memory
    from testbed.experiment.fairness import choose
    from testbed.profiles import KNOWN_ARCHS, arch_config

    config = arch_config(KNOWN_ARCHS["smollm2-135m"])
    costs = ModelCosts.from_config(config)
    cfg = TrainConfig(method="splitlora", model="smollm2-135m", clients=3, batch_size=4)
    names = [n for n in costs.shapes if n.endswith(("q_proj", "v_proj"))]

    def need(k: int, r: int) -> int:
        return client_memory(costs, k, {n: r for n in names}, 4, 128).total

    # The smallest device holds 6 blocks at rank 16 but not 7; the others are large.
    small = (need(6, 16) + need(7, 16)) // 2
    devices = [DeviceSpec("a", small, 1e12), DeviceSpec("b", 10**11, 2e12),
               DeviceSpec("c", 10**11, 4e12)]
    server = DeviceSpec("s", 10**12, 1e14, 1.25e9, 0.001)
    deep = choose(cfg, config, devices, server, 128, split_rule="deepest")
    assert (deep.split, deep.rank, deep.smallest_device, deep.violations) == (6, 16, "a", [])
    fast = choose(cfg, config, devices, server, 128)  # makespan: a fast server -> shallow
    assert fast.rank == 16 and 3 <= fast.split <= 6  # bounds start at L/8 = 3
    kept = choose(cfg, config, devices, server, 128, fixed=["split", "rank"])
    assert (kept.split, kept.rank, kept.kept) == (7, 8, ["split", "rank"])  # L/4 = 7
    tiny = [DeviceSpec("a", 10**6, 1e12)] * 3
    none = choose(cfg, config, tiny, server, 128)
    assert none.rank == 2 and none.split == 3 and len(none.violations) == 3
    fed = choose(TrainConfig(method="fedlora", clients=3, batch_size=4), config, devices,
                 server, 128)
    assert (fed.split, fed.rank) == (None, 2)  # no rank fits: the smallest, and it is said
    assert len(fed.violations) == 1 and fed.violations[0].startswith("a: fedlora full model")
    assert choose(TrainConfig(method="hsplitlora"), config, devices, server, 128) is None


# ------------------------------------------------------------------------- validation
def _spec(**changes: Any) -> dict[str, Any]:
    spec = {"methods": ["splitlora", "fedlora"], "seeds": [0, 1],
            "settings": {"model": "tiny-llama", "data": "synthetic", "clients": 2, "steps": 4,
                         "batch_size": 2, "agg_interval": 2, "eval_every": 2,
                         "eval_max_examples": 8, "lora_dropout": 0.0}}
    spec.update(changes)
    return spec


@pytest.mark.parametrize(("changes", "message"), [
    ({"methods": ["splitlora", "splitlor"]}, "x.yaml: methods[1]: unknown method 'splitlor'"),
    ({"methods": []}, "x.yaml: methods: List should have at least 1 item"),
    ({"seeds": [0, 0]}, "x.yaml: seeds: lists a seed twice"),
    ({"sedes": [1]}, "x.yaml: sedes: unknown field"),
    ({"settings": {"rnak": 4}}, "x.yaml: settings.rnak: not a training setting (did you mean "
                                "rank?)"),
    ({"settings": {"seed": 3}}, "x.yaml: settings.seed: set by the grid"),
    ({"settings": {"steps": "many"}}, "x.yaml: settings.steps: Input should be a valid integer"),
    ({"settings": {"steps": 0}}, "x.yaml: cell splitlora.seed0: --steps must be >= 1"),
    ({"settings": {"data": "no/such.csv"}}, "x.yaml: settings.data: no/such.csv does not exist"),
    ({"stop": {"min_delta": 0.1}}, "x.yaml: stop: min_delta is the margin of early stopping"),
    ({"stop": {"virtual_time": "ten"}}, "x.yaml: stop.virtual_time: expected seconds"),
    ({"profiles": ["no-such-profile"]}, "x.yaml: profiles[0]: unknown profile"),
    ({"report": {"baseline": "hetlora"}}, "x.yaml: report.baseline: 'hetlora' is not one"),
    ({"method_settings": {"ft": {"lr": 1e-5}}}, "x.yaml: method_settings.ft: not one of"),
    ({"overrides": {"bad name": {}}}, "x.yaml: overrides: override name 'bad name'"),
])
def test_bad_experiment_is_one_line_naming_the_field(changes: dict[str, Any],
                                                     message: str) -> None:
    spec = _spec()
    spec.update(changes)
    with pytest.raises(ExperimentError) as info:
        parse_experiment(spec, "x.yaml", "x")
    text = str(info.value)
    assert text.startswith(message), text
    assert "\n" not in text


def test_grid_cells_and_overrides() -> None:
    exp = parse_experiment(_spec(overrides={"r2": {"rank": 2}, "r4": {"rank": 4}},
                                 method_settings={"fedlora": {"lr": 1e-3}},
                                 stop={"virtual_time": "2 min", "patience": 3}), "x.yaml", "x")
    cells = exp.cells()
    assert len(cells) == 2 * 2 * 2
    assert cells[0].id == "splitlora.r2.seed0" and cells[-1].id == "fedlora.r4.seed1"
    fed = next(c for c in cells if c.method == "fedlora" and c.override == "r4")
    assert (fed.config.rank, fed.config.lr, fed.config.stop_virtual_time,
            fed.config.early_stop_patience) == (4, 1e-3, 120.0, 3)
    assert "rank" in fed.fixed and "lr" in fed.fixed
    prof = parse_experiment(_spec(profiles=["smoke"], settings={"steps": 2}), "x.yaml", "x")
    c = prof.cells()[0]
    assert c.id == "splitlora.smoke.seed0" and c.config.model == "tiny-llama"
    assert c.config.clients == 3 and c.config.steps == 2


def test_cli_bad_file_exits_2_with_one_line(tmp_path: Path) -> None:
    from testbed.cli import app

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_spec(methods=["nope"])))
    result = CliRunner().invoke(app, ["experiment", "run", str(bad)])
    assert result.exit_code == 2
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "methods[0]: unknown method 'nope'" in lines[0], result.output
    result = CliRunner().invoke(app, ["experiment", "report", str(tmp_path)])
    assert result.exit_code == 2 and "is not an experiment directory" in result.output


def test_memory_check_refuses_a_cell_that_cannot_fit(tmp_path: Path) -> None:
    from rich.console import Console

    from testbed.experiment.run import run

    exp = parse_experiment(_spec(seeds=[0]), "x.yaml", "x")
    console = Console(file=(tmp_path / "out.txt").open("w"), width=200)
    outcome = run(exp, tmp_path / "exp", memory_bytes=10**6, console=console, poll_s=0.01)
    console.file.close()
    assert outcome.count("refused") == 2 and outcome.count("finished") == 0
    text = (tmp_path / "out.txt").read_text()
    assert "[1/2] splitlora.seed0: refused: needs about" in text and "1 MiB available" in text
    assert not (tmp_path / "exp" / "cells").exists()  # nothing was started


# ------------------------------------------------------------------ acceptance: the grid
def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _ci_by_hand(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, T975[n - 1] * sd / math.sqrt(n)


def _testbed(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(REPO / ".venv" / "bin" / "testbed"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_grid_killed_mid_run_resumes_and_reports_means_and_intervals(tmp_path: Path) -> None:
    spec_file = tmp_path / "tiny.yaml"
    # devices that hold both methods: on the emulated spread (no devices file) the tiny
    # model's fedlora clients would be over budget, so not runnable (issue 29 part 4)
    spec = _spec(name="tiny", report={"baseline": "splitlora"})
    spec["settings"]["devices"] = str(_devices_file(tmp_path / "devices.json"))
    spec_file.write_text(yaml.safe_dump(spec))
    out = tmp_path / "exp"
    first, second = out / "cells" / "splitlora.seed0", out / "cells" / "fedlora.seed0"
    # 1. Start the grid one cell at a time; kill the whole runner (and its cell) once the
    #    first cell has finished and the second has written a training record.
    proc = subprocess.Popen([str(REPO / ".venv" / "bin" / "testbed"), "experiment", "run",
                             str(spec_file), "--out", str(out)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            metrics = second / "metrics.jsonl"
            if (first / "summary.json").is_file() and metrics.is_file() and any(
                    r.get("kind") == "train" for r in _records(metrics)):
                break
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.1)
        else:
            pytest.fail("the grid did not reach its second cell in time")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert not (second / "summary.json").exists()
    # 2. Resume: the finished cell is skipped, the killed one trains again from scratch.
    done = _testbed("experiment", "run", str(spec_file), "--out", str(out), "--parallel", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "skipping finished cells: splitlora.seed0" in done.stdout, done.stdout
    assert done.stdout.count(": finished in ") == 3 and "ETA" in done.stdout, done.stdout
    assert "\r" not in done.stdout and "━" not in done.stdout  # piped: plain lines, no bars
    train = [(r["step"], r["client"]) for r in _records(second / "metrics.jsonl")
             if r["kind"] == "train"]
    assert len(train) == len(set(train)) == 4 * 2  # each (step, client) once: from scratch
    # 3. Report (in-process: the CLI's error path is tested above); its numbers against
    #    plain arithmetic on the metrics files.
    from analysis.experiment import load_experiment_dir, pack_experiment
    from analysis.experiment_report import write_experiment_report

    write_experiment_report(load_experiment_dir(out), out / "report.md")
    with open(out / "report_tables" / "methods.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    finals, virtual_hits = {}, {}
    for cell in sorted((out / "cells").iterdir()):
        evals = [r for r in _records(cell / "metrics.jsonl") if r["kind"] == "eval"]
        finals[cell.name] = evals[-1]["val_ppl"]
        virtual_hits[cell.name] = evals
    # default target: the largest final PPL of the cells that ended below their pretrained
    learned = [f for c, f in finals.items() if f < virtual_hits[c][0]["val_ppl"]]
    target = max(learned or finals.values())
    markdown = (out / "report.md").read_text()
    for method in ("splitlora", "fedlora"):
        mean, half = _ci_by_hand([finals[f"{method}.seed{s}"] for s in (0, 1)])
        row = rows[method]
        assert float(row["final_val_ppl_mean"]) == pytest.approx(mean, rel=1e-9)
        assert float(row["final_val_ppl_ci"]) == pytest.approx(half, rel=1e-9)
        assert int(row["final_val_ppl_n"]) == 2
        assert f"| {method} | 2/2 | {mean:.3f} ± {half:.3f} |" in markdown
        hits = [next(e["virtual_time"] for e in virtual_hits[f"{method}.seed{s}"]
                     if e["step"] > 0 and e["val_ppl"] <= target) for s in (0, 1)]
        v_mean, v_half = _ci_by_hand(hits)
        assert float(row["ttt_virtual_s_mean"]) == pytest.approx(v_mean, rel=1e-9)
        assert float(row["ttt_virtual_s_ci"]) == pytest.approx(v_half, rel=1e-9, abs=1e-12)
        summaries = [json.loads((out / "cells" / f"{method}.seed{s}" / "summary.json")
                                .read_text()) for s in (0, 1)]
        assert float(row["client_trainable_params_mean"]) == pytest.approx(
            sum(s["client_trainable_params"] for s in summaries) / 2)
    # time to the PPL both reach (the worse final of the pair, per seed), fedlora over
    # splitlora, against the metrics files
    ratios = []
    for s in (0, 1):
        pair = (f"fedlora.seed{s}", f"splitlora.seed{s}")
        both = max(finals[c] for c in pair)
        own, base = (next(e["virtual_time"] for e in virtual_hits[c]
                          if e["step"] > 0 and e["val_ppl"] <= both) for c in pair)
        ratios.append(own / base)
    with open(out / "report_tables" / "pairwise.csv") as f:
        pairwise = {r["method"]: r for r in csv.DictReader(f)}
    # a ratio of times: geometric mean, the t interval of the log-ratio exponentiated
    l_mean, l_half = _ci_by_hand([math.log(r) for r in ratios])
    fed = pairwise["fedlora"]
    assert float(fed["ratio_virtual_gmean"]) == pytest.approx(math.exp(l_mean), rel=1e-9)
    assert float(fed["ratio_virtual_low"]) == pytest.approx(math.exp(l_mean - l_half),
                                                            rel=1e-9)
    assert float(fed["ratio_virtual_high"]) == pytest.approx(math.exp(l_mean + l_half),
                                                             rel=1e-9)
    side = ("higher" if l_mean - l_half > 0 else "lower" if l_mean + l_half < 0 else None)
    assert fed["ratio_virtual_verdict"] == (f"{side}: the 95 % interval excludes 1" if side
                                            else "no difference detected")
    d_mean, d_half = _ci_by_hand([finals[f"fedlora.seed{s}"] - finals[f"splitlora.seed{s}"]
                                  for s in (0, 1)])
    assert float(pairwise["fedlora"]["ppl_diff_mean"]) == pytest.approx(d_mean, rel=1e-9)
    assert float(pairwise["fedlora"]["ppl_diff_ci"]) == pytest.approx(d_half, rel=1e-9,
                                                                      abs=1e-12)
    assert "Against splitlora, paired by seed" in markdown
    assert (out / "report_figures" / "ppl_vs_virtual_time_all.png").is_file()
    # 4. The compact files alone regenerate the same tables (what a user commits).
    files, _ = pack_experiment(out, tmp_path / "packed")
    packed = tmp_path / "packed"
    assert not list(packed.rglob("adapters")) and files >= 4 * 5
    write_experiment_report(load_experiment_dir(packed), packed / "report.md")
    with open(packed / "report_tables" / "methods.csv") as f:
        again = {r["method"]: r for r in csv.DictReader(f)}
    for method, row in rows.items():
        for key in ("final_val_ppl_mean", "final_val_ppl_ci", "ttt_virtual_s_mean",
                    "bytes_mb_mean", "budget_violations_mean"):
            assert again[method][key] == row[key], key


def test_cell_module_usage_line() -> None:
    result = subprocess.run([sys.executable, "-m", "testbed.experiment.cell"],
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 2 and "usage" in result.stderr


def test_reuse_copies_identical_finished_cells(tmp_path: Path) -> None:
    """A cell another experiment trained with the same configuration is copied, not trained
    again; one with a different configuration is not."""
    from testbed.experiment.run import CELL, plan, signature, write_manifest

    src_exp = parse_experiment(_spec(seeds=[0]), "a.yaml", "a")
    src = tmp_path / "a"
    planned = plan(src_exp, src, threads=1)
    write_manifest(src_exp, src, planned)
    for p in planned:  # pretend both cells finished
        p.dir.mkdir(parents=True)
        (p.dir / CELL).write_text(json.dumps(p.request))
        (p.dir / "summary.json").write_text("{}")
        (p.dir / "adapters").mkdir()
    spec = _spec(seeds=[0, 1], reuse=[str(src)])
    spec["method_settings"] = {"fedlora": {"rank": 4}}  # fedlora differs: trained anew
    mine = plan(parse_experiment(spec, "b.yaml", "b"), tmp_path / "b", threads=1)
    state = {p.id: (p.status, p.reused) for p in mine}
    assert state == {"splitlora.seed0": ("done", True), "fedlora.seed0": ("pending", False),
                     "splitlora.seed1": ("pending", False),
                     "fedlora.seed1": ("pending", False)}
    copied = tmp_path / "b" / "cells" / "splitlora.seed0"
    assert (copied / "adapters").is_dir() and (copied / "summary.json").is_file()
    record = json.loads((copied / CELL).read_text())
    assert record["reused_from"].endswith("cells/splitlora.seed0")
    assert signature(record) == signature(mine[0].request)  # device files differ by path only


def test_a_cell_waiting_for_memory_lets_a_smaller_one_start() -> None:
    """First fit: a large cell that does not fit beside the running one stays queued, a
    later small one that fits starts instead (the CPU would idle otherwise); with nothing
    running the head of the queue always starts."""
    from types import SimpleNamespace

    from testbed.experiment.run import Planned, _first_fit

    def cell(name: str, gib: float) -> Planned:
        return Planned(cell=SimpleNamespace(id=name), dir=Path(name), request={},
                       estimate=int(gib * 2**30))

    big, mid, small = cell("hsplitlora", 9), cell("splitlora", 6), cell("cenlora", 2)
    budget = 13 * 2**30
    assert _first_fit([mid, small], [big], budget) is small
    assert _first_fit([mid], [big], budget) is None
    assert _first_fit([mid, small], [], budget) is mid
    assert _first_fit([mid, small], [big], None) is mid


def test_default_target_comes_from_cells_that_learned() -> None:
    """A cell that ended above its pretrained PPL must not set the target: the pretrained
    model would already meet it and every time to target would be 0."""
    import pandas as pd

    from analysis.experiment import setting_targets

    table = pd.DataFrame([
        {"setting": "s", "finished": True, "final_val_ppl": 6.4, "pretrained_val_ppl": 14.6},
        {"setting": "s", "finished": True, "final_val_ppl": 9.3, "pretrained_val_ppl": 14.6},
        {"setting": "s", "finished": True, "final_val_ppl": 15.1, "pretrained_val_ppl": 14.6},
        {"setting": "s", "finished": False, "final_val_ppl": 12.0, "pretrained_val_ppl": 14.6},
        {"setting": "t", "finished": True, "final_val_ppl": 15.0, "pretrained_val_ppl": 14.0},
    ])
    targets = setting_targets(table, None)
    assert targets["s"] == 9.3  # not 15.1 (did not learn), not 12.0 (unfinished)
    assert targets["t"] == 15.0  # nobody learned: the old rule, every cell reaches it
    assert setting_targets(table, 10.0) == {"s": 10.0, "t": 10.0}

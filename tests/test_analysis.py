"""The analysis package, `testbed plot` / `testbed report` and the notebooks, on real runs.

A module-scoped fixture trains two tiny runs with the real trainer through the CLI (as
subprocesses, like a user would): SplitLoRA and FedLoRA, two clients each, client 1 offline
for steps [2, 4). Everything is checked against the files those runs wrote, so the frames,
numbers and figures are tied to the run format (docs/run-format.md), not to fixtures written
by hand. Fields the trainer does not write yet (``virtual_time``, ``memory_bytes``,
``reconfigure`` events) are added to copies to check the figures that use them.

Measured memory comes from a third real run, distributed (``testbed up --backend local``:
Mosquitto, a server and two client processes, 4 steps): its records carry what the processes
measured, and the memory figure's data, the report's memory column and its per-client table
are checked against its metrics file.

Kept light for a busy 2-core machine: ``tiny-llama``, synthetic data, 6 steps, one thread.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest

from analysis import derive
from analysis.figures import fig_memory, memory_bars, plot_all
from analysis.load import TruncatedRecordWarning, load_runs, read_jsonl
from analysis.report import write_report
from runner.errors import UserError

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "analysis" / "notebooks"
TIMEOUT_S = 300  # generous: the machine may be busy with a training job
STEPS = 6
COMMON = [
    "--model", "tiny-llama", "--data", "synthetic", "--clients", "2", "--steps", str(STEPS),
    "--eval-every", "2", "--agg-interval", "2", "--eval-max-examples", "16", "--max-len",
    "256", "--lr", "5e-3", "--dropout", "1:2:4",
]  # fmt: skip
METHODS = {"splitlora": ["--split", "2"], "fedlora": []}
# Stands in for `testbed eval` (15 s, and a random tiny model scores 0 everywhere): the
# report must carry these exact values.
FAKE_SCORES = {"BLEU": 12.3456, "NIST": 1.23456, "METEOR": 0.23456, "ROUGE_L": 34.5678,
               "CIDEr": 0.45678, "SER": 7.5}
# ``slot_errors`` of scores.json as runner.evaluation.slots.slot_errors writes it (two attributes
# here).
FAKE_SLOT_ERRORS = {
    "SER": 7.5, "slots": 40, "missing": 2, "wrong": 1, "added": 0, "outputs": 4,
    "outputs_with_errors": 2,
    "per_attribute": {
        "name": {"slots": 4, "missing": 0, "wrong": 0, "added": 0, "SER": 0.0},
        "near": {"slots": 0, "missing": 0, "wrong": 0, "added": 0, "SER": None},
    },
}


def _env() -> dict[str, str]:
    """Subprocess environment: offline hub, one thread, this checkout first on the path."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg")
    env.pop("TESTBED_DATA", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    """``python -m testbed.cli ARGS`` with captured text output."""
    return subprocess.run([sys.executable, "-m", "testbed.cli", *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=TIMEOUT_S, check=False)


def assert_user_error(proc: subprocess.CompletedProcess[str], *phrases: str) -> None:
    """Exit code 2 and exactly one ``error:`` line on stderr, no traceback."""
    detail = f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 2, detail
    assert "Traceback" not in proc.stderr, detail
    lines = proc.stderr.strip("\n").splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), detail
    for phrase in phrases:
        assert phrase.lower() in lines[0].lower(), detail


def jsonl(path: Path) -> list[dict]:
    """Strict reader for the tests' own expectations (every line must parse)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two real runs (method -> run directory), trained through the CLI."""
    root = tmp_path_factory.mktemp("analysis-runs")
    out = {}
    for method, extra in METHODS.items():
        run = root / method
        proc = run_cli("train", "--method", method, *COMMON, *extra, "--out", str(run))
        assert proc.returncode == 0, proc.stderr
        out[method] = run
    (out["splitlora"] / "eval").mkdir()
    (out["splitlora"] / "eval" / "scores.json").write_text(
        json.dumps({"scores": FAKE_SCORES, "extra": {"test_mrs": 4},
                    "slot_errors": FAKE_SLOT_ERRORS}))
    return out


@pytest.fixture
def killed(runs: dict[str, Path], tmp_path: Path) -> Path:
    """A copy of the SplitLoRA run as a kill leaves it: last metrics record cut mid-way,
    no summary.json."""
    run = tmp_path / "killed"
    shutil.copytree(runs["splitlora"], run)
    text = (run / "metrics.jsonl").read_text()
    last = text.rstrip("\n").rsplit("\n", 1)[1]
    (run / "metrics.jsonl").write_text(text[: len(text) - 1 - len(last) // 2])
    (run / "summary.json").unlink()
    return run


DIST_BUDGET = 64 * 2**20  # below what any process uses: every record is over budget
DIST_STEPS = 4


@pytest.fixture(scope="module")
def distributed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real distributed SplitLoRA run (``testbed up --backend local``) whose clients and
    server measure their memory (runner/emulation/resources.py). The budget comes from
    TESTBED_BUDGET_BYTES (the profile value runner/emulation/budget.py falls back to here, where no
    cgroup limit exists; a limited CI cgroup would win, which the checks allow)."""
    from runner.distributed.broker import find_mosquitto

    if find_mosquitto() is None:
        pytest.skip("mosquitto not installed (apt-get install -y mosquitto)")
    run = tmp_path_factory.mktemp("analysis-distributed") / "distributed"
    proc = subprocess.run(
        [sys.executable, "-m", "testbed.cli", "up", "--method", "splitlora", "--model",
         "tiny-llama", "--data", "synthetic", "--clients", "2", "--split", "2", "--steps",
         str(DIST_STEPS), "--eval-every", "2", "--agg-interval", "2", "--eval-max-examples",
         "8", "--max-len", "256", "--batch-size", "4", "--heartbeat", "0.25", "--backend",
         "local", "--out", str(run)],
        cwd=REPO, env={**_env(), "TESTBED_BUDGET_BYTES": str(DIST_BUDGET)},
        capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run


# ---------------------------------------------------------------------------- frames


def test_metrics_frame_matches_the_files(runs: dict[str, Path]) -> None:
    rs = load_runs(runs.values())
    assert rs.names == ["splitlora", "fedlora"]
    for method, path in runs.items():
        records = jsonl(path / "metrics.jsonl")
        mine = rs.metrics[rs.metrics["run"] == path.name]
        assert len(mine) == len(records)
        assert set(mine["method"]) == {method}
        for client in ("client0", "client1"):
            expected = [r for r in records if r["kind"] == "train" and r["client"] == client]
            got = mine[(mine["kind"] == "train") & (mine["client"] == client)]
            assert len(got) == len(expected) > 0
            assert list(got["step"]) == [r["step"] for r in expected]
            assert list(got["loss"]) == pytest.approx([r["loss"] for r in expected], abs=0)
        evals = [r for r in records if r["kind"] == "eval"]
        got = derive.evals(rs)
        got = got[got["run"] == path.name]
        assert list(got["val_ppl"]) == [r["val_ppl"] for r in evals]
        assert list(got["step"]) == [0, 2, 4, 6]
        assert got["train_time_s"].iloc[0] == 0 and got["train_time_s"].is_monotonic_increasing
    # client1 is away for steps 2 and 3 in both runs.
    c1 = rs.metrics[(rs.metrics["kind"] == "train") & (rs.metrics["client"] == "client1")]
    assert sorted(set(c1["step"])) == [0, 1, 4, 5]


def test_dropout_shows_in_events(runs: dict[str, Path]) -> None:
    rs = load_runs(runs.values())
    ev = rs.events
    for path in runs.values():
        mine = ev[ev["run"] == path.name]
        off = mine[mine["event"] == "client_offline"]
        on = mine[mine["event"] == "client_online"]
        assert list(zip(off["client"], off["step"], strict=True)) == [("client1", 2)]
        assert list(zip(on["client"], on["step"], strict=True)) == [("client1", 4)]
        assert len(mine) == len(jsonl(path / "events.jsonl"))
    intervals = derive.offline_intervals(rs)
    assert list(intervals["start_step"]) == [2, 2]
    assert list(intervals["end_step"]) == [4, 4]
    assert intervals["rejoined"].all()
    assert derive.trained_intervals(rs, "splitlora")["client1"] == [(0, 2), (4, 6)]


def test_config_scores_and_summary_frames(runs: dict[str, Path]) -> None:
    rs = load_runs(runs.values())
    cfg = rs.config.set_index("run")
    assert len(cfg) == 2
    for method, path in runs.items():
        snapshot = json.loads((path / "config.json").read_text())
        assert cfg.at[method, "method"] == method
        assert cfg.at[method, "clients"] == 2
        assert cfg.at[method, "steps"] == STEPS
        assert cfg.at[method, "data_train"] == snapshot["data_sizes"]["train"]
        assert cfg.at[method, "dropouts"] == ((1, 2, 4),)
        summary = json.loads((path / "summary.json").read_text())
        row = rs.summary.set_index("run").loc[method]
        assert row["client_trainable_params"] == summary["client_trainable_params"]
    assert cfg.at["splitlora", "split"] == 2
    scores = rs.scores.set_index("run")
    assert list(scores.index) == ["splitlora"]  # fedlora was not evaluated
    assert scores.at["splitlora", "BLEU"] == FAKE_SCORES["BLEU"]


def test_derived_numbers(runs: dict[str, Path]) -> None:
    rs = load_runs(runs.values())
    finals = {m: json.loads((p / "summary.json").read_text())["final_val_ppl"]
              for m, p in runs.items()}
    target = derive.default_target(rs)
    assert target == max(finals.values())
    sp = derive.speedups(rs, target, "splitlora").set_index("run")
    assert sp["reached"].all()
    assert sp.at["splitlora", "speedup_steps"] == 1.0
    assert sp.at["splitlora", "speedup_wall"] == pytest.approx(1.0)
    moved = derive.bytes_moved(rs).set_index("run")
    for method, path in runs.items():
        records = jsonl(path / "metrics.jsonl")
        total = sum(r.get("bytes_sent", 0) + r.get("bytes_received", 0) for r in records
                    if r["kind"] in ("train", "aggregate"))
        assert moved.at[method, "total_bytes"] == total
    assert moved.at["splitlora", "train_bytes"] > 0 and moved.at["fedlora", "train_bytes"] == 0
    with pytest.raises(UserError, match="not the method of any run"):
        derive.resolve_baseline(rs, "hetlora")
    # equal wall time: the shortest run's last evaluation; each run's PPL at or before it
    ev = {m: [r for r in jsonl(p / "metrics.jsonl") if r["kind"] == "eval"]
          for m, p in runs.items()}
    trained = {m: e[-1]["wall_time"] - e[0]["wall_time"] for m, e in ev.items()}
    horizon = derive.equal_time(rs)
    assert horizon == pytest.approx(min(trained.values()))
    at = derive.ppl_at_time(rs, horizon)
    for m, e in ev.items():
        before = [r["val_ppl"] for r in e if r["wall_time"] - e[0]["wall_time"] <= horizon + 1e-9]
        assert at[m] == pytest.approx(before[-1])
    shortest = min(trained, key=trained.get)
    assert at[shortest] == pytest.approx(finals[shortest])


# --------------------------------------------------------------------------- figures

STEMS = ("ppl_vs_step", "ppl_vs_wall_time", "speedup", "timeline_splitlora",
         "timeline_fedlora", "bytes_moved")


def assert_figure_files(directory: Path, stems: tuple[str, ...]) -> None:
    """Every stem has a non-empty PNG and PDF with the right magic bytes."""
    for stem in stems:
        png, pdf = directory / f"{stem}.png", directory / f"{stem}.pdf"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert pdf.read_bytes()[:5] == b"%PDF-", pdf
        assert png.stat().st_size > 5000 and pdf.stat().st_size > 1000, stem


def test_plot_cli_writes_every_figure(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "figs"
    proc = run_cli("plot", str(runs["splitlora"]), str(runs["fedlora"]), "-o", str(out),
                   "--baseline", "fedlora")
    assert proc.returncode == 0, proc.stderr
    listed = {Path(line) for line in proc.stdout.split()}
    assert listed == {out / f"{s}.{e}" for s in STEMS for e in ("png", "pdf")}
    assert_figure_files(out, STEMS)
    # Figures without data are skipped and said so, not drawn empty.
    assert "skipped ppl_vs_virtual_time" in proc.stderr and "skipped memory" in proc.stderr


def test_optional_figures_when_the_fields_exist(runs: dict[str, Path], tmp_path: Path) -> None:
    """virtual_time, memory, per-client split points and ranks, budget violations and block
    hand-overs: fields the in-process trainer does not write for these methods (the
    emulator and HSplitLoRA do), added to copies in the shapes the runtime writes them."""
    copies = []
    for method, path in runs.items():
        run = tmp_path / method
        shutil.copytree(path, run)
        records = jsonl(run / "metrics.jsonl")
        for r in records:
            if r["kind"] == "eval":
                r["virtual_time"] = 10.0 * r["step"] * (2 if method == "fedlora" else 1)
            if r["kind"] == "train" and method == "splitlora":  # measured memory
                r["memory_bytes"] = (300 + 40 * r["step"]) * 2**20
                r["budget_bytes"] = 400 * 2**20 if r["client"] == "client0" else 600 * 2**20
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        if method == "splitlora":  # the compact shape: {client: k}
            extra = [{"event": "reconfigure", "step": 4, "splits": {"client0": 3, "client1": 1}},
                     {"event": "split_moved", "step": 4, "client": "client0", "old": 2,
                      "new": 3, "bytes": 2_000_000}]
        else:  # runner.methods.hetero's shape: per-client dicts, planned memory, violations
            extra = [{"event": "reconfigure", "step": step, "reason": "initial",
                      "clients": {c: {"split": 4, "rank_sum": 16 + step + 8 * i,
                                      "memory_bytes": (350 + 10 * i) * 2**20,
                                      "budget_bytes": 352 * 2**20}
                                  for i, c in enumerate(("client0", "client1"))}}
                     for step in (0, 4)]
            extra.append({"event": "budget_violation", "step": 0,
                          "detail": "client1: predicted 360 MiB exceeds budget 352 MiB"})
        with open(run / "events.jsonl", "a") as f:
            f.writelines(json.dumps({"time": 0.0, "wall_time": 1.0, **e}) + "\n" for e in extra)
        copies.append(run)
    rs = load_runs(copies)
    assert derive.has_virtual_time(rs)
    mem = derive.memory(rs).set_index(["run", "client"])
    assert list(mem.index) == [(m, c) for m in runs for c in ("client0", "client1")]
    assert mem.at[("splitlora", "client0"), "over_budget"] == 3  # steps 3, 4, 5 exceed 400
    assert mem.at[("splitlora", "client1"), "over_budget"] == 0
    assert mem.at[("splitlora", "client0"), "peak_bytes"] == 500 * 2**20
    assert mem.at[("fedlora", "client1"), "source"] == "planned"
    assert mem.at[("fedlora", "client1"), "over_budget"] == 2
    assert mem.at[("fedlora", "client1"), "planned_bytes"] == 360 * 2**20
    assert np.isnan(mem.at[("fedlora", "client1"), "measured_bytes"])
    bars = {p["run"]: p for p in memory_bars(rs)}
    assert list(bars["fedlora"]["planned"]) == [350, 360]
    assert list(bars["fedlora"]["planned_over"]) == [False, True]
    assert list(bars["splitlora"]["measured"]) == [500, 500]
    assert list(bars["splitlora"]["over"]) == [True, False]  # budgets 400 and 600 MiB
    splits = derive.split_points(rs, "splitlora")
    assert splits[splits["client"] == "client0"][["step", "split"]].values.tolist() == [
        [0, 2], [4, 3]]
    ranks = derive.rank_sums(rs, "fedlora")
    assert ranks[ranks["client"] == "client1"]["rank_sum"].tolist() == [24, 28]
    assert derive.budget_violations(rs)["client"].tolist() == ["client1"]
    moved = derive.bytes_moved(rs).set_index("run")
    assert moved.at["splitlora", "handover_bytes"] == 2_000_000
    assert moved.at["splitlora", "total_bytes"] == pytest.approx(
        moved.at["splitlora", "train_bytes"] + moved.at["splitlora", "aggregate_bytes"] + 2e6)
    report, plotted = write_report(rs, tmp_path / "report.md")
    assert not plotted.skipped
    assert_figure_files(tmp_path / "report_figures", (*STEMS, "ppl_vs_virtual_time", "memory"))
    text = report.read_text()  # violations are shown in reports (docs/method.md)
    assert "`fedlora`: 1 memory-budget violation event(s)" in text
    assert "`splitlora` client0: measured memory over budget in 3 record(s)" in text
    assert derive.speedups(rs, plotted.target, "splitlora")["speedup_virtual"].tolist() == [
        1.0, 0.5]


def test_report_cli(runs: dict[str, Path], tmp_path: Path) -> None:
    report = tmp_path / "out" / "report.md"
    proc = run_cli("report", str(runs["splitlora"]), str(runs["fedlora"]), "-o", str(report))
    assert proc.returncode == 0, proc.stderr
    text = report.read_text()
    header = next(line for line in text.splitlines() if line.startswith("| Method | Final"))
    for column in ("Final val PPL", "BLEU", "NIST", "METEOR", "ROUGE-L", "CIDEr",
                   "Steps to target", "Wall time to target (s)", "Client trainable params",
                   "Bytes moved (MB)"):
        assert column in header
    lines = text.splitlines()
    body = lines[lines.index(header) + 2:]
    body = body[:next(i for i, line in enumerate(body) if not line.startswith("|"))]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in body}
    assert {"splitlora", "fedlora"} <= set(rows)
    assert rows["splitlora"][3:9] == ["12.35", "1.2346", "0.2346", "34.57", "0.4568", "7.50"]
    assert rows["fedlora"][3:9] == [""] * 6  # not evaluated: blank
    assert "SER (%)" in header
    # the slot errors per attribute, for the evaluated run only
    assert "| Method | MRs | SER (%) | missing | wrong | added | name | near |" in text
    assert "| splitlora | 4 | 7.50 | 2 | 1 | 0 | 0.0 | - |" in text
    assert "Val PPL at equal time" in header and float(rows["fedlora"][2]) > 0
    summary = json.loads((runs["splitlora"] / "summary.json").read_text())
    assert rows["splitlora"][1] == f"{summary['final_val_ppl']:.3f}"
    assert rows["splitlora"][12] == f"{summary['client_trainable_params']:,.0f}"
    assert rows["splitlora"][13] == f"{summary['server_trainable_params']:,.0f}"
    assert rows["fedlora"][13] == "0"  # no server: the capacity is all on the clients
    images = [line.split("](")[1].rstrip(")") for line in text.splitlines()
              if line.startswith("![")]
    assert len(images) == len(STEMS)
    for rel in images:
        assert not Path(rel).is_absolute()
        assert (report.parent / rel).stat().st_size > 0
    assert f"{report}" in proc.stdout.splitlines()[0]


# ------------------------------------------------------------------- measured memory


def test_measured_memory_records(distributed: Path) -> None:
    """Every train record of the distributed run carries the client's measured memory and
    budget; resources records carry per-step compute times (clients) and the server's own
    memory after every step (docs/run-format.md "Measured resources")."""
    records = jsonl(distributed / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    assert {r["client"] for r in train} == {"client0", "client1"}
    budgets = {e["client"]: e["budget_bytes"] for e in jsonl(distributed / "events.jsonl")
               if e["event"] == "client_budget"}
    for r in train:
        assert r["memory_source"] in ("rss", "cgroup"), r
        assert r["memory_bytes"] == r["memory_peak_bytes"] >= r["memory_current_bytes"] > 0
        assert r["budget_bytes"] == budgets[r["client"]]
    res = [r for r in records if r["kind"] == "resources"]
    server = [r for r in res if r["client"] == "server"]
    assert [r["step"] for r in server] == list(range(DIST_STEPS))
    assert all(r["memory_bytes"] > 0 and r["compute_s"] > 0 for r in server)
    for client in ("client0", "client1"):
        mine = [r for r in res if r["client"] == client]
        steps = [r["step"] for r in mine]
        assert mine and steps == sorted(set(steps)) and set(steps) <= set(range(DIST_STEPS))
        for r in mine:
            assert r["compute_s"] == pytest.approx(r["forward_s"] + r["backward_s"])
            assert r["memory_bytes"] >= r["memory_current_bytes"] > 0
        # a peak so far never goes down, within each source of readings (train records are
        # measured after a forward, resources records arrive with a later heartbeat, so the
        # two kinds interleave in the file out of measurement order)
        for kind in ("train", "resources"):
            peaks = [r["memory_bytes"] for r in records if r.get("client") == client
                     and r["kind"] == kind and "memory_bytes" in r]
            assert peaks and peaks == sorted(peaks), kind


def test_memory_figure_and_report_column_match_the_files(distributed: Path,
                                                         runs: dict[str, Path],
                                                         tmp_path: Path) -> None:
    records = jsonl(distributed / "metrics.jsonl")
    measured = {}
    for who in ("client0", "client1", "server"):
        mine = [r for r in records if r.get("client") == who and "memory_bytes" in r]
        peak = max(mine, key=lambda r: r["memory_bytes"])
        measured[who] = {
            "peak": peak["memory_bytes"], "budget": peak.get("budget_bytes"),
            "source": mine[-1]["memory_source"],
            "over": sum(1 for r in mine if "budget_bytes" in r
                        and r["memory_bytes"] > r["budget_bytes"])}
    rs = load_runs([distributed, runs["fedlora"]])
    mem = derive.memory(rs).set_index(["run", "client"])
    assert [c for r, c in mem.index] == ["client0", "client1", "server"]  # fedlora: none
    for who, want in measured.items():
        row = mem.loc[("distributed", who)]
        assert row["measured_bytes"] == row["peak_bytes"] == want["peak"]
        assert row["source"] == "measured" and row["memory_source"] == want["source"]
        assert row["over_budget"] == want["over"]
        assert pd.isna(row["planned_bytes"])  # SplitLoRA plans nothing
        if want["budget"] is not None:
            assert row["budget_bytes"] == want["budget"]
    # the figure draws exactly these numbers: measured, planned, budget per client
    (panel,) = memory_bars(rs)
    assert panel["clients"] == ["client0", "client1", "server"]
    assert list(panel["measured"]) == [measured[c]["peak"] / 2**20 for c in panel["clients"]]
    assert np.isnan(panel["planned"]).all()
    assert list(panel["budget"][:2]) == [measured[c]["budget"] / 2**20
                                         for c in ("client0", "client1")]
    assert list(panel["over"][:2]) == [measured[c]["over"] > 0 for c in ("client0", "client1")]
    assert fig_memory(rs) is not None
    # the report: the comparison table's column and the per-client memory table
    report, plotted = write_report(rs, tmp_path / "report.md")
    assert "memory" in plotted.figures
    text = report.read_text()
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| Method | Final"))
    cols = [c.strip() for c in header.split("|")[1:-1]]
    col = cols.index("Peak client memory (MiB, measured)")
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[1:-1]]
            for ln in lines[lines.index(header) + 2:] if ln.startswith("| ")
            and ln.count("|") == len(cols) + 1}
    client_peak = max(measured["client0"]["peak"], measured["client1"]["peak"])
    assert rows["splitlora"][col] == f"{client_peak / 2**20:.0f}"
    assert rows["fedlora"][col] == ""  # in-process: nothing measured
    assert "## Memory per client" in text
    for who, want in measured.items():
        budget = f"{want['budget'] / 2**20:.0f}" if want["budget"] is not None else ""
        over = f"{want['over']} record(s)" if want["over"] else ""
        assert (f"| splitlora | {who} | {want['peak'] / 2**20:.0f} | {want['source']} |  "
                f"| {budget} | {over} |") in lines, who
        if want["over"]:
            assert (f"`distributed` {who}: measured memory over budget in {want['over']} "
                    "record(s)") in text


# ---------------------------------------------------------------------- killed runs


def test_killed_run_loads_with_a_warning_and_plots(killed: Path, runs: dict[str, Path],
                                                   tmp_path: Path) -> None:
    lines = (killed / "metrics.jsonl").read_text().splitlines()
    with pytest.warns(TruncatedRecordWarning, match="truncated last line"):
        rs = load_runs([killed, runs["fedlora"]])
    assert len(rs.metrics[rs.metrics["run"] == "killed"]) == len(lines) - 1
    assert list(rs.summary["run"]) == ["fedlora"]
    evals = [r for r in jsonl(runs["splitlora"] / "metrics.jsonl") if r["kind"] == "eval"]
    assert evals[-1]["step"] == STEPS  # the record that was cut: the final evaluation
    assert derive.final_ppl(rs)["killed"] == evals[-2]["val_ppl"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncatedRecordWarning)
        plotted = plot_all(load_runs([killed, runs["fedlora"]]), tmp_path / "figs")
    assert_figure_files(tmp_path / "figs", ("ppl_vs_step", "speedup", "timeline_killed"))
    assert plotted.files
    # The CLI says so on stderr, still succeeds, and the report keeps the caveat.
    report = tmp_path / "r" / "report.md"
    proc = run_cli("report", str(killed), str(runs["fedlora"]), "-o", str(report))
    assert proc.returncode == 0, proc.stderr
    assert "warning:" in proc.stderr and "truncated" in proc.stderr
    text = report.read_text()
    assert "no summary.json" in text and "truncated last line" in text


def test_run_killed_while_a_client_was_offline(runs: dict[str, Path], tmp_path: Path) -> None:
    """Killed at step 3 with client1 away: its offline period runs to the end of the plot."""
    run = tmp_path / "killed-offline"
    shutil.copytree(runs["splitlora"], run)
    for name in ("metrics.jsonl", "events.jsonl"):
        kept = [line for line in (run / name).read_text().splitlines()
                if json.loads(line).get("step", 0) < 3
                and json.loads(line).get("event") != "run_finished"]
        (run / name).write_text("\n".join(kept) + "\n")
    (run / "summary.json").unlink()
    rs = load_runs([run])
    assert derive.run_steps(rs, run.name) == 3
    off = derive.offline_intervals(rs)
    assert off[["client", "start_step", "end_step", "rejoined"]].values.tolist() == [
        ["client1", 2, 3, False]]
    plotted = plot_all(rs, tmp_path / "figs")
    assert "timeline_killed-offline" in plotted.figures


def test_broken_line_inside_a_file_is_a_user_error(tmp_path: Path) -> None:
    bad = tmp_path / "metrics.jsonl"
    bad.write_text('{"kind": "eval"}\n{"kind": tra\n{"kind": "eval"}\n')
    with pytest.raises(UserError, match="line 2"):
        read_jsonl(bad)


# ---------------------------------------------------------------------- user errors


def test_plot_on_a_path_that_is_not_a_run(tmp_path: Path) -> None:
    not_a_run = tmp_path / "not-a-run"
    not_a_run.mkdir()
    assert_user_error(run_cli("plot", str(not_a_run), "-o", str(tmp_path / "f")),
                      "not a run directory", str(not_a_run))
    assert_user_error(run_cli("report", str(tmp_path / "missing"), "-o",
                              str(tmp_path / "r.md")), "does not exist")


def test_bad_options_are_user_errors(runs: dict[str, Path], tmp_path: Path) -> None:
    run = str(runs["splitlora"])
    assert_user_error(run_cli("plot", run, "-o", str(tmp_path), "--baseline", "nope"),
                      "--baseline", "splitlora")
    assert_user_error(run_cli("plot", run, "-o", str(tmp_path), "--target-ppl", "-1"),
                      "--target-ppl")


def test_analysis_never_imports_torch() -> None:
    """analysis reads files only (docs/architecture.md): no torch, no trainer."""
    code = ("import sys, analysis.load, analysis.derive, analysis.figures, analysis.report\n"
            "bad = [m for m in ('torch', 'runner.trainer', 'transformers') if m in sys.modules]\n"
            "assert not bad, bad\n")
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True,
                          text=True, timeout=TIMEOUT_S, check=False)
    assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------------------- notebooks


@pytest.mark.parametrize(("name", "figures"), [
    ("convergence.ipynb", 5),  # PPL vs step and wall time, loss, speed-up, bytes
    ("heterogeneity.ipynb", 2),  # one timeline per run (no memory records yet)
])
def test_notebook_executes(name: str, figures: int, runs: dict[str, Path], tmp_path: Path) -> None:
    """Inject the runs into the "parameters" cell and execute every cell in this venv."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, "exactly one cell must be tagged 'parameters'"
    params[0].source = (f"RUNS = {json.dumps([str(p) for p in runs.values()])}\n"
                        "TARGET_PPL = None\nBASELINE = None\n")
    nb.cells.append(nbformat.v4.new_code_cell(
        "import sys\nprint(sys.executable)\nprint(sorted({'torch'} & set(sys.modules)))"))
    # A kernel spec made here, for this interpreter: the run can never pick up another
    # Python's "python3" kernel from the user's Jupyter directories.
    kernels = tmp_path / "kernels" / "testbed-venv"
    kernels.mkdir(parents=True)
    (kernels / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "testbed venv", "language": "python"}))
    km = AsyncKernelManager(kernel_name="testbed-venv", kernel_spec_manager=KernelSpecManager(
        kernel_dirs=[str(kernels.parent)]))
    client = NotebookClient(nb, km=km, timeout=TIMEOUT_S,
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute(cleanup_kc=True, env=_env())  # raises CellExecutionError on any error
    last = "".join(o.get("text", "") for o in nb.cells[-1].outputs).splitlines()
    assert last == [sys.executable, "[]"]
    images = sum(1 for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                 if "image/png" in o.get("data", {}))
    assert images == figures, f"{name} displayed {images} figures"

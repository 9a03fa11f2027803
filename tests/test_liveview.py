"""The live view of `testbed up` (testbed/liveview.py) on the files of a real run.

A module-scoped fixture trains a tiny SplitLoRA run through the CLI (two clients, client1
offline for steps [1, 3)); its metrics.jsonl / events.jsonl are fed through the fold, the
renderer and the follower. Kept light for a busy 2-core machine: tiny-llama, 4 steps, one
thread.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from testbed.liveview import (
    ClientView,
    JsonlTail,
    LiveState,
    eta,
    fold,
    follow,
    header,
    initial_state,
    memory_cell,
    render,
)

REPO = Path(__file__).resolve().parents[1]
ARGS = ["train", "--method", "splitlora", "--model", "tiny-llama", "--data", "synthetic",
        "--clients", "2", "--split", "2", "--steps", "4", "--eval-every", "2",
        "--agg-interval", "2", "--eval-max-examples", "8", "--max-len", "256",
        "--dropout", "1:1:3"]


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("liveview") / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("TESTBED_DATA", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-m", "testbed.cli", *ARGS, "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    return out


def test_fold_matches_the_files(run: Path) -> None:
    records, events = jsonl(run / "metrics.jsonl"), jsonl(run / "events.jsonl")
    config = json.loads((run / "config.json").read_text())
    state, lines = fold(initial_state(config), records, events)
    train = [r for r in records if r["kind"] == "train"]
    assert state.method == "splitlora" and state.steps == 4 and state.step == 4
    assert state.finished
    assert set(state.clients) == {"client0", "client1"}
    for name, c in state.clients.items():
        mine = [r for r in train if r["client"] == name]
        assert c.last_step == mine[-1]["step"]
        assert c.loss == mine[-1]["loss"]
        assert c.split == 2 and c.rank == 8 and c.state == "online"
        assert c.bytes_moved == sum(r["bytes_sent"] + r["bytes_received"] for r in mine)
    evals = [r for r in records if r["kind"] == "eval"]
    assert state.val_ppl == pytest.approx(evals[-1]["val_ppl"])
    # one plain line per finished step, in order, with that step's mean loss
    step_lines = [ln for ln in lines if " done " in ln]
    assert [ln.split(":")[0] for ln in step_lines] == [f"step {i} done ({i + 1}/4)"
                                                       for i in range(4)]
    step0 = [r["loss"] for r in train if r["step"] == 0]
    assert f"loss {sum(step0) / len(step0):.4f} (2 clients)" in step_lines[0]
    assert "(1 clients)" in step_lines[1]  # client1 was offline at step 1
    assert any("client_offline client1 scheduled" in ln for ln in lines)
    assert any("client_online client1" in ln for ln in lines)
    assert lines[-1].startswith("run_finished")


def test_offline_online_transitions(run: Path) -> None:
    """Folded one event at a time: client1 goes offline at step 1 and returns at step 3."""
    events = jsonl(run / "events.jsonl")
    state, seen = LiveState(), []
    for e in events:
        state, _ = fold(state, events=[e])
        seen.append((e["event"], state.clients["client1"].state))
    assert ("client_offline", "offline") in seen and ("client_online", "online") in seen
    idx = [ev for ev, _ in seen]
    off, on = idx.index("client_offline"), idx.index("client_online")
    assert all(st == "offline" for _, st in seen[off:on])
    assert all(st == "online" for _, st in seen[:off]) and seen[-1][1] == "online"
    # the fold is pure: the input state is not changed
    before = LiveState()
    fold(before, events=events)
    assert before.clients == {}


def test_memory_from_reconfigure_and_records() -> None:
    """Measured memory (train and resources records) against the budget; the memory model's
    plan (reconfigure events) only where nothing was measured; budgets from events."""
    state, lines = fold(LiveState(), records=[
        {"kind": "train", "step": 0, "client": "client0", "loss": 1.5, "bytes_sent": 10,
         "bytes_received": 5, "memory_bytes": 612 << 20, "memory_source": "cgroup",
         "budget_bytes": 900 << 20},
        {"kind": "resources", "step": 0, "client": "client2", "memory_bytes": 950 << 20,
         "memory_source": "rss"},
        {"kind": "resources", "step": 0, "client": "server", "memory_bytes": 1 << 30}],
        events=[{"event": "reconfigure", "step": 0, "reason": "initial",
                 "clients": {"client1": {"split": 3, "rank_sum": 48,
                                         "memory_bytes": 1 << 30, "budget_bytes": 2 << 30},
                             "client0": {"memory_bytes": 500 << 20}}},
                {"event": "client_budget", "step": 0, "client": "client2",
                 "budget_bytes": 900 << 20, "source": "cgroup-v1"}])
    c0, c1, c2 = (state.clients[f"client{i}"] for i in range(3))
    assert c1.split == 3 and c1.rank_sum == 48 and c1.memory_bytes is None
    assert (c0.memory_bytes, c0.memory_source, c0.planned_bytes) == (612 << 20, "cgroup",
                                                                    500 << 20)
    assert (c2.memory_bytes, c2.budget_bytes) == (950 << 20, 900 << 20)
    assert "server" not in state.clients  # the server's own record is not a client row
    assert memory_cell(c0) == "612/900 MiB"
    assert memory_cell(c1) == "~1024/2048 MiB (plan)"
    assert memory_cell(c2) == "950/900 MiB"
    assert memory_cell(ClientView("x", budget_bytes=16 << 30)) == "-/16.0 GiB"
    assert memory_cell(ClientView("x")) == "-"
    text = _text(state)
    assert "612/900 MiB" in text and "~1024/2048 MiB (plan)" in text and "48" in text
    assert any("reconfigure" in ln for ln in lines)
    oom, lines = fold(state, events=[{"event": "budget_exceeded", "client": "client2",
                                      "memory_bytes": 100 << 20,
                                      "memory_peak_bytes": 901 << 20}])
    assert oom.clients["client2"].state == "OOM-killed"
    assert memory_cell(oom.clients["client2"]) == "901/900 MiB"
    assert any("budget_exceeded client2" in ln for ln in lines)


def test_eta_from_the_files(run: Path) -> None:
    """ETA = mean wall time per step so far x steps left, in the header and the plain step
    lines; none before two steps, and none once finished."""
    records = jsonl(run / "metrics.jsonl")
    config = json.loads((run / "config.json").read_text())
    train = [r for r in records if r["kind"] == "train"]
    first = train[0]
    upto = [r for r in records if r["kind"] != "train" or r["step"] <= 1]
    last = [r for r in train if r["step"] == 1][-1]
    state, _ = fold(initial_state(config), [r for r in records
                                            if r["kind"] == "train" and r["step"] == 0])
    assert eta(state) is None and "ETA -" in header(state)
    state, lines = fold(initial_state(config), upto)  # the eval after step 1 ends it
    expected = (last["wall_time"] - first["wall_time"]) / (1 - first["step"]) * (4 - 2)
    assert eta(state) == pytest.approx(expected)
    assert f"ETA {round(expected)} s" in header(state)
    assert [ln for ln in lines if ln.startswith("step 1 done")][0].endswith(
        f"ETA {round(expected)} s")
    done, _ = fold(initial_state(config), records, jsonl(run / "events.jsonl"))
    assert eta(done) is None and "ETA" not in header(done) and "finished" in header(done)


def _text(state: LiveState) -> str:
    console = Console(record=True, width=120)
    console.print(render(state, elapsed=1.0))
    return console.export_text()


def test_render_has_client_rows(run: Path) -> None:
    state, _ = fold(initial_state(json.loads((run / "config.json").read_text())),
                    jsonl(run / "metrics.jsonl"), jsonl(run / "events.jsonl"))
    text = _text(state)
    assert "splitlora  step 4/4  val PPL" in text and "elapsed 1.0 s" in text
    rows = {ln.split()[1]: ln for ln in text.splitlines() if "client" in ln and "│" in ln}
    assert set(rows) == {"client0", "client1"}
    for name, c in state.clients.items():
        assert "online" in rows[name] and f"{c.loss:.4f}" in rows[name]
    off, _ = fold(state, events=[{"event": "client_offline", "client": "client1", "step": 4}])
    assert "offline" in _text(off)


def test_tail_keeps_offset_and_waits_for_partial_line(tmp_path: Path, run: Path) -> None:
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    path = tmp_path / "metrics.jsonl"
    tail = JsonlTail(path)
    assert tail.read() == []  # not there yet
    path.write_text(lines[0] + lines[1][:20])
    assert tail.read() == [json.loads(lines[0])]
    with open(path, "a") as f:
        f.write(lines[1][20:] + "".join(lines[2:]))
    assert tail.read() == [json.loads(ln) for ln in lines[1:]]
    assert tail.read() == [] and not tail.reset
    path.write_text(lines[0])  # records removed (--resume): read again from the start
    assert tail.read() == [json.loads(lines[0])] and tail.reset


def test_follow_prints_plain_lines_when_not_a_terminal(run: Path) -> None:
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=False, width=120)
    assert follow(run, lambda: 0, console, interval=0.0) == 0
    out = buf.getvalue().splitlines()
    assert "\x1b" not in buf.getvalue() and "┃" not in buf.getvalue()
    assert [ln for ln in out if ln.startswith("step 3 done (4/4): loss")]
    assert any("client_offline client1" in ln for ln in out)
    assert out[-1].startswith("run_finished")


def test_follow_live_on_a_terminal(run: Path) -> None:
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=120)
    calls = iter([None, 0])
    assert follow(run, lambda: next(calls), console, interval=0.0) == 0
    assert "client1" in buf.getvalue() and "step 4/4" in buf.getvalue()

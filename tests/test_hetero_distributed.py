"""HSplitLoRA over a real Mosquitto: per-client split points and ranks, NAA factors, IWI
probes and ARMSC plans on the wire (runner/methods/hsplitlora_server.py,
runner/methods/hsplitlora_client.py and what they share with HetLoRA's, hetero_*.py).

Same set-up as tests/test_distributed.py (tiny random Llama, synthetic data, LoRA dropout 0
so separate processes draw no random numbers the in-process trainer would draw in another
order): the distributed run must reproduce the in-process trainer step for step.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from runner.distributed.broker import find_mosquitto
from runner.methods.hetero import HeteroTrainer
from runner.methods.plugins import build_trainer
from runner.rundir import read_jsonl
from testbed.backends.local import LocalRun
from tests.test_distributed import (
    _cfg,
    _options,
    assert_measured,
    done_steps,
    events,
    finish,
    in_process,
    train_losses,
    wait_until,
)

pytestmark = [
    pytest.mark.skipif(find_mosquitto() is None,
                       reason="mosquitto not installed (apt-get install -y mosquitto)"),
    pytest.mark.timeout(300),
]


def hcfg(**kw: Any):  # type: ignore[no-untyped-def]
    return _cfg(**{"method": "hsplitlora", "split": None, **kw})


def plans(run_dir: Path) -> list[tuple[int, dict[str, tuple[int, int]]]]:
    """(step, client -> (split, rank sum)) of every reconfigure event."""
    return [(e["step"], {c: (v["split"], v["rank_sum"]) for c, v in e["clients"].items()})
            for e in events(run_dir) if e["event"] == "reconfigure"]


def test_hsplitlora_over_mosquitto_equals_in_process(tmp_path: Path) -> None:
    """Three clients at different split points and ranks: the same per-step losses as the
    in-process trainer (max |diff| <= 1e-5), the same plans after every probe, the same
    validation losses, bytes and final merged adapter."""
    cfg = hcfg(steps=6, agg_interval=2)
    with LocalRun(cfg, tmp_path / "run", _options()) as run:
        run.start()
        finish(run)
    dist = train_losses(run.run_dir)
    ref = in_process(cfg, build_trainer(cfg))
    assert set(dist) == set(ref)
    assert max(abs(dist[k] - ref[k]) for k in ref) <= 1e-5

    tr = build_trainer(cfg)
    summary = tr.fit()
    got = plans(run.run_dir)
    # the initial plan + one per aggregation that has steps after it (the last, at step 6,
    # re-plans nothing: no probe, no ARMSC)
    assert [step for step, _ in got] == [0, 2, 4]
    splits = {s for _, p in got for s, _ in p.values()}
    assert len(splits) > 1, "clients should sit at different split points"
    ref_plan = {h.name: (h.seg.end, sum(h.ranks.values())) for h in tr.clients}
    assert got[-1][1] == ref_plan
    evals = [r for r in read_jsonl(run.run_dir / "metrics.jsonl") if r["kind"] == "eval"]
    assert [e["step"] for e in evals] == [h["step"] for h in tr.history]
    for e, h in zip(evals, tr.history, strict=True):
        assert abs(e["val_loss"] - h["val_loss"]) <= 1e-5
    s = json.loads((run.run_dir / "summary.json").read_text())
    assert abs(s["final_val_ppl"] - summary["final_val_ppl"]) <= 1e-3
    assert s["bytes_sent"] == summary["bytes_sent"]
    assert s["bytes_received"] == summary["bytes_received"]
    assert s["client_splits"] == summary["client_splits"]
    # the probes are charged alike in both engines (issue 29 part 1): bytes and time
    assert s["probe_bytes"] == summary["probe_bytes"] > 0
    assert s["virtual_time_s"] == pytest.approx(summary["virtual_time_s"], rel=1e-9)
    ev = Counter(e["event"] for e in events(run.run_dir))
    assert ev["probe"] == 3 and ev["aggregate"] == 3  # no probe after the last aggregation
    assert ev["client_offline"] == 0 and ev["message_rejected"] == 0
    assert_measured(run.run_dir, {"client0", "client1", "client2"})


@pytest.mark.parametrize("method", ["hetlora", "hsplitlora-no-naa"])
def test_padded_aggregation_methods_over_mosquitto_equal_in_process(
        tmp_path: Path, method: str) -> None:
    """HetLoRA (whole-model clients at per-client ranks) and the no-NAA ablation (split
    clients, padded FedAvg): each client receives its share of the aggregate; the per-step
    losses, evaluations and byte counts equal the in-process trainer's."""
    cfg = hcfg(method=method, steps=6, agg_interval=2)
    with LocalRun(cfg, tmp_path / "run", _options()) as run:
        run.start()
        finish(run)
    dist = train_losses(run.run_dir)
    ref = in_process(cfg, build_trainer(cfg))
    assert set(dist) == set(ref)
    assert max(abs(dist[k] - ref[k]) for k in ref) <= 1e-5
    summary = build_trainer(cfg).fit()
    s = json.loads((run.run_dir / "summary.json").read_text())
    assert abs(s["final_val_ppl"] - summary["final_val_ppl"]) <= 1e-3
    assert (s["bytes_sent"], s["bytes_received"]) == (summary["bytes_sent"],
                                                      summary["bytes_received"])
    assert s["client_rank_sums"] == summary["client_rank_sums"]
    assert len(set(s["client_rank_sums"])) > 1, "ranks should differ across clients"
    rules = {e.get("rule") for e in events(run.run_dir) if e["event"] == "aggregate"}
    assert rules == {"hetlora" if method == "hetlora" else "padded-fedavg"}


def _devices(path: Path, small: int = 369_000_000) -> Path:
    """A slow server (deeper splits pay off) and client2 with a budget that holds only the
    shallowest split point of the tiny Llama (blocks [0, 1))."""
    fast = dict(flops=1e12, bandwidth=1e9, latency=0.001)
    path.write_text(json.dumps({
        "clients": [dict(name="client0", memory_bytes=400_000_000, **fast),
                    dict(name="client1", memory_bytes=400_000_000, **fast),
                    dict(name="client2", memory_bytes=small, **fast)],
        "server": dict(name="server", memory_bytes=8e9, flops=1e9, bandwidth=1e9,
                       latency=0.001)}))
    return path


def test_budget_change_moves_a_split_point_with_block_handover(tmp_path: Path) -> None:
    """`testbed inject budget` mid-run: client2 reports the larger budget, ARMSC re-plans at
    the next aggregation and moves its split point from 1 to 3; the server hands over the
    merged weights of blocks 1 and 2 on the wire. Replaying the same change at the same
    aggregation in-process gives the same per-step losses: the hand-over carried exactly
    the server's merged weights."""
    from testbed.backends.local import inject_budget

    cfg = hcfg(steps=10, agg_interval=2, devices=str(_devices(tmp_path / "devices.json")))
    with LocalRun(cfg, tmp_path / "run", _options(min_step_time=0.3)) as run:
        run.start()
        wait_until(lambda: done_steps(run.run_dir) >= 3, 120, "step 3", run)
        assert "client2" in inject_budget(run.run_dir, "client2", 450_000_000)
        finish(run, timeout=200)
        client_log = run.log_tail("client2")
    ev = events(run.run_dir)
    first = [e for e in ev if e["event"] == "reconfigure"][0]
    assert [first["clients"][c]["split"] for c in ("client0", "client1", "client2")] == [3, 3, 1]
    assert any(e["event"] == "armsc_budget" and e["client"] == "client2"
               and e["budget_bytes"] == 450_000_000 for e in ev)
    moved = [e for e in ev if e["event"] == "split_moved"]
    assert [(e["client"], e["old"], e["new"]) for e in moved] == [("client2", 1, 3)]
    assert moved[0]["bytes"] > 0
    assert "split point 1 -> 3" in client_log
    at = moved[0]["step"]
    budget_reconf = [e for e in ev if e["event"] == "reconfigure" and e["step"] == at]
    assert budget_reconf and budget_reconf[0]["reason"] == "budget"

    # The same change, at the same aggregation, in-process.
    def change(tr: HeteroTrainer, step: int) -> None:
        if step + 1 == at:
            tr.set_budget(2, 450_000_000)

    tr = build_trainer(cfg)
    ref = in_process(cfg, tr, change)
    dist = train_losses(run.run_dir)
    assert set(dist) == set(ref)
    assert max(abs(dist[k] - ref[k]) for k in ref) <= 1e-5
    assert tr.moved_bytes == moved[0]["bytes"]


def test_hsplitlora_client_killed_and_restarted_then_server_killed_and_resumed(
        tmp_path: Path) -> None:
    """Faults with HSplitLoRA: client1 is SIGKILLed and started again (it rejoins with its
    plan and the merged weights of its blocks, then trains again); later the server is
    killed with kill -9 and resumed from its last checkpoint (every client rolls back to the
    checkpoint's merged weights and plan). The run completes, events record both, no step is
    applied twice and the metrics stay valid JSONL."""
    # 30 steps: the server keeps stepping (paced at 0.4 s) while client1 restarts, which
    # under load (two test workers on two cores) can take many steps; the server must still
    # have aggregations ahead of it when it is killed
    cfg = hcfg(steps=30, agg_interval=2, eval_every=2)
    opts = _options(step_timeout=3.0, offline_after=1.5, min_step_time=0.4)
    with LocalRun(cfg, tmp_path / "run", opts) as run:
        run.start()
        wait_until(lambda: done_steps(run.run_dir) >= 3, 120, "step 3", run)
        run.kill("client1")
        run.spawn("client1")

        def back() -> int | None:
            return next((e["step"] for e in events(run.run_dir)
                         if e["event"] == "client_online" and e["client"] == "client1"
                         and e["reason"] == "restarted"), None)

        wait_until(lambda: back() is not None, 150, "client1 back", run)
        # killed once client1 has trained again and a checkpoint holds that
        kill_at = max(9, int(back() or 0) + 3)
        ckpt = run.run_dir / "checkpoint" / "server.pt"
        wait_until(lambda: done_steps(run.run_dir) >= kill_at and ckpt.exists(), 150,
                   f"step {kill_at}", run)
        assert run.procs["server"].poll() is None, \
            f"the server finished before it could be killed (client1 back at step {back()})"
        run.kill("server")
        saved = torch.load(ckpt, weights_only=False)["step"]
        run.spawn("server", resume=True)
        finish(run, timeout=200)
    ev = events(run.run_dir)
    online = {(e["client"], e["reason"]) for e in ev if e["event"] == "client_online"}
    assert ("client1", "restarted") in online, online
    resumed = [e for e in ev if e["event"] == "server_resumed"]
    assert len(resumed) == 1 and resumed[0]["step"] == saved + 1
    losses = train_losses(run.run_dir)  # asserts no (step, client) twice
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    for cid in ("client0", "client1", "client2"):
        assert any(c == cid and s > saved + 1 for s, c in losses), \
            f"{cid} did not train after the resume"
    plans_after = [e for e in ev if e["event"] == "reconfigure" and e["step"] > saved]
    assert plans_after, "the resumed server re-planned after its checkpoint"
    # the virtual clock came back with the checkpoint: it goes on, never restarts at 0
    vt = {(m["step"], m["client"]): m["virtual_time"]
          for m in read_jsonl(run.run_dir / "metrics.jsonl") if m.get("kind") == "train"}
    assert min(t for (st, _), t in vt.items() if st > saved) > max(
        t for (st, _), t in vt.items() if st <= saved) > 0
    s = json.loads((run.run_dir / "summary.json").read_text())
    assert s["final_val_ppl"] < s["pretrained_val_ppl"]

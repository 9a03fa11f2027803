"""HSplitLoRA over a real Mosquitto: per-client split points and ranks, NAA factors, IWI
probes and ARMSC plans on the wire (runner/hetero_server.py, runner/hetero_client.py).

Same set-up as tests/test_distributed.py (tiny random Llama, synthetic data, LoRA dropout 0
so separate processes draw no random numbers the in-process trainer would draw in another
order): the distributed run must reproduce the in-process HeteroTrainer step for step.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from runner.broker import find_mosquitto
from runner.hetero import HeteroTrainer
from runner.rundir import read_jsonl
from testbed.local import LocalRun
from tests.test_distributed import (
    _cfg,
    _options,
    done_steps,
    events,
    finish,
    train_losses,
    wait_until,
)

pytestmark = [
    pytest.mark.skipif(find_mosquitto() is None,
                       reason="mosquitto not installed (apt-get install -y mosquitto)"),
    pytest.mark.timeout(300),
]


def hcfg(**kw: Any):  # type: ignore[no-untyped-def]
    return _cfg(method="hsplitlora", split=None, **kw)


def in_process(cfg) -> tuple[dict[tuple[int, str], float], HeteroTrainer]:  # type: ignore[no-untyped-def]
    """Per-(step, client) losses of HeteroTrainer.fit's loop, and the trainer."""
    tr = HeteroTrainer(cfg)
    out = {}
    for step in range(cfg.steps):
        for r in tr.train_step(step):
            out[(step, r["client"])] = r["loss"]
        if tr.should_aggregate(step):
            tr.aggregate(step)
            tr.after_aggregate(step)
    return out, tr


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
    ref, _ = in_process(cfg)
    assert set(dist) == set(ref)
    assert max(abs(dist[k] - ref[k]) for k in ref) <= 1e-5

    tr = HeteroTrainer(cfg, run=None)
    summary = tr.fit()
    got = plans(run.run_dir)
    assert len(got) == 1 + 3  # initial + one per aggregation
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
    assert s["probe_bytes"] > 0
    ev = Counter(e["event"] for e in events(run.run_dir))
    assert ev["probe"] == 4 and ev["aggregate"] == 3
    assert ev["client_offline"] == 0 and ev["message_rejected"] == 0

"""Budgets respected in-process (issue 29 part 4): a client whose device cannot hold its
configuration, after the method's own rule has shrunk what it can, never trains; a
``not_runnable`` event, the client's offline reason, the summary and the report say which.
Each device file puts one client's budget just below (or above) what the memory model
predicts for it, so the test fails if the check is off by a byte."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from analysis.load import RunSet, load_run
from analysis.report import _caveats
from runner.config import TrainConfig
from runner.errors import ConfigError
from runner.methods.memory import ModelCosts, client_memory
from runner.methods.plugins import build_trainer
from runner.model import lora
from runner.model.models import load_config, materialise
from runner.rundir import RunDir, read_jsonl

BIG = 8 * 2**30


def _cfg(tmp_path: Path, budgets: list[int], **kw) -> TrainConfig:  # type: ignore[no-untyped-def]
    path = tmp_path / "devices.json"
    path.write_text(json.dumps({
        "clients": [{"name": f"d{i}", "memory_bytes": b, "flops": 1e12}
                    for i, b in enumerate(budgets)],
        "server": {"name": "s", "memory_bytes": BIG, "flops": 1e13}}))
    base = dict(model="tiny-llama", data="synthetic", clients=len(budgets), steps=4,
                agg_interval=2, eval_every=2, eval_max_examples=8, max_len=256, lr=5e-3,
                batch_size=4, seed=3, lora_dropout=0.0, devices=str(path))
    base.update(kw)
    return TrainConfig(**base)


def _need(cfg: TrainConfig, blocks: int, rank: int) -> int:
    """The memory model's prediction for one client (the longest example of any shard, as
    the trainer plans: at least plan_seq)."""
    tr = build_trainer(dataclasses.replace(cfg, devices=None))
    seq = max([cfg.plan_seq] + [h.batches.longest for h in tr.clients])
    config = load_config(materialise("tiny-llama"))
    names = lora.weight_names(config, range(blocks), cfg.targets)
    return client_memory(ModelCosts.from_config(config), blocks, {n: rank for n in names},
                         cfg.batch_size, seq).total


def _train(cfg: TrainConfig, path: Path) -> tuple[dict, list[dict], list[dict], RunDir]:
    run = RunDir.create(path, {"train": cfg.to_dict()})
    summary = build_trainer(cfg, run).fit()
    train = [m for m in read_jsonl(run.path / "metrics.jsonl") if m["kind"] == "train"]
    return summary, train, read_jsonl(run.path / "events.jsonl"), run


@pytest.mark.parametrize("method,blocks", [("splitlora", 1), ("fedlora", None)])
def test_a_client_over_its_budget_never_trains(tmp_path: Path, method: str,
                                               blocks: int | None) -> None:
    probe = _cfg(tmp_path, [BIG, BIG, BIG], method=method, split=1)
    need = _need(probe, blocks or load_config(materialise("tiny-llama")).num_hidden_layers,
                 probe.rank)
    cfg = _cfg(tmp_path, [need, need - 1, BIG], method=method, split=1)  # d0 fits exactly
    summary, train, events, run = _train(cfg, tmp_path / "run")
    assert {m["client"] for m in train} == {"client0", "client2"}
    bad = [e for e in events if e["event"] == "not_runnable"]
    assert [(e["client"], e["predicted_bytes"], e["budget_bytes"]) for e in bad] == [
        ("client1", need, need - 1)]
    off = [(e["client"], e["reason"]) for e in events if e["event"] == "client_offline"]
    assert off == [("client1", "not_runnable")]
    assert summary["not_runnable"] == ["client1"]
    notes = _caveats(RunSet([load_run(run.path)]), [])
    assert any("never trained: client1" in n for n in notes), notes


def test_hetlora_client_that_no_rank_fits_never_trains(tmp_path: Path) -> None:
    probe = _cfg(tmp_path, [BIG, BIG], method="hetlora")
    L = load_config(materialise("tiny-llama")).num_hidden_layers
    smallest = min(r for r in probe.rank_set if r > 0)
    need = _need(probe, L, smallest)
    cfg = _cfg(tmp_path, [BIG, need - 1], method="hetlora")
    summary, train, events, _ = _train(cfg, tmp_path / "run")
    assert {m["client"] for m in train} == {"client0"}
    assert summary["not_runnable"] == ["client1"]
    assert any(e["event"] == "budget_violation" for e in events)


def test_hsplitlora_client_that_no_plan_fits_never_trains(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, [BIG, BIG, 1_000_000], method="hsplitlora", split=None)
    summary, train, events, _ = _train(cfg, tmp_path / "run")
    assert {m["client"] for m in train} == {"client0", "client1"}
    assert summary["not_runnable"] == ["client2"]
    bad = [e for e in events if e["event"] == "not_runnable"]
    assert bad and all(e["client"] == "client2" and e["budget_bytes"] == 1_000_000
                       and e["predicted_bytes"] > 1_000_000 for e in bad)
    assert all(e["client"] != "client2" for e in events if e["event"] == "client_online")


def test_no_client_fits_stops_before_training(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, [1_000_000, 1_000_000], method="splitlora", split=1)
    with pytest.raises(ConfigError, match="no client's device can hold its configuration"):
        build_trainer(cfg).fit()

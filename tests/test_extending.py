"""docs/extending.md's worked example: ``splitlora-median`` (examples/splitlora_median.py),
a method added without editing an engine, trains in-process and over Mosquitto."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from runner.config import TrainConfig
from runner.distributed.broker import find_mosquitto
from runner.distributed.runtime import RuntimeOptions
from runner.methods import plugins, registry
from runner.model import lora
from testbed.backends.local import LocalRun
from tests.test_distributed import events, finish, in_process, train_losses

EXAMPLE = "examples.splitlora_median"


def _cfg(**kw: Any) -> TrainConfig:
    base = dict(method="splitlora-median", model="tiny-llama", data="synthetic", clients=3,
                split=1, steps=4, agg_interval=2, eval_every=2, eval_max_examples=16,
                max_len=64, batch_size=4, lora_dropout=0.0, lr=2e-3, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def test_the_example_registers_through_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TESTBED_METHODS", EXAMPLE)
    _cfg().validate()  # an unknown name before the module is loaded
    t = registry.get("splitlora-median")
    assert t.split and not t.hetero and t.aggregation == "median"
    assert "splitlora-median" in registry.names()


def test_a_plugin_module_that_does_not_import_is_a_config_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from runner.errors import ConfigError

    monkeypatch.setenv("TESTBED_METHODS", "examples.no_such_method")
    with pytest.raises(ConfigError, match="TESTBED_METHODS: cannot import 'examples.no_such"):
        _cfg(method="no-such-method").validate()


def test_the_example_trains_in_process_with_its_own_rule(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TESTBED_METHODS", EXAMPLE)
    cfg = _cfg()
    tr = plugins.build_trainer(cfg)
    assert type(tr).__name__ == "MedianTrainer"
    for step in range(2):
        tr.train_step(step)
    before = [lora.adapter_state(h.seg.model) for h in tr.clients]
    before = [{k: v.detach().clone() for k, v in s.items()} for s in before]
    tr.aggregate(1)
    after = lora.adapter_state(tr.clients[0].seg.model)
    for key, value in after.items():
        stack = torch.stack([s[key] for s in before])
        assert torch.equal(value, stack.median(dim=0).values), key
    # ... which is not FedAvg: the clients' adapters differ after two steps
    key = next(k for k in after if k.endswith("lora_B"))
    mean = sum(h.weight * s[key] for h, s in zip(tr.clients, before, strict=True))
    assert not torch.allclose(after[key], mean)
    for h in tr.clients[1:]:  # every client holds the aggregate
        assert all(torch.equal(v, after[k]) for k, v in lora.adapter_state(h.seg.model).items())
    summary = plugins.build_trainer(cfg).fit()
    assert summary["method"] == "splitlora-median"
    assert summary["final_val_ppl"] < summary["pretrained_val_ppl"]


@pytest.mark.timeout(240)
@pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto not installed")
def test_the_example_over_mosquitto_equals_in_process(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server and clients are separate processes that find the method through
    TESTBED_METHODS; the per-step losses equal the in-process trainer's."""
    monkeypatch.setenv("TESTBED_METHODS", EXAMPLE)
    cfg = _cfg(steps=6)
    options = RuntimeOptions(step_timeout=20.0, heartbeat=0.25, offline_after=3.0,
                             join_timeout=90.0, repair_interval=0.5, server_timeout=120.0)
    with LocalRun(cfg, tmp_path / "run", options) as run:
        run.start()
        finish(run)
    dist = train_losses(run.run_dir)
    ref = in_process(cfg, plugins.build_trainer(cfg))
    assert set(dist) == set(ref)
    assert max(abs(dist[k] - ref[k]) for k in ref) <= 1e-5
    aggs = [e for e in events(run.run_dir) if e["event"] == "aggregate"]
    assert len(aggs) == 3 and all(e["weights"] == [1 / 3] * 3 for e in aggs)
    assert json.loads((run.run_dir / "summary.json").read_text())["method"] == "splitlora-median"

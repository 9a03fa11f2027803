"""Virtual time in in-process runs (runner/emulation/vtime.py): the step costs fed to the clock
match a hand computation, and availability traces in a device file decide who trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runner.config import TrainConfig
from runner.emulation.clock import FORWARD_SHARE
from runner.emulation.devices import DeviceSpec
from runner.emulation.vtime import StepClock
from runner.methods.memory import ModelCosts
from runner.model.models import load_config, materialise
from runner.rundir import RunDir, read_jsonl
from runner.trainer import Trainer


@pytest.fixture(scope="module")
def costs() -> ModelCosts:
    return ModelCosts.from_config(load_config(materialise("tiny-llama")))


def _two_clients(costs: ModelCosts) -> tuple[StepClock, list[dict], float, float]:
    """A clock with two clients on different devices, one step's records for them (client
    a runs 1 block, b 3), and each client's finish computed by hand: forward (a third of
    the FLOPs), activations up, the server's pass over both, gradients down, backward."""
    devs = [DeviceSpec("a", 10**9, flops=1e9, bandwidth=1e6, latency=0.01),
            DeviceSpec("b", 10**9, flops=4e9, bandwidth=5e5, latency=0.02)]
    server = DeviceSpec("s", 10**10, flops=1e11, bandwidth=1e8, latency=0.0)
    clock = StepClock(costs, ["a", "b"], devs, server)
    recs = [dict(client="a", seq_tokens=100, tokens=40, bytes_sent=20_000, bytes_received=16_000),
            dict(client="b", seq_tokens=200, tokens=90, bytes_sent=40_000, bytes_received=32_000)]
    F, L = costs.flops_per_token_block, costs.num_layers
    head = 6.0 * costs.hidden * costs.vocab
    fa, fb = 100 * 1 * F, 200 * 3 * F
    arrive_a = FORWARD_SHARE * fa / 1e9 + 20_000 / 1e6 + 0.01
    arrive_b = FORWARD_SHARE * fb / 4e9 + 40_000 / 5e5 + 0.02
    server_flops = 100 * (L - 1) * F + 40 * head + 200 * (L - 3) * F + 90 * head
    server_end = max(arrive_a, arrive_b) + server_flops / 1e11
    fin_a = server_end + 16_000 / 1e6 + 0.01 + (1 - FORWARD_SHARE) * fa / 1e9
    fin_b = server_end + 32_000 / 5e5 + 0.02 + (1 - FORWARD_SHARE) * fb / 4e9
    return clock, recs, fin_a, fin_b


def test_a_probe_takes_a_split_steps_time_without_counting_a_step(costs: ModelCosts) -> None:
    """StepClock.probe (HSplitLoRA's importance probe, issue 29 part 1): the same round
    trip as a step of its clients, from now, but not counted as a step (the clock's step
    count is the dropout round); nobody answered: no time passes."""
    clock, recs, fin_a, fin_b = _two_clients(costs)
    clock.clock.now = 5.0
    assert clock.probe(recs, {"a": 1, "b": 3}) == pytest.approx(5.0 + max(fin_a, fin_b),
                                                                rel=1e-12)
    assert clock.clock.steps == 0
    assert clock.probe([], {}) == clock.now


def test_step_times_match_a_hand_computation(costs: ModelCosts) -> None:
    clock, recs, fin_a, fin_b = _two_clients(costs)
    blocks = {"a": 1, "b": 3}
    timing = clock.step(recs, blocks, full_model=False)
    assert timing.finish[0] == pytest.approx(fin_a, rel=1e-12)
    assert timing.finish[1] == pytest.approx(fin_b, rel=1e-12)
    assert recs[0]["virtual_time"] == pytest.approx(fin_a, abs=1e-6)  # rounded to 1 us
    assert recs[1]["virtual_time"] == pytest.approx(fin_b, abs=1e-6)
    assert clock.now == pytest.approx(max(fin_a, fin_b), rel=1e-12) == timing.end
    # an aggregation: each uploads/downloads its share over its own link; the slowest decides
    before = clock.now
    clock.aggregate(["a", "b"], bytes_up=2_000_000, bytes_down=2_000_000)
    worst = max(2e6 / 1e6 + 0.02, 2e6 / 5e5 + 0.04)
    assert clock.now - before == pytest.approx(worst, rel=1e-12)
    # per-client bytes: the slow link (b) carries only its own small adapters, the fast one
    # (a) the large ones; 400 kB beyond them (a hand-over) is shared equally
    before = clock.now
    clock.aggregate(["a", "b"], bytes_up=1_000_000, bytes_down=3_400_000,
                    per_client={"a": (900_000, 2_700_000), "b": (100_000, 300_000)})
    worst = max((3.6e6 + 2e5) / 1e6 + 0.02, (4e5 + 2e5) / 5e5 + 0.04)
    assert clock.now - before == pytest.approx(worst, rel=1e-12)
    assert worst < 4e6 / 2 / 5e5  # less than the equal split would charge the slow link


def test_availability_trace_in_a_device_file_takes_a_client_offline(tmp_path: Path) -> None:
    """client1 is online only in [0, 1 ns) of virtual time: it trains step 0, then sits out
    with reason "trace"; every record carries a non-decreasing virtual time."""
    devices = {"clients": [
        {"name": "client0", "memory_bytes": 10**9, "flops": 1e9, "bandwidth": 1e6,
         "latency": 0.01},
        {"name": "client1", "memory_bytes": 10**9, "flops": 1e9, "bandwidth": 1e6,
         "latency": 0.01, "availability": {"trace": [[0.0, 1e-9]]}}],
        "server": {"name": "server", "memory_bytes": 10**10, "flops": 1e11,
                   "bandwidth": 1e8, "latency": 0.0}}
    path = tmp_path / "devices.json"
    path.write_text(json.dumps(devices))
    cfg = TrainConfig(method="splitlora", model="tiny-llama", data="synthetic", clients=2,
                      split=1, steps=4, agg_interval=2, eval_every=2, eval_max_examples=8,
                      max_len=64, batch_size=2, devices=str(path))
    run = RunDir.create(tmp_path / "run", {"train": cfg.to_dict()})
    summary = Trainer(cfg, run).fit()
    train = [m for m in read_jsonl(run.path / "metrics.jsonl") if m["kind"] == "train"]
    assert [(m["step"], m["client"]) for m in train if m["client"] == "client1"] == [
        (0, "client1")]
    assert sorted(m["step"] for m in train if m["client"] == "client0") == [0, 1, 2, 3]
    times = [m["virtual_time"] for m in train if m["client"] == "client0"]
    assert all(b > a for a, b in zip(times, times[1:], strict=False)) and times[0] > 0
    evals = [m for m in read_jsonl(run.path / "metrics.jsonl") if m["kind"] == "eval"]
    assert evals[0]["virtual_time"] == 0.0 and evals[-1]["virtual_time"] >= times[-1]
    offline = [e for e in read_jsonl(run.path / "events.jsonl")
               if e["event"] == "client_offline"]
    assert [(e["client"], e["step"], e["reason"]) for e in offline] == [("client1", 1, "trace")]
    assert summary["virtual_time_s"] == pytest.approx(evals[-1]["virtual_time"], abs=1e-6)


def test_runs_without_devices_have_no_virtual_time(tmp_path: Path) -> None:
    cfg = TrainConfig(method="splitlora", model="tiny-llama", data="synthetic", clients=2,
                      split=1, steps=2, agg_interval=2, eval_every=2, eval_max_examples=8,
                      max_len=64, batch_size=2)
    run = RunDir.create(tmp_path / "run", {"train": cfg.to_dict()})
    summary = Trainer(cfg, run).fit()
    assert "virtual_time_s" not in summary
    assert all("virtual_time" not in m for m in read_jsonl(run.path / "metrics.jsonl"))

"""HSplitLoRA's importance probes cost what they cost, in both engines alike (issue 29 part 1):
the probe's round trip is charged to the virtual clock (as a split step of the probed
clients, not counted as a step) and its activations and gradients to the bytes moved (the
``probe`` event, read by analysis/derive.py); its batches come from a stream of their own,
so probing never shifts the training batches; a server's checkpoint carries the virtual
clock. The distributed side of the same charge is checked in tests/test_hetero_distributed.py
(distributed = in-process, probe events included); the clock's own charge against a hand
computation in tests/test_vtime.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from analysis import derive
from analysis.load import RunSet, load_run
from runner import seeds
from runner.config import TrainConfig
from runner.distributed import checkpoint
from runner.emulation.devices import DeviceSpec
from runner.emulation.vtime import StepClock
from runner.methods.memory import ModelCosts
from runner.methods.plugins import build_trainer
from runner.model.models import load_config, materialise
from runner.rundir import RunDir, read_jsonl


def _cfg(**kw) -> TrainConfig:
    base = dict(model="tiny-llama", data="synthetic", clients=3, steps=6, agg_interval=2,
                eval_every=2, eval_max_examples=16, max_len=256, lr=5e-3, batch_size=4,
                seed=3, lora_dropout=0.0, method="hsplitlora")
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("method", ["hsplitlora", "hsplitlora-no-iwi"])
def test_probes_draw_no_training_batch(method: str) -> None:
    """Every client's training stream has given exactly one batch per step, whether the
    method probed (hsplitlora: an initial probe and one after each aggregation but the
    last) or not (the ablation without IWI): both train on the same batches at every step.
    Before probes had their own stream, hsplitlora's clients had drawn 2 batches more."""
    cfg = _cfg(method=method, steps=4)
    tr = build_trainer(cfg)
    for step in range(cfg.steps):
        tr.train_step(step)
        if tr.should_aggregate(step):
            tr.aggregate(step)
            tr.after_aggregate(step)
    for h in tr.clients:
        assert h.batches._consumed == cfg.steps * cfg.batch_size, h.name


def test_the_probe_batch_is_its_own_stream() -> None:
    """The probe batch of (seed, client, step) is fixed, differs between steps and clients,
    and is not the training stream's next batch."""
    tr = build_trainer(_cfg(steps=2))
    h0, h1 = tr.clients[0], tr.clients[1]
    a, b = tr.probe_batch(h0, 2), tr.probe_batch(h0, 2)
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert seeds.probe_batch(3, 0, 2) != seeds.probe_batch(3, 0, 4)
    others = [tr.probe_batch(h0, 4)["input_ids"], tr.probe_batch(h1, 2)["input_ids"],
              h0.batches.next()["input_ids"]]
    assert all(not (o.shape == a["input_ids"].shape and torch.equal(o, a["input_ids"]))
               for o in others)


def test_in_process_probes_are_charged_in_time_and_bytes(tmp_path: Path) -> None:
    """An in-process hsplitlora run logs one ``probe`` event per probe round with the bytes
    of the probed batches' activations (fp32), mask and labels (int64) up and the
    activations' gradients down, and the virtual time the round took; the summary's
    probe_bytes and the report's bytes moved (analysis/derive.py) include them."""
    cfg = _cfg()
    run = RunDir.create(tmp_path / "run", {"train": cfg.to_dict()})
    tr = build_trainer(cfg, run)
    summary = tr.fit()
    probes = [e for e in read_jsonl(run.path / "events.jsonl") if e["event"] == "probe"]
    # the initial probe, then after the aggregations at steps 1 and 3 (not the last, 5)
    assert [e["step"] for e in probes] == [0, 2, 4]
    hidden = tr.config.hidden_size
    for e in probes:
        assert e["clients"] == [h.name for h in tr.clients] and e["missing"] == []
        up = down = 0
        for h in tr.clients:
            b = tr.probe_batch(h, e["step"])
            rows, width = b["input_ids"].shape
            up += rows * width * hidden * 4 + 2 * rows * width * 8
            down += rows * width * hidden * 4
        assert (e["bytes_up"], e["bytes_down"]) == (up, down)
    # the initial probe ran before the clock: charged when it started, without an event field
    assert "virtual_s" not in probes[0]
    assert all(e["virtual_s"] > 0 for e in probes[1:])
    assert summary["probe_bytes"] == sum(e["bytes_up"] + e["bytes_down"] for e in probes)
    # the clock: train records' virtual times jump by at least the probe after an aggregation
    train = [m for m in read_jsonl(run.path / "metrics.jsonl") if m["kind"] == "train"]
    last_before = max(m["virtual_time"] for m in train if m["step"] == 1)
    first_after = min(m["virtual_time"] for m in train if m["step"] == 2)
    assert first_after - last_before > probes[1]["virtual_s"]
    moved = derive.bytes_moved(RunSet([load_run(run.path)])).iloc[0]
    assert moved["probe_bytes"] == summary["probe_bytes"]
    assert moved["total_bytes"] == (moved["train_bytes"] + moved["aggregate_bytes"]
                                    + moved["handover_bytes"] + moved["probe_bytes"])


def test_the_initial_probe_is_charged_when_the_clock_starts() -> None:
    """In-process, the initial probe runs while the trainer is built, before fit() makes the
    clock; clock_started charges it: the clock starts at exactly that probe's time."""
    cfg = _cfg(steps=2)
    tr = build_trainer(cfg)
    assert len(tr.uncharged_probes) == 1
    records, blocks = tr.uncharged_probes[0]
    expected = tr.make_clock()
    assert expected is not None
    want = expected.probe(records, blocks)
    tr.vclock = tr.make_clock()
    tr.clock_started()
    assert want > 0 and tr.vclock is not None
    assert tr.vclock.now == pytest.approx(want, rel=1e-12)
    assert tr.uncharged_probes == []


def test_a_checkpoint_carries_the_virtual_clock(tmp_path: Path) -> None:
    """The server's checkpoint holds the clock's time and step count, and a restored clock
    goes on from there (a resumed run's virtual times no longer restart at 0)."""
    costs = ModelCosts.from_config(load_config(materialise("tiny-llama")))
    devs = [DeviceSpec("a", 10**9, flops=1e9)]
    clock = StepClock(costs, ["a"], devs, DeviceSpec("s", 10**10, flops=1e11))
    clock.step([dict(client="a", seq_tokens=64, tokens=30, bytes_sent=1000,
                     bytes_received=800)], {"a": 1}, full_model=False)
    ck = checkpoint.ServerCheckpoint(step=3, global_step=3, model={}, peers={}, history=[],
                                     totals={}, first=None, last=None,
                                     rng=torch.get_rng_state(), elapsed=1.0,
                                     vclock=clock.state())
    back = checkpoint.ServerCheckpoint.from_state(ck.to_state())
    assert back.vclock == {"now": clock.now, "steps": 1}
    fresh = StepClock(costs, ["a"], devs, DeviceSpec("s", 10**10, flops=1e11))
    assert back.vclock is not None
    fresh.restore(back.vclock)
    assert (fresh.now, fresh.clock.steps) == (clock.now, 1) and fresh.now > 0
    old = {k: v for k, v in ck.to_state().items() if k != "vclock"}  # an older checkpoint
    assert checkpoint.ServerCheckpoint.from_state(old).vclock is None

"""ARMSC: budgets respected, optimal split points, rank allocation, trigger and hysteresis."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.emulation.devices import DeviceSpec, paper_spread
from runner.methods import armsc, memory
from runner.model import lora, models, split

MIB = 2**20


@pytest.fixture(scope="module")
def smol_costs():
    """SmolLM2's sizes from its config alone (no weights needed)."""
    from runner.model.models import load_config

    config = load_config(models.model_info("smollm2-135m").path)
    return memory.ModelCosts.from_config(config), lora.all_candidates(config)


def _devices(budgets_mib, flops=(1e10, 2e10, 4e10, 8e10, 1.6e11)):
    return [DeviceSpec(f"c{i}", int(b * MIB), flops[i % len(flops)])
            for i, b in enumerate(budgets_mib)]


SERVER = DeviceSpec("server", 80 * 2**30, 1e13, bandwidth=1e9, latency=0.001)


@settings(max_examples=40, deadline=None)
@given(budgets=st.lists(st.integers(520, 1400), min_size=1, max_size=5),
       seed=st.integers(0, 1000))
def test_plan_never_exceeds_a_feasible_budget(smol_costs, budgets, seed):
    costs, names = smol_costs
    import random

    rng = random.Random(seed)
    importance = {n: rng.random() for n in names}
    plan = armsc.plan(costs, _devices(budgets), SERVER, importance, names, batch=8, seq=64,
                      reference_targets=("q_proj", "v_proj"), bounds=(1, 29))
    for b, used, k, ranks in zip(plan.budgets, plan.client_memory, plan.splits,
                                 plan.client_ranks, strict=True):
        assert 1 <= k <= 29
        assert all(lora.block_of(n) < k for n in ranks)
        predicted = memory.client_memory(costs, k, ranks, 8, 64).total
        assert predicted == used
        if not any(v.startswith(f"c{plan.budgets.index(b)}:") for v in plan.violations):
            assert predicted <= b
    assert set(plan.server_ranks) <= set(names)


def test_an_impossible_budget_is_logged_not_hidden(smol_costs):
    costs, names = smol_costs
    plan = armsc.plan(costs, _devices([100, 1200]), SERVER, {n: 1.0 for n in names}, names,
                      batch=8, seq=64, reference_targets=("q_proj", "v_proj"))
    assert plan.splits[0] == 1
    assert any(v.startswith("c0:") for v in plan.violations)
    assert not any(v.startswith("c1:") for v in plan.violations)


def test_split_choice_is_the_brute_force_optimum(smol_costs):
    costs, names = smol_costs
    devices = _devices([700, 900, 1300])
    base = armsc.minimal_ranks([n for n in names if n.endswith(("q_proj", "v_proj"))], [0, 2])
    slow_server = DeviceSpec("server", 64 * 2**30, 5e10)
    splits, _ = armsc.choose_splits(costs, devices, slow_server, 512, base, (1, 29), 8, 64)
    feasible = [[k for k in range(1, 30) if memory.client_memory(
        costs, k, base, 8, 64).total <= d.memory_bytes] for d in devices]
    brute = min(armsc.makespan(costs, devices, slow_server, list(c), 512)
                for c in itertools.product(*feasible))
    assert armsc.makespan(costs, devices, slow_server, splits, 512) == pytest.approx(brute)
    # With a slow server, fast large clients take more blocks than the small slow one.
    assert splits[2] > splits[0]


def test_ranks_follow_importance_per_byte(smol_costs):
    costs, names = smol_costs
    mine = [n for n in names if lora.block_of(n) < 2]
    importance = {n: 0.0 for n in mine}
    importance["model.layers.0.self_attn.q_proj"] = 10.0
    importance["model.layers.1.mlp.up_proj"] = 1.0
    ranks = armsc.allocate_ranks(costs, mine, importance, 50 * MIB, (0, 2, 4, 8, 16), 512)
    assert set(ranks) == {"model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"}
    assert ranks["model.layers.0.self_attn.q_proj"] == 16
    small = armsc.allocate_ranks(costs, mine, importance, 2 * MIB, (0, 2, 4, 8, 16), 512)
    assert small and all(r <= 16 for r in small.values())
    assert armsc.allocate_ranks(costs, mine, importance, 0, (0, 2, 4), 512) == {}


def test_trigger_and_hysteresis():
    t = armsc.Trigger(tau=0.2)
    imp = {"a": 1.0, "b": 1.0}
    assert t.reason(imp, [100, 200], ["c0", "c1"]) == "initial"
    t.accept(imp, [100, 200], ["c0", "c1"])
    assert t.reason({"a": 1.1, "b": 1.0}, [100, 200], ["c0", "c1"]) is None  # 5 % < tau
    assert t.reason({"a": 1.5, "b": 1.0}, [100, 200], ["c0", "c1"]) == "importance"
    assert t.reason(imp, [100, 215], ["c0", "c1"]) is None  # 7.5 % budget change
    assert t.reason(imp, [100, 230], ["c0", "c1"]) == "budget"
    assert t.reason(imp, [100], ["c0"]) == "membership"
    assert t.apply_new_splits(10.0, 8.9)
    assert not t.apply_new_splits(10.0, 9.5)


def test_paper_spread_and_device_validation():
    assert paper_spread(5) == [5.0, 8.75, 12.5, 16.25, 20.0]
    from runner.errors import ConfigError

    with pytest.raises(ConfigError):
        DeviceSpec("x", 0, 1e9)


def test_costs_from_a_real_segment_are_consistent():
    info = models.model_info("tiny-llama")
    seg = split.load_client(info.path, 1)
    costs = memory.ModelCosts.from_config(seg.config)
    assert armsc.client_time(costs, DeviceSpec("d", 10**9, 1e9), 2, 100) > \
        armsc.client_time(costs, DeviceSpec("d", 10**9, 1e9), 1, 100)

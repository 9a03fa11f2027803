"""The method registry (runner/methods/registry.py), the shared schedule, seed derivation
and FedAvg: each defined once, and what they say about the built-in methods."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from runner import schedule, seeds
from runner.config import (
    CENTRAL_METHODS,
    HETERO_METHODS,
    METHODS,
    SPLIT_METHODS,
    TrainConfig,
)
from runner.errors import ConfigError
from runner.methods import aggregation, plugins, registry

ROOT = Path(__file__).resolve().parents[1]


def test_builtin_methods_and_their_traits() -> None:
    assert METHODS == ("splitlora", "fedlora", "cenlora", "ft", "hetlora", "hsplitlora",
                       "hsplitlora-no-iwi", "hsplitlora-no-armsc", "hsplitlora-no-naa")
    assert ("splitlora", *METHODS[5:]) == SPLIT_METHODS
    assert CENTRAL_METHODS == ("cenlora", "ft")
    assert METHODS[4:] == HETERO_METHODS
    full = registry.get("hsplitlora")
    assert (full.iwi, full.armsc, full.naa, full.aggregation) == (True, True, True, "naa")
    # the ablations are hsplitlora with one part off
    for name, off in (("hsplitlora-no-iwi", "iwi"), ("hsplitlora-no-armsc", "armsc"),
                      ("hsplitlora-no-naa", "naa")):
        t = registry.get(name)
        assert not getattr(t, off)
        assert all(getattr(t, x) for x in ("iwi", "armsc", "naa") if x != off)
    assert registry.get("hsplitlora-no-naa").aggregation == "padded-fedavg"
    assert registry.get("hetlora").aggregation == "hetlora" and not registry.get("hetlora").split
    assert registry.get("ft").full and registry.get("ft").default_lr == 5e-5
    assert registry.having(fixed_config=True) == ("splitlora", "fedlora")


def test_config_reads_the_registry() -> None:
    assert TrainConfig(method="ft").learning_rate == 5e-5
    assert TrainConfig(method="splitlora").learning_rate == 2e-4
    with pytest.raises(ConfigError, match="unknown method 'nope'; choose one of splitlora"):
        TrainConfig(method="nope").validate()
    with pytest.raises(KeyError, match="unknown method"):
        registry.get("nope")


def test_register_refuses_a_second_definition_and_bad_traits() -> None:
    with pytest.raises(ValueError, match="already registered"):
        registry.register(registry.Traits("splitlora", split=False))
    with pytest.raises(ValueError, match="aggregation"):
        registry.Traits("x", split=True, aggregation="")
    with pytest.raises(ValueError, match="central"):
        registry.Traits("x", split=True, central=True, aggregation="none")


def test_plugin_paths_resolve() -> None:
    for name in METHODS:
        t = registry.get(name)
        for path in [*t.hooks.values(), *([t.trainer] if t.trainer else [])]:
            assert plugins.resolve(path) is not None
    with pytest.raises(ConfigError, match="package.module:attribute"):
        plugins.resolve("runner.methods.hetero")
    with pytest.raises(ConfigError, match="cannot load"):
        plugins.resolve("runner.methods.hetero:Nothing")


def test_no_method_name_tests_in_the_engines() -> None:
    """Acceptance (issue 14): no ``method ==`` outside the method files."""
    out = subprocess.run(["grep", "-rn", "--include=*.py", "method ==", "runner/"], cwd=ROOT,
                         capture_output=True, text=True).stdout
    assert out == "", out


@pytest.mark.parametrize("method,steps,agg,every,want_agg,want_eval", [
    ("splitlora", 7, 3, 4, [2, 5, 6], [6, 7]),  # eval every 4 -> rounded up to 6
    ("fedlora", 4, 2, 1, [1, 3], [2, 4]),
    ("cenlora", 5, 2, 2, [], [2, 4, 5]),
])
def test_schedule(method: str, steps: int, agg: int, every: int, want_agg: list[int],
                  want_eval: list[int]) -> None:
    cfg = TrainConfig(method=method, steps=steps, agg_interval=agg, eval_every=every)
    assert [s for s in range(steps) if schedule.aggregates_after(cfg, s)] == want_agg
    assert [d for d in range(1, steps + 1) if schedule.evaluates_after(cfg, d)] == want_eval
    uploads = [s for s in range(steps) if schedule.sync_due(cfg, s)]
    # a central method's one client uploads at evaluation points; federated ones aggregate
    assert uploads == ([d - 1 for d in want_eval] if method == "cenlora" else want_agg)


def test_seeds_keep_their_values() -> None:
    """Changing a formula changes every run's numbers: the values are pinned."""
    assert seeds.batch_stream(3, 2) == 3002
    assert seeds.adapter_init(3) == 3 and seeds.adapter_init(3, 4) == 3 + 7919 * 4
    assert seeds.client_process(3, 0) == 3000 + 7919


def test_fedavg_weights_and_order() -> None:
    a = {"x": torch.tensor([1.0, 2.0]), "y": torch.tensor([4.0])}
    b = {"x": torch.tensor([3.0, 6.0]), "y": torch.tensor([0.0])}
    avg, w = aggregation.fedavg([a, b], [1.0, 3.0])
    assert w == [0.25, 0.75]
    assert torch.equal(avg["x"], torch.tensor([2.5, 5.0]))
    assert torch.equal(avg["y"], torch.tensor([1.0]))
    with pytest.raises(ValueError, match="positive sum"):
        aggregation.fedavg([a], [0.0])

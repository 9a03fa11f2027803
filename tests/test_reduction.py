"""The explicit CPU reduction of a profile's experiment (testbed/reduction.py): what
`make run` trains when no GPU is visible. The CLI side (printed line, config record, errors)
is in tests/test_cli.py."""

from __future__ import annotations

import pytest

from runner.config import TrainConfig
from runner.errors import UserError
from testbed.reduction import reduce_for_cpu


def test_steps_shortened_with_the_profiles_number_of_evaluations() -> None:
    cfg = TrainConfig(steps=200, eval_every=50, agg_interval=5, eval_max_examples=256)
    reduced, r = reduce_for_cpu(cfg, 40, 128)
    assert r is not None
    assert (reduced.steps, reduced.eval_every, reduced.eval_max_examples) == (40, 10, 128)
    assert reduced.eval_every % cfg.agg_interval == 0  # the trainer evaluates at aggregations
    assert (r.profile_steps, r.profile_eval_every, r.profile_eval_max_examples) == (200, 50, 256)
    line = r.line()
    assert "40 of the profile's 200 steps" in line and "STEPS=200" in line
    assert "128 examples" in line
    # everything else is the profile's
    assert (reduced.method, reduced.batch_size, reduced.lr) == (cfg.method, cfg.batch_size,
                                                                cfg.lr)


def test_no_reduction_when_the_profile_is_short_enough() -> None:
    cfg = TrainConfig(steps=6, eval_every=3, agg_interval=2)
    reduced, r = reduce_for_cpu(cfg, 40)
    assert r is None and reduced == cfg


def test_an_examples_cap_never_raises_the_validation_size() -> None:
    cfg = TrainConfig(steps=200, eval_every=50, eval_max_examples=64)
    reduced, r = reduce_for_cpu(cfg, 20, 128)
    assert reduced.eval_max_examples == 64 and r is not None
    assert "examples" not in r.line()


def test_at_least_one_aggregation_interval_between_evaluations() -> None:
    reduced, _ = reduce_for_cpu(TrainConfig(steps=200, eval_every=10, agg_interval=5), 7)
    assert reduced.eval_every == 5


@pytest.mark.parametrize("steps,examples", [(0, None), (10, 0)])
def test_bad_values_are_user_errors(steps: int, examples: int | None) -> None:
    with pytest.raises(UserError):
        reduce_for_cpu(TrainConfig(), steps, examples)


def test_the_short_runs_learning_rate_is_recorded_and_printed() -> None:
    cfg = TrainConfig(method="hsplitlora", steps=200, eval_every=50, agg_interval=5)
    reduced, r = reduce_for_cpu(cfg, 20, 64, lr=1e-3)
    assert r is not None
    assert reduced.learning_rate == 1e-3 and cfg.learning_rate == 2e-4
    # the schedule follows the steps actually run: warm-up is 5 % of 20, not of 200
    assert reduced.warmup == 1 and cfg.warmup == 10
    assert "peak lr 0.001 (the profile's 0.0002" in r.line()
    assert r.to_dict()["lr"] == 1e-3 and r.to_dict()["profile_lr"] == 2e-4


def test_without_a_cpu_lr_the_profiles_rate_stays_and_is_not_mentioned() -> None:
    reduced, r = reduce_for_cpu(TrainConfig(steps=200, eval_every=50), 20)
    assert r is not None and reduced.lr is None and "lr" not in r.line()


def test_a_non_positive_cpu_lr_is_a_user_error() -> None:
    with pytest.raises(UserError, match="--cpu-lr"):
        reduce_for_cpu(TrainConfig(), 10, lr=0.0)

"""When things happen in a run: aggregations, uploads and evaluations, defined once.

Why: the in-process trainer, the distributed server and its clients must agree step for
step on when adapters travel and when the global model is evaluated (the equivalence tests
compare their records one to one); each used to carry its own copy of these rules.
"""

from __future__ import annotations

import math

from runner.config import TrainConfig
from runner.methods import registry


def aggregates_after(cfg: TrainConfig, step: int) -> bool:
    """Whether a federated method aggregates after 0-based ``step``: every ``agg_interval``
    steps and after the last one (``Trainer.should_aggregate``); never for a central one."""
    return not registry.traits(cfg).central and (
        (step + 1) % cfg.agg_interval == 0 or step + 1 == cfg.steps)


def eval_interval(cfg: TrainConfig) -> int:
    """Steps between evaluations: ``eval_every`` rounded up to a multiple of the aggregation
    interval for federated methods (the global model exists right after an aggregation)."""
    if registry.traits(cfg).central:
        return cfg.eval_every
    return math.ceil(cfg.eval_every / cfg.agg_interval) * cfg.agg_interval


def evaluates_after(cfg: TrainConfig, done: int) -> bool:
    """Whether the run evaluates once ``done`` steps are finished (the last one always)."""
    return done % eval_interval(cfg) == 0 or done == cfg.steps


def sync_due(cfg: TrainConfig, step: int) -> bool:
    """Whether a client's trained state travels to the server after ``step``.

    Federated methods: at every aggregation. Central methods have no aggregation; their
    single client uploads at evaluation points instead so the server can evaluate (the
    "average" of one client is the identity, so the maths does not change). Design choice:
    a central run's uploads follow ``eval_every`` itself (not the rounded interval, which
    is ``eval_every`` anyway for a central method).
    """
    if registry.traits(cfg).central:
        done = step + 1
        return done % cfg.eval_every == 0 or done == cfg.steps
    return aggregates_after(cfg, step)

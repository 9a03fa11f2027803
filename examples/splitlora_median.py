"""``splitlora-median``: SplitLoRA with a coordinate-wise median instead of FedAvg.

A worked example of a method plug-in (docs/extending.md): one file, no engine edited. The
split, the training step, the uploads and the broadcast of the aggregate are SplitLoRA's;
only the aggregation rule differs. The coordinate-wise median (Yin et al., "Byzantine-robust
distributed learning", ICML 2018) keeps one client's faulty or extreme adapter from pulling
the aggregate, at the price of ignoring the data weights ``p_i``.

Use it::

    TESTBED_METHODS=examples.splitlora_median testbed train --method splitlora-median ...

``TESTBED_METHODS`` (comma-separated modules) makes every process of a run (the CLI, a
distributed server and its clients, which inherit the environment) import this module, whose
last statement registers the method; in-process code can simply ``import`` it.
"""

from __future__ import annotations

import torch

from runner.methods.hooks import ServerHooks
from runner.methods.registry import Traits, register
from runner.trainer import Trainer

State = dict[str, torch.Tensor]


def median(states: list[State], weights: list[float]) -> tuple[State, list[float]]:
    """Coordinate-wise median of every tensor over the participants (in the order given).

    Design choice of the example: every participant counts once (the data weights are not
    used; the weights returned, which the ``aggregate`` event records, are uniform). With an
    even count torch takes the lower of the two middle values, so the result is always one
    participant's value: deterministic, and identical in-process and over MQTT.
    """
    with torch.no_grad():
        agg = {key: torch.stack([s[key].detach() for s in states]).median(dim=0).values
               for key in states[0]}
    return agg, [1.0 / len(states)] * len(states)


class MedianTrainer(Trainer):
    """In-process: the SplitLoRA trainer with the median as its aggregation rule."""

    def average(self, states: list[State], weights: list[float]) -> tuple[State, list[float]]:
        return median(states, weights)


class MedianServerHooks(ServerHooks):
    """Distributed: the SplitLoRA server engine with the median as its aggregation rule (the
    clients need no hooks: they upload and load the aggregate as in SplitLoRA)."""

    def average(self, states: list[State], weights: list[float]) -> tuple[State, list[float]]:
        return median(states, weights)


METHOD = register(Traits(
    "splitlora-median", split=True, aggregation="median",
    summary="SplitLoRA with a coordinate-wise median of the adapters instead of FedAvg",
    trainer=f"{__name__}:MedianTrainer", hooks={"server": f"{__name__}:MedianServerHooks"}))

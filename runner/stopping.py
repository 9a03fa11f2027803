"""Stopping rules of a training run: a step cap, a virtual-time budget, early stopping.

Why a separate object: the trainer's loop only asks two questions, after each step ("is the
virtual-time budget spent?") and after each evaluation ("has validation PPL stopped
improving?"), and the answers must be the same wherever a run is trained and recorded the
same way in its events, so experiments (testbed/experiment/run.py) can compare methods that
stopped for different reasons.

Rules (any combination; the first that fires ends the run):

* ``steps`` (TrainConfig.steps) is always the cap: the fixed-steps rule;
* ``stop_virtual_time``: stop after the first step whose end on the run's virtual clock
  (runner/emulation/vtime.py) reaches the budget. The trainer then aggregates (federated methods)
  and evaluates once more, so the last evaluation is of the global model. A run without a
  virtual clock (cenlora / ft, or no device descriptions) cannot apply it: its ``stop_rule``
  event says so and it runs to the cap;
* early stopping (``early_stop_patience`` evaluations, ``early_stop_min_delta`` PPL): inside
  the evaluation cadence. The pretrained evaluation sets the reference; an evaluation
  improves when its PPL is below ``reference - min_delta`` (then it becomes the reference),
  otherwise it counts as stale; ``patience`` stale evaluations in a row stop the run. Like
  Keras' ``EarlyStopping``, the reference moves only on an improvement by the margin, so a
  slow creep below the margin still stops.

The learning-rate schedule is planned for ``steps`` (warm-up, then linear decay to zero at
the cap): a run stopped earlier stops mid-schedule. That is the point of a budget, and it is
the same for every method of an experiment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

STEPS = "steps"
VIRTUAL_TIME = "virtual_time"
EARLY = "early_stopping"


@dataclass
class Stopper:
    """The rule of one run and its state (the reference PPL and the stale count)."""

    max_steps: int
    virtual_time: float | None = None
    patience: int | None = None
    min_delta: float = 0.0
    reference: float = math.inf  # PPL an evaluation must beat by min_delta
    stale: int = 0  # evaluations in a row without such an improvement
    best_ppl: float = math.inf  # lowest PPL seen (whatever the margin)
    best_step: int = 0
    reason: str | None = None  # why the run stopped (None while it runs)

    @classmethod
    def from_config(cls, cfg: Any) -> Stopper:
        """The rule a TrainConfig asks for (fields ``steps``, ``stop_virtual_time``,
        ``early_stop_patience``, ``early_stop_min_delta``; older configs lack the last three)."""
        return cls(max_steps=int(cfg.steps),
                   virtual_time=getattr(cfg, "stop_virtual_time", None),
                   patience=getattr(cfg, "early_stop_patience", None),
                   min_delta=float(getattr(cfg, "early_stop_min_delta", 0.0) or 0.0))

    def describe(self, has_clock: bool) -> dict[str, Any]:
        """The ``stop_rule`` event's fields: the rule as configured and whether the
        virtual-time budget can apply (it needs a virtual clock)."""
        return {"max_steps": self.max_steps, "virtual_time_budget": self.virtual_time,
                "virtual_time_applies": self.virtual_time is not None and has_clock,
                "patience": self.patience, "min_delta": self.min_delta}

    def after_step(self, virtual_time: float | None) -> bool:
        """True when the virtual-time budget is spent (``virtual_time`` None: no clock)."""
        if self.virtual_time is not None and virtual_time is not None \
                and virtual_time >= self.virtual_time:
            self.reason = VIRTUAL_TIME
            return True
        return False

    def after_eval(self, step: int, ppl: float) -> bool:
        """Record one evaluation; True when early stopping fires."""
        if math.isfinite(ppl) and ppl < self.best_ppl:
            self.best_ppl, self.best_step = ppl, step
        if not math.isfinite(self.reference):  # the first (pretrained) evaluation
            if math.isfinite(ppl):
                self.reference = ppl
            return False
        if math.isfinite(ppl) and ppl < self.reference - self.min_delta:
            self.reference, self.stale = ppl, 0
        else:  # no improvement by the margin (a NaN PPL counts as none)
            self.stale += 1
        if self.patience is not None and self.stale >= self.patience:
            self.reason = EARLY
            return True
        return False

    def summary(self, steps_done: int) -> dict[str, Any]:
        """summary.json's stopping fields."""
        return {"steps_done": steps_done, "stop_reason": self.reason or STEPS,
                "best_val_ppl": self.best_ppl if math.isfinite(self.best_ppl) else None,
                "best_step": self.best_step}


__all__ = ["EARLY", "STEPS", "VIRTUAL_TIME", "Stopper"]

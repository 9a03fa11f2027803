"""The explicit reduction of a profile's experiment on a machine without a GPU.

Why: the paper's profiles train for hundreds of steps; on a 2-core CPU the hetero-llama2
fleet needs hours for that, and a newcomer's first `make run` must end, with a real result,
in minutes. So ``testbed up --cpu-steps N`` shortens the run when it trains on the CPU
(``--device cpu``, or ``auto`` without a usable CUDA GPU), and only then, and says so in one
line: the profile itself stays intact, and the full
experiment is one flag away (``--steps``, or ``make run STEPS=200``). Validation is kept to
a few points of the curve: the same number of evaluations the profile makes, spread over the
shorter run on aggregation boundaries (the trainer evaluates at aggregation steps).

A run a tenth as long does not learn the task at the profile's learning rate (2e-4 is tuned
for hundreds of steps), so ``--cpu-lr`` sets the peak of the same schedule for the short run:
warm-up over 5 % of the steps actually run, then linear decay to zero at the last of them
(runner/trainer.py ``make_optimizer``). `make run` uses the recipe measured in
docs/results.md ("make run").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from runner.config import TrainConfig
from runner.errors import UserError


@dataclass(frozen=True)
class Reduction:
    """What a CPU run changed (``None`` fields: unchanged)."""

    steps: int
    profile_steps: int
    eval_every: int
    profile_eval_every: int
    eval_max_examples: int | None
    profile_eval_max_examples: int | None
    lr: float | None = None
    profile_lr: float | None = None

    def line(self) -> str:
        """The one line `testbed up` prints (and the run's config records)."""
        parts = [f"{self.steps} of the profile's {self.profile_steps} steps"]
        if self.lr is not None and self.lr != self.profile_lr:
            parts.append(f"peak lr {self.lr:g} (the profile's {self.profile_lr:g}; warm-up and "
                         f"decay over the {self.steps} steps)")
        parts.append(f"validation every {self.eval_every} steps")
        if self.eval_max_examples != self.profile_eval_max_examples:
            parts.append(f"on {self.eval_max_examples} examples")
        return (f"no GPU here: a CPU run of {', '.join(parts)}; the full profile: "
                f"--steps {self.profile_steps} (make run STEPS={self.profile_steps})")

    def to_dict(self) -> dict[str, int | None]:
        return {"steps": self.steps, "profile_steps": self.profile_steps,
                "eval_every": self.eval_every, "profile_eval_every": self.profile_eval_every,
                "eval_max_examples": self.eval_max_examples,
                "profile_eval_max_examples": self.profile_eval_max_examples,
                "lr": self.lr, "profile_lr": self.profile_lr}


def gpu_visible(device: str = "auto") -> bool:
    """Whether the run trains on a CUDA device (the full profile runs there): keyed on the
    device ``--device`` resolves to here, never on a GPU merely being visible. On a GPU host a
    run asked to stay on the CPU (``--device cpu``) is a CPU run and is reduced like one; the
    name stays for the callers (docs/gpu.md "Device placement")."""
    from runner import device as placement

    return placement.is_cuda(placement.resolve(device))


def reduce_for_cpu(cfg: TrainConfig, cpu_steps: int, eval_examples: int | None = None,
                   lr: float | None = None) -> tuple[TrainConfig, Reduction | None]:
    """``cfg`` shortened to ``cpu_steps`` (no-op when the profile is already that short).

    The number of evaluations stays what the profile makes (at least 2 after step 0), at
    multiples of the aggregation interval; ``eval_examples`` caps the validation set;
    ``lr`` is the short run's peak learning rate (the schedule's warm-up and decay follow
    the steps actually run, as for any run).
    """
    if cpu_steps < 1:
        raise UserError(f"--cpu-steps must be >= 1, got {cpu_steps}")
    if eval_examples is not None and eval_examples < 1:
        raise UserError(f"--cpu-eval-examples must be >= 1, got {eval_examples}")
    if lr is not None and not lr > 0:
        raise UserError(f"--cpu-lr must be > 0, got {lr:g}")
    if cpu_steps >= cfg.steps:
        return cfg, None
    evals = max(2, math.ceil(cfg.steps / cfg.eval_every))
    interval = cfg.agg_interval
    every = max(interval, math.ceil(cpu_steps / evals / interval) * interval)
    examples = cfg.eval_max_examples
    if eval_examples is not None and (examples is None or eval_examples < examples):
        examples = eval_examples
    profile_lr = cfg.learning_rate
    reduced = replace(cfg, steps=cpu_steps, eval_every=every, eval_max_examples=examples,
                      lr=cfg.lr if lr is None else lr)
    return reduced, Reduction(cpu_steps, cfg.steps, every, cfg.eval_every, examples,
                              cfg.eval_max_examples, lr, profile_lr)

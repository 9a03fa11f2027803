"""Training configuration: one dataclass, validated before anything heavy is loaded.

Defaults follow docs/method.md "Defaults" (SplitLoRA paper and code). Every bad value raises a
:class:`~runner.errors.ConfigError` with one line that names the option and its valid range.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from runner import device as placement
from runner.errors import ConfigError
from runner.methods import registry

# Name sets of the built-in methods, derived from their traits (runner/methods/registry.py)
# for the control plane's choices and messages; code asks a method's traits instead.
METHODS = registry.having()  # the built-in ones (a plug-in loads later: names())
HSPLIT_METHODS = registry.having(hetero=True, split=True)
SPLIT_METHODS = registry.having(split=True)
FEDERATED_METHODS = registry.having(central=False)
CENTRAL_METHODS = registry.having(central=True)
HETERO_METHODS = registry.having(hetero=True)
# fp16 is for GPUs without bf16 arithmetic (before Ampere): autocast in float16 with a loss
# scaler per optimizer (runner/trainer.py Holder; docs/gpu.md "Device placement").
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Everything that determines a training run (snapshotted into the run directory)."""

    method: str = "splitlora"
    model: str = "smollm2-135m"
    data: str | None = None
    clients: int = 3
    split: int | None = None  # None: L/4 (docs/method.md "Defaults")
    rank: int = 8
    targets: tuple[str, ...] = ("q", "v")
    steps: int = 200
    batch_size: int = 8
    lr: float | None = None  # None: 2e-4 for LoRA methods, 5e-5 for ft
    weight_decay: float = 0.01
    warmup_steps: int | None = None  # None: 5 % of steps
    agg_interval: int = 5
    lora_alpha: float = 32.0
    lora_dropout: float = 0.1
    label_smoothing: float = 0.1
    max_len: int = 128
    partition: str = "iid"
    dirichlet_alpha: float = 0.5
    partition_attribute: str = "eatType"
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    eval_every: int = 50
    eval_max_examples: int | None = 256
    seed: int = 0
    # "fp32", "bf16" or "fp16": forwards under torch.autocast (runner.model.split.autocast;
    # fp16 adds a loss scaler, runner/trainer.py Holder). Exactness tests and the default stay
    # fp32.
    precision: str = "fp32"
    # Where this process trains: "auto" (the first CUDA GPU when one is usable, else the CPU),
    # "cpu", "cuda" or "cuda:N" (runner/device.py). Each process resolves it on its own host,
    # so one config serves a GPU server and CPU clients; TESTBED_DEVICE overrides it per
    # process (runner/distributed/runtime.py).
    device: str = "auto"
    # Scheduled dropouts for in-process runs: (client index, first step, end step), the
    # client is offline for steps [first, end). The distributed runtime injects real ones.
    dropouts: tuple[tuple[int, int, int], ...] = ()
    # Heterogeneous methods (hsplitlora*, hetlora): device descriptions (YAML/JSON file;
    # None: the paper's 5-20 GB spread emulated on the model, see runner.methods.hetero), rank set,
    # ARMSC trigger threshold, split bounds and the planning sequence length.
    devices: str | None = None
    rank_set: tuple[int, ...] = (0, 2, 4, 8, 16)
    tau: float = 0.2
    split_bounds: tuple[int, int] | None = None
    plan_seq: int = 64
    iwi_batches: int = 1
    # The weights hsplitlora* may adapt (runner/model/lora.py candidates): "all" (every
    # projection, the paper's method) or "targets" (only --targets: capacity-matched with the
    # baselines, with e.g. rank_set (0, 8)). An experiment-file setting, no CLI option.
    candidates: str = "all"
    # Clients per server forward/backward pass (0: all of a step's clients in one
    # concatenated batch, docs/method.md "Training step"). A positive value bounds the
    # server's autograd graph, the part of its memory that grows with the number of clients:
    # chunks are back-propagated one after the other and the adapter gradients accumulate, the same
    # gradient up to float summation order. hsplitlora's IWI probe takes the same chunks
    # (runner/methods/hsplitlora.py probe_server).
    server_chunk: int = 0
    # Stopping rules (runner/stopping.py): ``steps`` is the cap; a budget of virtual seconds
    # (the run's virtual clock) and early stopping on validation PPL (``patience``
    # evaluations without an improvement of more than ``min_delta`` PPL) may end it sooner.
    # In-process runs only (the distributed server runs to ``steps``).
    stop_virtual_time: float | None = None
    early_stop_patience: int | None = None
    early_stop_min_delta: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Check ranges that do not need the model; split bounds are checked once L is known."""
        if self.method not in registry.names():
            raise ConfigError(f"unknown method '{self.method}'; choose one of "
                              f"{', '.join(registry.names())}")
        checks = [
            (self.clients >= 1, f"--clients must be >= 1, got {self.clients}"),
            (self.rank >= 1, f"--rank must be >= 1, got {self.rank}"),
            (self.steps >= 1, f"--steps must be >= 1, got {self.steps}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.agg_interval >= 1, f"--agg-interval must be >= 1, got {self.agg_interval}"),
            (self.max_len >= 8, f"--max-len must be >= 8, got {self.max_len}"),
            (0.0 <= self.lora_dropout < 1.0, "--lora-dropout must be in [0, 1)"),
            (0.0 <= self.label_smoothing < 1.0, "--label-smoothing must be in [0, 1)"),
            (self.lr is None or self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (self.candidates in ("all", "targets"),
             f"candidates must be 'all' or 'targets', got {self.candidates!r}"),
            (self.server_chunk >= 0,
             f"--server-chunk must be >= 0 clients (0: all at once), got {self.server_chunk}"),
            (self.eval_every >= 1, f"--eval-every must be >= 1, got {self.eval_every}"),
            (bool(self.targets), "--targets must name at least one projection"),
            (self.precision in PRECISIONS,
             f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"),
            (self.stop_virtual_time is None or self.stop_virtual_time > 0,
             f"--stop-virtual-time must be > 0 seconds, got {self.stop_virtual_time}"),
            (self.early_stop_patience is None or self.early_stop_patience >= 1,
             f"--early-stop-patience must be >= 1 evaluations, got {self.early_stop_patience}"),
            (self.early_stop_min_delta >= 0,
             f"--early-stop-min-delta must be >= 0, got {self.early_stop_min_delta}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        placement.check(self.device)
        for client, first, end in self.dropouts:
            if not (0 <= client < self.clients and 0 <= first < end):
                raise ConfigError(
                    f"--dropout {client}:{first}:{end} needs 0 <= client < {self.clients} and "
                    "0 <= first < end (client offline for steps [first, end))"
                )

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return registry.get(self.method).default_lr

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else max(1, self.steps // 20)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["targets"] = list(self.targets)
        d["split_fractions"] = list(self.split_fractions)
        d["dropouts"] = [list(x) for x in self.dropouts]
        d["rank_set"] = list(self.rank_set)
        d["split_bounds"] = list(self.split_bounds) if self.split_bounds else None
        d["learning_rate"] = self.learning_rate
        d["warmup"] = self.warmup
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in d.items() if k in known}
        if "targets" in kw:
            kw["targets"] = tuple(kw["targets"])
        for key in ("rank_set", "split_bounds"):
            if kw.get(key) is not None:
                kw[key] = tuple(kw[key])
        if "dropouts" in kw:
            kw["dropouts"] = tuple(tuple(x) for x in kw["dropouts"])
        if "split_fractions" in kw:
            kw["split_fractions"] = tuple(kw["split_fractions"])
        return cls(**kw)

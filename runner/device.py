"""Where training runs: one place that turns ``--device`` into a ``torch.device``.

Why: every decision that depends on where training runs (the main job's CPU reductions,
the precision, whether the stand-in emulates a reference model, which memory figures a
budget is compared with) must follow the device actually used, never whether a GPU happens
to be visible (``torch.cuda.is_available()``): on a GPU host a run asked to stay on the CPU
is a CPU run. Engines call :func:`resolve` once and keep the model, the batches and every
tensor they create on the result (docs/gpu.md).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from runner.errors import ConfigError

#: What ``--device`` accepts: ``auto`` (the first CUDA GPU when one is visible, else the
#: CPU), ``cpu``, ``cuda`` (the current CUDA device) or ``cuda:N``.
DEVICE_SPEC = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def check(spec: str) -> str:
    """``spec`` if ``--device`` accepts it; raises a one-line ConfigError otherwise (no
    CUDA query: a configuration is validated where it is written, maybe on another host)."""
    if not isinstance(spec, str) or DEVICE_SPEC.match(spec) is None:
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {spec!r}")
    return spec


def resolve(spec: str = "auto") -> torch.device:
    """The ``torch.device`` that ``spec`` names on this host. ``auto`` picks ``cuda:0``
    only when CUDA is usable here; ``cuda``/``cuda:N`` without CUDA, or past the last GPU,
    is a ConfigError saying so (never a silent fall-back to the CPU)."""
    check(spec)
    if spec == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if spec == "auto":
        return torch.device("cuda", 0) if available else torch.device("cpu")
    if not available:
        raise ConfigError(f"--device {spec}: no CUDA GPU is usable here (torch "
                          f"{torch.__version__}); use --device cpu or auto")
    index = int(spec.split(":")[1]) if ":" in spec else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(f"--device {spec}: this host has {count} CUDA device(s), "
                          f"numbered 0-{count - 1}")
    return torch.device("cuda", index)


def is_cuda(device: torch.device | str) -> bool:
    """Whether ``device`` is a CUDA device (decisions keyed on where training runs)."""
    return torch.device(device).type == "cuda"


def of(module: torch.nn.Module) -> torch.device:
    """The device a model's weights are on (its first parameter's, else its first buffer's;
    the CPU for a module without tensors). Engines key what they create on this rather than
    on the configured spec, so that a segment loaded anywhere keeps its own tensors there."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def to(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """``batch`` (input ids, attention mask, labels, ...) on ``device``.

    Batches are built on the CPU (runner/dataset/data.py: tokenising and padding are host
    work) and cross to the device once, here. On the CPU ``Tensor.to`` returns the same
    tensors, so a CPU run is bit-identical to one without this call."""
    return {k: v.to(device) for k, v in batch.items()}


def landed(tensors: Mapping[str, torch.Tensor],
           device: torch.device | None) -> dict[str, torch.Tensor]:
    """Decoded wire tensors on the receiver's ``device`` (None: where decoding put them, the
    CPU). What crosses the wire is device-independent (runner/distributed/protocol/encoder.py
    encodes from the CPU); each process moves what it receives to the device it trains on."""
    if device is None:
        return dict(tensors)
    return {k: v.to(device) for k, v in tensors.items()}

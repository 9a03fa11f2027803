"""Choosing a run's training precision: ``--precision fp32|bf16|fp16|auto``.

Why a choice and not always bf16: exactness (split = unsplit, distributed = in-process) is
checked in fp32, and bf16 autocast is only fast where the hardware has bf16 arithmetic (CUDA
GPUs from Ampere on; x86 CPUs with AMX or AVX512-BF16 — measured 1.58x for a SmolLM2 LoRA
step on the CI machine, ../shared/docs/environment.md). Elsewhere PyTorch emulates bf16 and
a step gets slower, so ``auto`` picks bf16 only where it pays and says which it picked.
What bf16 does to a run is in runner/model/split.py (``autocast``): forwards run in bf16, while
weights, optimizer state and the wire stay fp32. On a GPU without bf16 (before Ampere) ``auto``
picks fp16 autocast with a loss scaler instead (runner/trainer.py ``grad_scaler``). The choice
follows the device the run trains on (``--device``), not whether a GPU is visible
(docs/gpu.md "Device placement").
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from runner.config import PRECISIONS
from runner.errors import UserError

if TYPE_CHECKING:
    import torch

CHOICES = (*PRECISIONS, "auto")
_CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_bf16_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """The CPU's bf16 instruction-set flags (empty where none, or /proc is not Linux's)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return []
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return [f for f in _CPU_BF16_FLAGS if f in flags]
    return []


def cuda_bf16(device: torch.device) -> bool:
    """Whether CUDA device ``device`` runs bf16 natively (compute capability 8.0, Ampere, and
    later; earlier GPUs emulate it)."""
    import torch

    return bool(torch.cuda.get_device_capability(device)[0] >= 8)


def gpu_name(device: torch.device) -> str:
    """``cuda:N (NVIDIA H100 80GB HBM3)``: the device as the precision line names it."""
    import torch

    return f"{device} ({torch.cuda.get_device_name(device)})"


def resolve(choice: str, cpuinfo: Path = Path("/proc/cpuinfo"),
            device: torch.device | None = None) -> tuple[str, str]:
    """(``fp32``, ``bf16`` or ``fp16``, the one line `testbed up`/`train` print about it).

    Keyed on ``device``, where the run trains (``--device`` resolved, runner/device.py; None:
    ``auto`` on this host), never on a GPU merely being visible: on a CUDA device ``auto``
    is bf16 where the GPU has bf16 arithmetic (Ampere on) and else fp16 with a loss scaler
    (runner/trainer.py ``grad_scaler``); on the CPU it is what it always was (bf16 with AMX
    or AVX512-BF16, else fp32). LoRA weights, optimizer state and the wire stay fp32 in every
    case (runner/model/split.py ``autocast``)."""
    from runner import device as placement

    if choice not in CHOICES:
        raise UserError(f"--precision must be one of {', '.join(CHOICES)}, got {choice!r}")
    if choice == "fp32":
        return "fp32", "precision: fp32"
    where = placement.resolve("auto") if device is None else device
    kept = "weights, optimizer and wire stay fp32"
    if placement.is_cuda(where):
        name = gpu_name(where)
        if choice == "fp16":
            return "fp16", f"precision: fp16 autocast with a loss scaler on {name}; {kept}"
        if cuda_bf16(where):
            return "bf16", (f"precision: bf16 autocast on {name}; {kept} (--precision fp32 "
                            "for the exact fp32 run)")
        if choice == "auto":
            return "fp16", (f"precision: fp16 autocast with a loss scaler on {name} (no bf16 "
                            f"arithmetic before Ampere); {kept}")
        return "bf16", (f"precision: bf16 autocast, although {name} has no bf16 arithmetic "
                        "(expect it slower than fp16 or fp32)")
    if choice == "fp16":
        return "fp16", ("precision: fp16 autocast with a loss scaler on the CPU (fp16 is for "
                        "GPUs without bf16; expect it slower than fp32)")
    flags = cpu_bf16_flags(cpuinfo)
    if choice == "auto" and not flags:
        return "fp32", ("precision: fp32 (auto: no bf16 arithmetic on this machine; bf16 "
                        "would be emulated and slower)")
    if not flags:
        return "bf16", ("precision: bf16 autocast, although this machine has no bf16 "
                        "arithmetic (expect it slower than fp32)")
    return "bf16", (f"precision: bf16 autocast on this CPU ({', '.join(flags)}); {kept} "
                    "(--precision fp32 for the exact fp32 run)")

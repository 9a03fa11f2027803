"""Choosing a run's training precision: ``--precision fp32|bf16|auto``.

Why a choice and not always bf16: exactness (split = unsplit, distributed = in-process) is
checked in fp32, and bf16 autocast is only fast where the hardware has bf16 arithmetic (CUDA
GPUs from Ampere on; x86 CPUs with AMX or AVX512-BF16 — measured 1.58x for a SmolLM2 LoRA
step on the CI machine, ../shared/docs/environment.md). Elsewhere PyTorch emulates bf16 and
a step gets slower, so ``auto`` picks bf16 only where it pays and says which it picked.
What bf16 does to a run is in runner/model/split.py (``autocast``): forwards run in bf16, while
weights, optimizer state and the wire stay fp32.
"""

from __future__ import annotations

from pathlib import Path

from runner.config import PRECISIONS
from runner.errors import UserError

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


def cuda_bf16() -> bool:
    """Whether a visible CUDA device runs bf16 natively."""
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def resolve(choice: str, cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[str, str]:
    """(``fp32`` or ``bf16``, the one line `testbed up`/`train` print about it)."""
    if choice not in CHOICES:
        raise UserError(f"--precision must be one of {', '.join(CHOICES)}, got {choice!r}")
    if choice == "fp32":
        return "fp32", "precision: fp32"
    where = "a CUDA GPU" if cuda_bf16() else ""
    flags = cpu_bf16_flags(cpuinfo)
    if not where and flags:
        where = f"this CPU ({', '.join(flags)})"
    if choice == "auto" and not where:
        return "fp32", ("precision: fp32 (auto: no bf16 arithmetic on this machine; bf16 "
                        "would be emulated and slower)")
    if not where:
        return "bf16", ("precision: bf16 autocast, although this machine has no bf16 "
                        "arithmetic (expect it slower than fp32)")
    return "bf16", (f"precision: bf16 autocast on {where}; weights, optimizer and wire stay "
                    "fp32 (--precision fp32 for the exact fp32 run)")

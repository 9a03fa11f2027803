"""This process's CPU share, and as many torch threads as that share can keep busy.

Why: an emulated device's container gets a CPU quota proportional to its compute (a slow
Jetson-class client may get 0.12 of a CPU, testbed/backends/compose.py), but torch sizes its thread
pool from the host's cores. Two OpenMP threads under a 0.12-CPU CFS quota burn the quota in
half the period and then both stall (and spin-wait on each other), so a step takes several
times longer than one thread would. Kubernetes CPU limits are the same CFS quota. An explicit
``OMP_NUM_THREADS`` / ``TESTBED_THREADS`` always wins.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def cpu_quota(root: Path = CGROUP) -> float | None:
    """CPUs this cgroup may use (quota / period), or None when unlimited or unknown.

    cgroup v2: ``cpu.max`` holds ``"QUOTA PERIOD"`` or ``"max PERIOD"``; v1:
    ``cpu/cpu.cfs_quota_us`` (-1 = unlimited) and ``cpu/cpu.cfs_period_us`` (also found
    under ``cpu,cpuacct/``).
    """
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for sub in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        try:
            q = int((root / sub / "cpu.cfs_quota_us").read_text())
            p = int((root / sub / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if q <= 0 or p <= 0 else q / p
    return None


def threads_for(quota: float | None, cores: int) -> int:
    """Threads worth running: the quota rounded down (at least 1), at most the cores."""
    if quota is None:
        return max(1, cores)
    return max(1, min(cores, math.floor(quota + 1e-9)))


def fit_threads(root: Path = CGROUP) -> tuple[int, float | None]:
    """Set torch's intra-op threads to what this process's CPU quota can keep busy.

    Returns (threads now in use, quota). Leaves torch alone when the user chose
    (``TESTBED_THREADS`` or ``OMP_NUM_THREADS``) or no quota is set.
    """
    import torch

    quota = cpu_quota(root)
    chosen = os.environ.get("TESTBED_THREADS") or os.environ.get("OMP_NUM_THREADS")
    if chosen and chosen.strip().isdigit() and int(chosen) >= 1:
        torch.set_num_threads(int(chosen))
    elif quota is not None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1)
        torch.set_num_threads(threads_for(quota, cores))
    return torch.get_num_threads(), quota

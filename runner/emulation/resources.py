"""Measured resource use of this process (or its container): memory now and at its peak.

runner/emulation/budget.py says how much memory a client *may* use; this module says how much it
*does* use, so heartbeats and metrics records can show measured memory against the budget
(docs/run-format.md "Measured resources"). One :class:`Meter` per process; each
:meth:`Meter.sample` returns a :class:`Usage`:

* **cgroup** (``source="cgroup"``): in a container with a memory limit, what the kernel
  charges against that limit: v2 ``memory.current`` / ``memory.peak``, v1
  ``memory.usage_in_bytes`` / ``memory.max_usage_in_bytes`` of the container's own cgroup
  (page cache included, as the OOM killer counts it). Design choice: only the process's
  *own* cgroup counts, only when it has a limit, and only when no other process lives in it
  (``cgroup.procs`` lists nothing but this process and its parent, e.g. an init): a
  process started next to others (the local backend, even inside a limited container)
  would otherwise be charged with their memory.
* **rss** (``source="rss"``): otherwise the process's resident set, current ``VmRSS`` and
  peak ``VmHWM`` from ``/proc/self/status`` (``resource.getrusage`` where /proc is absent).
* **GPU**: when this process has initialised CUDA (torch already imported), the figure the
  GPU budget is compared with: ``source="nvml"`` with NVML's per-process used memory
  (``nvmlDeviceGetComputeRunningProcesses``: CUDA context and allocator cache included) when
  NVML lists this PID, else ``source="cuda"`` with ``torch.cuda.memory_allocated`` /
  ``max_memory_allocated``. The host figure (cgroup or RSS) then goes along as ``host_*``
  fields, and the CUDA allocator's figures as ``cuda_*`` fields (allocated, and reserved:
  what the per-process cap of runner/emulation/gpu.py bounds). NVML reports host PIDs, so
  in a container without the host's PID namespace it does not list us and ``cuda`` is used.
  The device is the one CUDA uses (``device``, else the current one), found in NVML by the
  UUID CUDA reports for it: NVML's own numbering may differ from CUDA's (docs/gpu.md).

A kernel without ``memory.peak`` (before 5.19) or NVML (no peak at all) gets the peak of the
samples this meter took. Nothing here raises: a source that does not answer falls through to
the next; RSS always answers on Linux.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.emulation.budget import (
    CGROUP_ROOT,
    PROC_SELF_CGROUP,
    _own_path,
    _parse_limit,
    with_nvml_device,
)

PROC_SELF_STATUS = Path("/proc/self/status")
# (limit, current, peak) file names per cgroup version
_FILES = {"v2": ("memory.max", "memory.current", "memory.peak"),
          "v1": ("memory.limit_in_bytes", "memory.usage_in_bytes", "memory.max_usage_in_bytes")}


@dataclass(frozen=True)
class Usage:
    """One memory reading in bytes: ``current`` and ``peak`` (since the process or container
    started), where they came from (cgroup | rss | nvml | cuda), the limit the cgroup sets
    (None when not measured in a limited cgroup) and extra figures (``host_*``, ``cuda_*``)."""

    current: int
    peak: int
    source: str
    limit: int | None = None
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def fields(self) -> dict[str, Any]:
        """The record / heartbeat fields (docs/run-format.md): ``memory_current_bytes``,
        ``memory_peak_bytes``, ``memory_source`` and, when present, ``memory_limit_bytes``
        and the extra figures."""
        out: dict[str, Any] = {"memory_current_bytes": self.current,
                               "memory_peak_bytes": self.peak, "memory_source": self.source}
        if self.limit is not None:
            out["memory_limit_bytes"] = self.limit
        out.update(self.extra)
        return out


# ------------------------------------------------------------------------------ cgroups
def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _alone(leaf: Path, pids: set[int]) -> bool:
    """Whether the cgroup holds no process but ``pids`` (PID 0: a process this namespace
    cannot see; an unreadable list counts as ours)."""
    try:
        found = {int(x) for x in (leaf / "cgroup.procs").read_text().split()}
    except (OSError, ValueError):
        return True
    return found <= pids | {0}


def own_cgroup(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP,
               pids: set[int] | None = None) -> tuple[Path, str, int] | None:
    """This process's own memory cgroup directory, its version (v2 | v1) and its limit, or
    None when it has no limit, cannot be seen, or holds other processes than ``pids``
    (default: this process and its parent).

    v2: ``root/<path of the 0:: line>``; v1: ``root/memory/<path of the memory line>``. In a
    container the cgroup namespace (v2) or the bind mount (v1) puts the container's cgroup at
    the mount point itself while /proc/self/cgroup may still name the host's path: when the
    named directory does not exist, the mount point is ours."""
    root = Path(root)
    v2 = (root / "cgroup.controllers").exists() or (root / "memory.max").exists()
    version = "v2" if v2 else "v1"
    base = root if v2 else root / "memory"
    own = _own_path(Path(proc_cgroup), v1=not v2)
    leaf = base / own.strip("/") if own and own != "/" else base
    if not leaf.is_dir():
        leaf = base
    limit_name = _FILES[version][0]
    try:
        limit = _parse_limit((leaf / limit_name).read_text())
    except OSError:
        return None
    if limit is None or not _alone(leaf, {os.getpid(), os.getppid()} if pids is None
                                   else pids):
        return None
    return leaf, version, limit


def cgroup_usage(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP,
                 pids: set[int] | None = None) -> Usage | None:
    """The container's memory use as its cgroup counts it (no peak file -> current; the
    meter keeps the maximum), or None outside a memory-limited cgroup of its own."""
    found = own_cgroup(root, proc_cgroup, pids)
    if found is None:
        return None
    leaf, version, limit = found
    _, cur_name, peak_name = _FILES[version]
    current = _read_int(leaf / cur_name)
    if current is None:
        return None
    peak = _read_int(leaf / peak_name)
    return Usage(current, max(current, peak or 0), "cgroup", limit,
                 f"cgroup-{version} {leaf}")


# ---------------------------------------------------------------------------------- RSS
def rss_usage(proc_status: Path = PROC_SELF_STATUS) -> Usage:
    """Resident set size now (VmRSS) and at its peak (VmHWM); getrusage's peak as fallback."""
    values: dict[str, int] = {}
    try:
        for line in Path(proc_status).read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024  # "123456 kB"
    except (OSError, ValueError, IndexError):
        values = {}
    peak_ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_ru *= 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    current = values.get("VmRSS", peak_ru)
    peak = max(values.get("VmHWM", peak_ru), current)
    return Usage(current, peak, "rss", None, "VmRSS/VmHWM" if values else "getrusage")


# ---------------------------------------------------------------------------------- GPU
def _torch_cuda() -> Any:
    """``torch.cuda`` when torch is already imported and CUDA initialised, else None (this
    module never imports torch: the server and clients have, and a CPU run has no CUDA)."""
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None) if torch is not None else None
    try:
        return cuda if cuda is not None and cuda.is_initialized() else None
    except Exception:  # noqa: BLE001 - a broken CUDA install is the same as none
        return None


def nvml_process_bytes(pid: int, env: Mapping[str, str] | None = None,
                       nvml: Any = None, uuid: str | None = None) -> int | None:
    """GPU memory NVML says process ``pid`` uses on the device this process sees (``uuid``:
    the one CUDA uses; the same device runner/emulation/budget.py measures), or None (no
    NVML, no GPU, not listed)."""

    def used_by(nvml: Any, found: tuple[Any, int | None, str], _env: Any) -> int | None:
        for proc in nvml.nvmlDeviceGetComputeRunningProcesses(found[0]):
            used = getattr(proc, "usedGpuMemory", None)
            if int(getattr(proc, "pid", -1)) == pid and isinstance(used, int):
                return used  # None when the driver cannot tell (e.g. without permission)
        return None

    return with_nvml_device(env, nvml, used_by, uuid=uuid)


# ------------------------------------------------------------------------ from the wire
_BYTE_FIELDS = ("memory_current_bytes", "memory_peak_bytes", "memory_limit_bytes",
                "cuda_allocated_bytes", "cuda_peak_allocated_bytes", "cuda_reserved_bytes",
                "cuda_peak_reserved_bytes", "cuda_cap_bytes",
                "host_memory_current_bytes", "host_memory_peak_bytes")
_SOURCE_FIELDS = ("memory_source", "host_memory_source")
SOURCES = frozenset({"cgroup", "rss", "nvml", "cuda"})


def usage_fields(values: Mapping[str, Any]) -> dict[str, Any]:
    """The measured-memory fields among ``values`` (what :meth:`Usage.fields` wrote: a
    message's meta, decoded by runner/distributed/control.py, or the server's own sample), as
    a record carries them: byte counts must be non-negative ints and sources known names;
    anything else is left out (the record then simply lacks it). Adds ``memory_bytes`` =
    the peak (the field analysis reads as measured memory)."""
    out: dict[str, Any] = {}
    for key in _BYTE_FIELDS:
        v = values.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            out[key] = v
    for key in _SOURCE_FIELDS:
        if (source := values.get(key)) in SOURCES:
            out[key] = source
    if "memory_peak_bytes" in out and "memory_source" in out:
        out["memory_bytes"] = out["memory_peak_bytes"]
    else:  # a figure without its source (or the reverse) is not a measurement
        for key in ("memory_current_bytes", "memory_peak_bytes", "memory_source"):
            out.pop(key, None)
    return out


# -------------------------------------------------------------------------------- meter
def cuda_index(device: Any) -> int | None:
    """The CUDA device index a :class:`Meter` measures for a process that trains on
    ``device`` (a ``torch.device`` or its string): ``N`` for ``cuda:N``, so a process on its
    second GPU reads that GPU's allocator and NVML entry, not GPU 0's (docs/gpu.md "Device
    placement"); None for the CPU or a bare ``cuda`` (the current device, what Meter reads
    without an index: a CPU process meters as it always did)."""
    if device is None:
        return None
    if isinstance(device, str):
        kind, _, index = device.partition(":")
        return int(index) if kind == "cuda" and index.isdigit() else None
    if getattr(device, "type", None) != "cuda":
        return None
    index = getattr(device, "index", None)
    return None if index is None else int(index)


class Meter:
    """Samples this process's memory (see the module docstring); keeps the peak of its own
    samples for sources that have none. Paths, environment, NVML and ``torch.cuda`` are
    injectable for tests (no container or GPU is needed to exercise every branch)."""

    def __init__(self, *, cgroup_root: Path = CGROUP_ROOT,
                 proc_cgroup: Path = PROC_SELF_CGROUP, proc_status: Path = PROC_SELF_STATUS,
                 env: Mapping[str, str] | None = None, nvml: Any = None, cuda: Any = None,
                 use_gpu: bool = True, device: int | None = None) -> None:
        self.cgroup_root, self.proc_cgroup = Path(cgroup_root), Path(proc_cgroup)
        self.proc_status = Path(proc_status)
        self.env, self.nvml, self.cuda, self.use_gpu = env, nvml, cuda, use_gpu
        self.device = device  # CUDA device index (None: the current one)
        self.pid = os.getpid()
        self._peaks: dict[str, int] = {}
        self._uuid: dict[int, str | None] = {}  # device index -> UUID CUDA reports

    def _device_uuid(self, cuda: Any, index: int) -> str | None:
        """The UUID CUDA reports for device ``index`` (looked up once), or None."""
        if index not in self._uuid:
            uuid = None
            with contextlib.suppress(Exception):  # an old torch without .uuid: the env
                uuid = str(cuda.get_device_properties(index).uuid) or None
            self._uuid[index] = uuid
        return self._uuid[index]

    def _keep_peak(self, u: Usage) -> Usage:
        peak = max(u.peak, u.current, self._peaks.get(u.source, 0))
        self._peaks[u.source] = peak
        return u if peak == u.peak else Usage(u.current, peak, u.source, u.limit, u.detail,
                                              u.extra)

    def host(self) -> Usage:
        """Host memory: the container's cgroup when limited, else this process's RSS."""
        u = cgroup_usage(self.cgroup_root, self.proc_cgroup) or rss_usage(self.proc_status)
        return self._keep_peak(u)

    def gpu(self) -> Usage | None:
        """GPU memory of this process when it has initialised CUDA, else None."""
        cuda = self.cuda if self.cuda is not None else _torch_cuda()
        if not self.use_gpu or cuda is None:
            return None
        extra: dict[str, Any] = {}
        index: int | None = self.device
        with contextlib.suppress(Exception):  # CUDA went away: report what NVML says
            index = int(cuda.current_device()) if index is None else index
            extra = {"cuda_allocated_bytes": int(cuda.memory_allocated(index)),
                     "cuda_peak_allocated_bytes": int(cuda.max_memory_allocated(index)),
                     "cuda_reserved_bytes": int(cuda.memory_reserved(index)),
                     "cuda_peak_reserved_bytes": int(cuda.max_memory_reserved(index))}
        uuid = self._device_uuid(cuda, index) if index is not None else None
        used = nvml_process_bytes(self.pid, self.env, self.nvml, uuid)
        if used is not None:
            return self._keep_peak(Usage(used, used, "nvml", None, "per-process used memory",
                                         extra))
        if not extra:
            return None
        return self._keep_peak(Usage(extra["cuda_allocated_bytes"],
                                     extra["cuda_peak_allocated_bytes"], "cuda", None,
                                     "torch.cuda allocator", extra))

    def sample(self) -> Usage:
        """The memory figure of this process: GPU when it uses CUDA (host figures as
        ``host_*``), else host. Never raises."""
        host = self.host()
        gpu = None
        with contextlib.suppress(Exception):
            gpu = self.gpu()
        if gpu is None:
            return host
        extra = {**gpu.extra, "host_memory_current_bytes": host.current,
                 "host_memory_peak_bytes": host.peak, "host_memory_source": host.source}
        return Usage(gpu.current, gpu.peak, gpu.source, None, gpu.detail, extra)


__all__ = ["SOURCES", "Meter", "Usage", "cgroup_usage", "cuda_index", "nvml_process_bytes",
           "own_cgroup",
           "rss_usage", "usage_fields"]

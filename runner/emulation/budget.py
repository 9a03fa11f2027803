"""Memory budget discovery at run time, inside a client (or server) container.

docs/method.md "ARMSC: Inputs": a client's budget ``M_i`` comes from NVML, the container's
cgroup limit, or the profile, in that order. This module tries them in that order and returns
the first that answers, *with its source*, so the event log says where a budget came from.

* **NVML** (``pynvml`` from ``nvidia-ml-py``): the total memory of the GPU or MIG instance
  this process sees. ``CUDA_VISIBLE_DEVICES`` (then ``NVIDIA_VISIBLE_DEVICES``) may name an
  index, a ``GPU-...`` UUID or a ``MIG-...`` UUID; MIG instances are real hard partitions,
  which is why they come first. ``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT`` (an MPS hard cap) lowers
  the figure when set. Design choice: *total*, not free, memory: free memory shrinks with
  our own allocations, and a budget that moved every round would re-trigger ARMSC for
  nothing.
* **cgroup**: the container's memory limit (``mem_limit`` in Compose). v2:
  ``memory.max`` of this process's cgroup (and its ancestors); v1:
  ``memory/memory.limit_in_bytes``. ``max`` or a huge value means "no limit".
* **profile**: the value the profile (devices file) gives.

Without a GPU every NVML call fails: that is the normal case on CI and falls through to
the cgroup quietly. Nothing here raises for a missing source; only a missing *everything*
(no limit anywhere and no profile value) is a :class:`~runner.errors.ConfigError`.

The figure is the whole budget the memory model compares against
(``client_memory(...).total``, runtime reserve included): the Compose override sets
``mem_limit = runtime overhead + budget`` and the devices file carries the same sum.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

from runner.errors import ConfigError

T = TypeVar("T")

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
# cgroup v1 reports "no limit" as PAGE_COUNTER_MAX pages (9223372036854771712 on x86-64);
# anything this large is no limit either.
UNLIMITED_THRESHOLD = 2**60
_NO_DEVICE = {"", "none", "void", "nodevs"}


@dataclass(frozen=True)
class Budget:
    """A memory budget in bytes, where it came from (nvml | cgroup-v2 | cgroup-v1 | profile)
    and a human-readable detail (which device / file)."""

    bytes: int
    source: str
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"bytes": self.bytes, "source": self.source, "detail": self.detail}


# --------------------------------------------------------------------------------- NVML
def _load_nvml() -> ModuleType | None:
    """Import ``pynvml`` lazily (a missing package is the same as no GPU)."""
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


def visible_device(env: Mapping[str, str]) -> str | None:
    """The first device this process is told to use, or None when nothing is named.

    ``CUDA_VISIBLE_DEVICES`` wins over ``NVIDIA_VISIBLE_DEVICES`` (the container runtime's
    variable) because it is what CUDA itself obeys. Returns ``""`` when devices are
    explicitly hidden (``none``, ``void``, empty CUDA_VISIBLE_DEVICES).
    """
    for key in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"):
        if key in env:
            value = env[key].strip()
            if value.lower() in _NO_DEVICE:
                return ""
            if value.lower() == "all":
                return None
            return value.split(",")[0].strip()
    return None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _mig_instances(nvml: Any, parent: Any) -> list[Any]:
    """MIG device handles of a GPU (empty when MIG is off or unsupported)."""
    try:
        current, _pending = nvml.nvmlDeviceGetMigMode(parent)
    except Exception:  # noqa: BLE001 - not MIG-capable: NVML raises NotSupported
        return []
    if not current:
        return []
    handles = []
    for j in range(int(nvml.nvmlDeviceGetMaxMigDeviceCount(parent))):
        try:
            handles.append(nvml.nvmlDeviceGetMigDeviceHandleByIndex(parent, j))
        except Exception:  # noqa: BLE001 - empty slot: NVML raises NotFound
            continue
    return handles


def _leaf_devices(nvml: Any) -> list[Any]:
    """Every device memory can be allocated on: MIG instances where MIG is on, else GPUs."""
    leaves = []
    for i in range(int(nvml.nvmlDeviceGetCount())):
        gpu = nvml.nvmlDeviceGetHandleByIndex(i)
        leaves.extend(_mig_instances(nvml, gpu) or [gpu])
    return leaves


def _by_uuid(nvml: Any, uuid: str) -> Any:
    """Find a GPU or MIG instance by UUID; scans MIG instances when the direct lookup fails
    (older drivers do not resolve MIG UUIDs in nvmlDeviceGetHandleByUUID)."""
    try:
        return nvml.nvmlDeviceGetHandleByUUID(uuid)
    except Exception:  # noqa: BLE001 - fall back to a scan
        pass
    for i in range(int(nvml.nvmlDeviceGetCount())):
        gpu = nvml.nvmlDeviceGetHandleByIndex(i)
        for handle in [gpu, *_mig_instances(nvml, gpu)]:
            if _text(nvml.nvmlDeviceGetUUID(handle)) == uuid:
                return handle
    raise LookupError(f"no GPU or MIG instance with UUID {uuid}")


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*$", re.IGNORECASE)


def _mps_limit(env: Mapping[str, str], index: int | None) -> int | None:
    """Bytes of ``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT`` for this device (``"2G"`` or
    ``"0=2G,1=512M"``; units are powers of 1024 as in CUDA's documentation)."""
    raw = env.get("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT", "").strip()
    if not raw:
        return None
    for item in raw.split(","):
        dev, _, size = item.rpartition("=")
        if dev and index is not None and dev.strip() != str(index):
            continue
        if dev and index is None and dev.strip() != "0":
            continue
        m = _SIZE.match(size)
        if m:
            return int(float(m.group(1)) * 1024 ** "_KMGT".index((m.group(2) or "_").upper()))
    return None


def nvml_device(nvml: Any, selected: str | None) -> tuple[Any, int | None, str] | None:
    """The NVML handle of the device this process uses (an initialised ``nvml``;
    ``selected`` from :func:`visible_device`): (handle, GPU index when named by index,
    detail), or None when no device exists. NVML errors propagate.

    Shared by the budget (total memory) and runner/emulation/resources.py (this process's use)."""
    index: int | None = None
    if selected is None:
        leaves = _leaf_devices(nvml)
        if not leaves:
            return None
        detail = "first visible device" + (f" of {len(leaves)}" if len(leaves) > 1 else "")
        return leaves[0], None, detail
    if selected.isdigit():
        index = int(selected)
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        mig = _mig_instances(nvml, handle)
        detail = f"GPU {index}"
        if mig:  # a MIG-enabled GPU named by index: its first instance is what CUDA uses
            handle = mig[0]
            detail += " (first MIG instance)"
        return handle, index, detail
    return _by_uuid(nvml, selected), None, selected


def with_nvml_device(env: Mapping[str, str] | None, nvml: Any,
                     use: Callable[[Any, tuple[Any, int | None, str], Mapping[str, str]], T]
                     ) -> T | None:
    """``use(nvml, (handle, index, detail), env)`` on the GPU / MIG instance this process
    sees, inside one NVML session; None when there is no GPU, no NVML, the devices are
    hidden, or NVML fails in any way (the normal CPU-only case). One place for the session
    so the budget (here) and the measured use (runner/emulation/resources.py) see the same
    device."""
    env = os.environ if env is None else env
    selected = visible_device(env)
    if selected == "":
        return None
    nvml = nvml if nvml is not None else _load_nvml()
    if nvml is None:
        return None
    try:
        nvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver / no GPU: the normal CPU-only case
        return None
    try:
        found = nvml_device(nvml, selected)
        return None if found is None else use(nvml, found, env)
    except Exception:  # noqa: BLE001 - any NVML failure means "no answer from NVML"
        return None
    finally:
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()


def _device_budget(nvml: Any, found: tuple[Any, int | None, str],
                   env: Mapping[str, str]) -> Budget:
    handle, index, detail = found
    total = int(nvml.nvmlDeviceGetMemoryInfo(handle).total)
    with contextlib.suppress(Exception):  # the name is decoration only
        detail += f" {_text(nvml.nvmlDeviceGetName(handle))}"
    mps = _mps_limit(env, index)
    if mps is not None and mps < total:
        return Budget(mps, "nvml", f"{detail}; MPS pinned limit")
    return Budget(total, "nvml", detail.strip())


def nvml_budget(env: Mapping[str, str] | None = None, nvml: Any = None) -> Budget | None:
    """Total memory of the GPU / MIG instance this process sees, or None (no GPU, no NVML,
    devices hidden, or any NVML error)."""
    return with_nvml_device(env, nvml, _device_budget)


# ------------------------------------------------------------------------------- cgroups
def _parse_limit(text: str) -> int | None:
    """A cgroup limit file's value in bytes; None for "max" or a value meaning no limit."""
    value = text.strip()
    if not value or value == "max":
        return None
    try:
        limit = int(value)
    except ValueError:
        return None
    return None if limit <= 0 or limit >= UNLIMITED_THRESHOLD else limit


def _own_path(proc_cgroup: Path, v1: bool) -> str | None:
    """This process's cgroup path: the ``0::/path`` line (v2) or the ``N:memory:/path`` line
    (v1) of /proc/self/cgroup."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if (v1 and "memory" in controllers.split(",")) or (not v1 and line.startswith("0::")):
            return path.strip() or "/"
    return None


def _tightest(files: list[Path], source: str) -> Budget | None:
    """The smallest finite limit among the limit files that exist."""
    limits = []
    for f in files:
        try:
            limit = _parse_limit(f.read_text())
        except OSError:
            continue
        if limit is not None:
            limits.append((limit, str(f)))
    if not limits:
        return None
    limit, where = min(limits)
    return Budget(limit, source, where)


def _chain(base: Path, own: str | None, leaf: str) -> list[Path]:
    """``base/leaf`` and ``base/a/leaf``, ``base/a/b/leaf``, ... down to this process's cgroup."""
    files = [base / leaf]
    if own and own != "/":
        path = base
        for part in own.strip("/").split("/"):
            path = path / part
            files.append(path / leaf)
    return files


def cgroup_budget(root: Path = CGROUP_ROOT,
                  proc_cgroup: Path = PROC_SELF_CGROUP) -> Budget | None:
    """The memory limit of this process's cgroup (v2, then v1), or None when unlimited.

    In a container (cgroup namespace) the container's own cgroup is mounted at ``root``, so
    ``root/memory.max`` is the limit. Outside one, the process sits somewhere below ``root``:
    the tightest limit on the path from ``root`` down to its cgroup applies (a parent's limit
    binds its children too).
    """
    root = Path(root)
    if (root / "cgroup.controllers").exists() or (root / "memory.max").exists():
        return _tightest(_chain(root, _own_path(proc_cgroup, v1=False), "memory.max"),
                         "cgroup-v2")
    return _tightest(_chain(root / "memory", _own_path(proc_cgroup, v1=True),
                            "memory.limit_in_bytes"), "cgroup-v1")


# ---------------------------------------------------------------------------- discovery
def discover_budget(profile_bytes: int | None = None, *, env: Mapping[str, str] | None = None,
                    cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP,
                    nvml: Any = None, use_nvml: bool = True) -> Budget:
    """The budget this process has: NVML, then the cgroup limit, then ``profile_bytes``.

    ``use_nvml=False`` skips NVML (a CPU-only run on a machine that has a GPU). Raises
    ConfigError only when no source answers at all.
    """
    if use_nvml:
        found = nvml_budget(env, nvml)
        if found is not None:
            return found
    found = cgroup_budget(cgroup_root, proc_cgroup)
    if found is not None:
        return found
    if profile_bytes is not None:
        if profile_bytes <= 0:
            raise ConfigError(f"profile memory budget must be > 0, got {profile_bytes}")
        return Budget(int(profile_bytes), "profile", "no GPU and no cgroup memory limit")
    raise ConfigError("no memory budget: no GPU seen by NVML, no cgroup memory limit, and no "
                      "profile value; pass a devices file or run in a memory-limited container")

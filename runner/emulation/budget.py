"""Memory budget discovery at run time, inside a client (or server) container.

docs/method.md "ARMSC: Inputs": a client's budget ``M_i`` comes from NVML, the container's
cgroup limit, or the profile. Which of them applies depends on *where the process trains*
(docs/gpu.md "Budgets"), so the caller says so (``use_nvml``: it trains on a CUDA device):

* **CPU process** (``use_nvml=False``, the default): the cgroup limit, then the profile
  value. NVML is never asked: a GPU that happens to be visible is not this process's memory
  (issue 27: on a GPU host the host GPU's 80 GB used to override a container's few hundred
  MB, and ARMSC planned gigabytes for a client the kernel then OOM-killed).
* **CUDA process** (``use_nvml=True``): the budget is the *planned* one (the profile value,
  or in an emulated run the emulation mapping's stand-in budget: ``TESTBED_BUDGET_BYTES``,
  the devices file), bounded by the memory of the GPU or MIG instance NVML says this
  process has; without a planned budget, that memory itself. With ``emulated=True`` NVML is
  not asked at all: a stand-in's budget is a rescaled reference budget, and the host GPU's
  size says nothing about it. The cgroup limit is host memory and never a GPU budget.

NVML (``pynvml`` from ``nvidia-ml-py``) finds the device in this order: the UUID CUDA
reports for the device the process trains on (``device_uuid``: exact, whatever the
numbering), else ``CUDA_VISIBLE_DEVICES``, then ``NVIDIA_VISIBLE_DEVICES``. A ``GPU-...``
or ``MIG-...`` UUID is looked up by UUID (a MIG instance with its own memory, not its parent
GPU's). An index in ``NVIDIA_VISIBLE_DEVICES`` is the *host's* numbering, read by the
container runtime: inside the container NVML numbers the visible devices from 0, so host
index ``h`` is the container's device number ``sorted(listed).index(h)``. An index in
``CUDA_VISIBLE_DEVICES`` is in this process's own numbering (CUDA's, which is NVML's with
``CUDA_DEVICE_ORDER=PCI_BUS_ID``). ``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT`` (an MPS hard cap)
lowers the figure when set. Design choice: *total*, not free, memory: free memory shrinks
with our own allocations, and a budget that moved every round would re-trigger ARMSC for
nothing.

* **cgroup**: the container's memory limit (``mem_limit`` in Compose). v2:
  ``memory.max`` of this process's cgroup (and its ancestors); v1:
  ``memory/memory.limit_in_bytes``. ``max`` or a huge value means "no limit".
* **profile**: the value the profile (devices file) gives.

Errors: on a machine without a GPU or driver NVML cannot start; that is the normal CPU case
and stays quiet. Once NVML runs, not finding this process's device is a real error (a
wrong numbering, an unknown UUID): it is logged as a warning with NVML's own message and,
with ``strict=True``, raised as :class:`GPUError`; it is never swallowed silently. Only a
missing *everything* (no budget from any source) is a :class:`~runner.errors.ConfigError`.

The figure is the whole budget the memory model compares against
(``client_memory(...).total``, runtime reserve included): the Compose override sets
``mem_limit = runtime overhead + budget`` and the devices file carries the same sum. On a
GPU the per-process CUDA memory cap (runner/emulation/gpu.py) enforces it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

from runner.errors import ConfigError

T = TypeVar("T")
log = logging.getLogger("runner.emulation.budget")

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
class GPUError(RuntimeError):
    """NVML runs but cannot find or read the GPU / MIG instance this process uses (its
    message is NVML's own, with what was looked for)."""


def _load_nvml() -> ModuleType | None:
    """Import ``pynvml`` lazily (a missing package is the same as no GPU)."""
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


def visible_selection(env: Mapping[str, str]) -> tuple[str | None, str | None]:
    """The first device this process is told to use and the variable that names it:
    ``(value, variable)``; ``(None, None)`` when nothing is named (or ``all``), ``("",
    variable)`` when devices are explicitly hidden (``none``, ``void``, empty).

    ``CUDA_VISIBLE_DEVICES`` wins over ``NVIDIA_VISIBLE_DEVICES`` (the container runtime's
    variable) because it is what CUDA itself obeys. The variable matters: their indices are
    numbered differently (module docstring)."""
    for key in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"):
        if key in env:
            value = env[key].strip()
            if value.lower() in _NO_DEVICE:
                return "", key
            if value.lower() == "all":
                return None, None
            return value.split(",")[0].strip(), key
    return None, None


def visible_device(env: Mapping[str, str]) -> str | None:
    """The first device this process is told to use, or None when nothing is named; ``""``
    when devices are explicitly hidden (:func:`visible_selection` without the variable)."""
    return visible_selection(env)[0]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def canonical_uuid(uuid: str) -> str:
    """A GPU or MIG UUID without its ``GPU-`` / ``MIG-`` prefix, lower case: NVML writes
    ``MIG-<uuid>`` and ``GPU-<uuid>``, CUDA (``torch.cuda.get_device_properties().uuid``)
    the bare UUID, so they compare equal only in this form."""
    u = uuid.strip().lower()
    for prefix in ("gpu-", "mig-"):
        if u.startswith(prefix):
            return u[len(prefix):]
    return u


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
        except Exception:  # noqa: BLE001 - empty slot (NotFound), or not ours in a container
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
    """Find a GPU or MIG instance by UUID, with or without its ``GPU-``/``MIG-`` prefix.

    nvmlDeviceGetHandleByUUID first (it resolves MIG UUIDs on current drivers); then a scan
    of every GPU and its MIG instances comparing :func:`canonical_uuid` forms (older drivers
    do not resolve MIG UUIDs, and CUDA's UUID has no prefix). Raises :class:`GPUError`
    naming what exists when nothing matches."""
    want = canonical_uuid(uuid)
    tries = [uuid] if uuid[:4].upper() in ("GPU-", "MIG-") else [f"MIG-{uuid}", f"GPU-{uuid}"]
    for candidate in tries:
        try:
            return nvml.nvmlDeviceGetHandleByUUID(candidate)
        except Exception:  # noqa: BLE001 - not resolvable directly: scan below
            pass
    seen = []
    for i in range(int(nvml.nvmlDeviceGetCount())):
        gpu = nvml.nvmlDeviceGetHandleByIndex(i)
        for handle in [gpu, *_mig_instances(nvml, gpu)]:
            found = _text(nvml.nvmlDeviceGetUUID(handle))
            if canonical_uuid(found) == want:
                return handle
            seen.append(found)
    raise GPUError(f"no GPU or MIG instance with UUID {uuid}; NVML sees "
                   f"{', '.join(seen) or 'no device'}")


def _container_index(host_index: int, listed: str, count: int) -> int:
    """The NVML index, in this process's view, of host GPU ``host_index`` that
    ``NVIDIA_VISIBLE_DEVICES=listed`` names. Inside a container the runtime exposes only
    the listed GPUs, which NVML numbers from 0 in the host's (PCI) order: when NVML sees
    exactly as many GPUs as are listed, the host index's rank among them is its number.
    Otherwise (the variable set outside a container, where nothing reads it) the host
    numbering applies as is."""
    indices = []
    for item in listed.split(","):
        head = item.strip().split(":")[0]
        if not head.isdigit():
            return host_index  # a mixed list: nothing to renumber by
        indices.append(int(head))
    ordered = sorted(set(indices))
    if count == len(ordered) and host_index in ordered:
        return ordered.index(host_index)
    return host_index


def _by_index(nvml: Any, index: int, mig_slot: int | None) -> tuple[Any, str]:
    """GPU ``index`` (this process's NVML numbering) or, when MIG is on, its first (or
    ``mig_slot``) instance: the device CUDA allocates on."""
    count = int(nvml.nvmlDeviceGetCount())
    if not 0 <= index < count:
        raise GPUError(f"GPU index {index} does not exist: NVML sees {count} GPU(s)"
                       + (f", numbered 0-{count - 1}" if count else ""))
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    mig = _mig_instances(nvml, handle)
    detail = f"GPU {index}"
    if mig_slot is not None:
        try:
            return nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, mig_slot), \
                f"{detail} MIG {mig_slot}"
        except Exception as e:  # noqa: BLE001 - in a container only its own instance shows
            if len(mig) == 1:
                return mig[0], f"{detail} MIG {mig_slot} (the one visible instance)"
            raise GPUError(f"GPU {index} has no MIG instance {mig_slot} ({len(mig)} "
                           f"visible): {e}") from e
    if mig:  # a MIG-enabled GPU named by index: its first instance is what CUDA uses
        return mig[0], detail + " (first MIG instance)"
    return handle, detail


def nvml_device(nvml: Any, selected: str | None, variable: str | None = None,
                uuid: str | None = None, listed: str | None = None
                ) -> tuple[Any, int | None, str] | None:
    """The NVML handle of the device this process uses (an initialised ``nvml``):
    (handle, GPU index when named by index, detail), or None when no device exists.

    ``uuid``: the UUID CUDA reports for the device this process trains on; it wins (exact,
    whatever the numbering). ``selected`` / ``variable``: from :func:`visible_selection`,
    ``listed`` the variable's whole value; an index of ``NVIDIA_VISIBLE_DEVICES`` is the
    host's and is renumbered as the container sees it (:func:`_container_index`);
    ``GPU:MIG`` (``0:1``) names a MIG instance by slot.
    Raises :class:`GPUError` (or NVML's own error) when the named device is not there.

    Shared by the budget (total memory) and runner/emulation/resources.py (this process's use)."""
    if uuid:
        return _by_uuid(nvml, uuid), None, f"CUDA device {uuid}"
    if selected is None:
        leaves = _leaf_devices(nvml)
        if not leaves:
            return None
        detail = "first visible device" + (f" of {len(leaves)}" if len(leaves) > 1 else "")
        return leaves[0], None, detail
    head, _, slot = selected.partition(":")
    if head.isdigit() and (not slot or slot.isdigit()):
        index = int(head)
        if variable == "NVIDIA_VISIBLE_DEVICES":
            count = int(nvml.nvmlDeviceGetCount())
            index = _container_index(index, listed or selected, count)
        handle, detail = _by_index(nvml, index, int(slot) if slot else None)
        return handle, index, detail
    return _by_uuid(nvml, selected), None, selected


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


_warned: set[str] = set()


def _report(message: str) -> None:
    """Log an NVML failure once per distinct message (budgets are re-read every second)."""
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


def with_nvml_device(env: Mapping[str, str] | None, nvml: Any,
                     use: Callable[[Any, tuple[Any, int | None, str], Mapping[str, str]], T],
                     *, uuid: str | None = None, strict: bool = False) -> T | None:
    """``use(nvml, (handle, index, detail), env)`` on the GPU / MIG instance this process
    sees (``uuid``: the one CUDA trains on), inside one NVML session. One place for the
    session so the budget (here) and the measured use (runner/emulation/resources.py) see
    the same device.

    None when devices are hidden, there is no ``pynvml`` or NVML cannot start (no driver:
    the normal CPU-only case, quiet). Any later failure (the device named is not there, a
    read fails) is logged as a warning with NVML's message and returns None, or with
    ``strict`` raises :class:`GPUError`; ``strict`` also raises when NVML cannot start."""
    env = os.environ if env is None else env
    selected, variable = visible_selection(env)
    if selected == "" and not uuid:
        return None
    nvml = nvml if nvml is not None else _load_nvml()
    if nvml is None:
        if strict:
            raise GPUError("pynvml is not installed (pip install nvidia-ml-py)")
        return None
    try:
        nvml.nvmlInit()
    except Exception as e:  # noqa: BLE001 - no driver / no GPU: the normal CPU-only case
        if strict:
            raise GPUError(f"NVML did not start: {e}") from e
        log.debug("NVML did not start: %s", e)
        return None
    try:
        found = nvml_device(nvml, selected, variable, uuid,
                            env.get(variable) if variable else None)
        return None if found is None else use(nvml, found, env)
    except Exception as e:  # noqa: BLE001 - reported, never silent
        what = f"CUDA device {uuid}" if uuid else (
            f"{variable}={env.get(variable)}" if variable else "the first visible device")
        message = f"NVML: cannot read {what}: {type(e).__name__}: {e}"
        if strict:
            raise GPUError(message) from e
        _report(message)
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


def nvml_budget(env: Mapping[str, str] | None = None, nvml: Any = None, *,
                uuid: str | None = None, strict: bool = False) -> Budget | None:
    """Total memory of the GPU / MIG instance this process sees (``uuid``: the one CUDA
    trains on), or None (no GPU, no NVML, devices hidden; a failure to find the device is
    logged, or raised with ``strict``)."""
    return with_nvml_device(env, nvml, _device_budget, uuid=uuid, strict=strict)


def nvml_inventory(nvml: Any = None) -> list[dict[str, Any]]:
    """Every GPU NVML sees and, where MIG is on, its instances, *read only* (the testbed
    never creates, changes or destroys MIG instances: docs/gpu.md): one dict per GPU with
    ``index``, ``uuid``, ``name``, ``memory_bytes``, ``mig`` (None: MIG off or unsupported;
    else a list of ``{"slot", "uuid", "name", "memory_bytes"}``). Raises :class:`GPUError`
    when NVML cannot start (bench/gpu_check.py prints why)."""
    nvml = nvml if nvml is not None else _load_nvml()
    if nvml is None:
        raise GPUError("pynvml is not installed (pip install nvidia-ml-py)")
    try:
        nvml.nvmlInit()
    except Exception as e:  # noqa: BLE001 - reported by the caller
        raise GPUError(f"NVML did not start: {e}") from e
    try:
        gpus: list[dict[str, Any]] = []
        for i in range(int(nvml.nvmlDeviceGetCount())):
            gpu = nvml.nvmlDeviceGetHandleByIndex(i)
            row: dict[str, Any] = {
                "index": i, "uuid": _text(nvml.nvmlDeviceGetUUID(gpu)),
                "name": _text(nvml.nvmlDeviceGetName(gpu)),
                "memory_bytes": int(nvml.nvmlDeviceGetMemoryInfo(gpu).total), "mig": None}
            try:
                current, _pending = nvml.nvmlDeviceGetMigMode(gpu)
            except Exception:  # noqa: BLE001 - not MIG-capable
                current = 0
            if current:
                row["mig"] = []
                for j in range(int(nvml.nvmlDeviceGetMaxMigDeviceCount(gpu))):
                    try:
                        mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(gpu, j)
                    except Exception:  # noqa: BLE001 - empty slot
                        continue
                    row["mig"].append({
                        "slot": j, "uuid": _text(nvml.nvmlDeviceGetUUID(mig)),
                        "name": _text(nvml.nvmlDeviceGetName(mig)),
                        "memory_bytes": int(nvml.nvmlDeviceGetMemoryInfo(mig).total)})
            gpus.append(row)
        return gpus
    finally:
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()


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
                    nvml: Any = None, use_nvml: bool = False, device_uuid: str | None = None,
                    emulated: bool = False) -> Budget:
    """The budget this process has (module docstring; docs/gpu.md "Budgets").

    ``profile_bytes``: the planned budget (``TESTBED_BUDGET_BYTES``, the devices file).
    ``use_nvml=False`` (a process training on the CPU, GPU or not): the cgroup limit, then
    ``profile_bytes``. ``use_nvml=True`` (it trains on a CUDA device, ``device_uuid`` the
    UUID CUDA reports for it): ``profile_bytes`` bounded by the device's memory as NVML
    reports it (a MIG instance's own), that memory when nothing is planned; ``emulated``
    (the stand-in runs for a reference model): ``profile_bytes`` alone, then the cgroup,
    NVML not asked. Raises ConfigError only when no source answers at all.
    """
    if profile_bytes is not None and profile_bytes <= 0:
        raise ConfigError(f"profile memory budget must be > 0, got {profile_bytes}")
    if use_nvml and emulated and profile_bytes is not None:
        return Budget(int(profile_bytes), "profile",
                      "emulation mapping (the stand-in's budget; the GPU's size not asked)")
    if use_nvml and not emulated:
        device = nvml_budget(env, nvml, uuid=device_uuid)  # a failure is logged
        if device is None:
            if profile_bytes is not None:
                return Budget(int(profile_bytes), "profile",
                              "NVML did not answer for this CUDA device (see the log)")
            raise ConfigError("no memory budget: this process trains on a CUDA device, NVML "
                              "does not say how much memory it has (see the log), and no "
                              "profile value is given (TESTBED_BUDGET_BYTES)")
        if profile_bytes is not None and profile_bytes < device.bytes:
            return Budget(int(profile_bytes), "profile",
                          f"planned budget within {device.detail} ({device.bytes} bytes); "
                          "a per-process CUDA memory cap enforces it")
        return device
    found = cgroup_budget(cgroup_root, proc_cgroup)
    if found is not None:
        return found
    if profile_bytes is not None:
        return Budget(int(profile_bytes), "profile", "no GPU and no cgroup memory limit")
    raise ConfigError("no memory budget: no cgroup memory limit and no profile value (and "
                      "this process does not train on a GPU); pass a devices file or run in "
                      "a memory-limited container")

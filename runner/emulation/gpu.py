"""A budget on a GPU: which budget a CUDA process has, a per-process CUDA memory cap sized to
it, and a CUDA out-of-memory error turned into a ``budget_exceeded`` event.

Why: on the CPU a client's budget is enforced by its container's memory limit, and the
kernel's OOM kill of a client that needs more is recorded as ``budget_exceeded`` (the host's
watch, testbed/backends/compose_run.py). On a GPU neither exists by itself: Docker cannot cap
GPU memory per container, and several clients sharing one GPU (the local backend, the
paper's 5-client fleet on one 80 GB card) would each see the whole card. So (docs/gpu.md):

* **Budget** (:func:`process_budget`): a process that trains on the CPU keeps the CPU rules
  (cgroup, then ``TESTBED_BUDGET_BYTES``; NVML never asked). One that trains on a CUDA
  device has its *planned* budget: ``TESTBED_BUDGET_BYTES`` (Compose, Kubernetes, join), else
  its row of the run's devices file (the local backend), which in an emulated run is the
  emulation mapping's stand-in budget; it is bounded by the memory NVML reports for the GPU
  or MIG instance CUDA trains on (found by the UUID CUDA reports, not by an index whose
  numbering differs inside a container). ``TESTBED_EMULATED=1`` (the Compose override of an
  emulated run) skips NVML: a stand-in's budget is never the host GPU's size.
* **Cap** (:func:`cap_process`): ``torch.cuda.set_per_process_memory_fraction`` against the
  device's total memory, so that the caching allocator of this process may hold at most the
  budget less the runtime reserve the memory model adds on top of the tensors
  (runner/methods/memory.py ``DEFAULT_RESERVE``; on a GPU it stands for the CUDA context,
  which the allocator does not count). Inside a MIG instance the total is the instance's, so
  the cap completes a MIG size that is larger than the budget (MIG sizes are coarse).
* **Out of memory** (:func:`client_out_of_memory`): an allocation past the cap raises
  ``torch.cuda.OutOfMemoryError``; the client appends a ``budget_exceeded`` event to the
  run's events (the run directory is the client's own on the local backend and mounted in
  every container), writes the ``inject/CLIENT.ended`` marker (a server still waiting for it
  to join stops waiting), tells the server it is offline with reason ``budget_exceeded``
  and exits with :data:`BUDGET_EXCEEDED_EXIT`; the run goes on without it, as after a
  kernel OOM kill.

This module never imports ``testbed/``; torch is imported because every caller has it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from runner.emulation.budget import (
    CGROUP_ROOT,
    PROC_SELF_CGROUP,
    Budget,
    discover_budget,
)
from runner.errors import ConfigError

log = logging.getLogger("runner.emulation.gpu")

#: Exit status of a client that exceeded its GPU budget (a CUDA out-of-memory error under
#: its cap); distinct from 1 (a crash) and 137 (killed, e.g. by the kernel's OOM killer).
BUDGET_EXCEEDED_EXIT = 3
#: Set to 1 by the Compose override (testbed/backends/compose.py) of an emulated run: the
#: budget is the emulation mapping's, NVML is not asked.
EMULATED_ENV = "TESTBED_EMULATED"
BUDGET_ENV = "TESTBED_BUDGET_BYTES"
#: Host memory a process that trains on CUDA needs beyond the CPU runtime reserve: CUDA's
#: host-side runtime and the kernels torch loads (lazily, CUDA >= 11.7). An estimate (1 GiB)
#: added to the memory limit of a client container that trains on its GPU
#: (testbed/backends/compose.py); bench/gpu_check.py prints each client's host peak to
#: check it on a real GPU.
CUDA_HOST_RESERVE = 1 << 30
#: The smallest cap set: below it CUDA cannot even hold a model's embeddings, so a budget
#: that leaves less after the reserve is a configuration error, said as such.
MIN_CAP = 16 * 2**20


@dataclass(frozen=True)
class MemoryCap:
    """A per-process CUDA memory cap: on ``device`` (``cuda:N``) of ``total_bytes``, the
    allocator may hold ``cap_bytes`` (= ``fraction`` of the total) for a budget of
    ``budget_bytes`` from ``source`` (runner/emulation/budget.py)."""

    device: str
    budget_bytes: int
    cap_bytes: int
    total_bytes: int
    fraction: float
    source: str

    def line(self) -> str:
        """One log line."""
        return (f"CUDA memory cap on {self.device}: {self.cap_bytes / 2**20:.0f} MiB of "
                f"{self.total_bytes / 2**30:.1f} GiB (fraction {self.fraction:.4f}) for a "
                f"budget of {self.budget_bytes / 2**20:.0f} MiB ({self.source})")


# ---------------------------------------------------------------------------- the device
def device_of(cfg: Any) -> torch.device:
    """The device ``cfg`` trains on (``TrainConfig.device``, runner/device.py; a config
    written before that field existed trains where ``auto`` says)."""
    from runner.device import resolve

    return resolve(getattr(cfg, "device", None) or "auto")


def device_uuid(device: torch.device, cuda: Any = None) -> str | None:
    """The UUID CUDA reports for ``device`` (a MIG instance's own under MIG), or None where
    torch cannot say: what NVML is asked for (runner/emulation/budget.py)."""
    cuda = cuda if cuda is not None else torch.cuda
    try:
        uuid = str(cuda.get_device_properties(_index(device, cuda)).uuid)
    except Exception:  # noqa: BLE001 - an old torch without .uuid: the variables decide
        return None
    return uuid or None


def _index(device: torch.device, cuda: Any) -> int:
    return int(device.index) if device.index is not None else int(cuda.current_device())


def emulated(env: Mapping[str, str]) -> bool:
    """Whether the backend said this run emulates a reference model (``TESTBED_EMULATED``)."""
    return env.get(EMULATED_ENV, "").strip().lower() in ("1", "true", "yes")


# ---------------------------------------------------------------------------- the budget
def planned_budget(cfg: Any, index: int | None, *, on_cuda: bool,
                   env: Mapping[str, str]) -> int | None:
    """The budget the run planned for this process: ``TESTBED_BUDGET_BYTES``, else (only on
    a CUDA device, so that a CPU run reports what it always did) the ``memory_bytes`` of its
    row of the run's devices file (``index``: the client's position; None: the server).
    None when neither says."""
    raw = env.get(BUDGET_ENV, "").strip()
    if raw.isdigit() and int(raw) > 0:
        return int(raw)
    path = getattr(cfg, "devices", None)
    if not on_cuda or not path:
        return None
    from runner.emulation.devices import load_devices

    try:
        clients, server = load_devices(Path(path))
    except ConfigError as e:
        log.warning("devices file %s unreadable for the budget: %s", path, e)
        return None
    if index is None:
        return server.memory_bytes if server is not None else None
    return clients[index].memory_bytes if 0 <= index < len(clients) else None


def process_budget(cfg: Any, index: int | None, *, device: torch.device | None = None,
                   env: Mapping[str, str] | None = None, nvml: Any = None, cuda: Any = None,
                   cgroup_root: Path = CGROUP_ROOT,
                   proc_cgroup: Path = PROC_SELF_CGROUP) -> Budget:
    """This process's memory budget (module docstring): the CPU rules on the CPU; on a CUDA
    device the planned budget bounded by the device's memory (NVML by the device's UUID),
    or the planned budget alone in an emulated run. Raises ConfigError when no source
    answers."""
    env = os.environ if env is None else env
    device = device_of(cfg) if device is None else device
    on_cuda = device.type == "cuda"
    planned = planned_budget(cfg, index, on_cuda=on_cuda, env=env)
    uuid = device_uuid(device, cuda) if on_cuda and not emulated(env) else None
    return discover_budget(planned, env=env, cgroup_root=cgroup_root, proc_cgroup=proc_cgroup,
                           nvml=nvml, use_nvml=on_cuda, device_uuid=uuid,
                           emulated=emulated(env))


# ------------------------------------------------------------------------------- the cap
def cap_bytes_for(budget_bytes: int, reserve: int | None = None) -> int:
    """What the allocator may hold for a budget: the budget less the runtime reserve the
    memory model adds on top of the tensors (None: ``DEFAULT_RESERVE``). Raises ConfigError
    when that leaves less than :data:`MIN_CAP`."""
    if reserve is None:
        from runner.methods.memory import DEFAULT_RESERVE

        reserve = DEFAULT_RESERVE
    cap = int(budget_bytes) - int(reserve)
    if cap < MIN_CAP:
        raise ConfigError(f"a budget of {budget_bytes / 2**20:.0f} MiB leaves "
                          f"{cap / 2**20:.0f} MiB for tensors after the "
                          f"{reserve / 2**20:.0f} MiB runtime reserve: too small for a GPU")
    return cap


def set_memory_cap(budget: Budget, device: torch.device, *, reserve: int | None = None,
                   cuda: Any = None) -> MemoryCap:
    """Cap this process's CUDA caching allocator on ``device`` to the budget less the
    reserve (:func:`cap_bytes_for`), as a fraction of the device's total memory (a MIG
    instance's own under MIG). A budget at least the device's size caps nothing (1.0)."""
    cuda = cuda if cuda is not None else torch.cuda
    index = _index(device, cuda)
    total = int(cuda.get_device_properties(index).total_memory)
    want = cap_bytes_for(budget.bytes, reserve)
    fraction = min(1.0, want / total)
    cuda.set_per_process_memory_fraction(float(fraction), index)
    return MemoryCap(device=f"cuda:{index}", budget_bytes=budget.bytes,
                     cap_bytes=int(fraction * total), total_bytes=total, fraction=fraction,
                     source=budget.source)


def cap_process(cfg: Any, index: int | None, *, device: torch.device | None = None,
                env: Mapping[str, str] | None = None, nvml: Any = None,
                cuda: Any = None) -> MemoryCap | None:
    """Set this process's CUDA memory cap from its budget when it trains on a CUDA device
    (one log line); None on the CPU, or when no budget is known (a warning: the process
    runs uncapped). Called once, before the model is loaded (runner/client.py ``main``)."""
    device = device_of(cfg) if device is None else device
    if device.type != "cuda":
        return None
    try:
        budget = process_budget(cfg, index, device=device, env=env, nvml=nvml, cuda=cuda)
    except ConfigError as e:
        log.warning("no per-process CUDA memory cap: %s", e)
        return None
    cap = set_memory_cap(budget, device, cuda=cuda)
    log.info("%s", cap.line())
    return cap


# ------------------------------------------------------------------------ out of memory
def is_cuda_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is CUDA running out of memory (the cap or the device):
    ``torch.cuda.OutOfMemoryError``, or the RuntimeError older code paths raise with CUDA's
    message (cuBLAS failing to allocate its workspace included)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "CUDA out of memory" in text or "CUBLAS_STATUS_ALLOC_FAILED" in text)


def append_event(run_dir: Path, kind: str, **fields: Any) -> bool:
    """Append one event to ``RUN/events.jsonl`` from this process (one ``write`` of one line
    with O_APPEND, so it interleaves with the server's own appends without tearing a
    line); False when the run directory cannot be written here (a device that joined over
    the network has none: the server's ``client_offline`` is then the record)."""
    from runner.rundir import EVENTS, _clean

    record = {"event": kind, "time": time.time(), **fields}
    line = (json.dumps(_clean(record), sort_keys=True) + "\n").encode()
    try:
        fd = os.open(Path(run_dir) / EVENTS, os.O_WRONLY | os.O_APPEND)
    except OSError:
        return False
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
    return True


def oom_event(client: str, exc: BaseException, *, budget: Budget | None,
              device: torch.device | None, cuda: Any = None) -> dict[str, Any]:
    """The fields of a ``budget_exceeded`` event for a CUDA out-of-memory error in
    ``client``: its budget, its cap and what the allocator held at its peak."""
    cuda = cuda if cuda is not None else torch.cuda
    fields: dict[str, Any] = {"client": client, "source": "client", "cause": "cuda_oom",
                              "detail": "CUDA out of memory under the client's per-process "
                                        "cap: its configuration needs more GPU memory than "
                                        "its budget",
                              "error": str(exc).strip().splitlines()[0][:300] if str(exc)
                              else type(exc).__name__}
    if budget is not None:
        fields["budget_bytes"] = budget.bytes
        fields["budget_source"] = budget.source
    if device is not None and device.type == "cuda":
        with contextlib.suppress(Exception):  # a broken context: the event without figures
            index = _index(device, cuda)
            fields["device"] = f"cuda:{index}"
            total = int(cuda.get_device_properties(index).total_memory)
            fields["cap_bytes"] = int(cuda.get_per_process_memory_fraction(index) * total)
            fields["memory_peak_bytes"] = int(cuda.max_memory_reserved(index))
            fields["cuda_peak_allocated_bytes"] = int(cuda.max_memory_allocated(index))
    return fields


def client_out_of_memory(client: Any, exc: BaseException) -> bool:
    """Handle ``exc`` in a running client (runner/client.py ``Client.run``) if it is a CUDA
    out-of-memory error: ``budget_exceeded`` event, ``ended`` marker, offline state with
    reason ``budget_exceeded`` (the server marks it offline at once); True when handled
    (the caller exits with :data:`BUDGET_EXCEEDED_EXIT`), False for any other error."""
    if not is_cuda_oom(exc):
        return False
    device: torch.device | None = getattr(client, "device", None)
    if device is None:
        with contextlib.suppress(Exception):
            device = device_of(client.cfg)
    budget = None
    with contextlib.suppress(Exception):
        budget = client._budget()
    _record(client.rt.run_dir, client.name, exc, budget, device)
    transport = getattr(client, "t", None)
    if transport is not None:
        with contextlib.suppress(Exception):  # the server sees the silence otherwise
            transport.set_state("offline", reason="budget_exceeded")
    return True


def starting_out_of_memory(rt: Any, exc: BaseException) -> bool:
    """As :func:`client_out_of_memory` for a client that ran out of GPU memory while it was
    being built (its model segment loading onto the device), before it had a connection."""
    if not is_cuda_oom(exc):
        return False
    device: torch.device | None = None
    with contextlib.suppress(Exception):
        device = device_of(rt.train)
    budget = None
    with contextlib.suppress(Exception):
        budget = process_budget(rt.train, rt.index(rt.me), device=device)
    _record(rt.run_dir, rt.me, exc, budget, device)
    return True


def _record(run_dir: Path, client: str, exc: BaseException, budget: Budget | None,
            device: torch.device | None) -> None:
    from runner.rundir import write_injected

    fields = oom_event(client, exc, budget=budget, device=device)
    log.error("%s exceeded its GPU budget (%s); leaving the run", client, fields["error"])
    if not append_event(Path(run_dir), "budget_exceeded", **fields):
        log.warning("the run directory %s is not writable here: budget_exceeded not "
                    "recorded in events.jsonl", run_dir)
    with contextlib.suppress(OSError):  # the server stops waiting for it to join
        write_injected(Path(run_dir), client, "ended", "cuda-oom\n")


__all__ = ["BUDGET_EXCEEDED_EXIT", "CUDA_HOST_RESERVE", "EMULATED_ENV", "MemoryCap",
           "append_event", "cap_bytes_for", "cap_process", "client_out_of_memory",
           "device_of", "device_uuid", "emulated", "is_cuda_oom", "oom_event",
           "planned_budget", "process_budget", "set_memory_cap", "starting_out_of_memory"]

"""FAKES for what cannot exist on the machines the tests run on: an NVIDIA GPU, its NVML
library and torch's CUDA runtime (tests/test_gpu.py, tests/test_budget.py,
tests/test_resources.py).

:class:`FakeNVML` stands in for the ``pynvml`` module as a *process* sees it. The host
view lists every GPU by its host index. The container view (:meth:`FakeNVML.container`)
is what the NVIDIA Container Toolkit gives a container whose ``NVIDIA_VISIBLE_DEVICES``
names some GPUs or a MIG instance: NVML numbers the visible GPUs from 0 in the host's order
(the one visible GPU is index 0, whatever its host index), and a MIG instance's parent GPU
is visible with only that instance readable (the other slots answer "No Permission" as the
driver does). MIG instances are found by their ``MIG-...`` UUID, each with its own memory.

:class:`FakeCuda` stands in for ``torch.cuda`` after CUDA was initialised on one device:
its properties (total memory, the UUID CUDA reports, without NVML's prefix), the
per-process memory fraction a cap sets, and a per-device RNG state (checkpoints).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

GIB = 2**30


class FakeNVMLError(Exception):
    """What the fake raises where real NVML raises NVMLError (NotFound, NoPermission...)."""


@dataclass
class MigInstance:
    uuid: str
    name: str
    total: int
    readable: bool = True  # False: another container's instance (NVML: No Permission)


@dataclass
class Gpu:
    uuid: str
    name: str
    total: int
    mig: list[MigInstance | None] | None = None  # None: not MIG-capable; slots otherwise
    processes: list[tuple[int, int | None]] = field(default_factory=list)  # (pid, used)


def a100_mig_host() -> list[Gpu]:
    """A host with two A100-80GB: GPU 0 plain, GPU 1 in MIG mode with a 1g.10gb, a
    2g.20gb and a 3g.40gb instance (slot 3 empty); the memory NVML reports for each."""
    return [
        Gpu("GPU-00000000-1111-2222-3333-444444444444", "NVIDIA A100-SXM4-80GB", 80 * GIB),
        Gpu("GPU-aaaaaaaa-1111-2222-3333-444444444444", "NVIDIA A100-SXM4-80GB", 80 * GIB,
            mig=[MigInstance("MIG-11111111-2222-3333-4444-555555555555",
                             "NVIDIA A100-SXM4-80GB MIG 1g.10gb", 9728 * 2**20),
                 MigInstance("MIG-22222222-2222-3333-4444-555555555555",
                             "NVIDIA A100-SXM4-80GB MIG 2g.20gb", 19968 * 2**20),
                 MigInstance("MIG-33333333-2222-3333-4444-555555555555",
                             "NVIDIA A100-SXM4-80GB MIG 3g.40gb", 40192 * 2**20),
                 None]),
    ]


class FakeNVML:
    """A FAKE ``pynvml`` module: the GPUs ``gpus`` as this process sees them (module
    docstring). ``uuid_lookup_knows_mig=False`` mimics older drivers whose
    nvmlDeviceGetHandleByUUID does not resolve MIG UUIDs (the scan fallback)."""

    NVMLError = FakeNVMLError

    def __init__(self, gpus: list[Gpu], *, uuid_lookup_knows_mig: bool = True,
                 init_fails: bool = False) -> None:
        self.gpus = gpus
        self.uuid_lookup_knows_mig = uuid_lookup_knows_mig
        self.init_fails = init_fails
        self.initialised = 0
        self.calls: list[str] = []

    @classmethod
    def container(cls, host: list[Gpu], visible: str, **kw: Any) -> FakeNVML:
        """What a container started with ``NVIDIA_VISIBLE_DEVICES=visible`` sees of ``host``:
        the listed GPUs (host indices or ``GPU-`` UUIDs) renumbered from 0 in host order; a
        listed ``MIG-`` UUID shows its parent GPU with only that instance readable."""
        keep: dict[int, Gpu] = {}
        for item in (v.strip() for v in visible.split(",")):
            if item.isdigit():
                keep[int(item)] = host[int(item)]
                continue
            for i, gpu in enumerate(host):
                if gpu.uuid == item:
                    keep[i] = gpu
                for inst in gpu.mig or []:
                    if inst is not None and inst.uuid == item:
                        slots = [None if s is None else
                                 MigInstance(s.uuid, s.name, s.total, s.uuid == item)
                                 for s in gpu.mig or []]
                        keep[i] = Gpu(gpu.uuid, gpu.name, gpu.total, slots, gpu.processes)
        return cls([keep[i] for i in sorted(keep)], **kw)

    # life cycle
    def nvmlInit(self) -> None:  # noqa: N802 - pynvml's names
        if self.init_fails:
            raise FakeNVMLError("NVML Shared Library Not Found")
        self.initialised += 1

    def nvmlShutdown(self) -> None:  # noqa: N802
        self.initialised -= 1

    # devices
    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> Gpu:  # noqa: N802
        self.calls.append(f"index {i}")
        if not 0 <= i < len(self.gpus):
            raise FakeNVMLError("Invalid Argument")
        return self.gpus[i]

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> Gpu | MigInstance:  # noqa: N802
        self.calls.append(f"uuid {uuid}")
        for gpu in self.gpus:
            if gpu.uuid == uuid:
                return gpu
            for inst in gpu.mig or []:
                if (self.uuid_lookup_knows_mig and inst is not None and inst.readable
                        and inst.uuid == uuid):
                    return inst
        raise FakeNVMLError("Not Found")

    def nvmlDeviceGetMigMode(self, gpu: Gpu) -> tuple[int, int]:  # noqa: N802
        if not isinstance(gpu, Gpu) or gpu.mig is None:
            raise FakeNVMLError("Not Supported")
        return (1, 1)

    def nvmlDeviceGetMaxMigDeviceCount(self, gpu: Gpu) -> int:  # noqa: N802
        return len(gpu.mig or [])

    def nvmlDeviceGetMigDeviceHandleByIndex(self, gpu: Gpu, j: int) -> MigInstance:  # noqa: N802
        slot = (gpu.mig or [])[j] if 0 <= j < len(gpu.mig or []) else None
        if slot is None:
            raise FakeNVMLError("Not Found")
        if not slot.readable:
            raise FakeNVMLError("No Permission")
        return slot

    def nvmlDeviceGetUUID(self, handle: Gpu | MigInstance) -> str:  # noqa: N802
        return handle.uuid

    def nvmlDeviceGetName(self, handle: Gpu | MigInstance) -> bytes:  # noqa: N802
        return handle.name.encode()  # older pynvml returns bytes

    def nvmlDeviceGetMemoryInfo(self, handle: Gpu | MigInstance) -> SimpleNamespace:  # noqa: N802
        return SimpleNamespace(total=handle.total, free=handle.total // 2, used=0)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: Gpu) -> list[SimpleNamespace]:  # noqa: N802
        return [SimpleNamespace(pid=pid, usedGpuMemory=used)
                for pid, used in getattr(handle, "processes", [])]


class FakeCuda:
    """A FAKE ``torch.cuda`` with one initialised device (index 0): ``total`` bytes, the
    UUID CUDA reports (no ``GPU-``/``MIG-`` prefix, as CUDA writes it), allocator figures,
    and the per-process memory fraction :func:`set_per_process_memory_fraction` sets."""

    def __init__(self, total: int = 80 * GIB, uuid: str = "", allocated: int = 0,
                 peak: int = 0, reserved: int | None = None) -> None:
        self.total, self.uuid = total, uuid
        self.allocated, self.peak = allocated, peak
        self.reserved = allocated if reserved is None else reserved
        self.fraction = 1.0
        self.fractions: list[tuple[float, int]] = []
        self.emptied = 0
        self.rng: dict[int, Any] = {}  # device index -> RNG state (a CPU uint8 tensor)
        self.rng_set: list[int] = []  # the device indices set_rng_state was called for

    def is_initialized(self) -> bool:
        return True

    def current_device(self) -> int:
        return 0

    def get_device_properties(self, index: int) -> SimpleNamespace:
        assert index == 0
        return SimpleNamespace(total_memory=self.total, uuid=self.uuid, name="fake")

    def set_per_process_memory_fraction(self, fraction: float, device: int = 0) -> None:
        assert isinstance(fraction, float) and 0.0 <= fraction <= 1.0
        self.fraction = fraction
        self.fractions.append((fraction, device))

    def get_per_process_memory_fraction(self, device: int = 0) -> float:
        return self.fraction

    def memory_allocated(self, device: int | None = None) -> int:
        return self.allocated

    def max_memory_allocated(self, device: int | None = None) -> int:
        return self.peak

    def memory_reserved(self, device: int | None = None) -> int:
        return self.reserved

    def max_memory_reserved(self, device: int | None = None) -> int:
        return max(self.reserved, self.peak)

    # what memory calibration and checkpoints call (runner/methods/memory.py,
    # runner/distributed/checkpoint.py): no kernels to wait for, no cache to free, and one
    # RNG state per device index, recorded per call
    def synchronize(self, device: int | None = None) -> None:
        pass

    def empty_cache(self) -> None:
        self.emptied += 1

    def get_rng_state(self, device: int = 0) -> Any:
        import torch

        return self.rng.setdefault(device, torch.full((16,), device, dtype=torch.uint8))

    def set_rng_state(self, state: Any, device: int = 0) -> None:
        self.rng[device] = state.clone()
        self.rng_set.append(device)

"""Budget discovery (runner/emulation/budget.py): NVML, then cgroup, then the profile.

There is NO GPU on the machines these tests run on, so the NVML path is exercised with a
FAKE NVML module (:class:`FakeNVML`, standing in for ``pynvml``) that reports one A100 in
MIG mode with two instances and one plain GPU. The cgroup path reads fake cgroup files
written into ``tmp_path`` (the root is injectable). One test runs the real ``pynvml`` here
to show that a machine without a GPU falls back cleanly.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from runner.emulation.budget import (
    Budget,
    cgroup_budget,
    discover_budget,
    nvml_budget,
    visible_device,
)
from runner.errors import ConfigError

GIB = 2**30
MIG_SMALL = "MIG-11111111-2222-3333-4444-555555555555"  # 1g.10gb
MIG_LARGE = "MIG-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"  # 2g.20gb


class FakeNVMLError(Exception):
    """What the fake raises where real NVML raises NVMLError (NotSupported, NotFound...)."""


class FakeNVML:
    """A FAKE stand-in for the ``pynvml`` module (no GPU exists on CI).

    GPU 0: "A100-SXM4-80GB", MIG mode on, instances in slots 0 and 1 (slot 2 empty).
    GPU 1: "RTX 4090", 24 GiB, not MIG-capable (GetMigMode raises, like real NVML).
    ``uuid_lookup_knows_mig=False`` mimics older drivers whose nvmlDeviceGetHandleByUUID
    does not resolve MIG UUIDs, forcing the scan fallback.
    """

    def __init__(self, uuid_lookup_knows_mig: bool = True, init_fails: bool = False):
        self.uuid_lookup_knows_mig = uuid_lookup_knows_mig
        self.init_fails = init_fails
        self.gpus = [
            {"uuid": "GPU-a100", "name": b"NVIDIA A100-SXM4-80GB", "total": 80 * GIB,
             "mig": [{"uuid": MIG_SMALL, "name": "MIG 1g.10gb", "total": 10 * GIB},
                     {"uuid": MIG_LARGE, "name": "MIG 2g.20gb", "total": 20 * GIB}, None]},
            {"uuid": "GPU-4090", "name": "NVIDIA GeForce RTX 4090", "total": 24 * GIB,
             "mig": None},
        ]
        self.initialised = 0

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

    def nvmlDeviceGetHandleByIndex(self, i: int) -> dict:  # noqa: N802
        if not 0 <= i < len(self.gpus):
            raise FakeNVMLError("Invalid Argument")
        return self.gpus[i]

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> dict:  # noqa: N802
        for gpu in self.gpus:
            if gpu["uuid"] == uuid:
                return gpu
            for mig in gpu["mig"] or []:
                if self.uuid_lookup_knows_mig and mig and mig["uuid"] == uuid:
                    return mig
        raise FakeNVMLError("Not Found")

    def nvmlDeviceGetMigMode(self, gpu: dict) -> tuple[int, int]:  # noqa: N802
        if gpu.get("mig") is None:
            raise FakeNVMLError("Not Supported")
        return (1, 1)

    def nvmlDeviceGetMaxMigDeviceCount(self, gpu: dict) -> int:  # noqa: N802
        return len(gpu["mig"])

    def nvmlDeviceGetMigDeviceHandleByIndex(self, gpu: dict, j: int) -> dict:  # noqa: N802
        slot = gpu["mig"][j]
        if slot is None:
            raise FakeNVMLError("Not Found")
        return slot

    def nvmlDeviceGetUUID(self, handle: dict) -> str:  # noqa: N802
        return handle["uuid"]

    def nvmlDeviceGetName(self, handle: dict) -> str | bytes:  # noqa: N802
        return handle["name"]

    def nvmlDeviceGetMemoryInfo(self, handle: dict) -> SimpleNamespace:  # noqa: N802
        return SimpleNamespace(total=handle["total"], free=handle["total"] // 2, used=0)


@pytest.mark.parametrize("knows_mig", [True, False], ids=["uuid-lookup", "scan-fallback"])
def test_fake_nvml_mig_uuid_from_cuda_visible_devices(knows_mig: bool) -> None:
    nvml = FakeNVML(uuid_lookup_knows_mig=knows_mig)
    b = nvml_budget({"CUDA_VISIBLE_DEVICES": MIG_LARGE}, nvml)
    assert b is not None
    assert (b.bytes, b.source) == (20 * GIB, "nvml")
    assert MIG_LARGE in b.detail and "2g.20gb" in b.detail
    assert nvml.initialised == 0  # shut down again


def test_fake_nvml_mig_uuid_from_container_runtime_variable() -> None:
    # In a container the NVIDIA runtime sets NVIDIA_VISIBLE_DEVICES to the MIG UUID.
    b = nvml_budget({"NVIDIA_VISIBLE_DEVICES": MIG_SMALL}, FakeNVML())
    assert b == Budget(10 * GIB, "nvml", f"{MIG_SMALL} MIG 1g.10gb")


@pytest.mark.parametrize(("env", "expected"), [
    ({"CUDA_VISIBLE_DEVICES": "1"}, 24 * GIB),  # plain GPU by index
    ({"CUDA_VISIBLE_DEVICES": "0"}, 10 * GIB),  # MIG-enabled GPU by index: first instance
    ({"CUDA_VISIBLE_DEVICES": "GPU-4090,0"}, 24 * GIB),  # first entry of a list, GPU UUID
    ({}, 10 * GIB),  # nothing named: first device memory can be allocated on
    ({"NVIDIA_VISIBLE_DEVICES": "all"}, 10 * GIB),
    ({"CUDA_VISIBLE_DEVICES": "1", "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "1=6G"}, 6 * GIB),
    ({"CUDA_VISIBLE_DEVICES": "1", "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=6G"}, 24 * GIB),
])
def test_fake_nvml_device_selection(env: dict[str, str], expected: int) -> None:
    b = nvml_budget(env, FakeNVML())
    assert b is not None and b.source == "nvml"
    assert b.bytes == expected


def test_fake_nvml_failures_fall_back_to_the_next_source(tmp_path: Path) -> None:
    root = _cgroup_v2(tmp_path, "1073741824\n")
    assert nvml_budget({}, FakeNVML(init_fails=True)) is None
    assert nvml_budget({"CUDA_VISIBLE_DEVICES": "MIG-unknown"}, FakeNVML()) is None
    assert nvml_budget({"CUDA_VISIBLE_DEVICES": "7"}, FakeNVML()) is None
    b = discover_budget(5, env={"CUDA_VISIBLE_DEVICES": "7"}, nvml=FakeNVML(),
                        cgroup_root=root, proc_cgroup=tmp_path / "none")
    assert (b.bytes, b.source) == (2**30, "cgroup-v2")


def test_hidden_devices_skip_nvml() -> None:
    nvml = FakeNVML()
    for value in ("none", "void", ""):
        assert visible_device({"NVIDIA_VISIBLE_DEVICES": value}) == ""
        assert nvml_budget({"CUDA_VISIBLE_DEVICES": value}, nvml) is None
    assert nvml.initialised == 0


def test_nvml_wins_over_cgroup_and_profile(tmp_path: Path) -> None:
    root = _cgroup_v2(tmp_path, "1073741824\n")
    b = discover_budget(123, env={"CUDA_VISIBLE_DEVICES": MIG_LARGE}, nvml=FakeNVML(),
                        cgroup_root=root)
    assert b.source == "nvml" and b.bytes == 20 * GIB
    b = discover_budget(123, env={"CUDA_VISIBLE_DEVICES": MIG_LARGE}, nvml=FakeNVML(),
                        cgroup_root=root, proc_cgroup=tmp_path / "none", use_nvml=False)
    assert b.source == "cgroup-v2"


def test_default_loader_imports_pynvml(monkeypatch: pytest.MonkeyPatch) -> None:
    # The monkeypatched "pynvml" module is the FAKE: without a GPU the real one cannot answer.
    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML())
    b = nvml_budget({"CUDA_VISIBLE_DEVICES": MIG_SMALL})
    assert b is not None and b.bytes == 10 * GIB


def test_real_nvml_without_gpu_falls_back_cleanly(tmp_path: Path) -> None:
    # The real pynvml on a machine without a GPU (CI): no exception, no answer.
    import pynvml  # noqa: F401 - nvidia-ml-py is a dependency

    try:
        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        pytest.skip("this machine has a working NVML (a GPU); the no-GPU fallback is moot")
    except pynvml.NVMLError:
        pass
    assert nvml_budget({}) is None
    b = discover_budget(777, env={}, cgroup_root=tmp_path / "nothing",
                        proc_cgroup=tmp_path / "none")
    assert b == Budget(777, "profile", "no GPU and no cgroup memory limit")


# ----------------------------------------------------------------------------- cgroups
def _cgroup_v2(tmp_path: Path, memory_max: str) -> Path:
    root = tmp_path / "cg2"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (root / "memory.max").write_text(memory_max)
    return root


def test_cgroup_v2_container_limit(tmp_path: Path) -> None:
    root = _cgroup_v2(tmp_path, "734003200\n")
    proc = tmp_path / "proc_cgroup"
    proc.write_text("0::/\n")  # inside a cgroup namespace the container is the root
    b = cgroup_budget(root, proc)
    assert b == Budget(734003200, "cgroup-v2", str(root / "memory.max"))


def test_cgroup_v2_unlimited_and_nested(tmp_path: Path) -> None:
    root = _cgroup_v2(tmp_path, "max\n")
    proc = tmp_path / "proc_cgroup"
    proc.write_text("0::/system.slice/docker-abc.scope\n")
    assert cgroup_budget(root, proc) is None  # "max" everywhere: unlimited
    (root / "system.slice").mkdir()
    (root / "system.slice" / "memory.max").write_text("4294967296\n")
    (root / "system.slice" / "docker-abc.scope").mkdir()
    leaf = root / "system.slice" / "docker-abc.scope" / "memory.max"
    leaf.write_text("max\n")
    assert cgroup_budget(root, proc).bytes == 4 * GIB  # a parent's limit binds
    leaf.write_text("1073741824\n")
    b = cgroup_budget(root, proc)
    assert (b.bytes, b.detail) == (GIB, str(leaf))  # the tightest one wins


def test_cgroup_v1(tmp_path: Path) -> None:
    root = tmp_path / "cg1"
    (root / "memory").mkdir(parents=True)
    top = root / "memory" / "memory.limit_in_bytes"
    top.write_text("9223372036854771712\n")  # v1's "no limit"
    proc = tmp_path / "proc_cgroup"
    proc.write_text("12:pids:/docker/abc\n4:memory:/docker/abc\n0::/\n")
    assert cgroup_budget(root, proc) is None
    assert discover_budget(99, env={"CUDA_VISIBLE_DEVICES": ""}, cgroup_root=root,
                           proc_cgroup=proc).source == "profile"
    (root / "memory" / "docker" / "abc").mkdir(parents=True)
    (root / "memory" / "docker" / "abc" / "memory.limit_in_bytes").write_text("536870912\n")
    b = discover_budget(99, env={"CUDA_VISIBLE_DEVICES": ""}, cgroup_root=root,
                        proc_cgroup=proc)
    assert (b.bytes, b.source) == (512 * 2**20, "cgroup-v1")
    top.write_text("268435456\n")  # container namespace: the limit sits at the root
    assert cgroup_budget(root, tmp_path / "none").bytes == 256 * 2**20


def test_no_source_at_all_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no memory budget"):
        discover_budget(None, env={"CUDA_VISIBLE_DEVICES": ""}, cgroup_root=tmp_path,
                        proc_cgroup=tmp_path / "none")
    with pytest.raises(ConfigError, match="must be > 0"):
        discover_budget(0, env={"CUDA_VISIBLE_DEVICES": ""}, cgroup_root=tmp_path,
                        proc_cgroup=tmp_path / "none")

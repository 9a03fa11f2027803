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


class Untouchable:
    """Stands in for ``pynvml`` where NVML must not be asked at all."""

    def __getattr__(self, name: str) -> None:
        raise AssertionError(f"NVML was asked ({name}) by a process that does not use a GPU")


def test_on_a_gpu_nvml_bounds_the_planned_budget_and_the_cgroup_is_not_asked(
        tmp_path: Path) -> None:
    """FAKE NVML (no GPU here). A process that trains on a CUDA device (``use_nvml``) has
    its planned budget within the MIG instance's own memory; the cgroup (host memory) is no
    GPU budget. A CPU process never asks NVML (issue 27: the host GPU's total used to win)."""
    root = _cgroup_v2(tmp_path, "1073741824\n")
    env = {"CUDA_VISIBLE_DEVICES": MIG_LARGE}
    b = discover_budget(None, env=env, nvml=FakeNVML(), cgroup_root=root, use_nvml=True)
    assert (b.source, b.bytes) == ("nvml", 20 * GIB)  # nothing planned: the instance
    b = discover_budget(5 * 10**9, env=env, nvml=FakeNVML(), cgroup_root=root, use_nvml=True)
    assert (b.source, b.bytes) == ("profile", 5 * 10**9)  # planned, within the instance
    assert "MIG 2g.20gb" in b.detail and "cap" in b.detail
    b = discover_budget(30 * GIB, env=env, nvml=FakeNVML(), cgroup_root=root, use_nvml=True)
    assert (b.source, b.bytes) == ("nvml", 20 * GIB)  # planned more than it holds
    b = discover_budget(123, env=env, nvml=Untouchable(), cgroup_root=root,
                        proc_cgroup=tmp_path / "none")
    assert b.source == "cgroup-v2"  # the default: a CPU process


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


# ------------------------------------------- NVML as a container sees it (issue 27 part 4)
# FAKE NVML again (tests/fake_gpu.py): the container view numbers the visible GPUs from 0
# and shows a MIG instance's parent GPU with only that instance readable.
def test_container_numbers_the_one_visible_gpu_zero() -> None:
    """``NVIDIA_VISIBLE_DEVICES=1`` is the host's index; inside the container NVML sees one
    GPU, index 0 (the budget used to raise there, and the error was swallowed)."""
    from fake_gpu import FakeNVML as ContainerNVML
    from fake_gpu import Gpu

    host = [Gpu(f"GPU-{i}", f"GPU {i}", (i + 1) * 8 * GIB) for i in range(4)]
    for host_index in (3, 1):
        nvml = ContainerNVML.container(host, str(host_index))
        assert nvml.nvmlDeviceGetCount() == 1
        b = nvml_budget({"NVIDIA_VISIBLE_DEVICES": str(host_index)}, nvml, strict=True)
        assert b is not None and b.bytes == (host_index + 1) * 8 * GIB
    # two listed: each host index is its rank among them
    nvml = ContainerNVML.container(host, "3,1")
    assert nvml_budget({"NVIDIA_VISIBLE_DEVICES": "3,1"}, nvml).bytes == 32 * GIB
    # outside a container the variable is read by nobody: host numbering as is
    nvml = ContainerNVML(host)
    assert nvml_budget({"NVIDIA_VISIBLE_DEVICES": "2"}, nvml).bytes == 24 * GIB
    # CUDA_VISIBLE_DEVICES is this process's own numbering
    nvml = ContainerNVML.container(host, "2,3")
    assert nvml_budget({"CUDA_VISIBLE_DEVICES": "1"}, nvml).bytes == 32 * GIB


@pytest.mark.parametrize("knows_mig", [True, False], ids=["uuid-lookup", "scan-fallback"])
def test_container_mig_instance_by_uuid_with_its_own_memory(knows_mig: bool) -> None:
    """A container given one MIG instance: found by its UUID (the other slots answer "No
    Permission"), its own memory, not its parent A100's 80 GB; by index (``1:1``, host
    numbering) too."""
    from fake_gpu import FakeNVML as ContainerNVML
    from fake_gpu import a100_mig_host

    host = a100_mig_host()
    two_g = host[1].mig[1]
    nvml = ContainerNVML.container(host, two_g.uuid, uuid_lookup_knows_mig=knows_mig)
    assert nvml.nvmlDeviceGetCount() == 1
    b = nvml_budget({"NVIDIA_VISIBLE_DEVICES": two_g.uuid}, nvml, strict=True)
    assert b is not None and (b.bytes, b.source) == (19968 * 2**20, "nvml")
    assert "2g.20gb" in b.detail
    nvml = ContainerNVML.container(host, two_g.uuid)
    assert nvml_budget({"NVIDIA_VISIBLE_DEVICES": "1:1"}, nvml, strict=True).bytes == \
        19968 * 2**20
    # the host's view: a MIG-enabled GPU by index is its first instance (what CUDA uses)
    assert nvml_budget({"CUDA_VISIBLE_DEVICES": "1"}, ContainerNVML(host)).bytes == \
        9728 * 2**20


def test_the_uuid_cuda_reports_wins_over_the_variables() -> None:
    """torch reports the device's UUID without NVML's ``MIG-``/``GPU-`` prefix; it names the
    device exactly, whatever CUDA_VISIBLE_DEVICES' numbering says."""
    from fake_gpu import FakeNVML as ContainerNVML
    from fake_gpu import a100_mig_host

    from runner.emulation.budget import canonical_uuid

    host = a100_mig_host()
    three_g = host[1].mig[2]
    bare = canonical_uuid(three_g.uuid)
    assert bare == three_g.uuid[4:].lower()
    for knows in (True, False):
        b = nvml_budget({"CUDA_VISIBLE_DEVICES": "0"},
                        ContainerNVML(host, uuid_lookup_knows_mig=knows), uuid=bare,
                        strict=True)
        assert b is not None and b.bytes == 40192 * 2**20
    plain = canonical_uuid(host[0].uuid)
    assert nvml_budget({}, ContainerNVML(host), uuid=plain).bytes == 80 * GIB


def test_a_device_nvml_cannot_find_is_reported_not_swallowed(
        caplog: pytest.LogCaptureFixture) -> None:
    from fake_gpu import FakeNVML as ContainerNVML
    from fake_gpu import a100_mig_host

    from runner.emulation.budget import GPUError

    nvml = ContainerNVML(a100_mig_host())
    with caplog.at_level("WARNING", logger="runner.emulation.budget"):
        assert nvml_budget({"NVIDIA_VISIBLE_DEVICES": "MIG-not-there"}, nvml) is None
    (record,) = [r for r in caplog.records if "MIG-not-there" in r.getMessage()]
    assert "NVML sees" in record.getMessage() and "MIG-11111111" in record.getMessage()
    with pytest.raises(GPUError, match="no GPU or MIG instance with UUID MIG-not-there"):
        nvml_budget({"NVIDIA_VISIBLE_DEVICES": "MIG-not-there"}, nvml, strict=True)
    with pytest.raises(GPUError, match="GPU index 5 does not exist: NVML sees 2 GPU"):
        nvml_budget({"CUDA_VISIBLE_DEVICES": "5"}, nvml, strict=True)
    # no driver: quiet without strict (the CPU case), said with it
    caplog.clear()
    assert nvml_budget({}, ContainerNVML([], init_fails=True)) is None
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    with pytest.raises(GPUError, match="NVML did not start"):
        nvml_budget({}, ContainerNVML([], init_fails=True), strict=True)


def test_inventory_lists_gpus_and_mig_instances_read_only() -> None:
    from fake_gpu import FakeNVML as ContainerNVML
    from fake_gpu import a100_mig_host

    from runner.emulation.budget import GPUError, nvml_inventory

    nvml = ContainerNVML(a100_mig_host())
    gpus = nvml_inventory(nvml)
    assert [g["index"] for g in gpus] == [0, 1]
    assert gpus[0]["mig"] is None and gpus[0]["memory_bytes"] == 80 * GIB
    assert [(m["slot"], m["name"].split()[-1], m["memory_bytes"]) for m in gpus[1]["mig"]] == [
        (0, "1g.10gb", 9728 * 2**20), (1, "2g.20gb", 19968 * 2**20),
        (2, "3g.40gb", 40192 * 2**20)]
    assert nvml.initialised == 0
    with pytest.raises(GPUError, match="NVML did not start"):
        nvml_inventory(ContainerNVML([], init_fails=True))


def test_emulated_on_a_gpu_takes_the_planned_budget_and_never_asks_nvml(
        tmp_path: Path) -> None:
    """GPU present, stand-in emulated: the planned (mapping) budget, NVML not asked."""
    root = _cgroup_v2(tmp_path, "9999999999\n")
    b = discover_budget(750_000_000, env={}, nvml=Untouchable(), cgroup_root=root,
                        use_nvml=True, emulated=True)
    assert (b.bytes, b.source) == (750_000_000, "profile") and "emulation" in b.detail

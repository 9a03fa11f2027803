"""Measured resource use (runner/emulation/resources.py): cgroup, RSS, and GPU memory of a process.

The cgroup paths read fake cgroup files written into ``tmp_path`` (the root, the
/proc/self/cgroup file and the PIDs are injectable), for v2 and v1 and for the cases where
the cgroup must NOT be used (no limit, other processes in it). RSS is read for real.

There is NO GPU on the machines these tests run on: the NVML and CUDA paths are exercised
with FAKES (:class:`FakeNVML` standing in for ``pynvml``, :class:`FakeCuda` for
``torch.cuda``); one test runs the real ``pynvml`` here to show that a machine without a GPU
falls back cleanly. The host's sampling of containers (testbed/backends/compose_run.py) runs on
FAKE Docker SDK containers (:class:`FakeContainer`). The real paths (a container's cgroup,
the Docker API) are checked end to end in tests/test_containers.py.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from runner.emulation.resources import (
    Meter,
    Usage,
    cgroup_usage,
    nvml_process_bytes,
    own_cgroup,
    rss_usage,
    usage_fields,
)

MIB = 2**20
ME = {os.getpid(), os.getppid()}


def _v2(root: Path, limit: str = "524288000", current: int = 300 * MIB,
        peak: int | None = 400 * MIB, procs: str | None = None, own: str = "/") -> Path:
    """A fake cgroup v2 mount at ``root`` and a /proc/self/cgroup naming ``own``."""
    leaf = root / own.strip("/") if own != "/" else root
    leaf.mkdir(parents=True, exist_ok=True)
    (root / "cgroup.controllers").write_text("cpu memory pids\n")
    (leaf / "memory.max").write_text(limit + "\n")
    (leaf / "memory.current").write_text(f"{current}\n")
    if peak is not None:
        (leaf / "memory.peak").write_text(f"{peak}\n")
    if procs is not None:
        (leaf / "cgroup.procs").write_text(procs)
    proc = root.parent / "proc-self-cgroup"
    proc.write_text(f"0::{own}\n")
    return proc


def test_cgroup_v2_in_a_limited_container(tmp_path: Path) -> None:
    proc = _v2(tmp_path / "cg", procs=f"{os.getpid()}\n")
    u = cgroup_usage(tmp_path / "cg", proc)
    assert u is not None
    assert (u.current, u.peak, u.source, u.limit) == (300 * MIB, 400 * MIB, "cgroup", 500 * MIB)
    assert "cgroup-v2" in u.detail
    assert u.fields() == {"memory_current_bytes": 300 * MIB, "memory_peak_bytes": 400 * MIB,
                          "memory_source": "cgroup", "memory_limit_bytes": 500 * MIB}


def test_cgroup_v2_without_memory_peak_keeps_the_peak_of_its_samples(tmp_path: Path) -> None:
    """Kernels before 5.19 have no memory.peak: the meter remembers the largest sample."""
    root = tmp_path / "cg"
    proc = _v2(root, current=350 * MIB, peak=None)
    m = Meter(cgroup_root=root, proc_cgroup=proc)
    assert (m.sample().current, m.sample().peak) == (350 * MIB, 350 * MIB)
    (root / "memory.current").write_text(f"{200 * MIB}\n")
    u = m.sample()
    assert (u.current, u.peak, u.source) == (200 * MIB, 350 * MIB, "cgroup")


def test_cgroup_v1_mount_of_the_container_itself(tmp_path: Path) -> None:
    """v1 without a cgroup namespace: /proc/self/cgroup names the host's path, which does not
    exist inside the container, where the memory mount is the container's own cgroup."""
    root = tmp_path / "cg"
    mem = root / "memory"
    mem.mkdir(parents=True)
    (mem / "memory.limit_in_bytes").write_text(f"{256 * MIB}\n")
    (mem / "memory.usage_in_bytes").write_text(f"{100 * MIB}\n")
    (mem / "memory.max_usage_in_bytes").write_text(f"{180 * MIB}\n")
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text("12:pids:/docker/abc\n4:memory:/docker/abc\n0::/\n")
    assert own_cgroup(root, proc) == (mem, "v1", 256 * MIB)
    u = cgroup_usage(root, proc)
    assert u is not None and (u.current, u.peak, u.limit) == (100 * MIB, 180 * MIB, 256 * MIB)


@pytest.mark.parametrize("case", ["unlimited", "shared", "unlimited-leaf-under-limited-parent"])
def test_cgroup_not_used(case: str, tmp_path: Path) -> None:
    """No limit, or other processes in the cgroup (the local backend's processes next to
    each other, even in a limited container), or a limit only on an ancestor: RSS."""
    root = tmp_path / "cg"
    if case == "unlimited":
        proc = _v2(root, limit="max")
    elif case == "shared":
        proc = _v2(root, procs=f"1\n{os.getpid()}\n4242\n")
    else:
        proc = _v2(root, own="/user.slice/session-1.scope", limit="max")
        (root / "memory.max").write_text(f"{MIB * 100}\n")
    assert own_cgroup(root, proc, ME) is None
    u = Meter(cgroup_root=root, proc_cgroup=proc, cuda=None, use_gpu=False).sample()
    assert u.source == "rss" and u.limit is None


def test_rss_of_this_process(tmp_path: Path) -> None:
    u = rss_usage()
    assert u.source == "rss" and 0 < u.current <= u.peak
    ballast = bytearray(64 * MIB)  # touch 64 MiB: the peak must follow
    ballast[::4096] = b"x" * len(ballast[::4096])
    assert rss_usage().peak >= u.current + 32 * MIB
    del ballast
    fake = tmp_path / "status"
    fake.write_text("Name:\tpython\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n")
    u = rss_usage(fake)
    assert (u.current, u.peak, u.detail) == (1024 * 1024, 2048 * 1024, "VmRSS/VmHWM")


# ------------------------------------------------------------------------------- GPU fakes
class FakeNVMLError(Exception):
    """What the fake raises where real NVML raises NVMLError."""


class FakeNVML:
    """A FAKE ``pynvml`` (no GPU on CI): one 24 GiB GPU running two compute processes, this
    test process (``used`` bytes) and another one."""

    def __init__(self, used: int | None, pid: int) -> None:
        self.used, self.pid, self.initialised = used, pid, 0
        self.gpu = {"uuid": "GPU-1", "total": 24 * 2**30}

    def nvmlInit(self) -> None:  # noqa: N802 - pynvml's names
        self.initialised += 1

    def nvmlShutdown(self) -> None:  # noqa: N802
        self.initialised -= 1

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return 1

    def nvmlDeviceGetHandleByIndex(self, i: int) -> dict:  # noqa: N802
        if i != 0:
            raise FakeNVMLError("Invalid Argument")
        return self.gpu

    def nvmlDeviceGetMigMode(self, gpu: dict) -> tuple[int, int]:  # noqa: N802
        raise FakeNVMLError("Not Supported")

    def nvmlDeviceGetComputeRunningProcesses(self, gpu: dict) -> list:  # noqa: N802
        assert gpu is self.gpu
        return [SimpleNamespace(pid=self.pid + 1, usedGpuMemory=5 * 2**30),
                SimpleNamespace(pid=self.pid, usedGpuMemory=self.used)]


class FakeCuda:
    """A FAKE ``torch.cuda`` after CUDA was initialised on device 0 (torch.cuda's API: the
    figures per device; no UUID, as an old torch: NVML is then found by the variables)."""

    def __init__(self, allocated: int, peak: int) -> None:
        self.allocated, self.peak = allocated, peak

    def is_initialized(self) -> bool:
        return True

    def current_device(self) -> int:
        return 0

    def memory_allocated(self, device: int | None = None) -> int:
        return self.allocated

    def max_memory_allocated(self, device: int | None = None) -> int:
        return self.peak

    def memory_reserved(self, device: int | None = None) -> int:
        return self.allocated

    def max_memory_reserved(self, device: int | None = None) -> int:
        return self.peak


def test_fake_nvml_per_process_memory_is_the_gpu_figure() -> None:
    pid = os.getpid()
    nvml = FakeNVML(used=3 * 2**30, pid=pid)
    assert nvml_process_bytes(pid, {"CUDA_VISIBLE_DEVICES": "0"}, nvml) == 3 * 2**30
    assert nvml.initialised == 0  # shut down again
    assert nvml_process_bytes(pid, {"CUDA_VISIBLE_DEVICES": ""}, nvml) is None  # hidden
    m = Meter(env={}, nvml=nvml, cuda=FakeCuda(2 * 2**30, 2 * 2**30 + 5))
    u = m.sample()
    assert (u.source, u.current, u.peak) == ("nvml", 3 * 2**30, 3 * 2**30)
    assert u.extra["cuda_allocated_bytes"] == 2 * 2**30
    assert u.extra["cuda_peak_allocated_bytes"] == 2 * 2**30 + 5
    assert u.extra["host_memory_source"] in ("rss", "cgroup")
    assert 0 < u.extra["host_memory_current_bytes"] <= u.extra["host_memory_peak_bytes"]
    nvml.used = 1 * 2**30  # NVML has no peak: the meter keeps the largest sample
    u = m.sample()
    assert (u.current, u.peak) == (2**30, 3 * 2**30)


def test_fake_cuda_when_nvml_does_not_list_this_process() -> None:
    """In a container NVML lists host PIDs, or the driver hides the figure: torch.cuda."""
    for nvml in (FakeNVML(used=2**30, pid=os.getpid() + 100), FakeNVML(None, os.getpid())):
        u = Meter(env={}, nvml=nvml, cuda=FakeCuda(100 * MIB, 700 * MIB)).sample()
        assert (u.source, u.current, u.peak) == ("cuda", 100 * MIB, 700 * MIB)
        fields = u.fields()
        assert fields["memory_source"] == "cuda" and "host_memory_peak_bytes" in fields


def test_real_pynvml_without_a_gpu_falls_back() -> None:
    """This machine has no GPU: the real pynvml answers nothing and the meter measures the
    host (torch here has not initialised CUDA either)."""
    assert nvml_process_bytes(os.getpid()) is None
    assert Meter().sample().source in ("rss", "cgroup")


def test_usage_fields_from_the_wire() -> None:
    u = Usage(10, 20, "cgroup", 30, extra={"cuda_allocated_bytes": 5})
    assert usage_fields(u.fields()) == {
        "memory_current_bytes": 10, "memory_peak_bytes": 20, "memory_bytes": 20,
        "memory_source": "cgroup", "memory_limit_bytes": 30, "cuda_allocated_bytes": 5}
    # wrong types, negative numbers and unknown sources are dropped; no source, no figure
    assert usage_fields({"memory_peak_bytes": 5, "memory_source": "guess"}) == {}
    assert usage_fields({"memory_peak_bytes": -1, "memory_current_bytes": True,
                         "memory_source": "rss", "host_memory_peak_bytes": "9"}) == {}
    assert usage_fields({"inc": "x"}) == {}


# ------------------------------------------------------------------ host-side sampling
class FakeContainer:
    """A FAKE Docker SDK container (no daemon here; tests/test_containers.py runs the real
    one): ``stats(stream=False, one_shot=True)`` answers cgroup v1-shaped memory stats."""

    def __init__(self, name: str, usage: int, max_usage: int, limit: int) -> None:
        self.name, self.status = f"hsl-x_{name}_1", "running"
        self.usage, self.max_usage, self.limit = usage, max_usage, limit
        self.attrs: dict = {"HostConfig": {"Memory": limit}, "State": {}}

    def stats(self, stream: bool, one_shot: bool = False) -> dict:
        assert not stream
        if self.status != "running":
            return {"memory_stats": {}}  # what Docker answers for an exited container
        return {"memory_stats": {"usage": self.usage, "max_usage": self.max_usage,
                                 "limit": self.limit or 25 * 2**30,
                                 "stats": {"total_inactive_file": 10 * MIB}}}

    def reload(self) -> None:
        pass


def test_host_samples_containers_and_an_oom_killed_client_keeps_its_last_reading(
        tmp_path: Path) -> None:
    from runner.config import TrainConfig
    from runner.rundir import read_jsonl
    from testbed.backends.compose_run import ComposeRun
    from testbed.profiles import emulation_map, load_profile

    profile = load_profile("smoke")
    run = ComposeRun(profile, emulation_map(profile), TrainConfig(model="tiny-llama"),
                     tmp_path / "run")
    run.run_dir.mkdir()
    conts = {"server": FakeContainer("server", 300 * MIB, 310 * MIB, 0),
             "client0": FakeContainer("client0", 200 * MIB, 250 * MIB, 400 * MIB)}
    run.containers = lambda: conts  # type: ignore[method-assign]
    taken = run.sample_stats(every=5.0)
    assert taken["client0"] == {
        "time": taken["client0"]["time"], "service": "client0", "container": "hsl-x_client0_1",
        "usage_bytes": 200 * MIB, "max_usage_bytes": 250 * MIB, "peak_bytes": 250 * MIB,
        "limit_bytes": 400 * MIB, "working_set_bytes": 190 * MIB}
    assert "limit_bytes" not in taken["server"]  # unlimited: not the host's memory
    conts["client0"].usage = 390 * MIB
    conts["client0"].max_usage = 395 * MIB
    run.sample_stats(every=5.0)  # kept as the last reading, not written (5 s throttle)
    assert [r["service"] for r in read_jsonl(run.run_dir / "resources.jsonl")] == [
        "server", "client0"]
    # the kernel kills client0: no stats any more, the event keeps the last reading
    conts["client0"].status = "exited"
    conts["client0"].attrs["State"] = {"OOMKilled": True, "ExitCode": 137}
    assert set(run.sample_stats()) == {"server"}  # nothing to read from an exited one
    assert run.check_oom() == ["client0"]
    (event,) = [e for e in read_jsonl(run.run_dir / "events.jsonl")
                if e["event"] == "budget_exceeded"]
    assert (event["client"], event["memory_bytes"], event["memory_peak_bytes"]) == (
        "client0", 390 * MIB, 395 * MIB)
    last = read_jsonl(run.run_dir / "resources.jsonl")[-1]
    assert last["oom_killed"] and last["service"] == "client0"
    assert last["peak_bytes"] == 395 * MIB

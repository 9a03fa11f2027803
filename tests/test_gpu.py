"""A budget on a GPU (runner/emulation/gpu.py): which budget a CUDA process has, its
per-process CUDA memory cap, and a CUDA out-of-memory error recorded as ``budget_exceeded``.

There is NO GPU on the machines these tests run on. What cannot exist here is FAKED, and
only that: NVML and ``torch.cuda`` (tests/fake_gpu.py) where a test needs a GPU's answers,
and in the one distributed run, the CUDA out-of-memory error itself (raised in one client
process where a real one would come from the allocator under its cap). The devices file,
the profile's emulation mapping, the run directory, the broker, the server and the other
clients are the real ones.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from fake_gpu import GIB, FakeCuda, FakeNVML, Gpu, a100_mig_host

from runner.config import TrainConfig
from runner.emulation import gpu
from runner.emulation.budget import Budget, canonical_uuid
from runner.errors import ConfigError
from runner.methods.memory import DEFAULT_RESERVE
from runner.rundir import injected, read_jsonl
from testbed.profiles import emulation_map, load_profile, write_devices_file

CUDA0 = torch.device("cuda", 0)
H100 = [Gpu("GPU-12345678-aaaa-bbbb-cccc-1234567890ab", "NVIDIA H100 80GB HBM3", 80 * GIB)]


class Untouchable:
    """Stands in for ``pynvml`` where NVML must not be asked at all."""

    def __getattr__(self, name: str) -> None:
        raise AssertionError(f"NVML was asked ({name})")


@pytest.fixture(scope="module")
def llama2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """hetero-llama2's emulation mapping on the stand-in, and its devices file (what the
    local backend gives the clients)."""
    mapping = emulation_map(load_profile("hetero-llama2"), emulate=True)
    path = write_devices_file(mapping, tmp_path_factory.mktemp("dev") / "devices.json")
    return mapping, path


# ------------------------------------------------------------------------------- budgets
def test_gpu_present_stand_in_emulated_keeps_the_emulated_budgets(
        llama2: tuple[Any, Path]) -> None:
    """FAKE GPU (an 80 GB H100 through FakeNVML / FakeCuda). A client training the stand-in
    on it has the emulation mapping's budget (its devices-file row), never the card's 80 GB
    (issue 27: the host GPU's total overrode the few hundred MB and ARMSC planned GBs)."""
    mapping, devices = llama2
    cfg = TrainConfig(model="smollm2-135m", devices=str(devices))
    cuda = FakeCuda(80 * GIB, canonical_uuid(H100[0].uuid))
    for i, row in enumerate(mapping.clients):
        b = gpu.process_budget(cfg, i, device=CUDA0, env={}, nvml=FakeNVML(H100), cuda=cuda)
        assert (b.bytes, b.source) == (row.memory_bytes, "profile")
        assert "H100" in b.detail  # bounded by the device CUDA trains on
        assert b.bytes < 2 * 10**9
    b = gpu.process_budget(cfg, None, device=CUDA0, env={}, nvml=FakeNVML(H100), cuda=cuda)
    assert b.bytes == mapping.server.memory_bytes  # the server's row
    # Compose: TESTBED_BUDGET_BYTES and TESTBED_EMULATED=1, NVML is not even asked
    env = {"TESTBED_BUDGET_BYTES": str(mapping.clients[2].memory_bytes), "TESTBED_EMULATED": "1"}
    b = gpu.process_budget(TrainConfig(), 2, device=CUDA0, env=env, nvml=Untouchable(),
                           cuda=cuda)
    assert (b.bytes, b.source) == (mapping.clients[2].memory_bytes, "profile")


def test_the_reference_on_mig_instances_plans_against_them(llama2: tuple[Any, Path]) -> None:
    """FAKE MIG (an A100-80GB split 1g.10gb / 2g.20gb / 3g.40gb, seen from inside a client
    container). Without emulation a client's budget is the profile's, completed by the
    cap inside a larger instance; bounded by the instance where the profile asks more."""
    host = a100_mig_host()
    one_g, two_g = host[1].mig[0], host[1].mig[1]
    env = {"NVIDIA_VISIBLE_DEVICES": one_g.uuid, "TESTBED_BUDGET_BYTES": str(5 * 10**9)}
    cuda = FakeCuda(one_g.total, canonical_uuid(one_g.uuid))
    b = gpu.process_budget(TrainConfig(), 0, device=CUDA0, env=env,
                           nvml=FakeNVML.container(host, one_g.uuid), cuda=cuda)
    assert (b.bytes, b.source) == (5 * 10**9, "profile") and "1g.10gb" in b.detail
    env = {"NVIDIA_VISIBLE_DEVICES": two_g.uuid, "TESTBED_BUDGET_BYTES": str(25 * 10**9)}
    b = gpu.process_budget(TrainConfig(), 0, device=CUDA0, env=env,
                           nvml=FakeNVML.container(host, two_g.uuid),
                           cuda=FakeCuda(two_g.total, canonical_uuid(two_g.uuid)))
    assert (b.bytes, b.source) == (two_g.total, "nvml")


def test_a_cpu_process_keeps_the_cpu_rules_on_a_gpu_host(llama2: tuple[Any, Path],
                                                          tmp_path: Path) -> None:
    """On the CPU the devices file is not read and NVML not asked: a CPU run reports what it
    always did (no budget on the local backend, TESTBED_BUDGET_BYTES in a container)."""
    _, devices = llama2
    cfg = TrainConfig(devices=str(devices))
    cpu = torch.device("cpu")
    with pytest.raises(ConfigError, match="no memory budget"):
        gpu.process_budget(cfg, 0, device=cpu, env={}, nvml=Untouchable(),
                           cgroup_root=tmp_path, proc_cgroup=tmp_path / "none")
    b = gpu.process_budget(cfg, 0, device=cpu, env={"TESTBED_BUDGET_BYTES": "123456"},
                           nvml=Untouchable(), cgroup_root=tmp_path,
                           proc_cgroup=tmp_path / "none")
    assert (b.bytes, b.source) == (123456, "profile")
    assert gpu.cap_process(cfg, 0, device=cpu, nvml=Untouchable()) is None


# ---------------------------------------------------------------------------------- caps
def test_cap_is_the_budget_less_the_reserve_as_a_fraction_of_the_device(
        llama2: tuple[Any, Path]) -> None:
    """FAKE torch.cuda: five clients sharing one 80 GB card, each capped to its own
    budget less the runtime reserve (= its stand-in training bytes)."""
    mapping, devices = llama2
    cfg = TrainConfig(devices=str(devices))
    caps = []
    for i, row in enumerate(mapping.clients):
        cuda = FakeCuda(80 * GIB, canonical_uuid(H100[0].uuid))
        cap = gpu.cap_process(cfg, i, device=CUDA0, env={}, nvml=FakeNVML(H100), cuda=cuda)
        assert cap is not None and cuda.fractions == [(cap.fraction, 0)]
        assert cap.budget_bytes == row.memory_bytes
        assert abs(cap.cap_bytes - (row.memory_bytes - DEFAULT_RESERVE)) <= 1
        assert abs(cap.cap_bytes - row.standin_bytes) <= 1
        assert cap.total_bytes == 80 * GIB and "cuda:0" in cap.line()
        caps.append(cap.cap_bytes)
    assert caps == sorted(caps) and len(set(caps)) == 5  # heterogeneity kept
    # a budget at least the device's size caps nothing; one below the reserve is refused
    cuda = FakeCuda(10 * GIB)
    cap = gpu.set_memory_cap(Budget(40 * GIB, "nvml"), CUDA0, cuda=cuda)
    assert cap.fraction == 1.0 and cap.cap_bytes == 10 * GIB
    with pytest.raises(ConfigError, match="too small for a GPU"):
        gpu.set_memory_cap(Budget(DEFAULT_RESERVE, "profile"), CUDA0, cuda=cuda)


def test_no_budget_on_a_gpu_runs_uncapped_with_a_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    """FAKE NVML that cannot find the device and no planned budget: no cap, said so."""
    cuda = FakeCuda(80 * GIB, "not-a-known-uuid")
    with caplog.at_level("WARNING"):
        assert gpu.cap_process(TrainConfig(), 0, device=CUDA0, env={},
                               nvml=FakeNVML(H100), cuda=cuda) is None
    text = caplog.text
    assert "no per-process CUDA memory cap" in text and "not-a-known-uuid" in text
    assert cuda.fractions == []


# ------------------------------------------------------------------------ out of memory
def test_cuda_oom_is_recognised() -> None:
    assert gpu.is_cuda_oom(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to "
                                                        "allocate 20.00 MiB"))
    assert gpu.is_cuda_oom(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when "
                                        "calling `cublasCreate(handle)`"))
    assert not gpu.is_cuda_oom(RuntimeError("shape mismatch"))
    assert not gpu.is_cuda_oom(MemoryError())  # host memory: the cgroup's business


def test_a_client_out_of_memory_records_budget_exceeded(tmp_path: Path) -> None:
    """FAKE CUDA out-of-memory error and FAKE torch.cuda figures; the real run directory."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "events.jsonl").write_text('{"event": "run_started"}\n')

    class Transport:
        states: list[tuple[str, dict[str, Any]]] = []

        def set_state(self, state: str, **meta: Any) -> None:
            self.states.append((state, meta))

    class Client:  # what client_out_of_memory reads of runner.client.Client
        cfg = TrainConfig(device="cpu") if "device" in TrainConfig.__dataclass_fields__ \
            else TrainConfig()
        rt = type("RT", (), {"run_dir": run_dir})()
        name = "client3"
        t = Transport()

        def _budget(self) -> Budget:
            return Budget(1_613_337_261, "profile", "devices file")

    client = Client()
    assert not gpu.client_out_of_memory(client, RuntimeError("shape mismatch"))
    assert gpu.client_out_of_memory(client, torch.cuda.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 64.00 MiB\nmore lines"))
    (event,) = [e for e in read_jsonl(run_dir / "events.jsonl")
                if e["event"] == "budget_exceeded"]
    assert event["client"] == "client3" and event["cause"] == "cuda_oom"
    assert event["budget_bytes"] == 1_613_337_261 and event["source"] == "client"
    assert event["error"] == "CUDA out of memory. Tried to allocate 64.00 MiB"
    assert injected(run_dir, "client3", "ended").read_text() == "cuda-oom\n"
    assert Transport.states == [("offline", {"reason": "budget_exceeded"})]
    # the event's figures on a (fake) GPU
    fields = gpu.oom_event("client1", torch.cuda.OutOfMemoryError("CUDA out of memory"),
                           budget=None, device=CUDA0,
                           cuda=FakeCuda(10 * GIB, allocated=GIB, peak=2 * GIB))
    assert (fields["device"], fields["cap_bytes"], fields["memory_peak_bytes"]) == (
        "cuda:0", 10 * GIB, 2 * GIB)
    # no run directory here (a device that joined over the network): said, not raised
    assert not gpu.append_event(tmp_path / "elsewhere", "budget_exceeded", client="x")


SITECUSTOMIZE = textwrap.dedent('''
    # FAKE CUDA out-of-memory error (tests/test_gpu.py): the one thing a CPU cannot produce.
    import os
    if os.environ.get("TESTBED_CLIENT_ID") == os.environ.get("FAKE_OOM_CLIENT"):
        import torch
        from runner.model import split

        real, calls = split.client_forward, [0]

        def client_forward(*args, **kwargs):
            calls[0] += 1
            if calls[0] > int(os.environ["FAKE_OOM_AFTER"]):
                raise torch.cuda.OutOfMemoryError(
                    "CUDA out of memory. Tried to allocate 2.00 GiB (fake)")
            return real(*args, **kwargs)

        split.client_forward = client_forward
''')


@pytest.mark.timeout(300)
def test_a_cuda_oom_in_a_client_process_and_the_run_goes_on(tmp_path: Path) -> None:
    """A real distributed run (Mosquitto, server and three client processes, local backend)
    in which client1 hits a (FAKE, see SITECUSTOMIZE) CUDA out-of-memory error at its third
    step: it records ``budget_exceeded``, leaves with exit status 3, the server marks it
    offline at once and finishes the run with the other two, as after a kernel OOM kill."""
    from runner.distributed.broker import find_mosquitto
    from runner.distributed.runtime import RuntimeOptions
    from testbed.backends.local import LocalRun

    if find_mosquitto() is None:
        pytest.skip("mosquitto not installed (apt-get install -y mosquitto)")
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    cfg = TrainConfig(model="tiny-llama", data="synthetic", clients=3, split=1, steps=6,
                      agg_interval=2, eval_every=3, eval_max_examples=8, max_len=32,
                      batch_size=2, lora_dropout=0.0, seed=1)
    opts = RuntimeOptions(step_timeout=20.0, heartbeat=0.25, offline_after=30.0,
                          join_timeout=90.0, repair_interval=0.5, server_timeout=120.0)
    run = LocalRun(cfg, tmp_path / "run", options=opts,
                   env_extra={"PYTHONPATH": str(hook), "FAKE_OOM_CLIENT": "client1",
                              "FAKE_OOM_AFTER": "2"})
    with run.start():
        assert run.wait(240) == 0, run.log_tail("server")
        assert run.procs["client1"].wait(30) == gpu.BUDGET_EXCEEDED_EXIT, \
            run.log_tail("client1")
    events = read_jsonl(tmp_path / "run" / "events.jsonl")
    (over,) = [e for e in events if e["event"] == "budget_exceeded"]
    assert over["client"] == "client1" and over["cause"] == "cuda_oom"
    assert "Tried to allocate 2.00 GiB" in over["error"]
    offline = [e for e in events if e["event"] == "client_offline"]
    assert [(e["client"], e["reason"]) for e in offline] == [("client1", "budget_exceeded")]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary  # the run finished without it
    steps = {r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")
             if r.get("kind") == "train" and r.get("client") == "client0"}
    assert steps == set(range(6))
    late = {r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")
            if r.get("kind") == "train" and r.get("client") == "client1"}
    assert max(late) < 3


def test_the_servers_own_budget_follows_where_it_trains(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """runner/distributed/usage.py reads the server's budget with the same rules, from its
    run's config (``train.device``): on the CPU, TESTBED_BUDGET_BYTES as before; nothing
    known, no budget (and it does not look again)."""
    from runner.distributed.usage import ResourceLog
    from runner.rundir import RunDir

    cfg = TrainConfig(model="tiny-llama")
    train = {**cfg.to_dict(), "device": "cpu"}
    run = RunDir.create(tmp_path / "run", {"train": train})
    monkeypatch.setenv("TESTBED_BUDGET_BYTES", "6502807932")
    log = ResourceLog(lambda *a, **k: None)
    log.run = run
    log.server(0, 0.5)
    (rec,) = [r for r in read_jsonl(run.path / "metrics.jsonl") if r["kind"] == "resources"]
    assert rec["client"] == "server" and rec["budget_bytes"] == 6502807932
    monkeypatch.delenv("TESTBED_BUDGET_BYTES")
    log = ResourceLog(lambda *a, **k: None)
    log.run = RunDir.create(tmp_path / "other", {"train": train})
    assert log._own_budget() == (_cgroup_or_none() or 0)


def _cgroup_or_none() -> int | None:
    """This machine's own cgroup limit, if it runs in a limited container (CI may)."""
    from runner.emulation.budget import cgroup_budget

    found = cgroup_budget()
    return found.bytes if found is not None else None

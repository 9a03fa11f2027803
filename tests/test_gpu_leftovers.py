"""The GPU path's leftovers of issue 27 (docs/gpu.md): the memory model calibrated on the
CUDA device a planner trains on, the server's own CUDA cap, the meter of ``cuda:N``, a
profile's ``gpu:`` selectors on the local backend, fp16 in the Kubernetes export, and the
CUDA RNG state in checkpoints.

There is NO GPU on the machines these tests run on. What only a GPU has is FAKED, and each
test says so: ``torch.cuda`` (tests/fake_gpu.py ``FakeCuda``: its allocator figures, RNG
states and device properties) and NVML (``FakeNVML``: this process listed with the memory it
uses on the device). Why faking is enough here: the code under test only reads figures from
``torch.cuda``/NVML and decides with them; the kernels behind them are ``make gpu-check``'s
(bench/gpu_check.py). On the CPU the code runs for real, and must stay what it was.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from fake_gpu import GIB, FakeCuda, FakeNVML, Gpu

from runner.config import TrainConfig
from runner.distributed import checkpoint
from runner.emulation import gpu
from runner.emulation.budget import canonical_uuid
from runner.emulation.resources import Meter, cuda_index
from runner.errors import UserError
from runner.methods import armsc
from runner.methods.memory import (
    DEFAULT_RESERVE,
    BlockProbe,
    ModelCosts,
    block_probe,
    client_memory,
    planning_costs,
)
from runner.model import lora
from runner.model.models import load_config, model_info

CPU = torch.device("cpu")
CUDA0 = torch.device("cuda", 0)
MIB = 2**20
H100_UUID = "GPU-12345678-aaaa-bbbb-cccc-1234567890ab"


def _h100(used: int | None) -> FakeNVML:
    """FAKE NVML: one H100 that lists this process using ``used`` bytes (None: not listed,
    as in a container without the host's PID namespace)."""
    procs = [] if used is None else [(os.getpid(), used)]
    return FakeNVML([Gpu(H100_UUID, "NVIDIA H100 80GB HBM3", 80 * GIB, processes=procs)])


class AllocatingCuda(FakeCuda):
    """FAKE ``torch.cuda`` whose allocator grows by what a probe "allocates" (the fake
    probe below adds to ``allocated``), as the real allocator does while a block's forward
    keeps its saved tensors."""


def _fake_probe(cuda: AllocatingCuda, held: int, tokens: int, lora_per_token: float,
                calls: list[str]) -> BlockProbe:
    def run() -> str:
        calls.append("forward")
        torch.randn(4)  # the probe's random draws must not move the run's RNG
        cuda.allocated += held
        return "out"

    def backward(out: Any) -> None:
        assert out == "out"
        calls.append("backward")

    return BlockProbe(run=run, backward=backward, tokens=tokens,
                      lora_bytes_per_token=lora_per_token)


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Path]:
    info = model_info("tiny-llama")
    return load_config(info.path), info.path


# ------------------------------------------------------------- 1. memory model on CUDA
def test_on_the_cpu_planning_costs_are_the_analytic_ones(tiny: tuple[Any, Path]) -> None:
    """Real CPU: nothing is measured (the probe would raise), the costs and every estimate
    made from them are what they were before calibration existed (bit-identical plans)."""
    config, path = tiny

    def probe() -> BlockProbe:
        raise AssertionError("the CPU must not be probed")

    costs = planning_costs(config, CPU, path=path, precision="bf16", batch=4, seq=64,
                           probe=probe, cuda=object(), nvml=object())
    assert costs == ModelCosts.from_config(config)
    assert costs.reserve == DEFAULT_RESERVE and not costs.calibrated
    ranks = lora.uniform_ranks(config, 8, ("q", "v"))
    assert (client_memory(costs, 2, ranks, 4, 64).parts
            == client_memory(costs, 2, ranks, 4, 64, reserve=DEFAULT_RESERVE).parts)


def test_on_cuda_the_planner_uses_the_allocator_and_the_context(tiny: tuple[Any, Path]) -> None:
    """FAKE CUDA (allocator figures) and FAKE NVML (this process's GPU memory): the
    per-block activation bytes are what the allocator held after the probe's forward, less
    its LoRA branches; the reserve is NVML's per-process figure less the allocator's
    reserved memory (the CUDA context); the probe's backward ran and the RNG is untouched.
    ARMSC then plans with these numbers, not the analytic ones."""
    config, _ = tiny
    analytic = ModelCosts.from_config(config)
    tokens, held, lora_pt = 4 * 64, 4 * 64 * 3000, 200.0
    cuda = AllocatingCuda(80 * GIB, canonical_uuid(H100_UUID), allocated=10 * MIB,
                          reserved=64 * MIB)
    calls: list[str] = []
    rng = torch.get_rng_state()
    costs = planning_costs(config, CUDA0, precision="bf16", batch=4, seq=64,
                           probe=lambda: _fake_probe(cuda, held, tokens, lora_pt, calls),
                           cuda=cuda, nvml=_h100(64 * MIB + 900 * MIB), env={})
    assert calls == ["forward", "backward"] and cuda.emptied == 1
    assert torch.equal(torch.get_rng_state(), rng)
    assert costs.calibrated
    assert costs.act_bytes_per_token_block == pytest.approx(3000 - lora_pt)
    assert costs.act_bytes_per_token_block != analytic.act_bytes_per_token_block
    assert costs.reserve == 900 * MIB  # the context, not DEFAULT_RESERVE, not RSS
    assert costs.extra["analytic_act_bytes_per_token_block"] == \
        analytic.act_bytes_per_token_block
    ranks = lora.uniform_ranks(config, 2, ("q", "v"))
    est = client_memory(costs, 2, ranks, 4, 64)
    assert est.parts["runtime_reserve"] == 900 * MIB
    assert est.parts["activations"] == int(tokens * 2 * (3000 - lora_pt))
    # ARMSC: a budget that holds split 3 with the analytic CPU numbers holds less on the GPU
    base = {n: 2 for n in ranks if n.endswith(("q_proj", "v_proj"))}
    budget = client_memory(analytic, 3, base, 4, 64).total
    dev = [armsc.DeviceSpec("c0", budget, flops=1e12, bandwidth=1e6, latency=0.01)]
    server = armsc.DeviceSpec("server", 80 * GIB, flops=1e14, bandwidth=1e9, latency=0.001)
    _, cpu_violations = armsc.choose_splits(analytic, dev, server, tokens, base, (3, 3), 4, 64)
    _, gpu_violations = armsc.choose_splits(costs, dev, server, tokens, base, (3, 3), 4, 64)
    assert cpu_violations == [] and "holds no split" in gpu_violations[0]
    plan = armsc.plan(costs, dev, server, {n: 1.0 for n in ranks}, list(ranks), batch=4,
                      seq=64, reference_targets=("q_proj", "v_proj"))
    assert plan.client_memory[0] == client_memory(costs, plan.splits[0],
                                                  plan.client_ranks[0], 4, 64).total


def test_on_cuda_the_reserve_falls_back_and_never_undercuts_the_cap(
        tiny: tuple[Any, Path]) -> None:
    """FAKE CUDA / NVML: where NVML does not list this process the reserve stays
    DEFAULT_RESERVE; a context smaller than it does not lower the reserve below what each
    client's cap (budget - DEFAULT_RESERVE, set before anything ran) leaves for tensors."""
    config, _ = tiny
    for used, want in ((None, DEFAULT_RESERVE), (64 * MIB + 100 * MIB, DEFAULT_RESERVE)):
        cuda = AllocatingCuda(80 * GIB, canonical_uuid(H100_UUID), reserved=64 * MIB)
        costs = planning_costs(config, CUDA0, probe=lambda c=cuda: _fake_probe(
            c, 1000, 10, 0.0, []), cuda=cuda, nvml=_h100(used), env={})
        assert costs.reserve == want and costs.act_bytes_per_token_block == 100.0
    assert "cuda_context_bytes" in costs.extra


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_real_block_probe_runs_one_block_at_the_training_precision(
        tiny: tuple[Any, Path], precision: str) -> None:
    """Real probe on the CPU (CUDA cannot run here; the placement test runs engines on a
    non-CPU device): block 0 alone, LoRA on the targets, forward under the training's
    autocast, backward through it."""
    config, path = tiny
    p = block_probe(path, config, CPU, precision, 2, 16, ("q", "v"), 4)
    out = p.run()
    assert out.shape == (2, 16, int(config.hidden_size)) and p.tokens == 32
    p.backward(out)
    assert p.lora_bytes_per_token > 0


def test_the_trainer_plans_with_the_device_calibrated_costs(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """runner/methods/hetero.py: the heterogeneous trainer asks :func:`planning_costs` for
    the device it trains on, at its precision and the batches memory is planned for, and
    plans with what it returns (here a FAKE calibration with a 1 GiB reserve)."""
    from runner.methods import hetero
    from runner.methods.plugins import build_trainer

    seen: list[tuple[Any, ...]] = []

    def fake(config: Any, device: torch.device, **kw: Any) -> ModelCosts:
        seen.append((device, kw["precision"], kw["seq"], kw["batch"]))
        costs = ModelCosts.from_config(config)
        costs.reserve = GIB
        return costs

    monkeypatch.setattr(hetero, "planning_costs", fake)
    cfg = TrainConfig(model="tiny-llama", data="synthetic", method="hsplitlora", clients=2,
                      steps=2, agg_interval=2, eval_every=2, eval_max_examples=8, max_len=64,
                      batch_size=2, seed=3, lora_dropout=0.0)
    tr = build_trainer(cfg)
    assert seen == [(tr.device, cfg.precision, tr.mem_seq, cfg.batch_size)]
    assert tr.costs.reserve == GIB
    k = tr.clients[0].seg.end
    assert client_memory(tr.costs, k, tr.clients[0].ranks, 2, tr.mem_seq).parts[
        "runtime_reserve"] == GIB


# --------------------------------------------------------------------- 2. server's cap
def test_the_server_caps_itself_to_its_profile_budget(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    """runner/server.py ``main`` caps the server (index None) before it builds anything;
    with FAKE CUDA / NVML that cap is the devices file's server row less the reserve."""
    from runner import server as srv
    from testbed.profiles import emulation_map, load_profile, write_devices_file

    calls: list[tuple[Any, Any]] = []
    rt = SimpleNamespace(train=TrainConfig())
    monkeypatch.setattr(srv, "load_config", lambda **kw: rt)
    monkeypatch.setattr(gpu, "cap_process", lambda cfg, index, **kw: calls.append((cfg, index)))

    def stop(_rt: Any) -> None:
        assert calls, "the server built its model before capping itself"
        raise UserError("stop here")

    monkeypatch.setattr(srv, "make_server", stop)
    assert srv.main([]) == 2
    assert calls == [(rt.train, None)]
    monkeypatch.undo()
    mapping = emulation_map(load_profile("hetero-llama2"), emulate=True)
    devices = write_devices_file(mapping, tmp_path / "devices.json")
    cuda = FakeCuda(80 * GIB, canonical_uuid(H100_UUID))
    cap = gpu.cap_process(TrainConfig(devices=str(devices)), None, device=CUDA0, env={},
                          nvml=_h100(None), cuda=cuda)
    assert cap is not None and cap.budget_bytes == mapping.server.memory_bytes
    assert cap.cap_bytes == pytest.approx(mapping.server.memory_bytes - DEFAULT_RESERVE, abs=1)
    assert cuda.fractions == [(cap.fraction, 0)]


# ------------------------------------------------------------------ 3. meter of cuda:N
def test_the_meter_reads_the_gpu_the_process_trains_on() -> None:
    """The meter's device index follows ``cuda:N`` (FAKE torch.cuda records what is asked);
    the CPU and a bare ``cuda`` keep the current device (None), as before."""
    from runner.distributed.usage import ResourceLog

    assert cuda_index(torch.device("cuda", 2)) == 2 and cuda_index("cuda:1") == 1
    assert cuda_index(CPU) is None and cuda_index("cpu") is None
    assert cuda_index(torch.device("cuda")) is None and cuda_index(None) is None
    assert ResourceLog(lambda *a, **k: None, device=torch.device("cuda", 1)).meter.device == 1
    assert ResourceLog(lambda *a, **k: None, device=CPU).meter.device is None

    class Recording(FakeCuda):
        def __init__(self) -> None:
            super().__init__(allocated=5 * MIB, peak=7 * MIB)
            self.asked: list[int | None] = []

        def memory_allocated(self, device: int | None = None) -> int:
            self.asked.append(device)
            return super().memory_allocated(device)

        def get_device_properties(self, index: int) -> SimpleNamespace:
            return SimpleNamespace(total_memory=self.total, uuid="", name="fake")

    cuda = Recording()
    u = Meter(env={}, nvml=FakeNVML([]), cuda=cuda,
              device=cuda_index(torch.device("cuda", 1))).gpu()
    assert u is not None and cuda.asked == [1]


def test_the_client_meters_its_own_device() -> None:
    """runner/client.py builds its meter for the device it trains on (cuda:N)."""
    import inspect

    from runner.client import Client

    assert "Meter(device=cuda_index(self.device))" in inspect.getsource(Client.__init__)


# ------------------------------------------------------- 4. gpu: on the local backend
def test_the_local_backend_puts_each_process_on_its_gpu(tmp_path: Path) -> None:
    """A profile device's ``gpu:`` (an index or a MIG UUID) reaches that process's
    environment by its position (the i-th device is client<i>); a CPU run gets nothing."""
    from testbed.backends.local import LocalRun, read_state
    from testbed.commands.runtime import local_gpus
    from testbed.profiles import parse_profile

    mig = "MIG-0c0c0c0c-1111-5222-8333-444444444444"
    prof = parse_profile({
        "devices": [{"name": "phone", "memory": "5GB", "compute": "1 TFLOPS", "gpu": mig},
                    {"name": "laptop", "memory": "8GB", "compute": "2 TFLOPS"},
                    {"name": "desk", "memory": "8GB", "compute": "2 TFLOPS", "gpu": 2}],
        "server": {"memory": "80GB", "compute": "100 TFLOPS", "gpu": 1},
        "experiment": {"reference_model": "meta-llama/Llama-2-7b-hf",
                       "standin_model": "tiny-llama", "method": "hsplitlora",
                       "data": "synthetic", "steps": 2}}, "g.yaml", "g")
    gpus = local_gpus(prof)
    assert gpus == {"client0": mig, "client2": 2, "server": 1}
    cfg = TrainConfig(model="tiny-llama", clients=3, device="cuda:1")
    (tmp_path / "run").mkdir()
    run = LocalRun(cfg, tmp_path / "run", broker_url="mqtt://127.0.0.1:1",
                   passwords={}, gpus=gpus)
    env = run.env("client0")
    assert (env["CUDA_VISIBLE_DEVICES"], env["TESTBED_DEVICE"]) == (mig, "cuda:0")
    assert run.env("client2")["CUDA_VISIBLE_DEVICES"] == "2"
    assert run.env("server")["CUDA_VISIBLE_DEVICES"] == "1"
    assert run.env("client1").get("TESTBED_DEVICE") == os.environ.get("TESTBED_DEVICE")
    run.write_state()  # a restarted client (`testbed inject --for`) finds them again
    state = read_state(run.run_dir)
    assert (state["gpus"], state["device"]) == ({"client0": mig, "client2": 2, "server": 1},
                                                "cuda:1")
    cpu = LocalRun(TrainConfig(model="tiny-llama", clients=3, device="cpu"),
                   tmp_path / "cpu", broker_url="mqtt://127.0.0.1:1", passwords={}, gpus=gpus)
    for who in ("client0", "client2", "server"):
        env = cpu.env(who)
        for key in ("CUDA_VISIBLE_DEVICES", "TESTBED_DEVICE"):
            assert env.get(key) == os.environ.get(key), (who, key)


# -------------------------------------------------------------- 5. fp16 on Kubernetes
def test_the_kubernetes_export_takes_fp16() -> None:
    from testbed.backends import k8s as K
    from testbed.profiles import emulation_map, load_profile

    profile = load_profile("smoke")
    mapping = emulation_map(profile, emulate=True)
    texts = K.texts(K.build(profile, mapping, K.ExportOptions(precision="fp16")))
    assert any('"precision": "fp16"' in t for t in texts.values())
    with pytest.raises(UserError, match="fp16"):
        K.build(profile, mapping, K.ExportOptions(precision="auto"))


# ------------------------------------------------------------- 6. CUDA RNG checkpoints
def _ckpt(**kw: Any) -> checkpoint.ServerCheckpoint:
    return checkpoint.ServerCheckpoint(step=1, global_step=2, model={}, peers={}, history=[],
                                       totals={}, first=None, last=None,
                                       rng=torch.get_rng_state(), elapsed=3.0, **kw)


def test_a_cpu_checkpoint_is_unchanged_and_an_old_one_loads(tmp_path: Path) -> None:
    state = _ckpt().to_state()
    assert "cuda_rng" not in state  # the CPU's file is what it always was
    assert checkpoint.ServerCheckpoint.from_state(state).cuda_rng is None  # an old file
    assert checkpoint.cuda_rng_state(CPU, cuda=object()) is None
    assert not checkpoint.restore_cuda_rng(torch.zeros(4, dtype=torch.uint8), CPU,
                                           cuda=object())


def test_a_cuda_checkpoint_keeps_and_restores_the_device_rng(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """FAKE torch.cuda (per-device RNG states): the server's checkpoint and a client's
    snapshot keep the RNG state of the device they train on (cuda:1 here) and put it back
    on resume / roll-back; a state resumed on the CPU is left alone."""
    from runner.client import Client
    from runner.server import Server

    cuda = FakeCuda()
    cuda1 = torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state", cuda.get_rng_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", cuda.set_rng_state)
    state = cuda.get_rng_state(1)
    # the server's checkpoint, written and read back
    (tmp_path / "run").mkdir()
    fake_server = SimpleNamespace(
        run=SimpleNamespace(path=tmp_path / "run", elapsed=lambda: 1.0), global_step=4,
        hooks=SimpleNamespace(model_state=lambda: {}), peers={},
        tr=SimpleNamespace(history=[], device=cuda1, vclock=None), totals={}, first=None, last=None)
    Server.checkpoint(fake_server, 3)  # type: ignore[arg-type]
    read = checkpoint.read(tmp_path / "run")
    assert read is not None and torch.equal(read.cuda_rng, state)
    assert checkpoint.restore_cuda_rng(read.cuda_rng, torch.device("cuda", 0))
    assert cuda.rng_set == [0] and torch.equal(cuda.rng[0], state)
    assert not checkpoint.restore_cuda_rng(read.cuda_rng, CPU)
    # a client's snapshot (the distributed client's roll-back point)
    calls: list[str] = []
    client = SimpleNamespace(
        hooks=SimpleNamespace(snapshots=True), full=False, drawn=5, opt_steps=2, opt_start=0,
        holder=SimpleNamespace(seg=SimpleNamespace(model=torch.nn.Linear(2, 2)), opt=None,
                               sched=None),
        snapshots=OrderedDict(), device=cuda1,
        _reset_optimizer=lambda start: calls.append("opt"),
        _reset_stream=lambda drawn: calls.append("stream"))
    Client._snapshot(client, 0)  # type: ignore[arg-type]
    assert torch.equal(client.snapshots[0]["cuda_rng"], state)
    cuda.rng[1] = torch.zeros(16, dtype=torch.uint8)  # training moved it on
    assert Client._restore(client, client.snapshots[0], {})  # type: ignore[arg-type]
    assert torch.equal(cuda.rng[1], state) and cuda.rng_set[-1] == 1
    client.device = CPU  # on the CPU the snapshot is what it always was
    Client._snapshot(client, 1)  # type: ignore[arg-type]
    assert "cuda_rng" not in client.snapshots[1]

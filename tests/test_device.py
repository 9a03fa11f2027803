"""Device placement (issue 27 parts 1, 2 and 5; docs/gpu.md "Device placement").

Where training runs is ``--device`` (runner/device.py), and every engine part keeps its model,
its batches and every tensor it creates there: the in-process trainer, the distributed
server and clients, the shadows, the IWI probe, NAA merges and aggregation, evaluation and
generation, memory calibration. There is no GPU here, so the engines train on a device that
is not the CPU all the same: the ``meta`` device, whose tensors hold CPU data behind a
dispatch-mode guard that records every op mixing them with CPU tensors, which is what CUDA
refuses (tests/placement_guard.py explains the guard). The only fake is where the engines'
``--device`` resolves to (``runner.device.resolve`` returns ``meta``).

Checked by hand once that these tests fail without the fixes they cover, one at a time: with
the ``device=`` of ``torch.zeros`` in runner/model/split.py ``head_row_losses`` removed, the
in-process step reports ``aten.index_add`` with a CPU tensor at split.py; without it in
runner/trainer.py ``_pad``, ``aten.cat`` at trainer.py (the sequences are long enough for
the clients' batches to differ in width); without it in runner/methods/aggregation.py
``_pad``, HetLoRA's and padded FedAvg's ``aten.zeros`` made on the CPU; without it in
runner/methods/memory.py, the calibration; without the probe batches' move in
runner/methods/hsplitlora.py, ``aten.embedding`` with CPU token ids; and with the
transport's landing of received tensors switched off (runner/distributed/transport.py
``recv``), the distributed hsplitlora run reports the clients' backward, probe and merge ops
with CPU tensors.

Decisions keyed on the device (precision, the CPU reductions, emulating the reference) are
checked with a device that says "CUDA": there the fakes are what cannot exist here (CUDA
being available, a GPU's name and compute capability), and each test says so.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from runner import device as placement
from runner.config import TrainConfig
from runner.errors import ConfigError
from runner.methods.plugins import build_trainer
from runner.rundir import RunDir
from runner.trainer import Holder, Trainer, grad_scaler
from tests.placement_guard import FAKE, guarded, on_device


def _cfg(**kw: Any) -> TrainConfig:
    base = dict(model="tiny-llama", data="synthetic", clients=2, split=1, steps=4,
                agg_interval=2, eval_every=2, eval_max_examples=8, max_len=256, batch_size=2,
                lora_dropout=0.0, lr=2e-3, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def _to_meta(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engines' ``--device`` resolves to the guarded device (the tests' one fake)."""
    monkeypatch.setattr(placement, "resolve", lambda spec="auto": FAKE)


@pytest.fixture
def on_meta(monkeypatch: pytest.MonkeyPatch) -> None:
    _to_meta(monkeypatch)


def _steps(tr: Trainer, steps: int) -> list[float]:
    """fit()'s loop without the run directory: losses of every (step, client) in order."""
    losses = []
    for step in range(steps):
        losses += [r["loss"] for r in tr.train_step(step)]
        if tr.should_aggregate(step):
            tr.aggregate(step)
            tr.after_aggregate(step)
    return losses


def _all_on_device(tr: Trainer) -> None:
    for h in tr.all_holders():
        for name, p in h.seg.model.named_parameters():
            assert on_device(p), f"{h.name}: {name} left the device"
        if h.opt is not None:
            for state in h.opt.state.values():
                for key, v in state.items():
                    if isinstance(v, torch.Tensor) and v.dim() > 0:
                        assert on_device(v), f"{h.name}: optimizer {key} off the device"


# ------------------------------------------------------------------------ --device itself
def test_device_spec_is_checked_and_resolved_on_this_host() -> None:
    for spec in ("auto", "cpu", "cuda", "cuda:0", "cuda:12"):
        assert placement.check(spec) == spec
    for bad in ("gpu", "cuda:", "cuda:x", "CPU", "", "mps"):
        with pytest.raises(ConfigError, match="--device must be auto, cpu, cuda or cuda:N"):
            placement.check(bad)
    with pytest.raises(ConfigError, match="--device"):
        TrainConfig(device="gpu").validate()
    assert placement.resolve("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():  # this machine: auto is the CPU, cuda an error
        assert placement.resolve("auto") == torch.device("cpu")
        assert placement.resolve() == torch.device("cpu")
        with pytest.raises(ConfigError, match="no CUDA GPU is usable here"):
            placement.resolve("cuda")
    assert TrainConfig().device == "auto"


def test_device_spec_with_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """FAKE: CUDA is available with two GPUs (what cannot exist here); nothing runs on it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert placement.resolve("auto") == torch.device("cuda", 0)
    assert placement.resolve("cuda") == torch.device("cuda", 1)
    assert placement.resolve("cuda:1") == torch.device("cuda", 1)
    assert placement.resolve("cpu") == torch.device("cpu")  # a visible GPU does not count
    with pytest.raises(ConfigError, match="2 CUDA device"):
        placement.resolve("cuda:2")
    assert placement.is_cuda(placement.resolve("auto"))
    assert not placement.is_cuda(placement.resolve("cpu"))


# ------------------------------------------------------------------- in-process engines
def test_split_step_aggregation_and_evaluation_stay_on_the_device(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """SplitLoRA in-process: client forwards, the server's padded concatenated pass, the
    returned gradients, FedAvg and evaluation. Same losses as on the CPU (the guard runs
    the CPU's arithmetic; AdamW takes its per-tensor path on a tensor subclass, hence the
    rounding-level tolerance)."""
    cfg = _cfg()
    ref = Trainer(cfg)
    want, want_ev = _steps(ref, 4), ref.evaluate()
    _to_meta(monkeypatch)
    with guarded() as guard:
        tr = Trainer(cfg)
        losses = _steps(tr, 4)
        ev = tr.evaluate()
    guard.check()
    _all_on_device(tr)
    assert all(on_device(v) for v in (tr.global_state or {}).values())
    assert losses == pytest.approx(want, abs=1e-5)
    assert ev["val_loss"] == pytest.approx(want_ev["val_loss"], abs=1e-5)


@pytest.mark.usefixtures("on_meta")
@pytest.mark.parametrize("method", ["fedlora", "ft"])
def test_local_steps_stay_on_the_device(method: str) -> None:
    """Whole-model clients (fedlora's adapters, ft's full weights): forward, loss, step."""
    cfg = _cfg(method=method, split=None, steps=2, lr=None if method == "ft" else 2e-3)
    with guarded() as guard:
        tr = Trainer(cfg)
        _steps(tr, 2)
        tr.evaluate()
    guard.check()
    _all_on_device(tr)


@pytest.mark.usefixtures("on_meta")
def test_hsplitlora_probe_naa_replan_export_and_generation_stay_on_the_device(
        tmp_path: Path) -> None:
    """HSplitLoRA in-process, its whole round: IWI probes (client and server halves), NAA
    (concatenated factors merged into every holder's frozen weights), ARMSC re-plan and
    re-initialisation, evaluation, the export of the merged update (SVD on the device, file
    from the CPU), then ``testbed eval``'s generation with the run's model on the device
    (generate(), as on a GPU: runner/evaluation/beam.py ``unsupported``)."""
    from runner.evaluation.evaluate import DecodeConfig, evaluate_run

    cfg = _cfg(method="hsplitlora")
    with guarded() as guard:
        tr = build_trainer(cfg, RunDir.create(tmp_path / "run", {"train": cfg.to_dict()}))
        summary = tr.fit()
        result = evaluate_run(RunDir.open(tmp_path / "run"), None, max_mrs=1,
                              decode=DecodeConfig(num_beams=2, max_new_tokens=4))
    guard.check()
    _all_on_device(tr)
    assert summary["reconfigurations"] >= 2 and tr.merged_ranks
    assert (tmp_path / "run" / "adapters" / "final" / "adapter_model.safetensors").is_file()
    assert result["test_mrs"] == 1


def test_own_beam_search_would_stay_on_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """runner/evaluation/beam.py runs on the CPU only (on a GPU ``unsupported`` hands decoding
    to generate(), measured identical on the CPU alone); should it be enabled on a GPU, its
    buffers and masks are made on the model's device: same outputs, no CPU tensor. The
    guard's wrapper tensors cannot take views under ``inference_mode``, so it runs under
    ``no_grad`` here (the same arithmetic)."""
    from runner.evaluation import beam, evaluate
    from runner.model.models import load_full_model, load_tokenizer, model_info

    info = model_info("tiny-llama")
    tokenizer = load_tokenizer(info.path)
    model = load_full_model(info.path).eval()
    mrs = ["name[The Eagle], food[French]", "name[Zizzi]"]
    decode = evaluate.DecodeConfig(num_beams=3, max_new_tokens=6)
    want = evaluate.generate(model, tokenizer, mrs, decode)

    def no_grad_enter(self: Any) -> None:
        self._instead = torch.no_grad()
        self._instead.__enter__()

    def no_grad_exit(self: Any, *exc: Any) -> None:
        self._instead.__exit__(*exc)

    mode = torch.autograd.grad_mode.inference_mode
    monkeypatch.setattr(mode, "__enter__", no_grad_enter)
    monkeypatch.setattr(mode, "__exit__", no_grad_exit)
    monkeypatch.setattr(evaluate, "unsupported", lambda model, settings: None)
    monkeypatch.setattr(beam, "unsupported", lambda model, settings: None)
    with guarded() as guard:
        model.to(FAKE)
        got = evaluate.generate(model, tokenizer, mrs, decode)
    guard.check()
    assert got == want


@pytest.mark.usefixtures("on_meta")
@pytest.mark.parametrize("method", ["hetlora", "hsplitlora-no-naa"])
def test_padded_aggregations_stay_on_the_device(method: str) -> None:
    """HetLoRA's and padded FedAvg's zero-padding (runner/methods/aggregation.py ``_pad``)."""
    cfg = _cfg(method=method)
    with guarded() as guard:
        tr = build_trainer(cfg)
        _steps(tr, 2)
    guard.check()
    _all_on_device(tr)


@pytest.mark.usefixtures("on_meta")
def test_memory_calibration_runs_on_the_segment_device() -> None:
    """runner/methods/memory.py ``calibrate_block_activations``: its probe input is made
    where the segment is (a CUDA segment keeps what CUDA kernels save)."""
    from runner.methods.memory import calibrate_block_activations
    from runner.model import split
    from runner.model.models import model_info

    info = model_info("tiny-llama")
    with guarded() as guard:
        seg = split.load_client(info.path, 1, device=placement.resolve("cuda"))

        def block(x: torch.Tensor) -> torch.Tensor:
            assert on_device(x)
            return split.run_blocks(seg, x, None, 0, 1)

        per_token = calibrate_block_activations(seg.model, block, 64, 2, 8)
    guard.check()
    assert per_token > 0


# ----------------------------------------------------------------- the distributed runtime
def _fleet(cfg: TrainConfig, tmp_path: Path) -> tuple[dict[str, Any], Any, list[Any]]:
    """A distributed run in this process: the real server and client engines over a real
    Mosquitto, each client on a thread of its own (dispatch modes are per thread)."""
    from runner.client import Client
    from runner.distributed.broker import start_broker
    from runner.distributed.runtime import RuntimeConfig, RuntimeOptions
    from runner.server import make_server

    ids = [f"client{i}" for i in range(cfg.clients)]
    opts = RuntimeOptions(step_timeout=30.0, heartbeat=0.25, offline_after=10.0,
                          join_timeout=60.0, repair_interval=0.5, server_timeout=60.0)
    with start_broker("placement", ids) as broker:
        def rt(who: str) -> RuntimeConfig:
            return RuntimeConfig(train=cfg, run_dir=tmp_path / "run", run_id="placement",
                                 clients=ids, broker=broker.address,
                                 credentials=broker.creds(who), options=opts, me=who)

        with guarded() as guard:
            server = make_server(rt("server"))
            server.open_run()
            server.connect()
            clients = [Client(rt(c)) for c in ids]
            threads = [threading.Thread(target=guard.threaded(c.run), daemon=True)
                       for c in clients]
            for t in threads:
                t.start()
            try:
                summary = server.fit()
            finally:
                server.close()
            for t in threads:
                t.join(30)
    assert not guard.errors, guard.errors
    guard.check()
    return summary, server, clients


@pytest.mark.timeout(240)
@pytest.mark.parametrize("method", ["splitlora", "hsplitlora"])
def test_server_and_clients_stay_on_their_device(tmp_path: Path, method: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Server, shadows and clients of a distributed run: what they send is encoded from the
    CPU and what they receive lands on their device (runner/distributed/transport.py
    ``recv``); hsplitlora adds plans, IWI probes over the wire and NAA merges. The
    in-process run of the same configuration gives the same validation PPL."""
    from runner.distributed.broker import find_mosquitto

    if find_mosquitto() is None:
        pytest.skip("mosquitto not installed (apt-get install -y mosquitto)")
    cfg = _cfg(method=method)
    ref = Trainer(cfg).fit() if method == "splitlora" else None
    _to_meta(monkeypatch)
    summary, server, clients = _fleet(cfg, tmp_path)
    _all_on_device(server.tr)
    for c in clients:
        assert all(on_device(p) for p in c.holder.seg.model.parameters())
    if ref is not None:
        assert summary["final_val_ppl"] == pytest.approx(ref["final_val_ppl"], rel=1e-5)


def test_the_wire_is_device_independent_and_lands_on_the_receivers_device() -> None:
    """A message encoded from device tensors is byte for byte the one encoded from their
    CPU copies; a transport with a device hands out received tensors there."""
    from runner.distributed import protocol as P
    from runner.distributed.broker import BrokerAddress, Credentials
    from runner.distributed.transport import Transport

    cpu = {"acts": torch.randn(2, 3, 4), "mask": torch.ones(2, 3, dtype=torch.long),
           "labels": torch.full((2, 3), 7, dtype=torch.long)}

    def encoded(tensors: dict[str, torch.Tensor]) -> list[bytes]:
        msg = P.Message(run="r", client="c0", kind=P.Kind.ACT, step=1, seq=7,
                        tensors=tensors, meta={}, sent_at=1.0)
        return [bytes(c) for c in P.encode(msg)]

    with guarded() as guard:
        placed = {k: v.to(FAKE) for k, v in cpu.items()}
        assert encoded(placed) == encoded(cpu)
        t = Transport(BrokerAddress("127.0.0.1", 1), Credentials("c0", "x"), run="r", me="c0",
                      device=FAKE)
        t.inbox.put(P.Message(run="r", client="c0", kind=P.Kind.GRAD, step=1, seq=1,
                              tensors=dict(cpu)))
        got = t.recv(0.1)
        assert got is not None and all(on_device(v) for v in got.tensors.values())
        assert torch.equal(got.tensors["acts"].cpu(), cpu["acts"])
    guard.check()


# ---------------------------------------------------------------- fp16 with a loss scaler
def test_fp16_trains_with_a_loss_scaler_and_keeps_the_wire_unscaled() -> None:
    """--precision fp16 (GPUs without bf16): each holder scales its own backward; the
    server's gradients w.r.t. the clients' activations go out unscaled, zero after an
    overflow (its scaler skips that step). Runs on the CPU here (GradScaler('cpu'))."""
    assert grad_scaler("fp32", torch.device("cpu")) is None
    assert grad_scaler("bf16", torch.device("cpu")) is None
    cfg = _cfg(precision="fp16", steps=2)
    tr = Trainer(cfg)
    assert all(h.scaler is not None for h in tr.all_holders())
    losses = _steps(tr, 2)
    assert all(torch.isfinite(torch.tensor(losses)))
    ref = _steps(Trainer(_cfg(steps=2)), 2)
    assert losses == pytest.approx(ref, rel=0.05)  # fp16 moves the loss a little
    scaler = grad_scaler("fp16", torch.device("cpu"))
    assert scaler is not None
    h = Holder(name="server", seg=None, ranks={}, scaler=scaler)  # type: ignore[arg-type]
    scaled = scaler.scale(torch.tensor([1.0, 2.0]))
    (back,) = h.unscaled([scaled])
    assert torch.equal(back, torch.tensor([1.0, 2.0]))
    (zero,) = h.unscaled([torch.tensor([float("inf"), 1.0])])
    assert torch.equal(zero, torch.tensor([0.0, 1.0 / float(scaler.get_scale())]))


# --------------------------------------------------- decisions keyed on the device used
@pytest.fixture
def gpu_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """FAKE: a host where CUDA is available (what cannot exist here); nothing runs on it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


@pytest.mark.usefixtures("gpu_host")
def test_cpu_reduction_follows_the_device_used() -> None:
    """testbed/reduction.py: a visible GPU no longer switches off --cpu-steps and
    --cpu-max-mrs; training there does."""
    from testbed.reduction import gpu_visible

    assert gpu_visible("auto") and gpu_visible("cuda:0")
    assert not gpu_visible("cpu")


@pytest.mark.usefixtures("gpu_host")
def test_reference_is_emulated_unless_training_runs_on_cuda(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """testbed/profiles.py ``reference_loadable``: cached reference weights on a GPU host
    run un-emulated only when training runs on CUDA; with --device cpu the RAM check decides
    (a 7B reference for 3 clients does not fit here). FAKE also: the reference's weights in
    the Hugging Face cache (they are never on CI)."""
    import huggingface_hub

    from testbed import profiles as P

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache",
                        lambda repo, name: f"/cache/{repo}/{name}")
    prof = P.load_profile("smoke")
    ok, why = P.reference_loadable(prof, "cuda")
    assert ok and "CUDA" in why
    ok, why = P.reference_loadable(prof, "cpu")
    assert not ok and "no GPU" in why
    assert P.emulation_map(prof, device="cpu").emulated
    assert not P.emulation_map(prof, device="auto").emulated


def test_precision_follows_the_device_used(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    """testbed/precision.py: on a CUDA device auto is bf16 where the GPU has it and fp16
    with a loss scaler where it does not; on the CPU what it always was. FAKE: the GPU's
    name and compute capability (no GPU here)."""
    from testbed import precision as P

    plain = tmp_path / "cpuinfo"
    plain.write_text("processor : 0\nflags\t\t: fpu sse2 avx2\n")
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(P, "gpu_name", lambda d: f"{d} (Tesla V100)")
    monkeypatch.setattr(P, "cuda_bf16", lambda d: False)
    assert P.resolve("auto", plain, device=gpu)[0] == "fp16"
    assert "loss scaler" in P.resolve("auto", plain, device=gpu)[1]
    assert P.resolve("fp16", plain, device=gpu)[0] == "fp16"
    assert P.resolve("bf16", plain, device=gpu)[0] == "bf16"
    monkeypatch.setattr(P, "cuda_bf16", lambda d: True)
    assert P.resolve("auto", plain, device=gpu)[0] == "bf16"
    assert P.resolve("fp32", plain, device=gpu)[0] == "fp32"
    cpu = torch.device("cpu")
    assert P.resolve("auto", plain, device=cpu)[0] == "fp32"  # unchanged on the CPU
    assert P.resolve("fp16", plain, device=cpu)[0] == "fp16"


def test_cli_refuses_a_device_it_cannot_use(tmp_path: Path) -> None:
    """`--device` on train, up, eval, experiment run and join: a bad spec, or cuda without a
    usable GPU, is one error line with exit code 2 before anything runs."""
    from typer.testing import CliRunner

    from testbed.cli import app

    runner = CliRunner()
    commands = [["train", "--model", "tiny-llama", "--out", str(tmp_path / "t")],
                ["up", "--model", "tiny-llama", "--out", str(tmp_path / "u")],
                ["eval", str(tmp_path / "missing")],
                ["experiment", "run", str(tmp_path / "missing.yaml")],
                ["join", "--broker", "mqtt://127.0.0.1:1", "--run-id", "r", "--client",
                 "client0", "--credentials", str(tmp_path / "missing.json")]]
    for args in commands:
        result = runner.invoke(app, [*args, "--device", "gpu"])
        assert result.exit_code == 2, (args, result.output)
        assert "--device must be auto, cpu, cuda or cuda:N" in result.output, result.output
        if not torch.cuda.is_available():
            result = runner.invoke(app, [*args, "--device", "cuda"])
            assert result.exit_code == 2, (args, result.output)
            assert "no CUDA GPU is usable here" in result.output, result.output


def test_train_records_the_device_and_runs_on_the_cpu(tmp_path: Path) -> None:
    """`testbed train --device cpu`: config.json records the spec each process resolves."""
    from typer.testing import CliRunner

    from testbed.cli import app

    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "train", "--model", "tiny-llama", "--data", "synthetic", "--clients", "2",
        "--steps", "2", "--batch-size", "2", "--eval-every", "2", "--eval-max-examples", "4",
        "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["train"]["device"] == "cpu"
    assert (out / "adapters" / "final" / "adapter_model.safetensors").is_file()


def test_experiment_cells_take_a_device_that_is_not_part_of_their_signature(
        tmp_path: Path) -> None:
    """An experiment file may set ``device`` like any training setting (checked as --device
    is); ``experiment run --device`` sets it for every cell; a finished cell stays finished
    when only the device changes (the same training up to float rounding)."""
    from testbed.experiment.run import CELL, plan, signature
    from testbed.experiment.spec import ExperimentError, parse_experiment

    spec = {"methods": ["splitlora"], "seeds": [0],
            "settings": {"model": "tiny-llama", "data": "synthetic", "clients": 2, "steps": 2,
                         "batch_size": 2, "device": "cpu"}}
    exp = parse_experiment(spec, "x.yaml", "x")
    assert exp.cells()[0].config.device == "cpu"
    with pytest.raises(ExperimentError, match="--device must be auto, cpu, cuda or cuda:N"):
        parse_experiment({**spec, "settings": {**spec["settings"], "device": "gpu"}},
                         "x.yaml", "x").cells()
    first = plan(exp, tmp_path / "exp", threads=1)
    assert first[0].request["train"]["device"] == "cpu"
    first[0].dir.mkdir(parents=True)
    (first[0].dir / CELL).write_text(json.dumps(first[0].request))
    (first[0].dir / "summary.json").write_text("{}")
    again = plan(exp, tmp_path / "exp", threads=1, device="cuda:1")
    assert again[0].request["train"]["device"] == "cuda:1"
    assert signature(again[0].request) == signature(first[0].request)
    assert again[0].status == "done"


def test_each_process_may_override_the_device(tmp_path: Path) -> None:
    """TESTBED_DEVICE: one run config, each process (container, joined device) on its own
    device; a bad value is refused as --device is."""
    from runner.distributed.runtime import load_config, write_config

    path = write_config(tmp_path / "runtime.json", _cfg(device="auto"), tmp_path / "run",
                        run_id="r", broker="mqtt://127.0.0.1:1883")
    env = {"TESTBED_CONFIG": str(path), "TESTBED_PASSWORD": "x"}
    assert load_config("client0", env).train.device == "auto"
    assert load_config("client0", {**env, "TESTBED_DEVICE": "cpu"}).train.device == "cpu"
    with pytest.raises(ConfigError, match="--device must be"):
        load_config("client0", {**env, "TESTBED_DEVICE": "gpu0"})

"""Profiles (testbed/profiles.py): schema, one-line errors, the emulation rule, DeviceSpecs.

No model is loaded: footprints come from architecture numbers (the known-config table),
so the only heavy part is importing the memory model (torch) once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from runner.emulation.devices import load_devices
from runner.errors import UserError
from testbed.profiles import (
    KNOWN_ARCHS,
    arch_config,
    device_specs,
    emulation_map,
    load_profile,
    model_costs,
    parse_bandwidth,
    parse_bytes,
    parse_flops,
    parse_profile,
    parse_seconds,
    print_emulation,
    train_config,
    training_footprint,
    write_devices_file,
)

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ("hetero-llama2", "homo-llama2", "hetero-gpt2l", "smoke")


def minimal(**experiment: Any) -> dict[str, Any]:
    """A valid profile as a dict (3 clients), to be broken one field at a time."""
    return {
        "devices": [
            {"name": "a", "memory": "5GB", "compute": "1 TFLOPS"},
            {"name": "b", "memory": "10GB", "compute": "2 TFLOPS"},
            {"name": "c", "memory": "20GB", "compute": "4 TFLOPS"},
        ],
        "server": {"memory": "80GB", "compute": "100 TFLOPS"},
        "experiment": {"reference_model": "meta-llama/Llama-2-7b-hf",
                       "standin_model": "tiny-llama", **experiment},
    }


# ------------------------------------------------------------------------ quantities
@pytest.mark.parametrize(("text", "value"), [
    ("8GB", 8 * 10**9), ("512MiB", 512 * 2**20), ("1.5 GiB", int(1.5 * 2**30)),
    (123, 123), ("4e9", 4 * 10**9), ("100 kB", 100_000), ("2TB", 2 * 10**12),
])
def test_parse_bytes(text: Any, value: int) -> None:
    assert parse_bytes(text) == value


def test_parse_other_units() -> None:
    assert parse_flops("1.3 TFLOPS") == pytest.approx(1.3e12)
    assert parse_flops("500 GFLOP/s") == pytest.approx(5e11)
    assert parse_flops(2e12) == 2e12
    assert parse_bandwidth("100 Mbit/s") == pytest.approx(12.5e6)
    assert parse_bandwidth("12.5 MB/s") == pytest.approx(12.5e6)
    assert parse_bandwidth("10 Gbit/s") == pytest.approx(1.25e9)
    assert parse_seconds("20 ms") == pytest.approx(0.02)
    assert parse_seconds("500 us") == pytest.approx(5e-4)
    assert parse_seconds(1) == 1.0
    for bad in ("8 GX", "fast", True, None):
        with pytest.raises(ValueError):
            parse_bytes(bad)


# ------------------------------------------------------------------- shipped profiles
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profiles_validate(name: str) -> None:
    p = load_profile(name)
    assert p.name == name and p.path.endswith(f"profiles/{name}.yaml")
    assert p.clients == len(p.devices) >= 3
    assert p.server.compute > max(d.compute for d in p.devices)  # a datacentre server


def test_hetero_llama2_is_the_papers_setting() -> None:
    p = load_profile("hetero-llama2")
    exp = p.experiment
    assert exp.reference_model == "meta-llama/Llama-2-7b-hf" and exp.dtype == "fp16"
    assert exp.standin_model == "smollm2-135m" and exp.method == "hsplitlora"
    budgets = [d.memory for d in p.devices]
    assert p.clients == 5 and min(budgets) == 5 * 10**9 and max(budgets) == 20 * 10**9
    assert len(set(budgets)) == 5
    assert all(d.compute <= 20e12 for d in p.devices)  # edge-class (Jetson-class) compute
    homo = load_profile("homo-llama2")
    assert len({(d.memory, d.compute) for d in homo.devices}) == 1 and homo.clients == 5
    assert load_profile("hetero-gpt2l").experiment.reference_model == "gpt2-large"
    smoke = load_profile("smoke")
    assert smoke.experiment.standin_model == "tiny-llama" and smoke.clients == 3


def test_known_archs_match_the_real_configs() -> None:
    from runner.model.models import cache_dir, tiny_config

    for alias in ("tiny-llama", "tiny-gpt2"):
        ours = arch_config(KNOWN_ARCHS[alias]).to_dict()
        real = tiny_config(alias.removeprefix("tiny-")).to_dict()
        for key in ("hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads",
                    "intermediate_size", "num_key_value_heads", "n_embd", "n_layer", "n_head",
                    "n_positions"):
            if key in real:
                assert ours.get(key) == real[key], (alias, key)
    smol = cache_dir() / "models" / "smollm2-135m" / "config.json"
    if smol.is_file():  # converted once by other tests / make run; not needed here
        real = json.loads(smol.read_text())
        a = KNOWN_ARCHS["smollm2-135m"]
        assert (a.hidden, a.layers, a.intermediate, a.vocab, a.heads, a.kv_heads) == (
            real["hidden_size"], real["num_hidden_layers"], real["intermediate_size"],
            real["vocab_size"], real["num_attention_heads"], real["num_key_value_heads"])


# ----------------------------------------------------------------------- bad profiles
@pytest.mark.parametrize(("patch", "line"), [
    (lambda d: d["devices"][2].update(memory=0), "devices[2].memory: must be > 0"),
    (lambda d: d["devices"][1].update(memory="8 GX"),
     "devices[1].memory: unknown memory unit 'GX' in '8 GX'"),
    (lambda d: d["devices"][0].update(memroy="1GB"), "devices[0].memroy: unknown field"),
    (lambda d: d["devices"][0].pop("compute"), "devices[0].compute: is required"),
    (lambda d: d["devices"][0].update(latency="-5 ms"), "devices[0].latency: must be >= 0"),
    (lambda d: d["devices"][1].update(availability={"trace": [[0, 10], [5, 20]]}),
     "devices[1].availability.trace: Value error, window 1 starts before"),
    (lambda d: d["devices"][1].update(availability={"dropout": 1.5}),
     "devices[1].availability.dropout: must be a probability in [0, 1)"),
    (lambda d: d["devices"][1].update(availability={"dropout": 0.1, "trace": [[0, 1]]}),
     "devices[1].availability: give either trace or dropout, not both"),
    (lambda d: d["devices"][2].update(gpu="gpu zero"),
     "devices[2].gpu: expected a GPU index, a MIG-/GPU- UUID or none"),
    (lambda d: d["devices"][2].update(name="a"), "devices[2].name: 'a' is used twice"),
    (lambda d: d["experiment"].update(clients=4),
     "experiment.clients: is 4 but devices lists 3"),
    (lambda d: d["experiment"].update(method="magic"), "experiment.method: unknown method"),
    (lambda d: d["experiment"].update(reference_model="acme/llm-1t"),
     "experiment: reference_model 'acme/llm-1t' is not in the known-architecture table"),
    (lambda d: d["experiment"].update(rank_set=[4, 2]),
     "experiment.rank_set: must be sorted ascending"),
    (lambda d: d.pop("server"), "server: is required"),
    (lambda d: d.update(devices=[]), "devices: List should have at least 1 item"),
    (lambda d: d.update(name="other"), "name: is taken from the file name"),
])
def test_bad_profile_is_one_line_naming_the_field(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  patch: Any, line: str) -> None:
    data = minimal()
    patch(data)
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "x.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as info:
        load_profile("x", tmp_path / "profiles")
    message = str(info.value)
    assert "\n" not in message
    expected = line.replace("Value error, ", "")
    assert message.startswith(f"profiles/x.yaml: {expected}"), message


def test_not_yaml_and_unknown_profile(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("devices: [\n")
    with pytest.raises(UserError, match=r"bad.yaml: not valid YAML \(line \d+\)"):
        load_profile(str(tmp_path / "bad.yaml"))
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(UserError, match="expected a mapping"):
        load_profile(str(tmp_path / "list.yaml"))
    with pytest.raises(UserError, match="unknown profile 'nope'; available: bad, list"):
        load_profile("nope", tmp_path)


def test_trace_gpu_and_arch_are_parsed() -> None:
    data = minimal(reference_model="acme/llm-1b", reference_arch={
        "family": "llama", "hidden": 2048, "layers": 16, "intermediate": 5632,
        "vocab": 32000, "heads": 32, "kv_heads": 4, "dtype": "bf16"})
    data["devices"][0].update(availability={"trace": [[0, 60], ["120", "1e9"]]}, gpu=0)
    data["devices"][1].update(availability={"dropout": 0.25}, gpu="MIG-1234-abcd")
    p = parse_profile(data, "inline")
    assert p.experiment.dtype == "bf16" and p.experiment.arch.hidden == 2048
    assert p.devices[0].gpu == 0 and p.devices[1].gpu == "MIG-1234-abcd"
    assert p.devices[2].gpu is None and p.uses_gpus
    a0, a1, a2 = p.availabilities()
    assert a0.windows == ((0.0, 60.0), (120.0, 1e9)) and a0.online_at(119) is False
    assert a1.dropout == 0.25 and a1.windows is None
    assert a2.online_at(1e12)


# --------------------------------------------------------------------------- emulation
def test_reference_footprint_by_hand() -> None:
    # LLaMA-2-7B in fp16: embeddings 32000 x 4096; per block q,k,v,o (4096 x 4096 each),
    # gate, up (4096 x 11008), down (11008 x 4096) and two RMSNorm vectors; 2 bytes each.
    costs = model_costs("meta-llama/Llama-2-7b-hf")
    est = training_footprint(costs, "fp16", batch=8, seq=64, rank=8)
    assert est.parts["embeddings"] == 32000 * 4096 * 2
    per_block = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096
    assert est.parts["blocks"] == 32 * per_block * 2
    # adapters stay fp32: rank 8 on q and v of 32 blocks, (d_in + d_out) = 8192,
    # parameters + gradients + two AdamW moments = 4 copies of 4 bytes
    assert est.parts["adapters"] == 32 * 2 * 8 * 8192 * 4 * 4
    assert "runtime_reserve" not in est.parts
    assert 15e9 < est.total < 17e9  # about 16 GB at batch 8 x 64 tokens


def test_emulation_rule_preserves_fractions() -> None:
    from runner.methods.memory import DEFAULT_RESERVE

    p = load_profile("hetero-llama2")
    m = emulation_map(p, emulate=True)
    assert m.emulated and m.model == "smollm2-135m"
    assert m.standin_footprint < m.reference_footprint
    for d, row in zip([*p.devices, p.server], m.devices, strict=True):
        assert row.name == d.name and row.reference_bytes == d.memory
        assert row.fraction == pytest.approx(d.memory / m.reference_footprint)
        assert row.standin_bytes / m.standin_footprint == pytest.approx(row.fraction, rel=1e-6)
        assert row.memory_bytes == DEFAULT_RESERVE + row.standin_bytes
    fractions = [r.fraction for r in m.clients]
    assert fractions == sorted(fractions) and fractions[0] < 0.5 < 1.0 < fractions[-1]
    # speeds: rescaled by the per-block FLOPs / hidden-size ratios, or kept
    assert m.clients[0].flops == pytest.approx(p.devices[0].compute * m.compute_scale)
    assert emulation_map(p, emulate=True, scale_speed=False).clients[0].flops == \
        p.devices[0].compute
    # no emulation: the reference's own budgets
    same = emulation_map(p, emulate=False)
    assert not same.emulated and same.model == "meta-llama/Llama-2-7b-hf"
    assert [r.standin_bytes for r in same.clients] == [d.memory for d in p.devices]
    # auto: LLaMA-2 weights are never on CI, so the stand-in runs
    auto = emulation_map(p)
    assert auto.emulated and "no local weights" in auto.reason


def test_devices_file_round_trips_through_load_devices(tmp_path: Path) -> None:
    p = load_profile("smoke")
    m = emulation_map(p)
    clients, server = device_specs(m)
    assert [c.name for c in clients] == ["client0", "client1", "client2"]
    path = write_devices_file(m, tmp_path / "devices.json")
    loaded_clients, loaded_server = load_devices(path)
    assert loaded_clients == clients and loaded_server == server
    assert [c.memory_bytes for c in clients] == [r.memory_bytes for r in m.clients]
    cfg = train_config(p, m, path)
    assert (cfg.model, cfg.clients, cfg.steps, cfg.devices) == ("tiny-llama", 3, 6, str(path))
    assert cfg.server_chunk == 0  # smoke does not set it: one pass over all clients


def test_a_profile_sets_the_servers_chunking() -> None:
    """hetero-llama2's server budget needs the pass one client at a time (docs/emulation.md)."""
    p = load_profile("hetero-llama2")
    cfg = train_config(p, emulation_map(p, emulate=True))
    assert p.experiment.server_chunk == 1 and cfg.server_chunk == 1


def test_print_emulation_shows_the_mapping() -> None:
    from rich.console import Console

    console = Console(record=True, width=200)
    print_emulation(emulation_map(load_profile("hetero-llama2"), emulate=True), console)
    text = console.export_text()
    assert "emulating meta-llama/Llama-2-7b-hf" in text and "smollm2-135m" in text
    assert "client4" in text and "20 GB" in text and "fraction" in text


# -------------------------------------------------------------------------------- CLI
def _cli(*args: str, profiles: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    if profiles is not None:
        env["TESTBED_PROFILES"] = str(profiles)
    return subprocess.run([sys.executable, "-m", "testbed.cli", "profiles", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_cli_list_and_show() -> None:
    listed = _cli("list")
    assert listed.returncode == 0, listed.stderr
    for name in SHIPPED:
        assert name in listed.stdout
    shown = _cli("show", "hetero-llama2", "--emulation")
    assert shown.returncode == 0, shown.stderr
    assert "meta-llama/Llama-2-7b-hf" in shown.stdout and "client4" in shown.stdout
    assert "emulating meta-llama/Llama-2-7b-hf" in shown.stdout and "0.311" in shown.stdout


def test_cli_bad_profile_exits_2_with_one_line(tmp_path: Path) -> None:
    data = minimal()
    data["devices"][2]["memory"] = 0
    (tmp_path / "x.yaml").write_text(yaml.safe_dump(data))
    r = _cli("show", "x", profiles=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert lines[0].endswith("x.yaml: devices[2].memory: must be > 0")
    r = _cli("show", "missing", profiles=tmp_path)
    assert r.returncode == 2 and "unknown profile 'missing'; available: x" in r.stderr

"""Compose generation (testbed/backends/compose.py, compose.yaml): limits, GPUs, host networking.

No Docker daemon is used: the files are checked as data, and, where a Compose binary is
installed (``docker compose`` v2 or ``docker-compose`` v1), with ``config -q``, which
parses, validates and merges the files without a daemon.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from runner.errors import ConfigError
from runner.methods.memory import ALLOCATOR_ENV, DEFAULT_RESERVE
from testbed.backends.compose import (
    BASE_COMPOSE,
    TEMPLATE_KEY,
    ComposeOptions,
    compose_command,
    container_limit,
    cpu_quotas,
    generate_override,
    load_base,
    write_override,
)
from testbed.profiles import EmulationMap, Profile, emulation_map, load_profile, parse_profile

MIG_A = "MIG-5f7c2a3e-1b2d-5c8e-9a0b-123456789abc"
MIG_B = "MIG-0a1b2c3d-4e5f-5a6b-8c7d-fedcba987654"


def gpu_profile() -> Profile:
    """Four clients: GPU index 0, two MIG instances, and one without a GPU; server on GPU 1."""
    return parse_profile({
        "devices": [
            {"name": "client0", "memory": "5GB", "compute": "1 TFLOPS", "gpu": 0},
            {"name": "client1", "memory": "10GB", "compute": "2 TFLOPS", "gpu": MIG_A},
            {"name": "client2", "memory": "20GB", "compute": "4 TFLOPS", "gpu": MIG_B},
            {"name": "client3", "memory": "8GB", "compute": "0.5 TFLOPS"},
        ],
        "server": {"memory": "80GB", "compute": "100 TFLOPS", "gpu": 1},
        "experiment": {"reference_model": "meta-llama/Llama-2-7b-hf",
                       "standin_model": "tiny-llama", "method": "splitlora"},
    }, "gpu.yaml", "gpu")


@pytest.fixture(scope="module")
def gpu_setup() -> tuple[Profile, EmulationMap]:
    p = gpu_profile()
    return p, emulation_map(p, emulate=True)


def _devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    return service["deploy"]["resources"]["reservations"]["devices"]


def test_base_compose_is_readable_and_has_the_template() -> None:
    base = load_base()
    assert "version" not in base and "name" not in base  # both Compose versions accept it
    assert set(base["services"]) == {"broker", "server"}
    template = base[TEMPLATE_KEY]
    assert template["command"] == ["python", "-m", "runner.client"]
    assert "network_mode" not in template and "networks" not in template


def test_gpu_profile_carries_device_ids(gpu_setup: tuple[Profile, EmulationMap]) -> None:
    profile, mapping = gpu_setup
    services = generate_override(profile, mapping)["services"]
    expected = {"client0": "0", "client1": MIG_A, "client2": MIG_B}
    for name, device_id in expected.items():
        (dev,) = _devices(services[name])
        assert dev == {"driver": "nvidia", "device_ids": [device_id], "capabilities": ["gpu"]}
    assert "deploy" not in services["client3"]
    assert _devices(services["server"])[0]["device_ids"] == ["1"]


def test_mem_limit_is_overhead_plus_budget(gpu_setup: tuple[Profile, EmulationMap]) -> None:
    profile, mapping = gpu_setup
    services = generate_override(profile, mapping)["services"]
    for row in mapping.clients:
        svc = services[row.name]
        assert DEFAULT_RESERVE + row.standin_bytes == row.memory_bytes
        # rounded up to whole pages, as the kernel keeps a cgroup limit
        assert svc["mem_limit"] == container_limit(row.memory_bytes)
        assert svc["mem_limit"] % 4096 == 0 and 0 <= svc["mem_limit"] - row.memory_bytes < 4096
        assert svc["memswap_limit"] == svc["mem_limit"]  # no swap: over budget = OOM kill
        assert svc["environment"]["TESTBED_BUDGET_BYTES"] == str(row.memory_bytes)
    bigger = generate_override(profile, mapping, ComposeOptions(overhead=10**9))["services"]
    for row in mapping.clients:
        assert bigger[row.name]["mem_limit"] == container_limit(10**9 + row.standin_bytes)
    # without emulation the budget is the profile's own
    plain = emulation_map(profile, emulate=False)
    services = generate_override(profile, plain)["services"]
    for device in profile.devices:
        assert services[device.name]["mem_limit"] == container_limit(DEFAULT_RESERVE
                                                                     + device.memory)


def test_cpus_environment_and_labels(gpu_setup: tuple[Profile, EmulationMap]) -> None:
    profile, mapping = gpu_setup
    opts = ComposeOptions(run_id="r42", max_cpus=2.0)
    services = generate_override(profile, mapping, opts)["services"]
    # proportional to compute: 1, 2, 4, 0.5 TFLOPS with the fastest at 2 CPUs
    assert [services[f"client{i}"]["cpus"] for i in range(4)] == [0.5, 1.0, 2.0, 0.25]
    env = services["client2"]["environment"]
    assert env["TESTBED_CLIENT_ID"] == "client2" and env["TESTBED_CLIENT_INDEX"] == "2"
    assert env["TESTBED_BROKER"] == "mqtt://broker:1883" and env["TESTBED_RUN_ID"] == "r42"
    assert env["TESTBED_CONFIG"] == "/run/testbed/runtime.json"  # from the template
    for key, value in ALLOCATOR_ENV.items():
        assert env[key] == value
    assert all(isinstance(v, str) for v in env.values())
    assert services["client2"]["labels"]["org.hsplitlora.client"] == "client2"
    assert services["server"]["environment"]["TESTBED_RUN_ID"] == "r42"
    assert "network_mode" not in services["client2"] and "broker" not in services
    assert cpu_quotas([1.0, 1000.0], 1.0) == [0.05, 1.0]  # a floor keeps it schedulable
    with pytest.raises(ConfigError):
        cpu_quotas([1.0], 0.0)


def test_host_network_variant(gpu_setup: tuple[Profile, EmulationMap]) -> None:
    profile, mapping = gpu_setup
    services = generate_override(profile, mapping,
                                 ComposeOptions(host_network=True, broker_port=18830))["services"]
    assert {n for n, s in services.items() if s.get("network_mode") == "host"} == {
        "broker", "server", "client0", "client1", "client2", "client3"}
    assert services["client0"]["environment"]["TESTBED_BROKER"] == "mqtt://127.0.0.1:18830"
    assert services["server"]["environment"]["TESTBED_BROKER"] == "mqtt://127.0.0.1:18830"


def test_override_yaml_round_trips(tmp_path: Path,
                                   gpu_setup: tuple[Profile, EmulationMap]) -> None:
    profile, mapping = gpu_setup
    opts = ComposeOptions(run_id="rt", host_network=True)
    path = write_override(profile, mapping, tmp_path / "compose.override.yaml", opts)
    text = path.read_text()
    assert text.startswith("# Generated by testbed/backends/compose.py from profile gpu")
    assert yaml.safe_load(text) == generate_override(profile, mapping, opts)


def test_per_run_additions_are_generated_not_patched(
        tmp_path: Path, gpu_setup: tuple[Profile, EmulationMap]) -> None:
    """A run's mounts, user, extra environment and --mem-limit overrides are part of the
    one generated override (issue 14 part 4: computed once, written once)."""
    profile, mapping = gpu_setup
    opts = ComposeOptions(run_id="pr", mem_limits={"client1": 300 * 2**20 + 1},
                          volumes=("/host/run:/run/testbed", "/host/cache:/cache"),
                          broker_volumes=("/host/run:/run/testbed",), user="1000:1000",
                          env={"TESTBED_CACHE": "/cache"})
    services = generate_override(profile, mapping, opts)["services"]
    client1, client0 = services["client1"], services["client0"]
    assert client1["mem_limit"] == client1["memswap_limit"] == 300 * 2**20 + 4096
    assert client1["labels"]["org.hsplitlora.budget"] == str(300 * 2**20 + 4096)
    assert client0["mem_limit"] == container_limit(DEFAULT_RESERVE
                                                   + mapping.clients[0].standin_bytes)
    for name in ("server", "client0", "client1"):
        assert services[name]["volumes"] == ["/host/run:/run/testbed", "/host/cache:/cache"]
        assert services[name]["user"] == "1000:1000"
        assert services[name]["environment"]["TESTBED_CACHE"] == "/cache"
    assert services["broker"]["volumes"] == ["/host/run:/run/testbed"]
    with pytest.raises(ConfigError, match="unknown clients"):
        generate_override(profile, mapping, ComposeOptions(mem_limits={"nobody": 1}))


def test_smoke_profile_override() -> None:
    profile = load_profile("smoke")
    mapping = emulation_map(profile)
    services = generate_override(profile, mapping)["services"]
    assert [n for n in services if n.startswith("client")] == ["client0", "client1", "client2"]
    assert not any("deploy" in s for s in services.values())


def _compose_or_skip() -> list[str]:
    cmd = compose_command()
    if cmd is None:
        pytest.skip("neither `docker compose` (v2) nor `docker-compose` (v1) is installed "
                    "here; the files are still checked as data by the other tests")
    return cmd


@pytest.mark.parametrize("host_network", [False, True], ids=["bridge", "host"])
def test_compose_config_validates(tmp_path: Path, host_network: bool,
                                  gpu_setup: tuple[Profile, EmulationMap]) -> None:
    cmd = _compose_or_skip()
    profile, mapping = gpu_setup
    override = write_override(profile, mapping, tmp_path / "compose.override.yaml",
                              ComposeOptions(run_id="v", host_network=host_network))
    files = ["-f", str(BASE_COMPOSE), "-f", str(override)]
    check = subprocess.run([*cmd, "-p", "hsplitlora-test", *files, "config", "-q"],
                           capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    merged = subprocess.run([*cmd, "-p", "hsplitlora-test", *files, "config"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert merged.returncode == 0, merged.stderr
    services = yaml.safe_load(merged.stdout)["services"]
    assert {"broker", "server", "client0", "client3"} <= set(services)
    client1 = services["client1"]
    assert client1["environment"]["TESTBED_CLIENT_ID"] == "client1"
    assert _devices(client1)[0]["device_ids"] == [MIG_A]
    assert client1["environment"]["TESTBED_CONFIG"] == "/run/testbed/runtime.json"
    row = mapping.clients[1]
    assert int(str(client1["mem_limit"])) == container_limit(DEFAULT_RESERVE + row.standin_bytes)
    assert float(client1["cpus"]) == 0.5
    assert (client1.get("network_mode") == "host") == host_network


def test_fleet_bigger_than_the_host_gets_a_warning(gpu_setup: tuple[Profile, EmulationMap],
                                                   tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """``testbed up --backend compose`` warns before starting a fleet whose container limits
    add up to more than the host has available (hsplitlora fills them), and counts a
    ``--mem-limit`` as the limit it sets. The sum is the override's own limits."""
    from runner.config import TrainConfig
    from testbed.backends.compose_run import ComposeRun

    profile, mapping = gpu_setup
    run = ComposeRun(profile, mapping, TrainConfig(model="tiny-llama"), tmp_path / "run")
    # (on a GPU host the clients with a GPU train on it: CUDA's host reserve is in both)
    services = generate_override(profile, mapping, ComposeOptions(
        cuda_host_reserve=run.cuda_host_reserve()))["services"]
    written = sum(services[d.name]["mem_limit"] for d in profile.devices)
    assert sum(run.client_limits().values()) == written
    assert run.memory_warning(available=written) is None
    note = run.memory_warning(available=written - 1)
    assert note is not None and note.startswith(
        f"the 4 client containers may use up to {written / 1e9:.1f} GB")
    assert "--backend swarm" in note
    small = ComposeRun(profile, mapping, TrainConfig(model="tiny-llama"), tmp_path / "small",
                       mem_limits={d.name: 10**8 for d in profile.devices})
    assert sum(small.client_limits().values()) == 4 * container_limit(10**8)
    assert small.memory_warning(available=written - 1) is None
    # the check `testbed up` runs first prints it as one warning line on stderr
    monkeypatch.setattr("testbed.experiment.memory.available_memory", lambda: written - 1)
    run.check_can_start()
    small.check_can_start()
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "4 client containers" in err


def test_overwrite_forgets_what_the_host_told_the_last_run(
        gpu_setup: tuple[Profile, EmulationMap], tmp_path: Path) -> None:
    """A run directory reused with --overwrite starts without the last run's injected files:
    an ``inject/<cid>.budget`` would give the new client the old budget, an ``.ended`` marker
    (the watcher's OOM record) would make the new server not wait for that client."""
    from runner.config import TrainConfig
    from runner.distributed.runtime import RuntimeOptions
    from runner.rundir import injected, write_injected
    from testbed.backends.compose_run import ComposeRun

    profile, mapping = gpu_setup
    run_dir = tmp_path / "run"
    old = [write_injected(run_dir, "client1", "budget", "123\n"),
           write_injected(run_dir, "client2", "ended", "oom-killed\n")]
    assert all(p.is_file() for p in old)
    devset = Path(__file__).resolve().parents[1].parent / "shared/data/e2e/devset.csv"
    ComposeRun(profile, mapping, TrainConfig(model="tiny-llama", data=str(devset)), run_dir,
               options=RuntimeOptions(overwrite=True)).prepare()
    assert (run_dir / "runtime.json").is_file()  # prepared
    assert not any(p.exists() for p in old)
    assert not injected(run_dir, "client1", "budget").parent.exists()

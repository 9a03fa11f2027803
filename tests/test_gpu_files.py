"""The files generated for a MIG profile (issue 27 parts 3 and 5): hetero-llama2's five
clients on MIG instances of one A100/H100-80GB (two 1g.10gb, three 1g.20gb; docs/gpu.md),
the server on a second GPU, as Compose, a Swarm stack and Kubernetes manifests.

No Docker daemon, Swarm or cluster is used: the files are checked as data (and with
``docker compose config -q`` where a Compose binary is installed, which needs no daemon).
No GPU is involved either: the files only name GPUs.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from runner.config import TrainConfig
from runner.emulation.gpu import CUDA_HOST_RESERVE
from runner.methods.memory import DEFAULT_RESERVE
from testbed.backends import k8s as K
from testbed.backends.compose import (
    BASE_COMPOSE,
    ComposeOptions,
    compose_command,
    container_limit,
    generate_override,
    write_override,
)
from testbed.profiles import EmulationMap, Profile, emulation_map, parse_profile

MIG = {  # MIG UUIDs as `nvidia-smi -L` prints them (made up)
    "client0": ("MIG-0c0c0c0c-1111-5222-8333-444444444444", "1g.10gb"),
    "client1": ("MIG-1c1c1c1c-1111-5222-8333-444444444444", "1g.10gb"),
    "client2": ("MIG-2c2c2c2c-1111-5222-8333-444444444444", "1g.20gb"),
    "client3": ("MIG-3c3c3c3c-1111-5222-8333-444444444444", "1g.20gb"),
    "client4": ("MIG-4c4c4c4c-1111-5222-8333-444444444444", "1g.20gb"),
}
BUDGETS = {"client0": "5GB", "client1": "8.75GB", "client2": "12.5GB", "client3": "16.25GB",
           "client4": "20GB"}


def mig_profile() -> Profile:
    """docs/gpu.md's MIG layout of hetero-llama2."""
    return parse_profile({
        "description": "hetero-llama2 on MIG instances of one 80 GB card",
        "devices": [{"name": n, "memory": BUDGETS[n], "compute": "3 TFLOPS", "gpu": uuid,
                     "mig": prof} for n, (uuid, prof) in MIG.items()],
        "server": {"memory": "80GB", "compute": "100 TFLOPS", "gpu": 1},
        "experiment": {"reference_model": "meta-llama/Llama-2-7b-hf", "reference_dtype": "fp16",
                       "standin_model": "tiny-llama", "method": "hsplitlora",
                       "data": "synthetic", "steps": 2},
    }, "mig.yaml", "mig")


@pytest.fixture(scope="module")
def setup() -> tuple[Profile, EmulationMap]:
    p = mig_profile()
    return p, emulation_map(p, emulate=True)


def _devices(svc: dict[str, Any]) -> list[dict[str, Any]]:
    return svc["deploy"]["resources"]["reservations"]["devices"]


def test_compose_reserves_each_mig_instance_by_uuid(setup: tuple[Profile, EmulationMap]) -> None:
    profile, mapping = setup
    services = generate_override(profile, mapping)["services"]
    for name, (uuid, _) in MIG.items():
        (dev,) = _devices(services[name])
        assert dev == {"driver": "nvidia", "device_ids": [uuid], "capabilities": ["gpu"]}
        env = services[name]["environment"]
        assert env["TESTBED_EMULATED"] == "1"  # budgets from the mapping, not the instance
    assert _devices(services["server"])[0]["device_ids"] == ["1"]
    assert services["server"]["environment"]["TESTBED_EMULATED"] == "1"
    plain = generate_override(profile, emulation_map(profile, emulate=False))["services"]
    assert plain["client0"]["environment"]["TESTBED_EMULATED"] == "0"
    assert plain["client0"]["environment"]["TESTBED_BUDGET_BYTES"] == str(
        DEFAULT_RESERVE + 5 * 10**9)


def test_a_client_training_on_its_gpu_gets_cudas_host_reserve(
        setup: tuple[Profile, EmulationMap], tmp_path: Path) -> None:
    """Its budget is enforced on the GPU (the cap); its container also holds CUDA's host
    runtime. Not for a CPU client, nor with --device cpu."""
    from testbed.backends.compose_run import ComposeRun

    profile, mapping = setup
    services = generate_override(profile, mapping, ComposeOptions(
        cuda_host_reserve=CUDA_HOST_RESERVE))["services"]
    for row in mapping.clients:
        want = container_limit(DEFAULT_RESERVE + row.standin_bytes + CUDA_HOST_RESERVE)
        assert services[row.name]["mem_limit"] == services[row.name]["memswap_limit"] == want
    if "device" not in TrainConfig.__dataclass_fields__:
        pytest.skip("TrainConfig has no device field yet (issue 27 part 1)")
    on_gpu = ComposeRun(profile, mapping, TrainConfig(model="tiny-llama", device="cuda"),
                        tmp_path / "gpu")
    on_cpu = ComposeRun(profile, mapping, TrainConfig(model="tiny-llama", device="cpu"),
                        tmp_path / "cpu")
    assert on_gpu.cuda_host_reserve() == CUDA_HOST_RESERVE and on_cpu.cuda_host_reserve() == 0
    assert on_gpu.client_limits() == {n: services[n]["mem_limit"] for n in MIG}
    assert on_cpu.client_limits() == {
        r.name: container_limit(DEFAULT_RESERVE + r.standin_bytes) for r in mapping.clients}


def test_compose_config_validates_the_mig_override(setup: tuple[Profile, EmulationMap],
                                                   tmp_path: Path) -> None:
    cmd = compose_command()
    if cmd is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed here; the "
                    "override is still checked as data above")
    profile, mapping = setup
    override = write_override(profile, mapping, tmp_path / "compose.override.yaml",
                              ComposeOptions(run_id="mig"))
    merged = subprocess.run([*cmd, "-p", "hsplitlora-mig", "-f", str(BASE_COMPOSE), "-f",
                             str(override), "config"], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert merged.returncode == 0, merged.stderr
    services = yaml.safe_load(merged.stdout)["services"]
    for name, (uuid, _) in MIG.items():
        assert _devices(services[name])[0]["device_ids"] == [uuid]


def test_swarm_stack_asks_each_gpu_client_for_a_generic_gpu(
        setup: tuple[Profile, EmulationMap], tmp_path: Path) -> None:
    """Swarm has no device ids (docs/swarm.md): one NVIDIA-GPU generic resource each."""
    from testbed.backends.swarm_run import SwarmRun, stack_document
    from testbed.profiles import train_config

    profile, mapping = setup
    run = SwarmRun(profile, mapping, train_config(profile, mapping), tmp_path / "run")
    doc = stack_document(run, ComposeOptions(run_id="mig"), {"TESTBED_RUN_DIR": "/runs/x"})
    for name in [*MIG, "server"]:
        res = doc["services"][name]["deploy"]["resources"]
        assert res["reservations"] == {"generic_resources": [
            {"discrete_resource_spec": {"kind": "NVIDIA-GPU", "value": 1}}]}
    assert "reservations" not in doc["services"]["broker"]["deploy"].get("resources", {})


def test_kubernetes_requests_each_mig_profile(setup: tuple[Profile, EmulationMap]) -> None:
    profile, mapping = setup
    manifests = K.build(profile, mapping, K.ExportOptions(run_id="mig"))
    jobs = {}
    for text in K.texts(manifests).values():
        for obj in yaml.safe_load_all(text):
            if isinstance(obj, dict) and obj.get("kind") == "Job":
                labels = obj["metadata"]["labels"]
                who = labels.get(K.CLIENT_LABEL) or labels["app.kubernetes.io/component"]
                jobs[who] = obj
    for name, (_, prof) in MIG.items():
        (c,) = jobs[name]["spec"]["template"]["spec"]["containers"]
        for part in ("requests", "limits"):
            got = {k: v for k, v in c["resources"][part].items() if k.startswith("nvidia.com/")}
            assert got == {f"nvidia.com/mig-{prof}": 1}, (name, part)
        env = {e["name"]: e["value"] for e in c["env"]}
        assert env["TESTBED_EMULATED"] == "1"
    (server,) = jobs["server"]["spec"]["template"]["spec"]["containers"]
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert any("CUDA's host runtime" in n for n in manifests.notes)

"""The swarm backend (testbed/backends/swarm_run.py): the generated stack file, and a smoke run
deployed as a Docker stack on a one-node swarm with a client killed mid-run.

Real parts: the Docker daemon, ``docker stack deploy``, the offline images, Mosquitto in its
own service. A swarm is the machine's state, not the test's: when this engine is not in one,
the module makes it a one-node swarm (``docker swarm init --advertise-addr 127.0.0.1``) and
leaves it afterwards; an engine already in a swarm is used and left in it.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from fleet_cli import build_images, cli, require_docker, wait_for

from runner.methods.memory import DEFAULT_RESERVE
from runner.rundir import read_jsonl
from testbed.backends.compose import ComposeOptions, container_limit, generate_override
from testbed.backends.swarm_run import SwarmRun, interpolate, stack_document, task_exit
from testbed.profiles import emulation_map, load_profile, parse_profile, train_config

SMOKE_WITH_PLACEMENT = """
description: placement and GPUs for the stack file
devices:
  - {name: client0, memory: 5GB, compute: 1.3 TFLOPS, node: jetson-a}
  - {name: client1, memory: 12.5GB, compute: 5 TFLOPS, gpu: 0}
server: {name: server, memory: 80GB, compute: 100 TFLOPS, node: gpu-box}
experiment:
  reference_model: meta-llama/Llama-2-7b-hf
  standin_model: tiny-llama
  method: splitlora
  data: synthetic
  steps: 2
"""


def _stack(tmp_path: Path, host_network: bool = False) -> tuple[dict[str, Any], SwarmRun]:
    profile = parse_profile(yaml.safe_load(SMOKE_WITH_PLACEMENT), name="placed")
    mapping = emulation_map(profile)
    run = SwarmRun(profile, mapping, train_config(profile, mapping), tmp_path / "run",
                   host_network=host_network, mem_limits={"client1": 400 * 2**20})
    opts = ComposeOptions(run_id="placed", host_network=host_network, user="1000:1001",
                          mem_limits=run.mem_limits)
    return stack_document(run, opts, {"TESTBED_RUN_DIR": "/runs/x"}), run


def test_interpolate_resolves_compose_variables() -> None:
    env = {"A": "1", "EMPTY": ""}
    assert interpolate("${A:-x}/${B:-y}/${EMPTY:-z}/${B}", env) == "1/y/z/"
    assert interpolate({"k": ["${A}", 3]}, env) == {"k": ["1", 3]}


def test_stack_file_limits_secrets_placement_and_networks(tmp_path: Path) -> None:
    doc, run = _stack(tmp_path)
    assert doc["version"] == "3.8" and "${" not in yaml.safe_dump(doc)
    services = doc["services"]
    assert set(services) == {"broker", "server", "client0", "client1"}
    compose = generate_override(run.profile, run.mapping,
                                ComposeOptions(mem_limits=run.mem_limits))["services"]
    for name in ("client0", "client1"):
        svc = services[name]
        # the memory limit and CPU quota are Compose's, as Swarm reads them
        limits = svc["deploy"]["resources"]["limits"]
        assert int(limits["memory"]) == compose[name]["mem_limit"]
        assert float(limits["cpus"]) == compose[name]["cpus"]
        for gone in ("mem_limit", "memswap_limit", "cpus", "restart", "depends_on"):
            assert gone not in svc
        assert svc["deploy"]["restart_policy"] == {"condition": "none"}
        # the password is a swarm secret readable by the container's user only
        assert svc["secrets"] == [{"source": name, "target": name, "uid": "1000",
                                   "gid": "1001", "mode": 0o400}]
        assert svc["environment"]["TESTBED_PASSWORD_FILE"] == f"/run/secrets/{name}"
        assert svc["networks"] == ["testbed"]
        assert svc["image"] == "hsplitlora-testbed:latest"
    assert int(services["client1"]["deploy"]["resources"]["limits"]["memory"]) == \
        container_limit(400 * 2**20)
    assert int(services["client0"]["deploy"]["resources"]["limits"]["memory"]) == \
        container_limit(DEFAULT_RESERVE + run.mapping.clients[0].standin_bytes)
    # placement by node label; a GPU as a generic resource
    assert services["client0"]["deploy"]["placement"] == {
        "constraints": ["node.labels.hsplitlora.node == jetson-a"]}
    assert services["server"]["deploy"]["placement"]["constraints"] == [
        "node.labels.hsplitlora.node == gpu-box"]
    assert "placement" not in services["client1"]["deploy"]
    assert services["client1"]["deploy"]["resources"]["reservations"] == {
        "generic_resources": [{"discrete_resource_spec": {"kind": "NVIDIA-GPU", "value": 1}}]}
    assert services["broker"]["volumes"] == ["/runs/x:/run/testbed"]
    assert "secrets" not in services["broker"]
    assert set(doc["secrets"]) == {"server", "client0", "client1"}
    assert doc["networks"] == {"testbed": {"driver": "overlay", "attachable": True}}
    host_doc, _ = _stack(tmp_path / "h", host_network=True)
    assert host_doc["networks"] == {"hostnet": {"external": True, "name": "host"}}
    assert all(s["networks"] == ["hostnet"] for s in host_doc["services"].values())


def test_a_node_name_must_be_a_label_value() -> None:
    bad = yaml.safe_load(SMOKE_WITH_PLACEMENT)
    bad["devices"][0]["node"] = "no spaces allowed"
    with pytest.raises(Exception, match="node"):
        parse_profile(bad, name="bad")


def test_up_without_a_swarm_says_how_to_make_one(tmp_path: Path) -> None:
    """One line and exit code 2 when this engine is in no swarm (skipped when it is)."""
    require_docker(what="daemon")
    import docker

    if docker.from_env().info()["Swarm"]["LocalNodeState"] == "active":
        pytest.skip("this engine is in a swarm: the error cannot occur")
    proc = cli("up", "--profile", "smoke", "--backend", "swarm", "--out",
               str(tmp_path / "r"), check=False)
    assert proc.returncode == 2
    assert "not in a swarm: `docker swarm init --advertise-addr 127.0.0.1`" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def swarm() -> Any:
    """A one-node swarm for the module, left as it was found (see the module docstring)."""
    require_docker(what="daemon")
    import docker

    client = docker.from_env()
    before = client.info()["Swarm"]["LocalNodeState"]
    if before == "inactive":
        subprocess.run(["docker", "swarm", "init", "--advertise-addr", "127.0.0.1"],
                       check=True, capture_output=True, timeout=60)
    elif before != "active":
        pytest.fail(f"this engine's swarm state is {before!r}; expected inactive or active")
    yield client
    if before == "inactive":
        subprocess.run(["docker", "swarm", "leave", "--force"], check=True,
                       capture_output=True, timeout=60)
        assert client.info()["Swarm"]["LocalNodeState"] == "inactive"


@pytest.mark.slow
def test_smoke_run_as_a_stack_survives_a_killed_client(swarm: Any, tmp_path: Path) -> None:
    """Over TLS: the broker's certificate and the CA as swarm secrets, every link verified."""
    run = tmp_path / "swarm-smoke"
    steps = 10
    build_images()
    # TLS forced on: a one-node swarm on the host network is loopback, where auto is plain
    started = cli("up", "--profile", "smoke", "--backend", "swarm", "--host-network",
                  "--detach", "--tls", "on", "--steps", str(steps), "--min-step-time", "4",
                  "--out", str(run), timeout=600)
    assert "tls: on (--tls on)" in started.stdout
    try:
        state = json.loads((run / "testbed-state.json").read_text())
        assert state["backend"] == "swarm"
        stack = state["stack"]
        services = {s.name for s in swarm.services.list(
            filters={"label": f"com.docker.stack.namespace={stack}"})}
        assert services == {f"{stack}_{n}" for n in ("broker", "server", "client0",
                                                     "client1", "client2")}

        def trained(n: int):
            return lambda: sum(1 for m in read_jsonl(run / "metrics.jsonl")
                               if m.get("kind") == "train" and m.get("client") == "client1"
                               ) >= n

        wait_for(trained(2), 600, "client1's second step")
        st = json.loads(cli("status", "--json", str(run)).stdout)
        assert st["backend"] == "swarm" and st["stack"] == stack
        assert {n: c["state"] for n, c in st["containers"].items()} == {
            n: "running" for n in ("broker", "server", "client0", "client1", "client2")}
        limits = {n: c["mem_limit"] for n, c in st["containers"].items() if n.startswith("c")}
        kill = cli("inject", "dropout", "--client", "client1", "--mode", "kill", "--for", "2",
                   str(run))
        assert "client1 killed" in kill.stdout and "new task" in kill.stdout

        wait_for(lambda: task_exit(stack, "server") is not None, 900,
                 "the server task to end")
        assert task_exit(stack, "server") == 0
        assert "finished: val PPL" in cli("logs", str(run), "server").stdout
    finally:
        down = cli("down", str(run), check=False)
    assert down.returncode == 0, down.stderr
    assert not swarm.services.list(filters={"label": f"com.docker.stack.namespace={stack}"})
    assert (run / "logs" / "server.log").stat().st_size > 0

    events = read_jsonl(run / "events.jsonl")
    kinds = [(e["event"], e.get("client")) for e in events]
    i_kill = kinds.index(("inject", "client1"))
    assert ("client_offline", "client1") in kinds[i_kill:], kinds
    back = [e for e in events[i_kill:] if e["event"] == "client_online"
            and e.get("client") == "client1"]
    assert back and back[0]["reason"] == "restarted", kinds
    assert kinds[-1] == ("run_finished", None)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == steps
    runtime = json.loads((run / "config.json").read_text())["runtime"]
    assert runtime["tls"] == "on" and runtime["broker"].startswith("mqtts://127.0.0.1:")
    assert "connected to mqtts://" in (run / "logs" / "client0.log").read_text()
    # the limits Swarm set are the profile's, and each client read its own from its cgroup
    mapping = emulation_map(load_profile("smoke"))
    want = {row.name: container_limit(DEFAULT_RESERVE + row.standin_bytes)
            for row in mapping.clients}
    assert limits == want
    seen = {e["client"]: e for e in events if e["event"] == "client_budget"}
    for name, limit in want.items():
        assert seen[name]["source"].startswith("cgroup") and seen[name]["budget_bytes"] == limit
    train = [m for m in read_jsonl(run / "metrics.jsonl") if m.get("kind") == "train"]
    assert max(m["step"] for m in train) == steps - 1


def test_a_tls_stack_gives_each_service_only_its_own_files(tmp_path: Path) -> None:
    """--tls on --mtls on a swarm: the CA, the broker's certificate and key and each
    participant's own as swarm secrets, each service getting only its own; the broker's
    config reads them where Swarm mounts them; and the run directory every server and client
    service mounts (which holds everybody's files) is hidden under tmpfs where they lie."""
    from runner.config import TrainConfig
    from runner.distributed.runtime import RuntimeOptions

    profile = parse_profile(yaml.safe_load(SMOKE_WITH_PLACEMENT), name="placed")
    mapping = emulation_map(profile)
    run = SwarmRun(profile, mapping, TrainConfig(model="tiny-llama", data="synthetic"),
                   tmp_path / "run", options=RuntimeOptions(), tls=True, mtls=True)
    run.prepare()
    doc = yaml.safe_load(run.stack_file.read_text())
    services = doc["services"]
    files = {name: {s["target"]: s["source"] for s in svc.get("secrets", [])}
             for name, svc in services.items()}
    assert files["broker"] == {"ca.crt": "tls-ca.crt", "tls.crt": "tls-broker.crt",
                               "tls.key": "tls-broker.key"}
    for who in ("server", "client0", "client1"):
        assert files[who] == {who: who, "ca.crt": "tls-ca.crt", "tls.crt": f"tls-{who}.crt",
                              "tls.key": f"tls-{who}.key"}
        e = services[who]["environment"]
        assert e["TESTBED_BROKER"] == "mqtts://broker:8883"
        assert (e["TESTBED_TLS_CA"], e["TESTBED_TLS_CERT"], e["TESTBED_TLS_KEY"]) == (
            "/run/secrets/ca.crt", "/run/secrets/tls.crt", "/run/secrets/tls.key")
        hidden = {v["target"] for v in services[who]["volumes"] if isinstance(v, dict)
                  and v.get("type") == "tmpfs"}
        assert hidden == {"/run/testbed/secrets", "/run/testbed/tls", "/run/testbed/broker"}
        modes = {s["target"]: s["mode"] for s in services[who]["secrets"]}
        assert modes["tls.key"] == modes[who] == 0o400
    assert all(isinstance(v, str) for v in services["broker"]["volumes"])
    for name, spec in doc["secrets"].items():  # every secret is a file of the run's tls/
        assert Path(spec["file"]).is_file(), name
        if name.endswith(".key"):
            assert Path(spec["file"]).stat().st_mode & 0o077 == 0
    conf = (run.run_dir / "broker" / "mosquitto.conf").read_text().splitlines()
    assert "listener 8883 0.0.0.0" in conf
    assert {"cafile /run/secrets/ca.crt", "certfile /run/secrets/tls.crt",
            "keyfile /run/secrets/tls.key", "require_certificate true"} <= set(conf)

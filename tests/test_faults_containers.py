"""Issue 16 in containers: a detached compose run keeps its watcher (an OOM kill still
becomes ``budget_exceeded``, an availability trace still stops and starts a container,
``testbed status`` reports the watcher), and the broker's ACL
holds through the compose network: client0's container, with its own credentials, cannot
subscribe to client1's activations or gradients nor publish on the server's topics.

Same real parts and skip rules as tests/test_containers.py (whose image fixture this module
shares). The ACL test runs the run's own broker container and client0's container on the
project's Compose network, made ``internal`` (no route off the host: test traffic never
leaves this machine, ../shared/docs/environment.md).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from runner.rundir import read_jsonl
from testbed.backends.compose import container_limit
from tests.test_containers import ROOT, build_images, cli

pytestmark = pytest.mark.slow
NOT_AUTHORIZED = 135


@pytest.fixture(scope="module")
def images() -> None:
    """The runtime and broker images, built offline from the current runner/
    (tests/test_containers.py tests the build itself; one build at a time across test
    workers, tests/fleet_cli.py: a second build finds every layer cached)."""
    build_images()

PROBE = r'''
import json, os, sys
import torch
from runner.distributed import protocol as P
from runner.distributed.broker import Credentials, parse_broker_url
from runner.distributed.transport import PublishRefused, Transport, TransportError

run, me, other = os.environ["TESTBED_RUN_ID"], os.environ["TESTBED_CLIENT_ID"], sys.argv[1]
addr = parse_broker_url(os.environ["TESTBED_BROKER"])
mine = open(os.environ["TESTBED_PASSWORD_FILE"]).read().strip()
out = {"broker": addr.url, "subscribe": {}, "publish": {}}
try:  # its own password does not open another client's account
    Transport(addr, Credentials(other, mine), run=run, me=other).connect(20)
    out["login_as_other"] = "accepted"
except TransportError as exc:
    out["login_as_other"] = str(exc)
t = Transport(addr, Credentials(me, mine), run=run, me=me).connect(30)
for kind in ("act", "grad"):
    topic = f"hsl/{run}/c/{other}/{kind}"
    out["subscribe"][topic] = t.subscribe(topic)
out["subscribe"]["own"] = t.subscribe(f"hsl/{run}/c/{me}/grad")
forged = {P.topic(run, P.Kind.CONFIG): P.Message(run, P.SERVER, P.Kind.CONFIG, 1, 1, {},
                                                 {"op": "done", "step": 1}),
          P.topic(run, P.Kind.GLOBAL): P.Message(run, P.SERVER, P.Kind.GLOBAL, 1, 2,
                                                 {"w": torch.ones(2)}),
          f"hsl/{run}/c/{other}/grad": P.Message(run, other, P.Kind.GRAD, 1, 3,
                                                 {P.GRAD: torch.ones(1, 2, 3)})}
for topic, msg in forged.items():
    try:
        t.publish_raw(topic, P.encode(msg), timeout=10)
        out["publish"][topic] = "accepted"
    except PublishRefused as exc:
        out["publish"][topic] = "refused: " + str(exc)
t.send(P.Kind.HB, 1)  # its own uplink works
out["own_heartbeat"] = "sent"
t.close()
print("PROBE " + json.dumps(out))
'''


def test_client_cannot_read_another_client_through_the_compose_network(
        images: None, tmp_path: Path) -> None:
    import yaml

    from runner.distributed.runtime import RuntimeOptions
    from testbed.backends.compose_run import ComposeRun
    from testbed.profiles import emulation_map, load_profile, train_config

    prof = load_profile("smoke")
    mapping = emulation_map(prof)
    run = ComposeRun(prof, mapping, train_config(prof, mapping), tmp_path / "acl",
                     RuntimeOptions(), host_network=False)
    run.prepare()  # the run's real broker config, dynsec ACL and secrets; compose network
    doc = yaml.safe_load(run.override.read_text())
    doc.setdefault("networks", {})["default"] = {"internal": True}
    run.override.write_text(yaml.safe_dump(doc, sort_keys=False))
    (run.run_dir / "acl_probe.py").write_text(PROBE)
    try:
        run._compose("up", "-d", "--no-build", "broker")
        time.sleep(2.0)
        proc = subprocess.run(run.compose_argv("run", "--rm", "--no-deps", "-T", "client0",
                                               "python", "/run/testbed/acl_probe.py",
                                               "client1"),
                              env=run.compose_env(), capture_output=True, text=True,
                              timeout=300, cwd=str(ROOT))
    finally:
        subprocess.run(run.compose_argv("down", "--timeout", "5"), env=run.compose_env(),
                       capture_output=True, timeout=120, cwd=str(ROOT))
    line = [x for x in proc.stdout.splitlines() if x.startswith("PROBE ")]
    assert line, f"probe failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    got = json.loads(line[0][len("PROBE "):])
    assert got["broker"].startswith("mqtt://broker:"), got  # the service name, not loopback
    rid = run.run_id
    assert got["subscribe"][f"hsl/{rid}/c/client1/act"] == [NOT_AUTHORIZED]
    assert got["subscribe"][f"hsl/{rid}/c/client1/grad"] == [NOT_AUTHORIZED]
    assert got["subscribe"]["own"] == [1]  # its own downlink: granted at QoS 1
    assert set(got["publish"]) == {f"hsl/{rid}/s/config", f"hsl/{rid}/global",
                                   f"hsl/{rid}/c/client1/grad"}
    assert all(v.startswith("refused") and "Not authorized" in v
               for v in got["publish"].values()), got["publish"]
    assert "Not authorized" in got["login_as_other"]
    assert got["own_heartbeat"] == "sent"


def test_detached_compose_run_keeps_its_watcher(images: None, tmp_path: Path) -> None:
    """`testbed up --detach` on the compose backend: the watcher runs as a process of its
    own (status reports it) and exits once the server container has. What it watches:
    client2's container limit (120 MB) is below what importing PyTorch needs, so the kernel
    OOM-kills it, the watcher records budget_exceeded and the run goes on without it; and
    client1 carries an availability trace (online [0, 20) and [30, ...) s), so its container
    is killed at 20 s and started again at 30 s (steps paced to 8 s, so the run outlasts the
    trace however fast it starts). One fleet for both: each costs a container run of its
    own otherwise. client2, OOM-killed before it joins, is not waited for at the start."""
    import yaml

    doc = yaml.safe_load((ROOT / "profiles" / "smoke.yaml").read_text())
    doc["devices"][1]["availability"] = {"trace": [[0, 20], [30, 100000]]}
    doc["description"] = "smoke with an availability trace on client1"
    profile = tmp_path / "smoke-trace.yaml"
    profile.write_text(yaml.safe_dump(doc))
    run = tmp_path / "detached"
    proc = cli("up", "--profile", str(profile), "--backend", "compose", "--host-network",
               "--steps", "4", "--mem-limit", "client2=120MB", "--join-timeout", "90",
               "--min-step-time", "8", "--detach", "--out", str(run))
    try:
        assert "watcher pid" in proc.stdout
        st = json.loads(cli("status", "--json", str(run)).stdout)
        assert st["watcher"]["state"] in ("running", "exited"), st
        pid = st["watcher"]["pid"]
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            st = json.loads(cli("status", "--json", str(run)).stdout)
            if st["finished"] and st["watcher"]["state"] == "exited":
                break
            time.sleep(2)
        assert st["finished"], st
        assert st["watcher"] == {**st["watcher"], "pid": pid, "state": "exited"}
        text = (run / "logs" / "watcher.log").read_text()
        assert "client2: budget exceeded" in text and "server exited with code 0" in text
        assert "watcher pid" in cli("status", str(run)).stdout
    finally:
        cli("down", str(run), check=False)
    events = read_jsonl(run / "events.jsonl")
    over = [e for e in events if e["event"] == "budget_exceeded"]
    assert [e["client"] for e in over] == ["client2"], over
    # killed before it joined: the server stopped waiting for it well inside --join-timeout
    # (it sat the whole 90 s out before the watcher's inject/client2.ended existed)
    skipped = [e for e in events if e["event"] == "client_not_awaited"]
    assert [e["client"] for e in skipped] == ["client2"] and skipped[0]["wall_time"] < 90, skipped
    assert over[0]["limit_bytes"] == container_limit(120_000_000)
    assert over[0]["budget_bytes"] > over[0]["limit_bytes"]  # the profile's budget was larger
    # the host's last reading of client2 before the kill, when one was taken (the kill can
    # come within the first second), is kept in the event and in resources.jsonl
    last = [s for s in read_jsonl(run / "resources.jsonl") if s["service"] == "client2"]
    if "memory_peak_bytes" in over[0]:
        assert 0 < over[0]["memory_bytes"] <= over[0]["memory_peak_bytes"] \
            <= over[0]["limit_bytes"]
        assert last[-1]["oom_killed"] and last[-1]["peak_bytes"] == over[0]["memory_peak_bytes"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4
    train = [m for m in read_jsonl(run / "metrics.jsonl") if m.get("kind") == "train"]
    assert "client0" in {m["client"] for m in train}
    assert "client2" not in {m["client"] for m in train}  # went on without client2
    trace = [(e["client"], e["state"]) for e in events if e["event"] == "availability"]
    assert trace[:2] == [("client1", "offline"), ("client1", "online")], trace
    times = [e["elapsed_s"] for e in events if e["event"] == "availability"]
    assert 20 <= times[0] < 25 and 30 <= times[1] < 35


def test_profile_dropout_applies_to_containers(images: None, tmp_path: Path) -> None:
    """The smoke profile with a per-round dropout of 0.3 on every device, in containers: the
    server draws the in-process clock's rounds from the seed (0: client0 out in round 0,
    clients 1 and 2 in round 2, everyone in round 3), the containers sit them out, and the
    events are those the in-process clock logs."""
    import yaml

    from runner.emulation.clock import dropped_in_round

    doc = yaml.safe_load((ROOT / "profiles" / "smoke.yaml").read_text())
    for d in doc["devices"]:
        d["availability"] = {"dropout": 0.3}
    doc["description"] = "smoke with a per-round dropout of 0.3"
    profile = tmp_path / "smoke-dropout.yaml"
    profile.write_text(yaml.safe_dump(doc))
    run = tmp_path / "dropout"
    cli("up", "--profile", str(profile), "--backend", "compose", "--host-network",
        "--steps", "8", "--join-timeout", "90", "--out", str(run))
    clients = ["client0", "client1", "client2"]
    away = {r: {c for i, c in enumerate(clients) if dropped_in_round(0, r, i, 0.3)}
            for r in range(4)}
    assert away == {0: {"client0"}, 1: set(), 2: {"client1", "client2"},
                    3: {"client0", "client1", "client2"}}
    events = read_jsonl(run / "events.jsonl")
    off = sorted((e["step"], e["client"]) for e in events
                 if e["event"] == "client_offline" and e["reason"] == "dropout")
    on = sorted((e["step"], e["client"]) for e in events
                if e["event"] == "client_online" and e.get("reason") == "dropout")
    assert off == [(0, "client0"), (4, "client1"), (4, "client2"), (6, "client0")], events
    assert on == [(2, "client0")], events
    train = {(m["step"], m["client"]) for m in read_jsonl(run / "metrics.jsonl")
             if m.get("kind") == "train"}
    want = {(s, c) for s in range(8) for c in clients if c not in away[s // 2]}
    assert train == want
    st = json.loads(cli("status", "--json", str(run)).stdout)
    assert st["audit"]["ok"] and st["audit"]["steps"]["empty"] == [6, 7], st["audit"]

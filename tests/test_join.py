"""``testbed join`` (testbed/backends/join.py): a device outside the launcher takes a client's slot.

The end-to-end test starts a local-backend run of the smoke profile whose ``client2`` slot
is left to a joiner (``testbed up --join-slot client2``), then runs ``testbed join`` as a
separate process on loopback with the join file, its own working directory and the model
path given explicitly, as a device would. Real Mosquitto, real processes.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from fleet_cli import ROOT, TESTBED, cli, wait_for

from runner.rundir import read_jsonl
from testbed.backends.join import prepare, read_join_file, write_join_file


def _join_file(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "devices.json").write_text(json.dumps({"clients": [
        {"name": "client0", "memory_bytes": 111}, {"name": "client1", "memory_bytes": 222}],
        "server": {"name": "server", "memory_bytes": 999}}))
    (run / "runtime.json").write_text(json.dumps({
        "train": {"model": "tiny-llama", "data": "synthetic",
                  "devices": str(run / "devices.json")},
        "run_dir": str(run), "run_id": "r1", "clients": ["client0", "client1"],
        "broker": "mqtt://127.0.0.1:1883", "runtime": {}}))
    return write_join_file(run, client="client1", broker="mqtt://127.0.0.1:1883",
                           run_id="r1", password="s3cret", config_path=run / "runtime.json")


def test_join_file_is_private_and_self_contained(tmp_path: Path) -> None:
    path = _join_file(tmp_path)
    assert path == tmp_path / "run" / "join" / "client1.json"
    assert path.stat().st_mode & 0o077 == 0
    doc = read_join_file(path)
    assert doc["client"] == "client1" and doc["password"] == "s3cret"
    assert doc["devices"]["clients"][1]["memory_bytes"] == 222  # inlined, not a path


def test_prepare_writes_the_devices_own_config(tmp_path: Path) -> None:
    path = _join_file(tmp_path)
    work = tmp_path / "device"
    env = prepare(path, work, broker="mqtt://10.0.0.5:1884", run_id="r1", client="client1",
                  model="/models/smollm2", data="/data/e2e.csv")
    runtime = json.loads((work / "runtime.json").read_text())
    assert runtime["run_dir"] == str(work.resolve())
    assert runtime["broker"] == "mqtt://10.0.0.5:1884"
    assert runtime["train"]["model"] == "/models/smollm2"
    assert runtime["train"]["data"] == "/data/e2e.csv"
    assert json.loads(Path(runtime["train"]["devices"]).read_text())["server"]["name"] == \
        "server"
    assert env["TESTBED_CLIENT_ID"] == env["TESTBED_USERNAME"] == "client1"
    assert env["TESTBED_BROKER"] == "mqtt://10.0.0.5:1884" and env["TESTBED_RUN_ID"] == "r1"
    assert Path(env["TESTBED_PASSWORD_FILE"]).read_text().strip() == "s3cret"
    assert "TESTBED_PASSWORD" not in env
    # the profile's budget only as the last resort of the client's own discovery
    assert env["TESTBED_BUDGET_BYTES"] == "222"


@pytest.mark.parametrize(("kwargs", "phrase"), [
    ({"run_id": "other"}, "is for run 'r1'"),
    ({"client": "client0"}, "is the join file of 'client1'"),
    ({"broker": "http://x"}, "must look like mqtt://host:port"),
])
def test_prepare_refuses_a_file_for_someone_else(tmp_path: Path, kwargs: dict[str, str],
                                                 phrase: str) -> None:
    from runner.errors import UserError

    with pytest.raises(UserError, match=phrase.replace("(", r"\(")):
        prepare(_join_file(tmp_path), tmp_path / "device", **kwargs)


def test_cli_bad_credentials_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    proc = cli("join", "--broker", "mqtt://127.0.0.1:1", "--run-id", "r", "--client", "c",
               "--credentials", str(bad), check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "is not a join file" in lines[0], proc.stderr


@pytest.mark.slow
def test_a_device_joins_a_local_run(tmp_path: Path) -> None:
    run = tmp_path / "joined"
    up = subprocess.Popen(
        [*TESTBED, "up", "--profile", "smoke", "--backend", "local", "--steps", "4",
         "--join-slot", "client2", "--join-timeout", "600", "--out", str(run)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "COLUMNS": "200"})
    joiner = None
    try:
        join_file = run / "join" / "client2.json"
        wait_for(join_file.is_file, 300, "the join file", up)
        doc = json.loads(join_file.read_text())
        joiner = _start_joiner(doc, join_file, tmp_path)
        out, _ = up.communicate(timeout=900)
        joined_out = _joiner_output(joiner, tmp_path)
    finally:
        for p in (up, joiner):
            if p is not None and p.poll() is None:
                p.kill()
    assert up.returncode == 0, out[-4000:]
    assert "testbed join" in out and "client2" in out  # the slot was announced
    assert joiner.returncode == 0, joined_out[-4000:]
    assert "client2 connected to" in joined_out
    # the server treated the joiner as any client: it joined, reported a budget, trained
    events = read_jsonl(run / "events.jsonl")
    assert any(e["event"] == "client_joined" and e.get("client") == "client2" for e in events)
    budget = [e for e in events if e["event"] == "client_budget" and e["client"] == "client2"]
    assert budget and budget[0]["budget_bytes"] > 0 and budget[0]["source"], budget
    train = [m for m in read_jsonl(run / "metrics.jsonl") if m.get("kind") == "train"]
    assert {m["client"] for m in train} == {"client0", "client1", "client2"}
    assert max(m["step"] for m in train if m["client"] == "client2") == 3
    # no process of the launcher played client2
    state = json.loads((run / "testbed-state.json").read_text())
    assert "client2" not in state["processes"]


# ------------------------------------------------------------------------------ over TLS
def test_join_file_carries_the_tls_bundle(tmp_path: Path) -> None:
    """With TLS the join file is the one bundle: the run's CA and, with mutual TLS, the
    client's certificate and key; on the device the key is mode 0600 and the URL must be
    mqtts:// (a plain URL, or TLS for a plain run, is one line)."""
    from runner.distributed.tls import ENV_CA, ENV_CERT, ENV_KEY, make_pki
    from runner.errors import UserError

    plain = tmp_path / "plain.json"  # the same client's join file of a run without TLS
    plain.write_text(_join_file(tmp_path).read_text())
    run = tmp_path / "run"
    pki = make_pki(run / "tls", run="r1", hosts=["127.0.0.1"],
                   identities=["server", "client0", "client1"], mutual=True)
    path = write_join_file(run, client="client1", broker="mqtts://0.0.0.0:8883", run_id="r1",
                           password="s3cret", config_path=run / "runtime.json",
                           tls=pki.client("client1"))
    doc = read_join_file(path)
    assert doc["tls"]["ca"] == pki.ca.read_text()
    assert doc["tls"]["key"] == pki.key("client1").read_text()
    assert path.stat().st_mode & 0o077 == 0
    env = prepare(path, tmp_path / "device", broker="mqtts://10.0.0.5:8883")
    assert Path(env[ENV_CA]).read_text() == pki.ca.read_text()
    assert Path(env[ENV_CERT]).read_text() == pki.cert("client1").read_text()
    key = Path(env[ENV_KEY])
    assert key.read_text() == pki.key("client1").read_text()
    assert key.stat().st_mode & 0o777 == 0o600
    with pytest.raises(UserError, match="speaks TLS but --broker mqtt://10.0.0.5:8883 is "
                                        "plain MQTT: use mqtts://10.0.0.5:8883"):
        prepare(path, tmp_path / "device2", broker="mqtt://10.0.0.5:8883")
    with pytest.raises(UserError, match="speaks plain MQTT"):
        prepare(plain, tmp_path / "device3", broker="mqtts://10.0.0.5:8883")
    # a plain run's device never inherits TLS files from its shell
    os.environ[ENV_CA] = "/elsewhere/ca.crt"
    try:
        assert ENV_CA not in prepare(plain, tmp_path / "device4")
    finally:
        del os.environ[ENV_CA]


@pytest.mark.slow
def test_a_device_joins_over_mutual_tls(tmp_path: Path) -> None:
    """`testbed up --tls on --mtls` (on loopback, where auto would stay plain) and a device
    that joins with the bundle alone: it trains every step over TLS."""
    run = tmp_path / "joined-tls"
    up = subprocess.Popen(
        [*TESTBED, "up", "--profile", "smoke", "--backend", "local", "--steps", "3",
         "--join-slot", "client2", "--join-timeout", "600", "--tls", "on", "--mtls",
         "--out", str(run)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "COLUMNS": "200"})
    joiner = None
    try:
        join_file = run / "join" / "client2.json"
        wait_for(join_file.is_file, 300, "the join file", up)
        doc = json.loads(join_file.read_text())
        assert doc["broker"].startswith("mqtts://127.0.0.1:") and "cert" in doc["tls"]
        joiner = _start_joiner(doc, join_file, tmp_path)
        out, _ = up.communicate(timeout=900)
        joined_out = _joiner_output(joiner, tmp_path)
    finally:
        for p in (up, joiner):
            if p is not None and p.poll() is None:
                p.kill()
    assert up.returncode == 0, out[-4000:]
    tls_lines = [line for line in out.splitlines() if line.startswith("tls:")]
    assert len(tls_lines) == 1 and tls_lines[0].startswith("tls: on, mutual"), out[-3000:]
    assert joiner.returncode == 0, joined_out[-4000:]
    assert "client2 connected to mqtts://" in joined_out
    train = [m for m in read_jsonl(run / "metrics.jsonl") if m.get("kind") == "train"]
    assert sorted(m["step"] for m in train if m["client"] == "client2") == [0, 1, 2]
    for who in ("client0", "client1"):  # the launcher's processes over TLS too
        assert "connected to mqtts://" in (run / "logs" / f"{who}.log").read_text(), who
    runtime = json.loads((run / "config.json").read_text())["runtime"]
    assert runtime["tls"] == "mutual" and runtime["broker"].startswith("mqtts://")
    assert (tmp_path / "device" / "tls" / "client.key").stat().st_mode & 0o777 == 0o600


def _start_joiner(doc: dict, join_file: Path, tmp_path: Path) -> subprocess.Popen:
    """`testbed join` for client2's slot from its join file, as a device would run it;
    output to tmp_path/joiner.log (read by :func:`_joiner_output`)."""
    with open(tmp_path / "joiner.log", "w") as log:
        return subprocess.Popen(
            [*TESTBED, "join", "--broker", doc["broker"], "--run-id", doc["run_id"],
             "--client", "client2", "--credentials", str(join_file),
             "--model", doc["runtime"]["train"]["model"],  # the stand-in, as the device has it
             "--workdir", str(tmp_path / "device")],
            cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, text=True)


def _joiner_output(joiner: subprocess.Popen, tmp_path: Path) -> str:
    """Wait for the joiner to end and return what it printed."""
    joiner.wait(timeout=120)
    return (tmp_path / "joiner.log").read_text()

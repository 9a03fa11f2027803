"""End to end with real containers: offline image build, `testbed up --profile smoke` on the
compose backend, a client container killed and restarted mid-run, and a client container
whose memory limit is below its need (OOM kill -> "budget_exceeded", the run goes on).

Real parts only: a Docker daemon, Compose (v2 plugin or v1), the images built offline from a
debootstrap'd base and the host's wheels, Mosquitto in its own container. Every container
uses host networking so all traffic stays on loopback (../shared/docs/environment.md).

`make test` installs Docker, Compose and debootstrap and starts the daemon when missing, so
in CI this module always runs; on a developer machine without a daemon it is skipped with the
reason (and fails instead when $CI is set, so CI can never skip it silently).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from fleet_cli import ROOT, TESTBED, cli, require_docker, wait_for

from runner.memory import DEFAULT_RESERVE
from runner.rundir import read_jsonl
from testbed.compose import compose_command, container_limit
from testbed.profiles import emulation_map, load_profile

pytestmark = pytest.mark.slow
require_docker(compose_command() is not None)


@pytest.fixture(scope="module")
def images() -> float:
    """`testbed images build --offline` (reuses an existing base image); its duration."""
    t0 = time.monotonic()
    proc = cli("images", "build", "--offline", timeout=1800)
    assert "hsplitlora-testbed:latest" in proc.stdout
    return time.monotonic() - t0


def _events(run: Path) -> list[dict]:
    return read_jsonl(run / "events.jsonl")


def test_images_are_built_offline(images: float) -> None:
    import docker

    client = docker.from_env()
    runtime = client.images.get("hsplitlora-testbed:latest")
    broker = client.images.get("hsplitlora-broker:latest")
    assert runtime.labels.get("org.hsplitlora.role") == "runtime"
    assert broker.labels.get("org.hsplitlora.role") == "broker"
    out = client.containers.run("hsplitlora-testbed:latest", network_mode="none", remove=True,
                                command=["python", "-c", "import runner.client, torch; "
                                         "print(torch.__version__)"])
    assert out.decode().startswith("2.13.0")


def test_smoke_profile_in_containers_survives_a_killed_client(images: float,
                                                               tmp_path: Path) -> None:
    run = tmp_path / "smoke"
    steps = 12
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [*TESTBED, "up", "--profile", "smoke", "--backend", "compose", "--host-network",
         "--steps", str(steps), "--min-step-time", "4", "--out", str(run)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "COLUMNS": "200"})
    try:
        def trained(n: int):
            return lambda: sum(1 for m in read_jsonl(run / "metrics.jsonl")
                               if m.get("kind") == "train" and m.get("client") == "client1"
                               ) >= n

        wait_for(trained(2), 600, "client1's second step", proc)
        kill = cli("inject", "dropout", "--client", "client1", "--mode", "kill", "--for", "2",
                   "--run", str(run))
        assert "client1 killed" in kill.stdout and "restarted" in kill.stdout
        st = json.loads(cli("status", "--json", "--run", str(run)).stdout)
        assert st["backend"] == "compose"
        limits = {n: c["mem_limit"] for n, c in st["containers"].items() if n.startswith("c")}
        out, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
            cli("down", "--run", str(run), check=False)
    assert proc.returncode == 0, out[-4000:]
    duration = time.monotonic() - t0
    print(f"\ncontainer e2e: {duration:.0f} s for {steps} steps (images {images:.0f} s)")
    assert "budget" in out and "stand-in" in out  # the emulation mapping was printed

    events = _events(run)
    kinds = [(e["event"], e.get("client")) for e in events]
    assert ("inject", "client1") in kinds
    i_kill = kinds.index(("inject", "client1"))
    after = kinds[i_kill:]
    assert ("client_offline", "client1") in after, kinds
    back = [e for e in events[i_kill:] if e["event"] == "client_online"
            and e.get("client") == "client1"]
    assert back and back[0]["reason"] == "restarted", kinds
    assert kinds[-1] == ("run_finished", None)

    # each client container's cgroup limit, seen from inside, equals the profile's mapping
    profile = load_profile("smoke")
    mapping = emulation_map(profile)
    want = {row.name: container_limit(DEFAULT_RESERVE + row.standin_bytes)
            for row in mapping.clients}
    seen = {e["client"]: e for e in events if e["event"] == "client_budget"}
    assert set(seen) == set(want)
    assert limits == want  # as Docker set them (`testbed status`) ...
    for name, limit in want.items():  # ... and as each client read its cgroup
        assert seen[name]["source"].startswith("cgroup"), seen[name]
        assert seen[name]["budget_bytes"] == limit, (name, seen[name], limit)

    # adapters (PEFT format) and metrics in the run directory
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == steps
    adapter = run / "adapters" / "final"
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "adapter_model.safetensors").is_file()
    train = [m for m in read_jsonl(run / "metrics.jsonl") if m.get("kind") == "train"]
    assert max(m["step"] for m in train) == steps - 1
    assert {m["client"] for m in train} == {"client0", "client1", "client2"}
    # the server runs the devices' virtual clock: emulated time in every record
    assert all(m["virtual_time"] > 0 for m in train)
    # measured resources: each client measured its own container's cgroup, within its limit
    for m in train:
        assert m["memory_source"] == "cgroup", m
        assert m["memory_limit_bytes"] == want[m["client"]], m
        assert 0 < m["memory_current_bytes"] <= m["memory_bytes"] <= want[m["client"]], m
        assert m["budget_bytes"] == want[m["client"]], m
    # ... and the host sampled every container through the Docker API
    samples = read_jsonl(run / "resources.jsonl")
    assert {s["service"] for s in samples} >= {*want, "server", "broker"}
    for s in samples:
        assert 0 < s["usage_bytes"] <= s["peak_bytes"], s
        if s["service"] in want:
            assert s["limit_bytes"] == want[s["service"]] and s["peak_bytes"] <= s["limit_bytes"]
    assert summary["virtual_time_s"] >= max(m["virtual_time"] for m in train)
    # the containers are gone, their logs kept
    assert (run / "logs" / "server.log").stat().st_size > 0
    # a client under a CPU quota below one CPU runs one torch thread (runner/cpu.py)
    assert "torch threads 1 (CPU quota 0." in (run / "logs" / "client0.log").read_text()
    assert "stopped" in cli("down", "--run", str(run)).stdout
    assert "finished: val PPL" in cli("logs", "server", "--run", str(run)).stdout


def test_client_over_its_limit_is_budget_exceeded_and_traces_apply(images: float,
                                                                     tmp_path: Path) -> None:
    """client2's container limit (120 MB) is below what importing PyTorch needs: the kernel
    OOM-kills it, the testbed records budget_exceeded and the run goes on without it.
    client1 carries an availability trace (online [0, 20) and [30, ...) s): its container
    is killed at 20 s and started again at 30 s."""
    import yaml

    doc = yaml.safe_load((ROOT / "profiles" / "smoke.yaml").read_text())
    doc["devices"][1]["availability"] = {"trace": [[0, 20], [30, 100000]]}
    doc["description"] = "smoke with an availability trace on client1"
    profile = tmp_path / "smoke-trace.yaml"
    profile.write_text(yaml.safe_dump(doc))
    run = tmp_path / "oom"
    proc = cli("up", "--profile", str(profile), "--backend", "compose", "--host-network",
               "--steps", "4", "--mem-limit", "client2=120MB", "--join-timeout", "90",
               "--out", str(run))
    assert "client2: budget exceeded" in proc.stdout
    events = _events(run)
    over = [e for e in events if e["event"] == "budget_exceeded"]
    assert len(over) == 1 and over[0]["client"] == "client2"
    assert over[0]["limit_bytes"] == container_limit(120_000_000)
    assert over[0]["budget_bytes"] > over[0]["limit_bytes"]  # the profile's budget was larger
    # the host's last reading of client2 before the kill, when one was taken (the kill can
    # come within the first second), is kept in the event and in resources.jsonl
    last = [s for s in read_jsonl(run / "resources.jsonl") if s["service"] == "client2"]
    if "memory_peak_bytes" in over[0]:
        assert 0 < over[0]["memory_bytes"] <= over[0]["memory_peak_bytes"] \
            <= over[0]["limit_bytes"]
        assert last[-1]["oom_killed"] and last[-1]["peak_bytes"] == over[0]["memory_peak_bytes"]
    print(f"\nclient2's last reading before the OOM kill: {over[0].get('memory_peak_bytes')}")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4
    train = [m for m in read_jsonl(run / "metrics.jsonl") if m.get("kind") == "train"]
    assert "client0" in {m["client"] for m in train}
    assert "client2" not in {m["client"] for m in train}  # went on without client2
    trace = [(e["client"], e["state"]) for e in events if e["event"] == "availability"]
    assert trace[:2] == [("client1", "offline"), ("client1", "online")], trace
    times = [e["elapsed_s"] for e in events if e["event"] == "availability"]
    assert 20 <= times[0] < 25 and 30 <= times[1] < 35


def test_container_run_is_evaluated_and_reported_from_the_host(images: float,
                                                               tmp_path: Path) -> None:
    """A run made in containers records the paths its server saw (/data/devset.csv,
    /cache/...); `testbed eval` and `testbed report`, run on the host with no --data, must
    find the data and the model through host-paths.json (issue: `make run` failed here)."""
    devset = ROOT.parent / "shared" / "data" / "e2e" / "devset.csv"
    run = tmp_path / "hosted"
    cli("up", "--profile", "smoke", "--backend", "compose", "--host-network", "--steps", "2",
        "--data", str(devset), "--out", str(run))
    raw = json.loads((run / "config.json").read_text())
    assert raw["train"]["data"] == "/data/devset.csv"  # what the server saw
    mounts = json.loads((run / "host-paths.json").read_text())["mounts"]
    assert mounts["/data"] == str(devset.resolve().parent)

    out = cli("eval", str(run), "--max-mrs", "3", "--beams", "2", "--max-new-tokens", "8")
    assert "BLEU" in out.stdout
    scores = json.loads((run / "eval" / "scores.json").read_text())
    assert scores["extra"]["data"] == str(devset.resolve())
    assert scores["extra"]["test_mrs"] == 3
    # the protocol the server recorded (container paths) resolves on the host too
    assert raw["train"]["data_protocol"]["test"] == "/data/devset.csv"
    assert scores["extra"]["protocol"] == "split-by-mr" and not scores["extra"]["whole_file"]

    # --test-data: every MR of a host file the containers never saw, all its references
    import pandas as pd

    rows = pd.read_csv(devset, dtype=str, keep_default_na=False)
    mrs = list(pd.unique(rows["mr"]))[:4]
    test_file = tmp_path / "held-out.csv"
    rows[rows["mr"].isin(mrs)].to_csv(test_file, index=False)
    out = cli("eval", str(run), "--test-data", str(test_file), "--beams", "2",
              "--max-new-tokens", "8")
    assert f"test: 4 MRs of {test_file.resolve()}, the whole file" in out.stdout
    extra = json.loads((run / "eval" / "scores.json").read_text())["extra"]
    assert (extra["test_file"], extra["test_mrs"], extra["whole_file"]) == (
        str(test_file.resolve()), 4, True)
    assert len((run / "eval" / "outputs.txt").read_text().splitlines()) == 4
    groups = (run / "eval" / "references.txt").read_text().rstrip("\n").split("\n\n")
    assert [len(g.splitlines()) for g in groups] == [
        int((rows["mr"] == m).sum()) for m in mrs]
    report = run / "report.md"
    cli("report", str(run), "-o", str(report))
    text = report.read_text()
    assert "BLEU" in text
    figures = list((run / "report_figures").glob("*.png"))
    assert any(f.name.startswith("ppl_vs_step") for f in figures), figures

"""End to end with real containers: offline image build, `testbed up --profile smoke` on the
compose backend, a client container killed and restarted mid-run, and a container run
evaluated and reported from the host (a client container whose memory limit is below its
need, OOM kill -> "budget_exceeded", is in tests/test_faults_containers.py, in a detached run).

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
from fleet_cli import ROOT, TESTBED, build_images, cli, require_docker, wait_for

from runner.methods.memory import DEFAULT_RESERVE
from runner.rundir import read_jsonl
from testbed.backends.compose import compose_command, container_limit
from testbed.profiles import emulation_map, load_profile

pytestmark = pytest.mark.slow
require_docker(compose_command() is not None)


@pytest.fixture(scope="module")
def images() -> float:
    """`testbed images build --offline` (reuses an existing base image; one build at a time
    across test workers, tests/fleet_cli.py); its duration."""
    return build_images()


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


DEVSET = ROOT.parent / "shared" / "data" / "e2e" / "devset.csv"


def test_smoke_profile_in_containers_survives_a_killed_client(images: float,
                                                               tmp_path: Path) -> None:
    """The smoke profile in containers, client1 killed mid-run and restarted; then the run
    is evaluated and reported from the host (one fleet for both: each costs a container run
    of its own otherwise)."""
    run = tmp_path / "smoke"
    steps = 12
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [*TESTBED, "up", "--profile", "smoke", "--backend", "compose", "--host-network",
         "--steps", str(steps), "--min-step-time", "4", "--data", str(DEVSET),
         "--out", str(run)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "COLUMNS": "200"})
    try:
        def trained(n: int):
            return lambda: sum(1 for m in read_jsonl(run / "metrics.jsonl")
                               if m.get("kind") == "train" and m.get("client") == "client1"
                               ) >= n

        wait_for(trained(2), 600, "client1's second step", proc)
        kill = cli("inject", "dropout", "--client", "client1", "--mode", "kill", "--for", "2",
                   str(run))
        assert "client1 killed" in kill.stdout and "restarted" in kill.stdout
        st = json.loads(cli("status", "--json", str(run)).stdout)
        assert st["backend"] == "compose"
        limits = {n: c["mem_limit"] for n, c in st["containers"].items() if n.startswith("c")}
        out, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
            cli("down", str(run), check=False)
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
    # a client under a CPU quota below one CPU runs one torch thread (runner/emulation/cpu.py)
    assert "torch threads 1 (CPU quota 0." in (run / "logs" / "client0.log").read_text()
    assert "stopped" in cli("down", str(run)).stdout
    assert "finished: val PPL" in cli("logs", str(run), "server").stdout
    _evaluated_and_reported_from_the_host(run, DEVSET, tmp_path)


def _evaluated_and_reported_from_the_host(run: Path, devset: Path, tmp_path: Path) -> None:
    """A run made in containers records the paths its server saw (/data/devset.csv,
    /cache/...); `testbed eval` and `testbed report`, run on the host with no --data, must
    find the data and the model through host-paths.json (issue: `make run` failed here)."""
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


def test_ctrl_c_while_starting_takes_the_fleet_down(images: float, tmp_path: Path) -> None:
    """Ctrl-C while `compose up` is still starting containers: `testbed up` exits (code 2,
    one line) and no container of the run's project is left behind, running or stopped."""
    import signal

    from testbed.backends.compose_run import project_containers, project_name

    run = tmp_path / "ctrlc"
    project = project_name(run.name)

    def containers() -> list:
        return list(project_containers(project).values())

    proc = subprocess.Popen(
        [*TESTBED, "up", "--profile", "smoke", "--backend", "compose", "--host-network",
         "--steps", "50", "--data", str(DEVSET), "--out", str(run)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: bool(containers()), 600, "the run's first container", proc)
        proc.send_signal(signal.SIGINT)  # while compose is still starting the fleet, mostly
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
        leftover = [c.name for c in containers()]
        for c in containers():
            c.remove(force=True)
    assert proc.returncode == 2, out[-3000:]
    assert "interrupted" in out, out[-3000:]
    assert leftover == [], out[-3000:]

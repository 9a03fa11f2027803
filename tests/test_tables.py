"""Output that survives a pipe: whole values in tables when stdout is not a terminal, and
``--json`` on ``testbed profiles list`` and ``testbed status``."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table
from typer.testing import CliRunner

from testbed.cli import app
from testbed.tables import natural_width, print_table

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p.stem for p in (REPO / "profiles").glob("*.yaml"))


def _table() -> Table:
    table = Table(title="a title that is longer than the console is wide")
    table.add_column("name", no_wrap=True)
    table.add_column("description")
    table.add_row("hetero-llama2-with-a-long-name", "words " * 20)
    return table


def test_print_table_keeps_values_whole_off_a_terminal() -> None:
    out = io.StringIO()
    console = Console(file=out, width=30)
    assert not console.is_terminal
    print_table(console, _table())
    text = out.getvalue()
    assert "hetero-llama2-with-a-long-name" in text and "…" not in text
    assert "a title that is longer than the console is wide" in text
    assert ("words " * 20).strip() in text  # not wrapped either
    assert max(len(line) for line in text.splitlines()) == natural_width(console, _table())
    assert console.width == 30  # the console is left as it was


def test_print_table_still_fits_a_terminal() -> None:
    out = io.StringIO()
    console = Console(file=out, width=30, force_terminal=True, color_system=None)
    print_table(console, _table())
    assert max(len(line) for line in out.getvalue().splitlines()) <= 30


def _testbed(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`testbed ...` with stdout a pipe (as in `testbed profiles list | cat`)."""
    full = dict(os.environ, HF_HUB_OFFLINE="1", **env)
    full["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), full.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-m", "testbed.cli", *args], cwd=REPO, env=full,
                          capture_output=True, text=True, timeout=300)


def test_profiles_list_through_a_pipe_shows_full_names() -> None:
    # a narrow $COLUMNS used to cut names to `hetero-l…`
    r = _testbed("profiles", "list", COLUMNS="40")
    assert r.returncode == 0, r.stderr
    assert "…" not in r.stdout
    rows = [line.split("│")[1].strip() for line in r.stdout.splitlines()
            if line.startswith("│")]
    assert rows == SHIPPED
    for name in SHIPPED:
        p = yaml.safe_load((REPO / "profiles" / f"{name}.yaml").read_text())
        assert p["description"].strip() in r.stdout  # the description whole, on one line


def test_profiles_show_through_a_pipe_shows_whole_values() -> None:
    r = _testbed("profiles", "show", "hetero-llama2", "--emulation", COLUMNS="40")
    assert r.returncode == 0, r.stderr
    assert "…" not in r.stdout
    assert "Jetson AGX Orin-class" in r.stdout and "container/ARMSC" in r.stdout
    assert "emulating meta-llama/Llama-2-7b-hf (fp16, training footprint" in r.stdout


def test_profiles_list_json(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["profiles", "list", "--json"])
    assert res.exit_code == 0, res.output
    listed = json.loads(res.output)
    assert [p["name"] for p in listed] == SHIPPED
    llama = next(p for p in listed if p["name"] == "hetero-llama2")
    assert llama["valid"] and llama["clients"] == 5 and llama["method"] == "hsplitlora"
    assert llama["reference_model"] == "meta-llama/Llama-2-7b-hf"
    assert (llama["memory_min"], llama["memory_max"]) == (5 * 10**9, 20 * 10**9)
    assert llama["devices"] == [f"client{i}" for i in range(5)]

    # an invalid profile is a record with its one-line error, not a crash
    (tmp_path / "bad.yaml").write_text("devices: []\n")
    (tmp_path / "ok.yaml").write_text((REPO / "profiles" / "smoke.yaml").read_text())
    r = _testbed("profiles", "list", "--json", TESTBED_PROFILES=str(tmp_path))
    assert r.returncode == 0, r.stderr
    got = {p["name"]: p for p in json.loads(r.stdout)}
    assert got["ok"]["valid"] and got["ok"]["clients"] == 3
    assert not got["bad"]["valid"] and "bad.yaml" in got["bad"]["error"]


def test_status_json_from_a_state_file(tmp_path: Path) -> None:
    from testbed.backends.local import STATE

    run = tmp_path / "run"
    run.mkdir()
    (run / STATE).write_text(json.dumps({
        "backend": "local", "run_id": "r1", "processes": {"server": {"pid": 2**22 + 7}},
        "broker": {"url": "mqtt://127.0.0.1:1883"}}))
    (run / "metrics.jsonl").write_text(json.dumps(
        {"kind": "train", "step": 0, "client": "client0", "loss": 2.5}) + "\n")
    res = CliRunner().invoke(app, ["status", "--json", str(run)])
    assert res.exit_code == 0, res.output
    st = json.loads(res.output)
    assert st["run_id"] == "r1" and st["step"] == 1 and st["loss"] == 2.5
    assert st["processes"]["server"]["state"] == "exited"
    assert st["broker"]["state"] == "external" and st["finished"] is False


def test_status_without_run_means_the_latest_started_run(tmp_path: Path,
                                                          monkeypatch) -> None:
    """`make run` writes runs/<profile>, not runs/latest: `testbed status` with no --run
    must find the run last started under runs/, and say nothing was started when none was."""
    from testbed.backends.local import STATE

    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["status", "--json"])
    assert res.exit_code == 2 and "runs/latest has no testbed-state.json" in res.output
    for i, name in enumerate(["older", "newer"]):
        run = tmp_path / "runs" / name
        run.mkdir(parents=True)
        (run / STATE).write_text(json.dumps({
            "backend": "local", "run_id": name, "processes": {},
            "broker": {"url": "mqtt://127.0.0.1:1883"}}))
        os.utime(run / STATE, (1000 + i, 1000 + i))
    res = CliRunner().invoke(app, ["status", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["run_id"] == "newer"
    res = CliRunner().invoke(app, ["status", "--json", "runs/older"])
    assert json.loads(res.output)["run_id"] == "older"

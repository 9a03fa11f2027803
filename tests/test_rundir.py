"""Run directories read from the host: container paths mapped back (runner/rundir.py).

A run made in containers records the paths its server saw; `host-paths.json` (written by
the compose backend) maps each mount point back, so `testbed eval` / `report` work from the
host. These tests pin the mapping rules on hand-made files; tests/test_containers.py runs
the real thing.
"""

from __future__ import annotations

import json
from pathlib import Path

from runner.rundir import RUN_MOUNT, RunDir, read_config, to_host


def test_to_host_maps_whole_path_components_longest_mount_first() -> None:
    mounts = {"/data": "/home/u/e2e", "/cache": "/home/u/.cache/t", "/cache/models": "/m"}
    assert to_host("/data/devset.csv", mounts) == "/home/u/e2e/devset.csv"
    assert to_host("/data", mounts) == "/home/u/e2e"
    assert to_host("/database/x", mounts) == "/database/x"  # not under /data
    assert to_host("/cache/models/smol", mounts) == "/m/smol"  # the longer mount wins
    assert to_host("/cache/tok", mounts) == "/home/u/.cache/t/tok"
    assert to_host("synthetic", mounts) == "synthetic"
    assert to_host({"a": ["/data/x", 3, None]}, mounts) == {"a": ["/home/u/e2e/x", 3, None]}


def _container_run(tmp_path: Path) -> Path:
    run = tmp_path / "moved" / "run"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({
        "train": {"method": "splitlora", "data": "/data/devset.csv",
                  "devices": f"{RUN_MOUNT}/devices.json"},
        "model_path": "/cache/models/smollm2", "data_source": "/data/devset.csv"}))
    (run / "host-paths.json").write_text(json.dumps({
        "run_mount": RUN_MOUNT, "mounts": {"/data": "/srv/e2e", "/cache": "/srv/cache"}}))
    return run


def test_read_config_maps_a_container_run_and_keeps_what_the_containers_saw(
        tmp_path: Path) -> None:
    run = _container_run(tmp_path)
    cfg = RunDir.open(run).config()
    assert cfg["train"]["data"] == "/srv/e2e/devset.csv"
    assert cfg["model_path"] == "/srv/cache/models/smollm2"
    # the run directory maps to where it is now (it was moved after the run)
    assert cfg["train"]["devices"] == str(run.resolve() / "devices.json")
    assert cfg["container_paths"]["train"]["data"] == "/data/devset.csv"
    assert cfg["container_paths"]["model_path"] == "/cache/models/smollm2"


def test_read_config_leaves_a_host_run_alone(tmp_path: Path) -> None:
    run = tmp_path / "host"
    run.mkdir()
    doc = {"train": {"data": "/data/devset.csv"}, "model_path": "/cache/x"}
    (run / "config.json").write_text(json.dumps(doc))
    assert read_config(run) == doc  # no host-paths.json: recorded paths are host paths

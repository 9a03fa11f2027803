"""Image inputs from a host venv on any supported Python (3.11-3.13): the images run Python
3.11, so pins and wheels must be ones 3.11 can install (no Docker needed here;
tests/test_containers.py builds the images for real)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from testbed.backends import images


class _Dist:
    def __init__(self, name: str, version: str, requires_python: str | None = None) -> None:
        self.metadata = {"Name": name}
        if requires_python is not None:
            self.metadata["Requires-Python"] = requires_python
        self.version = version


def test_constraints_skip_releases_the_image_python_cannot_install(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dists = [_Dist("torch", "2.13.0+cpu", ">=3.10"), _Dist("numpy", "2.5.5", ">=3.12"),
             _Dist("networkx", "3.7", "!=3.14.1,>=3.12"), _Dist("PyYAML", "6.0.4"),
             _Dist("paho_mqtt", "2.2.0", ">=3.9"), _Dist("hsplitlora-testbed", "0.1.0"),
             _Dist("pip", "26.3")]
    monkeypatch.setattr(images.metadata, "distributions", lambda: dists)
    path = images.write_constraints(tmp_path / "constraints.txt")
    pins = [line for line in path.read_text().splitlines() if not line.startswith("#")]
    assert pins == ["paho-mqtt==2.2.0", "pyyaml==6.0.4", "torch==2.13.0"]


def test_wheels_are_downloaded_for_the_image_python(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    def fake_run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(images.subprocess, "run", fake_run)
    images.download_wheels(tmp_path / "wheels", log=lambda _m: None)
    cmd = seen[0]
    assert cmd[cmd.index("--python-version") + 1] == images.IMAGE_PYTHON == "3.11"
    assert "--only-binary=:all:" in cmd

"""The Makefile's choice of interpreter for .venv (Python 3.11-3.13), with stand-in
interpreters: shell scripts that print a version, or fail like a pyenv shim for a version
that is not selected."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="no make")


def _fake(path: Path, version: str | None) -> Path:
    """An interpreter that reports ``version`` and whose ``-m venv DIR`` makes DIR/bin/python
    (a copy of itself); ``None``: one that fails at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if version is None:
        path.write_text("#!/bin/sh\necho 'pyenv: command not found' >&2\nexit 127\n")
    else:
        path.write_text(
            "#!/bin/sh\n"
            f'if [ "$1" = -c ]; then echo {version}; exit 0; fi\n'
            'if [ "$1" = -m ] && [ "$2" = venv ]; then\n'
            '  mkdir -p "$3/bin" && cp "$0" "$3/bin/python" && exit 0; fi\n'
            "exit 1\n")
    path.chmod(0o755)
    return path


def _make(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    shutil.copy(REPO / "Makefile", tmp / "Makefile")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "MAKEFLAGS", "MFLAGS")}
    env["PATH"] = f"{tmp / 'bin'}{os.pathsep}{env['PATH']}"
    return subprocess.run(["make", "--no-print-directory", ".venv/bin/python", *args], cwd=tmp,
                          env=env, capture_output=True, text=True, timeout=60)


def test_picks_the_first_supported_interpreter_that_runs(tmp_path: Path) -> None:
    _fake(tmp_path / "bin" / "shim311", None)  # a pyenv shim of an unselected version
    _fake(tmp_path / "bin" / "old", "3.10")
    _fake(tmp_path / "bin" / "py312", "3.12")
    _fake(tmp_path / "bin" / "py313", "3.13")
    r = _make(tmp_path, "PYTHONS=shim311 old py312 py313")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == "creating .venv with py312 (Python 3.12)"
    assert (tmp_path / ".venv" / "bin" / "python").is_file()
    again = _make(tmp_path, "PYTHONS=shim311 old py312 py313")  # an existing good .venv
    assert again.returncode == 0 and again.stdout == "", again.stdout + again.stderr


def test_no_supported_interpreter_is_one_error_line(tmp_path: Path) -> None:
    _fake(tmp_path / "bin" / "old", "3.10")
    r = _make(tmp_path, "PYTHONS=missing old")
    assert r.returncode == 2
    assert r.stdout.strip().splitlines() == [
        "error: no Python 3.11 3.12 3.13 found; install one (e.g. python3.12) or run make "
        "PYTHON=/path/to/python3.x"]
    assert not (tmp_path / ".venv").exists()


def test_python_override(tmp_path: Path) -> None:
    old = _fake(tmp_path / "bin" / "old", "3.10")
    r = _make(tmp_path, f"PYTHON={old}")
    assert r.returncode == 2
    assert r.stdout.strip() == f"error: {old} is Python 3.10; supported: 3.11 3.12 3.13"
    r = _make(tmp_path, "PYTHON=nowhere")
    assert r.returncode == 2 and r.stdout.startswith("error: no Python 3.11 3.12 3.13 found at "
                                                     "nowhere;")
    good = _fake(tmp_path / "bin" / "mine", "3.13")
    r = _make(tmp_path, f"PYTHON={good}")
    assert r.returncode == 0 and "(Python 3.13)" in r.stdout, r.stdout + r.stderr


def test_existing_venv_of_an_unsupported_python_is_refused(tmp_path: Path) -> None:
    _fake(tmp_path / ".venv" / "bin" / "python", "3.10")
    r = _make(tmp_path)
    assert r.returncode == 2
    assert r.stdout.strip() == ("error: .venv has Python 3.10; supported: 3.11 3.12 3.13 "
                                "(make clean, then run again)")

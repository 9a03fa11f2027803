"""Helpers shared by the tests that drive a containerised fleet through the ``testbed`` CLI
(tests/test_containers.py: Compose; tests/test_swarm.py: a Docker stack)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from testbed.backends.images import daemon_available

ROOT = Path(__file__).resolve().parents[1]
TESTBED = [sys.executable, "-m", "testbed.cli"]


def require_docker(also: bool = True, what: str = "Compose") -> None:
    """Skip the module without a Docker daemon (or without ``also``), except in CI, where
    `make test` installs and starts them: there a missing daemon is an error, so CI can
    never skip the container tests silently."""
    if daemon_available() and also:
        return
    if os.environ.get("CI"):
        raise RuntimeError(f"CI must run the container tests: no Docker daemon or {what} "
                           "(make test installs and starts them)")
    pytest.skip(f"no Docker daemon or {what} here (make test installs them)",
                allow_module_level=True)


def cli(*args: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
    """``testbed ARGS`` from the repository root, output captured; fails the test on a
    non-zero exit unless ``check`` is false."""
    proc = subprocess.run([*TESTBED, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env={**os.environ, "COLUMNS": "200"})
    if check and proc.returncode != 0:
        raise AssertionError(f"testbed {' '.join(args)} exited {proc.returncode}:\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def wait_for(predicate: Callable[[], bool], timeout: float, what: str,
             proc: subprocess.Popen | None = None) -> None:
    """Poll ``predicate`` until true; fail when ``timeout`` passes or ``proc`` (a
    foreground ``testbed up``) ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"`testbed up` ended ({proc.returncode}) before {what}:\n"
                                 f"{out[-4000:]}")
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")

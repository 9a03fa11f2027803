"""Helpers shared by the tests that drive a containerised fleet through the ``testbed`` CLI
(tests/test_containers.py: Compose; tests/test_swarm.py: a Docker stack)."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import tempfile
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


def build_images(timeout: float = 1800) -> float:
    """``testbed images build --offline``, one build at a time on this host: the test
    modules that need the images run in different pytest-xdist workers, and two concurrent
    first builds (debootstrap, the wheelhouse) each take longer than one. The first caller
    builds; the others wait for it and then find every layer cached (a few seconds), so each
    module still runs against images made from the current runner/. Returns the seconds the
    call took."""
    t0 = time.monotonic()
    with open(Path(tempfile.gettempdir()) / "hsplitlora-test-images.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            proc = cli("images", "build", "--offline", timeout=timeout)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    assert "hsplitlora-testbed:latest" in proc.stdout, proc.stdout[-2000:]
    return time.monotonic() - t0


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

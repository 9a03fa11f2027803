"""``python -m testbed.backends.watcher RUN``: the host-side watch of a detached compose run.

Why a process: ``testbed up --detach`` returns at once, and the watch that a foreground run
keeps in a thread (testbed/backends/compose_run.py ``ComposeRun.watch``: an OOM-killed client ->
``budget_exceeded`` event, memory readings -> ``resources.jsonl``, the profile's availability
traces applied to the containers) would end with it. So ``up --detach`` starts this module in
a session of its own; it rebuilds what the watch needs from the state file (project, clients,
budgets, traces), runs until the server container exits (or the run's containers are gone),
looks for OOM kills a last time and exits. Its pid is in the state file: ``testbed status``
reports it, ``testbed down`` stops it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from runner.rundir import write_json
from testbed.backends.local import ROOT, STATE, pid_alive, pid_state, read_state

MODULE = "testbed.backends.watcher"


def start(run_dir: Path) -> dict[str, Any]:
    """Start the watcher of the compose run in ``run_dir``; record and return its pid and
    log (``RUN/logs/watcher.log``)."""
    run_dir = Path(run_dir)
    log = run_dir / "logs" / "watcher.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", MODULE, str(run_dir)], env=env,
                                stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=str(ROOT),
                                start_new_session=True)
    info = {"pid": proc.pid, "log": str(log), "started": time.time()}
    state = read_state(run_dir)
    state["watcher"] = info
    write_json(run_dir / STATE, state)
    return info


def _ours(pid: int) -> bool:
    """Whether ``pid`` still runs this module (a stale pid may belong to another program)."""
    try:
        return MODULE.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def state(run_dir: Path) -> dict[str, Any]:
    """{"watcher": {"pid", "state": running | exited, "log"}} when the run has one, else {}."""
    info = read_state(run_dir).get("watcher")
    if not isinstance(info, dict) or not info.get("pid"):
        return {}
    pid = int(info["pid"])
    alive = pid_alive(pid) and _ours(pid)
    return {"watcher": {"pid": pid, "state": pid_state(pid) if alive else "exited",
                        "log": info.get("log")}}


def stop(run_dir: Path, grace: float = 5.0) -> bool:
    """SIGTERM the run's watcher (it finishes its last OOM check), SIGKILL after ``grace``;
    whether one was running."""
    info = read_state(run_dir).get("watcher") or {}
    pid = int(info.get("pid") or 0)
    if not pid or not pid_alive(pid) or not _ours(pid):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return True


def watch(run_dir: Path, period: float = 1.0) -> int:
    """Watch until the server container exits or the containers are gone (SIGTERM: at once);
    0, or 2 when ``run_dir`` is not a compose run."""
    from testbed.backends.compose_run import attach

    run = attach(run_dir)
    stop_event = threading.Event()
    signal.signal(signal.SIGTERM, lambda s, f: stop_event.set())
    thread = threading.Thread(target=run.watch, args=(stop_event, period), daemon=True)
    thread.start()
    print(f"watching compose project {run.project} ({len(run.clients)} clients)", flush=True)
    while not stop_event.is_set():
        try:
            conts = run.containers()
            code = run.server_exit()
        except Exception as exc:  # noqa: BLE001 - a transient daemon error
            print(f"docker: {exc}", flush=True)
            stop_event.wait(period)
            continue
        if not conts or "server" not in conts:
            print("the run's containers are gone", flush=True)
            break
        if code is not None:
            print(f"the server exited with code {code}", flush=True)
            break
        stop_event.wait(period)
    stop_event.set()
    thread.join(10)
    with contextlib.suppress(Exception):
        run.check_oom()
    for client in sorted(run.recorded_oom):  # by the watch loop or this last look
        print(f"{client}: budget exceeded (OOM-killed in its container)", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    from runner.errors import UserError

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m testbed.backends.watcher RUN_DIR", file=sys.stderr)
        return 2
    try:
        return watch(Path(args[0]))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""A fork server for the clients of a local run: the client runtime imported once, every
client process forked from it.

Why (issue 15 part 4, docs/benchmarks.md "Server and client memory vs number of clients"):
a client process holds ~290 MB of private memory before its first tensor (torch,
transformers' modelling, peft), and at 32 clients on one host that runtime, not the model, is
what fills the machine. Processes forked from one that has already imported it share those
pages copy-on-write; ``gc.freeze()`` keeps the collector from touching (and so copying) the
imported objects. Each child is then exactly ``python -m runner.client``: its own session,
environment, working directory and log, ``runner.client.main``'s exit code.

Protocol, one JSON object per line: the parent (testbed/backends/local.py ``LocalRun``) writes
``{"who", "argv", "env", "cwd", "log"}`` on stdin; the server answers ``{"who", "pid"}`` on
stdout, forks nothing else, and when a child exits writes its exit code to ``<log>.exit``
(``{"pid", "returncode"}``), since the parent cannot wait for a process that is not its
child. On end of input it stays until its last child has exited (a detached run outlives the
``testbed up`` that started it), then exits.

Nothing here may start a thread or run a parallel torch operation before forking (an
initialised OpenMP pool does not survive a fork); the children set their own thread count.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import select
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

# What a client imports, eagerly: transformers loads model classes lazily, and the method
# plug-ins are resolved at run time (runner/methods/plugins.py), so both would otherwise be
# imported again, privately, in every child.
PRELOAD = ("runner.client", "peft", "transformers.models.llama.modeling_llama",
           "transformers.models.gpt2.modeling_gpt2")


def preload() -> None:
    """Import the client runtime and every built-in method's client hooks."""
    for name in PRELOAD:
        importlib.import_module(name)
    from runner.methods import registry

    for name in registry.names():
        path = registry.get(name).hooks.get("client")
        if path:
            importlib.import_module(path.split(":", 1)[0])


def _child(req: dict[str, Any]) -> None:
    """In the forked child: become ``python -m runner.client`` and never return."""
    rc = 1
    try:
        os.setsid()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        os.close(null)
        os.environ.clear()
        os.environ.update(req["env"])
        os.chdir(req["cwd"])
        sys.argv = ["runner.client", *req["argv"]]
        gc.unfreeze()
        from runner import client

        rc = client.main(req["argv"])
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - the child must report and exit, whatever happened
        traceback.print_exc()
        rc = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(rc)


def _reap(children: dict[int, str]) -> None:
    """Record the exit code of every child that has exited (``<log>.exit``)."""
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            children.clear()
            return
        if pid == 0:
            return
        log = children.pop(pid, None)
        if log is None:
            continue
        code = os.waitstatus_to_exitcode(status)
        out = Path(log + ".exit")
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": pid, "returncode": code}) + "\n")
        os.replace(tmp, out)


def serve(inp: Any = None, out: Any = None) -> int:
    """Answer fork requests until the input ends and the last child has exited."""
    inp = inp or sys.stdin
    out = out or sys.stdout
    preload()
    gc.collect()
    gc.freeze()
    children: dict[int, str] = {}
    fd = inp.fileno()
    buf = b""
    open_input = True
    while open_input or children:
        ready = select.select([fd], [], [], 0.2)[0] if open_input else []
        if not open_input:
            select.select([], [], [], 0.2)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                open_input = False
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if not line.strip():
                    continue
                req = json.loads(line)
                Path(req["log"] + ".exit").unlink(missing_ok=True)
                sys.stdout.flush()
                pid = os.fork()
                if pid == 0:
                    _child(req)
                children[pid] = req["log"]
                out.write(json.dumps({"who": req["who"], "pid": pid}) + "\n")
                out.flush()
        _reap(children)
    return 0


def main() -> int:
    signal.signal(signal.SIGTERM, lambda s, f: sys.exit(143))
    return serve()


if __name__ == "__main__":
    sys.exit(main())

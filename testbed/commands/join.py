"""``testbed join``: this machine takes one client's slot in a running fleet
(testbed/backends/join.py). A module of its own so that a device needs only this command, not the
ones that start fleets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from testbed.console import fail


def join(
    broker: Annotated[str, typer.Option(
        help="The run's broker as this device reaches it, mqtt://HOST:PORT")],
    run_id: Annotated[str, typer.Option(help="The run's id (checked against the file)")],
    client: Annotated[str, typer.Option(
        help="The client slot to take, e.g. client4 (checked against the file)")],
    credentials: Annotated[Path, typer.Option(
        help="The join file `testbed up --join-slot CLIENT` wrote (RUN/join/CLIENT.json), "
             "copied to this device")],
    model: Annotated[str | None, typer.Option(
        help="The model on this device: a local path or Hugging Face id (default: the "
             "run's)")] = None,
    data: Annotated[str | None, typer.Option(
        help="The data on this device (default: the run's path)")] = None,
    workdir: Annotated[Path | None, typer.Option(
        help="Where this device keeps its copy of the run's configuration (default "
             "runs/join-RUN-CLIENT)")] = None,
    device: Annotated[str | None, typer.Option(
        help="Where this device trains: auto (its first CUDA GPU when one is usable, else "
             "its CPU) | cpu | cuda | cuda:N (default: the run's setting, resolved here). "
             "What it sends and receives is the same either way")] = None,
) -> None:
    """Join a running fleet as one of its clients: this device trains that client's part,
    finds its own memory budget (NVML, its cgroup, else the profile's value) and reports it;
    the server treats it as any other client. The log goes to this terminal."""
    from runner.errors import UserError
    from testbed.backends.join import prepare, run_client

    try:
        if device is not None:
            from runner import device as placement

            placement.resolve(device)  # refused here, not in the client's log
        env = prepare(credentials, workdir or Path("runs") / f"join-{run_id}-{client}",
                      broker=broker, run_id=run_id, client=client, model=model, data=data,
                      device=device)
    except UserError as exc:
        fail(str(exc))
        return
    code = run_client(env)
    if code != 0:
        fail(f"the client exited with code {code}")


def register(app: typer.Typer) -> None:
    """Add ``join`` to the ``testbed`` app."""
    app.command()(join)

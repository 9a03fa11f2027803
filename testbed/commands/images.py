"""``testbed images build [--offline]``: the runtime and broker images (testbed/backends/images.py).

A sub-app of its own so image management can grow (list, remove) without touching the run
commands. Errors follow the CLI's rule: one ``error:`` line on stderr, exit code 2.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(help="Container images for the compose backend: build them.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
err = Console(stderr=True)


@app.command()
def build(
    offline: Annotated[bool, typer.Option(
        help="No registry, no index inside the build: debootstrap a Debian base from the "
             "host's apt mirror and install wheels the host downloaded "
             "(images/wheelhouse)")] = False,
    base_image: Annotated[str | None, typer.Option(
        help="BASE_IMAGE of the runtime image (default python:3.11-slim; --offline: "
             "hsplitlora-base:bookworm)")] = None,
    rebuild_base: Annotated[bool, typer.Option(
        help="--offline: debootstrap the base again even if it exists")] = False,
) -> None:
    """Build hsplitlora-testbed:latest (server and clients) and hsplitlora-broker:latest."""
    from runner.errors import UserError
    from testbed.backends.images import build_images

    out = Console()
    try:
        result = build_images(offline=offline, base_image=base_image,
                              rebuild_base=rebuild_base,
                              log=lambda m: out.print(m, highlight=False))
    except UserError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    for tag, base in result.images.items():
        out.print(f"{tag} (FROM {base}) built in {result.seconds[tag]:.0f} s", highlight=False)
    out.print(f"total {result.seconds['total']:.0f} s", highlight=False)

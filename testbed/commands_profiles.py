"""``testbed profiles list|show``: what profiles exist and what one of them says.

A separate typer sub-app (registered at the end of testbed/cli.py) so the profile commands
can grow without touching the training commands. Errors follow the CLI's rule: one
``error:`` line on stderr and exit code 2.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(help="Experiment profiles (profiles/*.yaml): list and show them.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
err = Console(stderr=True)


def _fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@app.command("list")
def list_() -> None:
    """One row per profile: clients, reference and stand-in models, method, budgets."""
    from rich.table import Table

    from runner.errors import UserError
    from testbed.profiles import available_profiles, fmt_bytes, load_profile, profiles_dir

    paths = available_profiles()
    if not paths:
        _fail(f"no profiles in {profiles_dir()} (set $TESTBED_PROFILES or add a .yaml file)")
        return
    table = Table(title=f"profiles in {profiles_dir()}", title_justify="left")
    for col in ("name", "clients", "reference", "stand-in", "method", "budgets", "gpus"):
        table.add_column(col, no_wrap=True)
    table.add_column("description", ratio=1)
    broken: list[str] = []
    for path in paths:
        try:
            p = load_profile(str(path))
        except UserError as exc:
            broken.append(str(exc))
            table.add_row(path.stem, "-", "-", "-", "-", "-", "-", "[red]invalid[/]")
            continue
        mems = [d.memory for d in p.devices]
        budgets = (fmt_bytes(mems[0]) if min(mems) == max(mems)
                   else f"{fmt_bytes(min(mems))} - {fmt_bytes(max(mems))}")
        table.add_row(p.name, str(p.clients), p.experiment.reference_model,
                      p.experiment.standin_model, p.experiment.method, budgets,
                      "yes" if p.uses_gpus else "no", p.description.strip())
    Console().print(table)
    for line in broken:
        err.print(f"[bold yellow]warning:[/] {line}", highlight=False, soft_wrap=True)


@app.command()
def show(
    name: Annotated[str, typer.Argument(help="Profile name (profiles/NAME.yaml) or a path")],
    emulation: Annotated[bool, typer.Option(
        "--emulation", help="Also print the budget mapping onto the stand-in "
                            "(docs/emulation.md); loads the memory model")] = False,
) -> None:
    """Validate one profile and print it (experiment, devices, server)."""
    from runner.errors import UserError
    from testbed.profiles import emulation_map, load_profile, print_emulation, print_profile

    out = Console()
    try:
        profile = load_profile(name)
        print_profile(profile, out)
        if emulation:
            print_emulation(emulation_map(profile), out)
    except UserError as exc:
        _fail(str(exc))

"""``testbed profiles list|show``: what profiles exist and what one of them says.

A separate typer sub-app (registered at the end of testbed/cli.py) so the profile commands
can grow without touching the training commands. Errors follow the CLI's rule: one
``error:`` line on stderr and exit code 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

app = typer.Typer(help="Experiment profiles (profiles/*.yaml): list and show them.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
err = Console(stderr=True)


def _fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _profile_record(path: Path) -> dict[str, Any]:
    """What ``profiles list --json`` says of one profile file."""
    from runner.errors import UserError
    from testbed.profiles import load_profile

    try:
        p = load_profile(str(path))
    except UserError as exc:
        return {"name": path.stem, "path": str(path), "valid": False, "error": str(exc)}
    exp = p.experiment
    mems = [d.memory for d in p.devices]
    return {"name": p.name, "path": str(path), "valid": True, "clients": p.clients,
            "reference_model": exp.reference_model, "standin_model": exp.standin_model,
            "method": exp.method, "steps": exp.steps, "memory_min": min(mems),
            "memory_max": max(mems), "gpus": p.uses_gpus, "description": p.description.strip(),
            "devices": [d.name for d in p.devices]}


@app.command("list")
def list_(
    as_json: Annotated[bool, typer.Option(
        "--json", help="Machine-readable: a JSON list, one object per profile (an invalid "
                       "one has valid: false and its error)")] = False,
) -> None:
    """One row per profile: clients, reference and stand-in models, method, budgets."""
    from rich.table import Table

    from runner.errors import UserError
    from testbed.profiles import available_profiles, fmt_bytes, load_profile, profiles_dir
    from testbed.tables import print_table

    paths = available_profiles()
    if not paths:
        _fail(f"no profiles in {profiles_dir()} (set $TESTBED_PROFILES or add a .yaml file)")
        return
    if as_json:
        typer.echo(json.dumps([_profile_record(path) for path in paths], indent=1))
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
    print_table(Console(), table)
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

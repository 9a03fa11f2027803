"""``testbed experiment run|report|pack``: grids of runs with seeds, and their report.

A typer sub-app (registered in testbed/cli.py) like ``profiles`` and ``images``. Errors
follow the CLI's rule: one ``error:`` line on stderr and exit code 2; a grid with failed
or refused cells ends with exit code 1 after its summary line.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from testbed.console import json_output, print_json
from testbed.options import moved

if TYPE_CHECKING:
    from testbed.experiment.run import Planned

app = typer.Typer(help="Experiments: grids of methods x profiles x seeds x overrides "
                       "(experiments/*.yaml, docs/experiments.md) and their reports.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
err = Console(stderr=True)


def _fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def default_out(name: str) -> Path:
    """Where an experiment runs when --out is not given."""
    return Path("runs") / "experiments" / name


@app.command("run")
@json_output
def run_(
    file: Annotated[Path, typer.Argument(help="Experiment file (experiments/*.yaml)")],
    parallel: Annotated[int, typer.Option(
        help="Cells run at once (each a process; torch threads = CPUs / N unless the file's "
             "resources.threads says otherwise)")] = 1,
    out: Annotated[Path | None, typer.Option(
        help="Experiment directory (default runs/experiments/<name>); rerun the same command "
             "to resume")] = None,
    memory: Annotated[str | None, typer.Option(
        help="Memory the cells may use together, e.g. 12GB (default: the file's "
             "resources.memory, else what is available now)")] = None,
    rerun_changed: Annotated[bool, typer.Option(
        help="Train (or score) again the finished cells whose configuration the file "
             "changed")] = False,
    dry_run: Annotated[bool, typer.Option(
        help="List the cells, their state and memory estimates; run nothing")] = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the cells and their outcome (with --dry-run: their plan) as "
                       "one JSON object on stdout (progress and lines for people go to "
                       "stderr)")] = False,
    device: Annotated[str | None, typer.Option(
        help="Where every cell trains and is scored: auto (the first CUDA GPU when one is "
             "usable, else the CPU) | cpu | cuda | cuda:N (default: each cell's own, the "
             "file's settings.device, else auto). Not part of a cell's configuration: "
             "finished cells are kept when it changes")] = None,
) -> None:
    """Run every unfinished cell of an experiment (resumable: finished cells are skipped,
    a killed one starts again)."""
    import tempfile

    from runner.errors import UserError
    from testbed.experiment import run as ER
    from testbed.experiment.spec import load_experiment

    if parallel < 1:
        _fail(f"--parallel must be >= 1, got {parallel}")
    console = Console()
    try:
        if device is not None:
            from runner import device as placement

            placement.resolve(device)  # a bad or unusable --device fails before any cell
        exp = load_experiment(file)
        target = out or default_out(exp.name)
        budget = None
        if memory is not None:
            from testbed.profiles import parse_bytes

            try:
                budget = parse_bytes(memory)
            except ValueError as exc:
                raise UserError(f"--memory: {exc}") from None
        if dry_run:
            from rich.table import Table

            from testbed.experiment.memory import cpu_count
            from testbed.tables import print_table

            with tempfile.TemporaryDirectory() as tmp:
                planned = ER.plan(exp, target, threads=max(1, cpu_count() // parallel),
                                  rerun_changed=True, devices_dir=Path(tmp), dry_run=True,
                                  device=device)
            if as_json:
                print_json({"experiment": exp.name, "dir": target, "dry_run": True,
                            "cells": [{**_cell_record(p), "state": "finished"
                                       if p.status == "done" else "to run"}
                                      for p in planned]})
                return
            table = Table(title=f"experiment {exp.name}: {len(planned)} cells in {target}",
                          title_justify="left")
            for col in ("cell", "method", "profile", "override", "seed", "state",
                        "memory (estimate)"):
                table.add_column(col, justify="right" if col.startswith("memory") else "left")
            for row in ER.dry_run_rows(planned):
                table.add_row(*row)
            print_table(console, table)
            return
        outcome = ER.run(exp, target, parallel=parallel, console=console,
                         rerun_changed=rerun_changed, memory_bytes=budget, device=device)
    except UserError as exc:
        _fail(str(exc))
        return
    bad = outcome.count("failed") + outcome.count("refused")
    finished = outcome.count("finished") + outcome.count("done")
    if as_json:
        statuses = ("finished", "done", "failed", "refused", "pending")
        print_json({"experiment": exp.name, "dir": target, "dry_run": False,
                    "cells": [{**_cell_record(p), "status": p.status, "note": p.note}
                              for p in outcome.cells],
                    "counts": {k: outcome.count(k) for k in statuses},
                    "interrupted": outcome.interrupted,
                    "report": f"testbed experiment report {target}"})
    console.print(f"experiment {exp.name}: {finished}/{len(outcome.cells)} cells finished "
                  f"({outcome.count('done')} skipped, {outcome.count('failed')} failed, "
                  f"{outcome.count('refused')} refused) in {target}; report: testbed experiment "
                  f"report {target}", highlight=False, markup=False, soft_wrap=True)
    if outcome.interrupted:
        raise typer.Exit(130)
    if bad:
        raise typer.Exit(1)


def _cell_record(p: Planned) -> dict[str, Any]:
    """What ``experiment run --json`` says of one planned cell."""
    return {"id": p.id, "method": p.cell.method, "profile": p.cell.profile,
            "override": p.cell.override, "seed": p.cell.seed, "dir": p.dir,
            "estimate_bytes": p.estimate}


@app.command()
@json_output
def report(
    directory: Annotated[Path, typer.Argument(help="Experiment directory (experiment run --out)")],
    report_file: Annotated[Path | None, typer.Option(
        "--report-file", "-o", help="Markdown file (default DIR/report.md); figures go to "
                                    "<stem>_figures/, tables to <stem>_tables/")] = None,
    target_ppl: Annotated[float | None, typer.Option(
        "--target-ppl", help="Target validation PPL for time to target (default: the "
                             "file's report.target_ppl, else per setting the largest mean "
                             "final PPL of its methods)")] = None,
    baseline: Annotated[str | None, typer.Option(
        help="Method speed-ups are relative to (default: the file's report.baseline, else "
             "the first method)")] = None,
    old_out: Annotated[str | None, typer.Option("--out", hidden=True)] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the report's path and figures as one JSON object on "
                       "stdout")] = False,
) -> None:
    """Tables (mean and 95 % confidence interval over seeds) and figures (mean with a band,
    each seed a thin line) from the cells' metrics, events, summaries and scores only."""
    from analysis.experiment_report import write_experiment_report
    from runner.errors import UserError
    from testbed.console import load_warnings as _load_warnings
    from testbed.console import quiet_libraries as _quiet_libraries

    if old_out is not None:
        _fail(moved("--out", "--report-file FILE (-o FILE)", "the report file"))
    _quiet_libraries()
    try:
        with _load_warnings() as warned:
            from analysis.experiment import load_experiment_dir

            exp = load_experiment_dir(directory)
        path, figures = write_experiment_report(exp, report_file or directory / "report.md",
                                                target_ppl, baseline, warned)
    except UserError as exc:
        _fail(str(exc))
        return
    if as_json:
        print_json({"experiment_dir": directory, "report": path, "figures": figures,
                    "warnings": warned})
        return
    typer.echo(str(path))
    for fig in figures:
        typer.echo(str(fig))


@app.command()
def pack(
    directory: Annotated[Path, typer.Argument(help="Experiment directory")],
    dest: Annotated[Path, typer.Argument(help="Where to copy the compact files (new or empty)")],
) -> None:
    """Copy only what the report reads (manifest, cells' config, metrics, events, summary,
    scores; no adapters or model weights) into DEST, e.g. to commit it."""
    from analysis.experiment import pack_experiment
    from runner.errors import UserError

    try:
        files, size = pack_experiment(directory, dest)
    except UserError as exc:
        _fail(str(exc))
        return
    typer.echo(f"{files} files, {size / 1e6:.2f} MB, in {dest}; regenerate the report with: "
               f"testbed experiment report {dest}")

"""``testbed scenario run``: several faults in one distributed run (testbed/scenario.py).

A sub-app of its own, like ``images`` and ``experiment``: the scenario driver starts and
disturbs a whole fleet, which the plain run commands (``up``, ``inject``) leave to the user.
Errors follow the CLI's rule: one ``error:`` line on stderr, exit code 2; a run whose
exactly-once audit fails exits with 1 after printing it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from testbed.console import json_output, print_json
from testbed.options import OUT_HELP

app = typer.Typer(help="Fault scenarios (scenarios/*.yaml): faults combined in one run.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


@app.command()
@json_output
def run(
    scenario: Annotated[str, typer.Argument(
        help="Scenario name (scenarios/NAME.yaml) or path")],
    profile: Annotated[str, typer.Option(help="Profile name or path (its fleet and "
                                              "experiment)")] = "smoke",
    out: Annotated[Path, typer.Option(help=OUT_HELP)] = Path("runs/scenario"),
    steps: Annotated[int | None, typer.Option(
        help="Training steps (default: the scenario's, else the profile's)")] = None,
    seed: Annotated[int, typer.Option(help="Random seed (data, adapters, dropout draws)")] = 0,
    data: Annotated[str | None, typer.Option(
        help="E2E CSV, release directory or 'synthetic' (default: the profile's)")] = None,
    eval_max_examples: Annotated[int | None, typer.Option(
        help="Validation examples per evaluation (default: the profile's)")] = None,
    fault_free: Annotated[bool, typer.Option(
        help="The same run without dropout or faults (the baseline to compare with)")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run in --out")] = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the summary (final PPL, the exactly-once audit) as one JSON "
                       "object on stdout (lines for people go to stderr)")] = False,
    # the name before it matched train's and up's --eval-max-examples; hidden, still taken
    eval_examples: Annotated[int | None, typer.Option("--eval-examples", hidden=True)] = None,
) -> None:
    """Run a profile's fleet on the local backend with the scenario's per-round dropout and
    faults; print the final validation PPL and the exactly-once audit."""
    from analysis.audit import audit_lines
    from runner.errors import UserError
    from testbed.console import fail, quiet_libraries
    from testbed.scenario import load_scenario, run_scenario

    quiet_libraries()
    console = Console(soft_wrap=True)
    if eval_examples is not None and eval_max_examples not in (None, eval_examples):
        fail("--eval-examples is the old name of --eval-max-examples; give one of them")
    eval_max_examples = eval_max_examples if eval_max_examples is not None else eval_examples
    try:
        sc = load_scenario(scenario)
        summary = run_scenario(profile, sc, out, steps=steps, seed=seed,
                               fault_free=fault_free, overwrite=overwrite, data=data,
                               eval_examples=eval_max_examples,
                               say=lambda m: console.print(m, highlight=False, markup=False))
    except UserError as exc:
        fail(str(exc))
        return
    if as_json:
        print_json({"run": out, **summary})
    else:
        console.print(f"pretrained val PPL {summary['pretrained_val_ppl']:.4f} -> final "
                      f"{summary['final_val_ppl']:.4f}; run written to {out}", highlight=False)
        for line in audit_lines(summary["audit"]):
            console.print(line, highlight=False, markup=False)
    if not summary["audit"]["ok"]:
        raise typer.Exit(1)

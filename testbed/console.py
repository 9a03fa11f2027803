"""What every `testbed` command shares on the terminal: the stderr console, the one-line
user error (exit 2), the progress bar, quiet libraries and the analysis loader's warnings.

Why a module of its own: the sub-command modules (testbed/commands/) and the experiment
cell (testbed/experiment/cell.py) need these too; kept in testbed/cli.py, which registers
those modules, they made import cycles.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stdout
from pathlib import PurePath
from typing import Any, TextIO, TypeVar

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

err = Console(stderr=True)


def quiet_libraries() -> None:
    """Keep transformers' own progress bars and warnings out of our output."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # the GGUF conversion draws a tqdm bar of its own: carriage returns in a piped log
    os.environ.setdefault("TQDM_DISABLE", "1")
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)


def fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


# Where print_json writes while a --json command runs: stdout as it was before the command
# pointed sys.stdout at stderr (json_output).
_json_stdout: list[TextIO] = []
F = TypeVar("F", bound=Callable[..., Any])


def json_output(command: F) -> F:
    """Give a command with an ``as_json`` parameter a clean stdout for its ``--json``.

    Why: a script reads ``--json`` with one ``json.loads`` of stdout, so the command's lines
    for people (the precision, the data protocol, the summary, lines printed by code it calls)
    must not land there. With ``as_json`` true, ``sys.stdout`` is stderr while the command
    runs (every Console() and echo follows it) and :func:`print_json` writes the one object
    to the real stdout. Progress bars already draw on stderr.
    """
    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not kwargs.get("as_json"):
            return command(*args, **kwargs)
        _json_stdout.append(sys.stdout)
        try:
            with redirect_stdout(sys.stderr):
                return command(*args, **kwargs)
        finally:
            _json_stdout.pop()

    return wrapper  # type: ignore[return-value]


def jsonable(value: Any) -> Any:
    """``value`` as strict JSON data: paths as strings, NaN and infinities as null, numpy
    scalars as numbers, tuples as lists."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [jsonable(v) for v in value]
    if isinstance(value, PurePath):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalar
        try:
            value = value.item()
        except (TypeError, ValueError):
            return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def print_json(doc: dict[str, Any]) -> None:
    """Write the command's one JSON object to stdout (the real one under --json)."""
    out = _json_stdout[-1] if _json_stdout else sys.stdout
    out.write(json.dumps(jsonable(doc), indent=1, allow_nan=False) + "\n")
    out.flush()


@contextmanager
def progress() -> Iterator[Progress]:
    """A progress bar on stderr; erased when a user error ends the command, so that the
    one ``error:`` line is all a failed command leaves on stderr."""
    from runner.errors import UserError

    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=False,
    )
    user_error = False
    bar.start()
    try:
        yield bar
    except UserError:
        user_error = True
        raise
    finally:
        if user_error:  # erase the bar, and skip the blank line Progress.stop() prints
            bar.live.transient = True
            bar.live.stop()
        else:
            bar.stop()


@contextmanager
def load_warnings() -> Iterator[list[str]]:
    """Collect the analysis loader's warnings (a truncated last record of a killed run).

    ``quiet_libraries`` silences UserWarning, and these must not be silenced: a curve
    missing its last point should say so. They are printed as ``warning:`` lines on stderr
    when the block ends (and the report repeats them).
    """
    import warnings

    from analysis.load import TruncatedRecordWarning

    messages: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TruncatedRecordWarning)
        try:
            yield messages
        finally:
            messages.extend(str(w.message) for w in caught
                            if issubclass(w.category, TruncatedRecordWarning))
    for message in messages:
        err.print(f"[bold yellow]warning:[/] {message}", highlight=False, soft_wrap=True)

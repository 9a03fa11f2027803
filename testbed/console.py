"""What every `testbed` command shares on the terminal: the stderr console, the one-line
user error (exit 2), the progress bar, quiet libraries and the analysis loader's warnings.

Why a module of its own: the sub-command modules (testbed/commands/) and the experiment
cell (testbed/experiment/cell.py) need these too; kept in testbed/cli.py, which registers
those modules, they made import cycles.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

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

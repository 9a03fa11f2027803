"""Tables that survive a pipe.

On a terminal rich fits a table to the window, cutting cells to ``hetero-l…`` where it must.
Anywhere else (``| cat``, ``> file``, a captured test) there is no window to fit and a cut
value is lost for good, so :func:`print_table` lays the table out at its natural width
instead: every cell whole, one row per line, whatever ``$COLUMNS`` says.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

WIDE = 100_000  # "no limit" for measuring


def natural_width(console: Console, renderable: RenderableType) -> int:
    """Cells the renderable takes when nothing is wrapped or cut (its title included)."""
    from rich.measure import Measurement

    width = Measurement.get(console, console.options.update_width(WIDE), renderable).maximum
    title = getattr(renderable, "title", None)
    if title:
        width = max(width, console.render_str(title).cell_len
                    if isinstance(title, str) else len(str(title)))
    return width


def print_table(console: Console, table: RenderableType) -> None:
    """Print ``table``: fitted to a terminal, at its natural width anywhere else."""
    if console.is_terminal:
        console.print(table)
        return
    need = natural_width(console, table)
    if need <= console.width:
        console.print(table)
        return
    saved = console._width  # rich has no public way back to "auto" after the setter
    console.width = need
    try:
        console.print(table)
    finally:
        console._width = saved

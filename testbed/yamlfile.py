"""Reading a user's YAML file (profiles, experiments) with one-line errors.

Why shared: a profile and an experiment file fail the same ways (unreadable, not YAML), and
a user should see the same line for both: the file, the line number, the parser's problem.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def read_yaml(path: Path, where: str, error: type[Exception]) -> tuple[Any, str]:
    """(parsed document, text) of ``path``; ``error(one line)`` when it cannot be read or
    parsed (``where`` names the file in that line)."""
    try:
        text = path.read_text()
        return yaml.safe_load(text), text
    except OSError as exc:
        raise error(f"{where}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise error(f"{where}: not valid YAML{at}: {problem}") from None

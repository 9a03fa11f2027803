"""Errors that mean "the user gave us something wrong", as opposed to a bug.

The CLI turns a :class:`UserError` into one line on stderr and exit code 2, without a
traceback (DEVELOPERS.md: "Bad input gets a clear error"). Code deep in ``runner`` raises
these where it can say what is wrong *and how to fix it*; everything else is a bug and
keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: one line that says what is wrong and how to fix it."""


class DataError(UserError):
    """A data file is missing, unreadable or has the wrong columns."""


class ModelError(UserError):
    """A model id or path cannot be resolved or loaded."""


class ConfigError(UserError):
    """A configuration value is out of range (split point, rank, method, ...)."""

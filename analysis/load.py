"""Read run directories (docs/run-format.md) into tidy pandas DataFrames.

Why a reader of our own instead of ``runner.rundir.read_jsonl``: analysis runs on runs that
are still being written or were killed mid-way, and the user must be *told* when a record was
dropped (a silently shorter curve looks like a real result). So a truncated last line is
skipped with a :class:`TruncatedRecordWarning`; anything else that is not JSON is a
:class:`~runner.errors.UserError` naming the file and line. ``analysis`` only reads files: it
imports ``runner.errors`` and ``runner.rundir`` (both torch-free) and nothing that loads torch.

Frames (one row per ...):

- ``metrics``: record of ``metrics.jsonl`` (+ ``run``, ``method``, ``label``)
- ``events``: event of ``events.jsonl`` (+ ``run``, ``method``, ``label``)
- ``config``: run; the ``train`` config flattened, plus model, data sizes and versions
- ``scores``: evaluated run (``eval/scores.json``): BLEU, NIST, METEOR, ROUGE_L, CIDEr, SER
  (slot error rate, %; NaN for runs evaluated before it existed; per attribute in
  ``Run.scores["slot_errors"]``)
- ``summary``: run with a ``summary.json`` (killed runs have none)
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from runner.errors import UserError

CONFIG = "config.json"
METRICS = "metrics.jsonl"
EVENTS = "events.jsonl"
SUMMARY = "summary.json"
SCORES = "eval/scores.json"
SCORE_NAMES = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr", "SER")
ID_COLUMNS = ("run", "method", "label")


class TruncatedRecordWarning(UserWarning):
    """A JSONL file ends in a partial record (the writer was killed); the record was skipped."""


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a JSONL file; a missing file is an empty list.

    Only the last line may be broken: the writer appends one whole record per ``write`` and
    flushes, so a kill leaves at most a truncated tail. That line is skipped with a
    :class:`TruncatedRecordWarning`. A broken line anywhere else means the file was damaged
    some other way, and guessing would hide it: :class:`UserError`.
    """
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):
                warnings.warn(
                    f"{path}: skipped the truncated last line {number} (run killed mid-write?)",
                    TruncatedRecordWarning, stacklevel=2)
                continue
            raise UserError(f"{path} line {number} is not valid JSON ({exc.msg}); only a "
                            "truncated last line is tolerated") from None
        if not isinstance(record, dict):
            raise UserError(f"{path} line {number} is not a JSON object")
        rows.append(record)
    return rows


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object file, or None when it is absent (a killed or unevaluated run)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} does not hold a JSON object")
    return data


@dataclass
class Run:
    """One run directory as read from disk (raw records, not yet frames)."""

    path: Path
    name: str
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    events: list[dict[str, Any]]
    summary: dict[str, Any] | None = None
    scores: dict[str, Any] | None = None

    @property
    def method(self) -> str:
        """The training method (``config.json``'s ``train.method``)."""
        return str(self.config.get("train", {}).get("method", "unknown"))


def _runs_below(path: Path) -> list[Path]:
    """Run directories directly under ``path``, for the hint in the not-a-run error."""
    try:
        return sorted(p for p in path.iterdir() if (p / CONFIG).is_file())
    except OSError:
        return []


def _host_config(path: Path) -> dict[str, Any]:
    """config.json with a container run's paths mapped to the host (runner.rundir)."""
    from runner.rundir import read_config

    try:
        return read_config(path)
    except (OSError, ValueError):
        return _read_json(path / CONFIG) or {}


def load_run(path: str | Path, name: str | None = None) -> Run:
    """Read one run directory; only ``config.json`` is required.

    Raises:
        UserError: the path does not exist, or is not a run directory (one line, with the
            runs it holds when it is a parent of runs, e.g. ``runs/``).
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; pass a run directory written by "
                        "`testbed train --out DIR`")
    if not (path / CONFIG).is_file():
        below = _runs_below(path) if path.is_dir() else []
        hint = (f"; it holds runs, pass them instead: {' '.join(str(p) for p in below[:6])}"
                if below else "; pass a directory written by `testbed train --out DIR`")
        raise UserError(f"{path} is not a run directory (no {CONFIG}){hint}")
    config = _host_config(path)
    scores = _read_json(path / SCORES)
    return Run(
        path=path,
        name=name or path.resolve().name,
        config=config,
        metrics=read_jsonl(path / METRICS),
        events=read_jsonl(path / EVENTS),
        summary=_read_json(path / SUMMARY),
        scores=scores,
    )


def _unique_names(paths: Sequence[Path]) -> list[str]:
    """Run names: the directory name, with parents prepended until the names are unique.

    ``runs/a/latest`` and ``runs/b/latest`` become ``a/latest`` and ``b/latest``, so
    legends and tables never merge two runs that happen to share a leaf name.
    """
    parts = [p.resolve().parts for p in paths]
    depth = 1
    while True:
        names = ["/".join(pp[-depth:]) for pp in parts]
        if len(set(names)) == len(names) or depth >= max(len(pp) for pp in parts):
            return names
        depth += 1


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts become dotted keys; lists become tuples (hashable, so groupby works)."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        elif isinstance(value, list):
            out[name] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        else:
            out[name] = value
    return out


def _frame(rows: list[dict[str, Any]], first: Iterable[str]) -> pd.DataFrame:
    """A DataFrame with the identifying columns first, the rest sorted by name."""
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=list(first))
    lead = [c for c in first if c in df.columns]
    rest = sorted(c for c in df.columns if c not in lead)
    df = df[lead + rest]
    # A JSON integer field that some rows lack (split of a non-split run) would turn float;
    # keep it integral with pandas' nullable Int64 so "k=2" never prints as "2.0".
    for col in df.columns:
        values = [row[col] for row in rows if row.get(col) is not None]
        if (values and len(values) < len(rows)
                and all(isinstance(v, int) and not isinstance(v, bool) for v in values)):
            df[col] = df[col].astype("Int64")
    return df


@dataclass
class RunSet:
    """Several runs and their tidy frames; ``label`` names a run in figures and tables.

    Design choice: a run's label is its method when every run has a different method (the
    usual comparison), else ``method (run)``, so seeds of one method stay apart.
    """

    runs: list[Run]
    metrics: pd.DataFrame = field(init=False)
    events: pd.DataFrame = field(init=False)
    config: pd.DataFrame = field(init=False)
    scores: pd.DataFrame = field(init=False)
    summary: pd.DataFrame = field(init=False)

    def __post_init__(self) -> None:
        methods = [r.method for r in self.runs]
        unique = len(set(methods)) == len(methods)
        self.labels: dict[str, str] = {
            r.name: r.method if unique else f"{r.method} ({r.name})" for r in self.runs}
        ids = {r.name: {"run": r.name, "method": r.method, "label": self.labels[r.name]}
               for r in self.runs}
        self.metrics = _frame([{**ids[r.name], **m} for r in self.runs for m in r.metrics],
                              (*ID_COLUMNS, "kind", "step", "client", "wall_time"))
        self.events = _frame([{**ids[r.name], **e} for r in self.runs for e in r.events],
                             (*ID_COLUMNS, "event", "step", "client", "wall_time", "time"))
        self.config = _frame([{**ids[r.name], **config_row(r)} for r in self.runs],
                             (*ID_COLUMNS, "path"))
        self.scores = _frame(
            [{**ids[r.name], **{k: (r.scores.get("scores") or {}).get(k) for k in SCORE_NAMES},
              "test_mrs": (r.scores.get("extra") or {}).get("test_mrs")}
             for r in self.runs if r.scores is not None], (*ID_COLUMNS, *SCORE_NAMES))
        self.summary = _frame([{**ids[r.name], **r.summary} for r in self.runs
                               if r.summary is not None], ID_COLUMNS)
        # ``method`` in the summary duplicates the config's; keep the config's (always there).

    @property
    def names(self) -> list[str]:
        """Run names in the order they were given."""
        return [r.name for r in self.runs]

    @property
    def methods(self) -> list[str]:
        """Distinct methods in the order they first appear."""
        return list(dict.fromkeys(r.method for r in self.runs))

    def run(self, name: str) -> Run:
        """The run called ``name``."""
        for r in self.runs:
            if r.name == name:
                return r
        raise KeyError(name)


def config_row(run: Run) -> dict[str, Any]:
    """One run's configuration: the train config flattened, plus model and data facts."""
    c = run.config
    row: dict[str, Any] = {"path": str(run.path)}
    row.update(_flatten(c.get("train", {})))
    for key in ("model_path", "model_family", "num_layers", "data_source"):
        row[key] = c.get(key)
    for split, size in (c.get("data_sizes") or {}).items():
        row[f"data_{split}"] = size
    sizes = c.get("client_sizes")
    row["client_sizes"] = tuple(sizes) if isinstance(sizes, list) else sizes
    row.update(_flatten(c.get("versions") or {}, "version."))
    return row


def load_runs(paths: Iterable[str | Path]) -> RunSet:
    """Read run directories into a :class:`RunSet` (frames built once, here).

    Raises:
        UserError: no path was given, or one of them is not a run directory.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise UserError("no run directory given; pass one or more directories written by "
                        "`testbed train --out DIR`")
    names = _unique_names(paths)
    return RunSet([load_run(p, n) for p, n in zip(paths, names, strict=True)])


def finite(value: Any) -> bool:
    """True for a real, finite number (JSON ``null`` and NaN are 'not measured')."""
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False

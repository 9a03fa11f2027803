"""The run directory: config snapshot, append-only metrics and events, adapters, eval outputs.

Layout and record fields are documented in docs/run-format.md; keep the two in step.
Records are JSON Lines written with one ``write`` + ``flush`` per record, so a run killed
mid-way leaves at worst one truncated last line (analysis skips it with a warning).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from runner.errors import UserError

CONFIG = "config.json"
METRICS = "metrics.jsonl"
EVENTS = "events.jsonl"
ADAPTERS = "adapters"
EVAL = "eval"
SUMMARY = "summary.json"
HOST_PATHS = "host-paths.json"
# The run directory's own path inside a container (testbed/backends/compose.py mounts it there).
RUN_MOUNT = "/run/testbed"
# What the host tells a running fleet through the run directory (every process sees it,
# containers through the mount): ``inject/CLIENT.budget`` (`testbed inject budget`),
# ``CLIENT.disconnect`` (`testbed inject dropout --mode disconnect`), ``CLIENT.ended`` (the
# watcher saw the client's container OOM-killed: the server does not wait for it to join).
INJECT = "inject"


def injected(path: Path, client: str, what: str) -> Path:
    """``RUN/inject/CLIENT.WHAT``, the file the host writes for ``client`` (see INJECT)."""
    return Path(path) / INJECT / f"{client}.{what}"


def write_injected(path: Path, client: str, what: str, text: str) -> Path:
    """Write ``RUN/inject/CLIENT.WHAT`` atomically (a reader never sees half of it)."""
    target = injected(path, client, what)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, target)
    return target


def clear_injected(path: Path) -> None:
    """Forget what the host told an earlier run in this directory (``--overwrite``): a budget
    or an ended client left there would apply to the new run."""
    shutil.rmtree(Path(path) / INJECT, ignore_errors=True)


def _clean(value: Any) -> Any:
    """JSON-safe values: NaN/Inf become None (JSON has no such numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def to_host(value: Any, mounts: dict[str, str]) -> Any:
    """``value`` with every path under a container mount point rewritten to its host path.

    Why: a run made in containers records the paths its server saw (``/data/devset.csv``,
    ``/cache/models/...``, ``/run/testbed``); read from the host, those paths do not exist.
    Strings are matched by whole path components, longest mount first, so ``/database`` is
    not taken for ``/data``.
    """
    if isinstance(value, dict):
        return {k: to_host(v, mounts) for k, v in value.items()}
    if isinstance(value, list):
        return [to_host(v, mounts) for v in value]
    if isinstance(value, str) and value.startswith("/"):
        for inside in sorted(mounts, key=len, reverse=True):
            if value == inside or value.startswith(inside.rstrip("/") + "/"):
                return mounts[inside] + value[len(inside.rstrip("/")):]
    return value


def host_mounts(path: Path) -> dict[str, str]:
    """Container mount point -> host path for the run in ``path`` ({} for a run made on the
    host). The run directory maps to wherever it is now, so a moved run still resolves."""
    try:
        doc = json.loads((Path(path) / HOST_PATHS).read_text())
    except (OSError, ValueError):
        return {}
    mounts = {str(k): str(v) for k, v in (doc.get("mounts") or {}).items()}
    mounts[str(doc.get("run_mount", RUN_MOUNT))] = str(Path(path).resolve())
    return mounts


def read_config(path: Path) -> dict[str, Any]:
    """``config.json`` of the run in ``path`` with container paths mapped to host paths
    (``host-paths.json``, written by the compose backend); the paths as the containers saw
    them stay under ``container_paths``.

    Every string under a mount point is mapped, wherever it sits, so the data protocol's file
    paths (``train.data_protocol``: source, train, validation, test; runner/dataset/splits.py)
    resolve on the host like ``train.data`` does."""
    raw = json.loads((Path(path) / CONFIG).read_text())
    mounts = host_mounts(path)
    if not mounts:
        return raw
    mapped = to_host(raw, mounts)
    mapped["container_paths"] = {k: raw[k] for k in ("model_path", "data_source") if k in raw}
    train = raw.get("train", {})
    seen = mapped["container_paths"]["train"] = {k: train.get(k) for k in ("data", "devices")}
    if "data_protocol" in train:  # runs made before issue 12 have none
        seen["data_protocol"] = train["data_protocol"]
    return mapped


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (temp file + rename) so a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_clean(data), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


class RunDir:
    """A run directory being written by a trainer (or read back by eval)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.t0 = time.monotonic()

    @classmethod
    def create(cls, path: Path, config: dict[str, Any], *, overwrite: bool = False) -> RunDir:
        """Start a new run; refuse to mix two runs in one directory."""
        path = Path(path)
        if (path / CONFIG).exists() and not overwrite:
            raise UserError(
                f"run directory {path} already holds a run; choose another --out or pass "
                "--overwrite"
            )
        path.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for name in (METRICS, EVENTS, SUMMARY):
                (path / name).unlink(missing_ok=True)
        run = cls(path)
        write_json(path / CONFIG, config)
        return run

    @classmethod
    def open(cls, path: Path) -> RunDir:
        path = Path(path)
        if not (path / CONFIG).is_file():
            raise UserError(f"{path} is not a run directory (no {CONFIG}); pass a path under runs/")
        return cls(path)

    def config(self) -> dict[str, Any]:
        """The config snapshot, with paths as the host sees them (:func:`read_config`)."""
        return read_config(self.path)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def _append(self, name: str, record: dict[str, Any]) -> None:
        line = json.dumps(_clean(record), sort_keys=True) + "\n"
        with open(self.path / name, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()

    def metric(self, **record: Any) -> None:
        """One metrics record; ``wall_time`` (s since the run started) is added if absent."""
        record.setdefault("wall_time", round(self.elapsed(), 4))
        self._append(METRICS, record)

    def event(self, kind: str, **fields: Any) -> None:
        """One event (run started, aggregation, dropout, ...), timestamped."""
        self._append(EVENTS, {"event": kind, "time": time.time(),
                              "wall_time": round(self.elapsed(), 4), **fields})

    def adapters(self, name: str = "final") -> Path:
        return self.path / ADAPTERS / name

    def eval_dir(self) -> Path:
        d = self.path / EVAL
        d.mkdir(exist_ok=True)
        return d

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json(self.path / SUMMARY, summary)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a JSONL file; a truncated *last* line (killed writer) is skipped."""
    rows: list[dict[str, Any]] = []
    if not path.exists():
        return rows
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                continue
            raise
    return rows

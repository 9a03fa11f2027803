"""Live view of a run while `testbed up` follows it: a table of clients that updates in place.

The view is a pure fold of the run directory's records (``metrics.jsonl``) and events
(``events.jsonl``, docs/run-format.md) into a :class:`LiveState`, so it is tested on the
files of a real run and shows the same thing whether the run is in-process or distributed.
It shows each client's measured peak memory against its budget (the memory model's plan
where nothing was measured) and an ETA from the steps done and their wall time.
:class:`JsonlTail` reads the files incrementally (it keeps its offset and leaves a partial
last line for the next read); :func:`render` turns a state into a rich renderable;
:func:`follow` drives both: ``rich.live.Live`` on a terminal, plain log lines (one per
finished step and one per event) otherwise.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

# events worth one plain line (aggregations and the rest are visible in the table)
LOGGED_EVENTS = ("client_joined", "client_not_awaited", "client_offline", "client_online",
                 "reconfigure", "budget_violation", "budget_exceeded", "split_moved",
                 "step_skipped", "server_resumed", "message_rejected", "run_finished")
BUDGET_EVENTS = ("client_budget", "budget_changed", "armsc_budget")


@dataclass
class ClientView:
    """One client's row."""

    name: str
    state: str = "online"
    split: int | None = None
    rank: int | None = None  # uniform LoRA rank (homogeneous methods)
    rank_sum: int | None = None  # from reconfigure events (heterogeneous methods)
    last_step: int | None = None
    loss: float | None = None
    memory_bytes: int | None = None  # measured peak (records: docs/run-format.md)
    memory_source: str | None = None  # cgroup | rss | nvml | cuda
    planned_bytes: int | None = None  # the memory model's plan (reconfigure events)
    budget_bytes: int | None = None
    bytes_moved: int = 0  # sent + received (wire bytes when the records carry them)


@dataclass
class LiveState:
    """Everything the view shows; built by :func:`fold` only."""

    method: str | None = None
    steps: int | None = None
    split: int | None = None
    rank: int | None = None
    step: int = 0  # steps finished (highest train step seen + 1)
    val_ppl: float | None = None
    wall_time: float = 0.0
    bytes_moved: int = 0  # clients' train traffic + aggregations
    finished: bool = False
    clients: dict[str, ClientView] = field(default_factory=dict)
    logged_step: int = -1  # highest step that has its plain line
    step_losses: dict[int, list[float]] = field(default_factory=dict)
    first_step: tuple[int, float] | None = None  # (step, wall_time) of the first train record
    last_step: tuple[int, float] | None = None  # ... and of the latest step's

    def client(self, name: str) -> ClientView:
        if name not in self.clients:
            self.clients[name] = ClientView(name, split=self.split, rank=self.rank)
        return self.clients[name]


def initial_state(config: dict[str, Any] | None = None, steps: int | None = None) -> LiveState:
    """A state seeded from ``config.json`` (method, steps, split, rank, client ids)."""
    config = config or {}
    train = config.get("train") or {}
    state = LiveState(method=train.get("method"), steps=steps or train.get("steps"),
                      split=train.get("split"), rank=train.get("rank"))
    for name in (config.get("runtime") or {}).get("clients") or []:
        state.client(str(name))
    return state


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) else None


def _fmt_ppl(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def eta(state: LiveState) -> float | None:
    """Seconds until the last step is done, at the mean wall time per step so far
    (evaluations and aggregations included, as they recur); None before two steps were
    seen, without a step count, or once finished."""
    if state.finished or not state.steps or state.first_step is None \
            or state.last_step is None:
        return None
    (k0, t0), (k1, t1) = state.first_step, state.last_step
    if k1 <= k0:
        return None
    return max(0.0, (t1 - t0) / (k1 - k0) * (state.steps - (k1 + 1)))


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _step_line(state: LiveState, step: int) -> str:
    losses = state.step_losses.pop(step, [])
    total = f"/{state.steps}" if state.steps else ""
    line = f"step {step} done ({step + 1}{total})"  # 0-based, like the events' steps
    if losses:
        line += f": loss {sum(losses) / len(losses):.4f} ({len(losses)} clients)"
    if state.val_ppl is not None:
        line += f", val PPL {state.val_ppl:.2f}"
    left = eta(state)
    if left is not None and step + 1 < (state.steps or 0):
        line += f", ETA {_fmt_duration(left)}"
    return line


def _finish_steps(state: LiveState, through: int, lines: list[str]) -> None:
    """Plain lines for every step up to ``through`` not yet logged."""
    for step in range(state.logged_step + 1, through + 1):
        if step in state.step_losses:
            lines.append(_step_line(state, step))
    state.logged_step = max(state.logged_step, through)


def _event_line(e: dict[str, Any]) -> str:
    name = e.get("event", "?")
    parts = [f"step {e['step']}:" if "step" in e else "", name]
    for key in ("client", "reason", "detail", "old", "new"):
        if e.get(key) not in (None, ""):
            parts.append(f"{key}={e[key]}" if key in ("old", "new") else str(e[key]))
    if name == "run_finished" and e.get("final_val_ppl") is not None:
        parts.append(f"final val PPL {e['final_val_ppl']:.2f}")
    return " ".join(p for p in parts if p)


def fold(state: LiveState, records: Iterable[dict[str, Any]] = (),
         events: Iterable[dict[str, Any]] = ()) -> tuple[LiveState, list[str]]:
    """The state after ``records`` and ``events`` (a new object; ``state`` is unchanged) and
    the plain log lines they produce: one per finished step, one per notable event.

    A step is finished when a later step's record, an evaluation or aggregation at a later
    step count, or ``run_finished`` arrives (the records of one step may span two reads)."""
    s = copy.deepcopy(state)
    lines: list[str] = []
    for e in events:
        name = e.get("event")
        if isinstance(e.get("wall_time"), int | float):
            s.wall_time = max(s.wall_time, float(e["wall_time"]))
        if name == "run_started":
            s.method = e.get("method", s.method)
            if e.get("split") is not None:
                s.split = _int(e["split"])
            n = e.get("clients")
            names = [f"client{i}" for i in range(n)] if isinstance(n, int) else n or []
            for cname in names:
                c = s.client(str(cname))
                if c.split is None:
                    c.split = s.split
        elif name in ("client_offline", "client_online", "client_joined") and e.get("client"):
            s.client(str(e["client"])).state = "offline" if name == "client_offline" \
                else "online"
        elif name == "reconfigure":
            for cname, info in (e.get("clients") or {}).items():
                c = s.client(str(cname))
                c.split = _int(info.get("split")) if info.get("split") is not None else c.split
                for key, attr in (("rank_sum", "rank_sum"), ("memory_bytes", "planned_bytes"),
                                  ("budget_bytes", "budget_bytes")):
                    if info.get(key) is not None:
                        setattr(c, attr, _int(info[key]))
        elif name in BUDGET_EVENTS and e.get("client") and e.get("budget_bytes") is not None:
            s.client(str(e["client"])).budget_bytes = _int(e["budget_bytes"])
        elif name == "budget_exceeded" and e.get("client"):
            c = s.client(str(e["client"]))
            c.state = "OOM-killed"
            for key in ("memory_peak_bytes", "memory_bytes"):  # the host's last reading
                if e.get(key) is not None:
                    c.memory_bytes, c.memory_source = _int(e[key]), "cgroup"
                    break
        elif name == "split_moved" and e.get("client"):
            s.client(str(e["client"])).split = _int(e.get("new"))
        elif name == "run_finished":
            s.finished = True
            if e.get("final_val_ppl") is not None:
                s.val_ppl = float(e["final_val_ppl"])
        if name in LOGGED_EVENTS and name != "run_finished":
            lines.append(_event_line(e))
    for r in records:
        kind = r.get("kind")
        step = _int(r.get("step"))
        if isinstance(r.get("wall_time"), int | float):
            s.wall_time = max(s.wall_time, float(r["wall_time"]))
        moved = int(r.get("wire_bytes_sent", r.get("bytes_sent")) or 0) + int(
            r.get("wire_bytes_received", r.get("bytes_received")) or 0)
        if kind == "train" and step is not None and r.get("client"):
            _finish_steps(s, step - 1, lines)
            c = s.client(str(r["client"]))
            c.last_step = step if c.last_step is None else max(c.last_step, step)
            if isinstance(r.get("loss"), int | float):
                c.loss = float(r["loss"])
                s.step_losses.setdefault(step, []).append(c.loss)
            c.bytes_moved += moved
            s.bytes_moved += moved
            s.step = max(s.step, step + 1)
            if isinstance(r.get("wall_time"), int | float):
                t = float(r["wall_time"])
                if s.first_step is None:
                    s.first_step = (step, t)
                if s.last_step is None or step >= s.last_step[0]:
                    s.last_step = (step, t)
            _measured(c, r)
        elif kind == "resources" and r.get("client") not in (None, "server", "global"):
            _measured(s.client(str(r["client"])), r)
        elif kind == "eval":
            if isinstance(r.get("val_ppl"), int | float):
                s.val_ppl = float(r["val_ppl"])
            if step:
                _finish_steps(s, step - 1, lines)
        elif kind == "aggregate":
            s.bytes_moved += moved
    if s.finished:
        _finish_steps(s, s.step - 1, lines)
        for e in events:
            if e.get("event") == "run_finished":
                lines.append(_event_line(e))
    return s, lines


def _measured(c: ClientView, r: dict[str, Any]) -> None:
    """A record's measured memory (its peak so far) and budget onto a client's row."""
    if r.get("memory_bytes") is not None:
        c.memory_bytes = _int(r["memory_bytes"])
        if isinstance(r.get("memory_source"), str):
            c.memory_source = r["memory_source"]
    if r.get("budget_bytes") is not None:
        c.budget_bytes = _int(r["budget_bytes"])


def memory_cell(c: ClientView) -> str:
    """``612/900 MiB`` (measured peak / budget, one unit), ``~600/900 MiB (plan)`` where
    only the memory model's plan is known, ``-/900 MiB`` with a budget alone, ``-``."""
    used, planned = c.memory_bytes, c.memory_bytes is None and c.planned_bytes is not None
    if planned:
        used = c.planned_bytes
    if used is None and c.budget_bytes is None:
        return "-"
    top = max(v for v in (used, c.budget_bytes) if v is not None)
    unit, div = ("GiB", 2**30) if top >= 10 * 2**30 else ("MiB", 2**20)

    def num(v: int | None) -> str:
        if v is None:
            return "-"
        return f"{v / div:.1f}" if unit == "GiB" else f"{v / div:.0f}"

    text = num(used) if c.budget_bytes is None else f"{num(used)}/{num(c.budget_bytes)}"
    return f"~{text} {unit} (plan)" if planned else f"{text} {unit}"


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def header(state: LiveState, elapsed: float | None = None) -> str:
    """``method  step n/N  val PPL x  moved b  elapsed t  ETA e`` (``finished`` at the end)."""
    total = f"/{state.steps}" if state.steps else ""
    seconds = state.wall_time if elapsed is None else elapsed
    done = "  finished" if state.finished else f"  ETA {_fmt_duration(eta(state))}"
    return (f"{state.method or '?'}  step {state.step}{total}  val PPL {_fmt_ppl(state.val_ppl)}"
            f"  moved {_bytes(state.bytes_moved)}  elapsed {seconds:.1f} s{done}")


def render(state: LiveState, elapsed: float | None = None) -> RenderableType:
    """The header line and the clients table."""
    table = Table(expand=False)
    for col, justify in (("client", "left"), ("state", "left"), ("split", "right"),
                         ("ranks (sum)", "right"), ("last step", "right"), ("loss", "right"),
                         ("peak memory / budget", "right"), ("bytes moved", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for c in sorted(state.clients.values(), key=lambda c: (len(c.name), c.name)):
        ranks = (str(c.rank_sum) if c.rank_sum is not None
                 else f"r={c.rank}" if c.rank is not None else "-")
        memory = Text(memory_cell(c), style="red" if c.memory_bytes is not None
                      and c.budget_bytes is not None and c.memory_bytes > c.budget_bytes else "")
        style = "green" if c.state == "online" else "red"
        table.add_row(c.name, Text(c.state, style=style),
                      "-" if c.split is None else str(c.split), ranks,
                      "-" if c.last_step is None else str(c.last_step),
                      "-" if c.loss is None else f"{c.loss:.4f}", memory, _bytes(c.bytes_moved))
    return Group(Text(header(state, elapsed), style="bold"), table)


class JsonlTail:
    """Incremental reader of an append-only JSONL file: each :meth:`read` returns the whole
    records appended since the last one; a partial last line waits for its newline. A file
    that shrank (``--resume`` drops records) sets :attr:`reset` and is read from the start."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.offset = 0
        self.reset = False

    def read(self) -> list[dict[str, Any]]:
        try:
            size = self.path.stat().st_size
        except OSError:
            return []
        if size < self.offset:
            self.offset, self.reset = 0, True
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(max(0, size - self.offset))
        end = data.rfind(b"\n")
        if end < 0:
            return []
        self.offset += end + 1
        out: list[dict[str, Any]] = []
        for line in data[:end].split(b"\n"):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue  # damaged line: the view skips it, analysis reports it
            if isinstance(record, dict):
                out.append(record)
        return out


def follow(run_dir: Path, poll: Callable[[], int | None], console: Console | None = None,
           steps: int | None = None, interval: float = 0.5) -> int:
    """Show the run in ``run_dir`` until ``poll()`` returns an exit code; that code.

    On a terminal the table updates in place; otherwise plain lines go to ``console``."""
    console = console or Console()
    run_dir = Path(run_dir)
    metrics, events = JsonlTail(run_dir / "metrics.jsonl"), JsonlTail(run_dir / "events.jsonl")

    def fresh() -> LiveState:
        try:
            config = json.loads((run_dir / "config.json").read_text())
        except (OSError, ValueError):
            config = {}
        return initial_state(config, steps)

    state = fresh()
    start = time.monotonic()

    def update() -> list[str]:
        nonlocal state
        evs, recs = events.read(), metrics.read()
        if metrics.reset or events.reset:  # records were removed: rebuild from the start
            metrics.offset = events.offset = 0
            metrics.reset = events.reset = False
            state = fresh()
            evs, recs = events.read(), metrics.read()
        state, lines = fold(state, recs, evs)
        return lines

    if not console.is_terminal:
        while True:
            code = poll()
            for line in update():
                console.print(line, highlight=False, markup=False)
            if code is not None:
                return code
            time.sleep(interval)
    from rich.live import Live

    with Live(render(state, 0.0), console=console, refresh_per_second=4) as live:
        while True:
            code = poll()
            update()
            live.update(render(state, time.monotonic() - start))
            if code is not None:
                return code
            time.sleep(interval)


__all__ = ["ClientView", "JsonlTail", "LiveState", "eta", "fold", "follow", "header",
           "initial_state", "memory_cell", "render"]

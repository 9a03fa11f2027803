"""``testbed experiment run``: the grid of an experiment file, resumable, cells in parallel.

Layout of an experiment directory (docs/experiments.md)::

    OUT/experiment.yaml      the experiment file as given (the grid it was run with)
    OUT/experiment.json      manifest: name, cells (id, method, profile, override, seed, dir)
    OUT/devices/*.json       the device descriptions every cell of a profile shares
    OUT/cells/<id>/          one normal run directory per cell (+ cell.json, result.json,
                             log.txt)

Why it is built this way:

* cells are subprocesses (testbed/experiment/cell.py): ``--parallel`` runs several, and a
  crash or an out-of-memory kill ends one cell, not the grid;
* before a cell starts, the memory model's estimate of its peak (testbed/experiment/memory.py)
  must fit in what the cells may use (the memory available when the run started, or the
  file's ``resources.memory``) less the estimates of the cells running: a cell that cannot
  fit alone is refused with one line, one that must wait says so once;
* resumable: a cell with ``summary.json`` (and its scores, when the experiment evaluates)
  is finished and skipped; any other cell starts again (the trainer keeps no checkpoint, so
  from scratch). A finished cell whose configuration differs from the file's is an error
  unless ``--rerun-changed``: results of two configurations never mix in one directory;
* progress: a rich bar with an ETA on a terminal; otherwise (a pipe, a log file) one plain
  line per finished cell, each with the ETA, so a log reads top to bottom.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.console import Console

from runner.config import TrainConfig
from runner.errors import UserError
from runner.rundir import write_json
from testbed.experiment.cell import CELL, RESULT
from testbed.experiment.memory import available_memory, cpu_count, estimate_cell, fmt_mib
from testbed.experiment.spec import Cell, Experiment

MANIFEST = "experiment.json"
SOURCE = "experiment.yaml"
CELLS = "cells"
LOCK = ".experiment.lock"
LOG = "log.txt"


def cell_finished(cell_dir: Path, wants_eval: bool) -> bool:
    """Finished = ``summary.json`` written (training ended), and ``eval/scores.json`` when
    the experiment evaluates its cells."""
    if not (cell_dir / "summary.json").is_file():
        return False
    return not wants_eval or (cell_dir / "eval" / "scores.json").is_file()


def _as_json(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True))


@dataclass
class Planned:
    """A cell with its directory, its request (cell.json) and its memory estimate."""

    cell: Cell
    dir: Path
    request: dict[str, Any]
    estimate: int
    status: str = "pending"  # pending | done | running | finished | failed | refused
    proc: subprocess.Popen | None = None
    started: float = 0.0
    duration: float = 0.0
    note: str = ""
    waited: bool = False
    reset: str | None = None  # "train" / "eval": results of another configuration to drop
    log: Any = None  # the open log file of the running process
    reused: bool = False  # copied from a ``reuse`` experiment

    @property
    def id(self) -> str:
        return self.cell.id


@dataclass
class Outcome:
    """What one ``experiment run`` did."""

    out: Path
    cells: list[Planned] = field(default_factory=list)
    interrupted: bool = False

    def count(self, status: str) -> int:
        return sum(1 for p in self.cells if p.status == status)


# --------------------------------------------------------------------------- devices
def _devices_file(exp: Experiment, cfg: TrainConfig, profile: str | None, out: Path,
                  written: dict[Any, str]) -> str:
    """The device file a cell's trainer reads: the profile's emulation mapping, else the
    paper's 5-20 GB spread emulated on the model (runner.methods.hetero.emulated_devices, what
    hsplitlora uses without devices). Every method of a setting shares it, so split
    methods without devices get the same virtual clock and budgets as hsplitlora."""
    if profile is not None:
        key: Any = ("profile", profile)
    else:
        key = ("emulated", cfg.model, cfg.clients, cfg.batch_size, cfg.plan_seq)
    if key in written:
        return written[key]
    folder = out / "devices"
    folder.mkdir(parents=True, exist_ok=True)
    if profile is not None:
        from testbed.profiles import emulation_map, write_devices_file

        prof = exp.profiles[profile]
        path = write_devices_file(emulation_map(prof, device=cfg.device),
                                  folder / f"{profile}.json",
                                  [d.availability for d in prof.devices])
    else:
        from runner.methods.hetero import emulated_devices
        from testbed.profiles import model_costs

        clients, server = emulated_devices(model_costs(cfg.model), cfg.clients,
                                           cfg.batch_size, cfg.plan_seq, hold_seq=cfg.max_len)
        name = f"emulated-{Path(cfg.model).stem}-c{cfg.clients}-b{cfg.batch_size}" \
               f"-s{cfg.plan_seq}.json"
        path = folder / name
        path.write_text(json.dumps({"clients": [c.to_dict() for c in clients],
                                    "server": server.to_dict()}, indent=2) + "\n")
    written[key] = str(path.resolve())
    return written[key]


# ------------------------------------------------------------------------------ plan
def signature(request: dict[str, Any]) -> dict[str, Any]:
    """What decides a cell's training: its TrainConfig, with the device file's content in
    place of its path (an experiment's device files live in its own directory), and the
    fairness rule. Equal signatures train identically, up to float rounding: the device
    (``--device``, the settings' ``device``) is left out, so a grid resumed on a GPU keeps the
    cells it finished on the CPU, and the other way round."""
    train = dict(request.get("train") or {})
    train.pop("device", None)
    devices = train.get("devices")
    if isinstance(devices, str):
        train["devices"] = _read(Path(devices)) or devices
    return {"train": train, "fairness": request.get("fairness")}


def _reuse(exp: Experiment, cell_id: str, request: dict[str, Any],
           cell_dir: Path) -> dict[str, Any] | None:
    """Copy a trained cell with the same id and signature from one of the file's ``reuse``
    experiment directories (so experiments that share cells train them once); returns its
    request, or None when none matches. The copy is a whole run directory (adapters too, so
    it can still be scored)."""
    import shutil

    for other in exp.spec.reuse:
        src = Path(other) / CELLS / cell_id
        old = _read(src / CELL)
        if old is None or not (src / "summary.json").is_file() \
                or signature(old) != signature(request):
            continue
        shutil.copytree(src, cell_dir, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(LOG))
        if old.get("eval") not in (None, request.get("eval")):  # scored differently
            shutil.rmtree(cell_dir / "eval", ignore_errors=True)
            old = {**old, "eval": None}
        write_json(cell_dir / CELL, {**request, "eval": old.get("eval"),
                                     "reused_from": str(src)})
        return old
    return None


def plan(exp: Experiment, out: Path, *, threads: int, rerun_changed: bool = False,
         devices_dir: Path | None = None, dry_run: bool = False,
         device: str | None = None) -> list[Planned]:
    """Every cell with its request and estimate; finished cells are marked ``done``, and
    cells another experiment (the file's ``reuse``) trained identically are copied first.

    ``devices_dir``: where the device files go (default ``out``); ``dry_run``: copy nothing;
    ``device``: where every cell trains (``experiment run --device``; None: each cell's own
    setting, TrainConfig's ``auto`` unless the file sets one).

    Raises:
        UserError: a finished cell was run with another configuration (and not
            ``rerun_changed``).
    """
    from testbed.profiles import model_costs

    wants_eval = exp.spec.eval is not None and exp.spec.eval.enabled
    written: dict[Any, str] = {}
    costs_by_model: dict[str, Any] = {}
    changed: list[str] = []
    planned = []
    for cell in exp.cells():
        cfg = cell.config
        if device is not None:
            cfg = replace(cfg, device=device)
        if cfg.devices is None:
            cfg = replace(cfg, devices=_devices_file(exp, cfg, cell.profile,
                                                     devices_dir or out, written))
        cell = replace(cell, config=cfg)
        if cfg.model not in costs_by_model:
            costs_by_model[cfg.model] = model_costs(cfg.model)
        from runner.emulation.devices import load_devices

        devices, _ = load_devices(Path(cfg.devices)) if cfg.devices else ([], None)
        estimate = estimate_cell(cfg, costs_by_model[cfg.model], devices).total
        request = _as_json({
            "id": cell.id, "method": cell.method, "profile": cell.profile,
            "override": cell.override, "seed": cell.seed, "fixed": cell.fixed,
            "train": cfg.to_dict(), "fairness": exp.spec.fairness.model_dump(),
            "eval": exp.spec.eval.model_dump() if wants_eval and exp.spec.eval else None,
            "threads": threads, "estimate_bytes": estimate})
        cell_dir = out / CELLS / cell.id
        p = Planned(cell, cell_dir, request, estimate)
        old = _read(cell_dir / CELL)
        if old is None and not dry_run:
            old = _reuse(exp, cell.id, request, cell_dir)
            p.reused = old is not None
        train_same = old is None or signature(old) == signature(request)
        eval_same = old is None or not wants_eval or old.get("eval") in (None, request["eval"])
        if (cell_dir / "summary.json").is_file() and not train_same:
            changed.append(cell.id)
            p.reset = "train"
        elif cell_finished(cell_dir, wants_eval) and not eval_same:
            changed.append(cell.id)
            p.reset = "eval"
        elif cell_finished(cell_dir, wants_eval):
            p.status = "done"
        planned.append(p)
    if changed and not rerun_changed:
        raise UserError(
            f"{out}: {len(changed)} finished cell(s) were run with another configuration than "
            f"{exp.spec.path} now gives ({', '.join(changed[:4])}"
            f"{', ...' if len(changed) > 4 else ''}); use another --out, or --rerun-changed "
            "to train them again")
    return planned


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_manifest(exp: Experiment, out: Path, planned: list[Planned]) -> None:
    """experiment.yaml (the file as given) and experiment.json (the grid), which the report
    reads to group cells without importing the spec code."""
    out.mkdir(parents=True, exist_ok=True)
    (out / SOURCE).write_text(exp.source or "")
    spec = exp.spec
    write_json(out / MANIFEST, {
        "name": spec.name, "description": spec.description, "file": spec.path,
        "methods": spec.methods, "profiles": spec.profile_names, "seeds": spec.seeds,
        "overrides": spec.override_names, "stop": spec.stop.model_dump(),
        "fairness": spec.fairness.model_dump(),
        "eval": spec.eval.model_dump() if spec.eval is not None else None,
        "report": spec.report.model_dump(),
        "cells": [{"id": p.id, "method": p.cell.method, "profile": p.cell.profile,
                   "override": p.cell.override, "seed": p.cell.seed,
                   "dir": f"{CELLS}/{p.id}", "estimate_bytes": p.estimate} for p in planned],
    })


@contextmanager
def locked(out: Path) -> Iterator[None]:
    """One runner per experiment directory (two would train the same cell twice); the lock
    dies with the process, so a killed runner never blocks its resume."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{out} is being run by another `testbed experiment run`; wait "
                            "for it or stop it") from None
        handle.write(str(os.getpid()))
        handle.flush()
        yield


# ------------------------------------------------------------------------------- run
def _start(p: Planned) -> None:
    """Write cell.json and start the cell's process (its output goes to log.txt)."""
    import shutil

    p.dir.mkdir(parents=True, exist_ok=True)
    if p.reset == "train":  # --rerun-changed: the old configuration's results go
        (p.dir / "summary.json").unlink(missing_ok=True)
    if p.reset is not None:
        shutil.rmtree(p.dir / "eval", ignore_errors=True)
    write_json(p.dir / CELL, p.request)
    threads = str(p.request.get("threads") or 1)
    from runner.methods.memory import ALLOCATOR_ENV

    env = {**os.environ, **ALLOCATOR_ENV, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
           "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    p.log = open(p.dir / LOG, "a", encoding="utf-8")  # noqa: SIM115 - closed in _reap
    p.log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} start (runner pid {os.getpid()})\n")
    p.log.flush()
    p.proc = subprocess.Popen([sys.executable, "-m", "testbed.experiment.cell", str(p.dir)],
                              stdout=p.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              env=env, cwd=os.getcwd())
    p.started = time.monotonic()
    p.status = "running"


def _last_line(path: Path) -> str:
    """The last non-empty line of a log (what a failed cell said last)."""
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines()
                 if ln.strip() and not ln.startswith("===")]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def _reap(p: Planned, rc: int, wants_eval: bool) -> None:
    p.duration = time.monotonic() - p.started
    if p.log is not None:
        p.log.close()
    p.proc, p.log = None, None
    if rc == 0 and cell_finished(p.dir, wants_eval):
        p.status = "finished"
        return
    p.status = "failed"
    how = f"killed by signal {-rc}" if rc < 0 else f"exit {rc}"
    p.note = f"{how}: {_last_line(p.dir / LOG)}"


def _fmt_duration(s: float | None) -> str:
    if s is None:
        return "unknown"
    s = max(0.0, s)
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def eta_seconds(planned: list[Planned], parallel: int) -> float | None:
    """Seconds left: each pending or running cell predicted from the finished cells of its
    method (else of any method) in this session, spread over the parallel slots."""
    done = [p for p in planned if p.status == "finished" and p.duration > 0]
    if not done:
        return None
    mean_all = sum(p.duration for p in done) / len(done)
    by_method: dict[str, list[float]] = {}
    for p in done:
        by_method.setdefault(p.cell.method, []).append(p.duration)

    def predict(p: Planned) -> float:
        own = by_method.get(p.cell.method)
        return sum(own) / len(own) if own else mean_all

    now = time.monotonic()
    left = [predict(p) for p in planned if p.status == "pending"]
    left += [max(predict(p) - (now - p.started), 0.0) for p in planned if p.status == "running"]
    if not left:
        return 0.0
    return sum(left) / max(1, min(parallel, len(left)))


def _final_ppl(p: Planned) -> str:
    summary = _read(p.dir / "summary.json") or {}
    ppl = summary.get("final_val_ppl")
    text = f"final PPL {ppl:.4g}" if isinstance(ppl, int | float) else "no PPL"
    steps, reason = summary.get("steps_done"), summary.get("stop_reason")
    if steps is not None:
        text += f" after {steps} steps"
    if reason and reason != "steps":
        text += f" ({reason.replace('_', ' ')})"
    scores = (_read(p.dir / "eval" / "scores.json") or {}).get("scores") or {}
    if "BLEU" in scores:
        text += f", BLEU {scores['BLEU']:.2f}"
    cpu = (_read(p.dir / RESULT) or {}).get("cpu_s")
    if isinstance(cpu, int | float):
        text += f"; CPU {_fmt_duration(cpu)}"
    return text


class Reporter:
    """Progress over the grid: a rich bar on a terminal, plain lines otherwise."""

    def __init__(self, console: Console, total: int, parallel: int):
        self.console, self.total, self.parallel = console, total, parallel
        self.progress = None
        if console.is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self.progress = Progress(TextColumn("[bold]cells"), BarColumn(),
                                     MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                                     TimeElapsedColumn(), console=console)
            self.task = self.progress.add_task("cells", total=total, info="")

    def __enter__(self) -> Reporter:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.stop()

    def line(self, text: str) -> None:
        target = self.progress.console if self.progress is not None else self.console
        target.print(text, highlight=False, markup=False, soft_wrap=True)

    def update(self, planned: list[Planned]) -> None:
        if self.progress is None:
            return
        ended = sum(1 for p in planned if p.status in ("done", "finished", "failed", "refused"))
        running = [p.id for p in planned if p.status == "running"]
        info = f"ETA {_fmt_duration(eta_seconds(planned, self.parallel))}"
        if running:
            info += "  running: " + ", ".join(running)
        self.progress.update(self.task, completed=ended, info=info)


def run(exp: Experiment, out: Path, *, parallel: int = 1, console: Console | None = None,
        rerun_changed: bool = False, memory_bytes: int | None = None,
        poll_s: float = 0.5, device: str | None = None) -> Outcome:
    """Run every unfinished cell of ``exp`` under ``out``; returns what happened.

    ``memory_bytes``: what the cells may use together (default: the experiment file's
    ``resources.memory``, else the memory available now). ``device``: where every cell
    trains and is scored (:func:`plan`).
    """
    console = console or Console()
    threads = exp.spec.resources.threads or max(1, cpu_count() // max(1, parallel))
    with locked(out):
        planned = plan(exp, out, threads=threads, rerun_changed=rerun_changed, device=device)
        write_manifest(exp, out, planned)
        outcome = Outcome(out, planned)
        budget = memory_bytes or exp.spec.resources.memory_bytes or available_memory()
        done = [p.id for p in planned if p.status == "done"]
        todo = [p for p in planned if p.status == "pending"]
        console.print(f"experiment {exp.name}: {len(planned)} cells, {len(done)} finished, "
                      f"{len(todo)} to run; {parallel} at a time, {threads} thread(s) each; "
                      f"memory for cells {fmt_mib(budget) if budget else 'unknown'}",
                      highlight=False, markup=False, soft_wrap=True)
        reused = [p.id for p in planned if p.reused]
        if reused:
            console.print(f"reused from {', '.join(exp.spec.reuse)}: {', '.join(reused)}",
                          highlight=False, markup=False, soft_wrap=True)
        if done:
            console.print(f"skipping finished cells: {', '.join(done)}", highlight=False,
                          markup=False, soft_wrap=True)
        wants_eval = exp.spec.eval is not None and exp.spec.eval.enabled
        total = len(planned)
        with Reporter(console, total, parallel) as rep, _terminate_as_interrupt():
            try:
                _loop(planned, todo, parallel, budget, rep, wants_eval, total, poll_s)
            except KeyboardInterrupt:
                outcome.interrupted = True
                _stop_all(planned)
                rep.line("interrupted: the running cells were stopped; rerun the same command "
                         "to resume")
        return outcome


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (``kill``, ``timeout``; a background job ignores Ctrl-C's SIGINT) stops the
    grid like Ctrl-C: running cells are terminated, the next run resumes."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _loop(planned: list[Planned], todo: list[Planned], parallel: int, budget: int | None,
          rep: Reporter, wants_eval: bool, total: int, poll_s: float) -> None:
    queue = list(todo)
    running: list[Planned] = []
    while queue or running:
        while queue and len(running) < parallel:
            p = queue[0]
            if budget is not None and p.estimate > budget:
                queue.pop(0)
                p.status = "refused"
                p.note = (f"needs about {fmt_mib(p.estimate)} (memory model), only "
                          f"{fmt_mib(budget)} available")
                rep.line(f"[{_ended(planned)}/{total}] {p.id}: refused: {p.note}")
                continue
            p = _first_fit(queue, running, budget)
            if p is None:
                head, in_use = queue[0], sum(r.estimate for r in running)
                if not head.waited:
                    head.waited = True
                    rep.line(f"{head.id} waits for memory: needs about "
                             f"{fmt_mib(head.estimate)}, {fmt_mib(in_use)} of "
                             f"{fmt_mib(budget or 0)} held by running cells")
                break
            queue.remove(p)
            _start(p)
            running.append(p)
        rep.update(planned)
        time.sleep(poll_s)
        for p in list(running):
            rc = p.proc.poll() if p.proc is not None else 0
            if rc is None:
                continue
            running.remove(p)
            _reap(p, rc, wants_eval)
            eta = _fmt_duration(eta_seconds(planned, parallel))
            n = _ended(planned)
            if p.status == "finished":
                rep.line(f"[{n}/{total}] {p.id}: finished in {_fmt_duration(p.duration)}, "
                         f"{_final_ppl(p)}; ETA {eta}")
            else:
                rep.line(f"[{n}/{total}] {p.id}: failed ({p.note}); log {p.dir / LOG}; "
                         f"ETA {eta}")
            rep.update(planned)


def _first_fit(queue: list[Planned], running: list[Planned],
               budget: int | None) -> Planned | None:
    """The first queued cell whose memory estimate fits beside the running ones (first fit).

    Why not strictly in order: a large cell waiting for memory would otherwise idle a CPU
    that a smaller cell further down the grid (cenlora, ft) could use; cells are independent,
    so the order only decides which finishes first."""
    if budget is None or not running:
        return queue[0] if queue else None
    free = budget - sum(r.estimate for r in running)
    return next((q for q in queue if q.estimate <= budget and q.estimate <= free), None)


def _ended(planned: list[Planned]) -> int:
    return sum(1 for p in planned if p.status in ("done", "finished", "failed", "refused"))


def _stop_all(planned: list[Planned], grace_s: float = 10.0) -> None:
    """Terminate running cells (SIGTERM, then SIGKILL after ``grace_s``)."""
    live = [p for p in planned if p.proc is not None and p.proc.poll() is None]
    for p in live:
        p.proc.terminate()  # type: ignore[union-attr]
    deadline = time.monotonic() + grace_s
    for p in live:
        try:
            p.proc.wait(max(0.1, deadline - time.monotonic()))  # type: ignore[union-attr]
        except subprocess.TimeoutExpired:
            p.proc.kill()  # type: ignore[union-attr]
            p.proc.wait()  # type: ignore[union-attr]
        p.status = "failed"
        p.note = "interrupted"


def dry_run_rows(planned: list[Planned]) -> list[tuple[str, ...]]:
    """What `experiment run --dry-run` prints: cell, method, profile, override, seed, status,
    memory estimate."""
    return [(p.id, p.cell.method, p.cell.profile or "-", p.cell.override, str(p.cell.seed),
             "finished" if p.status == "done" else "to run", fmt_mib(p.estimate))
            for p in planned]


__all__ = ["Outcome", "Planned", "cell_finished", "dry_run_rows", "eta_seconds", "plan", "run",
           "write_manifest"]

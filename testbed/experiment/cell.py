"""One cell of an experiment, in its own process: ``python -m testbed.experiment.cell DIR``.

Why a process per cell: the runner (testbed/experiment/run.py) can run several at once
(``--parallel``), a crash or an out-of-memory kill ends one cell and not the grid, and the
memory a cell held is returned to the host when it ends. Inside, the cell trains exactly as
``testbed train`` does (``testbed.cli.run_training``: same trainer, same run directory), then
evaluates as ``testbed eval`` does when the experiment asks for it.

Input: ``DIR/cell.json`` (written by the runner): the TrainConfig, the settings the
experiment fixed, the fairness rule, the evaluation settings and the torch thread count.
Output: a normal run directory in ``DIR`` plus ``DIR/result.json`` (state, times, the
fairness decision, the measured peak RSS next to the runner's estimate).

Restart rule: the in-process trainer keeps no checkpoint, so a cell without
``summary.json`` (killed mid-run) trains again from scratch (the old records are replaced);
a cell with ``summary.json`` but without the scores its experiment asks for only evaluates.
"""

from __future__ import annotations

import ctypes
import json
import shutil
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

CELL = "cell.json"
RESULT = "result.json"


def _die_with_parent() -> None:
    """Linux: SIGTERM this process when the runner dies (a killed runner leaves no cell
    training on, which a resume would then race)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _fair_config(cfg: Any, spec: dict[str, Any]) -> tuple[Any, Any]:
    """``cfg`` with the configuration the fairness rule gives its method
    (testbed/experiment/fairness.py) and the decision (None for methods that size themselves
    or have no device)."""
    from runner.dataset import data as data_mod
    from runner.emulation.devices import load_devices
    from runner.emulation.vtime import DEFAULT_SERVER
    from runner.methods.memory import memory_seq
    from runner.model.models import load_config
    from runner.trainer import prepare
    from testbed.experiment import fairness

    rule = spec.get("fairness") or {}
    if not rule.get("enabled", True) or cfg.method not in fairness.FIXED_CONFIG_METHODS \
            or not cfg.devices:
        return cfg, None
    prepared = prepare(cfg)
    lengths = [len(ex["input_ids"]) for shard in prepared.shards
               for ex in data_mod.encode_frame(prepared.tokenizer, shard, cfg.max_len)]
    devices, server = load_devices(Path(cfg.devices))
    choice = fairness.choose(cfg, load_config(prepared.info.path), devices,
                             server or DEFAULT_SERVER, memory_seq(cfg.plan_seq, lengths),
                             spec.get("fixed", []), rule.get("split", "makespan"))
    if choice is None:
        return cfg, None
    changes: dict[str, Any] = {"rank": choice.rank}
    if choice.split is not None:
        changes["split"] = choice.split
    return replace(cfg, **changes), choice


def train(cell_dir: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """Train the cell from scratch (the same code path as ``testbed train``)."""
    from runner.config import TrainConfig
    from testbed.experiment import fairness
    from testbed.training import run_training

    cfg = TrainConfig.from_dict(spec["train"])
    cfg, choice = _fair_config(cfg, spec)
    record = choice.to_dict() if choice is not None else {
        "method": cfg.method, "rule": fairness.describe(cfg.method)}
    cfg = replace(cfg, extra={**cfg.extra, "fairness": record,
                              "experiment_cell": spec.get("id")})
    shutil.rmtree(cell_dir / "eval", ignore_errors=True)  # scores of an older incarnation

    def on_run(run: Any) -> None:
        run.event("fairness", **record)
        for detail in record.get("violations", []):
            run.event("budget_violation", step=0, detail=detail)

    return run_training(cfg, cell_dir, overwrite=True, on_run=on_run)


def evaluate(cell_dir: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """Score the trained cell as ``testbed eval`` does (beam search on the test split)."""
    from runner.evaluation.evaluate import DecodeConfig, evaluate_run
    from runner.rundir import RunDir

    ev = spec["eval"]
    test_data = Path(ev["test_data"]) if ev.get("test_data") else None
    result = evaluate_run(RunDir.open(cell_dir), None, test_data=test_data,
                          max_mrs=ev.get("max_mrs") or None,
                          decode=DecodeConfig(num_beams=int(ev.get("beams", 10)),
                                              max_new_tokens=int(ev.get("max_new_tokens", 64))),
                          device=(spec.get("train") or {}).get("device") or "auto")
    return result["scores"]


def cpu_seconds() -> float:
    """CPU time (user + system) this process has used: the cost of a cell independent of
    what else the machine runs (wall time is not, on a shared host)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_cell(cell_dir: Path) -> int:
    """Train and/or evaluate what the cell still lacks; write result.json. Exit code."""
    from runner.errors import UserError
    from runner.methods.memory import peak_rss_bytes
    from runner.rundir import write_json

    spec = json.loads((cell_dir / CELL).read_text())
    threads = spec.get("threads")
    import torch

    if threads:
        torch.set_num_threads(int(threads))
    from testbed.console import quiet_libraries as _quiet_libraries

    _quiet_libraries()
    started = time.time()
    try:  # an evaluation-only restart keeps what the training attempt recorded
        previous = json.loads((cell_dir / RESULT).read_text())
    except (OSError, ValueError):
        previous = {}
    trained = False
    result: dict[str, Any] = {**{k: v for k, v in previous.items() if k == "train_s"},
                              "id": spec.get("id"), "started": started,
                              "estimate_bytes": spec.get("estimate_bytes"),
                              "threads": threads}
    try:
        t0 = time.perf_counter()
        trained = not (cell_dir / "summary.json").is_file()
        if trained:
            train(cell_dir, spec)
            result["train_s"] = time.perf_counter() - t0
        if spec.get("eval") and spec["eval"].get("enabled", True) \
                and not (cell_dir / "eval" / "scores.json").is_file():
            t1 = time.perf_counter()
            result["scores"] = evaluate(cell_dir, spec)
            result["eval_s"] = time.perf_counter() - t1
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        result.update(state="failed", error=str(exc), finished=time.time(),
                      peak_rss_bytes=peak_rss_bytes(), cpu_s=cpu_seconds())
        write_json(cell_dir / RESULT, result)
        return 2
    config = json.loads((cell_dir / "config.json").read_text())
    result.update(state="finished", finished=time.time(), peak_rss_bytes=peak_rss_bytes(),
                  # an evaluation-only restart adds to what the training attempt used
                  cpu_s=cpu_seconds() + (0.0 if trained else float(previous.get("cpu_s") or 0)),
                  fairness=config.get("train", {}).get("extra", {}).get("fairness"))
    write_json(cell_dir / RESULT, result)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m testbed.experiment.cell CELL_DIR", file=sys.stderr)
        return 2
    _die_with_parent()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    return run_cell(Path(args[0]))


if __name__ == "__main__":
    sys.exit(main())

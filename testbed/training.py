"""In-process training as the CLI runs it: options -> TrainConfig, and a run with a progress
bar. Shared by `testbed train`, `testbed up` (train_config) and experiment cells
(run_training), so it lives apart from testbed/cli.py, which registers those commands.
"""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console

from testbed.console import progress


def config_values(**options):
    """CLI option values as TrainConfig fields: ``targets`` a comma list, ``eval_max_examples``
    0 = all (None); either may be absent (`up --profile` converts only what was given)."""
    if "targets" in options:
        options["targets"] = tuple(t.strip() for t in options["targets"].split(",")
                                   if t.strip())
    if "eval_max_examples" in options:
        options["eval_max_examples"] = options["eval_max_examples"] or None
    return options


def train_config(**options):
    """TrainConfig from CLI options shared by `train` and `up`; an option not given keeps
    TrainConfig's default."""
    from runner.config import TrainConfig

    return TrainConfig(**config_values(**options))


def run_training(cfg, out_dir: Path, overwrite: bool, on_run=None) -> dict:
    """Build the trainer, open the run directory and train with a progress bar.

    ``on_run(run)`` is called once the run directory exists, before training (experiments
    record their fairness decisions there: testbed/experiment/cell.py)."""
    import platform

    import torch
    import transformers

    from runner.methods.plugins import build_trainer
    from runner.rundir import RunDir
    from runner.trainer import prepare

    prepared = prepare(cfg)
    if prepared.protocol is not None:  # which files train, validate and test this run
        Console(soft_wrap=True).print(prepared.protocol.line(len(prepared.frames["train"])),
                                      highlight=False, markup=False)
    snapshot = {
        "train": prepared.train_record(cfg),
        "model_path": str(prepared.info.path),
        "model_family": prepared.info.family,
        "num_layers": prepared.info.num_layers,
        "data_source": prepared.source,
        "data_sizes": {k: len(v) for k, v in prepared.frames.items()},
        "client_sizes": [len(s) for s in prepared.shards],
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "argv": sys.argv,
    }
    run = RunDir.create(out_dir, snapshot, overwrite=overwrite)
    if on_run is not None:
        on_run(run)
    with progress() as bar:
        task = bar.add_task(cfg.method, total=cfg.steps, info="loading")

        def on_step(step: int, info: dict) -> None:
            text = f"loss {info['loss']:.3f}"
            if "val_ppl" in info:
                text += f"  val PPL {info['val_ppl']:.2f}"
            bar.update(task, completed=step, info=text)

        trainer = build_trainer(cfg, run, on_step, prepared=prepared)
        bar.update(task, info=f"val PPL {trainer.history[0]['val_ppl']:.2f}" if trainer.history
                   else "training")
        return trainer.fit()

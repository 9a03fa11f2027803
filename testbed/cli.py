"""The ``testbed`` command line.

Every user error (bad data file, unknown model, split point out of range, ...) is reported
as one line on stderr with exit code 2 and no traceback (DEVELOPERS.md); bugs keep their
traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

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

app = typer.Typer(
    help="Testbed for heterogeneous split LoRA fine-tuning (HSplitLoRA and baselines).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)


def _quiet_libraries() -> None:
    """Keep transformers' own progress bars and warnings out of our output."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)


def _fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@contextmanager
def _progress() -> Iterator[Progress]:
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


@app.command()
def train(
    method: Annotated[str, typer.Option(help="splitlora | fedlora | cenlora | ft")] = "splitlora",
    model: Annotated[str, typer.Option(
        help="Alias (smollm2-135m, tiny-llama, tiny-gpt2), local HF directory, .gguf file, "
             "or Hugging Face hub id")] = "smollm2-135m",
    data: Annotated[str | None, typer.Option(
        help="E2E CSV (columns mr,ref) or 'synthetic'. Default: $TESTBED_DATA, the cache, "
             "then a download of the official E2E release")] = None,
    clients: Annotated[int, typer.Option(help="Number of clients")] = 3,
    split: Annotated[int | None, typer.Option(
        "--split", help="Split point k: clients hold blocks [0,k) (default L/4)")] = None,
    rank: Annotated[int, typer.Option(help="LoRA rank")] = 8,
    targets: Annotated[str, typer.Option(
        help="Comma-separated projections to adapt (llama: q,k,v,o,gate,up,down; "
             "gpt2: qkv,o,fc,proj)")] = "q,v",
    steps: Annotated[int, typer.Option(help="Training steps")] = 200,
    batch_size: Annotated[int, typer.Option(help="Mini-batch per client per step")] = 8,
    lr: Annotated[float | None, typer.Option(help="Learning rate (default 2e-4; ft 5e-5)")] = None,
    agg_interval: Annotated[int, typer.Option(
        help="Aggregate client adapters every I steps")] = 5,
    partition: Annotated[str, typer.Option(help="iid | dirichlet")] = "iid",
    dirichlet_alpha: Annotated[float, typer.Option(help="Dirichlet concentration")] = 0.5,
    eval_every: Annotated[int, typer.Option(help="Validate every N steps")] = 50,
    eval_max_examples: Annotated[int, typer.Option(
        help="Validation examples per evaluation (0 = all)")] = 256,
    lora_dropout: Annotated[float, typer.Option(help="LoRA dropout")] = 0.1,
    max_len: Annotated[int, typer.Option(help="Max tokens per example")] = 128,
    seed: Annotated[int, typer.Option(help="Random seed")] = 0,
    dropout: Annotated[list[str] | None, typer.Option(
        help="Scheduled dropout CLIENT:FIRST:END (client index offline for steps "
             "[FIRST, END)); repeatable")] = None,
    out: Annotated[Path, typer.Option(help="Run directory")] = Path("runs/latest"),
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run in --out")] = False,
) -> None:
    """Train in-process: N clients and one server, exactly SplitLoRA's step."""
    from runner.config import TrainConfig
    from runner.errors import UserError

    _quiet_libraries()
    try:
        dropouts = tuple(tuple(int(x) for x in d.split(":")) for d in dropout or [])
        if any(len(d) != 3 for d in dropouts):
            raise ValueError
    except ValueError:
        _fail(f"--dropout takes CLIENT:FIRST:END (e.g. 1:20:40), got {dropout}")
        return
    cfg = TrainConfig(
        method=method, model=model, data=data, clients=clients, split=split, rank=rank,
        targets=tuple(t.strip() for t in targets.split(",") if t.strip()), steps=steps,
        batch_size=batch_size, lr=lr, agg_interval=agg_interval, partition=partition,
        dirichlet_alpha=dirichlet_alpha, eval_every=eval_every,
        eval_max_examples=eval_max_examples or None, lora_dropout=lora_dropout,
        max_len=max_len, seed=seed, dropouts=dropouts,
    )
    try:
        summary = run_training(cfg, out, overwrite)
    except UserError as exc:
        _fail(str(exc))
        return
    out_line = (f"pretrained val PPL {summary['pretrained_val_ppl']:.3f} -> final "
                f"{summary['final_val_ppl']:.3f}; run written to {out}")
    Console().print(out_line, highlight=False)


def run_training(cfg, out_dir: Path, overwrite: bool) -> dict:
    """Build the trainer, open the run directory and train with a progress bar."""
    import platform

    import torch
    import transformers

    from runner.rundir import RunDir
    from runner.trainer import Trainer, prepare

    prepared = prepare(cfg)
    snapshot = {
        "train": cfg.to_dict(),
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
    with _progress() as bar:
        task = bar.add_task(cfg.method, total=cfg.steps, info="loading")

        def on_step(step: int, info: dict) -> None:
            text = f"loss {info['loss']:.3f}"
            if "val_ppl" in info:
                text += f"  val PPL {info['val_ppl']:.2f}"
            bar.update(task, completed=step, info=text)

        trainer = Trainer(cfg, run, on_step, prepared=prepared)
        bar.update(task, info=f"val PPL {trainer.history[0]['val_ppl']:.2f}" if trainer.history
                   else "training")
        return trainer.fit()


@app.command("eval")
def eval_(
    run_dir: Annotated[Path, typer.Argument(help="Run directory written by `testbed train`")],
    data: Annotated[str | None, typer.Option(
        help="E2E CSV for the test split (default: the run's own data)")] = None,
    max_mrs: Annotated[int, typer.Option(help="Score only the first N test MRs (0 = all)")] = 0,
    beams: Annotated[int, typer.Option(help="Beam width")] = 10,
    max_new_tokens: Annotated[int, typer.Option(help="Generation length cap")] = 64,
) -> None:
    """Generate on the test split (beam search) and write outputs CSV + BLEU/NIST/METEOR/
    ROUGE-L/CIDEr scores JSON into RUN/eval/."""
    from runner.errors import UserError
    from runner.evaluate import DecodeConfig, evaluate_run
    from runner.rundir import RunDir

    _quiet_libraries()
    try:
        run = RunDir.open(run_dir)
        with _progress() as bar:
            task = bar.add_task("generate", total=None, info="")
            result = evaluate_run(
                run, data, max_mrs=max_mrs or None,
                decode=DecodeConfig(num_beams=beams, max_new_tokens=max_new_tokens),
                progress=lambda n: bar.advance(task, n),
                on_total=lambda n: bar.update(task, total=n),
            )
    except UserError as exc:
        _fail(str(exc))
        return
    scores = result["scores"]
    Console().print("  ".join(f"{k} {v:.4g}" for k, v in scores.items()), highlight=False)
    Console().print(f"outputs and scores written to {run_dir / 'eval'}", highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()

"""The ``testbed`` command line.

Every user error (bad data file, unknown model, split point out of range, ...) is reported
as one line on stderr with exit code 2 and no traceback (DEVELOPERS.md); bugs keep their
traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from testbed.console import err
from testbed.console import fail as _fail
from testbed.console import json_output as _json_output
from testbed.console import load_warnings as _load_warnings
from testbed.console import print_json as _print_json
from testbed.console import progress as _progress
from testbed.console import quiet_libraries as _quiet_libraries
from testbed.options import (
    DEFAULT_RUN,
    DEVICE_HELP,
    METHOD_HELP,
    OUT_HELP,
    PRECISION_HELP,
    RegistryHelp,
    check_applies,
    check_combinations,
    comma,
    moved,
)
from testbed.options import explicit as _explicit
from testbed.options import train_default as _D
from testbed.training import run_training, train_config

app = typer.Typer(
    help="Testbed for heterogeneous split LoRA fine-tuning (HSplitLoRA and baselines).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


# The parameters of `train` that set a TrainConfig field (``dropout`` sets ``dropouts``):
# those a method does not use are refused when given (testbed/options.py check_applies).
_TRAIN_FIELDS = ("clients", "split", "rank", "targets", "agg_interval", "partition",
                 "dirichlet_alpha", "lora_dropout", "dropout", "devices", "rank_set",
                 "server_chunk", "stop_virtual_time", "early_stop_patience",
                 "early_stop_min_delta")


@app.command(cls=RegistryHelp)
@_json_output
def train(
    ctx: typer.Context,
    method: Annotated[str, typer.Option(help=METHOD_HELP)] = _D("method"),
    model: Annotated[str, typer.Option(
        help="Alias (smollm2-135m, tiny-llama, tiny-gpt2), local HF directory, .gguf file, "
             "or Hugging Face hub id")] = _D("model"),
    data: Annotated[str | None, typer.Option(
        help="E2E CSV (columns mr,ref; split by MR 80/10/10), a directory holding the "
             "official release (trainset.csv, devset.csv, testset_w_refs.csv: used as the "
             "official split), or 'synthetic'. Default: $TESTBED_DATA, the cache, then a "
             "download of the official E2E release")] = None,
    clients: Annotated[int, typer.Option(
        help="Number of clients ({uses:clients})")] = _D("clients"),
    split: Annotated[int | None, typer.Option(
        "--split", help="Split point k: clients hold blocks [0,k) (default L/4; "
                        "{uses:split})")] = None,
    rank: Annotated[int, typer.Option(
        help="LoRA rank, the same for every adapter ({uses:rank})")] = _D("rank"),
    targets: Annotated[str, typer.Option(
        help="Comma-separated projections to adapt (llama: q,k,v,o,gate,up,down; "
             "gpt2: qkv,o,fc,proj); for ARMSC the projections every client adapts at least, "
             "at the smallest rank of --rank-set ({uses:targets})")
    ] = comma(_D("targets")),
    steps: Annotated[int, typer.Option(help="Training steps")] = _D("steps"),
    batch_size: Annotated[int, typer.Option(help="Mini-batch per client per step")
                          ] = _D("batch_size"),
    lr: Annotated[float | None, typer.Option(
        help="Learning rate (default 2e-4; ft 5e-5)")] = None,
    agg_interval: Annotated[int, typer.Option(
        help="Aggregate client adapters every I steps ({uses:agg_interval})")
    ] = _D("agg_interval"),
    partition: Annotated[str, typer.Option(
        help="iid | dirichlet ({uses:partition})")] = _D("partition"),
    dirichlet_alpha: Annotated[float, typer.Option(
        help="Dirichlet concentration, with --partition dirichlet")] = _D("dirichlet_alpha"),
    eval_every: Annotated[int, typer.Option(help="Validate every N steps")] = _D("eval_every"),
    eval_max_examples: Annotated[int, typer.Option(
        help="Validation examples per evaluation (0 = all)")] = _D("eval_max_examples") or 0,
    lora_dropout: Annotated[float, typer.Option(
        help="LoRA dropout ({uses:lora_dropout})")] = _D("lora_dropout"),
    max_len: Annotated[int, typer.Option(help="Max tokens per example")] = _D("max_len"),
    seed: Annotated[int, typer.Option(help="Random seed")] = _D("seed"),
    dropout: Annotated[list[str] | None, typer.Option(
        help="Scheduled dropout CLIENT:FIRST:END (client index offline for steps "
             "[FIRST, END)); repeatable ({uses:dropouts})")] = None,
    devices: Annotated[Path | None, typer.Option(
        help="Device descriptions (YAML/JSON: clients with memory_bytes, flops, bandwidth, "
             "latency; optional server): the budgets of {hetero} (default: the paper's "
             "5-20 GB spread emulated on the model) and the virtual clock of any method with "
             "clients ({uses:devices})")] = None,
    rank_set: Annotated[str, typer.Option(
        help="Rank set Q that ranks are chosen from per client ({uses:rank_set})")
    ] = comma(_D("rank_set")),
    server_chunk: Annotated[int, typer.Option(
        help="Clients per server forward/backward pass, IWI probe included (0 = all at "
             "once); bounds the server's memory at many clients (same gradient up to float "
             "rounding; {uses:server_chunk})")] = _D("server_chunk"),
    precision: Annotated[str, typer.Option(help=PRECISION_HELP)] = _D("precision"),
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = _D("device"),
    stop_virtual_time: Annotated[float | None, typer.Option(
        help="Stop once the run's virtual clock reaches this many seconds (a clock: "
             "{hetero}, or --devices); --steps stays the cap")] = None,
    early_stop_patience: Annotated[int | None, typer.Option(
        help="Stop after this many evaluations in a row without a validation PPL "
             "improvement of more than --early-stop-min-delta")] = None,
    early_stop_min_delta: Annotated[float, typer.Option(
        help="PPL improvement an evaluation must make to count (with "
             "--early-stop-patience)")] = _D("early_stop_min_delta"),
    out: Annotated[Path, typer.Option(help=OUT_HELP)] = DEFAULT_RUN,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run in --out")] = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the run's summary as one JSON object on stdout (lines for "
                       "people go to stderr)")] = False,
) -> None:
    """Train in-process: N clients and one server, exactly SplitLoRA's step."""
    from runner.errors import UserError

    _quiet_libraries()
    try:
        dropouts = tuple(tuple(int(x) for x in d.split(":")) for d in dropout or [])
        if any(len(d) != 3 for d in dropouts):
            raise ValueError
    except ValueError:
        _fail(f"--dropout takes CLIENT:FIRST:END (e.g. 1:20:40), got {dropout}")
        return
    from runner import device as placement
    from testbed.precision import resolve

    given = ["dropouts" if n == "dropout" else n for n in _explicit(ctx, _TRAIN_FIELDS)]
    try:
        check_applies(method, given, devices=devices is not None)
        check_combinations(given, partition)
        precision, precision_line = resolve(precision, device=placement.resolve(device))
    except UserError as exc:
        _fail(str(exc))
        return
    Console().print(precision_line, highlight=False)
    cfg = train_config(
        method=method, model=model, data=data, clients=clients, split=split, rank=rank,
        targets=targets, steps=steps, batch_size=batch_size, lr=lr, agg_interval=agg_interval,
        partition=partition, dirichlet_alpha=dirichlet_alpha, eval_every=eval_every,
        eval_max_examples=eval_max_examples, lora_dropout=lora_dropout, max_len=max_len,
        seed=seed, dropouts=dropouts, devices=str(devices) if devices else None,
        rank_set=tuple(int(r) for r in rank_set.split(",") if r.strip()),
        precision=precision, device=device, stop_virtual_time=stop_virtual_time,
        server_chunk=server_chunk,
        early_stop_patience=early_stop_patience, early_stop_min_delta=early_stop_min_delta,
    )
    try:
        summary = run_training(cfg, out, overwrite)
    except UserError as exc:
        _fail(str(exc))
        return
    if as_json:
        _print_json({"run": out, "precision": precision, **summary})
        return
    out_line = (f"pretrained val PPL {summary['pretrained_val_ppl']:.3f} -> final "
                f"{summary['final_val_ppl']:.3f}; run written to {out}")
    Console().print(out_line, highlight=False)


@app.command("eval")
@_json_output
def eval_(
    run_dir: Annotated[Path, typer.Argument(
        help="Run directory (written by train, up or scenario run)", show_default=False)],
    test_data: Annotated[Path | None, typer.Option(
        help="E2E CSV (columns mr,ref) to score on whole: every MR of the file, against all "
             "its references (e.g. testset_w_refs.csv). Default: the run's own test split "
             "(the official testset_w_refs.csv whole, or the test fraction of its CSV split "
             "by MR)")] = None,
    data: Annotated[str | None, typer.Option(
        help="Other data, split as training would split it: its test split only (a release "
             "directory: testset_w_refs.csv; one CSV: its 10% test fraction by MR with the "
             "run's seed). Use --test-data to score a whole file")] = None,
    max_mrs: Annotated[int, typer.Option(help="Score only the first N test MRs (0 = all)")] = 0,
    cpu_max_mrs: Annotated[int | None, typer.Option(
        help="Without --max-mrs: when generation runs on the CPU (--device), score only the "
             "first N test MRs (a random sample: the test split is shuffled by MR), printed "
             "in one line")
    ] = None,
    split: Annotated[str, typer.Option(
        help="test: the run's test split (RUN/eval/); validation: its validation split "
             "(RUN/eval/validation/, the test scores untouched), to choose decoding settings "
             "without looking at the test MRs")] = "test",
    beams: Annotated[int, typer.Option(help="Beam width")] = 10,
    length_penalty: Annotated[float, typer.Option(
        help="Beam scores are log-probability / length^THIS: above 1 favours longer "
             "outputs (fewer left-out MR slots), below 1 shorter ones; 0.8 is the LoRA "
             "paper's E2E setting (docs/method.md \"Defaults\")")] = 0.8,
    max_new_tokens: Annotated[int, typer.Option(help="Generation length cap")] = 64,
    decoder: Annotated[str, typer.Option(
        help="beam: our beam search (runner/evaluation/beam.py: outputs byte-identical to "
             "hf's, 1.8-2.4x the MRs per CPU-second); hf: Hugging Face generate(), the "
             "reference")] = "beam",
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the scores and what was scored as one JSON object on stdout "
                       "(lines for people go to stderr)")] = False,
    device: Annotated[str, typer.Option(
        help="Where the model generates: auto (the first CUDA GPU when one is usable, else "
             "the CPU) | cpu | cuda | cuda:N; on a GPU decoding is Hugging Face generate()'s "
             "(the same search; our beam search is measured on the CPU only). With --device "
             "cpu a visible GPU does not lift --cpu-max-mrs")] = "auto",
) -> None:
    """Generate for the test MRs (beam search) and score them against all their references:
    RUN/eval/ gets outputs.csv, outputs.txt + references.txt (the official E2E scorer's
    measure_scores.py inputs) and scores.json (BLEU/NIST/METEOR/ROUGE-L/CIDEr, and the slot
    error rate SER overall and per attribute)."""
    from runner.errors import UserError
    from runner.evaluation.evaluate import DecodeConfig, evaluate_run
    from runner.rundir import RunDir

    _quiet_libraries()
    if max_mrs < 0:
        _fail(f"--max-mrs must be >= 0 (0 = every MR), got {max_mrs}")
    if cpu_max_mrs is not None and cpu_max_mrs < 1:
        _fail(f"--cpu-max-mrs must be >= 1, got {cpu_max_mrs}")
    try:
        from runner import device as placement

        placement.resolve(device)  # a bad or unusable --device fails before anything else
    except UserError as exc:
        _fail(str(exc))
        return
    if cpu_max_mrs is not None and not max_mrs:
        from testbed.reduction import gpu_visible

        if not gpu_visible(device):
            max_mrs = cpu_max_mrs
            Console(soft_wrap=True).print(
                f"no GPU here: scoring at most {cpu_max_mrs} test MRs; every MR: "
                f"`testbed eval {run_dir}` (make run CPU_EVAL_MRS=0)", highlight=False)
    try:
        run = RunDir.open(run_dir)
        with _progress() as bar:
            task = bar.add_task("generate", total=None, info="")
            result = evaluate_run(
                run, data, test_data=test_data, max_mrs=max_mrs or None,
                decode=DecodeConfig(num_beams=beams, max_new_tokens=max_new_tokens,
                                    decoder=decoder, length_penalty=length_penalty),
                split=split,
                progress=lambda n: bar.advance(task, n),
                on_total=lambda n: bar.update(task, total=n),
                device=device,
            )
    except UserError as exc:
        _fail(str(exc))
        return
    scores = result["scores"]
    eval_dir = result["eval_dir"]  # RUN/eval/, or RUN/eval/validation/ (evaluate_run)
    if as_json:
        _print_json({"run": run_dir, "outputs": eval_dir / "outputs.txt",
                     "references": eval_dir / "references.txt", **result})
        return
    Console().print("  ".join(f"{k} {v:.4g}" for k, v in scores.items()), highlight=False)
    out = Console(soft_wrap=True)
    if "slot_errors" in result:  # SER per attribute (runner/evaluation/slots.py)
        from runner.evaluation.slots import describe

        out.print(describe(result["slot_errors"]), highlight=False, markup=False)
    n, of = result["test_mrs"], result["file_test_mrs"]
    where = (f"split by MR from {result['test_file']}" if result["protocol"] == "split-by-mr"
             else f"of {result['test_file']}")
    count = f"{n:,} MRs" if n == of else f"{n:,} of {of:,} MRs"
    tail = ", the whole file" if result["whole_file"] else ""
    out.print(f"{split}: {count} {where}{tail}", highlight=False, markup=False)
    out.print(f"outputs and scores written to {eval_dir}", highlight=False, markup=False)
    out.print(f"official scorer inputs: {eval_dir / 'outputs.txt'} and "
              f"{eval_dir / 'references.txt'} (measure_scores.py REFS OUTPUTS)",
              highlight=False, markup=False)


RunsArg = Annotated[list[Path], typer.Argument(
    help="Run directories (written by train, up or scenario run; one or more)",
    show_default=False)]
TargetOpt = Annotated[float | None, typer.Option(
    "--target-ppl", help="Target validation PPL for time-to-target and speed-ups "
                         "(default: the largest final PPL, which every run reaches)")]
BaselineOpt = Annotated[str | None, typer.Option(
    help="Method that speed-ups are relative to (default: the first run's method)")]
# `--out` named the figures directory / report file here before it meant the run directory
# everywhere: refused with the new name rather than taken in its old sense.
OldOutOpt = Annotated[str | None, typer.Option("--out", hidden=True)]


@app.command()
@_json_output
def plot(
    runs: RunsArg,
    figures_dir: Annotated[Path, typer.Option(
        "--figures-dir", "-o", help="Directory for the figures")] = Path("figures"),
    target_ppl: TargetOpt = None,
    baseline: BaselineOpt = None,
    old_out: OldOutOpt = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the figures written and skipped as one JSON object on "
                       "stdout")] = False,
) -> None:
    """Figures of one or many runs (PNG + PDF): PPL vs step / wall time / virtual time,
    speed-up to a target PPL, per-client timelines with dropouts, memory vs budget, bytes
    moved. Prints the files written."""
    from analysis.figures import plot_all
    from analysis.load import load_runs
    from runner.errors import UserError

    if old_out is not None:
        _fail(moved("--out", "--figures-dir DIR (-o DIR)", "the figures directory"))
    _quiet_libraries()
    try:
        with _load_warnings():
            run_set = load_runs(runs)
        plotted = plot_all(run_set, figures_dir, target_ppl, baseline)
    except UserError as exc:
        _fail(str(exc))
        return
    if as_json:
        _print_json({"figures_dir": figures_dir, "figures": plotted.files,
                     "skipped": plotted.skipped, "target_ppl": plotted.target,
                     "baseline": plotted.baseline})
        return
    for path in plotted.files:
        typer.echo(str(path))
    for name, reason in plotted.skipped.items():
        err.print(f"skipped {name}: {reason}", highlight=False, soft_wrap=True)


@app.command()
@_json_output
def report(
    runs: RunsArg,
    report_file: Annotated[Path, typer.Option(
        "--report-file", "-o", help="Markdown file to write (a directory: DIR/report.md); "
                                    "the figures go to <stem>_figures/ beside it")
    ] = Path("report.md"),
    target_ppl: TargetOpt = None,
    baseline: BaselineOpt = None,
    old_out: OldOutOpt = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the report's path, figures and comparison table (one row per "
                       "run) as one JSON object on stdout")] = False,
) -> None:
    """Markdown comparison of runs (the papers' table: PPL, BLEU, NIST, METEOR, ROUGE-L,
    CIDEr, time to target, client-side parameters, bytes moved) with the figures, which
    are written beside the report file under <stem>_figures/."""
    from analysis.load import load_runs
    from analysis.report import write_report
    from runner.errors import UserError

    if old_out is not None:
        _fail(moved("--out", "--report-file FILE (-o FILE)", "the report file"))
    _quiet_libraries()
    try:
        with _load_warnings() as warned:
            run_set = load_runs(runs)
        path, plotted = write_report(run_set, report_file, target_ppl, baseline, warned)
    except UserError as exc:
        _fail(str(exc))
        return
    if as_json:
        from analysis.derive import comparison

        table = comparison(run_set, plotted.target, plotted.baseline)
        _print_json({"report": path, "figures": plotted.files, "skipped": plotted.skipped,
                     "target_ppl": plotted.target, "baseline": plotted.baseline,
                     "warnings": warned, "runs": table.to_dict("records")})
        return
    typer.echo(str(path))
    for fig in plotted.files:
        typer.echo(str(fig))


# `testbed profiles list|show` (testbed/commands/profiles.py).
from testbed.commands.profiles import app as _profiles_app  # noqa: E402

app.add_typer(_profiles_app, name="profiles")

# `testbed images build [--offline]` (testbed/commands/images.py).
from testbed.commands.images import app as _images_app  # noqa: E402

app.add_typer(_images_app, name="images")

# `testbed experiment run|report|pack` (testbed/commands/experiment.py).
from testbed.commands.experiment import app as _experiment_app  # noqa: E402

app.add_typer(_experiment_app, name="experiment")

# `testbed scenario run` (testbed/commands/scenario.py).
from testbed.commands.scenario import app as _scenario_app  # noqa: E402

app.add_typer(_scenario_app, name="scenario")

# `testbed export k8s` (testbed/commands/export.py).
from testbed.commands.export import app as _export_app  # noqa: E402

app.add_typer(_export_app, name="export")


def main() -> None:
    app()


# Distributed runtime: up / status / down / inject (testbed/commands/runtime.py).
from testbed.commands import runtime as _runtime_commands  # noqa: E402

_runtime_commands.register(app)

# `testbed join` (testbed/commands/join.py): a real device takes one client's slot.
from testbed.commands import join as _join_commands  # noqa: E402

_join_commands.register(app)

if __name__ == "__main__":
    main()

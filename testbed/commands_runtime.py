"""``testbed up / status / down / inject``: the distributed runtime from the command line.

Why a module of its own: ``testbed/cli.py`` holds the in-process commands; these drive
processes (a broker, ``python -m runner.server``, N ``python -m runner.client``) through a
backend (only ``local`` for now, testbed/local.py; Docker Compose comes with the containers
issue) and must work from another terminal, through the state file the backend writes into
the run directory. :func:`register` adds them to the ``testbed`` app.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

RunOpt = Annotated[Path, typer.Option("--run", "--out", help="Run directory")]


def up(
    method: Annotated[str, typer.Option(help="splitlora | fedlora | cenlora (the methods the "
                                             "distributed runtime runs so far)")] = "splitlora",
    model: Annotated[str, typer.Option(help="Alias, local HF directory, .gguf or hub id")
                     ] = "smollm2-135m",
    data: Annotated[str | None, typer.Option(help="E2E CSV or 'synthetic'")] = None,
    clients: Annotated[int, typer.Option(help="Number of clients")] = 3,
    split: Annotated[int | None, typer.Option("--split", help="Split point k")] = None,
    rank: Annotated[int, typer.Option(help="LoRA rank")] = 8,
    targets: Annotated[str, typer.Option(help="Projections to adapt")] = "q,v",
    steps: Annotated[int, typer.Option(help="Training steps")] = 200,
    batch_size: Annotated[int, typer.Option(help="Mini-batch per client per step")] = 8,
    lr: Annotated[float | None, typer.Option(help="Learning rate")] = None,
    agg_interval: Annotated[int, typer.Option(help="Aggregate every I steps")] = 5,
    partition: Annotated[str, typer.Option(help="iid | dirichlet")] = "iid",
    dirichlet_alpha: Annotated[float, typer.Option(help="Dirichlet concentration")] = 0.5,
    eval_every: Annotated[int, typer.Option(help="Validate every N steps")] = 50,
    eval_max_examples: Annotated[int, typer.Option(help="Validation examples (0 = all)")] = 256,
    lora_dropout: Annotated[float, typer.Option(help="LoRA dropout")] = 0.1,
    max_len: Annotated[int, typer.Option(help="Max tokens per example")] = 128,
    seed: Annotated[int, typer.Option(help="Random seed")] = 0,
    out: Annotated[Path, typer.Option(help="Run directory")] = Path("runs/latest"),
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run in --out")] = False,
    backend: Annotated[str, typer.Option(help="local (processes on this machine)")] = "local",
    wire: Annotated[str, typer.Option(help="Activations/gradients on the wire: float32 | "
                                           "float16 | bfloat16")] = "float32",
    step_timeout: Annotated[float, typer.Option(help="Seconds a step waits for clients")
                            ] = 30.0,
    heartbeat: Annotated[float, typer.Option(help="Client heartbeat period (s)")] = 0.5,
    offline_after: Annotated[float, typer.Option(help="Silence (s) that marks a client "
                                                      "offline")] = 5.0,
    detach: Annotated[bool, typer.Option(help="Start and return; stop with `testbed down`")
                      ] = False,
) -> None:
    """Start a distributed run: broker, server and clients as processes, with live progress.

    Ctrl-C stops everything. From another terminal: `testbed status`, `testbed inject
    dropout`, `testbed down` (all take --run DIR)."""
    from runner.errors import UserError
    from runner.runtime import RuntimeOptions
    from testbed.cli import _fail, _quiet_libraries, train_config
    from testbed.local import LocalRun

    _quiet_libraries()
    if backend != "local":
        _fail(f"--backend {backend!r} is not available yet; use --backend local")
    cfg = train_config(
        method=method, model=model, data=data, clients=clients, split=split, rank=rank,
        targets=targets, steps=steps, batch_size=batch_size, lr=lr, agg_interval=agg_interval,
        partition=partition, dirichlet_alpha=dirichlet_alpha, eval_every=eval_every,
        eval_max_examples=eval_max_examples, lora_dropout=lora_dropout, max_len=max_len,
        seed=seed)
    try:
        cfg.validate()
        from runner.runtime import DISTRIBUTED_METHODS

        if method not in DISTRIBUTED_METHODS:
            raise UserError(f"method {method!r} is not distributed yet; `testbed up` runs "
                            f"{', '.join(DISTRIBUTED_METHODS)} (use `testbed train`)")
        opts = RuntimeOptions(step_timeout=step_timeout, heartbeat=heartbeat,
                              offline_after=offline_after, overwrite=overwrite,
                              wire=None if wire == "float32" else wire)
        opts.validate()
        run = LocalRun(cfg, out, opts)
        run.start()
    except UserError as exc:
        _fail(str(exc))
        return
    console = Console()
    console.print(f"run {run.run_id}: broker {run.url}, server + {len(run.clients)} clients; "
                  f"logs in {run.logs}", highlight=False)
    if detach:
        console.print(f"detached; `testbed status --run {out}`, `testbed down --run {out}`",
                      highlight=False)
        return
    try:
        code = _follow(run, cfg.steps, console)
    except KeyboardInterrupt:
        code = 130
        console.print("interrupted; stopping the run", highlight=False)
    finally:
        run.stop()
    if code != 0:
        _fail(f"the server exited with code {code}; see {run.logs / 'server.log'}")
    summary = json.loads((Path(out) / "summary.json").read_text())
    console.print(f"pretrained val PPL {summary['pretrained_val_ppl']:.3f} -> final "
                  f"{summary['final_val_ppl']:.3f}; run written to {out}", highlight=False)


def _follow(run: Any, total: int, console: Console | None = None) -> int:
    """Live view of the run directory (testbed/liveview.py: a table of clients updating in
    place on a terminal, plain lines otherwise) until the server exits; its exit code."""
    from testbed.liveview import follow

    return follow(run.run_dir, run.procs["server"].poll, console, steps=total)


def status(run: RunOpt = Path("runs/latest"),
           as_json: Annotated[bool, typer.Option("--json", help="Machine-readable")] = False,
           ) -> None:
    """Processes, broker, progress and event counts of a run started with `testbed up`."""
    from runner.errors import UserError
    from testbed.cli import _fail
    from testbed.local import status as local_status

    try:
        st = local_status(run)
    except UserError as exc:
        _fail(str(exc))
        return
    if as_json:
        typer.echo(json.dumps(st, indent=1))
        return
    c = Console()
    c.print(f"run {st['run_id']} in {st['run_dir']}  "
            f"{'finished' if st['finished'] else 'step ' + str(st['step'])}", highlight=False)
    if "loss" in st:
        c.print(f"loss {st['loss']:.4f}" + (f"  val PPL {st['val_ppl']:.3f}"
                                             if st.get("val_ppl") else ""), highlight=False)
    c.print(f"broker {st['broker']['url']} ({st['broker']['state']})", highlight=False)
    for who, p in st["processes"].items():
        c.print(f"  {who:<10} pid {p['pid']:<8} {p['state']}", highlight=False)
    if st["events"]:
        c.print("events: " + ", ".join(f"{k} {v}" for k, v in sorted(st["events"].items())),
                highlight=False)


def down(run: RunOpt = Path("runs/latest")) -> None:
    """Stop a run's processes and its broker (SIGTERM, then SIGKILL)."""
    from runner.errors import UserError
    from testbed.cli import _fail
    from testbed.local import down as local_down

    try:
        stopped = local_down(run)
    except UserError as exc:
        _fail(str(exc))
        return
    typer.echo("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


inject_app = typer.Typer(help="Inject faults into a running distributed run.",
                         no_args_is_help=True)


@inject_app.command("dropout")
def inject_dropout(
    client: Annotated[str, typer.Option("--client", help="Client id, e.g. client1")],
    seconds: Annotated[float | None, typer.Option(
        "--for", help="How long: kill -> restart after; pause/disconnect -> back after "
                      "(default 10 s; kill without --for stays dead)")] = None,
    mode: Annotated[str, typer.Option(help="kill (SIGKILL) | pause (SIGSTOP/SIGCONT) | "
                                           "disconnect (drop the broker connection)")
                    ] = "kill",
    run: RunOpt = Path("runs/latest"),
) -> None:
    """Take a client away (and bring it back after --for seconds)."""
    from runner.errors import UserError
    from testbed.cli import _fail
    from testbed.local import inject_dropout as local_inject

    try:
        typer.echo(local_inject(run, client, mode, seconds))
    except UserError as exc:
        _fail(str(exc))


def register(app: typer.Typer) -> None:
    """Add up / status / down / inject to the ``testbed`` app."""
    app.command()(up)
    app.command()(status)
    app.command()(down)
    app.add_typer(inject_app, name="inject")

"""``testbed up / status / down / inject``: the distributed runtime from the command line.

Why a module of its own: ``testbed/cli.py`` holds the in-process commands; these drive
processes (a broker, ``python -m runner.server``, N ``python -m runner.client``) through a
backend of testbed/backends/ (local.py processes, compose_run.py containers, swarm_run.py
a Docker stack; each offers status / down / logs / inject_dropout / inject_budget) and must
work from another terminal, through the state file the backend writes into the run
directory. :func:`register` adds them to the ``testbed`` app.
"""

from __future__ import annotations

import json
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from testbed.options import (
    DEFAULT_RUN,
    DEVICE_HELP,
    METHOD_HELP,
    OUT_HELP,
    PRECISION_HELP,
    RegistryHelp,
    RunAlias,
    RunArg,
    check_applies,
    check_combinations,
    comma,
)
from testbed.options import run_dir as _run_dir
from testbed.options import train_default as _D
from testbed.tlsmode import MTLS_HELP, NAME_HELP, TLS_HELP, TLSRequest

# The help of a training option a profile also sets. Without a profile an option not given
# keeps TrainConfig's default (runner/config.py, read here through train_default); with
# --profile it keeps the profile's experiment, and an option given overrides it.
_DEF = "(default: the profile's, else "


def up(
    profile: Annotated[str | None, typer.Option(
        help="Profile name (profiles/NAME.yaml, `testbed profiles list`) or path: devices, "
             "budgets and experiment come from it; the options below override its "
             "experiment")] = None,
    method: Annotated[str | None, typer.Option(
        help=f"{METHOD_HELP} {_DEF}{_D('method')})")] = None,
    model: Annotated[str | None, typer.Option(
        help=f"Alias, local HF directory, .gguf or hub id (default {_D('model')}; not with "
             "--profile, whose stand-in model is fixed by its devices)")] = None,
    data: Annotated[str | None, typer.Option(
        help="E2E CSV (split by MR), official release directory (its official split) or "
             "'synthetic'")] = None,
    clients: Annotated[int | None, typer.Option(
        help=f"Number of clients (default {_D('clients')}; not with --profile: its devices; "
             "{uses:clients})")] = None,
    split: Annotated[int | None, typer.Option(
        "--split", help="Split point k (default L/4; {uses:split})")] = None,
    rank: Annotated[int | None, typer.Option(
        help=f"LoRA rank {_DEF}{_D('rank')}; {{uses:rank}})")] = None,
    targets: Annotated[str | None, typer.Option(
        help=f"Projections to adapt {_DEF}{comma(_D('targets'))}; {{uses:targets}})")] = None,
    steps: Annotated[int | None, typer.Option(
        help=f"Training steps {_DEF}{_D('steps')})")] = None,
    batch_size: Annotated[int | None, typer.Option(
        help=f"Mini-batch per client per step {_DEF}{_D('batch_size')})")] = None,
    lr: Annotated[float | None, typer.Option(
        help="Learning rate (default 2e-4 for LoRA methods, 5e-5 for ft)")] = None,
    agg_interval: Annotated[int | None, typer.Option(
        help=f"Aggregate every I steps {_DEF}{_D('agg_interval')}; {{uses:agg_interval}})")
    ] = None,
    partition: Annotated[str | None, typer.Option(
        help=f"iid | dirichlet {_DEF}{_D('partition')}; {{uses:partition}})")] = None,
    dirichlet_alpha: Annotated[float | None, typer.Option(
        help=f"Dirichlet concentration, with a dirichlet partition (default "
             f"{_D('dirichlet_alpha')})")] = None,
    eval_every: Annotated[int | None, typer.Option(
        help=f"Validate every N steps {_DEF}{_D('eval_every')})")] = None,
    eval_max_examples: Annotated[int | None, typer.Option(
        help=f"Validation examples, 0 = all (default {_D('eval_max_examples')})")] = None,
    lora_dropout: Annotated[float | None, typer.Option(
        help=f"LoRA dropout (default {_D('lora_dropout')}; {{uses:lora_dropout}})")] = None,
    max_len: Annotated[int | None, typer.Option(
        help=f"Max tokens per example (default {_D('max_len')})")] = None,
    seed: Annotated[int | None, typer.Option(help=f"Random seed {_DEF}{_D('seed')})")] = None,
    server_chunk: Annotated[int | None, typer.Option(
        help="Clients per server forward/backward pass, IWI probe included; 0 = all at once "
             f"(default {_D('server_chunk')}; {{uses:server_chunk}}); bounds the server's memory "
             "at many clients (same gradient up to float rounding)")
    ] = None,
    out: Annotated[Path, typer.Option(help=OUT_HELP)] = DEFAULT_RUN,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run in --out")] = False,
    backend: Annotated[str, typer.Option(
        help="auto (compose when --profile is given and a Docker daemon answers, else "
             "local) | compose (containers, needs --profile) | swarm (a Docker stack on "
             "the swarm this engine manages, needs --profile; docs/swarm.md) | local "
             "(processes here)")
    ] = "auto",
    host_network: Annotated[bool, typer.Option(
        help="compose, swarm: every container on the host's network, broker on 127.0.0.1 "
             "(tests; the default is a private Compose network or a swarm overlay)")] = False,
    mem_limit: Annotated[list[str] | None, typer.Option(
        help="compose: override a client container's memory limit, CLIENT=BYTES (e.g. "
             "client2=300MB); repeatable. A limit below the need is recorded as "
             "budget_exceeded")] = None,
    broker: Annotated[str | None, typer.Option(
        help="local: use an existing broker, mqtt://host:port, instead of starting one per "
             "run (it must enforce or allow the run's topics, docs/protocol.md)")] = None,
    broker_passwords: Annotated[Path | None, typer.Option(
        help="With --broker: JSON {identity: password} for server, monitor and each client "
             "id (default: empty passwords, for a broker that allows anonymous access)")
    ] = None,
    wire: Annotated[str, typer.Option(help="Activations/gradients on the wire: float32 | "
                                           "float16 | bfloat16")] = "float32",
    step_timeout: Annotated[float | None, typer.Option(
        help="Seconds a step waits for clients (default 30 s; 120 s on the compose backend, "
             "where CPU quotas make slow devices slow; a crashed client is seen at once "
             "through the broker's last will either way)")] = None,
    join_timeout: Annotated[float, typer.Option(
        help="Seconds the server waits for clients to join at the start")] = 120.0,
    heartbeat: Annotated[float, typer.Option(help="Client heartbeat period (s)")] = 0.5,
    offline_after: Annotated[float | None, typer.Option(
        help="Silence (s) that marks a client offline (default 5 s; 30 s on the compose "
             "backend, where CPU quotas slow heartbeats; a crash is seen at once either way "
             "through the broker's last will)")] = None,
    min_step_time: Annotated[float, typer.Option(
        help="Pace steps to at least this many seconds (emulate slower devices; lets a "
             "fault land mid-run in a short run)")] = 0.0,
    detach: Annotated[bool, typer.Option(help="Start and return; stop with `testbed down`")
                      ] = False,
    join_slot: Annotated[list[str] | None, typer.Option(
        "--join-slot", help="Leave this client's slot to a device that joins with `testbed "
                            "join` (local backend; repeatable): its join file goes to "
                            "RUN/join/CLIENT.json")] = None,
    fork_clients: Annotated[bool, typer.Option(
        help="local: fork every client from one process that has imported the client "
             "runtime, so the clients share its pages (~290 MB less per client; many "
             "clients on one host, docs/benchmarks.md)")] = False,
    listen: Annotated[str, typer.Option(
        help="Address the run's broker listens on (local backend); 0.0.0.0 lets devices on "
             "the network join")] = "127.0.0.1",
    tls: Annotated[str, typer.Option("--tls", help=TLS_HELP)] = "auto",
    mtls: Annotated[bool, typer.Option("--mtls", help=MTLS_HELP)] = False,
    tls_name: Annotated[list[str] | None, typer.Option("--tls-name", help=NAME_HELP)] = None,
    cpu_steps: Annotated[int | None, typer.Option(
        help="With --profile and no --steps: when training runs on the CPU (--device), "
             "train this many steps instead of the profile's (validation points spread over "
             "them); printed in one line and recorded in config.json. `make run` uses 10")
    ] = None,
    cpu_eval_examples: Annotated[int | None, typer.Option(
        help="With --cpu-steps: cap the validation examples of such a CPU run")] = None,
    cpu_lr: Annotated[float | None, typer.Option(
        help="With --cpu-steps: the short run's peak learning rate (warm-up and linear decay "
             "follow the steps actually run); default: the profile's. `make run` uses 1e-3")
    ] = None,
    precision: Annotated[str, typer.Option(help=PRECISION_HELP)] = _D("precision"),
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = _D("device"),
) -> None:
    """Start a distributed run: broker, server and clients (containers or processes), with
    live progress.

    With --profile, the profile's devices are emulated on the stand-in model (the budget
    mapping is printed first, docs/emulation.md) and, on the compose backend, every client
    runs in a container capped to its budget. Ctrl-C stops everything. From another
    terminal: `testbed status`, `testbed logs`, `testbed inject dropout`, `testbed down`
    (each takes the run directory as RUN)."""
    from runner.distributed.runtime import RuntimeOptions
    from runner.errors import UserError
    from testbed.console import fail as _fail
    from testbed.console import quiet_libraries as _quiet_libraries
    from testbed.training import train_config

    _quiet_libraries()
    if backend not in ("auto", "compose", "swarm", "local"):
        _fail(f"--backend must be auto, compose, swarm or local, not {backend!r}")
    console = Console(soft_wrap=True)  # whole lines in a piped log
    previous = _terminate_as_interrupt()
    try:
        opts = RuntimeOptions(step_timeout=30.0 if step_timeout is None else step_timeout,
                              heartbeat=heartbeat,
                              offline_after=5.0 if offline_after is None else offline_after,
                              overwrite=overwrite,
                              join_timeout=join_timeout, min_step_time=min_step_time,
                              wire=None if wire == "float32" else wire)
        opts.validate()
        external = _external_broker(broker, broker_passwords)
        if external and backend in ("compose", "swarm"):
            raise UserError(f"--broker is for the local backend (the {backend} backend runs its "
                            "own broker container)")
        joins = LocalLaunch(tuple(join_slot or ()), listen, fork_clients)
        security = TLSRequest(tls, mtls, tuple(tls_name or ())).check()
        from runner import device as placement

        placement.resolve(device)  # a bad or unusable --device fails before anything starts
        if (joins.names or listen != "127.0.0.1" or fork_clients) and backend in (
                "compose", "swarm"):
            raise UserError("--join-slot, --listen and --fork-clients are for the local "
                            "backend (add --backend local)")
        given = {k: v for k, v in {
            "split": split, "rank": rank, "targets": targets, "batch_size": batch_size,
            "lr": lr, "agg_interval": agg_interval, "partition": partition,
            "dirichlet_alpha": dirichlet_alpha, "eval_every": eval_every,
            "eval_max_examples": eval_max_examples, "lora_dropout": lora_dropout,
            "max_len": max_len, "seed": seed, "server_chunk": server_chunk,
        }.items() if v is not None}
        # an option the run's method would not use is refused, before anything starts
        exp = _profile_experiment(profile) if profile is not None else None
        check_applies(method or (exp.method if exp else _D("method")),
                      [*given, *(["clients"] if clients is not None else [])])
        check_combinations(given, partition or (exp.partition if exp else _D("partition")))
        if profile is not None:
            for flag, value in (("--model", model), ("--clients", clients)):
                if value is not None:
                    raise UserError(f"{flag} does not go with --profile (the profile's devices "
                                    "fix the clients and the stand-in model); drop it, or "
                                    "leave out --profile")
            _up_profile(profile, joins=joins, tls=security, method=method, steps=steps,
                        data=data,
                        given=given, out=out,
                        overwrite=overwrite, backend=backend, host_network=host_network,
                        mem_limit=mem_limit or [], opts=opts, detach=detach, console=console,
                        external=external, offline_given=offline_after is not None,
                        step_timeout_given=step_timeout is not None,
                        cpu=(cpu_steps, cpu_eval_examples, cpu_lr), precision=precision,
                        device=device)
            return
        if cpu_steps is not None:
            raise UserError("--cpu-steps shortens a profile's experiment; use it with "
                            "--profile (without a profile, --steps sets the length)")
        if backend in ("compose", "swarm"):
            raise UserError(f"--backend {backend} needs --profile (the containers' memory caps "
                            "come from a profile's devices); see `testbed profiles list`")
        cfg = train_config(
            method=method or "splitlora", model=model or "smollm2-135m", data=data,
            clients=3 if clients is None else clients, steps=200 if steps is None else steps,
            precision=_precision(precision, console, device), device=device, **given)
        cfg.validate()
        _up_local(cfg, out, opts, detach, console, external, joins, security)
    except UserError as exc:
        _fail(str(exc))
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _profile_experiment(name: str) -> Any:
    """The experiment of profile ``name`` (its method and partition decide which options
    apply when --method or --partition is not given)."""
    from testbed.profiles import load_profile

    return load_profile(name).experiment


def _terminate_as_interrupt() -> Any:
    """Make SIGTERM stop a foreground run as Ctrl-C does; the previous handler (None off the
    main thread, where no handler can be set).

    Why: a `kill`, a CI timeout or a stopped `make run` sends SIGTERM, whose default ends the
    process at once and leaves the broker, server and client containers (or processes)
    running; raised as KeyboardInterrupt it goes through the same clean-up as Ctrl-C.
    """
    if threading.current_thread() is not threading.main_thread():
        return None

    def _raise(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, _raise)


def _external_broker(url: str | None, passwords: Path | None
                     ) -> tuple[str, dict[str, str] | None] | None:
    """(url, passwords) of ``--broker``; validated here so a typo fails before any start."""
    from runner.distributed.broker import parse_broker_url
    from runner.errors import UserError

    if url is None:
        if passwords is not None:
            raise UserError("--broker-passwords needs --broker URL")
        return None
    parse_broker_url(url)
    if passwords is None:
        return url, None
    try:
        doc = json.loads(Path(passwords).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read --broker-passwords {passwords}: {exc}") from None
    if not isinstance(doc, dict) or not all(isinstance(v, str) for v in doc.values()):
        raise UserError(f"--broker-passwords {passwords} must be a JSON object "
                        '{"identity": "password", ...}')
    return url, {str(k): v for k, v in doc.items()}


@dataclass(frozen=True)
class LocalLaunch:
    """How the local backend launches a run: ``--join-slot`` clients (left to devices
    running ``testbed join``, testbed/backends/join.py), the broker's ``--listen`` address, and
    ``--fork-clients`` (clients forked from one process, runner/forkserver.py)."""

    names: tuple[str, ...] = ()
    listen: str = "127.0.0.1"
    fork_clients: bool = False


def _up_local(cfg: Any, out: Path, opts: Any, detach: bool, console: Console,
              external: tuple[str, dict[str, str] | None] | None = None,
              joins: LocalLaunch = LocalLaunch(), tls: TLSRequest = TLSRequest(),
              gpus: dict[str, int | str] | None = None) -> None:
    """Local backend: broker (or ``--broker``), server and clients as processes here;
    ``gpus``: each process's profile ``gpu:`` selector (testbed/backends/local.py
    ``gpu_env``)."""
    from testbed.backends.local import LocalRun
    from testbed.console import fail as _fail

    _print_data(cfg, console)
    choice = tls.decide("local", listen=joins.listen,
                        external=external[0] if external is not None else None)
    run = LocalRun(cfg, out, opts, join_slots=joins.names, listen=joins.listen,
                   fork_clients=joins.fork_clients, tls=choice.on and not choice.external,
                   mtls=choice.mutual, tls_names=choice.names, gpus=dict(gpus or {}))
    if external is not None:
        url, passwords = external
        run.broker_url = url
        run.passwords = dict(passwords or {})
        missing = [w for w in ["server", *run.clients] if passwords is not None
                   and w not in passwords]
        if missing:
            from runner.errors import UserError

            raise UserError(f"--broker-passwords has no password for {', '.join(missing)}")
        # kept (mode 0600) where `testbed inject --mode kill --for` finds them to restart
        from runner.distributed.broker import write_private

        (Path(out) / "broker").mkdir(parents=True, exist_ok=True)
        write_private(Path(out) / "broker" / "credentials.json",
                       json.dumps({w: run.password(w) for w in ["server", *run.clients]}))
    run.start()
    console.print(choice.line(run.pki.ca if run.pki else None), highlight=False)
    console.print(f"run {run.run_id}: broker {run.url}, server + {len(run.clients)} clients; "
                  f"logs in {run.logs}", highlight=False)
    for name, path in run.join_files.items():
        console.print(f"{name} waits for a device: testbed join --broker {run.public_url} "
                      f"--run-id "
                      f"{run.run_id} --client {name} --credentials {path} (copy the file to "
                      "the device; --model and --data give its own paths)", highlight=False)
    if detach:
        console.print(f"detached; `testbed status {out}`, `testbed down {out}`",
                      highlight=False)
        return
    try:
        code = _follow(run.run_dir, run.procs["server"].poll, cfg.steps, console)
    except KeyboardInterrupt:
        code = 130
        console.print("interrupted; stopping the run", highlight=False)
    finally:
        run.stop()
    if code != 0:
        _fail(f"the server exited with code {code}; see {run.logs / 'server.log'}")
    _print_summary(out, console)


def _print_data(cfg: Any, console: Console) -> None:
    """Print which files train, validate and test the run (runner/dataset/splits.py), resolved here
    before anything starts, so a bad --data fails at once and in one line."""
    from runner.dataset.data import load_e2e
    from runner.dataset.splits import DataProtocol

    proto = DataProtocol.for_config(cfg)
    rows = len(load_e2e(proto.train)) if proto.official else None
    console.print(proto.line(rows), highlight=False, markup=False)


def _print_summary(out: Path, console: Console) -> None:
    summary = json.loads((Path(out) / "summary.json").read_text())
    console.print(f"pretrained val PPL {summary['pretrained_val_ppl']:.3f} -> final "
                  f"{summary['final_val_ppl']:.3f}; run written to {out}", highlight=False)


def _up_profile(name: str, *, joins: LocalLaunch = LocalLaunch(),
                tls: TLSRequest = TLSRequest(), method: str | None,
                steps: int | None, data: str | None,
                given: dict[str, Any], out: Path, overwrite: bool, backend: str, host_network: bool,
                mem_limit: list[str], opts: Any, detach: bool, console: Console,
                external: tuple[str, dict[str, str] | None] | None = None,
                offline_given: bool = False, step_timeout_given: bool = False,
                cpu: tuple[int | None, int | None, float | None] = (None, None, None),
                precision: str = "fp32", device: str = "auto") -> None:
    """``testbed up --profile``: emulation mapping, then compose, local or in-process.

    What depends on where training runs (whether the reference is emulated, the CPU
    reduction, the precision) is decided for ``device`` (docs/gpu.md "Device placement")."""
    from dataclasses import replace

    from runner.errors import UserError
    from testbed import profiles as P
    from testbed.reduction import gpu_visible, reduce_for_cpu
    from testbed.training import config_values

    prof = P.load_profile(name)
    mapping = P.emulation_map(prof, device=device)
    P.print_emulation(mapping, console)
    cfg = P.train_config(prof, mapping)
    changes: dict[str, Any] = {}
    if method is not None:
        changes["method"] = method
    if steps is not None:
        changes["steps"] = steps
    if data is not None:
        changes["data"] = data
    changes.update(config_values(**given))
    if changes:
        console.print("overriding the profile's experiment: " + ", ".join(
            f"{k}={v}" for k, v in changes.items()), highlight=False)
    changes["precision"] = _precision(precision, console, device)
    changes["device"] = device
    cfg = replace(cfg, **changes)
    cpu_steps, cpu_examples, cpu_lr = cpu
    for flag, value in (("--cpu-eval-examples", cpu_examples), ("--cpu-lr", cpu_lr)):
        if cpu_steps is None and value is not None:
            raise UserError(f"{flag} goes with --cpu-steps")
    if cpu_steps is not None and steps is None:
        if gpu_visible(device):
            console.print(f"training on a CUDA GPU: the profile's {cfg.steps} steps run whole",
                          highlight=False)
        else:
            cfg, reduction = reduce_for_cpu(cfg, cpu_steps, cpu_examples, cpu_lr)
            if reduction is not None:
                console.print(reduction.line(), highlight=False)
                cfg = replace(cfg, extra={**cfg.extra, "cpu_reduction": reduction.to_dict()})
    cfg.validate()
    if backend == "auto":
        backend = _auto_backend(external, console, joins)
    if backend == "local":
        out.mkdir(parents=True, exist_ok=True)
        devices = P.write_devices_file(mapping, out / "devices.json",
                                       [d.availability for d in prof.devices])
        _up_local(replace(cfg, devices=str(devices)), out, opts, detach, console, external,
                  joins, tls, gpus=local_gpus(prof))
        return
    from testbed.backends.compose import CONTAINER_OFFLINE_AFTER, CONTAINER_STEP_TIMEOUT

    if not offline_given:
        opts = replace(opts, offline_after=CONTAINER_OFFLINE_AFTER)
    if not step_timeout_given:
        opts = replace(opts, step_timeout=CONTAINER_STEP_TIMEOUT)
    _up_compose(prof, mapping, cfg, out, opts, host_network, mem_limit, detach, console,
                swarm=backend == "swarm", tls=tls)


def local_gpus(prof: Any) -> dict[str, int | str]:
    """Each process's ``gpu:`` selector in profile ``prof``, keyed as the local backend
    names its processes (the profile's ``i``-th device is ``client<i>``, its row of the
    devices file; the server ``server``): what it puts in their environment, as Compose
    reserves it (docs/gpu.md "Device placement"). A device without one (or with ``mig:``
    alone, a size with no instance named) is left out."""
    from runner.distributed.runtime import default_clients

    names = default_clients(len(prof.devices))
    out: dict[str, int | str] = {cid: d.gpu for cid, d in zip(names, prof.devices, strict=True)
                                 if d.gpu is not None}
    if prof.server.gpu is not None:
        out["server"] = prof.server.gpu
    return out


def _precision(choice: str, console: Console, device: str = "auto") -> str:
    """``--precision`` resolved for training on ``device`` (auto -> fp32, bf16 or fp16) and
    printed in one line."""
    from runner import device as placement
    from testbed.precision import resolve

    chosen, line = resolve(choice, device=placement.resolve(device))
    console.print(line, highlight=False)
    return chosen


def _auto_backend(external: Any, console: Console, joins: LocalLaunch = LocalLaunch()) -> str:
    """compose when a Docker daemon and Compose answer, else local, saying why in one line
    (the local backend runs the same fleet without memory caps)."""
    from testbed.backends.compose import compose_command
    from testbed.backends.images import daemon_available

    if external is not None:
        console.print("backend: local (--broker given)", highlight=False)
        return "local"
    if joins.names or joins.listen != "127.0.0.1" or joins.fork_clients:
        console.print("backend: local (--join-slot, --listen or --fork-clients given)",
                      highlight=False)
        return "local"
    why = ("no Docker daemon answers" if not daemon_available() else
           "neither `docker compose` nor `docker-compose` is installed"
           if not compose_command() else "")
    if not why:
        console.print("backend: compose (memory-capped containers)", highlight=False)
        return "compose"
    console.print(f"backend: local processes, not containers: {why} (start Docker, or "
                  "`make run` as root sets it up); clients get no memory caps",
                  highlight=False)
    return "local"


def _up_compose(prof: Any, mapping: Any, cfg: Any, out: Path, opts: Any, host_network: bool,
                mem_limit: list[str], detach: bool, console: Console, swarm: bool = False,
                tls: TLSRequest = TLSRequest()) -> None:
    """Compose backend (testbed/backends/compose_run.py), or with ``swarm`` the same run as a Docker
    stack (testbed/backends/swarm_run.py): containers, OOM watch, live view."""

    from testbed.backends.compose_run import ComposeRun, parse_mem_limits
    from testbed.backends.images import ensure_images
    from testbed.backends.swarm_run import SwarmRun, swarm_manager
    from testbed.console import fail as _fail

    _print_data(cfg, console)
    nodes = 1
    if swarm:  # before the images are built: one line if there is no swarm
        nodes = int(swarm_manager().get("Nodes") or 1)
    choice = tls.decide("swarm" if swarm else "compose", nodes=nodes,
                        host_network=host_network)
    kind = SwarmRun if swarm else ComposeRun
    run = kind(prof, mapping, cfg, out, opts, host_network=host_network,
               mem_limits=parse_mem_limits(mem_limit), tls=choice.on, mtls=choice.mutual,
               tls_names=choice.names)
    ensure_images(log=lambda m: console.print(m, highlight=False))
    try:
        run.start()
    except KeyboardInterrupt:  # run.start() took down what it had started
        _fail("interrupted while starting the fleet; what was started is down")
    console.print(choice.line(run.pki.ca if run.pki else None), highlight=False)
    if isinstance(run, SwarmRun):
        console.print(f"run {run.run_id}: stack {run.stack}, broker + server + "
                      f"{len(run.clients)} client services; stack file {run.stack_file}",
                      highlight=False)
    else:
        console.print(f"run {run.run_id}: compose project {run.project}, broker + server + "
                      f"{len(run.clients)} client containers; override {run.override}",
                      highlight=False)
    if detach:
        # the watch goes on without us: a process of its own (testbed/backends/watcher.py)
        from testbed.backends import watcher

        info = watcher.start(run.run_dir)
        console.print(f"detached; watcher pid {info['pid']} (OOM -> budget_exceeded, "
                      f"availability traces; log {info['log']}); `testbed status {out}`, "
                      f"`testbed down {out}`", highlight=False)
        return
    stop = threading.Event()
    watcher = threading.Thread(target=run.watch, args=(stop,), daemon=True)
    watcher.start()
    try:
        code = _follow(run.run_dir, run.server_exit, cfg.steps, console)
    except KeyboardInterrupt:
        code = 130
        console.print("interrupted; stopping the run", highlight=False)
    finally:
        stop.set()
        watcher.join(5)
        run.check_oom()
        run.stop()
    for client in sorted(run.recorded_oom):
        console.print(f"{client}: budget exceeded (OOM-killed in its container); the run went "
                      "on without it", highlight=False)
    if code != 0:
        _fail(f"the server exited with code {code}; see {run.logs / 'server.log'}")
    _print_summary(out, console)


def _follow(run_dir: Path, poll: Any, total: int, console: Console | None = None) -> int:
    """Live view of the run directory (testbed/liveview.py: a table of clients updating in
    place on a terminal, plain lines otherwise) until ``poll()`` gives the server's exit
    code; that code."""
    from testbed.liveview import follow

    return follow(run_dir, poll, console, steps=total)


def _watch_state(run: Path, backend: Any) -> dict[str, Any]:
    """A detached compose run's watcher process and its state, for ``status``."""
    from testbed.backends import watcher

    return watcher.state(run) if backend.__name__ == "testbed.backends.compose_run" else {}


def _backend(run: Path) -> tuple[Path, Any]:
    """The run directory meant (runs/latest: the latest started run) and the module of the
    backend that started it."""
    import importlib

    from testbed.backends.local import read_state, resolve_run

    run = resolve_run(run)
    name = str(read_state(run).get("backend", "local"))
    modules = {"local": "testbed.backends.local", "compose": "testbed.backends.compose_run",
               "swarm": "testbed.backends.swarm_run"}
    return run, importlib.import_module(modules.get(name, "testbed.backends.local"))


def status(run: RunArg = None,
           as_json: Annotated[bool, typer.Option(
               "--json", help="Print the status as one JSON object on stdout")] = False,
           old_run: RunAlias = None,
           ) -> None:
    """Processes or containers, broker, progress and event counts of a run started with
    `testbed up`."""
    from runner.errors import UserError
    from testbed.console import fail as _fail

    try:
        run, backend = _backend(_run_dir(run, old_run))
        st = backend.status(run)
        st.update(_watch_state(run, backend))
        if (Path(run) / "config.json").is_file():
            from analysis.audit import audit_run

            st["audit"] = audit_run(run)
    except UserError as exc:
        _fail(str(exc))
        return
    if as_json:
        typer.echo(json.dumps(st, indent=1))
        return
    c = Console()
    head = st.get("run_id") or st.get("project")
    c.print(f"run {head} in {st['run_dir']} ({st['backend']})  "
            f"{'finished' if st['finished'] else 'step ' + str(st['step'])}", highlight=False)
    if "loss" in st:
        c.print(f"loss {st['loss']:.4f}" + (f"  val PPL {st['val_ppl']:.3f}"
                                             if st.get("val_ppl") else ""), highlight=False)
    if st["backend"] in ("compose", "swarm"):
        for who, info in st["containers"].items():
            extra = "  OOM-killed" if info["oom_killed"] else ""
            limit = f"  limit {info['mem_limit'] / 2**20:.0f} MiB" if info["mem_limit"] else ""
            node = f"  on {info['node']}" if info.get("node") else ""
            c.print(f"  {who:<10} {info['state']:<8}{limit}{node}{extra}", highlight=False)
    else:
        c.print(f"broker {st['broker']['url']} ({st['broker']['state']})", highlight=False)
        for who, p in st["processes"].items():
            c.print(f"  {who:<10} pid {p['pid']:<8} {p['state']}", highlight=False)
    if st["events"]:
        c.print("events: " + ", ".join(f"{k} {v}" for k, v in sorted(st["events"].items())),
                highlight=False)
    if "watcher" in st:
        w = st["watcher"]
        c.print(f"watcher pid {w['pid']} {w['state']} (OOM -> budget_exceeded, availability "
                "traces)", highlight=False)
    if "audit" in st:
        from analysis.audit import audit_lines

        for line in audit_lines(st["audit"]):
            c.print(line, highlight=False, markup=False)


def down(run: RunArg = None, old_run: RunAlias = None) -> None:
    """Stop a run: its processes and broker (SIGTERM, then SIGKILL), or its containers
    (their logs are saved into RUN/logs first)."""
    from runner.errors import UserError
    from testbed.console import fail as _fail

    try:
        run, backend = _backend(_run_dir(run, old_run))
        # a detached compose run's watcher first: on SIGTERM it checks the containers for
        # OOM kills a last time
        from testbed.backends import watcher

        watched = backend.__name__ == "testbed.backends.compose_run" and watcher.stop(run)
        stopped = backend.down(run) + (["watcher"] if watched else [])
    except UserError as exc:
        _fail(str(exc))
        return
    typer.echo("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


def logs(
    run: RunArg = None,
    service: Annotated[str | None, typer.Argument(
        metavar="SERVICE", help="server, broker or a client id (default: all)",
        show_default=False)] = None,
    tail: Annotated[int, typer.Option(help="Lines per service")] = 50,
    old_run: RunAlias = None,
) -> None:
    """The last lines of the run's logs (container output, or RUN/logs/*.log locally).

    `testbed logs RUN [SERVICE]`; the older `testbed logs [SERVICE] [--run RUN]` still works:
    with --run, or when the one argument is not a directory, it is the service."""
    from runner.errors import UserError
    from testbed.console import fail as _fail

    try:
        given = str(run) if run is not None else None
        if old_run is not None or (service is None and given is not None
                                   and not Path(given).is_dir() and "/" not in given):
            if service is not None:
                raise UserError(f"--run {old_run} and RUN {run} both name a run; give it once, "
                                "as RUN: testbed logs RUN [SERVICE]")
            run, service = old_run, given
        where, backend = _backend(_run_dir(run, None))
        typer.echo(backend.logs(where, service, tail))
    except UserError as exc:
        _fail(str(exc))


inject_app = typer.Typer(help="Inject faults into a running distributed run.",
                         no_args_is_help=True)


@inject_app.command("dropout")
def inject_dropout(
    client: Annotated[str, typer.Option("--client", help="Client id, e.g. client1")],
    seconds: Annotated[float | None, typer.Option(
        "--for", help="How long: kill -> restart after; pause/stop/disconnect -> back after "
                      "(default 10 s; kill without --for stays dead)")] = None,
    mode: Annotated[str, typer.Option(help="kill (SIGKILL) | pause (SIGSTOP/SIGCONT; the "
                                           "cgroup freezer for containers) | stop (SIGTERM, "
                                           "containers only) | disconnect (drop the network "
                                           "or broker connection)")
                    ] = "kill",
    run: RunArg = None,
    old_run: RunAlias = None,
) -> None:
    """Take a client away (and bring it back after --for seconds)."""
    from runner.errors import UserError
    from testbed.console import fail as _fail

    try:
        run, backend = _backend(_run_dir(run, old_run))
        typer.echo(backend.inject_dropout(run, client, mode, seconds))
    except UserError as exc:
        _fail(str(exc))


@inject_app.command("budget")
def inject_budget(
    client: Annotated[str, typer.Option("--client", help="Client id, e.g. client1")],
    memory: Annotated[str, typer.Option(
        "--memory", help="The device's new memory budget: bytes or a size such as 600MB, "
                         "1.5GiB")],
    run: RunArg = None,
    old_run: RunAlias = None,
) -> None:
    """Change a client's memory budget mid-run (another app took or freed memory).

    The client reports it in its next heartbeat; HSplitLoRA's ARMSC re-plans at the next
    aggregation (split point, ranks; blocks handed over when a split point moves up).
    Containers also get the new limit (reserve + budget) through the Docker API."""
    from runner.errors import UserError
    from testbed.console import fail as _fail
    from testbed.profiles import parse_bytes

    try:
        try:
            budget = parse_bytes(memory)
        except ValueError as exc:
            raise UserError(f"--memory: {exc}") from exc
        run, backend = _backend(_run_dir(run, old_run))
        typer.echo(backend.inject_budget(run, client, budget))
    except UserError as exc:
        _fail(str(exc))


def register(app: typer.Typer) -> None:
    """Add up / status / down / inject to the ``testbed`` app."""
    app.command(cls=RegistryHelp)(up)
    app.command()(status)
    app.command()(down)
    app.command()(logs)
    app.add_typer(inject_app, name="inject")

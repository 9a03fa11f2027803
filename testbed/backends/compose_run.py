"""Compose backend: a profile's broker, server and clients as memory-capped containers.

``testbed up --profile NAME --backend compose`` (or ``auto`` when a Docker daemon answers):

1. the profile is mapped onto the stand-in (testbed/profiles.py, docs/emulation.md) and the
   mapping printed;
2. the run directory is prepared on the host: ``runtime.json`` (paths as the containers see
   them: the run directory at ``/run/testbed``, the model cache at ``/cache``, the data file
   under ``/data``), ``devices.json``, the broker's config, credentials and ACL
   (``broker/``, runner/distributed/broker.py ``write_container_broker``) and one password file per
   participant (``secrets/``); with TLS (``--tls on``; compose is one host, so ``auto`` is
   off) the run's certificates in ``tls/`` (runner/distributed/tls.py), the broker on 8883
   with TLS only and every container told where its TLS files are;
3. the model is materialised on the host first (a GGUF conversion needs the whole model in
   memory, which a small client container must never pay) and the cache mounted;
4. ``compose.override.yaml`` is generated (testbed/backends/compose.py) and
   ``docker compose -p PROJECT -f compose.yaml -f RUN/compose.override.yaml up -d`` started;
5. while the server container runs, the host watches the containers through the Docker SDK:
   a client container that exits with ``OOMKilled`` is recorded in ``events.jsonl`` as
   ``budget_exceeded`` (its limit and the profile budget), not as a testbed crash; the
   server has already gone on without it (offline detection, docs/protocol.md). The host
   also samples every container's memory through the Docker API (``container.stats``:
   the cgroup's usage, peak and limit) into ``RUN/resources.jsonl`` and keeps the last
   reading, so an OOM-killed client's ``budget_exceeded`` carries what it last used.

Faults are injected into the containers (``testbed inject dropout``): ``kill`` (SIGKILL, and
``docker start`` after ``--for``), ``pause`` (cgroup freezer), ``stop`` (SIGTERM then start),
``disconnect`` (``docker network disconnect`` / connect; on host networking, where a
container has no network of its own, the client drops its broker connection on SIGUSR1, as
in the local backend).

A state file (``testbed-state.json``, backend "compose") lets ``testbed status|down|logs|
inject`` work from another terminal.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from runner.config import TrainConfig
from runner.distributed.runtime import RuntimeOptions, write_config
from runner.distributed.tls import (
    LOOPBACK_NAMES,
    TLS_PORT,
    BrokerTLS,
    ClientTLS,
    RunPKI,
    make_pki,
)
from runner.errors import UserError
from runner.rundir import EVENTS, HOST_PATHS, clear_injected, write_injected, write_json
from testbed.backends.compose import (
    BASE_COMPOSE,
    RUN_MOUNT,
    ComposeOptions,
    client_limit,
    compose_command,
    container_limit,
    write_override,
)
from testbed.backends.images import BROKER_IMAGE, RUNTIME_IMAGE, docker_client
from testbed.backends.local import STATE
from testbed.profiles import EmulationMap, Profile

OVERRIDE = "compose.override.yaml"
RESOURCES = "resources.jsonl"  # the host's container memory samples (docs/run-format.md)
CACHE_MOUNT = "/cache"
DATA_MOUNT = "/data"
PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"


def project_name(run_id: str) -> str:
    """Compose project names: lowercase letters, digits, '-' and '_' (v1 drops the rest)."""
    clean = "".join(c if c.isalnum() or c in "-_" else "-" for c in run_id.lower())
    return f"hsl-{clean}"[:60]


def project_containers(project: str) -> dict[str, Any]:
    """service name -> container (all states) of Compose project ``project``."""
    found = docker_client().containers.list(all=True,
                                            filters={"label": f"{PROJECT_LABEL}={project}"})
    return {c.labels.get(SERVICE_LABEL, c.name): c for c in found}


def parse_mem_limits(items: list[str]) -> dict[str, int]:
    """``--mem-limit client2=300MB`` (repeatable) -> {"client2": 300000000}."""
    from testbed.profiles import parse_bytes

    out: dict[str, int] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise UserError(f"--mem-limit {item!r}: write CLIENT=BYTES, e.g. client2=300MB")
        try:
            out[name.strip()] = parse_bytes(value.strip())
        except (UserError, ValueError) as exc:
            raise UserError(f"--mem-limit {item!r}: {exc}") from None
    return out


@dataclass
class ComposeRun:
    """One containerised run of a profile (see the module docstring)."""

    profile: Profile
    mapping: EmulationMap
    train: TrainConfig
    run_dir: Path
    options: RuntimeOptions = field(default_factory=RuntimeOptions)
    host_network: bool = False
    mem_limits: dict[str, int] = field(default_factory=dict)
    run_id: str | None = None
    compose: list[str] | None = None
    recorded_oom: set[str] = field(default_factory=set)
    trace_down: set[str] = field(default_factory=set)  # taken down by an availability trace
    last_stats: dict[str, dict[str, Any]] = field(default_factory=dict)  # service -> reading
    stats_written: dict[str, float] = field(default_factory=dict)  # service -> when written
    tls: bool = False  # the broker speaks TLS only (testbed/tlsmode.py decides)
    mtls: bool = False  # ... and every participant presents its certificate
    tls_names: tuple[str, ...] = ()  # extra names in the broker's certificate
    pki: RunPKI | None = None  # the run's certificates once issued (RUN/tls/)

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir).resolve()
        self.run_id = self.run_id or "".join(
            c if c.isalnum() or c in "_.-" else "-" for c in self.run_dir.name)[:64] or "run"
        self.project = project_name(self.run_id)
        self.clients = [d.name for d in self.profile.devices]
        unknown = set(self.mem_limits) - set(self.clients)
        if unknown:
            raise UserError(f"--mem-limit names unknown clients {sorted(unknown)}; the "
                            f"profile's clients are {', '.join(self.clients)}")

    @property
    def logs(self) -> Path:
        return self.run_dir / "logs"

    @property
    def override(self) -> Path:
        return self.run_dir / OVERRIDE

    # ------------------------------------------------------------------------ prepare
    def broker_names(self) -> list[str]:
        """What the broker's certificate names: the Compose service (how the containers
        reach it), and loopback (``--host-network``)."""
        return ["broker", *LOOPBACK_NAMES, *self.tls_names]

    def client_tls_paths(self) -> ClientTLS:
        """The TLS files as the server and client containers see them (``{who}``: the
        service's identity): the run directory's ``tls/``, mounted with it."""
        base = f"{RUN_MOUNT}/tls"
        if not self.mtls:
            return ClientTLS(f"{base}/ca.crt")
        return ClientTLS(f"{base}/ca.crt", f"{base}/{{who}}.crt", f"{base}/{{who}}.key")

    def broker_tls(self, pki: RunPKI) -> BrokerTLS:
        """The broker's TLS files as its container sees them."""
        return pki.broker(inside=f"{RUN_MOUNT}/tls")

    def _container_train(self) -> tuple[TrainConfig, dict[str, str]]:
        """The TrainConfig with container paths, and the extra bind mounts it needs."""
        from runner.model.models import cache_dir, materialise

        mounts: dict[str, str] = {}
        materialise(self.train.model)  # convert / create on the host, once
        cache = cache_dir()
        mounts[str(cache.resolve())] = CACHE_MOUNT
        from runner.dataset.data import SYNTHETIC, resolve_source

        cfg = replace(self.train, devices=f"{RUN_MOUNT}/devices.json")
        # resolved on the host ($TESTBED_DATA, the cache, a download), then mounted: a CSV's
        # folder, or a whole official release directory (runner/dataset/splits.py) as /data itself
        data = resolve_source(self.train.data)
        if data != SYNTHETIC:
            path = Path(data).expanduser().resolve()
            if path.is_dir():
                mounts[str(path)] = f"{DATA_MOUNT}:ro"
                cfg = replace(cfg, data=DATA_MOUNT)
            else:
                mounts[str(path.parent)] = f"{DATA_MOUNT}:ro"
                cfg = replace(cfg, data=f"{DATA_MOUNT}/{path.name}")
        return cfg, mounts

    def prepare(self) -> ComposeOptions:
        """Write everything the containers read into the run directory (no Docker calls)."""
        from runner.distributed.broker import MONITOR_USER, free_port, write_container_broker
        from testbed.profiles import write_devices_file

        if (self.run_dir / "config.json").exists() and not self.options.overwrite:
            raise UserError(f"run directory {self.run_dir} already holds a run; choose another "
                            "--out or pass --overwrite")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.options.overwrite:
            for name in ("config.json", "metrics.jsonl", EVENTS, "summary.json"):
                (self.run_dir / name).unlink(missing_ok=True)
        clear_injected(self.run_dir)
        self.logs.mkdir(exist_ok=True)
        port = free_port() if self.host_network else TLS_PORT if self.tls else 1883
        if self.tls or self.mtls:
            self.pki = make_pki(self.run_dir / "tls", run=str(self.run_id),
                                hosts=self.broker_names(),
                                identities=["server", MONITOR_USER, *self.clients],
                                mutual=self.mtls)
        cfg, self.mounts = self._container_train()
        run_volume = f"{self.run_dir}:{RUN_MOUNT}"
        opts = ComposeOptions(
            run_id=str(self.run_id), host_network=self.host_network, broker_port=port,
            mem_limits=dict(self.mem_limits),
            volumes=(run_volume, *(f"{host}:{inside}" for host, inside in self.mounts.items())),
            broker_volumes=(run_volume,), user=f"{os.getuid()}:{os.getgid()}",
            env={"TESTBED_CACHE": CACHE_MOUNT},
            tls_paths=self.client_tls_paths() if self.pki else None,
            cuda_host_reserve=self.cuda_host_reserve())
        write_devices_file(self.mapping, self.run_dir / "devices.json",
                           [d.availability for d in self.profile.devices])
        creds = write_container_broker(
            str(self.run_id), self.clients, self.run_dir / "broker", port=port,
            mount=f"{RUN_MOUNT}/broker", host="127.0.0.1" if self.host_network else "0.0.0.0",
            tls=self.broker_tls(self.pki) if self.pki else None)
        secrets = self.run_dir / "secrets"
        secrets.mkdir(exist_ok=True)
        for who, c in creds.items():
            fd = os.open(secrets / who, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(c.password + "\n")
        # container paths -> host paths, so eval / report work from the host afterwards
        write_json(self.run_dir / HOST_PATHS, {
            "run_mount": RUN_MOUNT,
            "mounts": {inside.split(":")[0]: host for host, inside in self.mounts.items()}})
        write_config(self.run_dir / "runtime.json", cfg, Path(RUN_MOUNT),
                     run_id=str(self.run_id), clients=self.clients, broker=opts.broker_url(),
                     options=self.options)
        write_override(self.profile, self.mapping, self.override, opts)
        return opts

    # -------------------------------------------------------------------------- start
    def compose_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({"TESTBED_RUN_DIR": str(self.run_dir), "TESTBED_RUN_ID": str(self.run_id),
                    "TESTBED_IMAGE": env.get("TESTBED_IMAGE", RUNTIME_IMAGE),
                    "TESTBED_BROKER_IMAGE": env.get("TESTBED_BROKER_IMAGE", BROKER_IMAGE)})
        return env

    def compose_argv(self, *args: str) -> list[str]:
        cmd = self.compose or compose_command()
        if cmd is None:
            raise UserError("neither `docker compose` nor `docker-compose` is installed; "
                            "install one or use --backend local")
        self.compose = cmd
        return [*cmd, "-p", self.project, "-f", str(BASE_COMPOSE), "-f", str(self.override),
                *args]

    def _compose(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(self.compose_argv(*args), env=self.compose_env(),
                              capture_output=True, text=True, timeout=timeout,
                              cwd=str(BASE_COMPOSE.parent))
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise UserError(f"`compose {' '.join(args)}` failed: {' | '.join(tail)}")
        return proc

    def start(self) -> ComposeRun:
        """Prepare the run directory, launch the fleet, write the state file. Interrupted
        while launching (Ctrl-C), it takes down what was started before re-raising: what
        ``compose up`` / ``stack deploy`` had started belongs to the project or stack, so a
        start leaves a whole fleet or nothing."""
        self.check_can_start()
        self.prepare()
        try:
            self.launch()
        except KeyboardInterrupt:
            self.stop()
            raise
        self.write_state()
        return self

    def check_can_start(self) -> None:
        """One-line UserError when this backend cannot start here (before any work); a
        ``warning:`` line when the fleet may not fit this host's memory."""
        note = self.memory_warning()
        if note:
            from testbed.console import err

            err.print(f"[bold yellow]warning:[/] {note}", highlight=False, soft_wrap=True)

    def cuda_host_reserve(self) -> int:
        """Host memory added to the limit of each client container with a GPU reservation
        when the clients train on their GPUs (runner/emulation/gpu.py
        ``CUDA_HOST_RESERVE``: CUDA's host-side runtime), else 0."""
        from testbed.backends.compose import clients_use_cuda

        if not clients_use_cuda(getattr(self.train, "device", None)):
            return 0
        from runner.emulation.gpu import CUDA_HOST_RESERVE

        return CUDA_HOST_RESERVE

    def client_limits(self) -> dict[str, int]:
        """client -> its container's memory limit: ``--mem-limit`` where given, else the
        runtime reserve plus the device's stand-in budget, plus CUDA's host reserve for a
        client that trains on its GPU (as the override file writes)."""
        extra = (self.cuda_host_reserve() if any(d.gpu is not None for d in self.profile.devices)
                 else 0)
        return {d.name: client_limit(d, self.mem_limits, None,
                                     extra if dev.gpu is not None else 0)
                for dev, d in zip(self.profile.devices, self.mapping.clients, strict=True)}

    def memory_warning(self, available: int | None = None) -> str | None:
        """Why this fleet may run the host out of memory, or None.

        One host's memory must hold what every client container may use: a limit caps a
        container, it reserves nothing, and a method that plans each client to fill its
        budget (hsplitlora's ARMSC) takes close to the limit in every container (measured:
        client PSS ~0.83x its limit, docs/benchmarks.md). The kernel's OOM killer then picks
        processes anywhere on the host, the server included. A warning, not a refusal:
        splitlora's fixed segments use a fraction of the same limits. ``available``: the
        host's available memory (None: read it now)."""
        from testbed.experiment.memory import available_memory

        limits = self.client_limits()
        need = sum(limits.values())
        have = available_memory() if available is None else available
        if have is None or need <= have:
            return None
        return (f"the {len(limits)} client containers may use up to {need / 1e9:.1f} GB (the "
                f"sum of their memory limits) and this host has {have / 1e9:.1f} GB available; "
                "clients that fill their budgets (hsplitlora) can run it out of memory: use "
                "fewer clients or smaller devices, or spread the fleet with --backend swarm")

    def launch(self) -> None:
        """``compose up -d`` of the prepared project."""
        self._compose("up", "-d", "--no-build")

    def write_state(self, watcher: dict[str, Any] | None = None) -> None:
        """The state file: what ``testbed status|down|logs|inject`` and a detached run's
        watcher process (testbed/backends/watcher.py) need: the project, the clients with their
        budgets and availability traces, and the watcher's pid once it runs."""
        write_json(self.run_dir / STATE, {
            "backend": "compose", "run_id": self.run_id, "run_dir": str(self.run_dir),
            "project": self.project, "compose": self.compose,
            "files": [str(BASE_COMPOSE), str(self.override)], "clients": self.clients,
            "budgets": {c: self.budget_of(c) for c in self.clients},
            "traces": {c: [list(w) for w in ws] for c, ws in self.traces().items()},
            "host_network": self.host_network, "updated": time.time(),
            **({"watcher": watcher} if watcher else {})})

    # ------------------------------------------------------------------------ watch
    def containers(self) -> dict[str, Any]:
        """service name -> container (all states) of this run's project."""
        return project_containers(self.project)

    def server_exit(self) -> int | None:
        """The server container's exit code, or None while it runs (or has not started)."""
        c = self.containers().get("server")
        if c is None:
            return None
        c.reload()
        if c.status in ("exited", "dead"):
            return int(c.attrs["State"].get("ExitCode", 1))
        return None

    def check_oom(self) -> list[str]:
        """Record each client container the kernel OOM-killed as ``budget_exceeded``."""
        newly = []
        for name, c in self.containers().items():
            if name not in self.clients or name in self.recorded_oom:
                continue
            c.reload()
            state = c.attrs.get("State", {})
            if state.get("OOMKilled") and c.status in ("exited", "dead"):
                self.recorded_oom.add(name)
                newly.append(name)
                limit = int(c.attrs.get("HostConfig", {}).get("Memory") or 0)
                last = self.last_stats.get(name)
                measured: dict[str, Any] = {}
                if last is not None:  # the host's last reading before the kill
                    measured = {"memory_bytes": last["usage_bytes"],
                                "memory_peak_bytes": last["peak_bytes"],
                                "memory_sampled_at": last["time"]}
                    self._write_stats({**last, "oom_killed": True})
                # the server stops waiting for it to join (runner/server.py wait_for_clients)
                write_injected(self.run_dir, name, "ended", "oom-killed\n")
                append_event(self.run_dir, "budget_exceeded", client=name,
                             container=c.name, limit_bytes=limit,
                             budget_bytes=self.budget_of(name), exit_code=state.get("ExitCode"),
                             **measured,
                             detail="the kernel OOM-killed the client container: its "
                                    "configuration needs more memory than its limit")
        return newly

    def _write_stats(self, record: dict[str, Any]) -> None:
        """One line of ``resources.jsonl`` (one ``write`` with O_APPEND, like events)."""
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        fd = os.open(self.run_dir / RESOURCES, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def sample_stats(self, every: float = 5.0) -> dict[str, dict[str, Any]]:
        """Read every running container's memory through the Docker API and keep the last
        reading per service; a reading goes to ``resources.jsonl`` at most every ``every``
        seconds per service. Returns the readings taken now.

        A record: ``time`` (Unix s), ``service``, ``container``, ``usage_bytes`` (what the
        cgroup charges now, page cache included, as the kernel compares with the limit),
        ``max_usage_bytes`` (the cgroup's own peak: cgroup v1 only, else absent),
        ``peak_bytes`` (the largest usage the host has seen for that service, the cgroup's
        peak included, across restarts), ``limit_bytes`` (absent when unlimited) and
        ``working_set_bytes`` (usage less inactive file pages, what ``docker stats`` shows).
        """
        now = time.time()
        taken = {}
        for name, c in self.containers().items():
            if c.status != "running":
                continue
            try:
                stats = c.stats(stream=False, one_shot=True)
            except Exception:  # noqa: BLE001 - API < 1.41 has no one_shot (2 s per call)
                try:
                    stats = c.stats(stream=False)
                except Exception:  # noqa: BLE001 - gone meanwhile: keep the last reading
                    continue
            mem = stats.get("memory_stats") or {}
            usage = mem.get("usage")
            if not isinstance(usage, int):
                continue  # exited between the listing and the call: no cgroup left
            inner = mem.get("stats") or {}
            inactive = inner.get("total_inactive_file", inner.get("inactive_file", 0))
            prev = self.last_stats.get(name, {})
            record = {"time": round(now, 3), "service": name, "container": c.name,
                      "usage_bytes": usage,
                      "peak_bytes": max(usage, int(mem.get("max_usage") or 0),
                                        int(prev.get("peak_bytes") or 0)),
                      "working_set_bytes": max(0, usage - int(inactive or 0))}
            if isinstance(mem.get("max_usage"), int):
                record["max_usage_bytes"] = mem["max_usage"]
            # Docker reports the host's memory as the limit of an unlimited container: the
            # container's own setting (0 = none; `testbed inject budget` changes it) decides
            limit = int((c.attrs.get("HostConfig") or {}).get("Memory") or 0)
            if limit > 0:
                record["limit_bytes"] = limit
            self.last_stats[name] = taken[name] = record
            if now - self.stats_written.get(name, -1e18) >= every:
                self.stats_written[name] = now
                self._write_stats(record)
        return taken

    def budget_of(self, name: str) -> int:
        """Client ``name``'s memory budget in the emulation (bytes)."""
        return int(self.mapping.clients[self.clients.index(name)].memory_bytes)

    def traces(self) -> dict[str, tuple[tuple[float, float], ...]]:
        """Clients whose profile availability is a trace of online windows."""
        return {d.name: tuple((float(a), float(b)) for a, b in d.availability.trace)
                for d in self.profile.devices if d.availability.trace is not None}

    def apply_traces(self, elapsed: float) -> list[tuple[str, str]]:
        """Take each traced client's container down outside its online windows and bring
        it back inside them (kill, then ``docker start``: a device that goes away without a
        goodbye). In containers the windows are read as wall-clock seconds since the
        containers started (design choice: containers run in real time; in-process runs
        read them in virtual time, runner/emulation/vtime.py). Returns the (client, change) made."""
        changes = []
        conts = self.containers()
        for name, windows in self.traces().items():
            c = conts.get(name)
            if c is None or name in self.recorded_oom:
                continue
            want = any(a <= elapsed < b for a, b in windows)
            c.reload()
            running = c.status in ("running", "paused")
            if running and not want:
                c.kill()
                self.trace_down.add(name)
                changes.append((name, "offline"))
            elif not running and want and name in self.trace_down:
                self.bring_back(name, c)
                self.trace_down.discard(name)
                changes.append((name, "online"))
        for name, change in changes:
            append_event(self.run_dir, "availability", client=name, state=change,
                         elapsed_s=round(elapsed, 3), source_trace=True)
        return changes

    def bring_back(self, name: str, container: Any) -> None:
        """Start a client an availability trace took down (the swarm backend overrides)."""
        container.start()

    def watch(self, stop: threading.Event, period: float = 1.0) -> None:
        """Poll the containers until ``stop`` is set (run in a thread by ``testbed up``):
        memory readings (every poll, written every 5 s), OOM kills, and the profile's
        availability traces."""
        t0 = time.monotonic()
        traced = bool(self.traces())
        said: set[str] = set()
        while not stop.is_set():
            jobs = [self.sample_stats, self.check_oom]
            if traced:
                jobs.append(lambda: self.apply_traces(time.monotonic() - t0))
            for job in jobs:
                try:
                    job()
                except Exception as exc:  # noqa: BLE001 - a daemon error must not end the run
                    text = f"watch: {type(exc).__name__}: {exc}"
                    if text not in said:  # said once (the watcher's log, or the live view's)
                        said.add(text)
                        print(text, flush=True)
            stop.wait(period)

    def collect_logs(self) -> None:
        """Each container's output into ``logs/<service>.log`` (after the run)."""
        self.logs.mkdir(exist_ok=True)
        for name, c in self.containers().items():
            try:
                (self.logs / f"{name}.log").write_bytes(c.logs(stdout=True, stderr=True))
            except Exception:  # noqa: BLE001 - a removed container has no logs left
                continue

    def stop(self) -> None:
        """Collect the logs, then ``compose down`` (containers and the project network)."""
        self.collect_logs()
        self._compose("down", "--timeout", "5")


def append_event(run_dir: Path, kind: str, **fields: Any) -> None:
    """Append one event to the run's ``events.jsonl`` from outside the server (the host's
    watcher); one ``write`` of one line with O_APPEND, so it interleaves with the server's
    own appends without tearing a line."""
    from runner.rundir import _clean

    record = {"event": kind, "time": time.time(), "source": "host", **fields}
    line = (json.dumps(_clean(record), sort_keys=True) + "\n").encode()
    fd = os.open(Path(run_dir) / EVENTS, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


# --------------------------------------------------- from another terminal (state file)
class _Attached:
    """Enough of a ComposeRun, rebuilt from the state file, for status/down/logs/inject and
    for a detached run's watcher (the OOM, memory and trace watch of :meth:`ComposeRun.watch`,
    whose methods run unchanged on it)."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.project = state["project"]
        self.clients = list(state["clients"])
        self.run_dir = Path(state["run_dir"])
        self.budgets = {str(k): int(v) for k, v in (state.get("budgets") or {}).items()}
        self._traces = {str(k): tuple((float(a), float(b)) for a, b in v)
                        for k, v in (state.get("traces") or {}).items()}
        # a client whose OOM kill is in the events already (a watcher started again)
        from runner.rundir import read_jsonl

        self.recorded_oom: set[str] = {
            str(e.get("client")) for e in read_jsonl(self.run_dir / EVENTS)
            if e.get("event") == "budget_exceeded"}
        self.trace_down: set[str] = set()
        self.last_stats: dict[str, dict[str, Any]] = {}
        self.stats_written: dict[str, float] = {}

    def budget_of(self, name: str) -> int:
        return self.budgets.get(name, 0)

    def traces(self) -> dict[str, tuple[tuple[float, float], ...]]:
        return dict(self._traces)

    # ComposeRun's watch, run unchanged on this object: the functions themselves, so none
    # can be left out one by one (a missing bring_back once stopped a detached run's traces
    # from ever bringing a client back, the error swallowed by the watch loop)
    containers = ComposeRun.containers
    server_exit = ComposeRun.server_exit
    check_oom = ComposeRun.check_oom
    sample_stats = ComposeRun.sample_stats
    _write_stats = ComposeRun._write_stats
    apply_traces = ComposeRun.apply_traces
    bring_back = ComposeRun.bring_back
    watch = ComposeRun.watch


def attach(run_dir: Path) -> _Attached:
    from testbed.backends.local import read_state

    state = read_state(run_dir)
    if state.get("backend") != "compose":
        raise UserError(f"{run_dir} was started with the {state.get('backend')} backend")
    return _Attached(state)


def container_states(run_dir: Path) -> dict[str, dict[str, Any]]:
    """service -> {"state", "exit_code", "oom_killed", "mem_limit"} for ``testbed status``."""
    out = {}
    for name, c in sorted(attach(run_dir).containers().items()):
        state = c.attrs.get("State", {})
        out[name] = {"container": c.name, "state": c.status,
                     "exit_code": state.get("ExitCode"),
                     "oom_killed": bool(state.get("OOMKilled")),
                     "mem_limit": int(c.attrs.get("HostConfig", {}).get("Memory") or 0)}
    return out


def status(run_dir: Path) -> dict[str, Any]:
    """``testbed status`` of a compose run: containers, progress and events."""
    from testbed.backends.local import progress

    return {"run_dir": str(run_dir), "backend": "compose", "project": attach(run_dir).project,
            "containers": container_states(run_dir), **progress(run_dir)}


def down(run_dir: Path) -> list[str]:
    """Collect logs and remove the run's containers; the services that were running."""
    run = attach(run_dir)
    conts = run.containers()
    running = sorted(n for n, c in conts.items() if c.status in ("running", "paused"))
    logs = run.run_dir / "logs"
    logs.mkdir(exist_ok=True)
    for name, c in conts.items():
        try:
            if c.status == "paused":
                c.unpause()
            (logs / f"{name}.log").write_bytes(c.logs(stdout=True, stderr=True))
        except Exception:  # noqa: BLE001
            pass
        c.remove(force=True)
    nets = docker_client().networks.list(filters={"label": f"{PROJECT_LABEL}={run.project}"})
    for net in nets:
        with contextlib.suppress(Exception):  # still in use by something else: leave it
            net.remove()
    return running


def logs(run_dir: Path, service: str | None = None, tail: int = 50) -> str:
    """The last ``tail`` lines of one service's (or every service's) output: from its
    container while it exists, else from ``RUN/logs/<service>.log`` (saved by ``down``)."""
    run = attach(run_dir)
    conts = run.containers()
    saved = {p.stem: p for p in sorted((run.run_dir / "logs").glob("*.log"))}
    known = sorted(set(conts) | set(saved))
    if service is not None and service not in known:
        raise UserError(f"no container or saved log for {service!r}; services: "
                        f"{', '.join(known) or 'none'}")
    parts = []
    for name in [service] if service else known:
        if name in conts:
            text = conts[name].logs(stdout=True, stderr=True, tail=tail).decode(
                errors="replace")
        else:
            text = "\n".join(saved[name].read_text(errors="replace").splitlines()[-tail:])
        parts.append(f"== {name} ==\n{text.rstrip()}")
    return "\n".join(parts)


def _client_container(run_dir: Path, client: str) -> Any:
    """The running (or paused) container of ``client``, or UserError."""
    run = attach(run_dir)
    if client not in run.clients:
        raise UserError(f"unknown client {client!r}; clients: {', '.join(run.clients)}")
    c = run.containers().get(client)
    if c is None or c.status not in ("running", "paused"):
        raise UserError(f"{client}'s container is not running")
    return c


def inject_budget(run_dir: Path, client: str, budget: int) -> str:
    """A new memory budget for a client container: its memory limit through the Docker API
    (the device really has less or more memory now; below what it uses, the kernel's OOM
    killer ends it, as on a device) and the injected-budget file it reports to the server."""
    from testbed.backends.local import write_budget

    c = _client_container(run_dir, client)
    limit = container_limit(budget)
    write_budget(run_dir, client, budget)
    c.update(mem_limit=limit, memswap_limit=limit)
    append_event(run_dir, "inject", client=client, mode="budget", budget_bytes=budget)
    return f"{client}: memory budget and container limit now {limit / 2**20:.0f} MiB ({c.name})"


def kill_container(run_dir: Path, client: str, c: Any, seconds: float | None,
                   bring_back: Any, how: str) -> str:
    """SIGKILL a client's container and, after ``seconds`` (None: never), ``bring_back()``
    (compose: start the same container; swarm: a new task); ``how`` says which."""
    c.kill()
    append_event(run_dir, "inject", client=client, mode="kill", seconds=seconds)
    if seconds is None:
        return f"{client} killed ({c.name})"
    time.sleep(seconds)
    bring_back()
    return f"{client} killed ({c.name}) and {how} after {seconds:g} s"


def pause_container(run_dir: Path, client: str, c: Any, seconds: float) -> str:
    """Freeze a client's container (the cgroup freezer) for ``seconds``."""
    append_event(run_dir, "inject", client=client, mode="pause", seconds=seconds)
    c.pause()
    try:
        time.sleep(seconds)
    finally:
        c.unpause()
    return f"{client} paused for {seconds:g} s ({c.name})"


def inject_dropout(run_dir: Path, client: str, mode: str = "kill",
                   seconds: float | None = None) -> str:
    """Take a client container away and (after ``seconds``) bring it back; see the module
    docstring for the modes. Blocks for ``seconds``; returns what was done."""
    c = _client_container(run_dir, client)
    if mode == "kill":
        return kill_container(run_dir, client, c, seconds, c.start, "restarted")
    seconds = 10.0 if seconds is None else seconds
    if mode == "pause":
        return pause_container(run_dir, client, c, seconds)
    append_event(run_dir, "inject", client=client, mode=mode, seconds=seconds)
    if mode == "stop":
        c.stop(timeout=5)
        time.sleep(seconds)
        c.start()
        return f"{client} stopped and started again after {seconds:g} s ({c.name})"
    if mode == "disconnect":
        nets = list(c.attrs.get("NetworkSettings", {}).get("Networks") or {})
        nets = [n for n in nets if n not in ("host", "none")]
        if not nets:  # host networking: the client drops its connection itself (SIGUSR1)
            write_injected(run_dir, client, "disconnect", f"{seconds}\n")
            c.kill(signal="SIGUSR1")
            return f"{client} disconnected from the broker for {seconds:g} s ({c.name})"
        client_api = docker_client()
        for n in nets:
            client_api.networks.get(n).disconnect(c, force=True)
        time.sleep(seconds)
        for n in nets:
            client_api.networks.get(n).connect(c, aliases=[client])
        return f"{client} disconnected from {', '.join(nets)} for {seconds:g} s ({c.name})"
    raise UserError(f"--mode must be kill, pause, stop or disconnect, not {mode!r}")


__all__ = ["ComposeRun", "append_event", "container_states", "down", "inject_dropout",
           "logs", "parse_mem_limits", "project_name", "status"]

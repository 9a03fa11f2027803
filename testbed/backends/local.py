"""Local process backend: a broker, the server and N clients as processes on this machine.

Why processes rather than threads: the point of the testbed is a real distributed system, so
even the local backend runs ``python -m runner.server`` and ``python -m runner.client``
exactly as containers will (environment variables + a JSON config), talking through a real
broker. Faults are injected the way they happen: SIGKILL, SIGSTOP/SIGCONT, a dropped
connection, a broker restart.

A state file (``<run dir>/testbed-state.json``) records the pids, the broker's address and
work directory, and how each process was started, so ``testbed status``, ``testbed down``
and ``testbed inject`` work from another terminal. Passwords are not in it: they stay in the
broker's work directory (``credentials.json``, mode 0600), where every launch reads them.

With TLS (``tls=True``; testbed/tlsmode.py decides) the run's certificates are issued into
``RUN/tls/`` (runner/distributed/tls.py) before the broker starts, the broker listens with
TLS only, and each process gets the CA (and with mutual TLS its own certificate and key)
through ``TESTBED_TLS_*``; the state file names the directory, so a restart from another
terminal (``testbed inject --mode kill --for``) finds them too.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.config import CENTRAL_METHODS, TrainConfig
from runner.distributed.broker import MONITOR_USER, Broker, start_broker
from runner.distributed.runtime import RuntimeOptions, default_clients, write_config
from runner.distributed.tls import ENV_CA, ENV_CERT, ENV_KEY, RunPKI, broker_hosts, make_pki
from runner.errors import UserError
from runner.rundir import clear_injected, write_injected, write_json

STATE = "testbed-state.json"
RUNTIME = "runtime.json"
ROOT = Path(__file__).resolve().parents[2]


def pid_alive(pid: int | None) -> bool:
    """Whether ``pid`` names a live (not zombie) process."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie still answers kill(0); read its state where /proc exists
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def pid_state(pid: int | None) -> str:
    """"running", "paused" (SIGSTOPped), or "exited"."""
    if not pid_alive(pid):
        return "exited"
    try:
        code = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "running"
    return "paused" if code in ("T", "t") else "running"


@dataclass
class ForkedProcess:
    """A client forked by runner/forkserver.py, with what LocalRun uses of a Popen. It is
    the fork server's child, not ours, so its exit code comes from the file the fork server
    writes when it reaps it (``<log>.exit``)."""

    pid: int
    exit_file: Path
    server: subprocess.Popen[bytes]
    returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is not None:
            return self.returncode
        try:
            info = json.loads(self.exit_file.read_text())
            if info.get("pid") == self.pid:
                self.returncode = int(info["returncode"])
        except (OSError, ValueError, KeyError, TypeError):
            if not pid_alive(self.pid) and self.server.poll() is not None:
                self.returncode = -1  # exited, and nobody is left to tell us how
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (rc := self.poll()) is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"client pid {self.pid}", timeout or 0)
            time.sleep(0.05)
        return rc

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def gpu_env(selector: int | str | None, device: str | None) -> dict[str, str]:
    """What puts a local process on its profile device's GPU (docs/gpu.md "Device
    placement"): ``CUDA_VISIBLE_DEVICES`` set to the ``gpu:`` selector (a host index or a
    ``MIG-...`` UUID), so the process sees that GPU or instance alone, as ``cuda:0``, like a
    container with a Compose reservation of it (testbed/backends/compose.py
    ``gpu_reservation``); and ``TESTBED_DEVICE=cuda:0``, so a run configured for ``cuda:N``
    trains on that one visible device. Why: without it every local process trained on the
    run's one device, and the fleet's GPUs and MIG instances (and the budgets NVML reads
    from them, found by the UUID CUDA reports) were ignored. Nothing when there is no
    selector or the processes do not train on CUDA (``--device cpu``, or auto without a
    GPU: testbed/backends/compose.py ``clients_use_cuda``): a CPU run's environment is
    unchanged."""
    from testbed.backends.compose import clients_use_cuda

    if selector is None or not clients_use_cuda(device):
        return {}
    return {"CUDA_VISIBLE_DEVICES": str(selector), "TESTBED_DEVICE": "cuda:0"}


@dataclass
class LocalRun:
    """One local distributed run: start, inspect, inject faults, stop.

    ``broker_url``: use an existing broker (then ``passwords`` must give each identity's
    password) instead of starting one per run.
    """

    train: TrainConfig
    run_dir: Path
    options: RuntimeOptions = field(default_factory=RuntimeOptions)
    run_id: str | None = None
    broker_url: str | None = None
    passwords: dict[str, str] | None = None
    env_extra: dict[str, str] = field(default_factory=dict)
    broker: Broker | None = None
    procs: dict[str, subprocess.Popen[bytes] | ForkedProcess] = field(default_factory=dict)
    # Clients forked from one process that has imported their runtime (runner/forkserver.py):
    # they share its pages, ~290 MB per client otherwise (issue 15 part 4).
    fork_clients: bool = False
    forkserver: subprocess.Popen[bytes] | None = None
    join_slots: tuple[str, ...] = ()  # clients left to devices (`testbed join`)
    listen: str = "127.0.0.1"  # the per-run broker's address
    join_files: dict[str, Path] = field(default_factory=dict)
    tls: bool = False  # the per-run broker speaks TLS only (certificates in RUN/tls/)
    mtls: bool = False  # ... and asks every participant for its certificate
    tls_names: tuple[str, ...] = ()  # extra names in the broker's certificate (--tls-name)
    pki: RunPKI | None = None  # the run's certificates, once issued (or loaded)
    # process (server or client) -> its profile device's ``gpu:`` selector (a host index or
    # a MIG UUID): its environment puts it on that GPU (:func:`gpu_env`)
    gpus: dict[str, int | str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        self.run_id = self.run_id or "".join(
            c if c.isalnum() or c in "_.-" else "-" for c in self.run_dir.name)[:64] or "run"
        n = 1 if self.train.method in CENTRAL_METHODS else self.train.clients
        self.clients = default_clients(n)
        unknown = sorted(set(self.join_slots) - set(self.clients))
        if unknown:
            raise UserError(f"--join-slot names unknown clients {unknown}; the run's clients "
                            f"are {', '.join(self.clients)}")

    # ---------------------------------------------------------------------- start
    @property
    def config_path(self) -> Path:
        return self.run_dir / RUNTIME

    @property
    def logs(self) -> Path:
        return self.run_dir / "logs"

    def start_broker(self) -> None:
        if self.broker_url is not None:
            return
        if self.tls or self.mtls:
            self.pki = make_pki(self.run_dir / "tls", run=str(self.run_id),
                                hosts=broker_hosts(self.listen, self.tls_names),
                                identities=["server", MONITOR_USER, *self.clients],
                                mutual=self.mtls)
        self.broker = start_broker(self.run_id, self.clients, host=self.listen,
                                   workdir=self.run_dir / "broker",
                                   tls=self.pki.broker() if self.pki else None)

    @property
    def url(self) -> str:
        """The broker as the processes of this host reach it (loopback for 0.0.0.0)."""
        if self.broker is not None:
            return self.broker.url
        assert self.broker_url is not None
        return self.broker_url

    @property
    def public_url(self) -> str:
        """The broker as ``--listen`` names it: what a device replaces with this host's
        address (printed with the join command and kept in the join file)."""
        if self.broker is None:
            return self.url
        host = f"[{self.listen}]" if ":" in self.listen else self.listen  # IPv6
        return f"{'mqtts' if self.broker.tls else 'mqtt'}://{host}:{self.broker.port}"

    def password(self, who: str) -> str:
        if self.passwords is not None:  # an external broker: given, or empty (anonymous)
            return self.passwords.get(who, "")
        if self.broker is not None:
            return self.broker.creds(who).password
        creds = json.loads((self.run_dir / "broker" / "credentials.json").read_text())
        return str(creds[who])

    def start(self) -> LocalRun:
        """Broker, server, clients; the state file. The run directory must be new (or
        ``options.overwrite``)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if (self.run_dir / "config.json").exists() and not self.options.overwrite:
            raise UserError(f"run directory {self.run_dir} already holds a run; choose another "
                            "--out or pass --overwrite")
        clear_injected(self.run_dir)
        self.logs.mkdir(exist_ok=True)
        self.start_broker()
        write_config(self.config_path, self.train, self.run_dir, run_id=self.run_id or "run",
                     clients=self.clients, broker=self.url, options=self.options)
        self.spawn("server")
        for cid in self.clients:
            if cid in self.join_slots:  # a device takes this slot (testbed/backends/join.py)
                from testbed.backends.join import write_join_file

                self.join_files[cid] = write_join_file(
                    self.run_dir, client=cid, broker=self.public_url, run_id=str(self.run_id),
                    password=self.password(cid), config_path=self.config_path,
                    tls=self.pki.client(cid) if self.pki else None)
            else:
                self.spawn(cid)
        return self

    def env(self, who: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.env_extra)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        env.update({"TESTBED_CONFIG": str(self.config_path), "TESTBED_BROKER": self.url,
                    "TESTBED_RUN_ID": str(self.run_id), "TESTBED_USERNAME": who,
                    "TESTBED_PASSWORD": self.password(who)})
        if self.pki is not None:  # never one identity's files in another's environment
            for key in (ENV_CA, ENV_CERT, ENV_KEY):
                env.pop(key, None)
            env.update(self.pki.client(who).env())
        if who != "server":
            env["TESTBED_CLIENT_ID"] = who
        env.update(gpu_env(self.gpus.get(who), self.train.device))
        return env

    def spawn(self, who: str, *, resume: bool = False,
              record: bool = True) -> subprocess.Popen[bytes] | ForkedProcess:
        """Start (or restart) the server or a client; its output goes to logs/<who>.log.

        ``record``: rewrite the state file (False when another process owns it, see
        :func:`inject_dropout`)."""
        module = "runner.server" if who == "server" else "runner.client"
        argv = [sys.executable, "-m", module] + (["--resume"] if resume else [])
        self.logs.mkdir(parents=True, exist_ok=True)
        proc: subprocess.Popen[bytes] | ForkedProcess
        if who != "server" and self.fork_clients:
            proc = self._fork(who, argv[3:])
        else:
            with open(self.logs / f"{who}.log", "ab") as out:
                proc = subprocess.Popen(argv, env=self.env(who), stdout=out,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        cwd=str(ROOT), start_new_session=True)
        self.procs[who] = proc
        if record:
            self.write_state()
        return proc

    def _fork(self, who: str, argv: list[str]) -> ForkedProcess:
        """A client forked by the run's fork server (started on first use)."""
        fs = self.forkserver
        if fs is None or fs.poll() is not None:
            env = dict(os.environ)
            env.update(self.env_extra)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT),
                                                              env.get("PYTHONPATH")]))
            with open(self.logs / "forkserver.log", "ab") as log:
                fs = self.forkserver = subprocess.Popen(
                    [sys.executable, "-m", "runner.forkserver"], env=env, cwd=str(ROOT),
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                    start_new_session=True)
        assert fs.stdin is not None and fs.stdout is not None
        log_path = self.logs / f"{who}.log"
        request = {"who": who, "argv": argv, "env": self.env(who), "cwd": str(ROOT),
                   "log": str(log_path)}
        try:
            fs.stdin.write((json.dumps(request) + "\n").encode())
            fs.stdin.flush()
            answer = fs.stdout.readline()
        except BrokenPipeError:
            answer = b""
        if not answer:
            tail = (self.logs / "forkserver.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the fork server exited before starting {who}:\n{tail}")
        return ForkedProcess(int(json.loads(answer)["pid"]),
                             Path(str(log_path) + ".exit"), fs)

    # ---------------------------------------------------------------------- state
    def write_state(self) -> None:
        """Write the state file; entries another process changed (a client restarted by
        ``testbed inject``) are kept when our own process for that role has exited."""
        processes = {who: {"pid": p.pid, "log": str(self.logs / f"{who}.log")}
                     for who, p in self.procs.items()}
        try:
            old = json.loads((self.run_dir / STATE).read_text())["processes"]
        except (OSError, ValueError, KeyError):
            old = {}
        for who, info in old.items():
            mine = self.procs.get(who)
            if info.get("pid") != processes.get(who, {}).get("pid") and (
                    mine is None or mine.poll() is not None):
                processes[who] = info
        if self.broker is not None and self.broker.proc is not None:
            self._broker_pid = self.broker.proc.pid
        state = {"backend": "local", "run_id": self.run_id, "run_dir": str(self.run_dir),
                 "broker": {"url": self.url,
                            "pid": getattr(self, "_broker_pid", None),
                            "workdir": str(self.broker.workdir) if self.broker else None,
                            "command": self.broker.command if self.broker else None,
                            "tls": str(self.pki.directory) if self.pki else None},
                 "processes": processes,
                 "clients": self.clients, "config": str(self.config_path),
                 "device": self.train.device, "gpus": self.gpus,
                 "updated": time.time()}
        write_json(self.run_dir / STATE, state)

    # ------------------------------------------------------------------ control
    def pid(self, who: str) -> int:
        return self.procs[who].pid

    def signal(self, who: str, sig: int) -> None:
        os.kill(self.pid(who), sig)

    def kill(self, who: str) -> None:
        """SIGKILL (a crash: no clean disconnect, the broker publishes the last will)."""
        proc = self.procs[who]
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    def wait(self, timeout: float) -> int:
        """Wait for the server to exit; its exit code (raises TimeoutError)."""
        try:
            return self.procs["server"].wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"server still running after {timeout} s; logs in "
                               f"{self.logs}") from None

    def stop(self, grace: float = 3.0) -> None:
        """Stop every process this run started (clients, server) and the broker."""
        for _who, proc in list(self.procs.items()):
            if proc.poll() is None:
                try:
                    os.kill(proc.pid, signal.SIGCONT)  # a paused process cannot exit
                    proc.terminate()
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.write_state()
        # processes started by others for this run (``testbed inject`` restarts)
        mine = {p.pid for p in self.procs.values()}
        others = [int(info["pid"]) for info in read_state(self.run_dir)["processes"].values()
                  if info.get("pid") and int(info["pid"]) not in mine
                  and _ours(int(info["pid"]))]
        _terminate(others, grace)
        if self.forkserver is not None:  # it exits once its input ends and no child is left
            fs, self.forkserver = self.forkserver, None
            with contextlib.suppress(OSError):
                assert fs.stdin is not None
                fs.stdin.close()
            try:
                fs.wait(grace + 2.0)
            except subprocess.TimeoutExpired:
                fs.kill()
                fs.wait()
        if self.broker is not None:
            self.broker.stop()

    def __enter__(self) -> LocalRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, who: str, n: int = 40) -> str:
        path = self.logs / f"{who}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


# ------------------------------------------------------- from another terminal (state file)
DEFAULT_RUN = Path("runs/latest")


def resolve_run(run_dir: Path) -> Path:
    """The run a command means. ``--run`` defaults to ``runs/latest``; when no run was
    written there (``make run`` writes ``runs/<profile>``), the default means the most
    recently started run under ``runs/``, as a user who just started one expects. An
    explicit path is taken as given."""
    run_dir = Path(run_dir)
    if run_dir != DEFAULT_RUN or (run_dir / STATE).is_file():
        return run_dir
    started = sorted(run_dir.parent.glob(f"*/{STATE}"), key=lambda f: f.stat().st_mtime)
    return started[-1].parent if started else run_dir


def read_state(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / STATE
    if not path.is_file():
        raise UserError(f"{run_dir} has no {STATE}: was it started with `testbed up`?")
    return json.loads(path.read_text())


def status(run_dir: Path) -> dict[str, Any]:
    """Process states, the last step and evaluation, and the number of events by kind."""
    state = read_state(run_dir)
    procs = {who: {"pid": info["pid"], "state": pid_state(info["pid"])}
             for who, info in state["processes"].items()}
    broker = state["broker"]
    out: dict[str, Any] = {"run_dir": str(run_dir), "run_id": state["run_id"],
                           "backend": "local",
                           "broker": {"url": broker["url"], "pid": broker.get("pid"),
                                      "state": pid_state(broker.get("pid"))
                                      if broker.get("pid") else "external"},
                           "processes": procs}
    out.update(progress(run_dir))
    return out


def logs(run_dir: Path, service: str | None = None, tail: int = 50) -> str:
    """The last ``tail`` lines of one process's (or every process's) log, RUN/logs/*.log."""
    files = sorted((Path(run_dir) / "logs").glob("*.log"))
    if service is not None:
        files = [f for f in files if f.stem == service]
        if not files:
            raise UserError(f"no log for {service!r} in {Path(run_dir) / 'logs'}")
    return "\n".join(f"== {f.stem} ==\n" + "\n".join(
        f.read_text(errors="replace").splitlines()[-tail:]) for f in files)


def progress(run_dir: Path) -> dict[str, Any]:
    """From the run directory alone (any backend): the step reached, the last mean training
    loss and validation PPL, event counts by kind, and whether the run finished."""
    from runner.rundir import read_jsonl

    out: dict[str, Any] = {}
    metrics = read_jsonl(Path(run_dir) / "metrics.jsonl")
    train = [m for m in metrics if m.get("kind") == "train"]
    evals = [m for m in metrics if m.get("kind") == "eval"]
    out["step"] = (max(m["step"] for m in train) + 1) if train else 0
    if train:
        last = [m for m in train if m["step"] == out["step"] - 1]
        out["loss"] = sum(m["loss"] for m in last) / len(last)
    if evals:
        out["val_ppl"] = evals[-1].get("val_ppl")
    events = read_jsonl(Path(run_dir) / "events.jsonl")
    counts: dict[str, int] = {}
    for e in events:
        counts[e["event"]] = counts.get(e["event"], 0) + 1
    out["events"] = counts
    out["finished"] = (Path(run_dir) / "summary.json").exists()
    return out


def _ours(pid: int) -> bool:
    """Whether ``pid`` still runs one of our programs (a stale state file's pid may have been
    reused by an unrelated process, which must never be signalled)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return True  # no /proc: trust the state file
    return any(k in cmd for k in (b"runner.server", b"runner.client", b"runner.forkserver",
                                  b"mosquitto", b"runner.distributed.broker"))


def _terminate(pids: list[int], grace: float) -> None:
    """SIGCONT (a paused process cannot exit) + SIGTERM, then SIGKILL after ``grace``."""
    for pid in pids:
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for pid in pids:
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            end = time.monotonic() + 2.0  # SIGKILL is delivered asynchronously
            while pid_alive(pid) and time.monotonic() < end:
                time.sleep(0.02)


def down(run_dir: Path, grace: float = 3.0) -> list[str]:
    """Stop the run's processes and broker (by the pids in the state file); what was stopped."""
    state = read_state(run_dir)
    pids = [(who, int(info["pid"])) for who, info in state["processes"].items()
            if info.get("pid")]
    if state["broker"].get("pid"):
        pids.append(("broker", int(state["broker"]["pid"])))
    live = [(who, pid) for who, pid in pids if pid_alive(pid) and _ours(pid)]
    _terminate([pid for _, pid in live], grace)
    return [who for who, _ in live]


def _respawn(run_dir: Path, state: dict[str, Any], who: str) -> int:
    """Start a client again from the state file (after ``inject --mode kill --for``)."""
    # the device and GPU selectors as the launch had them: a restarted client goes back to
    # its own GPU (a state file from before they were kept: the run's default device)
    run = LocalRun(TrainConfig(device=str(state.get("device") or "auto")), Path(run_dir),
                   run_id=state["run_id"], broker_url=state["broker"]["url"],
                   gpus=dict(state.get("gpus") or {}))
    workdir = state["broker"].get("workdir")
    if workdir:
        creds = json.loads((Path(workdir) / "credentials.json").read_text())
        run.passwords = {k: str(v) for k, v in creds.items()}
    if state["broker"].get("tls"):
        run.pki = RunPKI.load(Path(state["broker"]["tls"]))
    pid = run.spawn(who, record=False).pid
    state["processes"][who] = {"pid": pid, "log": str(run.logs / f"{who}.log")}
    write_json(Path(run_dir) / STATE, state)
    return pid


def inject_dropout(run_dir: Path, client: str, mode: str = "kill",
                   seconds: float | None = None) -> str:
    """Take ``client`` away: ``kill`` (SIGKILL; restarted after ``seconds`` when given),
    ``pause`` (SIGSTOP, SIGCONT after ``seconds``, default 10), ``disconnect`` (the client
    drops its broker connection abruptly, so the broker fires its last will, and reconnects
    after ``seconds``, default 10). Blocks for ``seconds``; returns what was done."""
    state = read_state(run_dir)
    info = state["processes"].get(client)
    if info is None or client == "server":
        raise UserError(f"unknown client {client!r}; clients: {', '.join(state['clients'])}")
    pid = info["pid"]
    if not pid_alive(pid):
        raise UserError(f"{client} (pid {pid}) is not running")
    if mode == "kill":
        os.kill(pid, signal.SIGKILL)
        if seconds is None:
            return f"{client} killed (pid {pid})"
        time.sleep(seconds)
        new = _respawn(run_dir, state, client)
        return f"{client} killed (pid {pid}) and restarted after {seconds:g} s (pid {new})"
    if mode == "pause":
        seconds = 10.0 if seconds is None else seconds
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(seconds)
        finally:
            os.kill(pid, signal.SIGCONT)
        return f"{client} paused for {seconds:g} s (pid {pid})"
    if mode == "disconnect":
        seconds = 10.0 if seconds is None else seconds
        write_injected(run_dir, client, "disconnect", f"{seconds}\n")
        os.kill(pid, signal.SIGUSR1)
        return f"{client} disconnected from the broker for {seconds:g} s (pid {pid})"
    raise UserError(f"--mode must be kill, pause or disconnect, not {mode!r}")


def write_budget(run_dir: Path, client: str, budget: int) -> Path:
    """The file a client reads its injected budget from (runner/client.py ``_budget``)."""
    if budget <= 0:
        raise UserError(f"a memory budget must be > 0 bytes, not {budget}")
    return write_injected(run_dir, client, "budget", f"{int(budget)}\n")


def inject_budget(run_dir: Path, client: str, budget: int) -> str:
    """Give ``client`` a new memory budget (it reports it in its next heartbeat)."""
    state = read_state(run_dir)
    if client not in state["clients"]:
        raise UserError(f"unknown client {client!r}; clients: {', '.join(state['clients'])}")
    write_budget(run_dir, client, budget)
    return f"{client}: memory budget now {budget / 2**20:.0f} MiB"


__all__ = ["LocalRun", "down", "gpu_env", "inject_budget", "inject_dropout", "read_state",
           "status", "write_budget"]

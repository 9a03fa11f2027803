"""Swarm backend: a profile's broker, server and clients as a Docker stack.

``testbed up --profile NAME --backend swarm`` deploys the same run as the compose backend
(testbed/backends/compose_run.py prepares the run directory and computes every container's memory
limit, CPU quota, identity and mounts through testbed/backends/compose.py) as a stack on a Docker
Swarm, so a fleet can span several hosts: Fogify and FedScale place emulated devices the
same way. Differences from Compose, each forced by what ``docker stack deploy`` accepts:

* one self-contained, readable stack file (``RUN/stack.yaml``, Compose file format 3.8, no
  variables left) generated from the base ``compose.yaml`` and the run's override, with
  ``deploy.resources.limits`` (memory, cpus) instead of ``mem_limit`` / ``cpus``,
  ``deploy.restart_policy: none`` instead of ``restart: "no"`` (a device that dies stays
  dead until a fault injection or trace brings it back), and no ``depends_on``;
* every participant's broker password as a swarm secret (``/run/secrets/<id>``), and with
  TLS the run's CA certificate, and the broker's (or with mutual TLS each participant's)
  certificate and key, as secrets too (``/run/secrets/ca.crt``, ``tls.crt``, ``tls.key``):
  each service gets only its own. The run directory every service mounts holds them all,
  so the server and client services see an empty tmpfs over its ``secrets/``, ``tls/`` and
  ``broker/`` (where the broker's credentials live);
* placement: a device (or the server) with ``node: NAME`` in its profile runs on the swarm
  node labelled ``hsplitlora.node=NAME`` (``docker node update --label-add``);
* networking: ``--host-network`` puts every service on the node's host network (tests,
  loopback); otherwise an attachable overlay network spans the nodes and the services
  reach the broker by its service name;
* GPUs: Swarm has no per-container device ids; a device with a GPU asks for one
  ``NVIDIA-GPU`` generic resource, which the node must advertise (docs/swarm.md);
* swap: Swarm cannot set ``memswap_limit``; on a node with swap a client over its budget
  swaps instead of being OOM-killed (none of our machines has swap).

The host watches the containers on its own node exactly as the compose backend does
(memory readings, OOM -> ``budget_exceeded``, availability traces); the server's end is read
from its swarm task, wherever it runs. ``testbed status|logs|inject|down`` work from another
terminal through the state file (backend "swarm"). ``kill`` and ``pause`` act on a client's
container on this node; ``stop`` scales the client's service to 0 and back, which works on
any node.
"""

from __future__ import annotations

import contextlib
import copy
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from runner.distributed.tls import BrokerTLS, ClientTLS, RunPKI
from runner.errors import UserError
from runner.rundir import RUN_MOUNT, write_json
from testbed.backends.compose import TEMPLATE_KEY, ComposeOptions, generate_override, load_base
from testbed.backends.compose_run import ComposeRun, append_event, kill_container, pause_container
from testbed.backends.images import docker_client
from testbed.backends.local import STATE
from testbed.profiles import NODE_LABEL

STACK_FILE = "stack.yaml"
NAMESPACE_LABEL = "com.docker.stack.namespace"
SWARM_SERVICE_LABEL = "com.docker.swarm.service.name"
OVERLAY = "testbed"
SECRETS_DIR = "/run/secrets"
TLS_CA_SECRET = "tls-ca.crt"
_VAR = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def swarm_manager() -> dict[str, Any]:
    """This engine's swarm info when it is an active manager, else UserError saying how to
    make one (the testbed never initialises or leaves a swarm itself: that is the
    machine's state, not the run's)."""
    info = docker_client().info().get("Swarm") or {}
    if info.get("LocalNodeState") != "active":
        raise UserError("this Docker engine is not in a swarm: `docker swarm init "
                        "--advertise-addr 127.0.0.1` makes it a one-node swarm, or join one "
                        "(docs/swarm.md); or use --backend compose")
    if not info.get("ControlAvailable"):
        raise UserError("this Docker engine is a swarm worker; run testbed on a manager node")
    return info


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """``${VAR}`` and ``${VAR:-default}`` resolved in every string (Compose's rules for the
    forms compose.yaml uses), so the stack file holds no variables and reads as deployed."""
    if isinstance(value, str):
        return _VAR.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    return value


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """A service of the base file with the override's service on top: ``environment`` and
    ``labels`` merged key by key, ``volumes`` by mount target, the rest replaced (Compose's
    own merge rules for these keys)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if key in ("environment", "labels"):
            out[key] = {**(out.get(key) or {}), **value}
        elif key == "volumes":
            targets = {v.split(":")[1]: v for v in out.get(key) or []}
            targets.update({v.split(":")[1]: v for v in value})
            out[key] = list(targets.values())
        else:
            out[key] = copy.deepcopy(value)
    return out


def _placement(node: str | None) -> dict[str, Any]:
    return {"constraints": [f"node.labels.{NODE_LABEL} == {node}"]} if node else {}


def _stack_service(svc: dict[str, Any], *, who: str, secret: bool, host_network: bool,
                   node: str | None, gpu: bool, user: str | None = None,
                   pki: RunPKI | None = None) -> dict[str, Any]:
    """A Compose service of the run turned into a stack service (module docstring)."""
    svc = dict(svc)
    svc.pop("depends_on", None)
    svc.pop("restart", None)
    svc.pop("memswap_limit", None)  # Swarm cannot set it (module docstring)
    svc.pop("network_mode", None)
    svc.pop("deploy", None)  # a GPU reservation by device id: not in Swarm, see gpu below
    memory, cpus = svc.pop("mem_limit", None), svc.pop("cpus", None)
    limits: dict[str, str] = {}
    if memory is not None:
        limits["memory"] = str(memory)
    if cpus is not None:
        limits["cpus"] = str(cpus)
    resources: dict[str, Any] = {"limits": limits} if limits else {}
    if gpu:
        resources["reservations"] = {"generic_resources": [
            {"discrete_resource_spec": {"kind": "NVIDIA-GPU", "value": 1}}]}
    deploy: dict[str, Any] = {"restart_policy": {"condition": "none"},
                              "labels": dict(svc.get("labels") or {})}
    if resources:
        deploy["resources"] = resources
    if node:
        deploy["placement"] = _placement(node)
    svc["deploy"] = deploy
    svc["networks"] = ["hostnet" if host_network else OVERLAY]
    uid, _, gid = (user or "0:0").partition(":")
    gid = gid or uid

    def mine(source: str, target: str, mode: int = 0o400) -> dict[str, Any]:
        # readable by the user the container runs as, and by nobody else
        return {"source": source, "target": target, "uid": uid, "gid": gid, "mode": mode}

    if secret:
        svc["secrets"] = [mine(who, who)]
        svc.setdefault("environment", {})["TESTBED_PASSWORD_FILE"] = f"{SECRETS_DIR}/{who}"
        # the run directory holds everyone's secrets: hide them (module docstring)
        hidden = ["secrets", "broker", *(["tls"] if pki is not None else [])]
        svc["volumes"] = [*svc.get("volumes", []), *(
            {"type": "tmpfs", "target": f"{RUN_MOUNT}/{d}"} for d in hidden)]
    if pki is not None:
        files = svc.setdefault("secrets", [])
        files.append(mine(TLS_CA_SECRET, "ca.crt", 0o444))
        if who == "broker" or pki.mutual:
            files += [mine(f"tls-{who}.crt", "tls.crt", 0o444), mine(f"tls-{who}.key",
                                                                     "tls.key")]
    return svc


def stack_document(run: ComposeRun, opts: ComposeOptions, env: dict[str, str]
                   ) -> dict[str, Any]:
    """The run's stack file as a dict: compose.yaml's broker and server and one client per
    device, each merged with the run's override (testbed/backends/compose.py) and made
    stack-ready."""
    base = load_base()
    override = generate_override(run.profile, run.mapping, opts, base)["services"]
    # who runs where: the broker beside the server; only the server and clients have a secret
    who = {d.name: d for d in [run.profile.server, *run.profile.devices]}
    override = {"broker": {}, **override}  # the override names the broker only to change it
    services: dict[str, Any] = {}
    for name, over in override.items():
        # variables first: a ${VAR:-default} holds a ':' that volume targets are split on
        source = base["services"][name] if name in ("broker", "server") else base[TEMPLATE_KEY]
        merged = interpolate(_merge(interpolate(source, env), over), env)
        device = who.get(name, run.profile.server)
        services[name] = _stack_service(
            merged, who=name, secret=name != "broker", host_network=opts.host_network,
            node=device.node, gpu=name != "broker" and device.gpu is not None,
            user=None if name == "broker" else opts.user, pki=run.pki)
    secrets = {who: {"file": str(run.run_dir / "secrets" / who)}
               for who in ["server", *run.clients]}
    pki = run.pki
    if pki is not None:
        secrets[TLS_CA_SECRET] = {"file": str(pki.ca)}
        for who in ["broker", *(["server", *run.clients] if pki.mutual else [])]:
            secrets[f"tls-{who}.crt"] = {"file": str(pki.cert(who))}
            secrets[f"tls-{who}.key"] = {"file": str(pki.key(who))}
    networks: dict[str, Any] = (
        {"hostnet": {"external": True, "name": "host"}} if opts.host_network
        else {OVERLAY: {"driver": "overlay", "attachable": True}})
    return {"version": "3.8", "services": services, "networks": networks, "secrets": secrets}


def stack_name(project: str) -> str:
    """Stack names become service-name prefixes: letters, digits, '-' and '_'."""
    return project.replace(".", "-")


@dataclass
class SwarmRun(ComposeRun):
    """One run of a profile as a Docker stack (see the module docstring)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.stack = stack_name(self.project)

    @property
    def stack_file(self) -> Path:
        return self.run_dir / STACK_FILE

    def client_tls_paths(self) -> ClientTLS:
        """Each service's TLS files as swarm secrets mount them (its own only)."""
        if not self.mtls:
            return ClientTLS(f"{SECRETS_DIR}/ca.crt")
        return ClientTLS(f"{SECRETS_DIR}/ca.crt", f"{SECRETS_DIR}/tls.crt",
                         f"{SECRETS_DIR}/tls.key")

    def broker_tls(self, pki: RunPKI) -> BrokerTLS:
        return BrokerTLS(f"{SECRETS_DIR}/ca.crt", f"{SECRETS_DIR}/tls.crt",
                         f"{SECRETS_DIR}/tls.key", require_certificate=pki.mutual)

    def prepare(self) -> ComposeOptions:
        """The run directory as for Compose, then the stack file beside the override."""
        opts = super().prepare()
        doc = stack_document(self, opts, self.compose_env())
        header = (f"# Generated by testbed/backends/swarm_run.py from profile {self.profile.name} "
                  f"({self.profile.path}); do not edit.\n# Use: docker stack deploy -c "
                  f"{STACK_FILE} --resolve-image never {self.stack}\n")
        self.stack_file.write_text(header + yaml.safe_dump(doc, sort_keys=False))
        return opts

    def _docker(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["docker", *args], capture_output=True, text=True,
                              timeout=timeout, cwd=str(self.run_dir))
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise UserError(f"`docker {' '.join(args[:2])}` failed: {' | '.join(tail)}")
        return proc

    def check_can_start(self) -> None:
        """A swarm manager here, and no stack of this name yet."""
        swarm_manager()
        if _services(self.stack):
            raise UserError(f"stack {self.stack} is already deployed; `testbed down "
                            f"{self.run_dir}` first, or choose another --out")

    def launch(self) -> None:
        """``docker stack deploy`` of the prepared stack file."""
        # the images are local (testbed images build): never ask a registry for them
        self._docker("stack", "deploy", "-c", str(self.stack_file), "--resolve-image",
                     "never", self.stack)

    def write_state(self) -> None:
        write_json(self.run_dir / STATE, {
            "backend": "swarm", "run_id": self.run_id, "run_dir": str(self.run_dir),
            "project": self.project, "stack": self.stack, "files": [str(self.stack_file)],
            "clients": self.clients, "host_network": self.host_network,
            "updated": time.time()})

    def containers(self) -> dict[str, Any]:
        return stack_containers(self.stack)

    def server_exit(self) -> int | None:
        """The server task's exit code once it has ended, wherever it ran."""
        return task_exit(self.stack, "server")

    def collect_logs(self) -> None:
        """Each service's output into ``logs/<service>.log``, from every node it ran on."""
        self.logs.mkdir(exist_ok=True)
        for name in _services(self.stack):
            with contextlib.suppress(Exception):
                (self.logs / f"{name}.log").write_text(_service_logs(self.stack, name, None))

    def bring_back(self, name: str, container: Any) -> None:
        """A client an availability trace took down comes back in a new task."""
        _restart(self.stack, name)

    def stop(self) -> None:
        self.collect_logs()
        remove_stack(self.stack)


# ------------------------------------------------------------- stack objects, by name
def _services(stack: str) -> dict[str, Any]:
    """service name without the stack prefix -> swarm service."""
    found = docker_client().services.list(filters={"label": f"{NAMESPACE_LABEL}={stack}"})
    return {s.name.removeprefix(f"{stack}_"): s for s in found}


def stack_containers(stack: str) -> dict[str, Any]:
    """service -> its newest task container on this node (all states)."""
    found = docker_client().containers.list(
        all=True, filters={"label": f"{NAMESPACE_LABEL}={stack}"})
    newest: dict[str, Any] = {}
    for c in sorted(found, key=lambda c: c.attrs.get("Created", "")):
        name = c.labels.get(SWARM_SERVICE_LABEL, c.name).removeprefix(f"{stack}_")
        newest[name] = c
    return newest


def _last_task(service: Any) -> dict[str, Any] | None:
    tasks = sorted(service.tasks(), key=lambda t: t.get("CreatedAt", ""))
    return tasks[-1] if tasks else None


def task_exit(stack: str, name: str) -> int | None:
    """Exit code of the newest task of ``name`` once it has ended; None while it runs."""
    svc = _services(stack).get(name)
    if svc is None:
        return None
    task = _last_task(svc)
    if task is None:
        return None
    status = task.get("Status") or {}
    if status.get("State") in ("complete", "failed", "shutdown", "rejected", "orphaned"):
        return int((status.get("ContainerStatus") or {}).get("ExitCode")
                   or (0 if status.get("State") == "complete" else 1))
    return None


def remove_stack(stack: str) -> None:
    """``docker stack rm``, then wait until its containers and network are gone (a new
    deploy of the same name would otherwise race the removal)."""
    subprocess.run(["docker", "stack", "rm", stack], capture_output=True, text=True,
                   timeout=120, check=False)
    deadline = time.monotonic() + 60
    client = docker_client()
    while time.monotonic() < deadline:
        left = client.containers.list(all=True,
                                      filters={"label": f"{NAMESPACE_LABEL}={stack}"})
        nets = client.networks.list(filters={"label": f"{NAMESPACE_LABEL}={stack}"})
        if not left and not nets:
            return
        time.sleep(1)


# --------------------------------------------------- from another terminal (state file)
def attach(run_dir: Path) -> dict[str, Any]:
    from testbed.backends.local import read_state

    state = read_state(run_dir)
    if state.get("backend") != "swarm":
        raise UserError(f"{run_dir} was started with the {state.get('backend')} backend")
    return state


def service_states(run_dir: Path) -> dict[str, dict[str, Any]]:
    """service -> its newest task's state, node and exit code, and (on this node) whether
    its container was OOM-killed and its memory limit: ``testbed status``."""
    state = attach(run_dir)
    stack = state["stack"]
    conts = stack_containers(stack)
    nodes = {n.id: n.attrs.get("Description", {}).get("Hostname", n.id[:12])
             for n in docker_client().nodes.list()}
    out: dict[str, dict[str, Any]] = {}
    for name, svc in sorted(_services(stack).items()):
        task = _last_task(svc) or {}
        status = task.get("Status") or {}
        limits = (svc.attrs["Spec"]["TaskTemplate"].get("Resources") or {}).get("Limits") or {}
        c = conts.get(name)
        out[name] = {"state": status.get("State", "pending"),
                     "node": nodes.get(task.get("NodeID", ""), ""),
                     "exit_code": (status.get("ContainerStatus") or {}).get("ExitCode"),
                     "oom_killed": bool(c is not None
                                        and c.attrs.get("State", {}).get("OOMKilled")),
                     "mem_limit": int(limits.get("MemoryBytes") or 0)}
    return out


def status(run_dir: Path) -> dict[str, Any]:
    """``testbed status`` of a swarm run: each service's task, progress and events."""
    from testbed.backends.local import progress

    state = attach(run_dir)
    return {"run_dir": str(run_dir), "backend": "swarm", "project": state["project"],
            "stack": state["stack"], "containers": service_states(run_dir),
            **progress(run_dir)}


def down(run_dir: Path) -> list[str]:
    """Save the services' logs into RUN/logs, remove the stack; the services that ran."""
    state = attach(run_dir)
    stack = state["stack"]
    running = sorted(n for n, s in service_states(run_dir).items() if s["state"] == "running")
    logs_dir = Path(state["run_dir"]) / "logs"
    logs_dir.mkdir(exist_ok=True)
    for name in _services(stack):
        with contextlib.suppress(Exception):
            (logs_dir / f"{name}.log").write_text(_service_logs(stack, name, None))
    remove_stack(stack)
    return running


def _service_logs(stack: str, name: str, tail: int | None) -> str:
    """``docker service logs``: the service's output from every node it ran on."""
    args = ["docker", "service", "logs", "--raw", "--no-trunc"]
    if tail is not None:
        args += ["--tail", str(tail)]
    proc = subprocess.run([*args, f"{stack}_{name}"], capture_output=True, text=True,
                          timeout=60, check=False)
    return proc.stdout + proc.stderr


def logs(run_dir: Path, service: str | None = None, tail: int = 50) -> str:
    """The last lines of one service's (or every service's) output, from the swarm while the
    stack exists, else from RUN/logs/<service>.log (saved by ``down``)."""
    state = attach(run_dir)
    stack = state["stack"]
    live = set(_services(stack))
    saved = {p.stem: p for p in sorted((Path(state["run_dir"]) / "logs").glob("*.log"))}
    known = sorted(live | set(saved))
    if service is not None and service not in known:
        raise UserError(f"no service or saved log for {service!r}; services: "
                        f"{', '.join(known) or 'none'}")
    parts = []
    for name in [service] if service else known:
        text = (_service_logs(stack, name, tail) if name in live else
                "\n".join(saved[name].read_text(errors="replace").splitlines()[-tail:]))
        parts.append(f"== {name} ==\n{text.rstrip()}")
    return "\n".join(parts)


def _scale(stack: str, name: str, replicas: int) -> None:
    subprocess.run(["docker", "service", "scale", "--detach", f"{stack}_{name}={replicas}"],
                   capture_output=True, text=True, timeout=60, check=True)


def _restart(stack: str, name: str) -> None:
    """A new task for a service whose task has ended (restart policy ``none``)."""
    subprocess.run(["docker", "service", "update", "--detach", "--force", f"{stack}_{name}"],
                   capture_output=True, text=True, timeout=60, check=True)


def inject_dropout(run_dir: Path, client: str, mode: str = "kill",
                   seconds: float | None = None) -> str:
    """Take a client away and (after ``seconds``) bring it back. ``kill``: SIGKILL to its
    container, then a new task; ``pause``: the cgroup freezer; ``stop``: the service scaled
    to 0 and back (SIGTERM; any node). Blocks for ``seconds``."""
    state = attach(run_dir)
    stack = state["stack"]
    if client not in state["clients"]:
        raise UserError(f"unknown client {client!r}; clients: {', '.join(state['clients'])}")
    if mode not in ("kill", "pause", "stop"):
        raise UserError(f"--mode must be kill, pause or stop on the swarm backend, not "
                        f"{mode!r} (disconnect: use the compose or local backend)")
    if mode == "stop":
        seconds = 10.0 if seconds is None else seconds
        append_event(run_dir, "inject", client=client, mode=mode, seconds=seconds)
        _scale(stack, client, 0)
        time.sleep(seconds)
        _scale(stack, client, 1)
        return f"{client} scaled to 0 and back after {seconds:g} s (service {stack}_{client})"
    c = stack_containers(stack).get(client)
    if c is None or c.status not in ("running", "paused"):
        raise UserError(f"{client} has no running container on this node; `--mode stop` "
                        "works on any node")
    if mode == "kill":
        return kill_container(run_dir, client, c, seconds, lambda: _restart(stack, client),
                              "a new task started")
    return pause_container(run_dir, client, c, 10.0 if seconds is None else seconds)


def inject_budget(run_dir: Path, client: str, budget: int) -> str:
    """A new budget for a client: its service's memory limit (a new task with the new
    limit: Swarm cannot change a running task's limit) and the injected-budget file."""
    from testbed.backends.compose import container_limit
    from testbed.backends.local import write_budget

    state = attach(run_dir)
    if client not in state["clients"]:
        raise UserError(f"unknown client {client!r}; clients: {', '.join(state['clients'])}")
    limit = container_limit(budget)
    write_budget(run_dir, client, budget)
    subprocess.run(["docker", "service", "update", "--detach", "--limit-memory", str(limit),
                    f"{state['stack']}_{client}"], capture_output=True, text=True,
                   timeout=60, check=True)
    append_event(run_dir, "inject", client=client, mode="budget", budget_bytes=budget)
    return (f"{client}: memory budget and service limit now {limit / 2**20:.0f} MiB (the "
            "client restarts in a new task with it)")


__all__ = ["SwarmRun", "down", "inject_budget", "inject_dropout", "interpolate", "logs",
           "service_states", "stack_document", "status", "swarm_manager", "task_exit"]

"""Compose override generation: one client container per profile device.

``compose.yaml`` (repository root) holds the broker, the server and ``x-client-template``;
this module turns a profile (after the emulation mapping, :mod:`testbed.profiles`) into an
override file that adds one service per client:

* ``mem_limit = runtime overhead + budget`` (:func:`client_memory_limit`, which the
  Kubernetes export uses too) with ``memswap_limit`` equal to it (no swap: an
  emulated device that needs more than its budget must be OOM-killed, which the runtime
  records as "budget exceeded", instead of quietly swapping). The overhead defaults to
  ``runner.methods.memory.DEFAULT_RESERVE``, the measured resident size of the Python + torch
  runtime, which the memory model also adds on top of the model's bytes;
* ``cpus`` proportional to the device's compute speed (the fastest client gets
  ``max_cpus``): on one host the wall-clock speed ratios then follow the profile's, while
  the virtual clock (runner/emulation/clock.py) gives the exact emulated times;
* identity and wiring in ``environment``: ``TESTBED_CLIENT_ID`` (the device name, which is
  the client id in the run config), ``TESTBED_CLIENT_INDEX``, ``TESTBED_BROKER``,
  ``TESTBED_RUN_ID``, ``TESTBED_BUDGET_BYTES`` (the profile value, last resort of
  runner/emulation/budget.py), ``TESTBED_PASSWORD_FILE`` and the allocator setting
  ``runner.methods.memory.ALLOCATOR_ENV`` the memory model was measured with;
* a GPU reservation (``deploy.resources.reservations.devices``, driver ``nvidia``,
  ``device_ids`` = the GPU index or ``MIG-...`` UUID) when the device has a GPU selector.
  Docker cannot cap GPU memory per container; a MIG instance is a hard cap, an index is not;
  inside either, the client caps its own CUDA allocator to its budget
  (runner/emulation/gpu.py), and a CUDA out-of-memory error under that cap is recorded as
  ``budget_exceeded`` by the client itself (docs/gpu.md). A client that trains on its GPU
  keeps its budget there, while CUDA's own runtime takes host memory the CPU's runtime
  reserve does not count: ``ComposeOptions.cuda_host_reserve`` is added to the memory limit
  of such a client (testbed/backends/compose_run.py sets it when the clients train on CUDA);
* ``TESTBED_EMULATED`` (``1`` when the stand-in runs for a reference model): a client on a
  GPU then takes its budget from ``TESTBED_BUDGET_BYTES`` alone, never from the GPU's size;
* ``network_mode: host`` on every service for tests (``host_network=True``): all traffic on
  loopback, the broker at ``127.0.0.1:PORT``;
* with TLS (``tls_paths``), the broker as ``mqtts://`` and each service's ``TESTBED_TLS_*``
  naming its CA (and with mutual TLS its own certificate and key) where its container sees
  them.

Only fields that both ``docker compose`` (v2) and ``docker-compose`` (v1 1.29, Compose
Specification) accept are used.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from runner.distributed.tls import ClientTLS
from runner.errors import ConfigError
from runner.rundir import RUN_MOUNT  # where the run directory is mounted in every container
from testbed.profiles import EmulatedDevice, EmulationMap, Profile

BASE_COMPOSE = Path(__file__).resolve().parents[2] / "compose.yaml"
TEMPLATE_KEY = "x-client-template"
DEFAULT_BROKER_PORT = 1883
LABEL = "org.hsplitlora"
# RuntimeOptions for containerised fleets (compose, Kubernetes): CPU quotas make slow devices
# slow, so a step and a heartbeat may take longer than on the local backend
CONTAINER_STEP_TIMEOUT = 120.0
CONTAINER_OFFLINE_AFTER = 30.0


@dataclass(frozen=True)
class ComposeOptions:
    """Knobs of the generated override.

    ``overhead``: runtime overhead added to each budget (None: DEFAULT_RESERVE).
    ``max_cpus``: CPU quota of the fastest client (the others get proportionally less);
    ``min_cpus`` keeps a very slow device schedulable at all.

    Per-run additions the profile does not know (testbed/backends/compose_run.py), so that the
    override is generated and written once, never read back and patched:
    ``mem_limits``: client -> container limit in bytes that replaces the computed one
    (``testbed up --mem-limit``); ``volumes``: bind mounts of the server and every client;
    ``broker_volumes``: the broker's; ``user``: ``uid:gid`` the server and clients run as
    (files in the run directory belong to the user, not root); ``env``: extra environment
    of the server and clients. ``tls_paths``: the broker speaks TLS, and these are the TLS
    files as the server's and clients' containers see them, ``{who}`` standing for the
    service's identity (None: plain MQTT). ``cuda_host_reserve``: host memory added to the
    limit of each client with a GPU selector, for CUDA's runtime when the clients train on
    their GPUs (0: they train on the CPU, and the limit is the budget's as everywhere else).
    """

    run_id: str = "run"
    host_network: bool = False
    broker_port: int = DEFAULT_BROKER_PORT
    overhead: int | None = None
    max_cpus: float = 1.0
    min_cpus: float = 0.05
    broker_host: str | None = None  # None: "broker" (the Compose service) or 127.0.0.1
    mem_limits: dict[str, int] = field(default_factory=dict)
    volumes: tuple[str, ...] = ()
    broker_volumes: tuple[str, ...] = ()
    user: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    tls_paths: ClientTLS | None = None
    cuda_host_reserve: int = 0

    def broker_url(self) -> str:
        host = self.broker_host or ("127.0.0.1" if self.host_network else "broker")
        return f"{'mqtts' if self.tls_paths else 'mqtt'}://{host}:{self.broker_port}"

    def tls_env(self, who: str) -> dict[str, str]:
        """``who``'s ``TESTBED_TLS_*`` (empty without TLS)."""
        t = self.tls_paths
        if t is None:
            return {}
        fill = (lambda p: None if p is None else p.format(who=who))  # noqa: E731
        return ClientTLS(fill(t.ca), fill(t.cert), fill(t.key)).env()


def load_base(path: Path = BASE_COMPOSE) -> dict[str, Any]:
    """The base Compose file, parsed (anchors resolved)."""
    try:
        base = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read the base Compose file {path}: {exc.strerror}") from exc
    if not isinstance(base, dict) or TEMPLATE_KEY not in base:
        raise ConfigError(f"{path} has no {TEMPLATE_KEY} (the client service template)")
    return base


PAGE = 4096


def container_limit(nbytes: int) -> int:
    """A container memory limit the kernel keeps as written: cgroups round a limit down to
    whole pages, so round up to a page here and the limit a client reads from its cgroup
    (runner/emulation/budget.py) is exactly the one in the Compose file."""
    return -(-int(nbytes) // PAGE) * PAGE


def client_memory_limit(row: EmulatedDevice, overhead: int | None = None) -> int:
    """A client container's memory limit: the runtime overhead (None: ``DEFAULT_RESERVE``)
    plus the device's stand-in budget, page-rounded. The one place this is computed: the
    Compose override and the Kubernetes manifests (testbed/backends/k8s.py) both call it."""
    from runner.methods.memory import DEFAULT_RESERVE

    overhead = DEFAULT_RESERVE if overhead is None else overhead
    if overhead < 0:
        raise ConfigError(f"runtime overhead must be >= 0, got {overhead}")
    return container_limit(overhead + row.standin_bytes)


def client_limit(row: EmulatedDevice, mem_limits: Mapping[str, int],
                 overhead: int | None = None, cuda_host_reserve: int = 0) -> int:
    """A client container's limit: its ``--mem-limit`` where given (page-rounded), else
    :func:`client_memory_limit`, plus ``cuda_host_reserve`` for a client that trains on its
    GPU (CUDA's host-side runtime; its budget is enforced on the GPU). Written into the
    override and summed by the host-memory check (testbed/backends/compose_run.py
    ``memory_warning``)."""
    if row.name in mem_limits:
        return container_limit(mem_limits[row.name])
    return container_limit(client_memory_limit(row, overhead) + cuda_host_reserve)


def clients_use_cuda(device: str | None) -> bool:
    """Whether a client container with a GPU reservation trains on it: ``--device`` cuda or
    cuda:N, or auto on a host with a CUDA GPU (the reservation then gives the container
    one, and auto picks it; runner/device.py). Not for a client without a reservation: its
    container has no GPU."""
    spec = device or "auto"
    if spec == "cpu":
        return False
    if spec.startswith("cuda"):
        return True
    import torch

    return bool(torch.cuda.is_available())


def gpu_reservation(selector: int | str) -> dict[str, Any]:
    """``deploy`` block reserving one NVIDIA GPU (index) or MIG instance / GPU (UUID)."""
    return {"resources": {"reservations": {"devices": [{
        "driver": "nvidia", "device_ids": [str(selector)], "capabilities": ["gpu"]}]}}}


def cpu_quotas(flops: list[float], max_cpus: float, min_cpus: float = 0.05) -> list[float]:
    """CPU quotas proportional to compute speed; the fastest device gets ``max_cpus``."""
    if max_cpus <= 0:
        raise ConfigError(f"max_cpus must be > 0, got {max_cpus}")
    top = max(flops)
    return [round(max(min_cpus, max_cpus * f / top), 2) for f in flops]


def generate_override(profile: Profile, mapping: EmulationMap,
                      options: ComposeOptions | None = None,
                      base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The override as a dict (services: broker/server tweaks + one service per client)."""
    from runner.methods.memory import ALLOCATOR_ENV

    opts = options or ComposeOptions()
    base = base if base is not None else load_base()
    if len(mapping.clients) != len(profile.devices):
        raise ConfigError(f"mapping has {len(mapping.clients)} clients, profile "
                          f"{profile.name} has {len(profile.devices)}")
    shared_env = {"TESTBED_BROKER": opts.broker_url(), "TESTBED_RUN_ID": opts.run_id,
                  "TESTBED_PROFILE": profile.name,
                  "TESTBED_EMULATED": "1" if mapping.emulated else "0"}
    services: dict[str, Any] = {}
    broker: dict[str, Any] = {}
    unknown = set(opts.mem_limits) - {d.name for d in profile.devices}
    if unknown:
        raise ConfigError(f"memory limits name unknown clients {sorted(unknown)}; the "
                          f"profile's clients are {', '.join(d.name for d in profile.devices)}")
    server: dict[str, Any] = {"environment": {
        **shared_env, "TESTBED_BUDGET_BYTES": str(mapping.server.memory_bytes),
        **opts.tls_env("server"), **opts.env}}
    if profile.server.gpu is not None:
        server["deploy"] = gpu_reservation(profile.server.gpu)
    if opts.host_network:
        broker["network_mode"] = "host"
        server["network_mode"] = "host"
    if opts.broker_volumes:
        broker["volumes"] = list(opts.broker_volumes)
    _per_run(server, opts)
    if broker:
        services["broker"] = broker
    services["server"] = server

    template = base[TEMPLATE_KEY]
    quotas = cpu_quotas([d.compute for d in profile.devices], opts.max_cpus, opts.min_cpus)
    for i, (device, row, cpus) in enumerate(zip(profile.devices, mapping.clients, quotas,
                                                strict=True)):
        if row.name != device.name:
            raise ConfigError(f"mapping row {i} is {row.name}, profile device is {device.name}")
        limit = client_limit(row, opts.mem_limits, opts.overhead,
                             opts.cuda_host_reserve if device.gpu is not None else 0)
        svc = copy.deepcopy(template)
        svc["environment"] = {
            **{k: str(v) for k, v in (svc.get("environment") or {}).items()},
            **shared_env,
            "TESTBED_CLIENT_ID": device.name,
            "TESTBED_CLIENT_INDEX": str(i),
            "TESTBED_BUDGET_BYTES": str(row.memory_bytes),
            "TESTBED_PASSWORD_FILE": f"{RUN_MOUNT}/secrets/{device.name}",
            **opts.tls_env(device.name),
            **ALLOCATOR_ENV,
            **opts.env,
        }
        _per_run(svc, opts)
        svc["mem_limit"] = limit
        svc["memswap_limit"] = limit
        svc["cpus"] = cpus
        svc["labels"] = {f"{LABEL}.role": "client", f"{LABEL}.client": device.name,
                         f"{LABEL}.run": opts.run_id, f"{LABEL}.budget": str(limit)}
        if device.gpu is not None:
            svc["deploy"] = gpu_reservation(device.gpu)
        if opts.host_network:
            svc["network_mode"] = "host"
        services[device.name] = svc
    return {"services": services}


def _per_run(svc: dict[str, Any], opts: ComposeOptions) -> None:
    """The run's bind mounts and user on a server or client service."""
    if opts.volumes:
        svc["volumes"] = list(opts.volumes)
    if opts.user is not None:
        svc["user"] = opts.user


def write_override(profile: Profile, mapping: EmulationMap, path: Path,
                   options: ComposeOptions | None = None,
                   base_path: Path = BASE_COMPOSE) -> Path:
    """Write the override YAML (with a header saying where it came from). A MIG profile
    without an instance UUID is refused here, not in :func:`generate_override`, which
    testbed/backends/k8s.py also uses: Kubernetes requests MIG by profile, Docker only by UUID."""
    for who in [profile.server, *profile.devices]:
        if who.mig is not None and who.gpu is None:
            raise ConfigError(f"{who.name}: mig {who.mig} names a MIG instance's size only; "
                              "Docker reserves an instance by its UUID: add gpu: MIG-...")
    doc = generate_override(profile, mapping, options, load_base(base_path))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# Generated by testbed/backends/compose.py from profile {profile.name} "
              f"({profile.path}); do not edit.\n# Use: docker compose -f {base_path.name} "
              f"-f {path.name} up\n")
    path.write_text(header + yaml.safe_dump(doc, sort_keys=False, default_flow_style=False))
    return path


def compose_command() -> list[str] | None:
    """How to call Compose here: ``docker compose`` (v2) if the plugin answers, else
    ``docker-compose`` (v1), else None."""
    docker = shutil.which("docker")
    if docker:
        try:
            probe = subprocess.run([docker, "compose", "version"], capture_output=True,
                                   text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            probe = None
        if probe is not None and probe.returncode == 0:
            return [docker, "compose"]
    v1 = shutil.which("docker-compose")
    return [v1] if v1 else None

"""Kubernetes manifests for a profile's fleet (``testbed export k8s``, docs/kubernetes.md).

The same fleet as the compose backend (testbed/backends/compose.py, compose_run.py), as objects a
user applies to a cluster of their own; nothing here talks to a cluster. Parity with Compose
is by construction, not by copying: commands and environment come from ``compose.yaml`` and
``generate_override`` (only the broker URL differs: the broker Service's name), each client's
memory limit from :func:`testbed.backends.compose.client_memory_limit`, CPU quotas from the
override, the broker's config and dynsec state from
``runner.distributed.broker.write_container_broker`` and ``runtime.json`` from
``runner.distributed.runtime.write_config``.

Objects (one file each, listed by ``kustomization.yaml``):

* ConfigMap ``<prefix>-config``: ``runtime.json``, ``devices.json``, ``mosquitto.conf``
  (no secrets: passwords and the dynsec state are Secrets);
* Secret ``<prefix>-broker`` (``dynsec.json``) and one ``<prefix>-<who>-password`` per
  participant (server, monitor, each client), each pod mounting only its own;
* TLS (on by default: a cluster's pod network spans nodes, testbed/tlsmode.py): a CA made
  for the export (runner/distributed/tls.py), the broker's certificate and key in Secret
  ``<prefix>-broker-tls`` (mounted by the broker only), the CA certificate (and with
  mutual TLS the participant's own certificate and key) in each participant's Secret; the
  broker listens with TLS only on 8883 and every pod is told ``mqtts://<prefix>-broker:8883``;
* broker Deployment + Service (the Service's name is the broker host every pod is told);
* server Job (its run directory on the PersistentVolumeClaim ``<prefix>-run``) and one Job
  per client with ``requests = limits`` (memory in bytes, CPU in millicores; GPUs as
  ``nvidia.com/gpu`` or ``nvidia.com/mig-<profile>``); ``backoffLimit: 0`` and
  ``restartPolicy: Never`` because a client the kernel OOM-kills is a device over its budget,
  which the run goes on without, as on Compose (``restart: "no"``).

The model (and E2E data) reach the pods through the testbed cache mounted read-only at
``/cache``: the claim :data:`MODEL_CLAIM`, which the user fills once (``model-volume/``
holds it and a loader pod), or a node directory (``model_hostpath``).
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from runner.config import PRECISIONS
from runner.distributed.broker import MONITOR_USER as MONITOR  # an identity for watching the broker
from runner.distributed.tls import TLS_PORT, ClientTLS
from runner.errors import ConfigError, UserError
from runner.rundir import RUN_MOUNT
from testbed.backends.compose import (
    CONTAINER_OFFLINE_AFTER,
    CONTAINER_STEP_TIMEOUT,
    DEFAULT_BROKER_PORT,
    ComposeOptions,
    client_memory_limit,
    generate_override,
    load_base,
)
from testbed.profiles import NODE_LABEL, DeviceModel, EmulationMap, Profile, ServerModel

MODEL_CLAIM = "hsplitlora-cache"  # the one name of the model volume (docs/kubernetes.md)
MODEL_STORAGE = "50Gi"  # room for the materialised model(s) and the E2E release
RUN_STORAGE = "5Gi"  # the server's run directory: records, checkpoints, the adapter
CACHE_MOUNT = "/cache"  # as on Compose (testbed/backends/compose_run.py)
APP = "hsplitlora-testbed"
MANAGED_BY = "testbed-export"
RUN_LABEL = "org.hsplitlora/run"
CLIENT_LABEL = "org.hsplitlora/client"
BUDGET_ANNOTATION = "org.hsplitlora/memory-limit-bytes"
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
_RESOURCE_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


class FileMode(int):
    """A file mode, written in octal (``0400``) as people read modes; YAML 1.1 readers
    (kubectl, PyYAML) read it back as the same number."""


@dataclass(frozen=True)
class ExportOptions:
    """What the export may change; everything else comes from the profile.

    ``run_id``: the run id (MQTT topics, labels; default the profile's name);
    ``precision``: one of runner/config.py ``PRECISIONS`` (fp32, bf16, or fp16 for GPUs
    without bf16, as every backend takes them; ``auto`` depends on the cluster's hardware,
    so it cannot be decided here); ``model_hostpath``: a node directory holding the cache
    instead of the claim :data:`MODEL_CLAIM`; ``tls``: the broker speaks TLS (``--tls``,
    default on); ``mutual``: every pod presents its own certificate (``--mtls``). Emulation
    is decided before, in the :class:`EmulationMap`.
    """

    run_id: str | None = None
    steps: int | None = None
    precision: str = "fp32"
    model_hostpath: str | None = None
    tls: bool = True
    mutual: bool = False


@dataclass
class Manifests:
    """The export: relative path -> object (in apply order), the paths holding secrets
    (written 0600), and notes for the user (one line each)."""

    run_id: str = ""
    broker_url: str = ""  # what every pod is told (mqtts:// with TLS)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    secret_files: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)  # role/participant -> object name

    def add(self, path: str, obj: dict[str, Any], header: str, secret: bool = False) -> None:
        self.files[path] = obj
        self.headers[path] = header
        if secret:
            self.secret_files.add(path)


# ------------------------------------------------------------------------------- names
def dns_label(text: str) -> str:
    """``text`` as an RFC 1123 label piece: lowercase, other characters as '-'."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", text.lower())).strip("-")


def object_names(run_id: str, participants: list[str]) -> dict[str, str]:
    """Object names of the run: ``prefix``, ``broker`` (also the Service, hence the broker
    host), ``config``, ``run`` and one per participant; UserError when two collide or one is
    longer than 63 characters (a Job's name becomes a label value)."""
    prefix = f"hsl-{dns_label(run_id)}".rstrip("-")
    names = {"prefix": prefix, "broker": f"{prefix}-broker", "config": f"{prefix}-config",
             "run": f"{prefix}-run"}
    for who in participants:
        names[f"job:{who}"] = f"{prefix}-{dns_label(who)}"
        names[f"secret:{who}"] = f"{prefix}-{dns_label(who)}-password"
    seen: dict[str, str] = {}
    for key, name in names.items():
        if key == "prefix":
            continue
        if not _RESOURCE_NAME.fullmatch(name) or len(name) > 63:
            raise UserError(f"object name {name!r} (from run id {run_id!r}) is not a valid "
                            "Kubernetes name of at most 63 characters; pass a shorter --run-id")
        if name in seen:
            raise UserError(f"{key.split(':')[-1]!r} and {seen[name].split(':')[-1]!r} both "
                            f"become the object name {name!r}; rename a device or pass "
                            "another --run-id")
        seen[name] = key
    return names


def labels(run_id: str, prefix: str, component: str, client: str | None = None
           ) -> dict[str, str]:
    """The labels every object carries (app.kubernetes.io/* and the run id)."""
    out = {"app.kubernetes.io/name": APP, "app.kubernetes.io/instance": prefix,
           "app.kubernetes.io/component": component, "app.kubernetes.io/part-of": "hsplitlora",
           "app.kubernetes.io/managed-by": MANAGED_BY, RUN_LABEL: run_id}
    if client is not None:
        out[CLIENT_LABEL] = client
    for key, value in out.items():
        if len(value) > 63 or not _LABEL_VALUE.fullmatch(value):
            raise UserError(f"{value!r} cannot be a Kubernetes label value ({key}): at most "
                            "63 of A-Z a-z 0-9 - _ . starting and ending alphanumeric")
    return out


# --------------------------------------------------------------------------- resources
def gpu_resources(who: DeviceModel | ServerModel) -> dict[str, int]:
    """Extended resources of a device: ``nvidia.com/mig-<profile>`` where it names a MIG
    profile, ``nvidia.com/gpu`` where it names a GPU, nothing otherwise. A MIG UUID alone
    cannot be requested: the device plugin schedules MIG instances by profile."""
    if who.mig is not None:
        return {f"nvidia.com/mig-{who.mig}": 1}
    if who.gpu is None:
        return {}
    if str(who.gpu).startswith("MIG-"):
        raise UserError(f"{who.name}: gpu {who.gpu} names a MIG instance by UUID, which "
                        "Kubernetes cannot request; add mig: PROFILE (its size, e.g. "
                        "1g.10gb) to the profile")
    return {"nvidia.com/gpu": 1}


def millicores(cpus: float) -> str:
    """A Compose ``cpus`` quota as a Kubernetes CPU quantity."""
    return f"{max(1, round(cpus * 1000))}m"


def _env(values: dict[str, Any]) -> list[dict[str, str]]:
    """Compose environment -> a container's env list; a ``${...}`` left over would mean a
    Compose interpolation nothing here resolves (a bug, not a user error)."""
    out = []
    for key, value in values.items():
        if "${" in str(value):
            raise ConfigError(f"environment {key}={value} still holds a Compose variable")
        out.append({"name": key, "value": str(value)})
    return out


# ------------------------------------------------------------------------ run config
# Where a pod finds its TLS files: its own Secret's items beside its password (see
# _run_pod), and the broker's Secret at TLS_MOUNT in the broker pod.
TLS_MOUNT = f"{RUN_MOUNT}/tls"
POD_TLS = ClientTLS(f"{RUN_MOUNT}/secrets/ca.crt")
POD_MTLS = ClientTLS(f"{RUN_MOUNT}/secrets/ca.crt", f"{RUN_MOUNT}/secrets/tls.crt",
                     f"{RUN_MOUNT}/secrets/tls.key")


def run_files(profile: Profile, mapping: EmulationMap, options: ExportOptions, run_id: str,
              broker_url: str, broker_host: str = "broker"
              ) -> tuple[dict[str, str], dict[str, str], str, list[str], dict[str, dict[str, str]]]:
    """What the containers read, produced by the code the compose backend uses:
    (ConfigMap data, passwords by identity, dynsec.json text, notes, TLS files as PEM text
    by owner: "broker" and, with TLS, each identity; empty without TLS)."""
    from runner.distributed.broker import write_container_broker
    from runner.distributed.runtime import RuntimeOptions, write_config
    from runner.distributed.tls import BrokerTLS, make_pki
    from testbed.profiles import train_config, write_devices_file

    notes: list[str] = []
    cfg = train_config(profile, mapping)
    changes: dict[str, Any] = {"devices": f"{RUN_MOUNT}/devices.json",
                               "precision": options.precision}
    if options.steps is not None:
        changes["steps"] = options.steps
    data = profile.experiment.data
    if data not in (None, "synthetic"):
        name = Path(str(data)).name
        changes["data"] = f"{CACHE_MOUNT}/data/{name}"
        notes.append(f"data: put {data} into the model volume as data/{name}")
    elif data is None:
        notes.append("data: the pods look for the E2E data in the model volume's e2e/ "
                     "(the testbed cache layout); nothing can be downloaded in a pod")
    cfg = replace(cfg, **changes)
    cfg.validate()
    clients = [d.name for d in profile.devices]
    tls_files: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory(prefix="hsl-k8s-") as tmp:
        work = Path(tmp)
        broker_tls = None
        if options.tls or options.mutual:
            # the Service's name is what every pod dials; the namespace-qualified names
            # for pods that spell it out
            pki = make_pki(work / "tls", run=run_id,
                           hosts=[broker_host, f"{broker_host}.default.svc",
                                  f"{broker_host}.default.svc.cluster.local"],
                           identities=["server", MONITOR, *clients], mutual=options.mutual)
            broker_tls = BrokerTLS(f"{TLS_MOUNT}/ca.crt", f"{TLS_MOUNT}/tls.crt",
                                   f"{TLS_MOUNT}/tls.key", require_certificate=options.mutual)
            ca = pki.ca.read_text()
            for who in ["broker", "server", MONITOR, *clients]:
                tls_files[who] = {"ca.crt": ca}
                if who == "broker" or options.mutual:
                    tls_files[who].update({"tls.crt": pki.cert(who).read_text(),
                                           "tls.key": pki.key(who).read_text()})
        try:
            creds = write_container_broker(run_id, clients, work / "broker",
                                           port=TLS_PORT if broker_tls else DEFAULT_BROKER_PORT,
                                           mount=f"{RUN_MOUNT}/broker", host="0.0.0.0",
                                           tls=broker_tls)
        except ValueError as exc:  # run or client id not usable as an MQTT topic level
            raise UserError(str(exc)) from None
        write_devices_file(mapping, work / "devices.json",
                           [d.availability for d in profile.devices])
        write_config(work / "runtime.json", cfg, Path(RUN_MOUNT), run_id=run_id,
                     clients=clients, broker=broker_url,
                     options=RuntimeOptions(step_timeout=CONTAINER_STEP_TIMEOUT,
                                            offline_after=CONTAINER_OFFLINE_AFTER))
        data_files = {"runtime.json": (work / "runtime.json").read_text(),
                      "devices.json": (work / "devices.json").read_text(),
                      "host-paths.json": host_paths(),
                      "mosquitto.conf": (work / "broker" / "mosquitto.conf").read_text()}
        dynsec = (work / "broker" / "dynsec.json").read_text()
    return data_files, {who: c.password for who, c in creds.items()}, dynsec, notes, tls_files


def host_paths() -> str:
    """``host-paths.json`` for the run directory (runner/rundir.py): /cache is this host's
    testbed cache, which the model volume is filled from, so ``testbed eval`` and
    ``testbed report`` resolve the run's container paths once it is copied back here."""
    import json

    from runner.model.models import cache_dir

    return json.dumps({"run_mount": RUN_MOUNT, "mounts": {CACHE_MOUNT: str(cache_dir())}},
                      indent=2, sort_keys=True) + "\n"


# ---------------------------------------------------------------------------- objects
def _meta(name: str, lab: dict[str, str], annotations: dict[str, str] | None = None
          ) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": lab}
    if annotations:
        meta["annotations"] = annotations
    return meta


def _cache_volume(options: ExportOptions) -> dict[str, Any]:
    """The model volume: the claim :data:`MODEL_CLAIM` or a node directory (read-only)."""
    if options.model_hostpath:
        return {"name": "cache", "hostPath": {"path": options.model_hostpath,
                                              "type": "Directory"}}
    return {"name": "cache", "persistentVolumeClaim": {"claimName": MODEL_CLAIM,
                                                       "readOnly": True}}


RUN_FILES = ("runtime.json", "devices.json", "host-paths.json")  # ConfigMap -> run directory
CONFIG_MOUNT = "/config"


def _run_pod(who: str, *, names: dict[str, str], image: str, command: list[str],
             env: dict[str, Any], resources: dict[str, Any] | None, run_volume: dict[str, Any],
             options: ExportOptions, lab: dict[str, str], node: str | None = None,
             tls_keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """Pod template of the server or a client: the run directory at RUN_MOUNT, its own
    password (and its TLS files, ``tls_keys`` of its Secret) under secrets/, the cache at
    /cache; on the node labelled
    ``hsplitlora.node=NODE`` when the profile names one (as on the swarm backend).

    An init container copies :data:`RUN_FILES` from the ConfigMap into the run directory
    (not subPath mounts: those leave empty placeholder files in the volume), so the server's
    run directory is whole when copied back, as a Compose run's is. It gets the same
    resources as the main container, which keeps a client pod in the Guaranteed QoS class."""
    mounts = [{"name": "run", "mountPath": RUN_MOUNT},
              {"name": "password", "mountPath": f"{RUN_MOUNT}/secrets", "readOnly": True},
              {"name": "cache", "mountPath": CACHE_MOUNT, "readOnly": True}]
    container: dict[str, Any] = {
        "name": "server" if who == "server" else "client",
        "image": image, "imagePullPolicy": "IfNotPresent", "command": command,
        "env": _env(env), "volumeMounts": mounts}
    init: dict[str, Any] = {
        "name": "run-config", "image": image, "imagePullPolicy": "IfNotPresent",
        "command": ["cp", *[f"{CONFIG_MOUNT}/{f}" for f in RUN_FILES], f"{RUN_MOUNT}/"],
        "volumeMounts": [{"name": "run", "mountPath": RUN_MOUNT},
                         {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True}]}
    if resources:
        container["resources"] = resources
        init["resources"] = {k: dict(v) for k, v in resources.items()}
    placement = {"nodeSelector": {NODE_LABEL: node}} if node else {}
    return {"metadata": {"labels": lab}, "spec": {
        **placement,
        "restartPolicy": "Never", "enableServiceLinks": False, "initContainers": [init],
        "containers": [container],
        "volumes": [
            {"name": "run", **run_volume},
            {"name": "config", "configMap": {"name": names["config"]}},
            {"name": "password", "secret": {
                "secretName": names[f"secret:{who}"], "defaultMode": FileMode(0o400),
                "items": [{"key": "password", "path": who},
                          *({"key": k, "path": k} for k in tls_keys)]}},
            _cache_volume(options),
        ]}}


def _job(name: str, lab: dict[str, str], template: dict[str, Any],
         annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """A Job that runs its pod once: no retries (an OOM-killed client stays down)."""
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": _meta(name, lab, annotations),
            "spec": {"backoffLimit": 0, "template": template}}


def build(profile: Profile, mapping: EmulationMap, options: ExportOptions | None = None
          ) -> Manifests:
    """Every object of the export, in memory (nothing is written; see :func:`write`)."""
    from testbed.backends.images import BROKER_IMAGE, RUNTIME_IMAGE

    opts = options or ExportOptions()
    if opts.precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, not "
                        f"{opts.precision!r} (auto depends on the cluster's hardware)")
    run_id = opts.run_id or profile.name
    clients = [d.name for d in profile.devices]
    names = object_names(run_id, ["server", MONITOR, *clients])
    prefix = names["prefix"]
    gpus = {d.name: gpu_resources(d) for d in [profile.server, *profile.devices]}
    base = load_base()
    secure = opts.tls or opts.mutual
    port = TLS_PORT if secure else DEFAULT_BROKER_PORT
    pod_tls = (POD_MTLS if opts.mutual else POD_TLS) if secure else None
    wiring = ComposeOptions(run_id=run_id, broker_host=names["broker"], broker_port=port,
                            tls_paths=pod_tls)
    override = generate_override(profile, mapping, wiring, base)["services"]
    broker_url = wiring.broker_url()
    data, passwords, dynsec, notes, tls_files = run_files(profile, mapping, opts, run_id,
                                                          broker_url, names["broker"])
    out = Manifests(run_id=run_id, broker_url=broker_url, notes=notes, names=names)
    made = (f"Generated by `testbed export k8s --profile {profile.name}` (testbed/backends/k8s.py; "
            "docs/kubernetes.md): ")

    out.add("config.yaml", {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": _meta(names["config"], labels(run_id, prefix, "config")), "data": data},
        made + "what the containers read: runtime.json, devices.json and host-paths.json "
        "(copied into each run directory by an init container), mosquitto.conf. No secrets.")
    out.add("secret-broker.yaml", {
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": _meta(f"{prefix}-broker-dynsec", labels(run_id, prefix, "credentials")),
        "stringData": {"dynsec.json": dynsec}},
        made + "the broker's dynamic-security state: salted password hashes and the ACL.",
        secret=True)
    for who in ["server", MONITOR, *clients]:
        mine = tls_files.get(who, {})
        out.add(f"secret-{dns_label(who)}.yaml", {
            "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": _meta(names[f"secret:{who}"], labels(run_id, prefix, "credentials")),
            "stringData": {"username": who, "password": passwords[who], **mine}},
            made + f"{who}'s broker password"
            + (", the run's CA certificate" if mine else "")
            + (" and its TLS certificate and key" if "tls.key" in mine else "")
            + (" (for watching the broker with mosquitto_sub)." if who == MONITOR else "."),
            secret=True)
    out.names["secret:broker"] = f"{prefix}-broker-dynsec"
    if tls_files:
        out.add("secret-broker-tls.yaml", {
            "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": _meta(f"{prefix}-broker-tls", labels(run_id, prefix, "credentials")),
            "stringData": tls_files["broker"]},
            made + "the broker's TLS certificate and key, and the CA of this export (its key "
            "was never written: nothing can be issued for this run after the export).",
            secret=True)
        out.names["secret:broker-tls"] = f"{prefix}-broker-tls"
    tls_keys = tuple(sorted(tls_files.get("server", {})))

    # broker: Deployment + Service
    port_name = "mqtts" if secure else "mqtt"
    broker_mounts: list[dict[str, Any]] = []
    broker_volumes: list[dict[str, Any]] = []
    if tls_files:
        broker_mounts.append({"name": "tls", "mountPath": TLS_MOUNT, "readOnly": True})
        broker_volumes.append({"name": "tls", "secret": {
            "secretName": f"{prefix}-broker-tls", "defaultMode": FileMode(0o400)}})
    broker_base = base["services"]["broker"]
    blab = labels(run_id, prefix, "broker")
    selector = {"app.kubernetes.io/instance": prefix, "app.kubernetes.io/component": "broker"}
    out.add("broker-service.yaml", {
        "apiVersion": "v1", "kind": "Service", "metadata": _meta(names["broker"], blab),
        "spec": {"selector": selector, "ports": [{
            "name": port_name, "port": port, "targetPort": port_name,
            "protocol": "TCP"}]}},
        made + f"the broker's address: every pod is told {broker_url}.")
    out.add("broker-deployment.yaml", {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(names["broker"], blab),
        "spec": {"replicas": 1, "strategy": {"type": "Recreate"},
                 "selector": {"matchLabels": selector},
                 "template": {"metadata": {"labels": blab}, "spec": {
                     "enableServiceLinks": False,
                     "containers": [{
                         "name": "mosquitto", "image": BROKER_IMAGE,
                         "imagePullPolicy": "IfNotPresent",
                         "command": list(broker_base["command"]),
                         "env": _env(broker_base.get("environment") or {}),
                         "ports": [{"name": port_name, "containerPort": port}],
                         "readinessProbe": {"tcpSocket": {"port": port_name},
                                            "periodSeconds": 2},
                         "volumeMounts": [
                             {"name": "run", "mountPath": RUN_MOUNT},
                             {"name": "config", "subPath": "mosquitto.conf", "readOnly": True,
                              "mountPath": f"{RUN_MOUNT}/broker/mosquitto.conf"},
                             {"name": "dynsec", "subPath": "dynsec.json", "readOnly": True,
                              "mountPath": f"{RUN_MOUNT}/broker/dynsec.json"},
                             *broker_mounts]}],
                     "volumes": [
                         {"name": "run", "emptyDir": {}},
                         {"name": "config", "configMap": {"name": names["config"]}},
                         {"name": "dynsec", "secret": {
                             "secretName": f"{prefix}-broker-dynsec",
                             "defaultMode": FileMode(0o600)}},
                         *broker_volumes]}}}},
        made + "Mosquitto with the compose backend's image, command and config "
        "(its log: /run/testbed/broker/broker.log in the pod).")

    # server: Job + its run directory
    out.add("run-volume.yaml", {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": _meta(names["run"], labels(run_id, prefix, "run-storage")),
        "spec": {"accessModes": ["ReadWriteOnce"],
                 "resources": {"requests": {"storage": RUN_STORAGE}}}},
        made + "the server's run directory (metrics, events, checkpoints, the adapter); "
        "results/reader-pod.yaml reads it back.")
    slab = labels(run_id, prefix, "server")
    server_env = {**base["services"]["server"]["environment"],
                  **override["server"]["environment"], "TESTBED_CACHE": CACHE_MOUNT}
    server_gpu = gpus[profile.server.name]
    out.add("server-job.yaml", _job(names["job:server"], slab, _run_pod(
        "server", names=names, image=RUNTIME_IMAGE,
        command=list(base["services"]["server"]["command"]), env=server_env,
        resources={"requests": server_gpu, "limits": server_gpu} if server_gpu else None,
        run_volume={"persistentVolumeClaim": {"claimName": names["run"]}},
        options=opts, lab=slab, node=profile.server.node, tls_keys=tls_keys)),
        made + "the server (runner.server), as on Compose: no memory limit.")

    # clients: one Job each, limits as the compose backend sets them
    for device, row in zip(profile.devices, mapping.clients, strict=True):
        svc = override[device.name]
        limit = client_memory_limit(row)
        quota = {"memory": str(limit), "cpu": millicores(svc["cpus"]), **gpus[device.name]}
        clab = labels(run_id, prefix, "client", device.name)
        pod = _run_pod(device.name, names=names, image=RUNTIME_IMAGE,
                       command=list(svc["command"]),
                       env={**svc["environment"], "TESTBED_CACHE": CACHE_MOUNT},
                       resources={"requests": dict(quota), "limits": dict(quota)},
                       run_volume={"emptyDir": {}}, options=opts, lab=clab,
                       node=device.node, tls_keys=tls_keys)
        out.add(f"client-{dns_label(device.name)}-job.yaml",
                _job(names[f"job:{device.name}"], clab, pod, {BUDGET_ANNOTATION: str(limit)}),
                made + f"client {device.name}: memory limit {limit} bytes = runtime reserve + "
                + f"its stand-in budget ({row.standin_bytes} bytes), no swap.")

    if any(w.gpu is not None and w.mig is None for w in [profile.server, *profile.devices]):
        notes.append("gpu: Kubernetes' device plugin picks which GPU a pod gets; the "
                     "profile's GPU index or UUID is not honoured")
    if any(gpus[d.name] for d in profile.devices):
        notes.append("gpu: a client pod with a GPU or MIG instance trains on it, capping its "
                     "CUDA allocator to its budget (docs/gpu.md); CUDA's host runtime needs "
                     "about 1 GiB of host memory more than its memory limit allows: raise "
                     "that pod's limit (requests = limits) by as much")
    _extras(out, run_id, prefix, names, opts, made)
    return out


def _extras(out: Manifests, run_id: str, prefix: str, names: dict[str, str],
            opts: ExportOptions, made: str) -> None:
    """Objects outside the kustomization: the model volume and its loader (applied once,
    before the run) and a pod that reads the results back (after it)."""
    from testbed.backends.images import RUNTIME_IMAGE

    def idle_pod(name: str, component: str, volume: dict[str, Any], mount: str,
                 read_only: bool) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "Pod",
                "metadata": _meta(name, labels(run_id, prefix, component)),
                "spec": {"restartPolicy": "Never", "containers": [{
                    "name": "shell", "image": RUNTIME_IMAGE, "imagePullPolicy": "IfNotPresent",
                    "command": ["sleep", "infinity"],
                    "volumeMounts": [{"name": "data", "mountPath": mount,
                                      "readOnly": read_only}]}],
                         "volumes": [{"name": "data", **volume}]}}

    if not opts.model_hostpath:
        out.add("model-volume/cache-claim.yaml", {
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": _meta(MODEL_CLAIM, labels(run_id, prefix, "model-cache")),
            "spec": {"accessModes": ["ReadWriteMany"],
                     "resources": {"requests": {"storage": MODEL_STORAGE}}}},
            made + "the model volume every pod mounts read-only at /cache: apply it once and "
            "fill it (loader-pod.yaml) before the run. Shared by runs; not in "
            "kustomization.yaml, so deleting a run keeps it.")
        out.add("model-volume/loader-pod.yaml", idle_pod(
            f"{prefix}-model-loader", "model-loader",
            {"persistentVolumeClaim": {"claimName": MODEL_CLAIM}}, CACHE_MOUNT, False),
            made + "a shell on the model volume: kubectl cp the testbed cache into /cache, "
            "then delete this pod.")
    out.add("results/reader-pod.yaml", idle_pod(
        f"{prefix}-results", "results",
        {"persistentVolumeClaim": {"claimName": names["run"], "readOnly": True}},
        RUN_MOUNT, True),
        made + "a shell on the finished run's directory: kubectl cp it back, then delete "
        "this pod.")


def kustomization(manifests: Manifests) -> dict[str, Any]:
    """``kustomization.yaml``: the run's objects (not model-volume/ nor results/) and the
    two images, so ``kustomize edit set image`` can point them at a registry."""
    from testbed.backends.images import BROKER_IMAGE, RUNTIME_IMAGE

    images = []
    for image in (RUNTIME_IMAGE, BROKER_IMAGE):
        name, _, tag = image.partition(":")
        images.append({"name": name, "newName": name, "newTag": tag or "latest"})
    return {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": [p for p in manifests.files if "/" not in p], "images": images}


# ---------------------------------------------------------------------------- rendering
class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings (runtime.json, mosquitto.conf read as files), octal
    file modes, and no ``&id001`` anchors: each object reads on its own."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value and not any(line != line.rstrip() for line in
                                             value.splitlines()) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)
_Dumper.add_representer(FileMode, lambda dumper, value: dumper.represent_scalar(
    "tag:yaml.org,2002:int", f"0{value:o}"))


def render(obj: dict[str, Any], header: str) -> str:
    """One object as YAML after a comment header (wrapped at 92 columns)."""
    import textwrap

    lines = textwrap.wrap(header, 90) or [""]
    body = yaml.dump(obj, Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                     width=92, allow_unicode=True)
    return "".join(f"# {line}\n" for line in lines) + body


def texts(manifests: Manifests) -> dict[str, str]:
    """Relative path -> file text, ``kustomization.yaml`` included."""
    out = {path: render(obj, manifests.headers[path]) for path, obj in manifests.files.items()}
    out["kustomization.yaml"] = render(
        kustomization(manifests), "Apply with `kubectl apply -k .` (docs/kubernetes.md). "
        "model-volume/ (once, before) and results/ (after) are applied on their own.")
    return out


__all__ = ["MODEL_CLAIM", "ExportOptions", "Manifests", "build", "gpu_resources",
           "kustomization", "object_names", "render", "texts"]

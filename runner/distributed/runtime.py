"""Shared pieces of the distributed runtime (``runner.server`` / ``runner.client``).

Why a separate module: the server and the client processes start the same way (a container
sets environment variables and mounts a JSON config), build their halves of the same model
the same way as the in-process trainer (:mod:`runner.trainer`), and agree on a handful of
control operations carried in ``config`` messages. Keeping those in one place is what makes a
distributed run reproduce an in-process one step for step.

Start-up contract (docs/protocol.md, "Runtime"):

* ``TESTBED_CONFIG``: path of a JSON file ``{"train": TrainConfig dict, "run_dir": path,
  "clients": [ids], "run_id": id, "broker": url, "runtime": {RuntimeOptions fields}}``;
* ``TESTBED_BROKER`` (``mqtt://host:port``), ``TESTBED_RUN_ID``, ``TESTBED_CLIENT_ID`` (clients),
  ``TESTBED_USERNAME`` / ``TESTBED_PASSWORD`` override or complete the file;
* the server also reads ``TESTBED_RESUME=1`` (or ``--resume``);
* ``TESTBED_DEVICE`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``) overrides the config's
  ``train.device`` for this process (runner/device.py);
* ``TESTBED_MQTT`` (``paho``, ``native``, ``auto``) picks the MQTT client library when
  ``RuntimeOptions.mqtt`` does not (runner/distributed/transport.py ``resolve_backend``);
* with a TLS broker (``mqtts://``), ``TESTBED_TLS_CA`` names the run's CA certificate and,
  with mutual TLS, ``TESTBED_TLS_CERT`` / ``TESTBED_TLS_KEY`` this identity's certificate
  and key (runner/distributed/tls.py).

This module never imports ``testbed/`` (a container holds only ``runner/``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from runner.config import TrainConfig
from runner.distributed.broker import BrokerAddress, Credentials, parse_broker_url
from runner.distributed.tls import ClientTLS, TLSError
from runner.errors import ConfigError
from runner.methods import registry

# The distributed runtime runs every method. The heterogeneous ones put per-client split
# points and ranks, NAA factors (or per-client shares of a padded aggregate), IWI probes and
# block hand-overs on the wire (runner/methods/hsplitlora_server.py, hsplitlora_client.py and
# what HetLoRA shares with them, hetero_server.py, hetero_client.py); ``ft``'s one client
# uploads its whole model at evaluation points (a message holds at most 1 GiB:
# models up to about 250 M parameters in fp32).
NAA_METHODS = registry.having(hetero=True, naa=True)
HETERO_DISTRIBUTED = registry.having(hetero=True)

# The operations of ``config`` messages (server -> clients) are typed in
# runner/distributed/control.py.

log = logging.getLogger("runner.distributed.runtime")


@dataclass
class RuntimeOptions:
    """Knobs of the distributed runtime (not part of the training maths).

    ``step_timeout``: seconds the server waits for a step's activations (and an aggregation's
    adapters) before going on with the clients that answered. ``heartbeat``: client heartbeat
    period; ``offline_after``: silence after which a client is marked offline.
    ``join_timeout``: how long the server waits at the start (and whenever nobody is online)
    for clients. ``wire``: None (float32), "float16" or "bfloat16" for activations and
    gradients (adapters always travel as float32). ``repair_interval``: minimum seconds
    between two repair messages to one client (see docs/protocol.md "Runtime").
    ``server_timeout``: a client gives up after this long without hearing from the server.
    ``min_step_time``: the server paces steps to at least this many seconds (still handling
    messages meanwhile): emulates slower devices, and lets tests land a fault mid-run.
    ``will_grace``: a client's last will marks it offline only if, this many seconds later,
    the server's own connection did not drop meanwhile (Mosquitto publishes all wills when
    it shuts down) and the client has not spoken since.
    ``mqtt``: the MQTT client library, "native" (libmosquitto), "paho" or "auto"; None:
    ``TESTBED_MQTT`` or the default (runner/distributed/transport.py ``resolve_backend``).
    """

    step_timeout: float = 30.0
    heartbeat: float = 0.5
    offline_after: float = 5.0
    join_timeout: float = 120.0
    wire: str | None = None
    chunk_size: int = 1 << 20
    repair_interval: float = 1.0
    server_timeout: float = 600.0
    reconnect_max: float = 1.0
    max_reject_events: int = 100_000
    min_step_time: float = 0.0
    will_grace: float = 1.0
    overwrite: bool = False
    mqtt: str | None = None

    def validate(self) -> None:
        if self.wire not in (None, "float16", "bfloat16"):
            raise ConfigError(f"wire must be float32, float16 or bfloat16, not {self.wire!r}")
        for name in ("step_timeout", "heartbeat", "offline_after", "join_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0")
        if self.min_step_time < 0:
            raise ConfigError("min_step_time must be >= 0")
        if self.mqtt not in (None, "auto", "native", "paho"):
            raise ConfigError(f"mqtt must be auto, native or paho, not {self.mqtt!r}")


@dataclass
class RuntimeConfig:
    """Everything one process of a distributed run needs to start."""

    train: TrainConfig
    run_dir: Path
    run_id: str
    clients: list[str]
    broker: BrokerAddress
    credentials: Credentials
    options: RuntimeOptions = field(default_factory=RuntimeOptions)
    me: str = "server"
    resume: bool = False
    tls: ClientTLS | None = None  # the broker speaks TLS (its address says so)

    def index(self, cid: str) -> int:
        return self.clients.index(cid)


def default_clients(n: int) -> list[str]:
    """The in-process trainer names clients ``client0``..; keeping the names keeps the run
    directories of both comparable record for record."""
    return [f"client{i}" for i in range(n)]


def write_config(path: Path, train: TrainConfig, run_dir: Path, *, run_id: str,
                 clients: list[str] | None = None, broker: str | None = None,
                 options: RuntimeOptions | None = None) -> Path:
    """Write the JSON file that ``TESTBED_CONFIG`` points at (no secrets in it)."""
    doc = {"train": train.to_dict(), "run_dir": str(run_dir), "run_id": run_id,
           "clients": clients or default_clients(train.clients), "broker": broker,
           "runtime": asdict(options or RuntimeOptions())}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    return path


def load_config(me: str | None = None, env: dict[str, str] | None = None,
                resume: bool = False) -> RuntimeConfig:
    """Read the config file and the environment (see the module docstring)."""
    env = dict(os.environ if env is None else env)
    path = env.get("TESTBED_CONFIG")
    if not path:
        raise ConfigError("TESTBED_CONFIG must name the run's JSON config file")
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read TESTBED_CONFIG {path}: {e}") from e
    train = TrainConfig.from_dict(doc["train"])
    if env.get("TESTBED_DEVICE"):
        # This process's own device (docs/gpu.md "Device placement"): one config file for
        # the run, and each container or process trains where its host puts it (its GPU,
        # its MIG instance, the CPU).
        train.device = env["TESTBED_DEVICE"].strip()
    train.validate()
    clients = list(doc.get("clients") or default_clients(train.clients))
    if registry.traits(train).central:  # one client trains on the pooled data
        clients = clients[:1]
    elif len(clients) != train.clients:
        raise ConfigError(f"config lists {len(clients)} clients, train.clients is "
                          f"{train.clients}")
    known = {f.name for f in fields(RuntimeOptions)}
    options = RuntimeOptions(**{k: v for k, v in (doc.get("runtime") or {}).items()
                                if k in known})
    options.validate()
    url = env.get("TESTBED_BROKER") or doc.get("broker")
    if not url:
        raise ConfigError("TESTBED_BROKER (mqtt://host:port) is not set")
    run_id = env.get("TESTBED_RUN_ID") or doc.get("run_id")
    if not run_id:
        raise ConfigError("TESTBED_RUN_ID is not set")
    me = me or env.get("TESTBED_CLIENT_ID") or "server"
    if me != "server" and me not in clients:
        raise ConfigError(f"TESTBED_CLIENT_ID {me!r} is not one of {clients}")
    password = env.get("TESTBED_PASSWORD")
    if password is None and env.get("TESTBED_PASSWORD_FILE"):
        password = Path(env["TESTBED_PASSWORD_FILE"]).read_text().strip()
    if password is None:
        raise ConfigError("TESTBED_PASSWORD (or TESTBED_PASSWORD_FILE) is not set")
    creds = Credentials(env.get("TESTBED_USERNAME") or me, password)
    resume = resume or env.get("TESTBED_RESUME", "") in ("1", "true", "yes")
    broker = parse_broker_url(url)
    try:
        tls = ClientTLS.from_env(env)
        if tls is not None:
            tls.check_files()
    except TLSError as e:
        raise ConfigError(str(e)) from None
    if tls is not None and not broker.tls:
        raise ConfigError(f"TLS files are set ({', '.join(tls.env())}) but the broker URL "
                          f"{url} is plain MQTT: use mqtts://{broker.host}:{broker.port}")
    return RuntimeConfig(train=train, run_dir=Path(doc["run_dir"]), run_id=run_id,
                         clients=clients, broker=broker, credentials=creds,
                         options=options, me=me, resume=resume,
                         tls=tls if tls is not None or not broker.tls else ClientTLS())


def is_split(cfg: TrainConfig) -> bool:
    return registry.traits(cfg).split


def setup_logging(name: str) -> None:
    """One line per record on stderr, prefixed with the process role (logs of a local run are
    collected per process by the launcher)."""
    logging.basicConfig(level=os.environ.get("TESTBED_LOG_LEVEL", "INFO"), stream=sys.stderr,
                        format=f"%(asctime)s {name} %(levelname)s %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)



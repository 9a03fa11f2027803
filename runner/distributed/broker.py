"""MQTT broker management: a per-run broker with per-identity credentials and topic ACLs.

Why a broker per run, with passwords and ACLs even on loopback: the testbed injects faults
(crashed, slow, malicious clients), and the isolation between clients must come from the
broker, not from everyone behaving. Each run gets its own broker process on a free port with
one random password per identity (the server, each client, a read-only monitor) and an ACL
derived from the topic scheme in :mod:`runner.distributed.protocol`: a client may publish only its
own uplink topics and read only its own downlink topics plus the server's broadcasts, so it can
neither read another client's gradients nor impersonate the server.

Backends:

* **Mosquitto** (preferred): the ``mosquitto`` binary on PATH or in /usr/sbin. Config,
  password file (PBKDF2-SHA512, the ``$7$`` format ``mosquitto_passwd`` 2.0 writes) and ACL file
  are generated in the broker's work directory. MQTT 5 and 3.1.1.
* **amqtt** (fallback when no Mosquitto is installed): the pure-Python broker in a child
  process, MQTT 3.1.1 only, with its file-auth plugin (argon2 hashes) and topic ACL plugin
  (subscribe and publish lists). Slower, and its ACL differs in detail (see docs/protocol.md).

``parse_broker_url`` names an existing broker (credentials then come from its operator).

This module imports nothing heavy at import time (no torch), because ``python -m
runner.distributed.broker`` is how the amqtt child process starts.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from runner.distributed.tls import TLS_PORT, BrokerTLS
from runner.errors import UserError

SERVER_USER = "server"
MONITOR_USER = "monitor"
RESERVED = frozenset({SERVER_USER, MONITOR_USER})
# Largest max_packet_size clients accept: Mosquitto advertises it in CONNACK and paho 2.x
# rejects the whole CONNACK (as malformed) above 268435455, though MQTT's largest packet is 5
# bytes more. Our chunks stay far below (runner.distributed.protocol.MAX_CHUNK = 254 MiB).
MAX_PACKET = 268_435_455
PBKDF2_ITERATIONS = 101  # what mosquitto_passwd 2.0 uses
Backend = Literal["auto", "mosquitto", "amqtt"]
Auth = Literal["auto", "dynsec", "aclfile"]



# Mosquitto allocates a few buffers per forwarded message; by default glibc hands freed
# buffers of a few MiB back to the kernel, so every MiB-sized chunk is page-faulted in again
# (perf: ~40 % of the broker's CPU at 1 MiB chunks). Keeping them mapped removes that
# (bench/transport.py "mqtt+env"), at the cost of the broker holding freed memory up to about
# its largest message. The broker container gets the same environment (compose.yaml).
BROKER_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "268435456",
                     "MALLOC_TRIM_THRESHOLD_": "1073741824"}

class BrokerError(UserError):
    """The broker cannot be found, configured or started (says what to install or check)."""


@dataclass(frozen=True)
class Credentials:
    """One identity's MQTT username and password."""

    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class BrokerAddress:
    """Where a broker listens, which MQTT version to speak to it (5 or 4 = 3.1.1), and
    whether it speaks TLS (``mqtts://``; runner/distributed/tls.py)."""

    host: str
    port: int
    mqtt_version: int = 5
    tls: bool = False

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_broker_url(url: str, mqtt_version: int = 5) -> BrokerAddress:
    """``mqtt://host[:port]`` (or ``tcp://``; default port 1883) or ``mqtts://host[:port]``
    (TLS, default port 8883) -> address.

    Credentials in the URL are refused: they would end up in logs and run snapshots; they are
    passed to the transport separately.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "tcp", "mqtts") or not parts.hostname:
        raise BrokerError(f"broker URL {url!r} must look like mqtt://host:port (or "
                          "mqtts://host:port with TLS)")
    if parts.username or parts.password:
        raise BrokerError(f"broker URL {url!r} holds credentials; pass them separately")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise BrokerError(f"broker URL {url!r} must have no path or query")
    tls = parts.scheme == "mqtts"
    try:
        port = parts.port or (TLS_PORT if tls else 1883)
    except ValueError:
        raise BrokerError(f"broker URL {url!r} has an invalid port") from None
    if mqtt_version not in (4, 5):
        raise ValueError("mqtt_version must be 5 or 4 (3.1.1)")
    return BrokerAddress(parts.hostname, port, mqtt_version, tls)


# ------------------------------------------------------------------------ files we write
def mosquitto_password_line(username: str, password: str, salt: bytes | None = None) -> str:
    """One password-file line in Mosquitto 2.0's ``$7$`` (PBKDF2-SHA512) format.

    Written here instead of calling ``mosquitto_passwd -b`` once per user: same bytes (a test
    recomputes a ``mosquitto_passwd`` line from its salt), no subprocess per identity, and no
    dependence on the tool being installed next to the broker.
    """
    salt = secrets.token_bytes(12) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PBKDF2_ITERATIONS)
    return (f"{username}:$7${PBKDF2_ITERATIONS}${base64.b64encode(salt).decode()}$"
            f"{base64.b64encode(digest).decode()}")


def acl_rules(run: str, clients: Iterable[str]) -> dict[str, dict[str, list[str]]]:
    """username -> {"read": [...], "write": [...]} topic filters, from the protocol's topics.

    The server reads every client's uplink and writes every client's downlink and its own
    broadcasts; a client writes its uplink and reads its downlink and the broadcasts; the
    monitor (control plane, dashboards) reads the run's topics and writes nothing.
    """
    # lazy: protocol imports torch, the amqtt child must not
    from runner.distributed import protocol

    rules = {SERVER_USER: {"read": protocol.subscriptions(run, protocol.SERVER),
                           "write": protocol.publications(run, protocol.SERVER)},
             MONITOR_USER: {"read": [f"{protocol.TOPIC_ROOT}/{run}/#"], "write": []}}
    for cid in clients:
        rules[cid] = {"read": protocol.subscriptions(run, cid),
                      "write": protocol.publications(run, cid)}
    return rules


def mosquitto_acl(rules: dict[str, dict[str, list[str]]]) -> str:
    """Mosquitto ``acl_file`` text for :func:`acl_rules` (no anonymous access at all)."""
    lines = ["# generated by runner.distributed.broker; one block per identity"]
    for user, rw in rules.items():
        lines.append(f"\nuser {user}")
        lines += [f"topic read {t}" for t in rw["read"]]
        lines += [f"topic write {t}" for t in rw["write"]]
    return "\n".join(lines) + "\n"


def mosquitto_dynsec(rules: dict[str, dict[str, list[str]]],
                     creds: dict[str, Credentials]) -> dict[str, object]:
    """Dynamic-security plugin state: one client and one role per identity, deny by default.

    Unlike ``acl_file`` (which never refuses a SUBSCRIBE and only filters delivery), the
    plugin checks subscriptions too, so a client that asks for another client's gradients
    gets SUBACK "not authorized" (135 in MQTT 5, 0x80 in 3.1.1) and learns it at once.
    Passwords are PBKDF2-SHA512 like the password file (what ``mosquitto_ctrl`` writes).
    """
    clients, roles = [], []
    for user, rw in rules.items():
        salt = secrets.token_bytes(12)
        digest = hashlib.pbkdf2_hmac("sha512", creds[user].password.encode(), salt,
                                     PBKDF2_ITERATIONS)
        clients.append({"username": user, "password": base64.b64encode(digest).decode(),
                        "salt": base64.b64encode(salt).decode(),
                        "iterations": PBKDF2_ITERATIONS, "roles": [{"rolename": user}]})
        acls = []
        for t in rw["read"]:
            acls.append({"acltype": "subscribePattern", "topic": t, "allow": True})
            acls.append({"acltype": "publishClientReceive", "topic": t, "allow": True})
        for t in rw["write"]:
            acls.append({"acltype": "publishClientSend", "topic": t, "allow": True})
        roles.append({"rolename": user, "acls": acls})
    return {"clients": clients, "groups": [], "roles": roles,
            "defaultACLAccess": {"publishClientSend": False, "publishClientReceive": False,
                                 "subscribe": False, "unsubscribe": True}}


def find_dynsec_plugin() -> str | None:
    """Path of Mosquitto's dynamic-security plugin (shipped with Mosquitto >= 2.0), or None."""
    import glob

    for pattern in ("/usr/lib/*/mosquitto_dynamic_security.so",
                    "/usr/lib/mosquitto_dynamic_security.so",
                    "/usr/local/lib/mosquitto_dynamic_security.so",
                    "/usr/local/lib/*/mosquitto_dynamic_security.so"):
        for path in sorted(glob.glob(pattern)):
            if os.path.isfile(path):
                return path
    return None


def mosquitto_config(host: str, port: int, workdir: Path, dynsec: str | None = None,
                     user: str | None = None, tls: BrokerTLS | None = None) -> str:
    """mosquitto.conf: one listener, auth required, ACL, full-size packets.

    ``dynsec``: path of the dynamic-security plugin (credentials and ACL in dynsec.json);
    None: ``password_file`` + ``acl_file``. ``user`` is the current user: run as root,
    Mosquitto otherwise drops to the ``mosquitto`` user, which cannot read a root-owned temp
    directory. ``persistence false``: the broker is per run and its restart is a fault we
    inject, not something to recover from disk. ``tls``: the listener speaks TLS only (no
    plain port beside it), optionally requiring client certificates (runner/distributed/tls.py).
    """
    user = user or pwd.getpwuid(os.getuid()).pw_name
    if dynsec:
        auth = [f"plugin {dynsec}", f"plugin_opt_config_file {workdir / 'dynsec.json'}"]
    else:
        auth = [f"password_file {workdir / 'passwd'}", f"acl_file {workdir / 'acl'}"]
    return "\n".join([
        "# generated by runner.distributed.broker",
        "per_listener_settings false",
        f"listener {port} {host}",
        *(tls.mosquitto_lines() if tls else []),
        "allow_anonymous false",
        *auth,
        f"max_packet_size {MAX_PACKET}",
        "persistence false",
        f"user {user}",
        "set_tcp_nodelay true",
        # QoS 1 messages beyond this queue are dropped for a slow subscriber; a large message
        # is many chunks, so leave room (the per-run broker serves one experiment).
        "max_queued_messages 10000",
        f"log_dest file {workdir / 'broker.log'}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        "",
    ])


def find_mosquitto() -> str | None:
    """Path of the mosquitto binary (PATH, then /usr/sbin where Debian puts it), or None."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for cand in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if os.access(cand, os.X_OK):
            return cand
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on ``host`` (the broker binds it moments later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


# ------------------------------------------------------------------------------ handle
class Broker:
    """A running broker for one run: address, credentials, and its lifecycle.

    ``stop()`` ends the process but keeps its files, so ``restart()`` brings the same broker
    back on the same port (a fault the tests inject); ``close()`` (or leaving the ``with``
    block) stops it and removes a work directory it created.
    """

    def __init__(self, *, run: str, clients: list[str], host: str, port: int, backend: str,
                 auth: str, workdir: Path, own_workdir: bool, command: list[str],
                 credentials: dict[str, Credentials], mqtt_version: int,
                 ready_timeout: float, tls: BrokerTLS | None = None):
        self.run = run
        self.clients = clients
        self.host = host
        self.port = port
        self.backend = backend
        self.auth = auth
        self.workdir = workdir
        self.own_workdir = own_workdir
        self.command = command
        self.credentials = credentials
        self.mqtt_version = mqtt_version
        self.ready_timeout = ready_timeout
        self.tls = tls
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> BrokerAddress:
        """Where a process on this host connects: the listen address, or loopback when the
        broker listens on every interface (0.0.0.0 is no address to dial, and the
        broker's TLS certificate names the loopback addresses, not the wildcard)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else "::1" if self.host == "::" \
            else self.host
        return BrokerAddress(host, self.port, self.mqtt_version, self.tls is not None)

    @property
    def url(self) -> str:
        return self.address.url

    def creds(self, who: str) -> Credentials:
        """Credentials of ``who``: a client id, "server" or "monitor"."""
        try:
            return self.credentials[who]
        except KeyError:
            raise KeyError(f"no credentials for {who!r}; known: {sorted(self.credentials)}") \
                from None

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 20) -> str:
        """Last lines of the broker's log and console output (for error messages)."""
        out = []
        for name in ("broker.out", "broker.log"):
            p = self.workdir / name
            if p.exists():
                out += p.read_text(errors="replace").splitlines()[-n:]
        return "\n".join(out[-n:])

    def start(self) -> None:
        """Start the process and wait until the port accepts connections."""
        if self.is_running():
            return
        out = open(self.workdir / "broker.out", "ab")  # noqa: SIM115 - lives with the process
        try:
            # The amqtt child runs ``-m runner.distributed.broker``: make this package importable
            # there even when it was imported from a source tree rather than installed.
            env = {**os.environ, **BROKER_MALLOC_ENV}
            root = str(Path(__file__).resolve().parents[2])
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
            self.proc = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=self.workdir, env=env,
                                         start_new_session=True)
        finally:
            out.close()
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrokerError(f"{self.backend} exited with code {self.proc.returncode} "
                                  f"on port {self.port}:\n{self.log_tail()}")
            if _port_open(self.address.host, self.port):
                return
            time.sleep(0.02)
        self.stop()
        raise BrokerError(f"{self.backend} did not listen on {self.address.host}:{self.port} "
                          f"within {self.ready_timeout} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the broker process (SIGTERM, then SIGKILL); files stay for restart()."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL the broker (a crash, not a shutdown: no clean disconnects, no wills)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        """Stop and start again on the same port with the same credentials."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop, and remove the work directory if this handle created it."""
        self.stop()
        if self.own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Broker({self.backend}/{self.auth} {self.url} run={self.run!r} "
                f"clients={self.clients} running={self.is_running()})")


def check_identities(run: str, clients: Iterable[str]) -> list[str]:
    """The run id and client ids as topic-safe, unreserved and distinct (ValueError)."""
    from runner.distributed.protocol import SERVER, check_id  # lazy, see acl_rules

    check_id(run, "run id")
    clients = list(clients)
    for cid in clients:
        check_id(cid, "client id")
        if cid in RESERVED or cid == SERVER:
            raise ValueError(f"client id {cid!r} is reserved")
    if len(set(clients)) != len(clients):
        raise ValueError(f"duplicate client ids in {clients}")
    return clients


def start_broker(run: str, clients: Iterable[str], *, host: str = "127.0.0.1",
                 port: int | None = None, workdir: str | Path | None = None,
                 backend: Backend = "auto", auth: Auth = "auto", ready_timeout: float = 15.0,
                 passwords: dict[str, str] | None = None,
                 tls: BrokerTLS | None = None) -> Broker:
    """Start a broker for ``run`` with credentials for the server, ``clients`` and a monitor.

    ``port`` None picks a free one (retried if another process takes it first). ``backend``
    "auto" uses Mosquitto when installed, else amqtt. ``auth`` (Mosquitto only): "dynsec"
    (the dynamic-security plugin: refuses forbidden subscriptions), "aclfile" (password +
    ACL files: forbidden subscriptions are granted but receive nothing), "auto" (dynsec when
    the plugin is installed). ``passwords`` fixes some identities' passwords (default: random,
    24 url-safe characters). ``tls``: the listener speaks TLS with these files (Mosquitto
    only; runner/distributed/tls.py makes them). Returns a started :class:`Broker`.
    """
    clients = check_identities(run, clients)
    exe = find_mosquitto()
    if backend == "auto":
        backend = "mosquitto" if exe else "amqtt"
    if tls is not None and backend != "mosquitto":
        raise BrokerError("TLS needs Mosquitto (the amqtt fallback has no TLS listener here); "
                          "install it (apt-get install -y mosquitto) or run with --tls off")
    if backend == "mosquitto" and exe is None:
        raise BrokerError("mosquitto not found; install it (apt-get install -y mosquitto) or "
                          "use the amqtt backend")
    if backend not in ("mosquitto", "amqtt"):
        raise ValueError(f"unknown broker backend {backend!r}")
    plugin = find_dynsec_plugin() if backend == "mosquitto" and auth != "aclfile" else None
    if auth == "dynsec" and plugin is None:
        raise BrokerError("Mosquitto's dynamic-security plugin (mosquitto_dynamic_security.so)"
                          " not found; use auth='aclfile'")
    if auth not in ("auto", "dynsec", "aclfile"):
        raise ValueError(f"unknown auth mode {auth!r}")
    own = workdir is None
    wd = Path(tempfile.mkdtemp(prefix=f"hsl-broker-{run}-")) if own else Path(str(workdir))
    wd.mkdir(parents=True, exist_ok=True)
    os.chmod(wd, 0o700)
    passwords = dict(passwords or {})
    creds = {u: Credentials(u, passwords.get(u) or secrets.token_urlsafe(18))
             for u in [SERVER_USER, MONITOR_USER, *clients]}
    rules = acl_rules(run, clients)
    write_private(wd / "credentials.json",
                   json.dumps({u: c.password for u, c in creds.items()}, indent=1))
    attempts = 1 if port is not None else 5
    last: BrokerError | None = None
    for _ in range(attempts):
        p = port if port is not None else free_port(host)
        if backend == "mosquitto":
            assert exe is not None
            if plugin:
                write_private(wd / "dynsec.json",
                               json.dumps(mosquitto_dynsec(rules, creds), indent=1))
            else:
                write_private(wd / "passwd", "".join(
                    mosquitto_password_line(c.username, c.password) + "\n"
                    for c in creds.values()))
                write_private(wd / "acl", mosquitto_acl(rules))
            write_private(wd / "mosquitto.conf", mosquitto_config(host, p, wd, plugin,
                                                                  tls=tls))
            command = [exe, "-c", str(wd / "mosquitto.conf")]
            version = 5
        else:
            write_private(wd / "amqtt.json", json.dumps(_amqtt_config(host, p, wd, creds, rules),
                                                        indent=1))
            command = [sys.executable, "-m", "runner.distributed.broker", "amqtt",
                       str(wd / "amqtt.json")]
            version = 4
        broker = Broker(run=run, clients=clients, host=host, port=p, backend=backend,
                        auth="dynsec" if plugin else "aclfile" if backend == "mosquitto"
                        else "amqtt",
                        workdir=wd, own_workdir=own, command=command, credentials=creds,
                        mqtt_version=version, ready_timeout=ready_timeout, tls=tls)
        try:
            broker.start()
            return broker
        except BrokerError as e:
            last = e
            if port is not None or "in use" not in str(e).lower():
                break
    if own:
        shutil.rmtree(wd, ignore_errors=True)
    assert last is not None
    raise last


# Where the broker image (images/broker.Dockerfile) links the dynamic-security plugin.
CONTAINER_DYNSEC = "/usr/local/lib/mosquitto_dynamic_security.so"


def write_container_broker(run: str, clients: Iterable[str], workdir: Path, *, port: int,
                           mount: str, host: str = "0.0.0.0",
                           passwords: dict[str, str] | None = None,
                           tls: BrokerTLS | None = None) -> dict[str, Credentials]:
    """Write a Mosquitto config + dynsec state for the broker *container* into ``workdir``.

    Same identities and ACL as :func:`start_broker`, but every path in ``mosquitto.conf`` is
    the path inside the container (``workdir`` is mounted at ``mount``; ``tls`` holds
    container paths too), the plugin is the image's, and Mosquitto runs as the container's
    root. Nothing is started: Compose does that. Returns the credentials (also in
    ``credentials.json``, mode 0600).
    """
    clients = check_identities(run, clients)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    passwords = dict(passwords or {})
    creds = {u: Credentials(u, passwords.get(u) or secrets.token_urlsafe(18))
             for u in [SERVER_USER, MONITOR_USER, *clients]}
    write_private(workdir / "credentials.json",
                   json.dumps({u: c.password for u, c in creds.items()}, indent=1))
    write_private(workdir / "dynsec.json",
                   json.dumps(mosquitto_dynsec(acl_rules(run, clients), creds), indent=1))
    write_private(workdir / "mosquitto.conf",
                   mosquitto_config(host, port, Path(mount), CONTAINER_DYNSEC, user="root",
                                    tls=tls))
    return creds


def write_private(path: Path, text: str) -> None:
    """Secrets and broker config readable by this user only (Mosquitto 2.0.16+ warns else)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


# ----------------------------------------------------------------------------- amqtt
def _amqtt_config(host: str, port: int, workdir: Path, creds: dict[str, Credentials],
                  rules: dict[str, dict[str, list[str]]]) -> dict[str, object]:
    """amqtt broker config: one listener, file auth (argon2), subscribe + publish ACLs."""
    from pwdlib.hashers.argon2 import Argon2Hasher

    hasher = Argon2Hasher()
    write_private(workdir / "amqtt.passwd", "".join(
        f"{c.username}:{hasher.hash(c.password)}\n" for c in creds.values()))
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {
            "amqtt.plugins.authentication.FileAuthPlugin": {
                "password_file": str(workdir / "amqtt.passwd")},
            "amqtt.plugins.topic_checking.TopicAccessControlListPlugin": {
                "acl": {u: rw["read"] for u, rw in rules.items()},
                "publish_acl": {u: rw["write"] for u, rw in rules.items()}},
        },
    }


def _run_amqtt(config_path: str) -> None:
    """Child-process entry: run amqtt with ``config_path`` until SIGTERM/SIGINT."""
    import asyncio
    import logging
    import warnings

    from amqtt.broker import Broker as AmqttBroker

    warnings.simplefilter("ignore", DeprecationWarning)
    logging.basicConfig(level=logging.WARNING)
    config = json.loads(Path(config_path).read_text())

    async def main() -> None:
        broker = AmqttBroker(config)
        await broker.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await broker.shutdown()

    asyncio.run(main())


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "amqtt":
        _run_amqtt(sys.argv[2])
    else:
        sys.exit("usage: python -m runner.distributed.broker amqtt CONFIG.json")

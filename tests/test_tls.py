"""TLS on the fleet's links (runner/distributed/tls.py, testbed/tlsmode.py; docs/security.md).

What is checked, against a real Mosquitto on 127.0.0.1 (TLS forced on: loopback alone would
stay plain under ``--tls auto``):

* the run's certificate authority: files, modes, names, identities;
* when TLS is on: per backend and address (``--tls auto``), and the one line that says so;
* a client without the run's CA, or dialling a name the broker's certificate does not
  list, is refused; a plain-MQTT client gets nothing from a TLS listener;
* with mutual TLS a client without a certificate, or with another run's, is refused even
  with the right password, and a certificate is its identity: the ACL keeps it to that
  identity's topics whatever username it claims;
* a recording TCP proxy between every process and the broker captures a short run twice,
  without and with TLS: the plain capture holds every broker password and the raw bytes of
  the activations, the TLS capture none of them (the same activations: the runs are
  deterministic, checked by their losses).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from runner.config import TrainConfig
from runner.distributed import mqtt_native
from runner.distributed import protocol as P
from runner.distributed.broker import (
    BrokerAddress,
    find_mosquitto,
    mosquitto_config,
    parse_broker_url,
    start_broker,
)
from runner.distributed.runtime import RuntimeOptions
from runner.distributed.tls import (
    ENV_CA,
    ENV_CERT,
    ENV_KEY,
    ClientTLS,
    RunPKI,
    TLSError,
    broker_hosts,
    make_pki,
)
from runner.distributed.transport import Transport, TransportError
from runner.errors import UserError
from runner.rundir import read_jsonl
from testbed.backends.local import LocalRun
from testbed.tlsmode import TLSRequest

RUN = "tlsrun"
CLIENTS = ["c0", "c1"]
IDENTITIES = ["server", "monitor", *CLIENTS]
needs_mosquitto = pytest.mark.skipif(find_mosquitto() is None,
                                     reason="mosquitto not installed (apt-get install -y "
                                            "mosquitto)")
pytestmark = pytest.mark.timeout(180)
BACKENDS = [pytest.param("paho"),
            pytest.param("native", marks=pytest.mark.skipif(
                mqtt_native.unavailable() is not None,
                reason=f"native MQTT client unavailable: {mqtt_native.unavailable()}"))]


# ------------------------------------------------------------------------ certificates
def _cert(path: Path) -> Any:
    from cryptography import x509

    return x509.load_pem_x509_certificate(path.read_bytes())


def test_run_pki_files_modes_names_and_identities(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    pki = make_pki(tmp_path / "tls", run=RUN, hosts=["127.0.0.1", "broker", "10.1.2.3"],
                   identities=IDENTITIES, mutual=True)
    assert stat.S_IMODE((tmp_path / "tls").stat().st_mode) == 0o700
    keys = sorted(p.name for p in (tmp_path / "tls").glob("*.key"))
    assert keys == sorted(f"{w}.key" for w in ["broker", *IDENTITIES])
    for p in (tmp_path / "tls").iterdir():
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o600 if p.suffix == ".key" else 0o644), p.name
    assert "ca.key" not in keys  # the CA's key is never written: nothing is issued later
    ca = _cert(pki.ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    broker = _cert(pki.cert("broker"))
    alt = broker.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert alt.get_values_for_type(x509.DNSName) == ["broker"]
    assert [str(a) for a in alt.get_values_for_type(x509.IPAddress)] == ["127.0.0.1",
                                                                          "10.1.2.3"]
    for who in IDENTITIES:  # the Common Name is the identity the broker takes as username
        cert = _cert(pki.cert(who))
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == who
        assert cert.issuer == ca.subject
    again = RunPKI.load(tmp_path / "tls")
    assert again == pki
    assert again.client("c0") == ClientTLS(str(pki.ca), str(pki.cert("c0")),
                                           str(pki.key("c0")))
    with pytest.raises(TLSError, match="no certificate for 'c9'"):
        pki.client("c9")
    # without mutual TLS: no client keys at all, and every identity gets the CA only
    plain = make_pki(tmp_path / "tls1", run=RUN, hosts=["127.0.0.1"], identities=IDENTITIES)
    assert [p.name for p in (tmp_path / "tls1").glob("*.key")] == ["broker.key"]
    assert plain.client("c0") == ClientTLS(str(plain.ca))


def test_client_tls_environment_and_files(tmp_path: Path) -> None:
    t = ClientTLS("/x/ca.crt", "/x/c0.crt", "/x/c0.key")
    assert t.env() == {ENV_CA: "/x/ca.crt", ENV_CERT: "/x/c0.crt", ENV_KEY: "/x/c0.key"}
    assert ClientTLS.from_env(t.env()) == t
    assert ClientTLS.from_env({}) is None
    with pytest.raises(TLSError, match="needs its key"):
        ClientTLS("/x/ca.crt", "/x/c0.crt")
    with pytest.raises(TLSError, match="cannot be read"):
        ClientTLS(str(tmp_path / "missing.crt")).context()


def test_broker_names_cover_what_devices_dial() -> None:
    loop = broker_hosts("127.0.0.1")
    assert loop == ["127.0.0.1", "::1", "localhost"]
    anywhere = broker_hosts("0.0.0.0", ["example.org"])
    assert socket.gethostname() in anywhere and "example.org" in anywhere
    assert "0.0.0.0" not in anywhere  # not an address anyone dials
    assert "10.0.0.7" in broker_hosts("10.0.0.7")


def test_urls_and_mosquitto_listener(tmp_path: Path) -> None:
    a = parse_broker_url("mqtts://h")
    assert (a.tls, a.port, a.url) == (True, 8883, "mqtts://h:8883")
    assert not parse_broker_url("mqtt://h").tls
    pki = make_pki(tmp_path / "tls", run=RUN, hosts=["127.0.0.1"], identities=IDENTITIES,
                   mutual=True)
    conf = mosquitto_config("0.0.0.0", 8883, tmp_path, tls=pki.broker(inside="/t"))
    lines = conf.splitlines()
    at = lines.index("listener 8883 0.0.0.0")
    assert lines[at + 1:at + 7] == ["cafile /t/ca.crt", "certfile /t/broker.crt",
                                    "keyfile /t/broker.key", "tls_version tlsv1.2",
                                    "require_certificate true",
                                    "use_identity_as_username true"]
    assert "cafile" not in mosquitto_config("127.0.0.1", 1883, tmp_path)
    with pytest.raises(ValueError, match="mqtts://"):  # TLS files for a plain broker
        Transport(BrokerAddress("127.0.0.1", 1883), _creds("c0"), run=RUN, me="c0",
                  tls=ClientTLS(str(pki.ca)))


def _creds(who: str) -> Any:
    from runner.distributed.broker import Credentials

    return Credentials(who, "x" * 20)


# ------------------------------------------------------------------------- the decision
@pytest.mark.parametrize(("request_", "backend", "kw", "on", "phrase"), [
    (TLSRequest(), "local", {}, False, "loopback only; --tls on encrypts anyway"),
    (TLSRequest(), "local", {"listen": "0.0.0.0"}, True, "beyond loopback"),
    (TLSRequest(), "local", {"listen": "::1"}, False, "loopback only"),
    (TLSRequest(), "compose", {}, False, "private container network"),
    (TLSRequest(), "compose", {"host_network": True}, False, "broker on loopback"),
    (TLSRequest(), "swarm", {"nodes": 1}, False, "one-node swarm"),
    (TLSRequest(), "swarm", {"nodes": 3}, True, "a swarm of 3 nodes"),
    (TLSRequest(), "k8s", {}, True, "pod network"),
    (TLSRequest("on"), "compose", {}, True, "--tls on"),
    (TLSRequest(mutual=True), "local", {}, True, "on, mutual (--mtls)"),
    (TLSRequest("off"), "local", {"listen": "0.0.0.0"}, False, "in the clear"),
    (TLSRequest(), "local", {"external": "mqtts://b:8883"}, True, "mqtts://"),
    (TLSRequest(), "local", {"external": "mqtt://b:1883"}, False, "mqtt://"),
])
def test_tls_auto_is_on_exactly_beyond_this_host(request_: TLSRequest, backend: str,
                                                 kw: dict[str, Any], on: bool,
                                                 phrase: str) -> None:
    choice = request_.decide(backend, **kw)
    assert choice.on is on
    line = choice.line("RUN/tls/ca.crt")
    assert line.startswith(f"tls: {'on' if on else 'off'}") and "\n" not in line
    assert phrase in line, line
    if on and not choice.external:
        assert "RUN/tls/ca.crt" in line


@pytest.mark.parametrize(("request_", "kw", "phrase"), [
    (TLSRequest("maybe"), {}, "must be auto, on or off"),
    (TLSRequest("off", mutual=True), {}, "drop --tls off"),
    (TLSRequest("on"), {"external": "mqtt://b:1883"}, "give its TLS address"),
    (TLSRequest("off"), {"external": "mqtts://b:8883"}, "speaks TLS"),
    (TLSRequest(mutual=True), {"external": "mqtts://b:8883"}, "drop --mtls"),
])
def test_contradictions_are_user_errors(request_: TLSRequest, kw: dict[str, Any],
                                        phrase: str) -> None:
    with pytest.raises(UserError, match=phrase):
        request_.decide("local", **kw)


def test_cli_bad_tls_is_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "testbed.cli", "up", "--backend", "local",
                           "--model", "tiny-llama", "--data", "synthetic", "--tls", "off",
                           "--mtls", "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--mtls is mutual TLS and needs TLS" in lines[0], proc.stderr
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------- refusals, on Mosquitto
@pytest.fixture(scope="module")
def pkis(tmp_path_factory: pytest.TempPathFactory) -> dict[str, RunPKI]:
    root = tmp_path_factory.mktemp("pki")
    return {name: make_pki(root / name, run=RUN, hosts=["127.0.0.1"], identities=IDENTITIES,
                           mutual=True) for name in ("ours", "theirs")}


@pytest.fixture(scope="module")
def tls_broker(pkis: dict[str, RunPKI]) -> Iterator[Any]:
    if find_mosquitto() is None:
        pytest.skip("mosquitto not installed (apt-get install -y mosquitto)")
    with start_broker(RUN, CLIENTS, tls=_server_only(pkis["ours"])) as b:
        yield b


def _server_only(pki: RunPKI) -> Any:
    """The broker's TLS without client certificates (server authentication only)."""
    from dataclasses import replace

    return replace(pki.broker(), require_certificate=False)


@pytest.fixture(scope="module")
def mtls_broker(pkis: dict[str, RunPKI]) -> Iterator[Any]:
    if find_mosquitto() is None:
        pytest.skip("mosquitto not installed (apt-get install -y mosquitto)")
    with start_broker(RUN, CLIENTS, tls=pkis["ours"].broker()) as b:
        yield b


def _connect(broker: Any, who: str, tls: ClientTLS | None, backend: str,
             host: str = "127.0.0.1", creds: Any = None, me: str | None = None,
             tls_url: bool = True, timeout: float = 5.0) -> Transport:
    address = BrokerAddress(host, broker.port, 5, tls_url)
    me = me or who
    return Transport(address, creds or broker.creds(who), run=RUN,
                     me=P.SERVER if me == "server" else me, reconnect=(0.05, 0.5),
                     backend=backend, tls=tls).connect(timeout)


@needs_mosquitto
@pytest.mark.parametrize("backend", BACKENDS)
def test_tls_refuses_a_client_without_the_runs_ca(tls_broker: Any, pkis: dict[str, RunPKI],
                                                  backend: str) -> None:
    ours, theirs = pkis["ours"], pkis["theirs"]
    ok = _connect(tls_broker, "c0", ClientTLS(str(ours.ca)), backend)
    assert ok.connected and ok.tls is not None
    ok.close()
    for tls in (ClientTLS(str(theirs.ca)),  # another run's CA
                ClientTLS(None)):  # the system's trust store: our CA is in no store
        with pytest.raises(TransportError, match="refused 'c0'.*TLS handshake failed"):
            _connect(tls_broker, "c0", tls, backend)
    # the right CA, but a name the broker's certificate does not list
    with pytest.raises(TransportError, match="refused 'c0'.*TLS handshake failed"):
        _connect(tls_broker, "c0", ClientTLS(str(ours.ca)), backend, host="localhost")
    # plain MQTT to the TLS listener: the broker never answers its CONNECT
    with pytest.raises(TransportError, match="no answer|cannot reach"):
        _connect(tls_broker, "c0", None, backend, tls_url=False, timeout=1.5)


@needs_mosquitto
@pytest.mark.parametrize("backend", BACKENDS)
def test_mtls_the_certificate_is_the_identity(mtls_broker: Any, pkis: dict[str, RunPKI],
                                              backend: str) -> None:
    ours, theirs = pkis["ours"], pkis["theirs"]
    # the right password alone (a stolen one): no certificate, no connection
    with pytest.raises(TransportError, match="refused 'c0'"):
        _connect(mtls_broker, "c0", ClientTLS(str(ours.ca)), backend)
    # another run's certificate for the same identity: refused
    stranger = ClientTLS(str(ours.ca), str(theirs.cert("c0")), str(theirs.key("c0")))
    with pytest.raises(TransportError, match="refused 'c0'"):
        _connect(mtls_broker, "c0", stranger, backend)
    c0 = _connect(mtls_broker, "c0", ours.client("c0"), backend)
    try:
        assert c0.subscribe(P.topic(RUN, P.Kind.GRAD, "c1")) == [135]  # not c1's gradients
    finally:
        c0.close()
    # c0's certificate with c1's name and password is still c0: c1's topics stay closed
    posing = _connect(mtls_broker, "c0", ours.client("c0"), backend,
                      creds=mtls_broker.creds("c1"))
    try:
        assert posing.subscribe(P.topic(RUN, P.Kind.GRAD, "c1")) == [135]
        assert posing.subscribe(P.topic(RUN, P.Kind.GRAD, "c0"))[0] < 0x80
    finally:
        posing.close()
    # and the server's identity reads every client's uplink, as without TLS
    srv = _connect(mtls_broker, "server", ours.client("server"), backend)
    cli = _connect(mtls_broker, "c1", ours.client("c1"), backend)
    try:
        acts = {P.ACTS: torch.ones(1, 2, 8), P.MASK: torch.ones(1, 2, dtype=torch.int64),
                P.LABELS: torch.zeros(1, 2, dtype=torch.int64)}
        cli.send(P.Kind.ACT, 0, acts)
        for _ in range(20):
            msg = srv.recv(5)
            if msg is not None and msg.kind is P.Kind.ACT:
                break
        assert msg is not None and msg.kind is P.Kind.ACT and msg.client == "c1"
        assert torch.equal(msg.tensors[P.ACTS], acts[P.ACTS])
    finally:
        cli.close()
        srv.close()


# ----------------------------------------------------------------------- wire capture
class RecordingProxy:
    """A TCP proxy on 127.0.0.1 that forwards every connection to ``upstream`` and keeps
    each direction of each connection as one byte string (what tcpdump would see)."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = self.srv.getsockname()[1]
        self.streams: list[bytearray] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.srv.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.upstream))
            for src, dst in ((down, up), (up, down)):
                buf = bytearray()
                with self.lock:
                    self.streams.append(buf)
                threading.Thread(target=self._pump, args=(src, dst, buf), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, buf: bytearray) -> None:
        try:
            while data := src.recv(1 << 16):
                with self.lock:
                    buf += data
                dst.sendall(data)
        except OSError:
            return
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.srv.close()

    def capture(self) -> list[bytes]:
        with self.lock:
            return [bytes(b) for b in self.streams]


def _acts_in(streams: list[bytes], run: str) -> list[bytes]:
    """The raw float32 bytes of every activation tensor in a plain capture, found by the
    envelope magic and decoded by the protocol's own receiver."""
    found = []
    for data in streams:
        at = data.find(P.MAGIC)
        while at >= 0:
            try:
                hlen = int.from_bytes(data[at + 5:at + 9], "big")
                header = json.loads(data[at + 9:at + 9 + hlen])
                if header.get("kind") == "act" and header.get("chunk") == [0, 1]:
                    env = data[at:at + 9 + hlen + header["size"]]
                    rx = P.Receiver(P.Expect(run=run))
                    msg = rx.feed(env, P.topic(run, P.Kind.ACT, header["client"]))
                    assert msg is not None
                    found.append(msg.tensors[P.ACTS].numpy().tobytes())
            except (ValueError, KeyError, P.ProtocolError):
                pass
            at = data.find(P.MAGIC, at + 1)
    return found


def _captured_run(tmp_path: Path, name: str, tls: bool) -> tuple[list[bytes], dict[str, str],
                                                                 Path]:
    """A short 2-client splitlora run with every connection through a recording proxy;
    (the capture, every identity's broker password, the run directory)."""
    cfg = TrainConfig(model="tiny-llama", data="synthetic", clients=2, split=1, steps=2,
                      agg_interval=2, eval_every=2, eval_max_examples=4, max_len=32,
                      batch_size=2, lora_dropout=0.0, seed=5)
    opts = RuntimeOptions(step_timeout=30.0, heartbeat=0.25, offline_after=5.0,
                          join_timeout=60.0, repair_interval=0.5, server_timeout=60.0)
    run_dir = tmp_path / name
    pki = (make_pki(run_dir / "tls", run=name, hosts=["127.0.0.1"],
                    identities=["server", "client0", "client1"]) if tls else None)
    broker = start_broker(name, ["client0", "client1"], workdir=run_dir / "broker",
                          tls=pki.broker() if pki else None)
    proxy = RecordingProxy(broker.port)
    passwords = {w: c.password for w, c in broker.credentials.items()}
    try:
        run = LocalRun(cfg, run_dir, opts, run_id=name,
                       broker_url=f"{'mqtts' if tls else 'mqtt'}://127.0.0.1:{proxy.port}",
                       passwords=passwords, pki=pki)
        with run:
            run.start()
            assert run.wait(150) == 0, run.log_tail("server")
    finally:
        proxy.close()
        broker.close()
    return proxy.capture(), passwords, run_dir


@needs_mosquitto
def test_a_capture_of_a_tls_run_holds_no_password_and_no_activation(tmp_path: Path) -> None:
    plain, plain_pw, plain_dir = _captured_run(tmp_path, "wire", tls=False)
    secure, secure_pw, secure_dir = _captured_run(tmp_path / "t", "wire", tls=True)

    def loss0(run_dir: Path) -> dict[str, float]:
        return {r["client"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl")
                if r["kind"] == "train" and r["step"] == 0}

    # the same computation both times, so the same activations crossed the wire
    assert loss0(plain_dir) == loss0(secure_dir) and len(loss0(plain_dir)) == 2
    assert "mqtts://127.0.0.1" in (secure_dir / "logs" / "client0.log").read_text()
    # without TLS the capture gives everything away (so this test can fail)
    acts = _acts_in(plain, "wire")
    assert len(acts) >= 4 and all(len(a) >= 1024 for a in acts)  # 2 clients x 2 steps
    blob = b"".join(plain)
    for who in ("server", "client0", "client1"):
        assert plain_pw[who].encode() in blob, who
    assert all(a[:512] in blob for a in acts)
    # with TLS: no password, no envelope, no activation bytes
    sealed = b"".join(secure)
    assert len(sealed) > sum(len(a) for a in acts)  # the traffic was captured
    for who in ("server", "client0", "client1"):
        assert secure_pw[who].encode() not in sealed, who
    assert P.MAGIC not in sealed and b'"kind":"act"' not in sealed
    for a in acts:
        for off in range(0, len(a) - 64, 256):
            assert a[off:off + 64] not in sealed


def test_local_run_gives_each_process_only_its_own_key(tmp_path: Path) -> None:
    cfg = TrainConfig(model="tiny-llama", data="synthetic", clients=2, steps=1)
    run = LocalRun(cfg, tmp_path / "r", run_id="r", tls=True, mtls=True)
    run.pki = make_pki(tmp_path / "r" / "tls", run="r", hosts=["127.0.0.1"],
                       identities=["server", "monitor", *run.clients], mutual=True)
    run.broker_url, run.passwords = "mqtts://127.0.0.1:1", {}
    os.environ[ENV_KEY] = "/stale/key"  # a stray variable of the shell never leaks through
    try:
        for who in ("server", "client1"):
            env = run.env(who)
            assert env[ENV_CERT].endswith(f"/{who}.crt")
            assert env[ENV_KEY].endswith(f"/{who}.key")
            assert env[ENV_CA].endswith("/ca.crt")
    finally:
        del os.environ[ENV_KEY]

"""Broker management and the MQTT transport against a real Mosquitto (runner/distributed/broker.py,
runner/distributed/transport.py). All traffic stays on 127.0.0.1.

Mosquitto must be installed (``apt-get install -y mosquitto``; the Makefile does it for CI);
without it these tests are skipped with that message, except the amqtt fallback test.

What Mosquitto 2.0 does with a forbidden action, which the security tests assert:

* with the dynamic-security plugin (our default when installed): SUBSCRIBE -> SUBACK reason
  135 "Not authorized" (MQTT 5); PUBLISH -> PUBACK 135 and the message is dropped;
* with ``acl_file``: SUBSCRIBE is *granted* (SUBACK 1) but nothing is ever delivered on it
  (Mosquitto checks read access at delivery only); PUBLISH -> PUBACK 135, dropped;
* wrong password: CONNACK 135 "Not authorized" (MQTT 5) / 5 (3.1.1).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
from collections.abc import Iterator

import pytest
import torch

from runner.distributed import mqtt_native
from runner.distributed import protocol as P
from runner.distributed.broker import (
    BrokerError,
    Credentials,
    find_mosquitto,
    mosquitto_password_line,
    parse_broker_url,
    start_broker,
)
from runner.distributed.transport import PublishRefused, Transport, TransportError

RUN = "t1"
CLIENTS = ["c0", "c1"]
NOT_AUTHORIZED = 135
needs_mosquitto = pytest.mark.skipif(find_mosquitto() is None,
                                     reason="mosquitto not installed (apt-get install -y "
                                            "mosquitto)")
pytestmark = pytest.mark.timeout(120)
# Every MQTT client library the transport can run on (runner/distributed/transport.py); traffic,
# security and failure tests run once per library, against the same brokers.
BACKENDS = [pytest.param("paho"),
            pytest.param("native", marks=pytest.mark.skipif(
                mqtt_native.unavailable() is not None,
                reason=f"native MQTT client unavailable: {mqtt_native.unavailable()}"))]


# ------------------------------------------------------------------------------ helpers
def transport(broker, who: str, backend: str, **kw) -> Transport:  # type: ignore[no-untyped-def]
    me = P.SERVER if who == "server" else who
    return Transport(broker.address, broker.creds(who), run=broker.run, me=me,
                     clients=broker.clients if me == P.SERVER else None,
                     reconnect=(0.05, 0.5), backend=backend, **kw).connect(10)


def recv_kind(t: Transport, kind: P.Kind, timeout: float = 10.0) -> P.Message | None:
    """Next message of ``kind`` (states and heartbeats of others are skipped)."""
    import time

    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        msg = t.recv(left)
        if msg is not None and msg.kind is kind:
            return msg
    return None


def drain(t: Transport, seconds: float = 0.5) -> list[P.Message]:
    out = []
    while (m := t.recv(seconds)) is not None:
        out.append(m)
    return out


def act_tensors(b: int, s: int, h: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {P.ACTS: torch.randn(b, s, h, generator=g),
            P.MASK: torch.ones(b, s, dtype=torch.int64),
            P.LABELS: torch.randint(0, 100, (b, s), generator=g)}


@pytest.fixture(scope="module")
def broker() -> Iterator:  # type: ignore[type-arg]
    if find_mosquitto() is None:
        pytest.skip("mosquitto not installed (apt-get install -y mosquitto)")
    with start_broker(RUN, CLIENTS) as b:
        yield b


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def peers(broker, backend) -> Iterator[dict[str, Transport]]:  # type: ignore[no-untyped-def]
    ts = {who: transport(broker, who, backend) for who in ["server", *CLIENTS]}
    assert all(t.backend == backend for t in ts.values())
    yield ts
    for t in ts.values():
        t.close()


# ------------------------------------------------------------------------ no broker needed
def test_parse_broker_url() -> None:
    a = parse_broker_url("mqtt://127.0.0.1:1884")
    assert (a.host, a.port, a.mqtt_version, a.url) == ("127.0.0.1", 1884, 5, "mqtt://127.0.0.1:1884")
    assert parse_broker_url("tcp://broker.local").port == 1883
    assert parse_broker_url("mqtt://h:1", mqtt_version=4).mqtt_version == 4
    for bad in ("http://h:1", "mqtt://", "mqtt://u:p@h:1", "mqtt://h:1/x", "mqtt://h:99999",
                "h:1"):
        with pytest.raises(BrokerError):
            parse_broker_url(bad)


def test_backend_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    from runner.distributed import transport as T

    monkeypatch.delenv(T.ENV_BACKEND, raising=False)
    assert T.resolve_backend() == T.DEFAULT_BACKEND == "paho"  # by measurement
    assert T.resolve_backend("paho") == "paho"
    monkeypatch.setenv(T.ENV_BACKEND, "native")
    monkeypatch.setattr(mqtt_native, "unavailable", lambda: None)
    assert T.resolve_backend() == "native" and T.resolve_backend("auto") == "native"
    assert T.resolve_backend("paho") == "paho"  # the argument wins over the environment
    monkeypatch.setattr(mqtt_native, "unavailable", lambda: "libmosquitto not found")
    assert T.resolve_backend("auto") == "paho"  # auto falls back, with a log line
    with pytest.raises(TransportError, match="libmosquitto not found"):
        T.resolve_backend("native")  # an explicit choice never falls back
    with pytest.raises(ValueError, match="MQTT backend"):
        T.resolve_backend("gmqtt")


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="no mosquitto_passwd")
def test_password_file_line_is_what_mosquitto_passwd_writes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import base64

    path = tmp_path / "pw"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(path), "alice", "s3cret"], check=True,
                   capture_output=True)
    line = path.read_text().strip()
    salt = base64.b64decode(line.split("$")[3])
    assert mosquitto_password_line("alice", "s3cret", salt=salt) == line


def test_start_broker_refuses_bad_ids() -> None:
    for clients in (["server"], ["monitor"], ["a/b"], ["c0", "c0"]):
        with pytest.raises(ValueError):
            start_broker(RUN, clients)
    with pytest.raises(ValueError):
        start_broker("bad run", ["c0"])


# ------------------------------------------------------------------------------ lifecycle
@needs_mosquitto
def test_broker_files_lifecycle_and_restart_on_same_port() -> None:
    b = start_broker("life", ["c0"], auth="aclfile")
    try:
        assert b.backend == "mosquitto" and b.auth == "aclfile" and b.is_running()
        for name in ("mosquitto.conf", "passwd", "acl", "credentials.json"):
            mode = stat.S_IMODE(os.stat(b.workdir / name).st_mode)
            assert mode == 0o600, name
        conf = (b.workdir / "mosquitto.conf").read_text()
        assert f"listener {b.port} 127.0.0.1" in conf and "allow_anonymous false" in conf
        assert "max_packet_size 268435455" in conf
        acl = (b.workdir / "acl").read_text()
        assert "user c0\ntopic read hsl/life/c/c0/grad" in acl
        assert "topic write hsl/life/c/c0/act" in acl and "hsl/life/c/c1" not in acl
        creds = json.loads((b.workdir / "credentials.json").read_text())
        assert set(creds) == {"server", "monitor", "c0"} and creds["c0"] == b.creds("c0").password
        port = b.port
        b.stop()
        assert not b.is_running()
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        b.start()
        assert b.is_running() and b.port == port
        b.restart()
        assert b.is_running() and b.port == port
        with pytest.raises(KeyError):
            b.creds("c9")
    finally:
        b.close()
    assert not b.workdir.exists()


@needs_mosquitto
def test_dynsec_is_the_default_when_installed(broker) -> None:  # type: ignore[no-untyped-def]
    from runner.distributed.broker import find_dynsec_plugin

    assert broker.auth == ("dynsec" if find_dynsec_plugin() else "aclfile")
    if broker.auth == "dynsec":
        state = json.loads((broker.workdir / "dynsec.json").read_text())
        assert {c["username"] for c in state["clients"]} == {"server", "monitor", *CLIENTS}
        assert not any(state["defaultACLAccess"][k] for k in
                       ("publishClientSend", "publishClientReceive", "subscribe"))


# ------------------------------------------------------------------------------- traffic
@needs_mosquitto
def test_4mb_activation_round_trip_through_the_broker(broker, peers) -> None:  # type: ignore[no-untyped-def]
    srv, c0 = peers["server"], peers["c0"]
    tensors = act_tensors(4, 256, 1024, seed=1)  # 4 MiB of activations: two 4 MiB chunks
    sent = c0.send(P.Kind.ACT, 5, tensors, {"k": 8})
    assert sent.nbytes > 4 * 2**20
    got = recv_kind(srv, P.Kind.ACT)
    assert got is not None and (got.client, got.step, got.seq, got.meta) == ("c0", 5, sent.seq,
                                                                            {"k": 8})
    for k, v in tensors.items():
        assert torch.equal(got.tensors[k], v)
    # and the gradient back, as bfloat16 on the wire
    srv.send(P.Kind.GRAD, 5, {P.GRAD: got.tensors[P.ACTS] * 2}, to="c0", wire="bfloat16")
    grad = recv_kind(c0, P.Kind.GRAD)
    assert grad is not None and grad.client == "c0" and grad.step == 5
    assert torch.allclose(grad.tensors[P.GRAD], tensors[P.ACTS] * 2, rtol=8e-3, atol=8e-3)


@needs_mosquitto
def test_small_chunks_and_broadcasts(broker, peers) -> None:  # type: ignore[no-untyped-def]
    srv, c0, c1 = peers["server"], peers["c0"], peers["c1"]
    factors = {"l0.q.A": torch.randn(16, 64), "l0.q.B": torch.randn(64, 16)}
    srv.chunk_size = 1000  # ~9 chunks through the broker, reassembled on both clients
    try:
        srv.send(P.Kind.GLOBAL, 9, factors, {"round": 1})
    finally:
        srv.chunk_size = P.DEFAULT_CHUNK
    for c in (c0, c1):
        m = recv_kind(c, P.Kind.GLOBAL)
        assert m is not None and m.client == P.SERVER and m.meta == {"round": 1}
        assert all(torch.equal(m.tensors[k], v) for k, v in factors.items())


@needs_mosquitto
def test_garbage_is_counted_and_reported_not_delivered(broker, peers) -> None:  # type: ignore[no-untyped-def]
    srv, c0 = peers["server"], peers["c0"]
    seen: list[tuple[str, str]] = []
    srv.on_reject = lambda e, topic: seen.append((e.reason.value, topic))
    before = srv.rejected
    try:
        c0.publish_raw(P.topic(RUN, P.Kind.ACT, "c0"), [b"definitely not an envelope"])
        c0.send(P.Kind.HB, 1)  # a valid message after it: the loop is still alive
        assert recv_kind(srv, P.Kind.HB) is not None
    finally:
        srv.on_reject = None
    assert srv.rejected == before + 1
    assert seen == [("bad-magic", "hsl/t1/c/c0/act")]


# ------------------------------------------------------------------------------ security
@needs_mosquitto
def test_wrong_or_unknown_credentials_are_refused(broker, backend) -> None:  # type: ignore[no-untyped-def]
    for cred in (Credentials("c0", "wrong"), Credentials("c9", "x"),
                 Credentials("c0", broker.creds("c1").password)):
        t = Transport(broker.address, cred, run=RUN, me="c0", backend=backend)
        with pytest.raises(TransportError, match="Not authorized"):
            t.connect(10)
        assert not t.connected


@needs_mosquitto
def test_client_cannot_read_another_clients_gradients(broker, peers) -> None:  # type: ignore[no-untyped-def]
    if broker.auth != "dynsec":
        pytest.skip("SUBACK refusals need the dynamic-security plugin")
    srv, c0, c1 = peers["server"], peers["c0"], peers["c1"]
    for filt in ("hsl/t1/c/c0/grad", "hsl/t1/c/+/grad", "hsl/t1/#", "hsl/t1/c/c0/act", "#"):
        assert c1.subscribe(filt) == [NOT_AUTHORIZED], filt
    assert c1.subscribe("hsl/t1/c/c1/grad") == [1]  # its own: granted at QoS 1
    drain(c1, 0.2)
    srv.send(P.Kind.GRAD, 7, {P.GRAD: torch.ones(1, 2, 3)}, to="c0")
    assert recv_kind(c0, P.Kind.GRAD) is not None
    assert [m for m in drain(c1, 0.5) if m.kind is P.Kind.GRAD] == []


@needs_mosquitto
def test_client_cannot_publish_as_the_server_or_another_client(broker, peers) -> None:  # type: ignore[no-untyped-def]
    srv, c0, c1 = peers["server"], peers["c0"], peers["c1"]
    drain(c0, 0.2)
    drain(srv, 0.2)
    forged = {
        "hsl/t1/global": P.Message(RUN, P.SERVER, P.Kind.GLOBAL, 1, 1, {"w": torch.ones(2)}),
        "hsl/t1/s/config": P.Message(RUN, P.SERVER, P.Kind.CONFIG, 1, 2, {}, {"split": 1}),
        "hsl/t1/c/c0/grad": P.Message(RUN, "c0", P.Kind.GRAD, 1, 3,
                                      {P.GRAD: torch.ones(1, 2, 3)}),
        "hsl/t1/c/c0/act": P.Message(RUN, "c0", P.Kind.ACT, 1, 4, act_tensors(1, 2, 3)),
    }
    for topic, msg in forged.items():
        with pytest.raises(PublishRefused, match="Not authorized"):
            c1.publish_raw(topic, P.encode(msg), timeout=10)
    assert drain(c0, 0.5) == [] and drain(srv, 0.2) == []
    # its own uplink works
    c1.send(P.Kind.HB, 2)
    hb = recv_kind(srv, P.Kind.HB)
    assert hb is not None and hb.client == "c1"


@needs_mosquitto
def test_acl_file_mode_grants_subscriptions_but_delivers_nothing(backend) -> None:  # type: ignore[no-untyped-def]
    with start_broker("acl", CLIENTS, auth="aclfile") as b:
        srv, c0, c1 = (transport(b, w, backend) for w in ("server", "c0", "c1"))
        try:
            assert c1.subscribe("hsl/acl/c/c0/grad") == [1]  # Mosquitto grants it ...
            srv.send(P.Kind.GRAD, 1, {P.GRAD: torch.ones(1, 2, 3)}, to="c0")
            assert recv_kind(c0, P.Kind.GRAD) is not None
            assert [m for m in drain(c1, 0.5) if m.kind is P.Kind.GRAD] == []  # ... and empty
            with pytest.raises(PublishRefused):
                c1.publish_raw("hsl/acl/global", P.encode(P.Message(
                    "acl", P.SERVER, P.Kind.GLOBAL, 1, 1, {"w": torch.ones(2)})))
            assert [m for m in drain(c0, 0.3) if m.kind is P.Kind.GLOBAL] == []
        finally:
            for t in (srv, c0, c1):
                t.close()


# ----------------------------------------------------------------------------- failures
@needs_mosquitto
def test_clients_reconnect_after_broker_restart(backend) -> None:  # type: ignore[no-untyped-def]
    with start_broker("rs", CLIENTS) as b:
        srv, c0 = transport(b, "server", backend), transport(b, "c0", backend)
        try:
            c0.send(P.Kind.HB, 1)
            assert recv_kind(srv, P.Kind.HB) is not None
            b.restart()
            assert c0.wait_connected(15) and srv.wait_connected(15)
            assert c0.connects == 2 and c0.disconnects == 1
            c0.send(P.Kind.ACT, 2, act_tensors(1, 4, 8))
            msg = recv_kind(srv, P.Kind.ACT, timeout=15)
            assert msg is not None and msg.step == 2
            # a kill -9 of the broker is survived the same way
            b.kill()
            b.start()
            assert c0.wait_connected(15) and srv.wait_connected(15)
            c0.send(P.Kind.HB, 3, timeout=15)
            hb = recv_kind(srv, P.Kind.HB, timeout=15)
            assert hb is not None and hb.step == 3
        finally:
            c0.close()
            srv.close()


@needs_mosquitto
def test_last_will_says_offline_and_clean_close_too(broker, peers) -> None:  # type: ignore[no-untyped-def]
    srv = peers["server"]
    drain(srv, 0.2)
    backend = srv.backend
    c1b = Transport(broker.address, broker.creds("c1"), run=RUN, me="c1",
                    client_id="hsl-t1-c1-second", backend=backend).connect(10)
    online = recv_kind(srv, P.Kind.STATE)
    assert online is not None and online.meta["state"] == "online"
    # MQTT 5 "disconnect with will message" (reason 4): the broker publishes the will, as it
    # does when a client crashes or its keepalive lapses.
    c1b.link.disconnect(with_will=True)
    will = recv_kind(srv, P.Kind.STATE)
    assert will is not None and will.client == "c1"
    assert will.meta == {"state": "offline", "reason": "lost"}
    c1b.link.stop()
    c1c = Transport(broker.address, broker.creds("c1"), run=RUN, me="c1",
                    client_id="hsl-t1-c1-third", backend=backend).connect(10)
    assert recv_kind(srv, P.Kind.STATE).meta["state"] == "online"  # type: ignore[union-attr]
    c1c.close()
    closed = recv_kind(srv, P.Kind.STATE)
    assert closed is not None and closed.meta == {"state": "offline", "reason": "closed"}


@needs_mosquitto
def test_outage_fires_the_will_and_the_session_keeps_what_came_meanwhile(backend) -> None:  # type: ignore[no-untyped-def]
    """Fault injection (``testbed inject dropout --mode disconnect``): the link drops without
    DISCONNECT, the broker publishes the will, and the MQTT 5 session queues the gradients
    sent meanwhile, across more than one outage."""
    import threading

    with start_broker("og", CLIENTS) as b:
        srv, c0 = transport(b, "server", backend), transport(b, "c0", backend)
        try:
            drain(srv, 0.2)
            for i in range(2):
                away = threading.Thread(target=c0.outage, args=(1.5,))
                away.start()
                will = recv_kind(srv, P.Kind.STATE)
                assert will is not None and will.meta == {"state": "offline", "reason": "lost"}
                srv.send(P.Kind.GRAD, 10 + i, {P.GRAD: torch.ones(1, 2, 3)}, to="c0")
                away.join()
                grad = recv_kind(c0, P.Kind.GRAD)
                assert grad is not None and grad.step == 10 + i
                back = recv_kind(srv, P.Kind.STATE)
                assert back is not None and back.meta["state"] == "online"
            assert c0.connects == 3
        finally:
            c0.close()
            srv.close()


# --------------------------------------------------------------------------------- amqtt
def test_amqtt_fallback_auth_acl_and_round_trip(backend) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("amqtt")
    with start_broker("am", CLIENTS, backend="amqtt") as b:
        assert b.mqtt_version == 4 and b.auth == "amqtt"
        srv, c0, c1 = (transport(b, w, backend) for w in ("server", "c0", "c1"))
        try:
            tensors = act_tensors(2, 8, 16)
            c0.send(P.Kind.ACT, 1, tensors)
            got = recv_kind(srv, P.Kind.ACT)
            assert got is not None and torch.equal(got.tensors[P.ACTS], tensors[P.ACTS])
            assert c1.subscribe("hsl/am/c/c0/grad") == [0x80]  # MQTT 3.1.1 failure code
            # a forbidden publish is dropped silently (3.1.1 has no negative PUBACK)
            c1.publish_raw("hsl/am/global", P.encode(P.Message(
                "am", P.SERVER, P.Kind.GLOBAL, 1, 1, {"w": torch.ones(2)})))
            assert [m for m in drain(c0, 0.5) if m.kind is P.Kind.GLOBAL] == []
            with pytest.raises(TransportError, match="Not authorized"):
                Transport(b.address, Credentials("c0", "wrong"), run="am", me="c0",
                          backend=backend).connect(10)
        finally:
            for t in (srv, c0, c1):
                t.close()

"""MQTT transport: one MQTT client per server or client process, speaking the protocol.

Why a wrapper rather than an MQTT library directly in the server and client code: the
runtime's processes should see *messages* (validated, deduplicated, reassembled, typed
tensors) and a few verbs (send, recv, heartbeat, state), while the MQTT details stay here in
one place:

* QoS 1 everywhere (at-least-once; the protocol's dedup makes it effectively once);
* automatic reconnect with exponential backoff (the link's network thread), resubscription
  on every CONNACK (a restarted broker has no sessions), and an MQTT 5 session that survives
  short disconnects so gradients queued by the broker are not lost;
* a retained ``state`` message: "online" on connect, "offline" on close, and the same
  "offline" as last will, so the server learns of a crashed client from the broker;
* received payloads are decoded by a :class:`runner.distributed.protocol.Receiver` on the network
  thread; refused ones are counted, logged, and handed to ``on_reject`` and never reach ``recv``.

The bytes are moved by a *link* (:mod:`runner.distributed.mqtt_link`): libmosquitto through ctypes
(``native``, :mod:`runner.distributed.mqtt_native`) or paho-mqtt (``paho``,
:mod:`runner.distributed.mqtt_paho`). Which one: the ``backend`` argument, else the ``TESTBED_MQTT``
environment variable, else :data:`DEFAULT_BACKEND`; ``auto`` takes native when libmosquitto loads
and paho otherwise (:func:`resolve_backend`).

Thread model: the link's network thread runs the callbacks; ``send``/``recv`` are called from
the application thread(s). ``recv`` reads a thread-safe queue.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

from runner.device import landed
from runner.distributed import mqtt_native
from runner.distributed import protocol as P
from runner.distributed.broker import BrokerAddress, Credentials
from runner.distributed.mqtt_link import Link, LinkError, Payload, Pending, TLSRefused, Will
from runner.distributed.mqtt_paho import FastClient, PahoLink
from runner.distributed.tls import ClientTLS

__all__ = ["BACKENDS", "DEFAULT_BACKEND", "FastClient", "PublishRefused", "Transport",
           "TransportError", "make_link", "resolve_backend"]

log = logging.getLogger(__name__)
RejectFn = Callable[[P.ProtocolError, str], None]
BACKENDS = ("auto", "native", "paho")
# Chosen by bench/transport.py (docs/benchmarks.md, "MQTT transport"): at 4-64 MB the full
# stack on paho (FastClient: no payload copies) is as fast as on libmosquitto, whose publish
# copies each payload twice and whose receive allocates and copies it once more; and bare
# paho links beat bare libmosquitto ones. So paho stays the default, native is a choice.
DEFAULT_BACKEND = "paho"
ENV_BACKEND = "TESTBED_MQTT"
_fallback_logged = False


class TransportError(RuntimeError):
    """The broker refused us, or did not answer in time."""


def resolve_backend(backend: str | None = None) -> str:
    """``native`` or ``paho``, from ``backend``, else $TESTBED_MQTT, else the default.

    ``auto`` is native when libmosquitto (>= 2.0) loads, else paho, said once in the log;
    an explicit ``native`` without the library raises :class:`TransportError`.
    """
    global _fallback_logged
    name = (backend or os.environ.get(ENV_BACKEND) or DEFAULT_BACKEND).strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"MQTT backend must be one of {', '.join(BACKENDS)}, not {name!r}")
    if name == "paho":
        return name
    why = mqtt_native.unavailable()
    if why is None:
        return "native"
    if name == "native":
        raise TransportError(f"native MQTT client requested but unavailable: {why}")
    if not _fallback_logged:
        _fallback_logged = True
        log.info("MQTT: using paho (the native client is unavailable: %s)", why)
    return "paho"


def make_link(backend: str, events: Any, *, client_id: str, v5: bool,
              credentials: Credentials, will: Will, reconnect: tuple[float, float],
              tls: ClientTLS | None = None) -> Link:
    """A link of the resolved ``backend`` ("native" or "paho") calling back ``events``;
    ``tls``: speak TLS (runner/distributed/tls.py), None: plain TCP."""
    kw: dict[str, Any] = dict(client_id=client_id, v5=v5, username=credentials.username,
                              password=credentials.password, will=will, reconnect=reconnect,
                              tls=tls)
    if backend == "native":
        return mqtt_native.NativeLink(events, **kw)
    if backend == "paho":
        return PahoLink(events, **kw)
    raise ValueError(f"unknown MQTT backend {backend!r}")


class PublishRefused(TransportError):
    """The broker answered a publish with a failure (MQTT 5 PUBACK >= 0x80: not authorized).

    MQTT 3.1.1 has no such answer: there a forbidden publish is silently dropped.
    """


class Transport:
    """A connected protocol endpoint for ``me`` (a client id or
    :data:`runner.distributed.protocol.SERVER`).

    ``expect`` defaults to: the run, and for a client only messages on its own channel or the
    server's; for the server any of ``clients`` (or any well-formed id when None).
    ``backend``: the MQTT client library (see :func:`resolve_backend`). ``tls``: the CA (and,
    for mutual TLS, this identity's certificate and key) of a broker whose address says
    ``tls`` (``mqtts://``); such an address without ``tls`` verifies the broker against the
    system's trust store. Plain addresses take no ``tls``: TLS files given for a plain
    broker mean a misconfiguration that would send everything in the clear.
    """

    def __init__(self, address: BrokerAddress, credentials: Credentials, *, run: str, me: str,
                 clients: Iterable[str] | None = None, expect: P.Expect | None = None,
                 chunk_size: int = P.DEFAULT_CHUNK, wire: str | None = None,
                 keepalive: int = 30, reconnect: tuple[float, float] = (0.1, 5.0),
                 session_expiry: int = 300, reassembly_timeout: float = 60.0,
                 on_reject: RejectFn | None = None, subscribe: bool = True,
                 client_id: str | None = None, backend: str | None = None,
                 tls: ClientTLS | None = None, device: torch.device | None = None):
        P.check_id(run, "run id")
        if tls is not None and not address.tls:
            raise ValueError(f"TLS files given for the plain broker {address.url}; use "
                             f"mqtts://{address.host}:{address.port}")
        if address.tls and tls is None:
            tls = ClientTLS()
        self.tls = tls
        if me != P.SERVER:
            P.check_id(me, "client id")
        self.address = address
        self.run = run
        self.me = me
        self.chunk_size = chunk_size
        self.wire = wire
        self.keepalive = keepalive
        self.session_expiry = session_expiry
        self.on_reject = on_reject
        # Where received tensors land (None: on the CPU, where they are decoded): the device
        # this process trains on (docs/gpu.md "Device placement"). The move happens in
        # ``recv``, on the application thread, never on the network thread.
        self.device = device
        if expect is None:
            allowed = (frozenset({me}) if me != P.SERVER
                       else None if clients is None else frozenset(clients))
            expect = P.Expect(run=run, clients=allowed)
        self.receiver = P.Receiver(expect, timeout=reassembly_timeout)
        self.topics = P.subscriptions(run, me) if subscribe else []
        self.inbox: queue.Queue[P.Message] = queue.Queue()
        self.sent_messages = 0
        self.sent_bytes = 0
        self.connects = 0
        self.disconnects = 0
        self.disconnected_at = 0.0  # monotonic time of the last lost connection
        self.last_step = 0
        self._seq = itertools.count(time.time_ns() // 1000)  # unique across restarts
        self._seq_lock = threading.Lock()
        self._connected = threading.Event()
        self._refused: str | None = None
        self._answered = threading.Event()
        self._pending_subs: dict[int, threading.Event] = {}
        self._sub_results: dict[int, list[int]] = {}
        self._lock = threading.Lock()
        self._subscribed_mid: int | None = None
        self._refused_pubs: dict[int, str] = {}
        self._closing = False
        self.v5 = address.mqtt_version == 5
        self.backend = resolve_backend(backend)
        will = Will(self.state_topic, bytes(self._state_payload("offline", reason="lost")))
        try:
            self.link = make_link(self.backend, self, client_id=client_id or f"hsl-{run}-{me}",
                                  v5=self.v5, credentials=credentials, will=will,
                                  reconnect=reconnect, tls=tls)
        except LinkError as e:
            raise TransportError(f"{me}: {e}") from e

    # -------------------------------------------------------------------------- lifecycle
    @property
    def state_topic(self) -> str:
        return P.topic(self.run, P.Kind.STATE, self.me)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def connect(self, timeout: float = 10.0) -> Transport:
        """Connect, subscribe, announce "online"; raise TransportError if refused or slow."""
        try:
            self.link.connect(self.address.host, self.address.port, self.keepalive,
                              self.session_expiry if self.v5 else None)
        except TLSRefused as e:  # "refused": the runtime's connect loops give up at once
            self.link.stop()
            raise TransportError(f"broker {self.address.url} refused {self.me!r}: {e}") from e
        except OSError as e:
            self.link.stop()
            raise TransportError(f"cannot reach broker {self.address.url}: {e}") from e
        # _answered is set on CONNACK refusal, on refused subscriptions, or when ready.
        if not self._answered.wait(timeout):
            self._stop_loop()
            raise TransportError(f"no answer from broker {self.address.url} in {timeout} s")
        if self._refused:
            self._stop_loop()
            raise TransportError(f"broker {self.address.url} refused {self.me!r}: "
                                 f"{self._refused}")
        return self

    def wait_connected(self, timeout: float | None = None) -> bool:
        """Block until connected and subscribed (e.g. after a broker restart)."""
        return self._connected.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Say "offline" (retained), disconnect cleanly (no last will), stop the loop."""
        if self._closing:
            return
        self._closing = True
        try:
            if self.connected:
                pending = self.link.publish(self.state_topic,
                                            self._state_payload("offline", reason="closed"),
                                            retain=True)
                pending.wait(time.monotonic() + timeout)
        except (RuntimeError, ValueError) as e:
            log.debug("%s: offline state not published: %s", self.me, e)
        self.link.disconnect()
        self._stop_loop()

    def _stop_loop(self) -> None:
        self.link.stop()
        self._connected.clear()

    def outage(self, seconds: float) -> None:
        """Fault injection: lose the connection abruptly (the broker publishes our last
        will), stay away ``seconds``, reconnect (see
        :meth:`runner.distributed.mqtt_link.Link.outage`)."""
        self.link.outage(seconds, time.sleep)

    def __enter__(self) -> Transport:
        return self.connect() if not self.connected else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------- link events (network thread)
    def link_connected(self, ok: bool, reason: str) -> None:
        if not ok:
            # First connect: report and give up. Later (broker restarted with other
            # credentials): the link keeps retrying with backoff, which is what we want.
            if not self._answered.is_set():
                self._refused = reason
                self._answered.set()
            log.warning("%s: broker refused connection: %s", self.me, reason)
            return
        self.connects += 1
        if self.connects > 1:
            log.info("%s: reconnected to %s", self.me, self.address.url)
        if self.topics:
            try:
                # the SUBACK is handled on this same thread, after we return
                self._subscribed_mid = self.link.subscribe(self.topics)
            except LinkError as e:
                log.warning("%s: %s", self.me, e)
        else:
            self._ready()

    def _ready(self) -> None:
        try:
            self.link.publish(self.state_topic, self._state_payload("online"), retain=True)
        except LinkError as e:
            log.warning("%s: online state not published: %s", self.me, e)
        self._connected.set()
        self._answered.set()

    def link_subscribed(self, mid: int, codes: list[int]) -> None:
        if mid == self._subscribed_mid:
            if any(c >= 0x80 for c in codes):
                refused = [t for t, c in zip(self.topics, codes, strict=False) if c >= 0x80]
                self._refused = f"subscriptions refused: {refused}"
                self._answered.set()
                return
            self._ready()
            return
        with self._lock:
            ev = self._pending_subs.pop(mid, None)
            self._sub_results[mid] = codes
        if ev is not None:
            ev.set()

    def link_disconnected(self, reason: str) -> None:
        if self._connected.is_set():
            self.disconnects += 1
            self.disconnected_at = time.monotonic()
            if not self._closing:
                log.warning("%s: disconnected (%s); reconnecting", self.me, reason)
        self._connected.clear()

    def link_published(self, mid: int, failure: str | None) -> None:
        # Only failures are kept (and popped by the publisher that waits for them), so the
        # map stays empty in normal operation.
        if failure is not None:
            with self._lock:
                self._refused_pubs[mid] = failure

    def link_message(self, topic: str, payload: Payload) -> None:
        try:
            decoded = self.receiver.feed(payload, topic)
        except P.ProtocolError as e:
            # The payload may be a view of the link's buffer, valid only during this call:
            # no frame of the decoder may outlive it through the exception's traceback.
            _drop_tracebacks(e)
            log.warning("%s: rejected message on %s: %s", self.me, topic, e)
            if self.on_reject is not None:
                try:
                    self.on_reject(e, topic)
                except Exception:  # noqa: BLE001 - a callback bug must not kill the loop
                    log.exception("%s: on_reject callback failed", self.me)
            return
        if decoded is not None:
            self.inbox.put(decoded)

    # ------------------------------------------------------------------------------- send
    def next_seq(self) -> int:
        with self._seq_lock:
            return next(self._seq)

    def send(self, kind: P.Kind | str, step: int, tensors: Mapping[str, torch.Tensor] | None = None,
             meta: Mapping[str, Any] | None = None, *, to: str | None = None,
             wire: str | None = None, retain: bool = False, timeout: float = 60.0) -> P.Message:
        """Encode and publish one message (QoS 1, chunked as needed); wait for the PUBACKs.

        A client sends on its own channel (``to`` must be None); the server sends to a
        client's channel with ``to=cid`` or on its own channel with ``to=None``. Waits up to
        ``timeout`` for a connection (across a reconnect) and for the broker's
        acknowledgements; returns the message as sent (with its seq and wire size).
        """
        kind = P.Kind(kind)
        if self.me != P.SERVER and to not in (None, self.me):
            raise ValueError("a client sends only on its own channel")
        channel = to if (self.me == P.SERVER and to is not None) else self.me
        msg = P.Message(run=self.run, client=channel, kind=kind, step=step, seq=self.next_seq(),
                        tensors=dict(tensors or {}), meta=dict(meta or {}))
        # Chunks are made as they are published: chunk i travels while i + 1 is copied.
        chunks = P.encode_chunks(msg, wire=wire or self.wire, chunk_size=self.chunk_size)
        sizes: list[int] = []
        self.publish_raw(msg.topic, _counted(chunks, sizes), retain=retain, timeout=timeout)
        msg.nbytes = sum(sizes)
        self.sent_messages += 1
        self.sent_bytes += msg.nbytes
        self.last_step = max(self.last_step, step)
        return msg

    def publish_raw(self, topic_name: str, payloads: Iterable[Payload], *,
                    retain: bool = False, timeout: float = 60.0) -> None:
        """Publish already-encoded payloads at QoS 1 and wait until the broker has them all.

        Public for tests, benchmarks and fault injection (garbage, replays); the runtime uses
        :meth:`send`.
        """
        deadline = time.monotonic() + timeout
        pending: list[Pending] = []
        for payload in payloads:
            if not self._connected.wait(max(0.0, deadline - time.monotonic())):
                raise TransportError(f"{self.me}: not connected to {self.address.url}")
            # If the link drops between the check and the publish, the library queues the
            # message for the reconnect, and it is waited for like any other.
            try:
                pending.append(self.link.publish(topic_name, payload, retain=retain))
            except LinkError as e:
                raise TransportError(f"{self.me}: publish failed: {e}") from e
        for p in pending:
            if not p.wait(deadline):
                raise TransportError(f"{self.me}: broker did not acknowledge within "
                                     f"{timeout} s")
        with self._lock:
            refused = [self._refused_pubs.pop(p.mid) for p in pending
                       if p.mid in self._refused_pubs]
        if refused:
            raise PublishRefused(f"{self.me}: broker refused publish on {topic_name}: "
                                 f"{refused[0]}")

    def heartbeat(self, step: int | None = None, **meta: Any) -> P.Message:
        """A heartbeat (liveness + progress) on our channel."""
        return self.send(P.Kind.HB, self.last_step if step is None else step, meta=meta,
                         timeout=10.0)

    def set_state(self, state: str, **meta: Any) -> P.Message:
        """Publish our state (retained): "online", "offline" or "done"."""
        return self.send(P.Kind.STATE, self.last_step, meta={"state": state, **meta},
                         retain=True, timeout=10.0)

    def _state_payload(self, state: str, **meta: Any) -> bytearray:
        msg = P.Message(run=self.run, client=self.me, kind=P.Kind.STATE, step=self.last_step,
                        seq=self.next_seq(), meta={"state": state, **meta})
        return P.encode(msg)[0]

    # ---------------------------------------------------------------------------- receive
    def recv(self, timeout: float | None = None) -> P.Message | None:
        """Next validated message, or None after ``timeout`` s (None: wait forever); its
        tensors on this transport's ``device``."""
        try:
            msg = self.inbox.get(timeout=timeout)
        except queue.Empty:
            return None
        if self.device is not None and msg.tensors:
            msg.tensors = landed(msg.tensors, self.device)
        return msg

    def subscribe(self, topic_filter: str, timeout: float = 5.0) -> list[int]:
        """Subscribe to one more filter; the broker's reason codes (>= 0x80: refused).

        For tests and diagnostics: the runtime's subscriptions are made on connect.
        """
        try:
            mid = self.link.subscribe([topic_filter])
        except LinkError as e:
            raise TransportError(str(e)) from e
        with self._lock:
            done = mid in self._sub_results
            ev = self._pending_subs.setdefault(mid, threading.Event())
        if not done and not ev.wait(timeout):
            raise TransportError(f"no SUBACK for {topic_filter!r} within {timeout} s")
        with self._lock:
            return self._sub_results.pop(mid)

    @property
    def rejected(self) -> int:
        return self.receiver.stats.rejected


def _counted(chunks: Iterable[bytearray], sizes: list[int]) -> Iterator[bytearray]:
    for chunk in chunks:
        sizes.append(len(chunk))
        yield chunk


def _drop_tracebacks(e: BaseException) -> None:
    """Clear the tracebacks of ``e`` and its causes (their frames hold the payload)."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        cur.__traceback__ = None
        cur = cur.__cause__ or cur.__context__

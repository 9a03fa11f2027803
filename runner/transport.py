"""MQTT transport: one paho-mqtt 2.x client per server or client process, speaking the protocol.

Why a wrapper rather than paho directly in the server and client code: the runtime's
processes should see *messages* (validated, deduplicated, reassembled, typed tensors) and a
few verbs (send, recv, heartbeat, state), while the MQTT details stay here in one place:

* QoS 1 everywhere (at-least-once; the protocol's dedup makes it effectively once);
* automatic reconnect with exponential backoff (paho's loop thread), resubscription on every
  CONNACK (a restarted broker has no sessions), and an MQTT 5 session that survives short
  disconnects so gradients queued by the broker are not lost;
* a retained ``state`` message: "online" on connect, "offline" on close, and the same
  "offline" as last will, so the server learns of a crashed client from the broker;
* received payloads are decoded by a :class:`runner.protocol.Receiver` on the network thread;
  refused ones are counted, logged, and handed to ``on_reject`` and never reach ``recv``.

Thread model: paho's loop thread runs the callbacks; ``send``/``recv`` are called from the
application thread(s). ``recv`` reads a thread-safe queue.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import paho.mqtt
import paho.mqtt.client as mqtt
import torch
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties, VariableByteIntegers

from runner import protocol as P
from runner.broker import BrokerAddress, Credentials

log = logging.getLogger(__name__)
RejectFn = Callable[[P.ProtocolError, str], None]


# ------------------------------------------------------------------ paho large-payload fixes
_LARGE = 65_536  # packets above this take the copy-free paths below


class _Slices:
    """Stands in for an outgoing packet buffer: slicing returns a view, not a copy.

    paho's ``_packet_write`` sends ``packet[pos:]`` after every partial socket write; on a
    bytearray that copies the rest of the packet each time, which is quadratic in the size
    (a 64 MB publish re-copied hundreds of MB). A memoryview slice is free.
    """

    __slots__ = ("buf",)

    def __init__(self, buf: bytes | bytearray):
        self.buf = memoryview(buf)

    def __getitem__(self, key: slice) -> memoryview:
        return self.buf[key]

    def __len__(self) -> int:
        return len(self.buf)


class _Gather:
    """An outgoing PUBLISH as its fixed + variable header and the caller's payload, unjoined.

    paho builds a packet by appending the payload to the header (a copy of every byte sent);
    this sends the header, then the payload from where it lies. ``packet[pos:]`` is a view of
    the part ``pos`` falls in, so a socket write never spans the two (one more send call).
    """

    __slots__ = ("head", "payload", "n")

    def __init__(self, head: bytearray, payload: bytes | bytearray):
        self.head, self.payload = memoryview(head), memoryview(payload)
        self.n = len(head)

    def __getitem__(self, key: slice) -> memoryview:
        pos = key.start or 0
        return self.head[pos:] if pos < self.n else self.payload[pos - self.n:]

    def __len__(self) -> int:
        return self.n + len(self.payload)


class _InPacket(bytearray):
    """An incoming packet's buffer, allocated once at its full length and filled in place."""

    __slots__ = ("filled",)

    def __iadd__(self, data: Any) -> _InPacket:  # paho: ``packet += _sock_recv(n)``
        if not isinstance(data, _Filled):  # pragma: no cover - paho changed under us
            raise TypeError("an in-place packet only takes bytes received into it")
        self.filled += data.n
        return self


class _Filled:
    """What ``_sock_recv`` returns after receiving straight into the packet: only a length."""

    __slots__ = ("n",)

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


class FastClient(mqtt.Client):
    """paho-mqtt 2.x client with copy-free handling of large payloads (same behaviour otherwise).

    Stock paho copies a published payload into the packet it sends and re-copies outgoing
    packets on every partial write; on receipt it grows the packet buffer piece by piece from
    freshly allocated ``recv`` results, then copies the payload out of it several times while
    decoding it (``struct.unpack`` into bytes, slices, the MQTT 5 properties parser slicing the
    rest of the packet). At megabytes per message that is most of the time of a hop
    (bench/transport.py). Here a large PUBLISH is sent as its header followed by the
    payload where it lies, received straight into one buffer of the packet's final size, and
    handed to ``on_message`` as that buffer. TCP_NODELAY is set on the connection (paho leaves
    Nagle on, which can hold back a PUBACK or a packet header behind an unacknowledged
    segment). These overrides touch paho internals (``_send_publish``, ``_packet_queue``,
    ``_sock_recv``, ``_handle_publish``, ``_in_packet``), verified on paho 2.1-2.2; any other
    major version, or anything unexpected in a packet, falls back to paho's own code.
    """

    ENABLED = paho.mqtt.__version__.split(".")[0] == "2"

    def _create_socket_connection(self) -> socket.socket:
        sock = super()._create_socket_connection()
        if self.ENABLED:
            with contextlib.suppress(OSError, AttributeError):  # e.g. a proxy's socket
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _send_publish(self, mid: int, topic: bytes, payload: bytes | bytearray = b"",
                      qos: int = 0, retain: bool = False, dup: bool = False,
                      info: mqtt.MQTTMessageInfo | None = None,
                      properties: Properties | None = None) -> mqtt.MQTTErrorCode:
        if not (self.ENABLED and isinstance(payload, (bytes, bytearray))
                and len(payload) > _LARGE and isinstance(topic, bytes)
                and self._sock is not None):
            return super()._send_publish(mid, topic, payload, qos, retain, dup, info, properties)
        # paho's own packet layout (MQTT 3.1.1 / 5 PUBLISH), without appending the payload.
        head = bytearray([mqtt.PUBLISH | ((dup & 0x1) << 3) | (qos << 1) | retain])
        remaining = 2 + len(topic) + len(payload) + (2 if qos > 0 else 0)
        packed = b""
        if self._protocol == MQTTProtocolVersion.MQTTv5:
            packed = b"\x00" if properties is None else properties.pack()
            remaining += len(packed)
        self._pack_remaining_length(head, remaining)
        self._pack_str16(head, topic)
        if qos > 0:
            head += mid.to_bytes(2, "big")
        head += packed
        self._easy_log(mqtt.MQTT_LOG_DEBUG, "Sending PUBLISH (d%d, q%d, r%d, m%d), '%s', ... "
                       "(%d bytes)", dup, qos, retain, mid, topic, len(payload))
        return self._packet_queue(mqtt.PUBLISH, _Gather(head, payload), mid, qos, info)

    def _packet_queue(self, command: int, packet: bytes | bytearray, mid: int, qos: int,
                      info: mqtt.MQTTMessageInfo | None = None) -> mqtt.MQTTErrorCode:
        if self.ENABLED and isinstance(packet, (bytes, bytearray)) and len(packet) > _LARGE:
            packet = _Slices(packet)  # type: ignore[assignment]
        return super()._packet_queue(command, packet, mid, qos, info)

    def _sock_recv(self, bufsize: int) -> bytes:
        # paho asks for everything still missing of a packet (up to 256 MB) in each call and
        # appends what comes to its packet buffer: a fresh allocation per recv, a copy, and
        # regrowth of the packet. For a large packet, allocate it once at its final length
        # (paho knows it by now) and receive into it where the bytes belong.
        ip = self._in_packet
        packet = ip["packet"]
        if not self.ENABLED or not isinstance(self._sock, socket.socket):  # websockets: no
            return super()._sock_recv(bufsize)  # recv_into; None: paho reports it
        if (bufsize > _LARGE and type(packet) is bytearray and not packet
                and ip["have_remaining"] and bufsize == ip["remaining_length"] == ip["to_process"]):
            packet = ip["packet"] = _InPacket(bufsize)
            packet.filled = 0
        if not isinstance(packet, _InPacket):
            return super()._sock_recv(bufsize)
        if packet.filled + bufsize != len(packet):  # pragma: no cover - paho changed under us
            raise ConnectionError("paho's packet bookkeeping disagrees with the buffer")
        try:
            with memoryview(packet) as whole, whole[packet.filled:] as rest:
                n = self._sock.recv_into(rest)
        except ssl.SSLWantReadError as err:
            raise BlockingIOError() from err
        except ssl.SSLWantWriteError as err:
            self._call_socket_register_write()
            raise BlockingIOError() from err
        return _Filled(n)  # type: ignore[return-value]

    def _handle_publish(self) -> mqtt.MQTTErrorCode:
        header = self._in_packet["command"]
        packet = self._in_packet["packet"]
        qos = (header & 0x06) >> 1
        if not (self.ENABLED and qos in (0, 1) and isinstance(packet, bytearray)
                and not self._manual_ack):
            return super()._handle_publish()
        try:
            mv = memoryview(packet)
            slen = int.from_bytes(mv[0:2], "big")
            topic_b = bytes(mv[2:2 + slen])
            pos = 2 + slen
            mid = 0
            if qos:
                mid = int.from_bytes(mv[pos:pos + 2], "big")
                pos += 2
            props = None
            if self._protocol == MQTTProtocolVersion.MQTTv5:
                plen, vlen = VariableByteIntegers.decode(bytes(mv[pos:pos + 4]))
                props = Properties(PacketTypes.PUBLISH)
                props.unpack(bytes(mv[pos:pos + vlen + plen]))
                pos += vlen + plen
            if pos > len(packet) or not topic_b and self._protocol != MQTTProtocolVersion.MQTTv5:
                raise ValueError("malformed")
            topic_b.decode("utf-8")
        except Exception:  # noqa: BLE001 - let paho's own decoder report it its way
            return super()._handle_publish()
        del mv
        # Deleting a bytearray's prefix only moves its start pointer (CPython): the payload
        # becomes the packet buffer itself, with no copy; paho starts a new buffer next.
        del packet[:pos]
        message = mqtt.MQTTMessage(mid=mid, topic=topic_b)
        message.dup = bool(header & 0x08)
        message.qos = qos
        message.retain = bool(header & 0x01)
        message.properties = props
        message.payload = packet
        message.timestamp = time.monotonic()
        self._handle_on_message(message)
        if qos == 1:
            return self._send_puback(mid)
        return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS


class TransportError(RuntimeError):
    """The broker refused us, or did not answer in time."""


class PublishRefused(TransportError):
    """The broker answered a publish with a failure (MQTT 5 PUBACK >= 0x80: not authorized).

    MQTT 3.1.1 has no such answer: there a forbidden publish is silently dropped.
    """


class Transport:
    """A connected protocol endpoint for ``me`` (a client id or :data:`runner.protocol.SERVER`).

    ``expect`` defaults to: the run, and for a client only messages on its own channel or the
    server's; for the server any of ``clients`` (or any well-formed id when None).
    """

    def __init__(self, address: BrokerAddress, credentials: Credentials, *, run: str, me: str,
                 clients: Iterable[str] | None = None, expect: P.Expect | None = None,
                 chunk_size: int = P.DEFAULT_CHUNK, wire: str | None = None,
                 keepalive: int = 30, reconnect: tuple[float, float] = (0.1, 5.0),
                 session_expiry: int = 300, reassembly_timeout: float = 60.0,
                 on_reject: RejectFn | None = None, subscribe: bool = True,
                 client_id: str | None = None):
        P.check_id(run, "run id")
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
        self.client = FastClient(
            CallbackAPIVersion.VERSION2, client_id=client_id or f"hsl-{run}-{me}",
            protocol=MQTTProtocolVersion.MQTTv5 if self.v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if self.v5 else True, reconnect_on_failure=True)
        self.client.username_pw_set(credentials.username, credentials.password)
        self.client.reconnect_delay_set(reconnect[0], reconnect[1])  # type: ignore[arg-type]
        self.client.max_queued_messages_set(0)
        self.client.will_set(self.state_topic, self._state_payload("offline", reason="lost"),
                             qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish

    # -------------------------------------------------------------------------- lifecycle
    @property
    def state_topic(self) -> str:
        return P.topic(self.run, P.Kind.STATE, self.me)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def connect(self, timeout: float = 10.0) -> Transport:
        """Connect, subscribe, announce "online"; raise TransportError if refused or slow."""
        props = None
        if self.v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.session_expiry
        try:
            self.client.connect(self.address.host, self.address.port, self.keepalive,
                                properties=props)
        except OSError as e:
            raise TransportError(f"cannot reach broker {self.address.url}: {e}") from e
        self.client.loop_start()
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
                info = self.client.publish(self.state_topic,
                                           self._state_payload("offline", reason="closed"),
                                           qos=1, retain=True)
                info.wait_for_publish(timeout)
        except (RuntimeError, ValueError) as e:
            log.debug("%s: offline state not published: %s", self.me, e)
        self.client.disconnect()
        self._stop_loop()

    def _stop_loop(self) -> None:
        self.client.loop_stop()
        self._connected.clear()

    def __enter__(self) -> Transport:
        return self.connect() if not self.connected else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --------------------------------------------------------------------------- callbacks
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        if reason.is_failure:
            # First connect: report and give up. Later (broker restarted with other
            # credentials): paho keeps retrying with backoff, which is what we want.
            if not self._answered.is_set():
                self._refused = str(reason)
                self._answered.set()
            log.warning("%s: broker refused connection: %s", self.me, reason)
            return
        self.connects += 1
        if self.connects > 1:
            log.info("%s: reconnected to %s", self.me, self.address.url)
        if self.topics:
            result, mid = client.subscribe([(t, 1) for t in self.topics])
            if result != mqtt.MQTT_ERR_SUCCESS:
                log.warning("%s: subscribe failed: %s", self.me, mqtt.error_string(result))
                return
            self._subscribed_mid = mid  # SUBACK is handled on this same thread, later
        else:
            self._ready()

    def _ready(self) -> None:
        self.client.publish(self.state_topic, self._state_payload("online"), qos=1, retain=True)
        self._connected.set()
        self._answered.set()

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: list[Any],
                      properties: Any) -> None:
        codes = [int(r.value) for r in reasons]
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

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:
        if self._connected.is_set():
            self.disconnects += 1
            self.disconnected_at = time.monotonic()
            if not self._closing:
                log.warning("%s: disconnected (%s); reconnecting", self.me, reason)
        self._connected.clear()

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any,
                    properties: Any) -> None:
        # Only failures are kept (and popped by the publisher that waits for them), so the
        # map stays empty in normal operation.
        if reason.is_failure:
            with self._lock:
                self._refused_pubs[mid] = str(reason)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            decoded = self.receiver.feed(msg.payload, msg.topic)
        except P.ProtocolError as e:
            log.warning("%s: rejected message on %s: %s", self.me, msg.topic, e)
            if self.on_reject is not None:
                try:
                    self.on_reject(e, msg.topic)
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

    def publish_raw(self, topic_name: str, payloads: Iterable[bytes | bytearray], *,
                    retain: bool = False, timeout: float = 60.0) -> None:
        """Publish already-encoded payloads at QoS 1 and wait until the broker has them all.

        Public for tests, benchmarks and fault injection (garbage, replays); the runtime uses
        :meth:`send`.
        """
        deadline = time.monotonic() + timeout
        infos = []
        for payload in payloads:
            while True:
                if not self._connected.wait(max(0.0, deadline - time.monotonic())):
                    raise TransportError(f"{self.me}: not connected to {self.address.url}")
                info = self.client.publish(topic_name, payload, qos=1, retain=retain)
                # NO_CONN: the link dropped between the check and the publish; paho queued
                # the message for the reconnect, so wait for it like any other.
                if info.rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                    break
                raise TransportError(f"{self.me}: publish failed: {mqtt.error_string(info.rc)}")
            infos.append(info)
        for info in infos:
            if not _wait_acked(info, deadline):
                raise TransportError(f"{self.me}: broker did not acknowledge within "
                                     f"{timeout} s")
        with self._lock:
            refused = [self._refused_pubs.pop(i.mid) for i in infos if i.mid in self._refused_pubs]
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
        """Next validated message, or None after ``timeout`` s (None: wait forever)."""
        try:
            return self.inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def subscribe(self, topic_filter: str, timeout: float = 5.0) -> list[int]:
        """Subscribe to one more filter; the broker's reason codes (>= 0x80: refused).

        For tests and diagnostics: the runtime's subscriptions are made on connect.
        """
        result, mid = self.client.subscribe(topic_filter, qos=1)
        if result != mqtt.MQTT_ERR_SUCCESS:
            raise TransportError(f"subscribe failed: {mqtt.error_string(result)}")
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


def _wait_acked(info: mqtt.MQTTMessageInfo, deadline: float) -> bool:
    """Wait for a QoS 1 PUBACK until ``deadline``; True when acknowledged.

    ``MQTTMessageInfo.wait_for_publish`` raises at once for a message published while the
    link was down (rc NO_CONN), even though paho queued it and delivers it after the
    reconnect; so this waits on the same condition and flag that method uses.
    """
    cond = info._condition  # noqa: SLF001 - see docstring
    with cond:
        while not info._published:  # noqa: SLF001
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            cond.wait(min(left, 0.5))
    return True

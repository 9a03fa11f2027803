"""paho-mqtt 2.x as a transport link: :class:`FastClient` (paho without its large-payload
copies) behind the :class:`runner.distributed.mqtt_link.Link` interface.

Why paho is the default link rather than libmosquitto (runner/distributed/mqtt_native.py): with the
FastClient fixes it moves a multi-MB payload without copying it (libmosquitto copies it three
times), which measured faster at 4-64 MB (bench/transport.py, docs/benchmarks.md); and it is
pure Python, so it runs wherever the package installs.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties, VariableByteIntegers
from paho.mqtt.reasoncodes import ReasonCode

from runner.distributed.mqtt_link import (
    TLS_REFUSED,
    Link,
    LinkError,
    LinkEvents,
    Payload,
    Pending,
    TLSRefused,
    Will,
)
from runner.distributed.tls import ClientTLS, TLSError

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
    tls_error: ssl.SSLError | None = None  # the last TLS failure on receive (an alert)

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
        try:
            return self._recv_fast(bufsize)
        except ssl.SSLError as err:  # the broker's alert (e.g. our certificate refused)
            if not isinstance(err, (ssl.SSLWantReadError, ssl.SSLWantWriteError)):
                self.tls_error = err
            raise

    def _recv_fast(self, bufsize: int) -> bytes:
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


class _PahoPending(Pending):
    __slots__ = ("mid", "info")

    def __init__(self, info: mqtt.MQTTMessageInfo):
        self.mid = info.mid
        self.info = info

    def wait(self, deadline: float) -> bool:
        """Wait for the PUBACK until ``deadline``.

        ``MQTTMessageInfo.wait_for_publish`` raises at once for a message published while
        the link was down (rc NO_CONN), even though paho queued it and delivers it after the
        reconnect; so this waits on the same condition and flag that method uses.
        """
        cond = self.info._condition  # noqa: SLF001 - see docstring
        with cond:
            while not self.info._published:  # noqa: SLF001
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                cond.wait(min(left, 0.5))
        return True


class PahoLink(Link):
    """A :class:`FastClient` with paho's loop thread; events forwarded to the transport.

    ``tls``: TLS with the broker's certificate verified against its CA and its name or
    address checked (the standard library's :mod:`ssl`, ``check_hostname``); the
    FastClient's copy-free receive reads from the TLS socket the same way."""

    backend = "paho"

    def __init__(self, events: LinkEvents, *, client_id: str, v5: bool, username: str,
                 password: str, will: Will, reconnect: tuple[float, float],
                 tls: ClientTLS | None = None):
        self.events = events
        self.v5 = v5
        self._connacked = False  # a CONNACK came: later TLS failures are network trouble
        self.client = FastClient(
            CallbackAPIVersion.VERSION2, client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if v5 else True, reconnect_on_failure=True)
        self.client.username_pw_set(username, password)
        self.client.reconnect_delay_set(reconnect[0], reconnect[1])  # type: ignore[arg-type]
        self.client.max_queued_messages_set(0)
        self.client.will_set(will.topic, will.payload, qos=1, retain=will.retain)
        if tls is not None:
            try:
                self.client.tls_set_context(tls.context())
            except (OSError, ssl.SSLError) as e:  # unreadable or not PEM: say which file
                raise TLSError(f"TLS files {tls.ca}, {tls.cert}, {tls.key}: {e}") from e
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish

    def connect(self, host: str, port: int, keepalive: int,
                session_expiry: int | None) -> None:
        props = None
        if self.v5 and session_expiry is not None:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = session_expiry
        try:
            self.client.connect(host, port, keepalive, properties=props)
        except ssl.SSLError as e:
            if isinstance(e, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)):
                raise  # the connection went away mid-handshake: an OSError, retried
            raise TLSRefused(f"{host}:{port}: the TLS handshake failed: {e}") from e
        self.client.loop_start()

    def publish(self, topic: str, payload: Payload, retain: bool = False) -> Pending:
        if isinstance(payload, memoryview):
            payload = payload.tobytes()
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        # NO_CONN: the link dropped; paho queued the message for the reconnect.
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise LinkError(mqtt.error_string(info.rc))
        return _PahoPending(info)

    def subscribe(self, filters: list[str]) -> int:
        result, mid = self.client.subscribe([(t, 1) for t in filters])
        if result != mqtt.MQTT_ERR_SUCCESS:
            raise LinkError(f"subscribe failed: {mqtt.error_string(result)}")
        return mid

    def disconnect(self, with_will: bool = False) -> None:
        if with_will and not self.v5:  # 3.1.1 has no "disconnect with will": drop the link
            self._shutdown_socket()
            return
        self.client.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT, identifier=4)
                               if with_will else None)

    def stop(self) -> None:
        self.client.loop_stop()

    def outage(self, seconds: float, sleep: Callable[[float], None]) -> None:
        self._shutdown_socket()  # abrupt: no DISCONNECT packet, so the will fires
        self.client.loop_stop()
        sleep(seconds)
        self.client.reconnect()
        self.client.loop_start()

    def _shutdown_socket(self) -> None:
        sock = self.client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    # --------------------------------------------------------------- paho's loop thread
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        self._connacked = True
        self.events.link_connected(not reason.is_failure, str(reason))

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:
        err, self.client.tls_error = self.client.tls_error, None
        if err is not None and not self._connacked:
            self.events.link_connected(False, f"{TLS_REFUSED}: {err}")
        self.events.link_disconnected(str(reason))

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: list[Any],
                      properties: Any) -> None:
        self.events.link_subscribed(mid, [int(r.value) for r in reasons])

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.events.link_message(msg.topic, msg.payload)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any,
                    properties: Any) -> None:
        self.events.link_published(mid, str(reason) if reason.is_failure else None)

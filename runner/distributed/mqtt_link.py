"""What :class:`runner.distributed.transport.Transport` needs from an MQTT client library: a *link*.

Why an interface between the transport and the client library: the protocol's behaviour
(validation, dedup, reassembly, QoS 1 waits, resubscription, the retained state and the last
will) lives once in :mod:`runner.distributed.transport`, while the bytes can be moved by either
paho-mqtt (pure Python, :mod:`runner.distributed.mqtt_paho`) or libmosquitto (C,
:mod:`runner.distributed.mqtt_native`), chosen per process by measurement (docs/benchmarks.md). A
link does only MQTT: connect with a will, keep reconnecting, publish at QoS 1 and report the PUBACK,
subscribe and report the SUBACK, hand incoming payloads over. All events arrive on the link's own
network thread.

Names: the environment variable ``TESTBED_MQTT`` (``paho``, ``native`` or ``auto``) picks the
backend when the caller does not (see :func:`runner.distributed.transport.resolve_backend`).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

Payload = bytes | bytearray | memoryview


class LinkEvents(Protocol):
    """The transport's side: called by a link on its network thread."""

    def link_connected(self, ok: bool, reason: str) -> None:
        """CONNACK: success, or the broker's refusal in words ("Not authorized")."""

    def link_disconnected(self, reason: str) -> None:
        """The connection ended (cleanly or not); the link reconnects unless stopped."""

    def link_subscribed(self, mid: int, codes: list[int]) -> None:
        """SUBACK for ``mid``: one code per filter (>= 0x80: refused)."""

    def link_message(self, topic: str, payload: Payload) -> None:
        """A PUBLISH. The payload may be a read-only view valid only during the call."""

    def link_published(self, mid: int, failure: str | None) -> None:
        """PUBACK for ``mid``: None, or the broker's refusal in words (MQTT 5 only)."""


@dataclass(frozen=True)
class Will:
    """The last will: published by the broker when the link drops without a DISCONNECT."""

    topic: str
    payload: bytes
    retain: bool = True


class Pending(abc.ABC):
    """One QoS 1 publish on its way: ``wait`` until the broker acknowledged it."""

    mid: int

    @abc.abstractmethod
    def wait(self, deadline: float) -> bool:
        """True once acknowledged; False when ``deadline`` (time.monotonic) passed first."""


class Link(abc.ABC):
    """One MQTT connection for one transport (see the module docstring).

    ``publish`` and ``subscribe`` may be called from any thread, also from the link's own
    callbacks. A publish while the connection is down is queued by the library and sent
    after the reconnect (``Pending.wait`` then waits across it).
    """

    backend: str = "?"

    @abc.abstractmethod
    def connect(self, host: str, port: int, keepalive: int,
                session_expiry: int | None) -> None:
        """Open the TCP connection, send CONNECT and start the network thread.

        Raises OSError when the broker cannot be reached; the CONNACK comes later as
        :meth:`LinkEvents.link_connected`. ``session_expiry`` applies to MQTT 5 only.
        """

    @abc.abstractmethod
    def publish(self, topic: str, payload: Payload, retain: bool = False) -> Pending:
        """Publish at QoS 1; raises :class:`LinkError` when the library refuses at once."""

    @abc.abstractmethod
    def subscribe(self, filters: list[str]) -> int:
        """Subscribe at QoS 1 to all ``filters`` in one SUBSCRIBE; its message id."""

    @abc.abstractmethod
    def disconnect(self, with_will: bool = False) -> None:
        """Send DISCONNECT (``with_will``: MQTT 5 reason 4, so the broker still publishes
        the will, as after a crash). The network thread keeps running until :meth:`stop`."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop the network thread (after :meth:`disconnect`, or to give up)."""

    @abc.abstractmethod
    def outage(self, seconds: float, sleep: Callable[[float], None]) -> None:
        """Fault injection: drop the TCP connection abruptly (no DISCONNECT, so the will
        fires), stay away ``seconds`` (via ``sleep``), then reconnect."""


class LinkError(RuntimeError):
    """The client library refused an operation (not connected at all, oversize, ...)."""


class TLSRefused(ConnectionError):
    """The TLS handshake failed for good: the broker's certificate is not signed by the CA we
    trust or does not name the host we dialled, or the broker refused our certificate (or
    its absence, with mutual TLS). Retrying cannot help, so callers give up at once."""


# The prefix of the refusal a link reports (``link_connected(False, ...)``) when the broker
# ends a TLS connection before CONNACK: with TLS 1.3 a refused client certificate shows only
# then, after our side of the handshake has completed.
TLS_REFUSED = "TLS refused"

"""Reassembly: the stateful receiver that turns a stream of chunks into messages.

MQTT QoS 1 is at-least-once and a chunked message arrives in pieces, possibly out of order,
possibly never complete; this is where chunks are checked against their message's first
chunk, copied into place, deduplicated, expired and bounded in memory, and where the
reassembled payload's CRC is checked (combined from the chunks' CRCs, without a second pass).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from runner.distributed.protocol.crc import crc32_combine
from runner.distributed.protocol.decoder import _build_message, _guard
from runner.distributed.protocol.envelope import DEFAULT_MAX_MESSAGE, Header, Message
from runner.distributed.protocol.errors import ProtocolError, Reason, _fail
from runner.distributed.protocol.kinds import KINDS
from runner.distributed.protocol.validation import Expect, read_envelope


@dataclass
class ReceiverStats:
    """Counters a receiver keeps; the runtime logs them as metrics."""

    accepted: int = 0  # complete messages delivered
    chunks: int = 0  # valid chunks taken in
    duplicates: int = 0  # repeated chunks or messages dropped (QoS 1 redelivery)
    rejected: int = 0  # payloads refused with a ProtocolError
    expired: int = 0  # incomplete messages dropped after the timeout
    bytes: int = 0  # wire bytes of accepted messages
    reasons: dict[str, int] = field(default_factory=dict)


@dataclass
class _Partial:
    header: Header
    buf: np.ndarray
    received: dict[int, tuple[int, int]]  # chunk index -> (CRC-32, length)
    last: float
    nbytes: int = 0


_CHUNK_FIELDS = ("chunk", "ccrc")


class Receiver:
    """Validates, deduplicates and reassembles incoming payloads into :class:`Message` s.

    ``feed`` returns a message when one is complete, None when it needs more chunks or the
    payload was a duplicate, and raises :class:`ProtocolError` (only that) for anything it
    refuses. Chunks may come in any order and more than once (QoS 1 is at-least-once);
    incomplete messages are dropped ``timeout`` s after their last chunk, and at most
    ``max_pending`` bytes are held for incomplete messages, so a sender that never finishes
    cannot exhaust memory. Completed (client, kind, step, seq) keys are remembered (the last
    ``dedup_window``) so a redelivered message is delivered once.

    Not thread-safe: one receiver per network thread (paho calls back on one thread).
    """

    def __init__(self, expect: Expect, *, timeout: float = 60.0,
                 max_pending: int = 2 * DEFAULT_MAX_MESSAGE, dedup_window: int = 65_536,
                 clock: Callable[[], float] = time.monotonic):
        self.expect = expect
        self.timeout = timeout
        self.max_pending = max_pending
        self.dedup_window = dedup_window
        self.clock = clock
        self.stats = ReceiverStats()
        self._pending: dict[tuple[str, str, int, int], _Partial] = {}
        self._pending_bytes = 0
        self._done: OrderedDict[tuple[str, str, int, int], None] = OrderedDict()

    @property
    def pending(self) -> int:
        """Incomplete messages held."""
        return len(self._pending)

    def feed(self, data: bytes | bytearray | memoryview,
             topic_name: str | None = None) -> Message | None:
        try:
            return _guard(lambda: self._feed(data, topic_name))
        except ProtocolError as e:
            self.stats.rejected += 1
            self.stats.reasons[e.reason.value] = self.stats.reasons.get(e.reason.value, 0) + 1
            raise

    def expire(self) -> list[tuple[str, str, int, int]]:
        """Drop incomplete messages idle for longer than the timeout; their keys."""
        now = self.clock()
        gone = [k for k, p in self._pending.items() if now - p.last > self.timeout]
        for k in gone:
            self._pending_bytes -= self._pending.pop(k).header.size
        self.stats.expired += len(gone)
        return gone

    def _seen(self, key: tuple[str, str, int, int]) -> bool:
        return key in self._done

    def _mark(self, msg: Message) -> Message:
        if KINDS[msg.kind].dedup:
            self._done[msg.key] = None
            while len(self._done) > self.dedup_window:
                self._done.popitem(last=False)
        self.stats.accepted += 1
        self.stats.bytes += msg.nbytes
        return msg

    def _feed(self, data: bytes | bytearray | memoryview,
              topic_name: str | None) -> Message | None:
        self.expire()
        header, piece, piece_crc = read_envelope(data, self.expect, topic_name)
        nbytes = len(memoryview(data).cast("B"))
        key = header.key
        if KINDS[header.kind].dedup and self._seen(key):
            self.stats.duplicates += 1
            return None
        if header.count == 1:
            self.stats.chunks += 1
            return self._mark(_build_message(header, piece, self.expect, nbytes))
        part = self._pending.get(key)
        if part is None:
            if self._pending_bytes + header.size > self.max_pending:
                raise _fail(Reason.OVERLOAD, f"{self._pending_bytes} bytes already pending; "
                                             f"{header.size} more would exceed {self.max_pending}")
            # numpy.empty: no zero-fill pass (bytearray(n) memsets n bytes first)
            part = _Partial(header, np.empty(header.size, dtype=np.uint8), {}, self.clock())
            self._pending[key] = part
            self._pending_bytes += header.size
        else:
            first = {k: v for k, v in part.header.raw.items() if k not in _CHUNK_FIELDS}
            this = {k: v for k, v in header.raw.items() if k not in _CHUNK_FIELDS}
            if first != this:
                raise _fail(Reason.CHUNK_MISMATCH, f"chunk {header.index} of {key} disagrees "
                                                   "with the message's first chunk")
            if header.index in part.received:
                self.stats.duplicates += 1
                return None
        self.stats.chunks += 1
        start = header.index * header.csize
        memoryview(part.buf)[start:start + len(piece)] = piece
        part.received[header.index] = (piece_crc, len(piece))
        part.last = self.clock()
        part.nbytes += nbytes
        if len(part.received) < header.count:
            return None
        del self._pending[key]
        self._pending_bytes -= header.size
        crc = 0
        for i in range(header.count):
            c, n = part.received[i]
            crc = crc32_combine(crc, c, n) if i else c
        if crc != header.crc:
            raise _fail(Reason.CHECKSUM, f"reassembled payload of {key} CRC32 mismatch")
        return self._mark(_build_message(header, memoryview(part.buf), self.expect,
                                         part.nbytes))

"""The envelope: framing constants, checksum layout, the message and header types.

Why a custom envelope instead of bare safetensors: the broker is a shared, untrusted medium
(a buggy or hostile client, a corrupted chunk, a stale message of an earlier run), and the
receiver must be able to refuse anything that is not exactly what it expects *before* it
allocates or computes with it. So every MQTT payload is

    MAGIC (4 bytes) | VERSION (uint8) | header length (uint32, big-endian) | header | payload

where the header is a JSON object (two CRC-32s first, then run, client, kind, step, seq,
tensor manifest, chunking, lengths) padded with spaces so the payload starts 8-byte aligned,
and the payload is a safetensors blob (https://huggingface.co/docs/safetensors) of the
message's tensors, split into chunks above a configurable size (MQTT caps a payload at
256 MB; smaller chunks also pipeline through the broker). One checksum covers the whole
envelope, header included, so no corrupted byte is ever interpreted.

This module holds what both the encoder and the decoder must agree on: the framing and size
limits, where the checksums sit in the header, how a header is serialised
(:func:`_header_bytes`), the strict JSON rules both JSON headers are read with, and the
types a message travels as (:class:`Message`, :class:`TensorInfo`, :class:`Header`).
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from runner.distributed.protocol.dtypes import _itemsize
from runner.distributed.protocol.errors import ProtocolError, Reason
from runner.distributed.protocol.kinds import Kind
from runner.distributed.protocol.topics import topic

MAGIC = b"HSLW"
VERSION = 1
PREFIX = struct.Struct(">4sBI")  # magic, version, header length
ALIGN = 8  # payload (and so every tensor) starts 8-byte aligned in the message

MIB = 1 << 20
# 1 MiB, far below the largest size MQTT allows: the broker stores and forwards whole packets,
# so a message in chunks flows through both hops at once (pipelined), and the broker's
# per-packet buffers (three per chunk in Mosquitto 2.0: read, stored, written) stay small:
# glibc maps buffers of a few MiB afresh and page-faults them in on every message, which
# dominated the broker's time with 4 MiB chunks. bench/transport.py: a 4 MB round trip took
# ~0.6-0.7x the time with 1 MiB chunks as with 4 MiB ones, 16-64 MB about the same; the
# per-chunk cost (a ~0.5 KB header, one PUBACK, a few Python calls) stays small at 1 MiB.
DEFAULT_CHUNK = 1 * MIB
MAX_CHUNK = 254 * MIB  # a chunk + a maximal header (1 MiB) + topic fit in one MQTT packet (256 MB)
DEFAULT_MAX_HEADER = MIB
DEFAULT_MAX_MESSAGE = 1 << 30  # a whole (reassembled) payload
MAX_DIMS = 8
MAX_TENSORS = 100_000


# The two checksums lead every header at fixed offsets, so they can be computed after the
# rest is written and patched in place: ``{"ccrc":"xxxxxxxx","crc":"xxxxxxxx",...``.
# crc  = CRC32 of the whole (reassembled) payload;
# ccrc = CRC32 of this MQTT payload: its chunk bytes, then prefix + header with the ccrc digits
#        as "00000000". It covers the header too, so any bit flip anywhere is caught, and it
#        is computed from the chunk's own CRC (zlib.crc32's running value) in one pass.
_CRC_PLACEHOLDER = {"ccrc": "00000000", "crc": "00000000"}
_CCRC_AT, _CRC_AT = 9, 26
_HEAD_RE = re.compile(rb'\{"ccrc":"[0-9a-f]{8}","crc":"[0-9a-f]{8}"[,}]')


@dataclass
class Message:
    """One logical message (before chunking / after reassembly).

    ``client`` is the channel: the sending client for uplink kinds, the addressed client for
    ``grad``/``config``, SERVER for the server's channel. ``seq`` is unique per sender (see
    :class:`runner.distributed.transport.Transport`); ``(client, kind, step, seq)`` identifies a
    message for deduplication. ``sent_at`` is the sender's wall clock (time.time()) for latency
    figures; ``nbytes`` the bytes it took on the wire (set by the decoder).
    """

    run: str
    client: str
    kind: Kind
    step: int
    seq: int
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    sent_at: float | None = None
    nbytes: int = 0

    @property
    def key(self) -> tuple[str, str, int, int]:
        return (self.client, str(self.kind), self.step, self.seq)

    @property
    def topic(self) -> str:
        return topic(self.run, self.kind, self.client)


@dataclass(frozen=True)
class TensorInfo:
    """Manifest entry: the tensor's own dtype, its dtype on the wire, and its shape."""

    dtype: str
    wire: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.wire)


@dataclass(frozen=True)
class Header:
    """A validated envelope header (one chunk's)."""

    run: str
    client: str
    kind: Kind
    step: int
    seq: int
    tensors: dict[str, TensorInfo]
    meta: dict[str, Any]
    sent_at: float | None
    size: int  # bytes of the whole payload
    crc: int  # CRC32 of the whole payload
    index: int  # chunk index
    count: int  # chunk count
    csize: int  # chunk size: chunk i holds payload[i*csize : (i+1)*csize]
    ccrc: int  # CRC32 of this envelope (chunk bytes, then prefix + header, ccrc zeroed)
    raw: Mapping[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @property
    def key(self) -> tuple[str, str, int, int]:
        return (self.client, str(self.kind), self.step, self.seq)

    @property
    def chunk_len(self) -> int:
        return max(0, min(self.csize, self.size - self.index * self.csize))


def _header_bytes(head: Mapping[str, Any]) -> bytes:
    """A header as it goes on the wire: compact JSON, padded so the payload starts aligned;
    a header receivers would refuse by default fails here, at the sender."""
    try:
        raw = json.dumps(head, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise ProtocolError(Reason.BAD_META, f"header is not JSON-serialisable ({e})") from None
    raw += b" " * (-(PREFIX.size + len(raw)) % ALIGN)
    if len(raw) > DEFAULT_MAX_HEADER:  # receivers refuse it by default: fail at the sender
        raise ProtocolError(Reason.HEADER_TOO_LARGE, f"header of {len(raw)} bytes (meta or "
                                                     f"manifest too large)")
    return raw


# Strict JSON, for both headers (the envelope's and the safetensors blob's): no duplicate
# keys, no NaN/Infinity constants, sizes and shapes of non-negative ints only.
def _no_dup_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _is_nat(x: Any) -> bool:
    return type(x) is int and x >= 0


def _is_shape(x: Any) -> bool:
    return isinstance(x, list) and len(x) <= MAX_DIMS and all(_is_nat(d) for d in x)

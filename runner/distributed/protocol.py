"""The wire protocol of the distributed runtime: topics, message envelope, strict decoding.

Everything a server and its clients exchange over MQTT goes through this module, so that one
place decides what a valid message is. docs/protocol.md is the specification; keep the two in
step.

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

The safetensors blob is written and read here rather than through ``safetensors.torch``
because ``save`` returns a fresh ``bytes`` (one more copy before the envelope is prepended)
and ``load`` copies every tensor out of the buffer; copying the tensors straight into the
envelope and viewing them with ``torch.frombuffer`` on arrival keeps the hot path at one copy
on each side. The bytes are plain safetensors either way (tests/test_protocol.py loads ours
with ``safetensors.torch.load`` and parses theirs with :func:`parse_safetensors`).

Every failure of decoding raises :class:`ProtocolError` with a :class:`Reason`; no other
exception escapes :meth:`Receiver.feed` or :func:`decode`, whatever the bytes are.
"""

from __future__ import annotations

import json
import math
import re
import struct
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NamedTuple

import numpy as np
import torch

try:  # ISA-L's CRC-32: the same checksum as zlib.crc32 (same polynomial, same values), ~10x
    # faster (carry-less multiply); the hot path of both sides runs one per byte sent.
    from isal.isal_zlib import crc32 as _crc32
    CRC32_IMPL = "isal"
except ImportError:  # pragma: no cover - depends on the environment
    _crc32 = zlib.crc32
    CRC32_IMPL = "zlib"

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

SERVER = "server"  # reserved "client id" of the server's own channel
ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
TOPIC_ROOT = "hsl"

# Tensor names of the fixed-layout kinds (what crosses the cut, see runner/trainer.py).
ACTS, MASK, LABELS, GRAD = "acts", "mask", "labels", "grad"


class ProtocolError(ValueError):
    """A message that must be refused; ``reason`` says which rule it broke (a :class:`Reason`).

    A subclass of ValueError because it is always "bad input", never a bug of the receiver;
    receivers count and log it and carry on.
    """

    def __init__(self, reason: Reason, detail: str = ""):
        self.reason = Reason(reason)
        self.detail = detail
        super().__init__(f"{self.reason.value}: {detail}" if detail else self.reason.value)


class Reason(StrEnum):
    """Why a message was refused: stable strings for logs, metrics and tests."""

    TOO_SHORT = "too-short"
    BAD_MAGIC = "bad-magic"
    BAD_VERSION = "bad-version"
    HEADER_TOO_LARGE = "header-too-large"
    TRUNCATED_HEADER = "truncated-header"
    BAD_HEADER = "bad-header"  # not UTF-8, not JSON, not an object, duplicate keys, NaN
    MISSING_FIELD = "missing-field"
    UNKNOWN_FIELD = "unknown-field"
    BAD_FIELD = "bad-field"  # a field of the wrong type or out of range
    WRONG_RUN = "wrong-run"
    UNKNOWN_CLIENT = "unknown-client"
    UNKNOWN_KIND = "unknown-kind"
    UNEXPECTED_KIND = "unexpected-kind"  # a valid kind this receiver/channel does not take
    BAD_STEP = "bad-step"
    BAD_SEQ = "bad-seq"
    BAD_CHUNK = "bad-chunk"
    MESSAGE_TOO_LARGE = "message-too-large"
    TRUNCATED_PAYLOAD = "truncated-payload"
    OVERSIZED_PAYLOAD = "oversized-payload"
    CHECKSUM = "checksum-mismatch"
    BAD_MANIFEST = "bad-manifest"
    BAD_DTYPE = "bad-dtype"
    MISSING_TENSOR = "missing-tensor"
    UNEXPECTED_TENSOR = "unexpected-tensor"
    SHAPE_MISMATCH = "shape-mismatch"
    BAD_PAYLOAD = "bad-payload"  # the safetensors blob is malformed or disagrees with manifest
    NON_FINITE = "non-finite"
    BAD_META = "bad-meta"
    BAD_TOPIC = "bad-topic"
    TOPIC_MISMATCH = "topic-mismatch"
    CHUNK_MISMATCH = "chunk-mismatch"
    OVERLOAD = "reassembly-overload"
    MALFORMED = "malformed"  # catch-all: an unexpected exception while decoding


class Kind(StrEnum):
    """Message kinds; the value is also the last topic level."""

    ACT = "act"  # client -> server: boundary activations + attention mask + labels
    GRAD = "grad"  # server -> client: gradient w.r.t. the activations
    ADAPT = "adapt"  # client -> server: adapter state dict (for aggregation)
    GLOBAL = "global"  # server -> all: aggregated factors (NAA / FedAvg result)
    CONFIG = "config"  # server -> one client or all: configuration (split, ranks, weights)
    HB = "hb"  # heartbeat, client -> server or server -> all
    STATE = "state"  # online/offline/done, client -> server or server -> all; last will


# ------------------------------------------------------------------------------- dtypes
# name -> (torch dtype, safetensors code). Only what the runtime sends; anything else is refused.
DTYPES: dict[str, tuple[torch.dtype, str]] = {
    "float32": (torch.float32, "F32"),
    "float16": (torch.float16, "F16"),
    "bfloat16": (torch.bfloat16, "BF16"),
    "int64": (torch.int64, "I64"),
    "int32": (torch.int32, "I32"),
}
_NAME_OF = {dt: name for name, (dt, _) in DTYPES.items()}
_ST_CODE = {name: code for name, (_, code) in DTYPES.items()}
_ST_NAME = {code: name for name, code in _ST_CODE.items()}
FLOATS = frozenset({"float32", "float16", "bfloat16"})
INTS = frozenset({"int64", "int32"})
WIRE_DTYPES = frozenset({"float16", "bfloat16"})  # optional lossy casts on the wire
STATES = frozenset({"online", "offline", "done"})


def dtype_name(dtype: torch.dtype) -> str:
    """Protocol name of a torch dtype; unsupported dtypes are a sender bug, so ValueError."""
    try:
        return _NAME_OF[dtype]
    except KeyError:
        raise ProtocolError(Reason.BAD_DTYPE, f"dtype {dtype} is not sent on the wire") from None


def _itemsize(name: str) -> int:
    return DTYPES[name][0].itemsize


# --------------------------------------------------------------------------------- kinds
@dataclass(frozen=True)
class KindSpec:
    """What a kind may carry and where it travels.

    ``fixed``: tensor name -> allowed dtypes, when the kind has a fixed layout; ``free``: the
    dtypes allowed for any tensor name (adapter state dicts), or empty for no tensors at all.
    ``on_client`` / ``on_server``: whether the kind travels on a client's channel
    (``hsl/<run>/c/<cid>/<kind>``) and/or the server's (``hsl/<run>/s/<kind>``).
    ``uplink``: on a client's channel the client writes it (else the server does).
    ``dedup``: receivers drop repeats of (client, kind, step, seq); heartbeats and states are
    "latest wins" and idempotent, and a last will is a fixed message that may legitimately
    repeat, so they are not deduplicated.
    """

    fixed: Mapping[str, frozenset[str]] | None = None
    free: frozenset[str] = frozenset()
    on_client: bool = True
    on_server: bool = False
    uplink: bool = True
    dedup: bool = True


KINDS: dict[Kind, KindSpec] = {
    Kind.ACT: KindSpec(fixed={ACTS: FLOATS, MASK: frozenset({"int64"}),
                              LABELS: frozenset({"int64"})}),
    Kind.GRAD: KindSpec(fixed={GRAD: FLOATS}, uplink=False),
    Kind.ADAPT: KindSpec(free=FLOATS),
    Kind.GLOBAL: KindSpec(free=FLOATS, on_client=False, on_server=True, uplink=False),
    Kind.CONFIG: KindSpec(free=FLOATS | INTS, on_server=True, uplink=False),
    Kind.HB: KindSpec(on_server=True, dedup=False),
    Kind.STATE: KindSpec(on_server=True, dedup=False),
}
UPLINK = tuple(k for k, s in KINDS.items() if s.on_client and s.uplink)
DOWNLINK = tuple(k for k, s in KINDS.items() if s.on_client and not s.uplink)
SERVER_KINDS = tuple(k for k, s in KINDS.items() if s.on_server)


# -------------------------------------------------------------------------------- topics
def check_id(value: str, what: str = "id") -> str:
    """Run and client ids become topic levels and usernames: no '/', '+', '#', no spaces."""
    if not isinstance(value, str) or not ID_RE.fullmatch(value):
        raise ValueError(f"{what} {value!r} must be 1-64 characters of A-Z a-z 0-9 _ . -")
    return value


def topic(run: str, kind: Kind | str, client: str = SERVER) -> str:
    """The topic of ``kind`` on ``client``'s channel (or the server's when ``client`` is SERVER).

    ``hsl/<run>/c/<cid>/<kind>``, ``hsl/<run>/s/<kind>``, and ``hsl/<run>/global`` for the
    aggregated factors every client reads.
    """
    kind = Kind(kind)
    spec = KINDS[kind]
    check_id(run, "run id")
    if client == SERVER:
        if not spec.on_server:
            raise ValueError(f"kind {kind} does not travel on the server channel")
        if kind is Kind.GLOBAL:
            return f"{TOPIC_ROOT}/{run}/global"
        return f"{TOPIC_ROOT}/{run}/s/{kind.value}"
    if not spec.on_client:
        raise ValueError(f"kind {kind} does not travel on a client channel")
    check_id(client, "client id")
    return f"{TOPIC_ROOT}/{run}/c/{client}/{kind.value}"


@dataclass(frozen=True)
class TopicInfo:
    """A parsed topic: run, channel (a client id or SERVER) and kind."""

    run: str
    client: str
    kind: Kind


def parse_topic(name: str) -> TopicInfo:
    """Inverse of :func:`topic`; anything else is ``bad-topic``."""
    parts = name.split("/") if isinstance(name, str) else []
    try:
        if len(parts) == 3 and parts[0] == TOPIC_ROOT and parts[2] == "global":
            info = TopicInfo(check_id(parts[1]), SERVER, Kind.GLOBAL)
        elif len(parts) == 4 and parts[0] == TOPIC_ROOT and parts[2] == "s":
            info = TopicInfo(check_id(parts[1]), SERVER, Kind(parts[3]))
        elif len(parts) == 5 and parts[0] == TOPIC_ROOT and parts[2] == "c":
            if parts[3] == SERVER:
                raise ValueError("reserved id")
            info = TopicInfo(check_id(parts[1]), check_id(parts[3]), Kind(parts[4]))
        else:
            raise ValueError("shape")
        if topic(info.run, info.kind, info.client) != name:
            raise ValueError("kind not on this channel")
    except ValueError:
        raise ProtocolError(Reason.BAD_TOPIC, f"{name!r} is not a protocol topic") from None
    return info


def subscriptions(run: str, who: str) -> list[str]:
    """Topic filters ``who`` (a client id or SERVER) subscribes to; the broker ACL matches."""
    if who == SERVER:
        return [f"{TOPIC_ROOT}/{run}/c/+/{k.value}" for k in UPLINK]
    return ([topic(run, k, who) for k in DOWNLINK]
            + [topic(run, Kind.GLOBAL), f"{TOPIC_ROOT}/{run}/s/#"])


def publications(run: str, who: str) -> list[str]:
    """Topics (or filters) ``who`` may publish on; used to write the broker ACL."""
    if who == SERVER:
        return ([f"{TOPIC_ROOT}/{run}/c/+/{k.value}" for k in DOWNLINK]
                + [topic(run, Kind.GLOBAL), f"{TOPIC_ROOT}/{run}/s/#"])
    return [topic(run, k, who) for k in UPLINK]


# ------------------------------------------------------------------------------ messages
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


ShapeHook = Callable[[Header], Mapping[str, Sequence[int | None]] | None]


@dataclass(frozen=True)
class Expect:
    """What a receiver accepts. Anything else is refused with a reason.

    ``clients``: allowed client ids (None: any well-formed id; a client's own receiver passes
    ``{its id}``); SERVER is always allowed on the server channel. ``kinds``: the kinds this
    receiver takes (None: all). ``hidden``: hidden size of the model at the cut; activations and
    gradients must end in it. ``shapes``: a hook that returns the exact expected tensors of a
    message, name -> shape with None as a wildcard (e.g. the server knows each client's
    adapter layout under its ARMSC ranks; a client knows the batch shape of the gradient it
    waits for), or None for "no further expectation".
    """

    run: str
    clients: frozenset[str] | None = None
    kinds: frozenset[Kind] | None = None
    hidden: int | None = None
    shapes: ShapeHook | None = None
    max_header: int = DEFAULT_MAX_HEADER
    max_message: int = DEFAULT_MAX_MESSAGE
    check_finite: bool = True


# ------------------------------------------------------------------------- safetensors
def _st_header(entries: Sequence[tuple[str, str, tuple[int, ...], int]]) -> bytes:
    """safetensors JSON header for (name, wire dtype, shape, nbytes), padded to 8 bytes."""
    header: dict[str, Any] = {}
    off = 0
    for name, wire, shape, n in entries:
        header[name] = {"dtype": _ST_CODE[wire], "shape": list(shape),
                        "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % ALIGN)


def parse_safetensors(buf: memoryview, expected: Mapping[str, TensorInfo] | None = None
                      ) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """Validate a safetensors blob; name -> (dtype name, shape, start, end) in ``buf``.

    Strict: the data region must be exactly the tensors laid end to end in header order of
    offsets, every dtype one of ours, every size consistent, and (when ``expected`` is given)
    names, wire dtypes and shapes equal to the manifest. Anything else is ``bad-payload``.
    """
    bad = Reason.BAD_PAYLOAD
    if len(buf) < 8:
        raise ProtocolError(bad, "safetensors blob shorter than its length prefix")
    (n,) = struct.unpack_from("<Q", buf, 0)
    if n > len(buf) - 8 or n > DEFAULT_MAX_HEADER * 16:
        raise ProtocolError(bad, f"safetensors header length {n} exceeds the blob")
    try:
        header = json.loads(bytes(buf[8:8 + n]), object_pairs_hook=_no_dup_pairs,
                            parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
        raise ProtocolError(bad, f"safetensors header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise ProtocolError(bad, "safetensors header is not an object")
    header.pop("__metadata__", None)
    base = 8 + n
    out: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    spans = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise ProtocolError(bad, f"safetensors entry {name!r} is malformed")
        dtype = _ST_NAME.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
        shape, offs = entry["shape"], entry["data_offsets"]
        if dtype is None:
            raise ProtocolError(bad, f"safetensors dtype {entry['dtype']!r} of {name!r}")
        if not _is_shape(shape) or not (isinstance(offs, list) and len(offs) == 2
                                        and all(_is_nat(o) for o in offs)):
            raise ProtocolError(bad, f"safetensors shape/offsets of {name!r} are malformed")
        start, end = offs
        if end - start != math.prod(shape) * _itemsize(dtype):
            raise ProtocolError(bad, f"safetensors size of {name!r} disagrees with its shape")
        spans.append((start, end))
        out[name] = (dtype, tuple(shape), base + start, base + end)
    pos = 0
    for start, end in sorted(spans):
        if start != pos:
            raise ProtocolError(bad, "safetensors data has gaps or overlaps")
        pos = end
    if base + pos != len(buf):
        raise ProtocolError(bad, f"safetensors data is {len(buf) - base} bytes, tensors {pos}")
    if expected is not None:
        if set(out) != set(expected):
            raise ProtocolError(bad, "safetensors tensors differ from the manifest")
        for name, info in expected.items():
            dtype, shape, _, _ = out[name]
            if dtype != info.wire or shape != info.shape:
                raise ProtocolError(bad, f"safetensors entry {name!r} differs from the manifest")
    return out


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t``, at reduction speed.

    ``isfinite(t).all()`` materialises a bool tensor and is ~50x slower than a sum on CPU.
    Any NaN/Inf element makes the float32 sum non-finite, so a finite sum proves the tensor
    finite; only a non-finite sum (NaN/Inf present, or an overflow of huge finite values)
    pays for the exact check.
    """
    if t.numel() == 0:
        return True
    if bool(torch.isfinite(t.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(t).all())


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


# -------------------------------------------------------------------------------- encode
def encode(msg: Message, *, wire: str | torch.dtype | None = None,
           chunk_size: int = DEFAULT_CHUNK) -> list[bytearray]:
    """Encode ``msg`` into one or more MQTT payloads (chunks), each a complete envelope.

    See :func:`encode_chunks` (the same chunks, made lazily) for ``wire`` and the checks.
    """
    return list(encode_chunks(msg, wire=wire, chunk_size=chunk_size))


def encode_chunks(msg: Message, *, wire: str | torch.dtype | None = None,
                  chunk_size: int = DEFAULT_CHUNK) -> _Chunks:
    """Encode ``msg`` lazily: the checks, layout and checksums now; each chunk on iteration.

    The result has a ``len`` (the chunk count) and yields the same envelopes :func:`encode`
    returns, so a sender can publish chunk i while chunk i + 1 is being copied. The tensors
    must not change until the iteration is done.

    ``wire``: "float16"/"bfloat16" (or the torch dtype) casts float32 tensors on the wire
    (halves the bytes); the manifest records both dtypes and the receiver casts back. Integer
    tensors and tensors already 16-bit are sent as they are. A cast that overflows (float16
    tops out at 65504) is refused here rather than arriving as Inf and being refused there.

    The message is validated against its kind's rules first (the receiver's rules without the
    receiver's expectations), so a sender bug fails at the sender with the same reason.
    """
    if isinstance(wire, torch.dtype):
        wire = dtype_name(wire)
    if wire is not None and wire not in WIRE_DTYPES:
        raise ValueError(f"wire dtype must be one of {sorted(WIRE_DTYPES)}, not {wire!r}")
    if not (isinstance(chunk_size, int) and 0 < chunk_size <= MAX_CHUNK):
        raise ValueError(f"chunk_size must be in 1..{MAX_CHUNK}, not {chunk_size!r}")
    kind = Kind(msg.kind)
    check_id(msg.run, "run id")
    if msg.client != SERVER:
        check_id(msg.client, "client id")
    entries: list[tuple[str, str, tuple[int, ...], int]] = []
    data: dict[str, torch.Tensor] = {}
    manifest: dict[str, dict[str, Any]] = {}
    for name, t in msg.tensors.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise TypeError(f"tensors must map str -> torch.Tensor, got {name!r}: {type(t)}")
        own = dtype_name(t.dtype)
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        w = wire if (wire is not None and own == "float32") else own
        if w != own:
            t = t.to(DTYPES[w][0])
            if not all_finite(t):
                raise ProtocolError(Reason.NON_FINITE,
                                    f"{name} is not finite as {w} (overflow? try bfloat16)")
        data[name] = t.contiguous()
        shape = tuple(int(d) for d in t.shape)
        entry: dict[str, Any] = {"dtype": own, "shape": list(shape)}
        if w != own:
            entry["wire"] = w
        manifest[name] = entry
        entries.append((name, w, shape, t.numel() * t.element_size()))
    # Larger items first keeps every tensor aligned to its item size (as safetensors does).
    entries.sort(key=lambda e: (-_itemsize(e[1]), e[0]))
    if entries:
        st_head = _st_header(entries)
        size = 8 + len(st_head) + sum(e[3] for e in entries)
    else:
        st_head, size = b"", 0
    head = {"run": msg.run, "client": msg.client, "kind": kind.value, "step": msg.step,
            "seq": msg.seq, "time": time.time() if msg.sent_at is None else msg.sent_at,
            "meta": msg.meta, "tensors": manifest, "size": size}
    count = max(1, -(-size // chunk_size))
    # Check the message with the receiver's own rules (no expectations): same reasons.
    _validate_header(_CRC_PLACEHOLDER | head | {"chunk": [0, count], "csize": chunk_size},
                     Expect(run=msg.run, max_message=max(size, 1)))
    base = _CRC_PLACEHOLDER | head
    _header_bytes(base | {"chunk": [count - 1, count], "csize": chunk_size})  # the longest one
    segments = _blob_segments(st_head, entries, data)
    # One CRC pass over the source bytes first (each chunk's CRC, combined into the whole
    # payload's), so that every chunk's header is final when it is built: chunks can then be
    # made one at a time and the first one published while the next is being copied.
    piece_crcs = [_segments_crc(segments, i * chunk_size, min(size, (i + 1) * chunk_size))
                  for i in range(count)]
    total_crc = piece_crcs[0]
    for i in range(1, count):
        total_crc = crc32_combine(total_crc, piece_crcs[i],
                                  min(size, (i + 1) * chunk_size) - i * chunk_size)
    return _Chunks(_make_chunks(base, segments, piece_crcs, b"%08x" % total_crc, size,
                                chunk_size), count)


class _Chunks:
    """The envelopes of one message, made one at a time on iteration (``len`` is known)."""

    __slots__ = ("_it", "count")

    def __init__(self, it: Iterator[bytearray], count: int):
        self._it, self.count = it, count

    def __iter__(self) -> Iterator[bytearray]:
        return self._it

    def __len__(self) -> int:
        return self.count


def _make_chunks(base: dict[str, Any], segments: Sequence[memoryview], piece_crcs: list[int],
                 digits: bytes, size: int, chunk_size: int) -> Iterator[bytearray]:
    # Each chunk's envelope is allocated once and the tensors' bytes copied straight into it
    # (one copy per byte); the checksums are patched in at fixed offsets.
    count = len(piece_crcs)
    for i in range(count):
        lo, hi = i * chunk_size, min(size, (i + 1) * chunk_size)
        raw = _header_bytes(base | {"chunk": [i, count], "csize": chunk_size})
        start = PREFIX.size + len(raw)
        out = bytearray(start + hi - lo)
        PREFIX.pack_into(out, 0, MAGIC, VERSION, len(raw))
        out[PREFIX.size:start] = raw
        _copy_range(segments, lo, memoryview(out)[start:])
        out[PREFIX.size + _CRC_AT:PREFIX.size + _CRC_AT + 8] = digits
        _seal(out, start, piece_crcs[i])
        yield out


def _segments_crc(segments: Sequence[memoryview], start: int, end: int) -> int:
    """CRC-32 of blob bytes [start, end) of ``segments``, read in place."""
    crc, pos = 0, 0
    for seg in segments:
        seg_end = pos + len(seg)
        if seg_end > start and pos < end:
            crc = _crc32(seg[max(start, pos) - pos:min(end, seg_end) - pos], crc)
        pos = seg_end
    return crc


def _blob_segments(st_head: bytes, entries: Sequence[tuple[str, str, tuple, int]],
                   data: Mapping[str, torch.Tensor]) -> list[memoryview]:
    """The safetensors blob as consecutive byte views (length, header, each tensor's bytes)."""
    if not entries:
        return []
    segs = [memoryview(struct.pack("<Q", len(st_head))), memoryview(st_head)]
    for name, _, _, n in entries:
        if n:
            segs.append(memoryview(data[name].reshape(-1).view(torch.uint8).numpy()))
    return segs


def _multmodp(a: int, b: int) -> int:
    """a * b modulo the CRC-32 polynomial (reflected), as zlib's crc32_combine does it."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if not a & (m - 1):
                return p
        m >>= 1
        b = (b >> 1) ^ 0xEDB88320 if b & 1 else b >> 1


_X2N = [1 << 30]  # x^(2^k) mod P, k = 0..31
for _ in range(31):
    _X2N.append(_multmodp(_X2N[-1], _X2N[-1]))


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of A + B from crc(A), crc(B) and len(B) (zlib's crc32_combine, which Python's
    zlib does not expose): the whole-payload CRC of a chunked message without a second pass
    over its bytes, on either side."""
    p, n, k = 1 << 31, len2, 3  # x^0; len2 bytes = x^(8 len2) = x^(2^3 len2)
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return _multmodp(p, crc1) ^ crc2


def _copy_range(segments: Sequence[memoryview], start: int, dst: memoryview) -> None:
    """Copy blob bytes [start, start + len(dst)) from ``segments`` into ``dst``."""
    pos, filled = 0, 0
    for seg in segments:
        end = pos + len(seg)
        if end > start and filled < len(dst):
            lo = max(start, pos) - pos
            n = min(len(seg) - lo, len(dst) - filled)
            dst[filled:filled + n] = seg[lo:lo + n]
            filled += n
        pos = end


# The two checksums lead every header at fixed offsets, so they can be computed after the
# rest is written and patched in place: ``{"ccrc":"xxxxxxxx","crc":"xxxxxxxx",...``.
# crc  = CRC32 of the whole (reassembled) payload;
# ccrc = CRC32 of this MQTT payload: its chunk bytes, then prefix + header with the ccrc digits
#        as "00000000". It covers the header too, so any bit flip anywhere is caught, and it
#        is computed from the chunk's own CRC (zlib.crc32's running value) in one pass.
_CRC_PLACEHOLDER = {"ccrc": "00000000", "crc": "00000000"}
_CCRC_AT, _CRC_AT = 9, 26
_HEAD_RE = re.compile(rb'\{"ccrc":"[0-9a-f]{8}","crc":"[0-9a-f]{8}"[,}]')


def _seal(out: bytearray, start: int, piece_crc: int) -> None:
    """Compute and patch in the envelope checksum (ccrc) of a finished envelope."""
    at = PREFIX.size + _CCRC_AT
    out[at:at + 8] = b"00000000"
    out[at:at + 8] = b"%08x" % _crc32(memoryview(out)[:start], piece_crc)


def _header_bytes(head: Mapping[str, Any]) -> bytes:
    try:
        raw = json.dumps(head, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise ProtocolError(Reason.BAD_META, f"header is not JSON-serialisable ({e})") from None
    raw += b" " * (-(PREFIX.size + len(raw)) % ALIGN)
    if len(raw) > DEFAULT_MAX_HEADER:  # receivers refuse it by default: fail at the sender
        raise ProtocolError(Reason.HEADER_TOO_LARGE, f"header of {len(raw)} bytes (meta or "
                                                     f"manifest too large)")
    return raw


# -------------------------------------------------------------------------------- decode
_REQUIRED = frozenset({"ccrc", "crc", "run", "client", "kind", "step", "seq", "tensors",
                       "size", "chunk", "csize"})
_OPTIONAL = frozenset({"time", "meta"})
_HEX8 = re.compile(r"[0-9a-f]{8}")
_MAX_INT = (1 << 63) - 1
_MAX_NAME = 512


def _fail(reason: Reason, detail: str) -> ProtocolError:
    return ProtocolError(reason, detail)


def _validate_header(obj: Any, expect: Expect, where: TopicInfo | None = None) -> Header:
    """Check a parsed header field by field, in a fixed order, so each message gets exactly one
    reason (the first rule it breaks) and a test can name it."""
    if not isinstance(obj, dict):
        raise _fail(Reason.BAD_HEADER, "header is not a JSON object")
    missing = sorted(_REQUIRED - obj.keys())
    if missing:
        raise _fail(Reason.MISSING_FIELD, f"header lacks {', '.join(missing)}")
    unknown = sorted(obj.keys() - _REQUIRED - _OPTIONAL)
    if unknown:
        raise _fail(Reason.UNKNOWN_FIELD, f"header has unknown field(s) {', '.join(unknown)}")
    run, client, kind_s = obj["run"], obj["client"], obj["kind"]
    for name, value in (("run", run), ("client", client), ("kind", kind_s)):
        if not isinstance(value, str):
            raise _fail(Reason.BAD_FIELD, f"{name} must be a string, not {type(value).__name__}")
    if run != expect.run:
        raise _fail(Reason.WRONG_RUN, f"run {run[:80]!r} is not {expect.run!r}")
    try:
        kind = Kind(kind_s)
    except ValueError:
        raise _fail(Reason.UNKNOWN_KIND, f"kind {kind_s[:80]!r}") from None
    if expect.kinds is not None and kind not in expect.kinds:
        raise _fail(Reason.UNEXPECTED_KIND, f"this receiver does not take {kind} messages")
    spec = KINDS[kind]
    if client == SERVER:
        if not spec.on_server:
            raise _fail(Reason.UNEXPECTED_KIND, f"{kind} does not travel on the server channel")
    else:
        if not ID_RE.fullmatch(client) or (expect.clients is not None
                                           and client not in expect.clients):
            raise _fail(Reason.UNKNOWN_CLIENT, f"client {client[:80]!r}")
        if not spec.on_client:
            raise _fail(Reason.UNEXPECTED_KIND, f"{kind} does not travel on a client channel")
    step, seq = obj["step"], obj["seq"]
    if not (_is_nat(step) and step <= _MAX_INT):
        raise _fail(Reason.BAD_STEP, f"step {step!r} is not a non-negative int")
    if not (_is_nat(seq) and seq <= _MAX_INT):
        raise _fail(Reason.BAD_SEQ, f"seq {seq!r} is not a non-negative int")
    sent_at = obj.get("time")
    if sent_at is not None and not (type(sent_at) in (int, float) and math.isfinite(sent_at)):
        raise _fail(Reason.BAD_FIELD, "time must be a finite number")
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        raise _fail(Reason.BAD_META, "meta must be a JSON object")
    if kind is Kind.STATE and meta.get("state") not in STATES:
        raise _fail(Reason.BAD_META, f"state message needs meta.state in {sorted(STATES)}")
    size = obj["size"]
    if not _is_nat(size):
        raise _fail(Reason.BAD_FIELD, f"size {size!r} is not a non-negative int")
    if size > expect.max_message:
        raise _fail(Reason.MESSAGE_TOO_LARGE, f"payload of {size} bytes > {expect.max_message}")
    crc, ccrc = obj["crc"], obj["ccrc"]
    if not (isinstance(crc, str) and _HEX8.fullmatch(crc) and isinstance(ccrc, str)
            and _HEX8.fullmatch(ccrc)):
        raise _fail(Reason.BAD_FIELD, "crc and ccrc must be 8 lowercase hex digits")
    chunk, csize = obj["chunk"], obj["csize"]
    if not (isinstance(chunk, list) and len(chunk) == 2 and all(_is_nat(c) for c in chunk)
            and 0 <= chunk[0] < chunk[1]):
        raise _fail(Reason.BAD_CHUNK, f"chunk {str(chunk)[:80]} is not [index < count]")
    if not (_is_nat(csize) and 0 < csize <= MAX_CHUNK):
        raise _fail(Reason.BAD_CHUNK, f"chunk size {csize!r} is not in 1..{MAX_CHUNK}")
    if chunk[1] != max(1, -(-size // csize)):
        raise _fail(Reason.BAD_CHUNK, f"{chunk[1]} chunks cannot hold {size} bytes by {csize}")
    tensors = _validate_manifest(obj["tensors"], size)
    header = Header(run=run, client=client, kind=kind, step=step, seq=seq, tensors=tensors,
                    meta=meta, sent_at=None if sent_at is None else float(sent_at), size=size,
                    crc=int(crc, 16), index=chunk[0], count=chunk[1], csize=csize,
                    ccrc=int(ccrc, 16), raw=obj)
    _check_kind(header, spec, expect)
    if where is not None and (where.run, where.client, where.kind) != (run, client, kind):
        raise _fail(Reason.TOPIC_MISMATCH,
                    f"header says {run}/{client}/{kind}, topic {where.run}/{where.client}/"
                    f"{where.kind}")
    return header


def _validate_manifest(obj: Any, size: int) -> dict[str, TensorInfo]:
    if not isinstance(obj, dict) or len(obj) > MAX_TENSORS:
        raise _fail(Reason.BAD_MANIFEST, "tensors must be an object of at most "
                                         f"{MAX_TENSORS} entries")
    out: dict[str, TensorInfo] = {}
    total = 0
    for name, entry in obj.items():
        if not name or len(name) > _MAX_NAME or name == "__metadata__":
            raise _fail(Reason.BAD_MANIFEST, f"tensor name {name[:80]!r}")
        if not (isinstance(entry, dict) and {"dtype", "shape"} <= entry.keys()
                and entry.keys() <= {"dtype", "shape", "wire"}):
            raise _fail(Reason.BAD_MANIFEST, f"entry of {name!r} must be {{dtype, shape[, wire]}}")
        dtype, shape = entry["dtype"], entry["shape"]
        wire = entry.get("wire", dtype)
        if not (isinstance(dtype, str) and dtype in DTYPES):
            raise _fail(Reason.BAD_DTYPE, f"{name}: dtype {str(dtype)[:40]!r} is not supported")
        if wire != dtype and not (dtype == "float32" and isinstance(wire, str)
                                  and wire in WIRE_DTYPES):
            raise _fail(Reason.BAD_DTYPE, f"{name}: {dtype} cannot travel as {str(wire)[:40]!r}")
        if not _is_shape(shape):
            raise _fail(Reason.BAD_MANIFEST, f"{name}: shape {str(shape)[:80]} is not a list of "
                                             f"at most {MAX_DIMS} non-negative ints")
        info = TensorInfo(dtype, wire, tuple(shape))
        total += info.nbytes
        if total > size:
            raise _fail(Reason.BAD_MANIFEST, f"tensors need more than the {size} payload bytes")
        out[name] = info
    if (not out and size != 0) or (out and not 8 + total <= size <= total + 8 + 16 * MIB):
        raise _fail(Reason.BAD_MANIFEST, f"payload size {size} disagrees with the tensors "
                                         f"({total} bytes)")
    return out


def _check_kind(h: Header, spec: KindSpec, expect: Expect) -> None:
    """Per-kind tensor rules: names, dtypes, and the shape relations of the split step."""
    names = set(h.tensors)
    if spec.fixed is not None:
        _same_names(h, names, spec.fixed.keys())
        for name, allowed in spec.fixed.items():
            if h.tensors[name].dtype not in allowed:
                raise _fail(Reason.BAD_DTYPE, f"{h.kind}.{name} must be one of "
                                              f"{sorted(allowed)}, not {h.tensors[name].dtype}")
    else:
        if names and not spec.free:
            raise _fail(Reason.UNEXPECTED_TENSOR, f"{h.kind} carries no tensors")
        for name, info in h.tensors.items():
            if info.dtype not in spec.free:
                raise _fail(Reason.BAD_DTYPE, f"{h.kind}.{name[:80]}: {info.dtype} is not one "
                                              f"of {sorted(spec.free)}")
    if h.kind is Kind.ACT:
        acts, mask, labels = (h.tensors[n].shape for n in (ACTS, MASK, LABELS))
        if len(acts) != 3 or acts[0] < 1 or acts[1] < 1:
            raise _fail(Reason.SHAPE_MISMATCH, f"acts must be [batch, seq, hidden], not {acts}")
        if mask != acts[:2] or labels != acts[:2]:
            raise _fail(Reason.SHAPE_MISMATCH, f"mask {mask} and labels {labels} must be "
                                               f"[batch, seq] = {acts[:2]}")
    if h.kind is Kind.GRAD:
        grad = h.tensors[GRAD].shape
        if len(grad) != 3 or grad[0] < 1 or grad[1] < 1:
            raise _fail(Reason.SHAPE_MISMATCH, f"grad must be [batch, seq, hidden], not {grad}")
    if expect.hidden is not None and h.kind in (Kind.ACT, Kind.GRAD):
        got = h.tensors[ACTS if h.kind is Kind.ACT else GRAD].shape[2]
        if got != expect.hidden:
            raise _fail(Reason.SHAPE_MISMATCH, f"hidden size {got}, expected {expect.hidden}")
    want = expect.shapes(h) if expect.shapes is not None else None
    if want is not None:
        _same_names(h, names, want.keys())
        for name, shape in want.items():
            got = h.tensors[name].shape
            if len(got) != len(shape) or any(w is not None and w != g
                                             for w, g in zip(shape, got, strict=True)):
                raise _fail(Reason.SHAPE_MISMATCH, f"{h.kind}.{name}: shape {list(got)}, "
                                                   f"expected {list(shape)}")


def _same_names(h: Header, names: set[str], want: Iterable[str]) -> None:
    missing, extra = sorted(set(want) - names), sorted(names - set(want))
    if missing:
        raise _fail(Reason.MISSING_TENSOR, f"{h.kind} from {h.client} lacks {missing[0]!r}")
    if extra:
        raise _fail(Reason.UNEXPECTED_TENSOR, f"{h.kind} from {h.client} has {extra[0][:80]!r}")


class Envelope(NamedTuple):
    """One checked MQTT payload: its header, a view of its chunk bytes, their CRC-32."""

    header: Header
    piece: memoryview
    piece_crc: int


def read_envelope(data: bytes | bytearray | memoryview, expect: Expect,
                  topic_name: str | None = None) -> Envelope:
    """Check one MQTT payload up to its chunk bytes: framing, header, lengths, checksums.

    The tensors are not looked at yet (that needs the whole payload, see :class:`Receiver`).
    """
    where = parse_topic(topic_name) if topic_name is not None else None
    mv = memoryview(data)
    if mv.ndim != 1 or mv.itemsize != 1:
        mv = mv.cast("B")
    if len(mv) < PREFIX.size:
        raise _fail(Reason.TOO_SHORT, f"{len(mv)} bytes is shorter than the envelope prefix")
    magic, version, hlen = PREFIX.unpack_from(mv)
    if magic != MAGIC:
        raise _fail(Reason.BAD_MAGIC, f"magic {bytes(magic)!r} is not {MAGIC!r}")
    if version != VERSION:
        raise _fail(Reason.BAD_VERSION, f"version {version}; this receiver speaks {VERSION}")
    if hlen > expect.max_header:
        raise _fail(Reason.HEADER_TOO_LARGE, f"header of {hlen} bytes > {expect.max_header}")
    if hlen > len(mv) - PREFIX.size:
        raise _fail(Reason.TRUNCATED_HEADER, f"header of {hlen} bytes, "
                                             f"{len(mv) - PREFIX.size} left")
    try:
        obj = json.loads(bytes(mv[PREFIX.size:PREFIX.size + hlen]).decode("utf-8"),
                         object_pairs_hook=_no_dup_pairs, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _fail(Reason.BAD_HEADER, f"header is not UTF-8 JSON ({str(e)[:120]})") from None
    if not _HEAD_RE.match(mv[PREFIX.size:PREFIX.size + 36].tobytes()):
        raise _fail(Reason.BAD_HEADER, 'header must begin {"ccrc":"<8 hex>","crc":"<8 hex>"')
    header = _validate_header(obj, expect, where)
    start = PREFIX.size + hlen
    piece = mv[start:]
    want = header.chunk_len
    if len(piece) < want:
        raise _fail(Reason.TRUNCATED_PAYLOAD, f"chunk has {len(piece)} of {want} bytes")
    if len(piece) > want:
        raise _fail(Reason.OVERSIZED_PAYLOAD, f"chunk has {len(piece)} bytes, header says {want}")
    piece_crc = _crc32(piece)
    head = bytearray(mv[:start])
    head[PREFIX.size + _CCRC_AT:PREFIX.size + _CCRC_AT + 8] = b"00000000"
    if _crc32(head, piece_crc) != header.ccrc:
        raise _fail(Reason.CHECKSUM, f"envelope CRC32 mismatch (chunk {header.index})")
    if header.count == 1 and header.crc != piece_crc:
        raise _fail(Reason.CHECKSUM, "payload CRC32 mismatch")
    return Envelope(header, piece, piece_crc)


def _build_message(h: Header, payload: memoryview, expect: Expect, nbytes: int) -> Message:
    """Tensors from a complete, CRC-checked payload; views into it where dtypes allow."""
    tensors: dict[str, torch.Tensor] = {}
    if h.size:
        if payload.readonly:  # immutable bytes: copy once so tensors own writable memory
            payload = memoryview(bytearray(payload))
        layout = parse_safetensors(payload, h.tensors)
        for name, info in h.tensors.items():
            _, shape, start, end = layout[name]
            wire_dt = DTYPES[info.wire][0]
            if start == end:
                t = torch.empty(shape, dtype=wire_dt)
            else:
                t = torch.frombuffer(payload, dtype=wire_dt, count=math.prod(shape),
                                     offset=start).view(shape)
            if info.wire != info.dtype:
                t = t.to(DTYPES[info.dtype][0])
            if expect.check_finite and info.dtype in FLOATS and not all_finite(t):
                raise _fail(Reason.NON_FINITE, f"{h.kind}.{name} has NaN or Inf")
            tensors[name] = t
    return Message(run=h.run, client=h.client, kind=h.kind, step=h.step, seq=h.seq,
                   tensors=tensors, meta=h.meta, sent_at=h.sent_at, nbytes=nbytes)


def _guard(fn: Callable[[], Message | None]) -> Message | None:
    """Run a decoding step; any exception that is not a ProtocolError becomes ``malformed``."""
    try:
        return fn()
    except ProtocolError:
        raise
    except Exception as e:  # noqa: BLE001 - the point: garbage must never crash a receiver
        raise ProtocolError(Reason.MALFORMED, f"{type(e).__name__}: {str(e)[:200]}") from e


def decode(data: bytes | bytearray | memoryview, expect: Expect,
           topic_name: str | None = None) -> Message:
    """Decode a single-chunk message (stateless). Chunked messages need a :class:`Receiver`.

    With a writable buffer (paho hands over a ``bytearray``) the tensors are views into it:
    zero copies unless a wire cast or the dtype forces one.
    """
    def run() -> Message:
        header, piece, _ = read_envelope(data, expect, topic_name)
        if header.count != 1:
            raise _fail(Reason.BAD_CHUNK, "a chunked message needs a Receiver to reassemble it")
        return _build_message(header, piece, expect, len(memoryview(data).cast("B")))
    msg = _guard(run)
    assert msg is not None
    return msg


# --------------------------------------------------------------------------- reassembly
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


def encoded_size(chunks: Iterable[bytes | bytearray]) -> int:
    """Total wire bytes of an encoded message."""
    return sum(len(c) for c in chunks)

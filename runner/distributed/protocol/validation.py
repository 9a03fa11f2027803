"""What a receiver accepts (:class:`Expect`) and the checks of one MQTT payload up to its bytes.

The strict half of decoding: framing, header fields in a fixed order (so each refused
message gets exactly one reason, the first rule it breaks), the tensor manifest, the
per-kind tensor rules, the lengths and both checksums, all before a tensor is built. The
encoder runs the same header rules on what it is about to send (without the receiver's
expectations), so a sender bug fails at the sender with the reason a receiver would give.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from runner.distributed.protocol.crc import _crc32
from runner.distributed.protocol.dtypes import DTYPES, WIRE_DTYPES
from runner.distributed.protocol.envelope import (
    _CCRC_AT,
    _HEAD_RE,
    DEFAULT_MAX_HEADER,
    DEFAULT_MAX_MESSAGE,
    MAGIC,
    MAX_CHUNK,
    MAX_DIMS,
    MAX_TENSORS,
    MIB,
    PREFIX,
    VERSION,
    Header,
    TensorInfo,
    _is_nat,
    _is_shape,
    _no_constant,
    _no_dup_pairs,
)
from runner.distributed.protocol.errors import Reason, _fail
from runner.distributed.protocol.kinds import (
    ACTS,
    GRAD,
    KINDS,
    LABELS,
    MASK,
    STATES,
    Kind,
    KindSpec,
)
from runner.distributed.protocol.topics import ID_RE, SERVER, TopicInfo, parse_topic

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


_REQUIRED = frozenset({"ccrc", "crc", "run", "client", "kind", "step", "seq", "tensors",
                       "size", "chunk", "csize"})
_OPTIONAL = frozenset({"time", "meta"})
_HEX8 = re.compile(r"[0-9a-f]{8}")
_MAX_INT = (1 << 63) - 1
_MAX_NAME = 512


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

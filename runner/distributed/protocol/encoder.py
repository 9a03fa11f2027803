"""The sender's side: a :class:`Message` to its envelopes (:func:`encode`, :func:`encode_chunks`).

Checks the message with the receiver's own rules first, lays the tensors out as a
safetensors blob, computes every chunk's CRC (and the whole payload's, combined) in one pass
over the source bytes, then hands the chunks to :mod:`.chunking` to be made on demand.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch

from runner.distributed.protocol.blob import _st_header
from runner.distributed.protocol.chunking import (
    _blob_segments,
    _Chunks,
    _make_chunks,
    _segments_crc,
)
from runner.distributed.protocol.crc import crc32_combine
from runner.distributed.protocol.dtypes import (
    DTYPES,
    WIRE_DTYPES,
    _itemsize,
    all_finite,
    dtype_name,
)
from runner.distributed.protocol.envelope import (
    _CRC_PLACEHOLDER,
    DEFAULT_CHUNK,
    MAX_CHUNK,
    Message,
    _header_bytes,
)
from runner.distributed.protocol.errors import ProtocolError, Reason
from runner.distributed.protocol.kinds import Kind
from runner.distributed.protocol.topics import SERVER, check_id
from runner.distributed.protocol.validation import Expect, _validate_header


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


def encoded_size(chunks: Iterable[bytes | bytearray]) -> int:
    """Total wire bytes of an encoded message."""
    return sum(len(c) for c in chunks)

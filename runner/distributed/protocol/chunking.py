"""Building a message's envelopes chunk by chunk, straight from the tensors' bytes.

The payload is never assembled in one buffer: it is a list of byte views (the safetensors
length and header, then each tensor's bytes), each chunk's envelope is allocated once and
its slice of the views copied straight into it (one copy per byte), and the checksums are
patched in at the fixed offsets the header reserves. Made lazily (:class:`_Chunks`), so a
sender can publish chunk i while chunk i + 1 is being copied.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from runner.distributed.protocol.crc import _crc32
from runner.distributed.protocol.envelope import (
    _CCRC_AT,
    _CRC_AT,
    MAGIC,
    PREFIX,
    VERSION,
    _header_bytes,
)


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


def _seal(out: bytearray, start: int, piece_crc: int) -> None:
    """Compute and patch in the envelope checksum (ccrc) of a finished envelope."""
    at = PREFIX.size + _CCRC_AT
    out[at:at + 8] = b"00000000"
    out[at:at + 8] = b"%08x" % _crc32(memoryview(out)[:start], piece_crc)

"""The payload: a safetensors blob of the message's tensors, written and read strictly.

The safetensors blob is written and read here rather than through ``safetensors.torch``
because ``save`` returns a fresh ``bytes`` (one more copy before the envelope is prepended)
and ``load`` copies every tensor out of the buffer; copying the tensors straight into the
envelope and viewing them with ``torch.frombuffer`` on arrival keeps the hot path at one copy
on each side. The bytes are plain safetensors either way (tests/test_protocol.py loads ours
with ``safetensors.torch.load`` and parses theirs with :func:`parse_safetensors`).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from typing import Any

from runner.distributed.protocol.dtypes import _ST_CODE, _ST_NAME, _itemsize
from runner.distributed.protocol.envelope import (
    ALIGN,
    DEFAULT_MAX_HEADER,
    TensorInfo,
    _is_nat,
    _is_shape,
    _no_constant,
    _no_dup_pairs,
)
from runner.distributed.protocol.errors import ProtocolError, Reason


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

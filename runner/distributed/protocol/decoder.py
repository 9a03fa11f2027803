"""Tensors from a checked payload, and the stateless decoder of single-chunk messages.

After :mod:`.validation` has accepted the envelope, :func:`_build_message` reads the
safetensors blob and views the tensors in place where the dtypes allow (casting back from a
16-bit wire dtype, refusing NaN/Inf). :func:`_guard` is the promise that nothing but a
:class:`ProtocolError` leaves the decoder: any other exception on garbage input becomes
``malformed``. The :class:`~runner.distributed.protocol.receiver.Receiver` builds on both.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from runner.distributed.protocol.blob import parse_safetensors
from runner.distributed.protocol.dtypes import DTYPES, FLOATS, all_finite
from runner.distributed.protocol.envelope import Header, Message
from runner.distributed.protocol.errors import ProtocolError, Reason, _fail
from runner.distributed.protocol.validation import Expect, read_envelope


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

"""Why a message is refused: :class:`ProtocolError` and its :class:`Reason`.

The lowest layer of the protocol package, imported by every other part, so that each rule
anywhere in the protocol fails the same way. Every failure of decoding raises
:class:`ProtocolError` with a :class:`Reason`; no other exception escapes
:meth:`~runner.distributed.protocol.receiver.Receiver.feed` or
:func:`~runner.distributed.protocol.decoder.decode`, whatever the bytes are. The reasons are
stable strings, so logs, metrics and tests can name the rule a message broke.
"""

from __future__ import annotations

from enum import StrEnum


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


def _fail(reason: Reason, detail: str) -> ProtocolError:
    return ProtocolError(reason, detail)

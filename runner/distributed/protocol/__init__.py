"""The wire protocol of the distributed runtime: topics, message envelope, strict decoding.

Everything a server and its clients exchange over MQTT goes through this package, so that one
place decides what a valid message is. docs/protocol.md is the specification; keep the two in
step.

One concern per module (issue 30 part 3): the protocol used to be one 1,100-line module in
which topics, the envelope, chunking, checksums, validation and reassembly were interleaved;
split, each rule has one home, and a module only imports the ones listed before it (no
cycles):

* :mod:`.errors`: :class:`ProtocolError` and :class:`Reason`, how every refusal is raised;
* :mod:`.crc`: the CRC-32 (ISA-L or zlib, :data:`CRC32_IMPL`) and :func:`crc32_combine`;
* :mod:`.dtypes`: the dtypes allowed on the wire (:data:`DTYPES`, :data:`FLOATS`), the
  finiteness check :func:`all_finite`;
* :mod:`.kinds`: message kinds (:class:`Kind`), the per-kind rules table (``KINDS``) and the
  fixed tensor names (:data:`ACTS`, :data:`MASK`, :data:`LABELS`, :data:`GRAD`);
* :mod:`.topics`: ids and the topic scheme (:data:`SERVER`, :data:`TOPIC_ROOT`,
  :func:`check_id`, :func:`topic`, :func:`parse_topic`, :func:`subscriptions`,
  :func:`publications`), what the broker's ACL follows;
* :mod:`.envelope`: the framing (:data:`MAGIC`, :data:`VERSION`, :data:`PREFIX`), size limits
  (:data:`DEFAULT_CHUNK`, :data:`MAX_CHUNK`), the checksum layout of the header, and the
  types a message travels as (:class:`Message`, :class:`Header`);
* :mod:`.blob`: the safetensors payload, written and read strictly
  (:func:`parse_safetensors`);
* :mod:`.validation`: what a receiver accepts (:class:`Expect`) and the checks of one MQTT
  payload up to its bytes (``read_envelope``);
* :mod:`.chunking`: a message's envelopes made chunk by chunk from the tensors' bytes;
* :mod:`.encoder`: :func:`encode` / :func:`encode_chunks`, the sender's side;
* :mod:`.decoder`: tensors from a checked payload, :func:`decode` (single-chunk, stateless);
* :mod:`.receiver`: :class:`Receiver`, reassembly with deduplication, expiry and a memory
  bound.

Every failure of decoding raises :class:`ProtocolError` with a :class:`Reason`; no other
exception escapes :meth:`Receiver.feed` or :func:`decode`, whatever the bytes are.

This package re-exports what the rest of the project uses; anything else is imported from
its submodule.
"""

from runner.distributed.protocol.blob import parse_safetensors
from runner.distributed.protocol.crc import CRC32_IMPL, crc32_combine
from runner.distributed.protocol.decoder import decode
from runner.distributed.protocol.dtypes import DTYPES, FLOATS, all_finite
from runner.distributed.protocol.encoder import encode, encode_chunks
from runner.distributed.protocol.envelope import (
    DEFAULT_CHUNK,
    MAGIC,
    MAX_CHUNK,
    PREFIX,
    VERSION,
    Header,
    Message,
)
from runner.distributed.protocol.errors import ProtocolError, Reason
from runner.distributed.protocol.kinds import ACTS, GRAD, LABELS, MASK, Kind
from runner.distributed.protocol.receiver import Receiver
from runner.distributed.protocol.topics import (
    SERVER,
    TOPIC_ROOT,
    check_id,
    parse_topic,
    publications,
    subscriptions,
    topic,
)
from runner.distributed.protocol.validation import Expect

__all__ = [
    "ACTS", "CRC32_IMPL", "DEFAULT_CHUNK", "DTYPES", "FLOATS", "GRAD", "LABELS", "MAGIC",
    "MASK", "MAX_CHUNK", "PREFIX", "SERVER", "TOPIC_ROOT", "VERSION",
    "Expect", "Header", "Kind", "Message", "ProtocolError", "Reason", "Receiver",
    "all_finite", "check_id", "crc32_combine", "decode", "encode", "encode_chunks",
    "parse_safetensors", "parse_topic", "publications", "subscriptions", "topic",
]

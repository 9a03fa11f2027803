"""The wire protocol (runner/distributed/protocol/, docs/protocol.md): topics, envelope, strict
decoding.

No broker here: these tests feed bytes to the encoder and decoder directly. The envelope is
rebuilt by ``forge`` below from the layout docs/protocol.md specifies (prefix, checksums
first, JSON header, payload), independently of the encoder, so a change to the format that
the document does not describe fails here.
"""

from __future__ import annotations

import ctypes
import json
import math
import random
import struct
import zlib
from collections.abc import Callable
from typing import Any

import pytest
import safetensors.torch
import torch

from runner.distributed import protocol as P
from runner.distributed.protocol import Expect, Kind, Message, ProtocolError, Reason

RUN = "r1"
HIDDEN = 8
EXPECT = Expect(run=RUN, clients=frozenset({"c0", "c1"}), hidden=HIDDEN)


# ------------------------------------------------------------------------------ helpers
def act_msg(b: int = 2, s: int = 5, step: int = 3, seq: int = 7, client: str = "c0",
            **meta: Any) -> Message:
    g = torch.Generator().manual_seed(step * 1000 + seq)
    return Message(run=RUN, client=client, kind=Kind.ACT, step=step, seq=seq, meta=dict(meta),
                   tensors={P.ACTS: torch.randn(b, s, HIDDEN, generator=g),
                            P.MASK: torch.ones(b, s, dtype=torch.int64),
                            P.LABELS: torch.randint(0, 1000, (b, s), generator=g)})


def messages() -> dict[str, Message]:
    """One valid message of every kind (and both channels where a kind has two)."""
    g = torch.Generator().manual_seed(0)
    adapter = {"model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, HIDDEN, generator=g),
               "model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(HIDDEN, 4, generator=g),
               "model.layers.1.self_attn.v_proj.lora_A.weight":
                   torch.randn(2, HIDDEN, generator=g).to(torch.bfloat16),
               "model.layers.1.self_attn.v_proj.lora_B.weight":
                   torch.randn(HIDDEN, 2, generator=g).half()}
    return {
        "act": act_msg(),
        "grad": Message(RUN, "c0", Kind.GRAD, 3, 8,
                        {P.GRAD: torch.randn(2, 5, HIDDEN, generator=g)}),
        "adapt": Message(RUN, "c1", Kind.ADAPT, 10, 9, adapter, {"examples": 120}),
        "global": Message(RUN, P.SERVER, Kind.GLOBAL, 10, 10,
                          {k: v.float() for k, v in adapter.items()}, {"round": 2}),
        "config-client": Message(RUN, "c0", Kind.CONFIG, 0, 11,
                                 {"ranks": torch.tensor([8, 0, 4]),
                                  "block.weight": torch.randn(3, 3, generator=g)},
                                 {"split": 4, "ranks": {"q": 8}}),
        "config-server": Message(RUN, P.SERVER, Kind.CONFIG, 0, 12, {}, {"agg_interval": 5}),
        "hb": Message(RUN, "c1", Kind.HB, 4, 13, {}, {"load": 0.5}),
        "hb-server": Message(RUN, P.SERVER, Kind.HB, 4, 14),
        "state": Message(RUN, "c0", Kind.STATE, 4, 15, {}, {"state": "online"}),
        "state-server": Message(RUN, P.SERVER, Kind.STATE, 4, 16, {}, {"state": "done"}),
    }


def split(buf: bytes | bytearray) -> tuple[dict[str, Any], bytes]:
    """Header dict and payload bytes of one envelope (per docs/protocol.md)."""
    magic, version, hlen = P.PREFIX.unpack_from(buf)
    assert (magic, version) == (P.MAGIC, P.VERSION)
    return json.loads(bytes(buf[P.PREFIX.size:P.PREFIX.size + hlen])), \
        bytes(buf[P.PREFIX.size + hlen:])


def forge(head: dict[str, Any], payload: bytes, *, fix_crc: bool = False,
          raw: bytes | None = None, magic: bytes = P.MAGIC, version: int = P.VERSION
          ) -> bytearray:
    """An envelope with valid checksums around whatever header and payload we choose.

    ``fix_crc``: recompute the whole-payload ``crc`` too (after changing the payload). ``raw``:
    use these header bytes verbatim (then the ccrc is patched only if they start as the
    format requires).
    """
    if raw is None:
        head = dict(head)
        head.pop("ccrc", None)
        crc = f"{zlib.crc32(payload):08x}" if fix_crc else head.pop("crc", None)
        head.pop("crc", None)
        first = {"ccrc": "00000000"} | ({} if crc is None else {"crc": crc})
        raw = json.dumps(first | head, separators=(",", ":")).encode()
    out = bytearray(P.PREFIX.pack(magic, version, len(raw)) + raw + payload)
    start = P.PREFIX.size + len(raw)
    if raw.startswith(b'{"ccrc":"'):
        out[P.PREFIX.size + 9:P.PREFIX.size + 17] = b"00000000"
        ccrc = zlib.crc32(bytes(out[:start]), zlib.crc32(payload))
        out[P.PREFIX.size + 9:P.PREFIX.size + 17] = b"%08x" % ccrc
    return out


def one(msg: Message, **kw: Any) -> bytearray:
    chunks = P.encode(msg, **kw)
    assert len(chunks) == 1
    return chunks[0]


def mutate(buf: bytearray, fn: Callable[[dict[str, Any]], object]) -> bytearray:
    head, payload = split(buf)
    fn(head)
    return forge(head, payload)


def reason_of(data: bytes | bytearray, expect: Expect = EXPECT, topic: str | None = None) -> str:
    with pytest.raises(ProtocolError) as e:
        P.decode(data, expect, topic)
    assert isinstance(e.value, ValueError)
    return e.value.reason.value


def assert_same(a: Message, b: Message) -> None:
    assert (a.run, a.client, a.kind, a.step, a.seq, a.meta) == \
        (b.run, b.client, b.kind, b.step, b.seq, b.meta)
    assert a.tensors.keys() == b.tensors.keys()
    for k in a.tensors:
        assert a.tensors[k].dtype == b.tensors[k].dtype, k
        assert torch.equal(a.tensors[k], b.tensors[k]), k


# ------------------------------------------------------------------------------- topics
def test_topics_round_trip_and_acl_sets() -> None:
    for name, msg in messages().items():
        t = P.topic(RUN, msg.kind, msg.client)
        info = P.parse_topic(t)
        assert (info.run, info.client, info.kind) == (RUN, msg.client, msg.kind), name
    assert P.topic(RUN, Kind.ACT, "c0") == "hsl/r1/c/c0/act"
    assert P.topic(RUN, Kind.GLOBAL) == "hsl/r1/global"
    assert P.topic(RUN, Kind.HB) == "hsl/r1/s/hb"
    # A client writes exactly its uplink topics and reads its downlink + broadcasts.
    assert set(P.publications(RUN, "c0")) == {f"hsl/r1/c/c0/{k}" for k in ("act", "adapt",
                                                                          "hb", "state")}
    assert set(P.subscriptions(RUN, "c0")) == {"hsl/r1/c/c0/grad", "hsl/r1/c/c0/config",
                                               "hsl/r1/global", "hsl/r1/s/#"}
    assert "hsl/r1/c/+/grad" in P.publications(RUN, P.SERVER)
    assert "hsl/r1/c/+/act" in P.subscriptions(RUN, P.SERVER)
    for bad in ("hsl/r1/c/c0/nope", "hsl/r1/c/c0", "x/r1/global", "hsl/r1/s/act",
                "hsl/r1/c/server/act", "hsl/r1/c/c0/global", "hsl/r/1/global", ""):
        with pytest.raises(ProtocolError) as e:
            P.parse_topic(bad)
        assert e.value.reason is Reason.BAD_TOPIC
    with pytest.raises(ValueError):
        P.topic(RUN, Kind.GRAD)  # no gradient on the server channel
    with pytest.raises(ValueError):
        P.topic("a/b", Kind.ACT, "c0")


# ---------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("name", list(messages()))
def test_round_trip_every_kind(name: str) -> None:
    msg = messages()[name]
    chunks = P.encode(msg)
    assert len(chunks) == 1
    got = P.decode(chunks[0], EXPECT, msg.topic)
    assert_same(got, msg)
    assert got.nbytes == len(chunks[0]) and got.sent_at is not None
    # the payload is plain safetensors
    _, payload = split(chunks[0])
    if msg.tensors:
        loaded = safetensors.torch.load(payload)
        assert all(torch.equal(loaded[k], v) for k, v in msg.tensors.items())
    else:
        assert payload == b""


@pytest.mark.parametrize("wire,tol", [("float16", 1e-3), ("bfloat16", 8e-3),
                                      (torch.float16, 1e-3)])
def test_wire_dtypes_cast_floats_only(wire: Any, tol: float) -> None:
    msg = act_msg(b=3, s=7)
    msg.tensors[P.LABELS][0, 0] = 2**40 + 1  # would not survive a float cast
    chunks = P.encode(msg, wire=wire)
    head, _ = split(chunks[0])
    name = wire if isinstance(wire, str) else "float16"
    assert head["tensors"][P.ACTS] == {"dtype": "float32", "wire": name, "shape": [3, 7, HIDDEN]}
    assert "wire" not in head["tensors"][P.LABELS]
    saved = len(one(msg)) - len(chunks[0])  # 2 bytes per activation, less a longer header
    assert msg.tensors[P.ACTS].numel() * 2 - 64 <= saved <= msg.tensors[P.ACTS].numel() * 2
    got = P.decode(chunks[0], EXPECT)
    acts = got.tensors[P.ACTS]
    assert acts.dtype == torch.float32
    assert torch.allclose(acts, msg.tensors[P.ACTS], rtol=tol, atol=tol)
    assert not torch.equal(acts, msg.tensors[P.ACTS])  # it really went as 16 bits
    assert torch.equal(got.tensors[P.LABELS], msg.tensors[P.LABELS])
    assert torch.equal(got.tensors[P.MASK], msg.tensors[P.MASK])
    # bf16 / fp16 tensors of an adapter travel as they are, float32 ones are cast
    adapt = messages()["adapt"]
    back = P.decode(one(adapt, wire=wire), EXPECT)
    for k, v in adapt.tensors.items():
        assert back.tensors[k].dtype == v.dtype
        if v.dtype == torch.float32:
            assert torch.allclose(back.tensors[k], v, rtol=tol, atol=tol)
        else:
            assert torch.equal(back.tensors[k], v)


def test_float16_overflow_refused_at_the_sender() -> None:
    msg = act_msg()
    msg.tensors[P.ACTS][0, 0, 0] = 1e6
    with pytest.raises(ProtocolError) as e:
        P.encode(msg, wire="float16")
    assert e.value.reason is Reason.NON_FINITE
    assert P.decode(one(msg, wire="bfloat16"), EXPECT).tensors[P.ACTS][0, 0, 0] > 9e5


def test_encoder_refuses_bad_input() -> None:
    msg = act_msg()
    with pytest.raises(ValueError):
        P.encode(msg, wire="int8")
    with pytest.raises(ValueError):
        P.encode(msg, chunk_size=0)
    with pytest.raises(ValueError):
        P.encode(msg, chunk_size=P.MAX_CHUNK + 1)
    with pytest.raises(TypeError):
        P.encode(Message(RUN, "c0", Kind.ADAPT, 0, 0, {"w": [1.0]}))  # type: ignore[dict-item]
    with pytest.raises(ProtocolError) as e:
        P.encode(Message(RUN, "c0", Kind.ADAPT, 0, 0, {"w": torch.zeros(2, dtype=torch.float64)}))
    assert e.value.reason is Reason.BAD_DTYPE
    with pytest.raises(ProtocolError) as e:  # the receiver's own rules apply at the sender
        P.encode(Message(RUN, "c0", Kind.ACT, 0, 0, {P.ACTS: torch.zeros(1, 2, 3)}))
    assert e.value.reason is Reason.MISSING_TENSOR
    with pytest.raises(ProtocolError) as e:
        P.encode(Message(RUN, "c0", Kind.HB, 0, 0, meta={"x": float("nan")}))
    assert e.value.reason is Reason.BAD_META
    with pytest.raises(ValueError):
        P.encode(Message("bad run", "c0", Kind.HB, 0, 0))


def test_safetensors_interop_both_ways() -> None:
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5), "c": torch.randn(2).half(),
               "empty": torch.zeros(0, 3)}
    blob = safetensors.torch.save(tensors)
    layout = P.parse_safetensors(memoryview(blob))
    for name, t in tensors.items():
        dtype, shape, start, end = layout[name]
        assert shape == tuple(t.shape) and P.DTYPES[dtype][0] == t.dtype
        assert blob[start:end] == t.numpy().tobytes()
    msg = Message(RUN, "c0", Kind.CONFIG, 0, 0, tensors)
    got = P.decode(one(msg), EXPECT)
    assert_same(got, msg)
    assert safetensors.torch.load(split(one(msg))[1]).keys() == tensors.keys()


def test_decoded_tensors_are_views_of_a_writable_buffer() -> None:
    msg = act_msg(b=4, s=16)
    buf = one(msg)
    lo = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    got = P.decode(buf, EXPECT)
    for t in got.tensors.values():
        assert lo <= t.data_ptr() < lo + len(buf)  # zero-copy
        assert t.data_ptr() % t.element_size() == 0  # aligned
    # immutable bytes still decode (one copy, so the tensors are writable)
    again = P.decode(bytes(buf), EXPECT)
    again.tensors[P.ACTS].add_(1)
    assert_same(P.decode(memoryview(bytes(buf)), EXPECT), msg)


def test_crc32_combine_matches_zlib() -> None:
    rng = random.Random(7)
    for _ in range(100):
        a, b = rng.randbytes(rng.randint(0, 500)), rng.randbytes(rng.randint(0, 500))
        assert P.crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


def test_all_finite_fast_path_and_overflow() -> None:
    assert P.all_finite(torch.full((10,), 3e38))  # the float32 sum overflows; exact check
    assert not P.all_finite(torch.tensor([1.0, float("nan")]))
    assert not P.all_finite(torch.tensor([float("inf"), float("-inf")]))
    assert P.all_finite(torch.zeros(0))


# ------------------------------------------------------------------------------ chunking
@pytest.mark.parametrize("chunk", [1, 13, 256])
def test_chunks_reassemble_with_duplicates_and_reordering(chunk: int) -> None:
    msg = act_msg(b=3, s=6)
    chunks = P.encode(msg, chunk_size=chunk, wire="bfloat16" if chunk == 13 else None)
    assert len(chunks) > 3
    rng = random.Random(chunk)
    feed = chunks + rng.sample(chunks, 3)
    rng.shuffle(feed)
    rx = P.Receiver(EXPECT)
    got = [m for m in (rx.feed(c, msg.topic) for c in feed) if m is not None]
    assert len(got) == 1 and rx.pending == 0
    ref = P.decode(one(msg, wire="bfloat16" if chunk == 13 else None), EXPECT)
    assert_same(got[0], ref)
    assert got[0].nbytes == sum(len(c) for c in chunks)
    assert rx.stats.duplicates == 3 and rx.stats.chunks == len(chunks)
    # a redelivery of the whole message after completion is dropped, chunk by chunk
    assert all(rx.feed(c) is None for c in chunks)
    assert rx.pending == 0 and rx.stats.accepted == 1


def test_interleaved_chunked_messages_and_dedup_policy() -> None:
    a, b = act_msg(seq=1), act_msg(seq=2, client="c1")
    ca, cb = P.encode(a, chunk_size=100), P.encode(b, chunk_size=100)
    rx = P.Receiver(EXPECT)
    feed = [c for pair in zip(ca, cb, strict=False) for c in pair] + ca[len(cb):] + cb[len(ca):]
    got = [m for m in map(rx.feed, feed) if m is not None]
    assert sorted(m.client for m in got) == ["c0", "c1"]
    # single-chunk data messages are deduplicated ...
    buf = one(act_msg(seq=3))
    assert rx.feed(buf) is not None and rx.feed(buf) is None
    # ... heartbeats and states are not ("latest wins"; a last will may repeat)
    hb = one(messages()["hb"])
    assert rx.feed(hb) is not None and rx.feed(hb) is not None


def test_incomplete_messages_expire_and_memory_is_bounded() -> None:
    now = [0.0]
    rx = P.Receiver(EXPECT, timeout=5.0, clock=lambda: now[0])
    chunks = P.encode(act_msg(), chunk_size=64)
    assert rx.feed(chunks[0]) is None and rx.pending == 1
    now[0] = 4.0
    assert rx.feed(chunks[1]) is None and rx.expire() == []  # activity resets the clock
    now[0] = 9.5
    assert len(rx.expire()) == 1 and rx.pending == 0 and rx.stats.expired == 1
    # the rest arriving late starts over and never completes
    assert all(rx.feed(c) is None for c in chunks[2:])
    small = P.Receiver(EXPECT, max_pending=100)
    with pytest.raises(ProtocolError) as e:
        small.feed(chunks[0])
    assert e.value.reason is Reason.OVERLOAD


def test_chunk_of_another_message_with_the_same_key_is_refused() -> None:
    one_, other = P.encode(act_msg(), chunk_size=64), P.encode(act_msg(run_tag=1), chunk_size=64)
    rx = P.Receiver(EXPECT)
    rx.feed(one_[0])
    with pytest.raises(ProtocolError) as e:
        rx.feed(other[1])
    assert e.value.reason is Reason.CHUNK_MISMATCH
    assert rx.stats.rejected == 1 and rx.stats.reasons == {"chunk-mismatch": 1}


def test_decode_refuses_chunked_messages() -> None:
    assert reason_of(P.encode(act_msg(), chunk_size=64)[0]) == "bad-chunk"


# ---------------------------------------------------------------------------- validation
VALID = one(act_msg())
HEAD, PAYLOAD = split(VALID)


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def fn(head: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = head
        for p in parents:
            node = node[p]
        node[last] = value
    return fn


def _del(path: str) -> Callable[[dict[str, Any]], None]:
    def fn(head: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = head
        for p in parents:
            node = node[p]
        del node[last]
    return fn


def _nan_payload(value: float, wire: str | None = None, kind: str = "act") -> bytearray:
    msg = act_msg() if kind == "act" else messages()[kind]
    name = {"act": P.ACTS, "grad": P.GRAD}.get(kind, next(iter(msg.tensors)))
    msg.tensors[name].view(-1)[3] = value
    return P.encode(msg, wire=wire)[0] if wire is None else _cast_bypass(msg, wire)


def _cast_bypass(msg: Message, wire: str) -> bytearray:
    """A NaN sent as float16 (the encoder refuses non-finite casts, a hostile sender won't)."""
    clean = Message(msg.run, msg.client, msg.kind, msg.step, msg.seq,
                    {k: torch.nan_to_num(v) for k, v in msg.tensors.items()})
    head, payload = split(one(clean, wire=wire))
    payload = bytearray(payload)
    layout = P.parse_safetensors(memoryview(payload))
    _, _, start, _ = layout[P.ACTS]
    payload[start + 6:start + 8] = struct.pack("<e", float("nan"))
    return forge(head, bytes(payload), fix_crc=True)


def _transposed_adapter() -> bytearray:
    """An adapter whose manifest says [8, 4] where the blob holds [4, 8]."""
    def fn(head: dict[str, Any]) -> None:
        entry = head["tensors"]["model.layers.0.self_attn.q_proj.lora_A.weight"]
        entry["shape"] = entry["shape"][::-1]
    return mutate(one(messages()["adapt"]), fn)


def _bad_safetensors() -> bytearray:
    payload = bytearray(PAYLOAD)
    payload[8:10] = b"[1"  # the blob's JSON header is no longer an object
    return forge(HEAD, bytes(payload), fix_crc=True)


# (case id, bytes, expect, topic, reason)
CASES: list[tuple[str, bytes | bytearray, Expect, str | None, str]] = [
    ("too-short", b"HSL", EXPECT, None, "too-short"),
    ("bad-magic", b"MQTT" + VALID[4:], EXPECT, None, "bad-magic"),
    ("bad-version", VALID[:4] + b"\x02" + VALID[5:], EXPECT, None, "bad-version"),
    ("header-too-large", VALID, Expect(RUN, max_header=64), None, "header-too-large"),
    ("truncated-header", VALID[:P.PREFIX.size + 20], EXPECT, None, "truncated-header"),
    ("header-not-json", forge({}, b"", raw=b"not json"), EXPECT, None, "bad-header"),
    ("header-not-utf8", forge({}, b"", raw=b'{"\xff":1}'), EXPECT, None, "bad-header"),
    ("header-array", forge({}, b"", raw=b"[1, 2]"), EXPECT, None, "bad-header"),
    ("header-nan", forge({}, b"", raw=b'{"ccrc":"00000000","crc":"00000000","x":NaN}'),
     EXPECT, None, "bad-header"),
    ("header-duplicate-key", forge({}, b"", raw=b'{"ccrc":"00000000","crc":"00000000",'
                                              b'"run":"r1","run":"r2"}'),
     EXPECT, None, "bad-header"),
    ("checksums-not-first", forge({}, PAYLOAD, raw=json.dumps(
        {"run": "r1"} | HEAD).encode()), EXPECT, None, "bad-header"),
    ("crc-not-hex", mutate(VALID, _set("crc", "XYZXYZXY")), EXPECT, None, "bad-header"),
    ("missing-field", mutate(VALID, _del("step")), EXPECT, None, "missing-field"),
    ("unknown-field", mutate(VALID, _set("extra", 1)), EXPECT, None, "unknown-field"),
    ("run-not-string", mutate(VALID, _set("run", 5)), EXPECT, None, "bad-field"),
    ("time-not-number", mutate(VALID, _set("time", "now")), EXPECT, None, "bad-field"),
    ("size-not-int", mutate(VALID, _set("size", "10")), EXPECT, None, "bad-field"),
    ("wrong-run", mutate(VALID, _set("run", "r2")), EXPECT, None, "wrong-run"),
    ("unknown-client", mutate(VALID, _set("client", "c9")), EXPECT, None, "unknown-client"),
    ("client-not-an-id", mutate(VALID, _set("client", "a/b")), Expect(RUN), None,
     "unknown-client"),
    ("unknown-kind", mutate(VALID, _set("kind", "weights")), EXPECT, None, "unknown-kind"),
    ("kind-not-taken", VALID, Expect(RUN, kinds=frozenset({Kind.GRAD})), None,
     "unexpected-kind"),
    ("act-on-server-channel", mutate(VALID, _set("client", "server")), EXPECT, None,
     "unexpected-kind"),
    ("negative-step", mutate(VALID, _set("step", -1)), EXPECT, None, "bad-step"),
    ("float-step", mutate(VALID, _set("step", 1.5)), EXPECT, None, "bad-step"),
    ("bool-step", mutate(VALID, _set("step", True)), EXPECT, None, "bad-step"),
    ("string-step", mutate(VALID, _set("step", "3")), EXPECT, None, "bad-step"),
    ("huge-step", mutate(VALID, _set("step", 2**64)), EXPECT, None, "bad-step"),
    ("negative-seq", mutate(VALID, _set("seq", -1)), EXPECT, None, "bad-seq"),
    ("null-seq", mutate(VALID, _set("seq", None)), EXPECT, None, "bad-seq"),
    ("chunk-index", mutate(VALID, _set("chunk", [1, 1])), EXPECT, None, "bad-chunk"),
    ("chunk-not-list", mutate(VALID, _set("chunk", "0/1")), EXPECT, None, "bad-chunk"),
    ("chunk-size-zero", mutate(VALID, _set("csize", 0)), EXPECT, None, "bad-chunk"),
    ("chunk-count", mutate(VALID, _set("chunk", [0, 2])), EXPECT, None, "bad-chunk"),
    ("message-too-large", VALID, Expect(RUN, max_message=100), None, "message-too-large"),
    ("truncated-payload", VALID[:-1], EXPECT, None, "truncated-payload"),
    ("oversized-payload", VALID + b"\x00", EXPECT, None, "oversized-payload"),
    ("payload-bit-flip", VALID[:-5] + bytes([VALID[-5] ^ 1]) + VALID[-4:], EXPECT, None,
     "checksum-mismatch"),
    ("header-digit-changed", VALID.replace(b'"step":3', b'"step":4'), EXPECT, None,
     "checksum-mismatch"),
    ("payload-crc-wrong", mutate(VALID, _set("crc", "0badc0de")), EXPECT, None,
     "checksum-mismatch"),
    ("manifest-not-object", mutate(VALID, _set("tensors", [])), EXPECT, None, "bad-manifest"),
    ("shape-not-list", mutate(VALID, _set("tensors.acts.shape", "2x5x8")), EXPECT, None,
     "bad-manifest"),
    ("negative-dim", mutate(VALID, _set("tensors.acts.shape", [-2, 5, 8])), EXPECT, None,
     "bad-manifest"),
    ("manifest-entry-extra-key", mutate(VALID, _set("tensors.acts.device", "cuda")), EXPECT,
     None, "bad-manifest"),
    ("tensors-exceed-payload", mutate(VALID, _set("tensors.acts.shape", [2, 5, 9999])), EXPECT,
     None, "bad-manifest"),
    ("acts-int", mutate(VALID, _set("tensors.acts.dtype", "int32")), EXPECT, None, "bad-dtype"),
    ("mask-float", mutate(VALID, _set("tensors.mask.dtype", "float32")), EXPECT, None,
     "bad-dtype"),
    ("int-on-wire-as-half", mutate(VALID, _set("tensors.labels.wire", "float16")), EXPECT,
     None, "bad-dtype"),
    ("unsupported-dtype", mutate(VALID, _set("tensors.acts.dtype", "complex64")), EXPECT, None,
     "bad-dtype"),
    ("adapter-int-forged", mutate(one(Message(RUN, "c0", Kind.CONFIG, 0, 0,
                                              {"r": torch.arange(3)})),
                                  _set("kind", "adapt")), EXPECT, None, "bad-dtype"),
    ("missing-tensor", mutate(VALID, _del("tensors.labels")), EXPECT, None, "missing-tensor"),
    ("unexpected-tensor", mutate(VALID, _set("tensors.extra", {"dtype": "float32",
                                                                "shape": [1]})),
     EXPECT, None, "unexpected-tensor"),
    ("tensor-on-heartbeat", mutate(one(Message(RUN, "c0", Kind.CONFIG, 0, 0,
                                               {"x": torch.ones(1)})), _set("kind", "hb")),
     EXPECT, None, "unexpected-tensor"),
    ("mask-shape", mutate(VALID, _set("tensors.mask.shape", [2, 4])), EXPECT, None,
     "shape-mismatch"),
    ("labels-batch", mutate(VALID, _set("tensors.labels.shape", [1, 5])), EXPECT, None,
     "shape-mismatch"),
    ("acts-2d", mutate(VALID, _set("tensors.acts.shape", [10, 8])), EXPECT, None,
     "shape-mismatch"),
    ("hidden-size", VALID, Expect(RUN, hidden=16), None, "shape-mismatch"),
    ("hook-shape", VALID, Expect(RUN, shapes=lambda h: {P.ACTS: (None, 6, HIDDEN),
                                                        P.MASK: (None, None),
                                                        P.LABELS: (None, None)}),
     None, "shape-mismatch"),
    ("hook-missing", VALID, Expect(RUN, shapes=lambda h: {P.ACTS: (None,) * 3, P.MASK: (2, 5),
                                                          P.LABELS: (2, 5), "pos": (5,)}),
     None, "missing-tensor"),
    ("safetensors-corrupt", _bad_safetensors(), EXPECT, None, "bad-payload"),
    ("safetensors-vs-manifest", _transposed_adapter(), EXPECT, None, "bad-payload"),
    ("nan-acts", _nan_payload(float("nan")), EXPECT, None, "non-finite"),
    ("inf-acts", _nan_payload(float("inf")), EXPECT, None, "non-finite"),
    ("inf-grad", _nan_payload(float("-inf"), kind="grad"), EXPECT, None, "non-finite"),
    ("nan-adapter", _nan_payload(float("nan"), kind="adapt"), EXPECT, None, "non-finite"),
    ("nan-as-float16", _nan_payload(float("nan"), wire="float16"), EXPECT, None, "non-finite"),
    ("meta-not-object", mutate(VALID, _set("meta", [1])), EXPECT, None, "bad-meta"),
    ("state-without-state", mutate(one(Message(RUN, "c0", Kind.HB, 0, 0, meta={"x": 1})),
                                   _set("kind", "state")), EXPECT, None, "bad-meta"),
    ("state-unknown", mutate(one(messages()["state"]), _set("meta.state", "sleepy")), EXPECT,
     None, "bad-meta"),
    ("bad-topic", VALID, EXPECT, "hsl/r1/c/c0/nope", "bad-topic"),
    ("topic-of-another-client", VALID, EXPECT, "hsl/r1/c/c1/act", "topic-mismatch"),
    ("topic-of-another-kind", VALID, EXPECT, "hsl/r1/c/c0/adapt", "topic-mismatch"),
    ("hook-raises", VALID, Expect(RUN, shapes=lambda h: 1 / 0), None, "malformed"),
]


@pytest.mark.parametrize("case,data,expect,topic,reason", CASES, ids=[c[0] for c in CASES])
def test_each_rule_has_its_reason(case: str, data: bytes, expect: Expect, topic: str | None,
                                  reason: str) -> None:
    assert reason_of(data, expect, topic) == reason
    # the Receiver refuses the same way, and counts it
    rx = P.Receiver(expect)
    with pytest.raises(ProtocolError):
        rx.feed(data, topic)
    assert rx.stats.rejected == 1 and rx.stats.reasons == {reason: 1}


def test_every_reason_is_exercised() -> None:
    seen = {c[4] for c in CASES} | {"reassembly-overload", "chunk-mismatch"}  # tests above
    assert seen == {r.value for r in Reason}


def test_malformed_keeps_the_cause() -> None:
    with pytest.raises(ProtocolError) as e:
        P.decode(VALID, Expect(RUN, shapes=lambda h: 1 / 0))
    assert isinstance(e.value.__cause__, ZeroDivisionError)
    assert "ZeroDivisionError" in str(e.value)


# ------------------------------------------------------------------------------- fuzzing
FUZZ_CASES = 1500
_INVALID: dict[str, list[Any]] = {
    "run": ["r2", 5, None, "", ["r1"]],
    "client": ["c9", 7, None, "a/b", "server", ""],  # "server": wrong channel (or no-op)
    "kind": ["zzz", 3, None, "ACT", "grad", "global"],
    "step": [-1, 1.5, True, "1", None, 2**64],
    "seq": [-1, 2.0, False, "7", None, 2**63],
    "time": ["x", [], True, {}],
    "meta": [[], "x", 1, None],
    "size": [-1, "x", 2**40, 1.0, None],
    "chunk": [[1, 1], [0, 2], [-1, 1], "x", [0], [0, 1, 2], None],
    "csize": [0, -5, 2**40, "x", None],
    "crc": ["0badc0de", "ffffffff"],
    "tensors": [[], None, {"acts": 1}, {}, "x"],
}


def _fuzz_case(rng: random.Random, bases: list[tuple[bytearray, str]]) -> tuple[bytes, str]:
    base, topic = rng.choice(bases)
    kind = rng.randrange(6)
    if kind == 0:  # random bytes, sometimes behind a plausible prefix
        junk = rng.randbytes(rng.randint(0, 600))
        if rng.random() < 0.5:
            junk = P.PREFIX.pack(P.MAGIC, P.VERSION, rng.randint(0, 700)) + junk
        return junk, topic
    if kind == 1:  # bit flips (1-3) anywhere
        data = bytearray(base)
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(data) * 8)
            data[i // 8] ^= 1 << (i % 8)
        return bytes(data), topic
    if kind == 2:  # truncation or extension
        if rng.random() < 0.7:
            return bytes(base[:rng.randrange(len(base))]), topic
        return bytes(base) + rng.randbytes(rng.randint(1, 40)), topic
    head, payload = split(base)
    if kind == 3:  # one header field set to a value invalid for it (checksums recomputed)
        while True:
            fld = rng.choice(list(_INVALID))
            value = rng.choice(_INVALID[fld])
            if head.get(fld) != value:  # a real change (e.g. client "server" on its channel)
                break
        head[fld] = value
        return bytes(forge(head, payload)), topic
    if kind == 4:  # a field removed, a field added, or a manifest dimension changed
        r = rng.random()
        if r < 0.4:
            del head[rng.choice([k for k in head if k not in ("ccrc", "time", "meta")])]
        elif r < 0.6:
            head[rng.choice(["x", "v", "sig", "Run"])] = rng.randint(0, 9)
        elif head["tensors"]:
            entry = head["tensors"][rng.choice(list(head["tensors"]))]
            if entry["shape"]:
                d = rng.randrange(len(entry["shape"]))
                entry["shape"][d] += rng.choice([-1, 1, 7])
            else:
                entry["shape"] = [2]
        else:
            head["tensors"] = {"w": {"dtype": "float32", "shape": [1]}}
        return bytes(forge(head, payload)), topic
    # NaN / Inf in a float tensor, sent by a sender that skips its own checks
    if head["chunk"][1] > 1 or not any(v["dtype"] in P.FLOATS
                                       for v in head["tensors"].values()):
        head, payload = split(bases[0][0])
        topic = bases[0][1]
    layout = P.parse_safetensors(memoryview(payload))
    name = rng.choice([n for n, v in head["tensors"].items() if v["dtype"] in P.FLOATS])
    wire, _, start, end = layout[name]
    item = P.DTYPES[wire][0].itemsize
    pos = start + item * rng.randrange((end - start) // item)
    bad = rng.choice([float("nan"), float("inf"), float("-inf")])
    data = bytearray(payload)
    if wire == "float32":
        data[pos:pos + 4] = struct.pack("<f", bad)
    elif wire == "float16":
        data[pos:pos + 2] = struct.pack("<e", bad)
    else:  # bfloat16: the high half of the float32 pattern
        data[pos:pos + 2] = struct.pack("<f", bad)[2:]
    return bytes(forge(head, bytes(data), fix_crc=True)), topic


def test_fuzz_every_malformed_message_is_refused_with_a_reason() -> None:
    rng = random.Random(20240604)
    bases = [(one(m), m.topic) for m in messages().values()]
    bases += [(one(act_msg(), wire="float16"), act_msg().topic),
              (one(messages()["adapt"], wire="bfloat16"), messages()["adapt"].topic)]
    bases += [(c, act_msg().topic) for c in P.encode(act_msg(b=1, s=2), chunk_size=40)[:2]]
    reasons: dict[str, int] = {}
    for _ in range(FUZZ_CASES):
        data, topic = _fuzz_case(rng, bases)
        rx = P.Receiver(EXPECT)
        try:
            out = rx.feed(data, topic)
        except ProtocolError as e:
            assert isinstance(e.reason, Reason) and e.detail is not None
            reasons[e.reason.value] = reasons.get(e.reason.value, 0) + 1
            continue
        # A chunk that survived is only the first part of a message: nothing delivered.
        assert out is None and rx.pending == 1, (data[:200], topic)
        reasons["held-incomplete"] = reasons.get("held-incomplete", 0) + 1
    assert sum(reasons.values()) == FUZZ_CASES
    assert reasons.get("held-incomplete", 0) < FUZZ_CASES * 0.02
    assert len(reasons) >= 15  # the generator reaches many different rules


def test_fuzz_with_no_topic_and_no_client_set() -> None:
    """Without topic cross-checks the header alone must still carry the rejection."""
    rng = random.Random(99)
    base = one(act_msg())
    for _ in range(300):
        data = bytearray(base)
        i = rng.randrange(len(data) * 8)
        data[i // 8] ^= 1 << (i % 8)
        with pytest.raises(ProtocolError):
            P.decode(data, Expect(RUN))
    assert math.isfinite(float(P.decode(base, Expect(RUN)).tensors[P.ACTS].sum()))

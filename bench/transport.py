"""Round-trip throughput of the MQTT transport against a plain TCP echo and a TCP relay.

What is measured, per tensor size (default 1, 4, 16, 32 and 64 MB), as the median round trip
of one message:

* **tcp**: the tensor's raw bytes sent over a loopback TCP socket to an echo server (a thread
  in this process) and read back: what the bytes cost with no broker and no protocol;
* **tcp-relay**: the same bytes through a store-and-forward TCP relay thread to an echo and
  back (:class:`TcpRelay`): a broker's topology without MQTT, the ceiling of any broker path;
* **raw-paho**, **raw-native**: the same bytes published at QoS 1 by a bare link of that
  MQTT client library (paho-mqtt with our large-payload fixes, or libmosquitto through
  ctypes; runner/distributed/mqtt_paho.py, runner/distributed/mqtt_native.py) on a client's uplink
  topic, republished by an echo link (the server's credentials) to that client's downlink topic,
  received: the library's and the broker's cost (two hops through Mosquitto, each with
  PUBACK), no protocol;
* **mqtt-paho**, **mqtt-native**: the full stack the runtime uses on that library: a
  :class:`runner.distributed.transport.Transport` client sends an ``act`` message (activations
  ``[1, S, 1024]`` float32 of that size, plus mask and labels); the server Transport decodes
  and validates it (CRC, NaN check, shapes) and sends the activations back as a ``grad``
  message; the client decodes it.

Ratios: ``X/tcp`` = TCP time / X time (throughput relative to TCP; 1.0 = as fast), ``X/relay``
= relay time / X time (relative to the ceiling of a brokered path). The target of issue 17:
the default backend's full stack at >= 0.8 of the relay at 4 MB and up (issue 4's was >= 0.5
of TCP).

Why interleaved: the machine is shared (a training job may hold a core) and its speed drifts;
each repetition runs every variant back to back in a rotating order, so drift hits all of
them alike, and the first ``--warmup`` repetitions (socket buffers, allocator growth) are
dropped. Everything runs on 127.0.0.1 with per-variant Mosquittos from
:mod:`runner.distributed.broker` (auth and ACL on, as in a real run). Echo parties are threads of
this process, for TCP and MQTT alike.

More full-stack variants of the default backend, each through its own broker: ``--chunk-mb
1 4`` adds ``mqtt-<default>@4MB``; ``--broker-env KEY=VALUE ...`` adds ``mqtt-<default>+env``:
a Mosquitto started with that environment (an experiment: the runtime starts its broker
with the plain environment plus runner/distributed/broker.py ``BROKER_MALLOC_ENV``).

``--tls`` adds ``mqtt-<backend>+tls`` for every backend: the same full stack through a
Mosquitto with a TLS listener and the run's certificates (runner/distributed/tls.py; both
hops encrypted, the broker's certificate verified), and prints the cost of TLS as the ratio
of round-trip times, ``tls/plain`` = time over TLS / time over plain MQTT on the same
library (1.0 = free; docs/benchmarks.md "TLS").

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python bench/transport.py [--sizes 1 4 16 32 64] [--reps 5]
        [--warmup 1] [--backends paho native] [--chunk-mb 1 [4 ...]]
        [--broker-env KEY=VALUE ...] [--tls] [--json PATH]

A quick check (tests/test_bench.py): ``--sizes 0.25 --reps 1 --warmup 0``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import socket
import ssl
import statistics
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runner.distributed import mqtt_native  # noqa: E402
from runner.distributed import protocol as P  # noqa: E402
from runner.distributed.broker import Broker, start_broker  # noqa: E402
from runner.distributed.mqtt_link import Link, Payload, Will  # noqa: E402
from runner.distributed.tls import ClientTLS, make_pki  # noqa: E402
from runner.distributed.transport import Transport, make_link, resolve_backend  # noqa: E402

RUN, RAW_RUN, CLIENT = "bench", "benchraw", "c0"
HIDDEN = 1024
MB = 1 << 20
TARGET_RELAY = 0.8
TIMEOUT = 120.0


# ---------------------------------------------------------------------------------- tcp
class TcpEcho:
    """Length-prefixed echo server on a loopback socket, one thread, one connection."""

    def __init__(self) -> None:
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = self.srv.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        self.sock = socket.create_connection(("127.0.0.1", self.port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _serve(self) -> None:
        conn, _ = self.srv.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while True:
                head = _recv_exact(conn, 8)
                if head is None:
                    return
                (n,) = struct.unpack("!Q", head)
                data = _recv_exact(conn, n)
                if data is None:
                    return
                conn.sendall(head)
                conn.sendall(data)

    def roundtrip(self, payload: memoryview) -> float:
        t0 = time.perf_counter()
        self.sock.sendall(struct.pack("!Q", len(payload)))
        self.sock.sendall(payload)
        head = _recv_exact(self.sock, 8)
        assert head is not None
        data = _recv_exact(self.sock, struct.unpack("!Q", head)[0])
        dt = time.perf_counter() - t0
        assert data is not None and len(data) == len(payload)
        return dt

    def close(self) -> None:
        self.sock.close()
        self.srv.close()


class TcpRelay:
    """The broker's topology in plain TCP: client -> relay -> echo -> relay -> client.

    The relay (a thread) stores each length-prefixed message whole before forwarding it, as
    Mosquitto does with a PUBLISH; so a round trip crosses four loopback transfers, like a
    publish to the echo client and the echo's publish back through the broker, with no MQTT
    framing, no acknowledgements and no protocol. The fair ceiling for any broker path.
    """

    def __init__(self) -> None:
        self.echo = TcpEcho()  # the relay's upstream (its own client socket is the relay's)
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        self.sock = socket.create_connection(("127.0.0.1", self.srv.getsockname()[1]))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _serve(self) -> None:
        conn, _ = self.srv.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        up = self.echo.sock
        with conn:
            while True:
                for src, dst in ((conn, up), (up, conn)):
                    head = _recv_exact(src, 8)
                    if head is None:
                        return
                    data = _recv_exact(src, struct.unpack("!Q", head)[0])
                    if data is None:
                        return
                    dst.sendall(head)
                    dst.sendall(data)

    def roundtrip(self, payload: memoryview) -> float:
        return TcpEcho.roundtrip(self, payload)  # type: ignore[arg-type]

    def close(self) -> None:
        self.sock.close()
        self.srv.close()
        self.echo.close()


def _recv_exact(sock: socket.socket, n: int) -> bytearray | None:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            return None
        got += k
    return buf


# ----------------------------------------------------------------------------- mqtt raw
class _RawEvents:
    """Link events of a bare link: subscribe on every CONNACK, hand messages to a function."""

    def __init__(self, topic: str, on_message: Callable[[str, Payload], None]) -> None:
        self.topic = topic
        self.on_message = on_message
        self.link: Link | None = None
        self.subscribed = threading.Event()

    def link_connected(self, ok: bool, reason: str) -> None:
        assert ok, reason
        assert self.link is not None
        self.link.subscribe([self.topic])

    def link_disconnected(self, reason: str) -> None:
        pass

    def link_subscribed(self, mid: int, codes: list[int]) -> None:
        self.subscribed.set()

    def link_message(self, topic: str, payload: Payload) -> None:
        self.on_message(topic, payload)

    def link_published(self, mid: int, failure: str | None) -> None:
        pass


class RawMqtt:
    """Two bare links of one backend: the client publishes bytes, the echo republishes them.

    No protocol at all (no envelope, no CRC, no decode): what the MQTT client library and the
    broker cost. On a broker of its own (another run), so its bytes never reach the protocol
    variants' subscribers (which would then spend time rejecting them).
    """

    def __init__(self, broker: Broker, backend: str) -> None:
        self.up = P.topic(broker.run, P.Kind.ACT, CLIENT)
        self.down = P.topic(broker.run, P.Kind.GRAD, CLIENT)
        self.got = threading.Event()
        self.reply_len = -1
        self.echo = self._link(broker, backend, "server", self.up,
                               lambda t, p: self.echo.publish(self.down, p))
        self.cli = self._link(broker, backend, CLIENT, self.down, self._on_reply)

    @staticmethod
    def _link(broker: Broker, backend: str, who: str, topic: str,
              on_message: Callable[[str, Payload], None]) -> Link:
        events = _RawEvents(topic, on_message)
        me = P.SERVER if who == "server" else who
        will = Will(P.topic(broker.run, P.Kind.STATE, me), b"")
        link = make_link(backend, events, client_id=f"raw-{backend}-{who}", v5=True,
                         credentials=broker.creds(who), will=will, reconnect=(1.0, 5.0))
        events.link = link
        link.connect(broker.host, broker.port, 30, None)
        if not events.subscribed.wait(10):
            raise TimeoutError("no SUBACK")
        return link

    def _on_reply(self, topic: str, payload: Payload) -> None:
        self.reply_len = len(payload)
        self.got.set()

    def roundtrip(self, payload: bytes | bytearray) -> float:
        self.got.clear()
        t0 = time.perf_counter()
        self.cli.publish(self.up, payload)
        if not self.got.wait(TIMEOUT):
            raise TimeoutError("raw MQTT echo timed out")
        dt = time.perf_counter() - t0
        assert self.reply_len == len(payload)
        return dt

    def close(self) -> None:
        for link in (self.cli, self.echo):
            link.disconnect()
            link.stop()


# ------------------------------------------------------------------------- mqtt protocol
class ProtocolEcho:
    """Client and server Transports; the server answers every act with its acts as grad."""

    def __init__(self, broker: Broker, chunk_size: int, backend: str,
                 tls: ClientTLS | None = None) -> None:
        self.srv = Transport(broker.address, broker.creds("server"), run=broker.run, me=P.SERVER,
                             clients=[CLIENT], chunk_size=chunk_size, backend=backend,
                             tls=tls).connect()
        self.cli = Transport(broker.address, broker.creds(CLIENT), run=broker.run, me=CLIENT,
                             chunk_size=chunk_size, backend=backend, tls=tls).connect()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            msg = self.srv.recv(0.2)
            if msg is not None and msg.kind is P.Kind.ACT:
                self.srv.send(P.Kind.GRAD, msg.step, {P.GRAD: msg.tensors[P.ACTS]}, to=CLIENT,
                              timeout=TIMEOUT)

    def roundtrip(self, acts: torch.Tensor, step: int) -> float:
        b, s, _ = acts.shape
        mask = torch.ones(b, s, dtype=torch.int64)
        labels = torch.zeros(b, s, dtype=torch.int64)
        t0 = time.perf_counter()
        self.cli.send(P.Kind.ACT, step, {P.ACTS: acts, P.MASK: mask, P.LABELS: labels},
                      timeout=TIMEOUT)
        deadline = t0 + TIMEOUT
        while True:
            msg = self.cli.recv(max(0.0, deadline - time.perf_counter()))
            if msg is None:
                raise TimeoutError("protocol echo timed out")
            if msg.kind is P.Kind.GRAD and msg.step == step:
                break
        dt = time.perf_counter() - t0
        assert msg.tensors[P.GRAD].shape == acts.shape
        return dt

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        self.cli.close()
        self.srv.close()


# ------------------------------------------------------------------------------- main
def _cpu_model() -> str:
    """The CPU's model name (what `lscpu | grep 'Model name'` prints), for the record."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _variants(args: argparse.Namespace, default: str
              ) -> list[tuple[str, str, float, dict, bool]]:
    """(name, backend, chunk MB, broker environment, TLS) of every full-stack variant."""
    out = [(f"mqtt-{b}", b, args.chunk_mb[0], {}, False) for b in args.backends]
    out += [(f"mqtt-{default}@{c:g}MB", default, c, {}, False) for c in args.chunk_mb[1:]]
    if args.broker_env:
        out.append((f"mqtt-{default}+env", default, args.chunk_mb[0],
                    dict(kv.split("=", 1) for kv in args.broker_env), False))
    if args.tls:
        out += [(f"mqtt-{b}+tls", b, args.chunk_mb[0], {}, True) for b in args.backends]
    return out


def _start_broker(stack: contextlib.ExitStack, run: str, env: dict[str, str],
                  tls: bool = False) -> tuple[Broker, ClientTLS | None]:
    """A broker for ``run`` (with a TLS listener and the run's own CA when ``tls``), and
    what its clients need to verify it."""
    client = None
    broker_tls = None
    if tls:
        import tempfile

        where = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-tls-")))
        pki = make_pki(where, run=run, hosts=["127.0.0.1"])
        broker_tls, client = pki.broker(), pki.client(CLIENT)
    saved = dict(os.environ)
    os.environ.update(env)  # the broker process inherits it (runner.distributed.broker)
    try:
        return stack.enter_context(start_broker(run, [CLIENT], tls=broker_tls)), client
    finally:
        os.environ.clear()
        os.environ.update(saved)


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[1, 4, 16, 32, 64], help="MB")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    available = [b for b in ("paho", "native")
                 if b == "paho" or mqtt_native.unavailable() is None]
    ap.add_argument("--backends", nargs="+", choices=("paho", "native"), default=available,
                    help="MQTT client libraries to measure (raw and full stack each); "
                         f"default: those available here ({' '.join(available)})")
    ap.add_argument("--chunk-mb", type=float, nargs="+", default=[P.DEFAULT_CHUNK / MB],
                    help="protocol chunk size(s) in MB; the first is used by every backend, "
                         "each other one is an extra variant of the default backend")
    ap.add_argument("--broker-env", nargs="+", default=[], metavar="KEY=VALUE",
                    help="also measure the default backend through a Mosquitto started with "
                         "these environment variables (an experiment)")
    ap.add_argument("--tls", action="store_true",
                    help="also measure every backend's full stack over TLS (the run's CA, "
                         "broker certificate verified) and print tls/plain")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    console = Console(width=220)
    torch.manual_seed(0)
    default = resolve_backend(None)
    if default not in args.backends:
        args.backends.append(default)
    variants = _variants(args, default)
    main_name = f"mqtt-{default}"
    rows = []
    with contextlib.ExitStack() as stack:
        tcp, relay = TcpEcho(), TcpRelay()
        raws = {f"raw-{b}": RawMqtt(_start_broker(stack, f"{RAW_RUN}{i}", {})[0], b)
                for i, b in enumerate(args.backends)}
        protos = {}
        for i, (name, b, c, env, tls) in enumerate(variants):
            broker, client_tls = _start_broker(stack, f"{RUN}{i}", env, tls)
            protos[name] = ProtocolEcho(broker, int(c * MB), b, client_tls)
        names = ["tcp", "tcp-relay", *raws, *protos]
        try:
            steps = itertools.count()
            for size_mb in args.sizes:
                seq = max(1, int(size_mb * MB) // (HIDDEN * 4))
                acts = torch.randn(1, seq, HIDDEN)
                payload = memoryview(acts.numpy()).cast("B")
                raw_bytes = bytes(payload)
                nbytes = len(payload)
                runners: list[tuple[str, Callable[[], float]]] = [
                    ("tcp", lambda p=payload: tcp.roundtrip(p)),
                    ("tcp-relay", lambda p=payload: relay.roundtrip(p)),
                    *((n, lambda b=raw_bytes, r=r: r.roundtrip(b)) for n, r in raws.items()),
                    *((n, lambda a=acts, pr=pr: pr.roundtrip(a, next(steps)))
                      for n, pr in protos.items())]
                times: dict[str, list[float]] = {name: [] for name, _ in runners}
                for rep in range(args.warmup + args.reps):
                    order = runners[rep % len(runners):] + runners[:rep % len(runners)]
                    for name, fn in order:
                        dt = fn()
                        if rep >= args.warmup:
                            times[name].append(dt)
                med = {k: statistics.median(v) for k, v in times.items()}
                rows.append({"size_mb": size_mb, "bytes": nbytes,
                             **{f"{k}_s": v for k, v in med.items()},
                             **{f"{k}_all_s": v for k, v in times.items()},
                             **{f"{k}/tcp": med["tcp"] / med[k] for k in names[2:]},
                             **{f"{k}/relay": med["tcp-relay"] / med[k] for k in names[2:]},
                             "mqtt_s": med[main_name],
                             "ratio_relay": med["tcp"] / med["tcp-relay"],
                             "ratio_vs_relay": med["tcp-relay"] / med[main_name],
                             "ratio": med["tcp"] / med[main_name],
                             **{f"tls/plain-{b}": med[f"mqtt-{b}+tls"] / med[f"mqtt-{b}"]
                                for b in args.backends if f"mqtt-{b}+tls" in med}})
                console.print(f"{size_mb:g} MB done", style="dim")
        finally:
            for pr in protos.values():
                pr.close()
            for r in raws.values():
                r.close()
            relay.close()
            tcp.close()
    table = Table(title="Round trip through Mosquitto vs plain TCP and a store-and-forward "
                        "relay (loopback, median)")
    for col in ("size", "tcp ms", "relay ms", *(f"{k} ms" for k in names[2:]), "relay/tcp",
                *(f"{k}/relay" for k in names[2:]), f"{main_name}/tcp", "target"):
        table.add_column(col, justify="right")
    ok_all = True
    for r in rows:
        needs = r["size_mb"] >= 4
        ok = r["ratio_vs_relay"] >= TARGET_RELAY
        ok_all &= ok or not needs
        table.add_row(f"{r['size_mb']:g} MB", f"{1e3 * r['tcp_s']:.1f}",
                      f"{1e3 * r['tcp-relay_s']:.1f}",
                      *(f"{1e3 * r[f'{k}_s']:.1f}" for k in names[2:]),
                      f"{r['ratio_relay']:.2f}", *(f"{r[f'{k}/relay']:.2f}" for k in names[2:]),
                      f"{r['ratio']:.2f}", ("ok" if ok else "MISS") if needs else "-")
    console.print(table)
    for r in rows:  # one plain line per size, for logs and scripts
        print(f"mqtt/tcp throughput ratio at {r['size_mb']:g} MB: {r['ratio']:.3f} "
              f"(backend {default}; relay/tcp {r['ratio_relay']:.3f}, "
              f"mqtt/relay {r['ratio_vs_relay']:.3f})")
        print(f"  vs relay at {r['size_mb']:g} MB: " + ", ".join(
            f"{k} {r[f'{k}/relay']:.3f}" for k in names[2:]))
        if args.tls:  # the cost of TLS: time over TLS / time over plain MQTT, same library
            print(f"  tls/plain at {r['size_mb']:g} MB: " + ", ".join(
                f"{b} {r[f'tls/plain-{b}']:.3f}" for b in args.backends))
    eligible = any(r["size_mb"] >= 4 for r in rows)
    verdict = ("met" if ok_all else "NOT met") if eligible else "not measured (no size >= 4 MB)"
    console.print(f"{main_name} is the runtime's default (TESTBED_MQTT unset). Target: "
                  f"{main_name}/relay >= {TARGET_RELAY} at 4 MB and up: {verdict}. relay/tcp "
                  "is the ceiling of any store-and-forward broker path (four transfers per "
                  "round trip instead of two). raw-* = bare links of that library, no "
                  "protocol; mqtt-* = the full stack (encode, CRC, validation, decode).")
    load = os.getloadavg()
    console.print(f"load average {load[0]:.2f} on {os.cpu_count()} cores; "
                  f"torch threads {torch.get_num_threads()}; reps {args.reps} "
                  f"(+{args.warmup} warm-up); protocol chunk {args.chunk_mb[0]:g} MB; "
                  f"CRC-32 by {P.CRC32_IMPL}; libmosquitto {mqtt_native.version()}; "
                  f"{ssl.OPENSSL_VERSION}; CPU {_cpu_model()}")
    result = {"rows": rows, "target_relay": TARGET_RELAY,
              "target_met": ok_all if eligible else None, "default_backend": default,
              "backends": args.backends, "loadavg": load,
              "cpus": os.cpu_count(), "python": platform.python_version(),
              "torch": torch.__version__, "reps": args.reps, "warmup": args.warmup,
              "chunk_mb": args.chunk_mb, "crc32": P.CRC32_IMPL, "tls": args.tls,
              "openssl": ssl.OPENSSL_VERSION, "cpu": _cpu_model()}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

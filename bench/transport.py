"""Round-trip throughput of the MQTT transport against a plain TCP echo of the same bytes.

What is measured, per tensor size (default 1, 4, 16 and 64 MB), as the median round trip of
one message:

* **tcp**: the tensor's raw bytes sent over a loopback TCP socket to an echo server (a thread
  in this process) and read back: what the bytes cost with no broker and no protocol;
* **tcp-relay**: the same bytes through a store-and-forward TCP relay thread to an echo and
  back (:class:`TcpRelay`): a broker's topology without MQTT, the ceiling of any broker path;
* **mqtt-raw**: the same bytes published at QoS 1 by a paho client on a client's uplink topic,
  republished by an echo client (the server's credentials) to that client's downlink topic,
  received: the broker's cost (two hops through Mosquitto, each with PUBACK);
* **mqtt**: the full stack the runtime uses: a :class:`runner.transport.Transport` client
  sends an ``act`` message (activations ``[1, S, 1024]`` float32 of that size, plus mask and
  labels); the server Transport decodes and validates it (CRC, NaN check, shapes) and sends
  the activations back as a ``grad`` message; the client decodes it.

The ratio is TCP time / MQTT time (throughput of MQTT relative to TCP; 1.0 = as fast). The
issue's target is >= 0.5 for the full stack at 4 MB and up.

Why interleaved: the machine is shared (a training job may hold a core) and its speed drifts;
each repetition runs every variant back to back in a rotating order, so drift hits all of
them alike, and the first ``--warmup`` repetitions (socket buffers, allocator growth) are
dropped. Everything runs on 127.0.0.1 with a per-run Mosquitto from :mod:`runner.broker`
(auth and ACL on, as in a real run). Echo parties are threads of this process, for TCP and
MQTT alike.

Variants of the full stack can be measured side by side in the same interleaved run, each
through its own broker: ``--chunk-mb 1 4`` adds ``mqtt@4MB`` (the first size is the ``mqtt``
column), ``--broker-env KEY=VALUE ...`` adds ``mqtt+env``: the first chunk size through a
Mosquitto started with that environment (e.g. glibc malloc settings; an experiment, since the
runtime starts its broker with the plain environment).

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python bench/transport.py [--sizes 1 4 16 64] [--reps 5]
        [--warmup 1] [--chunk-mb 1 [4 ...]] [--broker-env KEY=VALUE ...] [--json PATH]

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
import statistics
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
import torch
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runner import protocol as P  # noqa: E402
from runner.broker import Broker, start_broker  # noqa: E402
from runner.transport import FastClient, Transport  # noqa: E402

RUN, RAW_RUN, CLIENT = "bench", "benchraw", "c0"
HIDDEN = 1024
MB = 1 << 20
TARGET = 0.5
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
class RawMqtt:
    """Two bare paho clients: the client publishes bytes, the echo republishes them back.

    On a broker of its own (another run), so its bytes never reach the protocol variant's
    subscribers (which would then spend time rejecting them).
    """

    def __init__(self, broker: Broker) -> None:
        self.up = P.topic(broker.run, P.Kind.ACT, CLIENT)
        self.down = P.topic(broker.run, P.Kind.GRAD, CLIENT)
        self.got = threading.Event()
        self.reply: bytes | bytearray = b""
        self.echo = self._client(broker, "server", "raw-echo")
        self.echo.on_message = lambda c, u, m: c.publish(self.down, m.payload, qos=1)
        self.cli = self._client(broker, CLIENT, "raw-client")
        self.cli.on_message = self._on_reply
        for c, t in ((self.echo, self.up), (self.cli, self.down)):
            c.subscribe(t, qos=1)
        time.sleep(0.3)  # SUBACKs

    @staticmethod
    def _client(broker: Broker, who: str, cid: str) -> mqtt.Client:
        c = FastClient(CallbackAPIVersion.VERSION2, client_id=cid,
                        protocol=MQTTProtocolVersion.MQTTv5)
        cred = broker.creds(who)
        c.username_pw_set(cred.username, cred.password)
        c.connect(broker.host, broker.port)
        c.loop_start()
        return c

    def _on_reply(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        self.reply = msg.payload
        self.got.set()

    def roundtrip(self, payload: bytes | bytearray) -> float:
        self.got.clear()
        t0 = time.perf_counter()
        self.cli.publish(self.up, payload, qos=1)
        if not self.got.wait(TIMEOUT):
            raise TimeoutError("raw MQTT echo timed out")
        dt = time.perf_counter() - t0
        assert len(self.reply) == len(payload)
        return dt

    def close(self) -> None:
        for c in (self.cli, self.echo):
            c.disconnect()
            c.loop_stop()


# ------------------------------------------------------------------------- mqtt protocol
class ProtocolEcho:
    """Client and server Transports; the server answers every act with its acts as grad."""

    def __init__(self, broker: Broker, chunk_size: int) -> None:
        self.srv = Transport(broker.address, broker.creds("server"), run=broker.run, me=P.SERVER,
                             clients=[CLIENT], chunk_size=chunk_size).connect()
        self.cli = Transport(broker.address, broker.creds(CLIENT), run=broker.run, me=CLIENT,
                             chunk_size=chunk_size).connect()
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
def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[1, 4, 16, 64], help="MB")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--chunk-mb", type=float, nargs="+", default=[P.DEFAULT_CHUNK / MB],
                    help="protocol chunk size(s) in MB; the first is the 'mqtt' column, each "
                         "other one an extra 'mqtt@<size>' variant (own broker), interleaved")
    ap.add_argument("--broker-env", nargs="+", default=[], metavar="KEY=VALUE",
                    help="also measure 'mqtt+env': the first chunk size through a Mosquitto "
                         "started with these environment variables (an experiment: the "
                         "runtime starts its broker with the plain environment)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    console = Console(width=200)
    torch.manual_seed(0)
    rows = []
    variants = [(f"mqtt@{c:g}MB" if i else "mqtt", c, {}) for i, c in enumerate(args.chunk_mb)]
    if args.broker_env:
        variants.append(("mqtt+env", args.chunk_mb[0],
                         dict(kv.split("=", 1) for kv in args.broker_env)))
    chunk_names = [name for name, _, _ in variants]
    with contextlib.ExitStack() as stack:
        raw_broker = stack.enter_context(start_broker(RAW_RUN, [CLIENT]))
        tcp, relay, raw = TcpEcho(), TcpRelay(), RawMqtt(raw_broker)
        protos: dict[str, ProtocolEcho] = {}
        for i, (name, chunk_mb, env) in enumerate(variants):
            saved = dict(os.environ)
            os.environ.update(env)  # the broker process inherits it (runner.broker)
            try:
                broker = stack.enter_context(start_broker(RUN if i == 0 else f"{RUN}{i}",
                                                          [CLIENT]))
            finally:
                os.environ.clear()
                os.environ.update(saved)
            protos[name] = ProtocolEcho(broker, int(chunk_mb * MB))
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
                    ("mqtt-raw", lambda b=raw_bytes: raw.roundtrip(b)),
                ] + [(name, lambda a=acts, pr=pr: pr.roundtrip(a, next(steps)))
                     for name, pr in protos.items()]
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
                             "ratio_raw": med["tcp"] / med["mqtt-raw"],
                             "ratio_relay": med["tcp"] / med["tcp-relay"],
                             "ratio_vs_relay": med["tcp-relay"] / med["mqtt"],
                             "ratio": med["tcp"] / med["mqtt"],
                             **{f"ratio_{k}": med["tcp"] / med[k] for k in chunk_names[1:]}})
                console.print(f"{size_mb:g} MB done", style="dim")
        finally:
            for pr in protos.values():
                pr.close()
            raw.close()
            relay.close()
            tcp.close()
    table = Table(title="Round trip through Mosquitto vs plain TCP (loopback, median)")
    for col in ("size", "tcp ms", "tcp MB/s", "relay ms", "mqtt-raw ms", "mqtt ms",
                "mqtt MB/s", "relay/tcp", "raw/tcp", "mqtt/tcp", "mqtt/relay", "target",
                *(f"{k} ms" for k in chunk_names[1:]), *(f"{k}/tcp" for k in chunk_names[1:])):
        table.add_column(col, justify="right")
    ok_all = True
    for r in rows:
        mbs = lambda s, r=r: 2 * r["bytes"] / MB / s  # noqa: E731 - both directions
        needs = r["size_mb"] >= 4
        ok = r["ratio"] >= TARGET
        ok_all &= ok or not needs
        table.add_row(f"{r['size_mb']:g} MB", f"{1e3 * r['tcp_s']:.1f}", f"{mbs(r['tcp_s']):.0f}",
                      f"{1e3 * r['tcp-relay_s']:.1f}", f"{1e3 * r['mqtt-raw_s']:.1f}",
                      f"{1e3 * r['mqtt_s']:.1f}", f"{mbs(r['mqtt_s']):.0f}",
                      f"{r['ratio_relay']:.2f}", f"{r['ratio_raw']:.2f}", f"{r['ratio']:.2f}",
                      f"{r['ratio_vs_relay']:.2f}", ("ok" if ok else "MISS") if needs else "-",
                      *(f"{1e3 * r[f'{k}_s']:.1f}" for k in chunk_names[1:]),
                      *(f"{r[f'ratio_{k}']:.2f}" for k in chunk_names[1:]))
    console.print(table)
    for r in rows:  # one plain line per size, for logs and scripts
        print(f"mqtt/tcp throughput ratio at {r['size_mb']:g} MB: {r['ratio']:.3f} "
              f"(relay/tcp {r['ratio_relay']:.3f}, mqtt/relay {r['ratio_vs_relay']:.3f})")
    eligible = any(r["size_mb"] >= 4 for r in rows)
    verdict = ("met" if ok_all else "NOT met") if eligible else "not measured (no size >= 4 MB)"
    console.print(f"ratio = TCP time / MQTT time (throughput relative to TCP). Target: mqtt/tcp "
                  f">= {TARGET} at 4 MB and up: {verdict}. relay/tcp is the ceiling of any "
                  "store-and-forward broker path (four transfers per round trip instead of "
                  "two); mqtt/relay is the full stack against that ceiling.")
    load = os.getloadavg()
    console.print(f"load average {load[0]:.2f} on {os.cpu_count()} cores; "
                  f"torch threads {torch.get_num_threads()}; reps {args.reps} "
                  f"(+{args.warmup} warm-up); protocol chunk {args.chunk_mb[0]:g} MB; "
                  f"CRC-32 by {P.CRC32_IMPL}")
    result = {"rows": rows, "target": TARGET, "target_met": ok_all if eligible else None,
              "loadavg": load,
              "cpus": os.cpu_count(), "python": platform.python_version(),
              "torch": torch.__version__, "reps": args.reps, "warmup": args.warmup,
              "chunk_mb": args.chunk_mb, "crc32": P.CRC32_IMPL}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

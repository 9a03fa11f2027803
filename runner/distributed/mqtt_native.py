"""libmosquitto (the C client library of Mosquitto) as a transport link, through ctypes.

Why: paho runs its network loop in Python, holding the GIL for every socket read and write,
packet parse and acknowledgement, on the same GIL as the sender, the decoder and the training
loop. libmosquitto does all of that in its own C thread with the GIL released; Python runs
only for the callbacks. What it costs instead: its publish copies the payload twice (into a
stored message, then into the packet) and its receive allocates and copies it once more, where
paho with :class:`runner.distributed.mqtt_paho.FastClient` copies none. Measured side by side
(bench/transport.py, docs/benchmarks.md) the copies win at 4-64 MB on the 2-core machines
here, so paho stays the default and this link is a choice (``TESTBED_MQTT=native``).

Why our own ctypes binding instead of a wrapper package: the registry's libmosquitto wrappers
(pymosquitto, ctypes-mosquitto) are ctypes bindings of the same library at 0.x versions; the
dozen functions used here are declared below against libmosquitto's stable 2.0 ABI, which
keeps the exact MQTT 5 callbacks (the PUBACK reason code, which tells a refused publish)
and lets a received payload reach the decoder as a view of libmosquitto's buffer (no copy:
the decoder copies it once, into the reassembled message). The library is Debian's
``libmosquitto1``, a dependency of the ``mosquitto`` broker package the testbed installs.

Semantics kept from the paho link: QoS 1, MQTT 5 or 3.1.1, username/password, a retained last
will, automatic reconnect with exponential backoff (whole seconds: libmosquitto's unit, so
delays below 1 s become 1 s), and an MQTT 5 session that survives reconnects but starts
clean on the first connect (paho's ``MQTT_CLEAN_START_FIRST_ONLY``; libmosquitto fixes
Clean Start per client, so a stale session of the same client id is ended first by a short
clean connection, :func:`_end_session`). One difference: libmosquitto sends the PUBACK of
an incoming QoS 1 message before its callback runs (paho after it).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes as C
import ctypes.util
import errno
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from runner.distributed.mqtt_link import (
    TLS_REFUSED,
    Link,
    LinkError,
    LinkEvents,
    Payload,
    Pending,
    TLSRefused,
    Will,
)
from runner.distributed.tls import ClientTLS

log = logging.getLogger(__name__)

# mosquitto.h (2.0)
_OPT_PROTOCOL_VERSION = 1
_OPT_TCP_NODELAY = 11
_SSL_VERIFY_PEER = 1
_OS_CA_PATH = "/etc/ssl/certs"  # the system's trust store, for a CA-less ClientTLS
_ERR_NO_CONN = 4
_ERR_TLS = 8
_TLS_FAILED = ("the TLS handshake failed: the broker's certificate is not signed by the CA "
               "given or does not name this host, or (mutual TLS) the broker refused ours")
_ERR_ERRNO = 14
_ERR_EAI = 15
_PROP_SESSION_EXPIRY = 17
_RC_DISCONNECT_WITH_WILL = 4
_MIN_VERSION = (2, 0)
# MQTT 3.1.1 CONNACK return codes, named as paho (and MQTT 5) name them.
_CONNACK_311 = {1: "Unsupported protocol version", 2: "Client identifier not valid",
                3: "Server unavailable", 4: "Bad user name or password", 5: "Not authorized"}


class _Message(C.Structure):
    _fields_ = [("mid", C.c_int), ("topic", C.c_char_p), ("payload", C.c_void_p),
                ("payloadlen", C.c_int), ("qos", C.c_int), ("retain", C.c_bool)]


_P = C.c_void_p
_ON_CONNECT = C.CFUNCTYPE(None, _P, _P, C.c_int, C.c_int, _P)
_ON_DISCONNECT = C.CFUNCTYPE(None, _P, _P, C.c_int, _P)
_ON_PUBLISH = C.CFUNCTYPE(None, _P, _P, C.c_int, C.c_int, _P)
_ON_MESSAGE = C.CFUNCTYPE(None, _P, _P, C.POINTER(_Message), _P)
_ON_SUBSCRIBE = C.CFUNCTYPE(None, _P, _P, C.c_int, C.c_int, C.POINTER(C.c_int), _P)

_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "mosquitto_lib_init": (C.c_int, []),
    "mosquitto_lib_version": (C.c_int, [C.POINTER(C.c_int)] * 3),
    "mosquitto_new": (_P, [C.c_char_p, C.c_bool, _P]),
    "mosquitto_destroy": (None, [_P]),
    "mosquitto_int_option": (C.c_int, [_P, C.c_int, C.c_int]),
    "mosquitto_username_pw_set": (C.c_int, [_P, C.c_char_p, C.c_char_p]),
    "mosquitto_tls_set": (C.c_int, [_P, C.c_char_p, C.c_char_p, C.c_char_p, C.c_char_p, _P]),
    "mosquitto_tls_opts_set": (C.c_int, [_P, C.c_int, C.c_char_p, C.c_char_p]),
    "mosquitto_tls_insecure_set": (C.c_int, [_P, C.c_bool]),
    "mosquitto_will_set_v5": (C.c_int, [_P, C.c_char_p, C.c_int, _P, C.c_int, C.c_bool, _P]),
    "mosquitto_reconnect_delay_set": (C.c_int, [_P, C.c_uint, C.c_uint, C.c_bool]),
    "mosquitto_connect_bind_v5": (C.c_int, [_P, C.c_char_p, C.c_int, C.c_int, C.c_char_p, _P]),
    "mosquitto_reconnect": (C.c_int, [_P]),
    "mosquitto_disconnect_v5": (C.c_int, [_P, C.c_int, _P]),
    "mosquitto_loop": (C.c_int, [_P, C.c_int, C.c_int]),
    "mosquitto_loop_start": (C.c_int, [_P]),
    "mosquitto_loop_stop": (C.c_int, [_P, C.c_bool]),
    "mosquitto_publish_v5": (C.c_int, [_P, C.POINTER(C.c_int), C.c_char_p, C.c_int, _P,
                                       C.c_int, C.c_bool, _P]),
    "mosquitto_subscribe_multiple": (C.c_int, [_P, C.POINTER(C.c_int), C.c_int,
                                               C.POINTER(C.c_char_p), C.c_int, C.c_int, _P]),
    "mosquitto_socket": (C.c_int, [_P]),
    "mosquitto_strerror": (C.c_char_p, [C.c_int]),
    "mosquitto_reason_string": (C.c_char_p, [C.c_int]),
    "mosquitto_property_add_int32": (C.c_int, [C.POINTER(_P), C.c_int, C.c_uint32]),
    "mosquitto_property_free_all": (None, [C.POINTER(_P)]),
    "mosquitto_connect_v5_callback_set": (None, [_P, _ON_CONNECT]),
    "mosquitto_disconnect_v5_callback_set": (None, [_P, _ON_DISCONNECT]),
    "mosquitto_publish_v5_callback_set": (None, [_P, _ON_PUBLISH]),
    "mosquitto_message_v5_callback_set": (None, [_P, _ON_MESSAGE]),
    "mosquitto_subscribe_v5_callback_set": (None, [_P, _ON_SUBSCRIBE]),
}

_lib: C.CDLL | None = None
_lib_error: str | None = None
_lib_lock = threading.Lock()


def library() -> C.CDLL | None:
    """The loaded libmosquitto (>= 2.0) with its signatures declared, or None (see
    :func:`unavailable`). Loaded once per process."""
    global _lib, _lib_error
    with _lib_lock:
        if _lib is None and _lib_error is None:
            try:
                _lib = _load()
            except (OSError, AttributeError) as e:
                _lib_error = str(e)
        return _lib


def unavailable() -> str | None:
    """Why the native client cannot be used here (None: it can)."""
    library()
    return _lib_error


def version() -> tuple[int, int, int] | None:
    lib = library()
    if lib is None:
        return None
    v = [C.c_int(), C.c_int(), C.c_int()]
    lib.mosquitto_lib_version(*(C.byref(x) for x in v))
    return v[0].value, v[1].value, v[2].value


def _load() -> C.CDLL:
    names = [os.environ.get("TESTBED_LIBMOSQUITTO"), "libmosquitto.so.1",
             ctypes.util.find_library("mosquitto")]
    errors = []
    for name in filter(None, names):
        try:
            lib = C.CDLL(name, use_errno=True)
            break
        except OSError as e:
            errors.append(str(e))
    else:
        raise OSError("libmosquitto not found (apt-get install libmosquitto1): "
                      + "; ".join(errors))
    for fn, (restype, argtypes) in _SIGNATURES.items():
        f = getattr(lib, fn)
        f.restype, f.argtypes = restype, argtypes
    v = [C.c_int(), C.c_int(), C.c_int()]
    lib.mosquitto_lib_version(*(C.byref(x) for x in v))
    if (v[0].value, v[1].value) < _MIN_VERSION:
        raise OSError(f"libmosquitto {v[0].value}.{v[1].value} is older than 2.0")
    lib.mosquitto_lib_init()
    return lib


def _lib_or_raise() -> C.CDLL:
    lib = library()
    if lib is None:
        raise LinkError(f"native MQTT client unavailable: {_lib_error}")
    return lib


def _strerror(rc: int) -> str:
    return _lib_or_raise().mosquitto_strerror(rc).decode()


def _raise_connect_error(rc: int, host: str, port: int, tls: bool = False) -> None:
    if rc == _ERR_ERRNO:
        err = C.get_errno()
        if tls and err == errno.EPROTO:  # a TLS alert from the broker during the handshake
            raise TLSRefused(f"{host}:{port}: {_TLS_FAILED}")
        raise OSError(err, f"{os.strerror(err)} ({host}:{port})")
    if rc == _ERR_EAI:
        raise OSError(f"cannot resolve {host!r}")
    if rc == _ERR_TLS:  # the handshake failed for good
        raise TLSRefused(f"{host}:{port}: {_TLS_FAILED}")
    raise OSError(f"{_strerror(rc)} ({host}:{port})")


def _buffer(payload: Payload) -> tuple[Any, int, Any]:
    """A pointer to the payload's bytes where they lie (libmosquitto copies them), their
    length, and what must stay alive until the call returns."""
    if isinstance(payload, bytes):
        return payload, len(payload), None
    mv = memoryview(payload)
    n = mv.nbytes
    if not n:
        return None, 0, None
    if not mv.c_contiguous:
        data = mv.tobytes()
        return data, n, None
    if mv.readonly:  # e.g. a received view, published again: numpy gives its address
        arr = np.frombuffer(mv, dtype=np.uint8)
        return arr.ctypes.data, n, arr
    return (C.c_char * n).from_buffer(mv), n, None


_view_from_memory = C.pythonapi.PyMemoryView_FromMemory
_view_from_memory.restype = C.py_object
_view_from_memory.argtypes = [C.c_void_p, C.c_ssize_t, C.c_int]
_PyBUF_READ = 0x100


def _view(address: int, n: int) -> memoryview:
    """A read-only, byte-format memoryview of ``n`` bytes at ``address`` (no copy)."""
    return _view_from_memory(address, n, _PyBUF_READ)


class _Acked(Pending):
    __slots__ = ("mid", "_done")

    def __init__(self, mid: int):
        self.mid = mid
        self._done = threading.Event()

    def wait(self, deadline: float) -> bool:
        return self._done.wait(max(0.0, deadline - time.monotonic()))


_LIVE: set[NativeLink] = set()  # links whose network thread runs: kept alive until stopped


@atexit.register
def _stop_all() -> None:
    """Stop every network thread before the interpreter goes (a C thread calling back into
    a finalising interpreter would crash it). A link still open here belongs to a process
    that exits without closing its transport: it leaves as a crashed one does, with its last
    will published (a paho client's socket would just close)."""
    for link in list(_LIVE):
        link.disconnect(with_will=True)
        link.stop()


class NativeLink(Link):
    """One libmosquitto client (``struct mosquitto``) with its network thread.

    ``tls``: libmosquitto's own TLS (OpenSSL): the broker's certificate verified against the
    CA (``SSL_VERIFY_PEER``) and its subjectAltName checked against the host dialled
    (``tls_insecure`` stays false); with mutual TLS our certificate and key presented."""

    backend = "native"

    def __init__(self, events: LinkEvents, *, client_id: str, v5: bool, username: str,
                 password: str, will: Will, reconnect: tuple[float, float],
                 zero_copy: bool = True, tls: ClientTLS | None = None):
        self.lib = _lib_or_raise()
        self.tls = tls
        if tls is not None:
            tls.check_files()
        self.events = events
        self.v5 = v5
        self.client_id = client_id
        self.zero_copy = zero_copy
        self._auth = (username.encode(), password.encode())
        self._lock = threading.Lock()
        self._users = threading.Condition()  # app-thread calls in progress on the handle
        self._busy = 0
        self._waiting: dict[int, _Acked] = {}
        self._early: dict[int, None] = {}  # PUBACKs that beat their publish() return
        self._started = False
        self._first = True
        self._connacked = False  # a CONNACK came: later TLS failures are network trouble
        m = self.lib.mosquitto_new(client_id.encode(), not v5, None)
        if not m:
            raise LinkError("mosquitto_new failed (out of memory or invalid client id)")
        self._m: int | None = m
        try:
            self._setup(m)
            data, n, _keep = _buffer(will.payload)
            self._check(self.lib.mosquitto_will_set_v5(m, will.topic.encode(), n, data, 1,
                                                       will.retain, None), "will")
        except LinkError:
            self.lib.mosquitto_destroy(m)
            self._m = None
            raise
        lo = max(1, math.ceil(reconnect[0]))
        self.lib.mosquitto_reconnect_delay_set(m, lo, max(lo, math.ceil(reconnect[1])), True)
        # the callbacks must outlive every call the C thread can make: kept on the link
        self._cbs = (_ON_CONNECT(self._on_connect), _ON_DISCONNECT(self._on_disconnect),
                     _ON_PUBLISH(self._on_publish), _ON_MESSAGE(self._on_message),
                     _ON_SUBSCRIBE(self._on_subscribe))
        for setter, cb in zip(("connect", "disconnect", "publish", "message", "subscribe"),
                              self._cbs, strict=True):
            getattr(self.lib, f"mosquitto_{setter}_v5_callback_set")(m, cb)

    def _setup(self, m: int) -> None:
        self.lib.mosquitto_int_option(m, _OPT_PROTOCOL_VERSION, 5 if self.v5 else 4)
        self.lib.mosquitto_int_option(m, _OPT_TCP_NODELAY, 1)
        self._check(self.lib.mosquitto_username_pw_set(m, *self._auth), "credentials")
        tls = self.tls
        if tls is not None:
            enc = (lambda p: None if p is None else p.encode())  # noqa: E731
            self._check(self.lib.mosquitto_tls_set(
                m, enc(tls.ca), None if tls.ca else _OS_CA_PATH.encode(), enc(tls.cert),
                enc(tls.key), None), "TLS files")
            self._check(self.lib.mosquitto_tls_opts_set(m, _SSL_VERIFY_PEER, b"tlsv1.2",
                                                        None), "TLS options")
            self._check(self.lib.mosquitto_tls_insecure_set(m, False), "TLS name check")

    def _check(self, rc: int, what: str) -> None:
        if rc:
            raise LinkError(f"{what}: {_strerror(rc)}")

    @contextlib.contextmanager
    def _handle(self) -> Iterator[int]:
        """The client handle, kept alive (not destroyed by :meth:`stop`) while in use."""
        with self._users:
            if self._m is None:
                raise LinkError("link closed")
            self._busy += 1
            m = self._m
        try:
            yield m
        finally:
            with self._users:
                self._busy -= 1
                self._users.notify_all()

    # ----------------------------------------------------------------------- lifecycle
    def connect(self, host: str, port: int, keepalive: int,
                session_expiry: int | None) -> None:
        with self._handle() as m:
            self._connect(m, host, port, keepalive, session_expiry)

    def _connect(self, m: int, host: str, port: int, keepalive: int,
                 session_expiry: int | None) -> None:
        if self.v5 and self._first:
            _end_session(self.lib, self, host, port)
        self._first = False
        props = _P()
        try:
            if self.v5 and session_expiry:
                self.lib.mosquitto_property_add_int32(C.byref(props), _PROP_SESSION_EXPIRY,
                                                      session_expiry)
            rc = self.lib.mosquitto_connect_bind_v5(m, host.encode(), port, keepalive, None,
                                                    props)
        finally:
            self.lib.mosquitto_property_free_all(C.byref(props))
        if rc:
            _raise_connect_error(rc, host, port, self.tls is not None)
        self._check(self.lib.mosquitto_loop_start(m), "loop_start")
        self._started = True
        _LIVE.add(self)

    def disconnect(self, with_will: bool = False) -> None:
        with contextlib.suppress(LinkError), self._handle() as m:
            if with_will and not self.v5:  # 3.1.1 has no "disconnect with will": drop it
                self._shutdown_socket(m)
            self.lib.mosquitto_disconnect_v5(m, _RC_DISCONNECT_WITH_WILL if with_will else 0,
                                             None)

    def stop(self) -> None:
        with self._users:
            m, self._m = self._m, None
            while self._busy:
                self._users.wait()
        if m is None:
            return
        # loop_stop returns once the thread sees the "disconnecting" state (set here even
        # when no connection is up); then nothing can call back any more.
        self.lib.mosquitto_disconnect_v5(m, 0, None)
        if self._started:
            self.lib.mosquitto_loop_stop(m, False)
        self.lib.mosquitto_destroy(m)
        _LIVE.discard(self)

    def outage(self, seconds: float, sleep: Callable[[float], None]) -> None:
        with self._handle() as m:
            self._outage(m, seconds, sleep)

    def _outage(self, m: int, seconds: float, sleep: Callable[[float], None]) -> None:
        self._shutdown_socket(m)  # no DISCONNECT: the broker publishes the will
        self.lib.mosquitto_disconnect_v5(m, 0, None)  # the thread must not reconnect yet
        self.lib.mosquitto_loop_stop(m, False)
        sleep(seconds)
        while True:
            rc = self.lib.mosquitto_reconnect(m)
            if rc == 0:
                break
            log.info("%s: reconnect after the outage failed (%s); retrying", self.client_id,
                     _strerror(rc))
            sleep(1.0)
        self._check(self.lib.mosquitto_loop_start(m), "loop_start")

    def _shutdown_socket(self, m: int) -> None:
        fd = self.lib.mosquitto_socket(m)
        if fd < 0:
            return
        try:
            with socket.socket(fileno=os.dup(fd)) as s:
                s.shutdown(socket.SHUT_RDWR)
        except OSError as e:
            log.debug("%s: shutdown: %s", self.client_id, e)

    # -------------------------------------------------------------------------- traffic
    def publish(self, topic: str, payload: Payload, retain: bool = False) -> Pending:
        mid = C.c_int(0)
        data, n, _keep = _buffer(payload)
        with self._handle() as m:
            rc = self.lib.mosquitto_publish_v5(m, C.byref(mid), topic.encode(), n, data, 1,
                                               retain, None)
        # NO_CONN: libmosquitto queued the message and sends it after the reconnect.
        if rc not in (0, _ERR_NO_CONN):
            raise LinkError(_strerror(rc))
        pending = _Acked(mid.value)
        with self._lock:
            if self._early.pop(mid.value, 0) is None:
                pending._done.set()
            else:
                self._waiting[mid.value] = pending
        return pending

    def subscribe(self, filters: list[str]) -> int:
        mid = C.c_int(0)
        arr = (C.c_char_p * len(filters))(*(f.encode() for f in filters))
        with self._handle() as m:
            rc = self.lib.mosquitto_subscribe_multiple(m, C.byref(mid), len(filters), arr, 1,
                                                       0, None)
        if rc:
            raise LinkError(f"subscribe failed: {_strerror(rc)}")
        return mid.value

    # ------------------------------------------------------------ callbacks (C thread)
    def _on_connect(self, m: int, obj: int, rc: int, flags: int, props: int) -> None:
        self._connacked = True
        try:
            if rc == 0:
                self.events.link_connected(True, "Success")
            else:
                reason = (self.lib.mosquitto_reason_string(rc).decode() if self.v5
                          else _CONNACK_311.get(rc, f"refused ({rc})"))
                self.events.link_connected(False, reason)
        except Exception:  # noqa: BLE001 - an exception must not cross into C
            log.exception("%s: on_connect failed", self.client_id)

    def _on_disconnect(self, m: int, obj: int, rc: int, props: int) -> None:
        try:
            if rc == _ERR_TLS and not self._connacked:  # TLS 1.3: our certificate refused
                self.events.link_connected(False, f"{TLS_REFUSED}: {_strerror(rc)}")
            self.events.link_disconnected("Normal disconnection" if rc == 0 else _strerror(rc))
        except Exception:  # noqa: BLE001
            log.exception("%s: on_disconnect failed", self.client_id)

    def _on_publish(self, m: int, obj: int, mid: int, rc: int, props: int) -> None:
        try:
            failure = self.lib.mosquitto_reason_string(rc).decode() if rc >= 0x80 else None
            self.events.link_published(mid, failure)  # before the publisher wakes up
            with self._lock:
                pending = self._waiting.pop(mid, None)
                if pending is None:
                    self._early[mid] = None
            if pending is not None:
                pending._done.set()
        except Exception:  # noqa: BLE001
            log.exception("%s: on_publish failed", self.client_id)

    def _on_subscribe(self, m: int, obj: int, mid: int, count: int, codes: Any,
                      props: int) -> None:
        try:
            self.events.link_subscribed(mid, [codes[i] for i in range(count)])
        except Exception:  # noqa: BLE001
            log.exception("%s: on_subscribe failed", self.client_id)

    def _on_message(self, m: int, obj: int, msgp: Any, props: int) -> None:
        try:
            msg = msgp.contents
            topic = (msg.topic or b"").decode("utf-8", "replace")
            n = msg.payloadlen
            if n <= 0:
                self.events.link_message(topic, b"")
                return
            if not self.zero_copy:
                buf = bytearray(n)
                C.memmove((C.c_char * n).from_buffer(buf), msg.payload, n)
                self.events.link_message(topic, buf)
                return
            # A read-only view of libmosquitto's buffer, valid during this call only: the
            # decoder copies what it keeps (protocol/decoder.py's _build_message copies
            # read-only payloads; chunks are copied into the reassembly buffer).
            with _view(msg.payload, n) as view:
                self.events.link_message(topic, view)
        except Exception:  # noqa: BLE001
            log.exception("%s: on_message failed", self.client_id)


def _end_session(lib: C.CDLL, link: NativeLink, host: str, port: int,
                 timeout: float = 5.0) -> None:
    """End any MQTT 5 session the broker holds for this client id (Clean Start, no expiry).

    libmosquitto sends one Clean Start flag for every connect of a client; the transport
    wants a clean session on the first connect and the same session after reconnects
    (paho's "clean start first only"), so the first connect is preceded by this one.
    """
    m = lib.mosquitto_new(link.client_id.encode(), True, None)
    if not m:
        raise LinkError("mosquitto_new failed")
    answered: list[int] = []
    cb = _ON_CONNECT(lambda *a: answered.append(a[2]))
    try:
        link._setup(m)
        lib.mosquitto_connect_v5_callback_set(m, cb)
        rc = lib.mosquitto_connect_bind_v5(m, host.encode(), port, 10, None, None)
        if rc:
            _raise_connect_error(rc, host, port, link.tls is not None)
        deadline = time.monotonic() + timeout
        while not answered and time.monotonic() < deadline:
            rc = lib.mosquitto_loop(m, 100, 1)
            if rc:
                # libmosquitto finishes the handshake in its loop; and with TLS 1.3 the
                # broker refuses a client certificate (or its absence) only after our side
                # of the handshake, closing before any CONNACK
                if link.tls is not None:
                    raise TLSRefused(f"{host}:{port}: {_TLS_FAILED} ({_strerror(rc)})")
                break
        lib.mosquitto_disconnect_v5(m, 0, None)
    finally:
        lib.mosquitto_destroy(m)

"""The CRC-32 the envelope's checksums use, and how to combine two of them.

Its own module because both sides lean on it (the encoder for every chunk it makes, the
decoder for every chunk it takes in, the receiver to check a reassembled payload), and
neither side's code should carry the other's. ``_crc32`` is ISA-L's CRC-32 where the
``isal`` package is installed (the same values as ``zlib.crc32``, much faster), else zlib's;
:data:`CRC32_IMPL` says which one (bench/transport.py records it). :func:`crc32_combine`
gives the CRC of a whole chunked payload from its chunks' CRCs, so no side reads the bytes
twice.
"""

from __future__ import annotations

import zlib

try:  # ISA-L's CRC-32: the same checksum as zlib.crc32 (same polynomial, same values), ~10x
    # faster (carry-less multiply); the hot path of both sides runs one per byte sent.
    from isal.isal_zlib import crc32 as _crc32
    CRC32_IMPL = "isal"
except ImportError:  # pragma: no cover - depends on the environment
    _crc32 = zlib.crc32
    CRC32_IMPL = "zlib"


def _multmodp(a: int, b: int) -> int:
    """a * b modulo the CRC-32 polynomial (reflected), as zlib's crc32_combine does it."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if not a & (m - 1):
                return p
        m >>= 1
        b = (b >> 1) ^ 0xEDB88320 if b & 1 else b >> 1


_X2N = [1 << 30]  # x^(2^k) mod P, k = 0..31
for _ in range(31):
    _X2N.append(_multmodp(_X2N[-1], _X2N[-1]))


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of A + B from crc(A), crc(B) and len(B) (zlib's crc32_combine, which Python's
    zlib does not expose): the whole-payload CRC of a chunked message without a second pass
    over its bytes, on either side."""
    p, n, k = 1 << 31, len2, 3  # x^0; len2 bytes = x^(8 len2) = x^(2^3 len2)
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return _multmodp(p, crc1) ^ crc2

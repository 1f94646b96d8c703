"""CRC32C: the checksum of every checkpoint file, computed while bytes are written.

CRC32C runs in hardware (SSE4.2 / ARMv8 CRC) through google-crc32c, about ten times faster than sha256 on one
core, and both S3 (``x-amz-checksum-crc32c``) and GCS (``crc32c``) verify it natively on upload. In the
manifest it is 8 lowercase hex digits; on the wire both clouds use base64 of the 4 big-endian bytes.
"""

from __future__ import annotations

import base64
import functools
import io
from collections.abc import Sequence
from typing import BinaryIO

import google_crc32c
from zlib_ng import zlib_ng

__all__ = [
    "CRC32C_POLY",
    "CRC32_POLY",
    "ChecksumWriter",
    "combine",
    "crc32",
    "crc32c",
    "extend",
    "from_b64",
    "from_hex",
    "to_b64",
    "to_hex",
]

CRC32C_POLY = 0x82F63B78  # reflected Castagnoli polynomial
CRC32_POLY = 0xEDB88320  # reflected IEEE polynomial (zlib's crc32)


SLICE = 2**20


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """The CRC32C of ``data`` (continuing ``crc``), in 1 MiB slices: google-crc32c holds the GIL while it runs,
    and a background save or a parallel download must let other threads run between slices."""
    if len(data) <= SLICE:
        return int(google_crc32c.extend(crc, _readonly(data))) if crc else int(google_crc32c.value(_readonly(data)))
    view = memoryview(data)
    for start in range(0, len(view), SLICE):
        crc = int(google_crc32c.extend(crc, view[start : start + SLICE].tobytes()))
    return crc


def crc32(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """The CRC32 (zlib's, IEEE) of ``data``, continuing ``crc``: the checksum boto3 gives every upload by default,
    so most S3 datasets carry it. zlib-ng's SIMD CRC32 (PCLMUL / ARMv8) runs ~4.5x faster than the standard
    library's zlib here (0.16 vs 0.75 CPU-s per 1.5 GB): on a pull it was half a CPU-second of every GiB."""
    return int(zlib_ng.crc32(data, crc))


def extend(crc: int, data: bytes | bytearray | memoryview) -> int:
    """Continue ``crc`` over ``data``."""
    return int(google_crc32c.extend(crc, _readonly(data)))


def _readonly(data: bytes | bytearray | memoryview) -> bytes:
    # google-crc32c accepts only bytes; a memoryview or bytearray is copied (serializers mostly hand bytes).
    return data if isinstance(data, bytes) else bytes(data)


def combine(crc1: int, crc2: int, len2: int, poly: int = CRC32C_POLY) -> int:
    """The CRC of ``A + B`` from ``crc(A)``, ``crc(B)`` and ``len(B)``, without the data (as zlib's crc32_combine).

    Pieces of one object fetched in parallel are checksummed as they arrive and combined in order: the whole
    object is never read twice. Works for CRC32C (default) and CRC32 (``poly=CRC32_POLY``). The operator that
    appends ``len2`` zero bytes is built once per length (pieces mostly share one) and cached.
    """
    if len2 <= 0:
        return crc1
    return _gf2_times(_zeros_operator(len2, poly), crc1) ^ crc2


@functools.lru_cache(maxsize=64)
def _zeros_operator(nbytes: int, poly: int) -> tuple[int, ...]:
    """The GF(2) matrix (column n: the image of bit n) that feeds ``nbytes`` zero bytes through the CRC."""
    op = [poly] + [1 << n for n in range(31)]  # one zero bit
    for _ in range(3):
        op = _gf2_compose(op, op)  # one zero byte
    result = [1 << n for n in range(32)]
    while nbytes:
        if nbytes & 1:
            result = _gf2_compose(op, result)
        op = _gf2_compose(op, op)
        nbytes >>= 1
    return tuple(result)


def _gf2_times(matrix: Sequence[int], vector: int) -> int:
    total, n = 0, 0
    while vector:
        if vector & 1:
            total ^= matrix[n]
        vector >>= 1
        n += 1
    return total


def _gf2_compose(outer: Sequence[int], inner: Sequence[int]) -> list[int]:
    return [_gf2_times(outer, column) for column in inner]


def to_hex(crc: int) -> str:
    return f"{crc:08x}"


def from_hex(text: str) -> int:
    return int(text, 16)


def to_b64(crc: int) -> str:
    return base64.b64encode(crc.to_bytes(4, "big")).decode("ascii")


def from_b64(text: str) -> int:
    raw = base64.b64decode(text)
    if len(raw) != 4:
        raise ValueError(f"not a base64 CRC32C: {text!r}")
    return int.from_bytes(raw, "big")


class ChecksumWriter(io.RawIOBase):
    """A write-only file that forwards to ``sink`` while counting bytes and extending a CRC32C.

    Serializers (``torch.save``, safetensors) write through it, so the size and checksum are known the moment
    the last byte is written — no second pass over the data.
    """

    def __init__(self, sink: BinaryIO) -> None:
        super().__init__()
        self._sink = sink
        self.crc = 0
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        chunk = _readonly(data)
        self.crc = int(google_crc32c.extend(self.crc, chunk))
        self.size += len(chunk)
        self._sink.write(chunk)
        return len(chunk)

"""CRC32C: the checksum of every checkpoint file, computed while bytes are written.

CRC32C runs in hardware (SSE4.2 / ARMv8 CRC) through google-crc32c, about ten times faster than sha256 on one
core, and both S3 (``x-amz-checksum-crc32c``) and GCS (``crc32c``) verify it natively on upload. In the
manifest it is 8 lowercase hex digits; on the wire both clouds use base64 of the 4 big-endian bytes.
"""

from __future__ import annotations

import base64
import io
from typing import BinaryIO

import google_crc32c

__all__ = ["ChecksumWriter", "crc32c", "extend", "from_b64", "from_hex", "to_b64", "to_hex"]


SLICE = 2**20


def crc32c(data: bytes | bytearray | memoryview) -> int:
    """The CRC32C of ``data``, in 1 MiB slices: google-crc32c holds the GIL while it runs, and a background
    save must let the training thread run between slices."""
    if len(data) <= SLICE:
        return int(google_crc32c.value(_readonly(data)))
    view = memoryview(data)
    crc = 0
    for start in range(0, len(view), SLICE):
        crc = int(google_crc32c.extend(crc, view[start : start + SLICE].tobytes()))
    return crc


def extend(crc: int, data: bytes | bytearray | memoryview) -> int:
    """Continue ``crc`` over ``data``."""
    return int(google_crc32c.extend(crc, _readonly(data)))


def _readonly(data: bytes | bytearray | memoryview) -> bytes:
    # google-crc32c accepts only bytes; a memoryview or bytearray is copied (serializers mostly hand bytes).
    return data if isinstance(data, bytes) else bytes(data)


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

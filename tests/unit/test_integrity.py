"""Checksums of downloads: the store's preferred one computed, pieces' CRCs combined without the data."""

from __future__ import annotations

import hashlib
import os
import zlib

import pytest

from sdk import checksum
from sdk.integrity import Digest, matches


@pytest.mark.parametrize(("first", "second"), [(0, 5), (5, 0), (1, 1), (1000, 3), (3, 2**20 + 7), (2**21, 2**21)])
def test_combining_two_crcs_equals_the_crc_of_the_joined_bytes(first: int, second: int) -> None:
    """combine(crc(A), crc(B), len(B)) == crc(A + B) for CRC32C and CRC32 (zlib)."""
    a, b = os.urandom(first), os.urandom(second)
    assert checksum.combine(checksum.crc32c(a), checksum.crc32c(b), second) == checksum.crc32c(a + b)
    assert checksum.combine(zlib.crc32(a), zlib.crc32(b), second, checksum.CRC32_POLY) == zlib.crc32(a + b)


def test_the_store_s_strongest_checksum_is_chosen_and_compared() -> None:
    """CRC32C before CRC32 before MD5 before the ETag hint; nothing offered means nothing to fail."""
    data = os.urandom(10_000)
    md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
    offered = {"etag_md5": md5, "md5": md5, "crc32": zlib.crc32(data), "crc32c": checksum.crc32c(data)}
    assert Digest.of(data, offered).name == "crc32c" and matches(Digest.of(data, offered), offered)
    for name in ("crc32c", "crc32", "md5"):
        offered.pop(name)
        digest = Digest.of(data, offered)
        assert digest.name != name and matches(digest, offered)
    assert not matches(Digest.of(data[:-1] + b"x", offered), offered)
    assert Digest.of(data, {}).name == "none" and matches(Digest.of(data, {}), {})


def test_pieces_combine_in_order_and_a_flipped_byte_shows() -> None:
    """Digest.combine over pieces equals the whole's CRC; one altered byte in any piece does not match."""
    data = os.urandom(300_000)
    sums = {"crc32c": checksum.crc32c(data)}
    pieces = [data[i : i + 65536] for i in range(0, len(data), 65536)]
    parts = [(Digest.of(p, sums), len(p)) for p in pieces]
    assert matches(Digest.combine(parts), sums)
    pieces[2] = b"\x00" + pieces[2][1:] if pieces[2][0] else b"\x01" + pieces[2][1:]
    parts = [(Digest.of(p, sums), len(p)) for p in pieces]
    assert not matches(Digest.combine(parts), sums)


def test_the_fast_crc32_is_zlib_s_crc32_for_bytes_and_buffers_and_continues() -> None:
    """checksum.crc32 (zlib-ng) gives the standard library's values, over bytes and memoryviews, in pieces too."""
    data = os.urandom(3 * 2**20 + 17)
    assert checksum.crc32(data) == zlib.crc32(data)
    view = memoryview(bytearray(data))
    assert checksum.crc32(view[1000:]) == zlib.crc32(data[1000:])
    assert checksum.crc32(data[5:], checksum.crc32(data[:5])) == zlib.crc32(data)
    assert checksum.crc32(b"") == 0

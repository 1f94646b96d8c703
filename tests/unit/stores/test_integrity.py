"""Checksums of downloads: the store's preferred one computed, pieces' CRCs combined without the data."""

from __future__ import annotations

import hashlib
import itertools
import os
import zlib

import pytest

from sdk.stores import checksum
from sdk.stores.integrity import Digest, PartCheck, matches


@pytest.mark.parametrize(("first", "second"), [(0, 5), (5, 0), (1, 1), (1000, 3), (3, 2**20 + 7), (2**21, 2**21)])
def test_combining_two_crcs_equals_the_crc_of_the_joined_bytes(first: int, second: int) -> None:
    """combine(crc(A), crc(B), len(B)) == crc(A + B) for CRC32C and CRC32 (zlib)."""
    a, b = os.urandom(first), os.urandom(second)
    assert checksum.combine(checksum.crc32c(a), checksum.crc32c(b), second) == checksum.crc32c(a + b)
    assert checksum.combine(zlib.crc32(a), zlib.crc32(b), second, checksum.CRC32_POLY) == zlib.crc32(a + b)


def test_the_store_s_strongest_checksum_is_chosen_and_compared() -> None:
    """CRC32C before CRC32 before MD5 before the ETag hint; nothing offered means nothing to fail."""
    data = os.urandom(9_999) + b"x"  # ends in the byte a careless change would write: the change must still show
    md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
    offered = {"etag_md5": md5, "md5": md5, "crc32": zlib.crc32(data), "crc32c": checksum.crc32c(data)}
    assert Digest.of(data, offered).name == "crc32c" and matches(Digest.of(data, offered), offered)
    for name in ("crc32c", "crc32", "md5"):
        offered.pop(name)
        digest = Digest.of(data, offered)
        assert digest.name != name and matches(digest, offered)
    assert not matches(Digest.of(data[:-1] + bytes([data[-1] ^ 1]), offered), offered)  # the last byte, changed
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


# -- multipart uploads: checked through their parts (sdk.stores.integrity.PartCheck) ---------------------------------
def _cut(data: bytes, sizes: list[int]) -> list[bytes]:
    out, start = [], 0
    for size in sizes:
        out.append(data[start : start + size])
        start += size
    return out


def _pieces(check: PartCheck, data: bytes, bounds: list[int]) -> list[tuple[int, int, int, object]]:
    """Every segment of ``data`` cut at ``bounds`` into pieces, digested piece by piece in a scrambled order."""
    edges = [0, *bounds, len(data)]
    pieces = [(a, data[a:b]) for a, b in itertools.pairwise(edges) if b > a]
    return [seg for start, piece in reversed(pieces) for seg in check.piece(start, piece)]


SIZES = [5000, 5000, 5000, 1234]
CUTS = [[], [100], [4999, 5001], [3000, 6000, 9000, 12000, 15000], [5000, 10000, 15000], list(range(7, 16234, 777))]


@pytest.mark.parametrize("bounds", CUTS, ids=[f"cut{n}" for n in range(len(CUTS))])
@pytest.mark.parametrize("name", ["crc32c_parts", "crc32_parts", "md5_parts"])
def test_a_part_checksum_is_combined_as_s3_does_from_pieces_cut_anywhere(name: str, bounds: list[int]) -> None:
    """COMPOSITE CRC = the CRC of the parts' CRCs (4 big-endian bytes each); multipart ETag = the MD5 of the parts'
    MD5s, "-N": computed here from pieces cut anywhere (across part boundaries, inside parts, arriving in any
    order), MD5s of split parts read back; one flipped byte in any piece does not match."""
    data = os.urandom(sum(SIZES))
    parts = _cut(data, SIZES)
    if name == "md5_parts":
        joined = b"".join(hashlib.md5(p, usedforsecurity=False).digest() for p in parts)
        expected: int | str = f"{hashlib.md5(joined, usedforsecurity=False).hexdigest()}-{len(parts)}"
    else:
        crc = checksum.crc32c if name == "crc32c_parts" else zlib.crc32
        expected = crc(b"".join(crc(p).to_bytes(4, "big") for p in parts))
    check = PartCheck(name, expected, SIZES)
    read_back: list[tuple[int, int]] = []

    def landed(offset: int, length: int, source: bytes = data) -> bytes:
        read_back.append((offset, length))
        return source[offset : offset + length]

    assert check.check(_pieces(check, data, bounds), landed) == ""
    if name != "md5_parts" or bounds in ([], [5000, 10000, 15000]):
        assert read_back == [], "bytes hashed as they arrived were read again"
    for at in (0, 4999, 5000, len(data) - 1):
        bad = data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :]
        problem = check.check(_pieces(check, bad, bounds), lambda o, n, b=bad: b[o : o + n])
        assert problem.startswith(name) and "4 parts" in problem


def test_a_single_part_md5_of_an_object_fetched_in_ranges_is_read_back_in_order() -> None:
    """An object's own MD5 (a single-part ETag) over pieces that arrive in any order: read back from the landed
    bytes, in order, once all are there."""
    data = os.urandom(20_000)
    check = PartCheck("md5", hashlib.md5(data, usedforsecurity=False).hexdigest(), [len(data)])
    assert check.check(_pieces(check, data, [6000, 12000]), lambda o, n: data[o : o + n]) == ""
    assert check.check(_pieces(check, data, [6000]), lambda o, n: data[o : o + n - 1] + b"x")


def test_a_part_crc_check_also_takes_the_whole_object_crc_and_refuses_gaps() -> None:
    """moto sends a multipart FULL_OBJECT CRC without the type that tells it from a COMPOSITE one: the whole
    object's CRC (the parts' combined) passes too. A piece never digested is a caller's mistake, not a pass."""
    data = os.urandom(sum(SIZES))
    check = PartCheck("crc32c_parts", checksum.crc32c(data), SIZES)
    assert check.check(_pieces(check, data, [7000]), lambda o, n: b"") == ""
    with pytest.raises(ValueError, match="missing"):
        check.check(check.piece(0, data[:7000]), lambda o, n: b"")


def test_s3_answers_name_whole_object_and_part_checksums_apart() -> None:
    """What an S3 HEAD/GET answer's checksum headers and ETag mean: a whole object's CRC and MD5; a multipart
    upload's COMPOSITE CRC (with or without its "-N"; FULL_OBJECT is the whole's) and its ETag of part MD5s;
    none of the ETags under KMS or a customer key."""
    from sdk.stores._s3 import s3_checksums

    crc, b64 = 0x1234ABCD, checksum.to_b64(0x1234ABCD)
    md5 = "0123456789abcdef0123456789abcdef"
    assert s3_checksums({"ETag": f'"{md5}"', "ChecksumCRC32C": b64}) == {"crc32c": crc, "md5": md5}
    multipart = {"ETag": f'"{md5}-3"', "ChecksumCRC32": b64}
    expected = {"crc32_parts": crc, "md5_parts": f"{md5}-3", "parts": 3}
    assert s3_checksums(multipart) == expected  # moto: no "-N", no type
    assert s3_checksums(multipart | {"ChecksumCRC32": f"{b64}-3", "ChecksumType": "COMPOSITE"}) == expected
    assert s3_checksums(multipart | {"ChecksumType": "FULL_OBJECT"}) == {
        "crc32": crc,
        "md5_parts": f"{md5}-3",
        "parts": 3,
    }
    assert s3_checksums({"ETag": f'"{md5}"', "ServerSideEncryption": "aws:kms"}) == {}
    assert s3_checksums({"ETag": f'"{md5}-2"', "SSECustomerAlgorithm": "AES256"}) == {"parts": 2}

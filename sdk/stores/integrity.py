"""Checking downloaded bytes against the checksum the store keeps: the strongest one both sides can compute.

Stores report different things (:data:`sdk.stores.store.Checksums`): S3 a CRC32C or CRC32 when the uploader sent one,
and a single-part ETag that is the MD5; GCS a CRC32C and an MD5 for every object. :class:`Digest` picks the
first the store offers of CRC32C (hardware, ~10 GB/s), CRC32 (zlib-ng, SIMD), MD5, and the ETag hint (MD5), and
computes it over the bytes as they arrive. CRCs of pieces fetched in parallel are combined without the data
(:func:`sdk.stores.checksum.combine`).

An S3 multipart upload has no checksum of the whole object unless its uploader asked for one: its COMPOSITE CRC
(``crc32c_parts``/``crc32_parts``) is the CRC of the parts' CRCs (4 big-endian bytes each, concatenated), and
its ETag (``md5_parts``, ``<hex>-N``) the MD5 of the parts' MD5s (16 bytes each) with the part count. Neither can
be checked without the part boundaries; :class:`PartCheck` takes them (:class:`sdk.stores.protocol.PartLayout`), splits
each piece at them, and combines as S3 does. A CRC is computed as the bytes arrive and a part's CRC combined
from its pieces'; an MD5 needs a part's bytes in order, so a part that lies within one piece is hashed as it
arrives and one split over several pieces (or a single-part object's MD5 fetched in ranges) is read back from
the landed file once all its pieces are written: one more sequential read of those bytes from the local disk.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence

from sdk.stores import checksum

__all__ = ["PART_SUMS", "PREFERENCE", "Digest", "PartCheck", "Segment", "matches"]

PREFERENCE = ("crc32c", "crc32", "md5", "etag_md5")
PART_SUMS = ("crc32c_parts", "crc32_parts", "md5_parts")  # checked through the part layout, in this preference
_READ_BACK = 8 * 2**20


class Digest:
    """A running checksum named like the store's field; ``none`` when the store offers nothing to compare."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._crc = 0
        self._md5 = hashlib.md5(usedforsecurity=False) if name in ("md5", "etag_md5") else None

    @classmethod
    def for_checksums(cls, sums: Mapping[str, object]) -> Digest | None:
        """A digest of the preferred algorithm among ``sums``; None when there is none."""
        name = next((n for n in PREFERENCE if n in sums), None)
        return None if name is None else cls(name)

    @classmethod
    def of(cls, data: bytes, sums: Mapping[str, object]) -> Digest:
        """The digest of ``data`` in the algorithm ``sums`` calls for (``none``: nothing computed)."""
        digest = cls.for_checksums(sums) or cls("none")
        digest.update(data)
        return digest

    def update(self, data: bytes) -> None:
        if self.name == "crc32c":
            self._crc = checksum.crc32c(data, self._crc)
        elif self.name == "crc32":
            self._crc = checksum.crc32(data, self._crc)
        elif self._md5 is not None:
            self._md5.update(data)

    @property
    def value(self) -> int | str | None:
        if self.name in ("crc32c", "crc32"):
            return self._crc
        return self._md5.hexdigest() if self._md5 is not None else None

    def hexdigest(self) -> str:
        value = self.value
        return checksum.to_hex(value) if isinstance(value, int) else str(value)

    @classmethod
    def combine(cls, parts: Sequence[tuple[Digest, int]]) -> Digest:
        """The digest of the pieces' concatenation, from each piece's CRC and length (in order)."""
        name = parts[0][0].name if parts else "none"
        whole = cls(name)
        if name not in ("crc32c", "crc32"):
            return cls("none")
        poly = checksum.CRC32C_POLY if name == "crc32c" else checksum.CRC32_POLY
        for index, (part, length) in enumerate(parts):
            whole._crc = part._crc if index == 0 else checksum.combine(whole._crc, part._crc, length, poly)
        return whole


def matches(digest: Digest, sums: Mapping[str, object]) -> bool:
    """Whether ``digest`` equals the store's value of the same name (true when there was nothing to compare)."""
    if digest.name == "none" or digest.name not in sums:
        return True
    return digest.value == sums[digest.name]


Segment = tuple[int, int, int, int | bytes | None]  # part index, offset in the object, length, CRC / MD5 / None


class PartCheck:
    """An object checked against a checksum of its parts: ``name`` is one of :data:`PART_SUMS` (or ``md5``: one
    part, the whole object's MD5, fetched in ranges), ``expected`` the store's value, ``sizes`` the parts' sizes.

    :meth:`piece` digests a piece's bytes per part they belong to, as they arrive (any piece boundaries);
    :meth:`check` puts the pieces' segments together as S3 does, reading back from the landed file what an MD5
    needs in order."""

    def __init__(self, name: str, expected: int | str, sizes: Sequence[int]) -> None:
        self.name, self.expected, self.sizes = name, expected, tuple(sizes)
        self.ends = list(itertools.accumulate(sizes))
        self.starts = [0, *self.ends[:-1]]
        self._crc: Callable[[bytes | memoryview, int], int] | None = {
            "crc32c_parts": checksum.crc32c,
            "crc32_parts": checksum.crc32,
        }.get(name)
        self._poly = checksum.CRC32C_POLY if name == "crc32c_parts" else checksum.CRC32_POLY

    @classmethod
    def for_checksums(cls, sums: Mapping[str, object], sizes: Sequence[int]) -> PartCheck | None:
        """A check against the preferred part checksum in ``sums``; None when there is none."""
        name = next((n for n in PART_SUMS if n in sums), None)
        value = sums.get(name or "")
        return None if name is None or not isinstance(value, int | str) else cls(name, value, sizes)

    def piece(self, start: int, data: bytes) -> list[Segment]:
        """``data`` (at ``start`` in the object) split at part boundaries: each segment with its CRC, or for an
        MD5 the digest of a whole part (None for part of a part: it is read back later)."""
        segments: list[Segment] = []
        view = memoryview(data)  # a part's share of the piece, without a copy (zlib-ng and hashlib take views)
        end, at = start + len(data), start
        part = bisect.bisect_right(self.ends, start)
        while at < end and part < len(self.ends):
            stop = min(end, self.ends[part])
            chunk = data if (at, stop) == (start, end) else view[at - start : stop - start]
            value: int | bytes | None
            if self._crc is not None:
                value = self._crc(chunk, 0)
            elif (at, stop) == (self.starts[part], self.ends[part]):
                value = hashlib.md5(chunk, usedforsecurity=False).digest()
            else:
                value = None
            segments.append((part, at, stop - at, value))
            at, part = stop, part + 1
        return segments

    def check(self, segments: Iterable[Segment], read: Callable[[int, int], bytes]) -> str:
        """What differs between the store's value and every piece's ``segments`` put together (empty: nothing);
        ``read(offset, length)`` gives landed bytes for an MD5 whose part came in several pieces.

        A CRC also passes when it is the whole object's CRC (the parts' combined): some servers (moto) send a
        multipart upload's FULL_OBJECT checksum without the type that tells it from a COMPOSITE one."""
        by_part: list[list[Segment]] = [[] for _ in self.ends]
        for segment in segments:
            by_part[segment[0]].append(segment)
        values = [self._part(i, sorted(found, key=lambda s: s[1]), read) for i, found in enumerate(by_part)]
        ours: int | str
        if self._crc is not None:
            crcs = [int(v) for v in values]
            ours = self._crc(b"".join(crc.to_bytes(4, "big") for crc in crcs), 0)
            if ours == self.expected or self._whole(crcs) == self.expected:
                return ""
            shown, theirs = checksum.to_hex(ours), checksum.to_hex(int(self.expected))
        elif self.name == "md5":
            shown = ours = bytes(values[0]).hex()
            theirs = str(self.expected)
        else:
            digest = hashlib.md5(b"".join(bytes(v) for v in values), usedforsecurity=False).hexdigest()
            shown = ours = f"{digest}-{len(values)}"
            theirs = str(self.expected)
        if ours == self.expected:
            return ""
        return f"{self.name} {shown} != the store's {theirs} ({len(self.ends)} parts)"

    def _whole(self, crcs: list[int]) -> int:
        """The whole object's CRC, combined from its parts'."""
        whole = crcs[0]
        for crc, start, end in zip(crcs[1:], self.starts[1:], self.ends[1:], strict=True):
            whole = checksum.combine(whole, crc, end - start, self._poly)
        return whole

    def _part(self, index: int, found: list[Segment], read: Callable[[int, int], bytes]) -> int | bytes:
        start, end = self.starts[index], self.ends[index]
        covered = start
        for _, offset, length, _ in found:
            if offset != covered:
                raise ValueError(f"part {index + 1}: bytes {covered}-{offset} missing")  # a caller's mistake
            covered += length
        if covered != end:
            raise ValueError(f"part {index + 1}: bytes {covered}-{end} missing")
        if not found:  # an empty part
            return self._crc(b"", 0) if self._crc is not None else hashlib.md5(b"", usedforsecurity=False).digest()
        if self._crc is not None:
            crc = int(found[0][3] or 0)
            for _, _, length, value in found[1:]:
                crc = checksum.combine(crc, int(value or 0), length, self._poly)
            return crc
        if len(found) == 1 and isinstance(found[0][3], bytes):
            return found[0][3]
        md5 = hashlib.md5(usedforsecurity=False)
        for offset in range(start, end, _READ_BACK):
            md5.update(read(offset, min(_READ_BACK, end - offset)))
        return md5.digest()

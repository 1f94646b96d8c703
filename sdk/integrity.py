"""Checking downloaded bytes against the checksum the store keeps: the strongest one both sides can compute.

Stores report different things (:data:`sdk.storage.Checksums`): S3 a CRC32C or CRC32 when the uploader sent one,
and a single-part ETag that is the MD5; GCS a CRC32C and an MD5 for every object. :class:`Digest` picks the
first the store offers of CRC32C (hardware, ~10 GB/s), CRC32 (zlib-ng, SIMD), MD5, and the ETag hint (MD5), and
computes it over the bytes as they arrive. CRCs of pieces fetched in parallel are combined without the data
(:func:`sdk.checksum.combine`); an MD5 cannot be, so ranged transfers use a CRC or the size alone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

from sdk import checksum

__all__ = ["PREFERENCE", "Digest", "matches"]

PREFERENCE = ("crc32c", "crc32", "md5", "etag_md5")


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

"""Reading stores' answers, shared by the stores that meet the same answer shapes.

A listing entry or a HEAD answer names its fields as botocore does (``ETag``, ``size``, ``LastModified``), or as
gcsfs does (``generation``, ``crc32c``, ``md5Hash``); :mod:`sdk.stores._fsspec` (any fsspec store, GCS) and
:mod:`sdk.stores._s3` both read them. Here rather than in either, so that no store module imports another's
private names.
"""

from __future__ import annotations

import base64
import os
import re
from typing import Any

from sdk.stores import checksum
from sdk.stores.protocol import Checksums

__all__ = ["fingerprint", "listed_checksums", "read_fd", "status"]

_MD5_HEX = re.compile(r"[0-9a-f]{32}")


def status(exc: BaseException) -> int | None:
    """The HTTP status of a botocore ClientError or an :class:`sdk.stores._s3http.S3Error`."""
    code = getattr(exc, "status", None)
    if isinstance(code, int):
        return code
    response = getattr(exc, "response", None)
    return response.get("ResponseMetadata", {}).get("HTTPStatusCode") if isinstance(response, dict) else None


def listed_checksums(info: dict[str, Any]) -> Checksums:
    """Checksums in a listing entry: GCS lists ``crc32c`` and ``md5Hash`` (base64) for every object. An S3
    listing's single-part ETag is kept as ``etag_md5``: a hint only (it is not the MD5 under KMS encryption),
    good for recognising a file already on disk, never for failing a download."""
    sums: Checksums = {}
    etag = str(info.get("ETag", "")).strip('"')
    if _MD5_HEX.fullmatch(etag):
        sums["etag_md5"] = etag
    if info.get("crc32c"):
        sums["crc32c"] = checksum.from_b64(str(info["crc32c"]))
    if info.get("md5Hash"):
        sums["md5"] = base64.b64decode(str(info["md5Hash"])).hex()
    return sums


def fingerprint(info: dict[str, Any]) -> str:
    """What changes whenever an object's content does: its ETag (S3), generation (GCS), else its modification time
    and size (a local disk)."""
    for key in ("ETag", "etag", "generation", "crc32c", "md5Hash"):
        if info.get(key):
            return f"{key}:{str(info[key]).strip(chr(34))}"
    mtime = info.get("mtime") or info.get("LastModified") or info.get("updated") or ""
    return f"mtime:{mtime}:{info.get('size')}"


def read_fd(fd: int) -> bytes:
    """The whole file open as ``fd``, read by offset from its start (the descriptor's position is untouched)."""
    chunks, offset, want = [], 0, max(os.fstat(fd).st_size, 1 << 16)
    while chunk := os.pread(fd, want, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)

"""S3 and S3-compatible stores: conditional create, CRC32C on every upload, one code path per operation.

Two clients make the requests, with the same methods, answers and error statuses: the lean one
(:mod:`sdk.stores._s3http`: requests built and signed here, ~0.4x botocore's CPU per request, no botocore import
with keys in the environment) and botocore's synchronous client (:class:`sdk.stores._s3botocore.BotocoreS3`), for
what only botocore does — proxies, FIPS or dual-stack endpoints, a config file's S3 or endpoint settings,
credentials only its chain resolves. :func:`sdk.stores._s3http.create` decides which, once per store. Everything
below — the one multipart upload, listing, deleting — is written once against either. See ``docs/benchmarks.md``
("S3 requests: client CPU per request") for the measurements behind each choice.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdk.errors import PermanentStorageError
from sdk.stores import _answers, checksum
from sdk.stores import _s3botocore as botocore_side
from sdk.stores.protocol import Backend, Checksums, ObjectInfo, PartLayout

if TYPE_CHECKING:
    from sdk.stores._s3http import S3HTTP

__all__ = ["S3_MULTIPART_THRESHOLD", "S3_PART_SIZE", "S3Backend", "connect", "s3_checksums"]

S3_PART_SIZE = 8 * 2**20  # the floor; grown for big files so no upload needs more than S3's 10,000 parts
S3_MULTIPART_THRESHOLD = 32 * 2**20
S3_CONCURRENCY = 10
S3_MAX_PARTS = 10_000


def connect(url: str, *, timeout: float) -> tuple[Backend, str]:
    """An S3 store for the environment's AWS_* settings, and ``bucket/prefix`` of ``url``."""
    return S3Backend.create(timeout), url.partition("://")[2].rstrip("/")


class S3Backend:
    """S3 and S3-compatible stores (endpoint from ``AWS_ENDPOINT_URL``). Methods take ``bucket/key`` paths."""

    def __init__(self, aws_env: tuple[tuple[str, str], ...], timeout: float) -> None:
        self._aws_env, self._timeout = aws_env, timeout  # no client until the first request

    @classmethod
    def create(cls, timeout: float) -> S3Backend:
        return cls(tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_"))), timeout)

    @functools.cached_property
    def client(self) -> S3HTTP | botocore_side.BotocoreS3:
        """The lean client where the environment allows it, else botocore's (made on first use: a store that is
        never asked anything imports neither)."""
        from sdk.stores import _s3http as s3http

        lean = s3http.create(timeout=self._timeout, session=lambda: botocore_side.sync_session(self._aws_env))
        return lean if lean is not None else botocore_side.BotocoreS3(self._aws_env, timeout=self._timeout)

    def url(self, path: str) -> str:
        return f"s3://{path}"

    @staticmethod
    def _split(path: str) -> tuple[str, str]:
        bucket, _, key = path.partition("/")
        return bucket, key

    # -- writing ------------------------------------------------------------------------------------------------
    def put(self, path: str, data: bytes | bytearray, *, crc32c: int | None, exclusive: bool) -> bool:
        try:
            self._put(path, data, checksum.crc32c(data) if crc32c is None else crc32c, if_none_match=exclusive)
        except Exception as exc:
            if exclusive and _answers.status(exc) == 412:  # If-None-Match: * and the object exists
                return False
            raise
        return True

    def upload_file(self, path: str, local: Path, *, fd: int | None = None) -> tuple[ObjectInfo | None, int, int]:
        """A file over :data:`S3_MULTIPART_THRESHOLD` goes up in parts read from the disk as they are sent, so
        memory holds :data:`S3_CONCURRENCY` parts at most, whatever the file's size; smaller files in one PUT, whose
        answer says what S3 stored (no HEAD after it). ``fd``: the file already open, read by offset; left open."""
        size = local.stat().st_size if fd is None else os.fstat(fd).st_size
        if size <= S3_MULTIPART_THRESHOLD:
            data = local.read_bytes() if fd is None else _answers.read_fd(fd)
            crc = checksum.crc32c(data)
            answer = self._put(path, data, crc, if_none_match=False)
            # A PutObject answer echoes the CRC32C S3 checked and stored; a multipart completion has only the parts'.
            info = None if answer is None else ObjectInfo(len(data), _answers.fingerprint(answer), s3_checksums(answer))
            return info, crc, len(data)
        bucket, key = self._split(path)
        handle = os.open(local, os.O_RDONLY) if fd is None else fd
        try:

            def read(start: int, length: int) -> bytes:
                data = os.pread(handle, length, start)
                if len(data) != length:
                    raise PermanentStorageError(f"{local} changed while it was uploaded: {size} bytes expected")
                return data

            crc = self._multipart(bucket, key, size, read, if_none_match=False)
        finally:
            if fd is None:
                os.close(handle)
        return None, crc, size

    def upload_memory(self, size: int) -> int:
        return min(size, S3_CONCURRENCY * _part_size(size)) if size > S3_MULTIPART_THRESHOLD else size

    def _put(self, path: str, data: bytes | bytearray, crc: int, *, if_none_match: bool) -> dict[str, Any] | None:
        """PutObject (its answer), or a multipart upload (None) above :data:`S3_MULTIPART_THRESHOLD`."""
        bucket, key = self._split(path)
        if len(data) <= S3_MULTIPART_THRESHOLD:
            return dict(
                self.client.put(bucket, key, data, crc32c_b64=checksum.to_b64(crc), if_none_match=if_none_match)
            )
        view = memoryview(data)  # each part copied once, from bytes or a bytearray alike
        whole = self._multipart(
            bucket, key, len(data), lambda start, n: bytes(view[start : start + n]), if_none_match=if_none_match
        )
        if whole != crc:  # the caller's CRC32C is of other bytes than those sent: never silently
            raise PermanentStorageError(f"s3://{path}: CRC32C of the parts sent differs from the caller's")
        return None

    def _multipart(
        self, bucket: str, key: str, size: int, read: Callable[[int, int], bytes], *, if_none_match: bool
    ) -> int:
        """A multipart upload: ``read(start, length)`` supplies each part, sent from up to :data:`S3_CONCURRENCY`
        threads with its CRC32C, which S3 checks on arrival. Returns the whole object's CRC32C, combined from the
        parts'. Any failure aborts the upload, so no parts are left for S3 to bill.

        The object gets S3's COMPOSITE checksum (a checksum of the part checksums), as boto3 does by default.
        A FULL_OBJECT checksum would let HEAD return the whole file's CRC32C, but S3-compatible servers such
        as moto then build and checksum a second copy of the object at completion (+5-9 s per GiB measured);
        the full CRC32C is checked by podtrain on every read instead (:class:`sdk.stores.integrity.PartCheck`).
        """
        client = self.client
        part_size = _part_size(size)
        starts = list(range(0, size, part_size))
        upload_id = client.create_multipart(bucket, key)

        def part(number: int, start: int) -> tuple[tuple[int, str, str], int, int]:
            body = read(start, min(part_size, size - start))
            crc = checksum.crc32c(body)
            b64 = checksum.to_b64(crc)
            answer = client.upload_part(bucket, key, upload_id, number, body, crc32c_b64=b64)
            return (number, str(answer.get("ETag", "")), b64), crc, len(body)

        pool = ThreadPoolExecutor(max_workers=min(S3_CONCURRENCY, len(starts)), thread_name_prefix="podtrain-s3-part")
        try:
            futures = [pool.submit(part, i + 1, start) for i, start in enumerate(starts)]
            parts = [f.result() for f in futures]  # the first failure raises; the rest are cancelled below
            client.complete_multipart(bucket, key, upload_id, [p[0] for p in parts], if_none_match=if_none_match)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            with contextlib.suppress(Exception):  # the original error is the one to report
                client.abort_multipart(bucket, key, upload_id)
            raise
        finally:
            pool.shutdown(wait=True)
        whole = parts[0][1]
        for _, crc, length in parts[1:]:
            whole = checksum.combine(whole, crc, length)
        return whole

    # -- reading -------------------------------------------------------------------------------------------------
    def read(self, path: str, start: int | None = None, end: int | None = None) -> tuple[bytes, Checksums]:
        """One GET, whose answer carries the object's checksums when it is the whole object: no HEAD needed. Never
        split into concurrent ranges (as s3fs's ``cat_file`` does above 50 MiB): servers that read the whole object
        to answer each range, as moto does, would then read 1 GiB twenty times."""
        bucket, key = self._split(path)
        data, answer = self.client.get(bucket, key, start, end)
        return data, (s3_checksums(answer) if start is None else {})

    def describe(self, path: str) -> ObjectInfo:
        bucket, key = self._split(path)
        head = self.client.head(bucket, key)
        return ObjectInfo(int(head["ContentLength"]), _answers.fingerprint(head), s3_checksums(head))

    def layout(self, path: str, size: int, *, exact: bool = False) -> PartLayout:
        """The part sizes of a multipart object from ``HEAD ?partNumber=1`` (that part's size and the part count),
        the others assumed the same but the last, as uploaders make them; ``exact``, or when the sizes cannot be
        so, every part asked for (from :data:`S3_CONCURRENCY` threads). This works on AWS and moto alike;
        GetObjectAttributes' ObjectParts would list the sizes in one request, but AWS lists parts only for objects
        with an additional checksum (not those with only an MD5 ETag), it needs the s3:GetObjectAttributes
        permission besides s3:GetObject, and moto 5.2.5 does not list them."""
        bucket, key = self._split(path)
        first = self.client.head(bucket, key, part=1)
        count, head = int(first.get("PartsCount") or 1), int(first["ContentLength"])
        if count <= 1:
            return PartLayout(sizes=(size,))
        last = size - head * (count - 1)
        if not exact and 0 < last <= head:
            return PartLayout(sizes=(head,) * (count - 1) + (last,), exact=count == 2)
        with ThreadPoolExecutor(
            max_workers=min(S3_CONCURRENCY, count - 1), thread_name_prefix="podtrain-s3-parts"
        ) as pool:
            rest = pool.map(lambda n: int(self.client.head(bucket, key, part=n)["ContentLength"]), range(2, count + 1))
            return PartLayout(sizes=(head, *rest))

    def objects(self, path: str) -> dict[str, ObjectInfo]:
        bucket, key = self._split(path)
        prefix = key + "/" if key else ""
        out = {}
        for item in self._listed(bucket, prefix):
            rel = item["Key"][len(prefix) :]
            if rel and not rel.endswith("/"):  # "folder/" markers are not files
                out[rel] = ObjectInfo(int(item["Size"]), _answers.fingerprint(item), _answers.listed_checksums(item))
        if not out and key:  # the URL may name one object
            try:
                head = self.client.head(bucket, key)
            except Exception as exc:
                if _answers.status(exc) == 404:
                    return {}
                raise
            out[""] = ObjectInfo(int(head["ContentLength"]), _answers.fingerprint(head), {})
        return out

    def list(self, path: str) -> list[str]:
        """One level of ``path``, by ListObjectsV2 with a ``/`` delimiter: sub-folders come back as common prefixes,
        not as every key below them."""
        bucket, key = self._split(path)
        prefix = key.rstrip("/") + "/" if key else ""
        names = set()
        for item in self._listed(bucket, prefix, delimiter="/"):
            names.add(str(item.get("Key") or item.get("Prefix"))[len(prefix) :].split("/", 1)[0])
        return sorted(names - {""})

    def _listed(self, bucket: str, prefix: str, *, delimiter: str = "") -> Iterator[dict[str, Any]]:
        """The listing's entries, each checked to lie under ``prefix``: a server (or a proxy) answering with keys
        outside it would otherwise have a pull name files after them and a recursive delete remove them."""
        for item in self.client.list(bucket, prefix, delimiter=delimiter):
            name = item.get("Key") or item.get("Prefix")
            if not isinstance(name, str) or not name.startswith(prefix):
                raise PermanentStorageError(
                    f"s3://{bucket}: the listing of {prefix!r} answered {name!r}, outside it — check the endpoint "
                    "(AWS_ENDPOINT_URL) or the proxy in between"
                )
            yield item

    # -- deleting and the bucket ---------------------------------------------------------------------------------
    def delete(self, path: str, *, recursive: bool) -> None:
        """The object ``path`` (S3 answers alike whether it was there); with ``recursive``, also every key under
        ``path/``, listed and then removed 1,000 a request."""
        bucket, key = self._split(path)
        if not recursive:
            if key:  # a DELETE of the bucket's root is DeleteBucket: never a store's to make
                self.client.delete(bucket, key)
            return
        prefix = key.rstrip("/") + "/" if key else ""
        keys = [str(item["Key"]) for item in self._listed(bucket, prefix)]
        if key:
            keys.append(key)
        self.client.delete_many(bucket, keys)

    def check_root(self, root: str) -> None:
        self.client.head_bucket(root.split("/", 1)[0])


def _part_size(size: int) -> int:
    """:data:`S3_PART_SIZE`, grown for big objects so that none needs more than S3's 10,000 parts."""
    return max(S3_PART_SIZE, -(-size // S3_MAX_PARTS))


def s3_checksums(response: dict[str, Any]) -> Checksums:
    """The checksums in an S3 HEAD or GET answer.

    A CRC is the whole object's unless the object is a multipart upload whose checksum is not FULL_OBJECT: then
    it is the COMPOSITE one (a CRC of the parts' CRCs; some servers, moto among them, omit its ``-N`` suffix),
    kept as ``crc32c_parts``/``crc32_parts``. A single-part ETag is the MD5 of the bytes (``md5``), a multipart
    one the MD5 of the parts' MD5s (``md5_parts``, ``<hex>-N``), unless the object is encrypted with KMS or a
    customer key, where neither is. ``parts``: the part count the answer gives.
    """
    sums: Checksums = {}
    etag = str(response.get("ETag", "")).strip('"')
    multipart = re.fullmatch(r"[0-9a-f]{32}-([0-9]+)", etag)
    for name, key in (("crc32c", "ChecksumCRC32C"), ("crc32", "ChecksumCRC32")):
        value, _, count = str(response.get(key) or "").partition("-")
        if not value:
            continue
        if count or (multipart and response.get("ChecksumType") != "FULL_OBJECT"):
            sums[f"{name}_parts"] = checksum.from_b64(value)
            if count.isdigit():
                sums["parts"] = int(count)
        else:
            sums[name] = checksum.from_b64(value)
    if multipart:
        sums["parts"] = int(multipart.group(1))
    kms = str(response.get("ServerSideEncryption", "")).startswith("aws:kms")
    encrypted = kms or bool(response.get("SSECustomerAlgorithm"))
    if re.fullmatch(r"[0-9a-f]{32}", etag) and not encrypted:
        sums["md5"] = etag
    elif multipart and not encrypted:
        sums["md5_parts"] = etag
    return sums

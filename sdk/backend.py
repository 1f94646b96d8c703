"""What differs between object stores: how to create an object conditionally and with a verified checksum.

:class:`Backend` works on any fsspec filesystem. Three subclasses use what their store offers:

* :class:`LocalBackend` — write to a temporary name, fsync, then ``os.link`` (exclusive: fails if the name
  exists) or ``os.replace``; a reader never sees a partial file.
* :class:`S3Backend` — ``PutObject`` with ``x-amz-checksum-crc32c`` (S3 rejects a body that does not match) and
  ``If-None-Match: *``; large bodies go as parallel multipart parts, each with its CRC32C, completed with the
  full-object CRC32C. ``HeadObject(ChecksumMode=ENABLED)`` reads the store's own checksum back.
* :class:`GCSBackend` — a JSON-API multipart upload whose metadata carries ``crc32c`` (GCS rejects a mismatch)
  and ``ifGenerationMatch=0``; the object's ``crc32c`` is read from its metadata.

On other fsspec backends an exclusive write checks for the object first: not atomic, and logged as such once.
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import contextlib
import functools
import importlib.util
import json
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import fsspec
from fsspec.asyn import sync

from sdk import checksum
from sdk.errors import BackendMissingError

__all__ = [
    "Backend",
    "Checksums",
    "GCSBackend",
    "LocalBackend",
    "ObjectInfo",
    "S3Backend",
    "connect",
    "require_backend",
    "split_url",
]

Checksums = dict[str, int | str]  # "crc32c" / "crc32": int; "md5" / "etag_md5": lowercase hex


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object: its size, a fingerprint that changes with its content, and listed checksums."""

    size: int
    fingerprint: str
    checksums: Checksums = field(default_factory=dict)


_PACKAGES = {"s3": ("s3fs", "botocore"), "s3a": ("s3fs", "botocore"), "gs": ("gcsfs",), "gcs": ("gcsfs",)}
_EXTRAS = {
    "s3": "podtrain[s3]' (s3fs, boto3)",
    "s3a": "podtrain[s3]' (s3fs, boto3)",
    "gs": "podtrain[gcs]' (gcsfs)",
    "gcs": "podtrain[gcs]' (gcsfs)",
}
S3_PART_SIZE = 8 * 2**20  # the floor; grown for big files so no upload needs more than S3's 10,000 parts
S3_MULTIPART_THRESHOLD = 32 * 2**20
S3_CONCURRENCY = 10
S3_MAX_PARTS = 10_000


def split_url(url: str) -> tuple[str, str]:
    """``(protocol, path)`` of ``url``; a plain path is ``file`` with an absolute path."""
    if "://" not in url:
        return "file", str(Path(url).expanduser().absolute())
    protocol, _, rest = url.partition("://")
    protocol = protocol.lower()
    if protocol in ("file", "local"):
        return "file", str(Path(rest).absolute())
    return protocol, rest.rstrip("/")


def require_backend(url: str, variable: str = "") -> None:
    """Raise :class:`BackendMissingError` when ``url``'s scheme is unknown or its package is not installed."""
    protocol, _ = split_url(url)
    where = f"{variable}={url!r}" if variable else repr(url)
    needed = _PACKAGES.get(protocol)
    if needed is not None:  # found without importing them: s3fs and gcsfs take ~0.5 s to import
        missing = [name for name in needed if importlib.util.find_spec(name) is None]
        if missing:
            raise BackendMissingError(
                f"{where}: the {protocol}:// backend is not installed — pip install '{_EXTRAS[protocol]} "
                f"(missing: {', '.join(missing)})"
            )
        return
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as exc:
        extra = _EXTRAS.get(protocol)
        hint = f"pip install '{extra}" if extra else f"install the fsspec backend for {protocol}://"
        raise BackendMissingError(f"{where}: the {protocol}:// backend is not installed — {hint} ({exc})") from None
    except ValueError:
        raise BackendMissingError(
            f"{where}: unknown URL scheme {protocol!r} — use s3://, gs://, file://, a local path, "
            "or any scheme fsspec knows"
        ) from None


def connect(url: str, *, timeout: float) -> tuple[Backend, str]:
    """A backend for ``url`` and the root path inside it."""
    require_backend(url)
    protocol, path = split_url(url)
    backend: Backend
    if protocol == "file":
        return LocalBackend(fsspec.filesystem("file")), path
    if protocol in ("s3", "s3a"):
        backend = S3Backend.create(timeout)
    elif protocol in ("gs", "gcs"):
        backend = GCSBackend.create(timeout)
    else:
        backend = Backend(fsspec.filesystem(protocol))
    return backend, backend.root_of(url)


class Backend:
    """Any fsspec filesystem. Methods take backend paths (no scheme)."""

    def __init__(self, fs: Any) -> None:
        self.fs = fs

    def unstrip(self, path: str) -> str:
        return str(self.fs.unstrip_protocol(path))

    def root_of(self, url: str) -> str:
        """The backend path of ``url``."""
        return str(self.fs._strip_protocol(url)).rstrip("/")

    def put(self, path: str, data: bytes, *, crc32c: int | None, exclusive: bool) -> bool:
        if exclusive and self.fs.exists(path):
            return False
        self.fs.pipe_file(path, data)
        return True

    def upload(self, path: str, data: bytes, *, crc32c: int) -> ObjectInfo | None:
        """Write ``data`` (not conditionally); what the store's answer says it stored, None when it says nothing
        (then ask with :meth:`describe`)."""
        self.put(path, data, crc32c=crc32c, exclusive=False)
        return None

    def get(self, path: str) -> bytes:
        return bytes(self.fs.cat_file(path))

    def read(self, path: str, start: int | None = None, end: int | None = None) -> tuple[bytes, Checksums]:
        """Bytes ``[start, end)`` (the whole object when ``start`` is None), and the whole object's checksums
        when the response carried them (S3 sends them with a whole-object GET)."""
        if start is None:
            return self.get(path), {}
        return bytes(self.fs.cat_file(path, start=start, end=end)), {}

    def describe(self, path: str) -> ObjectInfo:
        """The object's size, fingerprint and the checksums the store keeps for it (one metadata request)."""
        self.invalidate(path)
        info = self.fs.info(path)
        return ObjectInfo(int(info.get("size") or 0), _fingerprint(info), _listed_checksums(info))

    def exists(self, path: str) -> bool:
        return bool(self.fs.exists(path))

    def size(self, path: str) -> int:
        return int(self.fs.size(path))

    def native_crc32c(self, path: str) -> int | None:
        crc = self.describe(path).checksums.get("crc32c")
        return None if crc is None else int(crc)

    def list(self, path: str) -> list[str]:
        self.invalidate(path)
        try:
            entries = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        prefix = path.rstrip("/") + "/"
        return sorted({str(e)[len(prefix) :].split("/", 1)[0] for e in entries if str(e).startswith(prefix)} - {""})

    def find(self, path: str) -> builtins.list[str]:  # ``list`` here is the method above
        self.invalidate(path)
        found = self.fs.find(path)
        prefix = path.rstrip("/") + "/"
        return sorted(str(p)[len(prefix) :] for p in found if str(p).startswith(prefix))

    def objects(self, path: str) -> dict[str, ObjectInfo]:
        """Every object under ``path``, by relative name (``""`` when ``path`` is one object).

        The fingerprint changes whenever the content does: the ETag (S3), the generation (GCS), else the
        modification time and size. Checksums come with the listing where the store lists them (GCS).
        """
        self.invalidate(path)
        found = self.fs.find(path, detail=True)
        prefix = path.rstrip("/") + "/"
        out = {}
        for found_path, info in found.items():
            full = str(found_path)
            rel = full[len(prefix) :] if full.startswith(prefix) else ""
            if info.get("type", "file") != "file":
                continue
            out[rel] = ObjectInfo(int(info.get("size") or 0), _fingerprint(info), _listed_checksums(info))
        return out

    def delete(self, path: str, *, recursive: bool) -> None:
        try:
            self.fs.rm(path, recursive=recursive)
        except FileNotFoundError:
            return
        self.invalidate(path)

    def check_root(self, root: str) -> None:
        self.fs.ls(root.split("/", 1)[0] if "/" in root else root)

    def invalidate(self, path: str) -> None:
        self.fs.invalidate_cache(path)


class LocalBackend(Backend):
    """A local directory: atomic renames and hard links instead of conditional requests."""

    def put(self, path: str, data: bytes, *, crc32c: int | None, exclusive: bool) -> bool:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            if exclusive:
                try:
                    os.link(tmp, target)
                except FileExistsError:
                    return False
            else:
                os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(target.parent)
        return True

    def list(self, path: str) -> list[str]:
        try:
            return sorted(p.name for p in Path(path).iterdir() if not p.name.startswith(".") or p.is_dir())
        except (FileNotFoundError, NotADirectoryError):
            return []

    def check_root(self, root: str) -> None:
        Path(root).mkdir(parents=True, exist_ok=True)
        if not os.access(root, os.W_OK):
            raise PermissionError(f"{root} is not writable")


class S3Backend(Backend):
    """S3 and S3-compatible stores (endpoint from ``AWS_ENDPOINT_URL``), through s3fs's aiobotocore client."""

    def __init__(self, aws_env: tuple[tuple[str, str], ...], timeout: float) -> None:
        self._aws_env, self._timeout = aws_env, timeout  # no fsspec filesystem until one is needed

    @classmethod
    def create(cls, timeout: float) -> S3Backend:
        return cls(tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_"))), timeout)

    @functools.cached_property
    def fs(self) -> Any:
        """s3fs, made on first use: listing, reading and describing objects (all a dataset pull does) go
        through the synchronous client below and never import s3fs and aiobotocore (~0.5 s)."""
        fs = fsspec.filesystem(
            "s3", skip_instance_cache=True, session=_aio_session(self._aws_env), config_kwargs=_s3_config(self._timeout)
        )
        fs.retries = 1  # one retry loop: ours, with logging and an injectable sleep
        return fs

    def unstrip(self, path: str) -> str:
        return f"s3://{path}"

    def root_of(self, url: str) -> str:
        return split_url(url)[1]

    def invalidate(self, path: str) -> None:
        if "fs" in self.__dict__:
            self.fs.invalidate_cache(path)

    def _head(self, bucket: str, key: str) -> dict[str, Any]:
        if self._http is not None:
            return dict(self._http.head(bucket, key))
        return dict(self._client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED"))

    def _list(self, bucket: str, prefix: str) -> Iterator[dict[str, Any]]:
        if self._http is not None:
            yield from self._http.list(bucket, prefix)
            return
        for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            yield from page.get("Contents", [])

    @staticmethod
    def _split(path: str) -> tuple[str, str]:
        bucket, _, key = path.partition("/")
        return bucket, key

    @functools.cached_property
    def _http(self) -> Any:
        """The lean client (:mod:`sdk.s3http`) for GET, HEAD, listing and single-part PUT; None where the
        environment asks for something only botocore does (then :attr:`_client`)."""
        from sdk import s3http

        return s3http.create(_sync_session(self._aws_env), timeout=self._timeout)

    @functools.cached_property
    def _client(self) -> Any:
        """A synchronous botocore client for single requests from worker threads (botocore clients are
        thread-safe): GET, HEAD, listing, single-part PUT. Only multipart uploads, whose parts overlap in one
        event loop, and the rest of fsspec's API go through s3fs.

        A dataset pull is a thousand GETs from sixteen threads: through the async client each one hops into
        fsspec's event loop and back, and costs ~1.7x the CPU of the same GET made by the thread itself
        (measured: 3.3 vs 1.9 CPU-s for 492 MiB in 303 objects).
        """
        from botocore.config import Config

        client = _sync_session(self._aws_env).create_client(
            "s3", config=Config(**_s3_config(self._timeout), max_pool_connections=64)
        )
        client.meta.events.register("before-call.s3.GetObject", _skip_response_validation)
        return client

    def _s3(self, method: str, **kwargs: Any) -> Any:
        return sync(self.fs.loop, self.fs._call_s3, method, **kwargs)

    def put(self, path: str, data: bytes, *, crc32c: int | None, exclusive: bool) -> bool:
        crc = checksum.crc32c(data) if crc32c is None else crc32c
        try:
            self._put(path, data, crc, {"IfNoneMatch": "*"} if exclusive else {})
        except FileExistsError:
            return False
        except Exception as exc:
            if exclusive and _status(exc) == 412:  # If-None-Match: * and the object exists
                return False
            raise
        return True

    def upload(self, path: str, data: bytes, *, crc32c: int) -> ObjectInfo | None:
        answer = self._put(path, data, crc32c, {})
        # A PutObject answer echoes the CRC32C S3 checked and stored; a multipart completion has only the parts'.
        return None if answer is None else ObjectInfo(len(data), _fingerprint(answer), _s3_checksums(answer))

    def _put(self, path: str, data: bytes, crc: int, match: dict[str, str]) -> dict[str, Any] | None:
        """PutObject (its answer), or a multipart upload (None) above :data:`S3_MULTIPART_THRESHOLD`."""
        bucket, key = self._split(path)
        try:
            if len(data) > S3_MULTIPART_THRESHOLD:
                sync(self.fs.loop, self._multipart, bucket, key, data, crc, match)
                return None
            if self._http is not None:
                return dict(
                    self._http.put(bucket, key, data, crc32c_b64=checksum.to_b64(crc), if_none_match=bool(match))
                )
            return dict(  # one request: made by this thread (see _client)
                self._client.put_object(
                    Bucket=bucket,
                    Key=key,
                    Body=data,
                    ChecksumAlgorithm="CRC32C",
                    ChecksumCRC32C=checksum.to_b64(crc),
                    **match,
                )
            )
        finally:
            self.invalidate(path)

    async def _multipart(self, bucket: str, key: str, data: bytes, crc: int, match: dict[str, str]) -> None:
        """Parallel parts, each sent with its CRC32C so S3 checks every part on arrival.

        The object gets S3's COMPOSITE checksum (a checksum of the part checksums), as boto3 does by default.
        A FULL_OBJECT checksum would let HEAD return the whole file's CRC32C, but S3-compatible servers such
        as moto then build and checksum a second copy of the object at completion (+5-9 s per GiB measured);
        the full CRC32C is checked by podtrain on every read instead.
        """
        call = self.fs._call_s3
        mpu = await call("create_multipart_upload", Bucket=bucket, Key=key, ChecksumAlgorithm="CRC32C")
        upload_id = mpu["UploadId"]
        limit = asyncio.Semaphore(S3_CONCURRENCY)
        part_size = max(S3_PART_SIZE, -(-len(data) // S3_MAX_PARTS))

        async def part(number: int, start: int) -> dict[str, Any]:
            body = data[start : start + part_size]  # botocore takes bytes, not memoryview
            async with limit:
                out = await call(
                    "upload_part",
                    Bucket=bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=body,
                    ChecksumCRC32C=checksum.to_b64(checksum.crc32c(body)),
                )
            return {"PartNumber": number, "ETag": out["ETag"], "ChecksumCRC32C": out.get("ChecksumCRC32C")}

        try:
            parts = await asyncio.gather(
                *(part(i + 1, start) for i, start in enumerate(range(0, len(data), part_size)))
            )
            await call(
                "complete_multipart_upload",
                Bucket=bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": [{k: v for k, v in p.items() if v is not None} for p in parts]},
                **match,
            )
        except BaseException:
            with contextlib.suppress(Exception):  # the original error is the one to report
                await call("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)
            raise

    def describe(self, path: str) -> ObjectInfo:
        bucket, key = self._split(path)
        head = self._head(bucket, key)
        return ObjectInfo(int(head["ContentLength"]), _fingerprint(head), _s3_checksums(head))

    def objects(self, path: str) -> dict[str, ObjectInfo]:
        bucket, key = self._split(path)
        prefix = key + "/" if key else ""
        out = {}
        for item in self._list(bucket, prefix):
            rel = item["Key"][len(prefix) :]
            if rel and not rel.endswith("/"):  # "folder/" markers are not files
                out[rel] = ObjectInfo(int(item["Size"]), _fingerprint(item), _listed_checksums(item))
        if not out and key:  # the URL may name one object
            try:
                head = self._head(bucket, key)
            except Exception as exc:
                if _status(exc) == 404:
                    return {}
                raise
            out[""] = ObjectInfo(int(head["ContentLength"]), _fingerprint(head), {})
        return out

    def read(self, path: str, start: int | None = None, end: int | None = None) -> tuple[bytes, Checksums]:
        # One GET, whose answer carries the object's checksums when it is the whole object: no HEAD needed.
        bucket, key = self._split(path)
        if self._http is not None:
            data, answer = self._http.get(bucket, key, start, end)
            return data, (_s3_checksums(answer) if start is None else {})
        extra = {"ChecksumMode": "ENABLED"} if start is None else {"Range": f"bytes={start}-{(end or 0) - 1}"}
        response = self._client.get_object(Bucket=bucket, Key=key, **extra)
        body = response["Body"]
        try:
            data = body.read()
        finally:
            body.close()
        return data, (_s3_checksums(response) if start is None else {})

    def check_root(self, root: str) -> None:
        bucket = root.split("/", 1)[0]
        self._s3("head_bucket", Bucket=bucket)

    def get(self, path: str) -> bytes:
        # One streaming GET. s3fs's default cat_file first HEADs the object, then splits anything over its
        # 50 MiB block size into concurrent ranged GETs; S3-compatible servers that read the whole object to
        # answer each range (moto does) then do ~size/50 MiB full reads: 25 s instead of 2.5 s for 1 GiB.
        return bytes(self.fs.cat_file(path, max_concurrency=1))


class GCSBackend(Backend):
    """Google Cloud Storage (emulator from ``STORAGE_EMULATOR_HOST``), through gcsfs's session."""

    @classmethod
    def create(cls, timeout: float) -> GCSBackend:
        # The plain GCSFileSystem: gcsfs >= 2026.3 exports a subclass that probes every bucket for zonal/HNS
        # features over gRPC, which stalls for a minute per call against an emulator; podtrain needs neither.
        import aiohttp
        from gcsfs.core import GCSFileSystem

        # Bound connecting and each read, not the whole request: a plain number would be aiohttp's total
        # timeout, failing any upload or download that takes longer than ``timeout`` however fast it flows.
        per_read = aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)
        options: dict[str, Any] = {"skip_instance_cache": True, "requests_timeout": per_read}
        if os.environ.get("STORAGE_EMULATOR_HOST") and not os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
            options["token"] = "anon"  # noqa: S105 - the emulator takes no credentials
        return cls(GCSFileSystem(**options))

    def put(self, path: str, data: bytes, *, crc32c: int | None, exclusive: bool) -> bool:
        try:
            self._post(path, data, checksum.crc32c(data) if crc32c is None else crc32c, exclusive)
        except FileExistsError:
            return False
        return True

    def upload(self, path: str, data: bytes, *, crc32c: int) -> ObjectInfo | None:
        answer = self._post(path, data, crc32c, False)  # the new object's metadata: size, crc32c, generation
        return ObjectInfo(int(answer.get("size") or 0), _fingerprint(answer), _listed_checksums(answer))

    def _post(self, path: str, data: bytes, crc: int, exclusive: bool) -> dict[str, Any]:
        bucket, key, _ = self.fs.split_path(path)
        metadata = json.dumps({"name": key, "crc32c": checksum.to_b64(crc)})
        body = (
            b"--==0==\nContent-Type: application/json; charset=UTF-8\n\n"
            + metadata.encode()
            + b"\n--==0==\nContent-Type: application/octet-stream\n\n"
            + data
            + b"\n--==0==--"
        )
        kw = {"ifGenerationMatch": "0"} if exclusive else {}
        try:
            return dict(
                sync(
                    self.fs.loop,
                    self.fs._call,
                    "POST",
                    f"{self.fs._location}/upload/storage/v1/b/{quote(bucket)}/o",
                    uploadType="multipart",
                    headers={"Content-Type": 'multipart/related; boundary="==0=="'},
                    data=body,
                    json_out=True,
                    **kw,
                )
            )
        finally:
            self.invalidate(path)

    def check_root(self, root: str) -> None:
        bucket = root.split("/", 1)[0]
        sync(self.fs.loop, self.fs._call, "GET", "b/{}", bucket, json_out=True)


def _s3_config(timeout: float) -> dict[str, Any]:
    """botocore settings shared by the async (s3fs) and the sync client."""
    return {
        # total_max_attempts counts the first try; botocore's max_attempts counts retries only.
        "retries": {"total_max_attempts": 1, "mode": "standard"},
        "connect_timeout": timeout,
        "read_timeout": timeout,
        # Over plain http botocore would SHA256 every body to sign it (~0.75 CPU-s per GiB); each body
        # already carries its CRC32C, which the store checks, so the signature covers headers only.
        "s3": {"payload_signing_enabled": False},
        # podtrain sends its own CRC32C with every upload and checks every download against the store's
        # checksum itself; botocore's own pass over each body (CRC32 in Python wrappers) would be a second one.
        "request_checksum_calculation": "when_required",
        "response_checksum_validation": "when_required",
    }


@functools.lru_cache(maxsize=4)
def _sync_session(aws_env: tuple[tuple[str, str], ...]) -> Any:
    """One botocore session per AWS_* environment, as :func:`_aio_session`."""
    import botocore.session

    session = botocore.session.get_session()
    session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=_parse_timestamp)
    return session


@functools.lru_cache(maxsize=4)
def _aio_session(aws_env: tuple[tuple[str, str], ...]) -> Any:
    """One aiobotocore session per AWS_* environment: a session caches the parsed S3 service model, so each
    new store's client costs ~0.1 s instead of ~0.4 s. A changed environment gets a fresh session."""
    from aiobotocore.session import AioSession

    session = AioSession()
    session.register("before-send.s3", _drop_expect_continue)
    # botocore parses every timestamp (each listed object's LastModified, each answer's Last-Modified header) with
    # dateutil: ~8 % of a dataset pull's CPU. The standard library parses both formats S3 sends, ~20x faster.
    session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=_parse_timestamp)
    return session


def _parse_timestamp(value: str) -> Any:
    """S3's ISO 8601 (listings) and RFC 1123 (headers) times, tz-aware; anything else through botocore's parser."""
    import datetime
    import email.utils

    from botocore.utils import parse_timestamp

    try:
        if value[:4].isdigit():
            return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        return email.utils.parsedate_to_datetime(value)
    except (ValueError, TypeError, IndexError):
        return parse_timestamp(value)


def _drop_expect_continue(request: Any, **kwargs: Any) -> None:
    """botocore sends every PutObject/UploadPart with ``Expect: 100-continue``; aiohttp does not apply its read
    timeout while it waits for the ``100 Continue``, so a store that stalls there would hang the upload for
    good. Without the header the body goes at once and the read timeout bounds the wait for the answer."""
    if "Expect" in request.headers:
        del request.headers["Expect"]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _s3_checksums(response: dict[str, Any]) -> Checksums:
    """The whole-object checksums in an S3 HEAD or GET answer.

    A COMPOSITE checksum (of the parts of a multipart upload; some servers omit its ``-N`` suffix) is not the
    object's and is left out. A single-part ETag is the MD5 of the bytes unless the object is encrypted with
    KMS or a customer key, where it is not.
    """
    sums: Checksums = {}
    etag = str(response.get("ETag", "")).strip('"')
    multipart = "-" in etag
    for name, key in (("crc32c", "ChecksumCRC32C"), ("crc32", "ChecksumCRC32")):
        value = response.get(key)
        if value and "-" not in value and not (multipart and response.get("ChecksumType") != "FULL_OBJECT"):
            sums[name] = checksum.from_b64(value)
    encrypted = response.get("ServerSideEncryption") == "aws:kms" or response.get("SSECustomerAlgorithm")
    if re.fullmatch(r"[0-9a-f]{32}", etag) and not encrypted:
        sums["md5"] = etag
    return sums


def _skip_response_validation(context: dict[str, Any], **kwargs: Any) -> None:
    """botocore checks a body against its checksum header whenever ``ChecksumMode`` is set, which podtrain
    sets to receive that header; podtrain then checks the body itself (CRC32C in hardware, pieces combined),
    so botocore's pass (a wrapper hashing every chunk in Python) would be a second one over every byte."""
    context.get("checksum", {}).pop("response_algorithms", None)


def _status(exc: BaseException) -> int | None:
    """The HTTP status of a botocore ClientError or an :class:`sdk.s3http.S3Error`."""
    status = getattr(exc, "status", None)
    if isinstance(status, int):
        return status
    response = getattr(exc, "response", None)
    return response.get("ResponseMetadata", {}).get("HTTPStatusCode") if isinstance(response, dict) else None


def _listed_checksums(info: dict[str, Any]) -> Checksums:
    """Checksums in a listing entry: GCS lists ``crc32c`` and ``md5Hash`` (base64) for every object. An S3
    listing's single-part ETag is kept as ``etag_md5``: a hint only (it is not the MD5 under KMS encryption),
    good for recognising a file already on disk, never for failing a download."""
    sums: Checksums = {}
    etag = str(info.get("ETag", "")).strip('"')
    if re.fullmatch(r"[0-9a-f]{32}", etag):
        sums["etag_md5"] = etag
    if info.get("crc32c"):
        sums["crc32c"] = checksum.from_b64(str(info["crc32c"]))
    if info.get("md5Hash"):
        sums["md5"] = base64.b64decode(str(info["md5Hash"])).hex()
    return sums


def _fingerprint(info: dict[str, Any]) -> str:
    for key in ("ETag", "etag", "generation", "crc32c", "md5Hash"):
        if info.get(key):
            return f"{key}:{str(info[key]).strip(chr(34))}"
    mtime = info.get("mtime") or info.get("LastModified") or info.get("updated") or ""
    return f"mtime:{mtime}:{info.get('size')}"

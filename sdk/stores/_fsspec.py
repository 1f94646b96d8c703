"""What differs between object stores: how to create an object conditionally and with a verified checksum.

:class:`Backend` works on any fsspec filesystem. Three subclasses use what their store offers (S3 and GCS in
their own modules, :mod:`sdk.stores._s3` and :mod:`sdk.stores._gcs`, imported only when a URL needs them):

* :class:`LocalBackend` — write to a temporary name, fsync, then ``os.link`` (exclusive: fails if the name
  exists) or ``os.replace``; a reader never sees a partial file.
* ``S3Backend`` — ``PutObject`` with ``x-amz-checksum-crc32c`` (S3 rejects a body that does not match) and
  ``If-None-Match: *``; large bodies go as parallel multipart parts, each with its CRC32C, completed with the
  full-object CRC32C. ``HeadObject(ChecksumMode=ENABLED)`` reads the store's own checksum back.
* ``GCSBackend`` — a JSON-API multipart upload whose metadata carries ``crc32c`` (GCS rejects a mismatch)
  and ``ifGenerationMatch=0``; the object's ``crc32c`` is read from its metadata.

On other fsspec backends an exclusive write checks for the object first: not atomic, and logged as such once.
"""

from __future__ import annotations

import base64
import builtins
import importlib.util
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdk.errors import BackendMissingError
from sdk.stores import _locallinks, checksum

__all__ = [
    "Backend",
    "Checksums",
    "LocalBackend",
    "ObjectInfo",
    "PartLayout",
    "connect",
    "require_backend",
    "split_url",
]

# "crc32c" / "crc32": int; "md5" / "etag_md5": lowercase hex. Of a multipart upload (sdk.stores.integrity.PartCheck):
# "crc32c_parts" / "crc32_parts": the COMPOSITE CRC (int), "md5_parts": the ETag "<hex>-N", "parts": N.
Checksums = dict[str, int | str]


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object: its size, a fingerprint that changes with its content, and listed checksums."""

    size: int
    fingerprint: str
    checksums: Checksums = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class PartLayout:
    """The parts an object was uploaded in, by size; ``exact`` False when only the first part was asked for and
    the others assumed the same size but the last (what every common uploader does: checked, not trusted)."""

    sizes: tuple[int, ...]
    exact: bool = True


_PACKAGES = {"s3": ("s3fs", "botocore"), "s3a": ("s3fs", "botocore"), "gs": ("gcsfs",), "gcs": ("gcsfs",)}
_EXTRAS = {
    "s3": "podtrain[s3]' (s3fs, boto3)",
    "s3a": "podtrain[s3]' (s3fs, boto3)",
    "gs": "podtrain[gcs]' (gcsfs)",
    "gcs": "podtrain[gcs]' (gcsfs)",
}


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
    """Raise :class:`BackendMissingError` when ``url``'s scheme is unknown, it names no bucket (``s3://``,
    ``gs:///x``), or its package is not installed."""
    protocol, path = split_url(url)
    where = f"{variable}={url!r}" if variable else repr(url)
    if protocol in _PACKAGES and not path.partition("/")[0]:
        raise BackendMissingError(f"{where} names no bucket — use {protocol}://BUCKET/PREFIX")
    needed = _PACKAGES.get(protocol)
    if needed is not None:  # found without importing them: s3fs and gcsfs take ~0.5 s to import
        missing = [name for name in needed if importlib.util.find_spec(name) is None]
        if missing:
            raise BackendMissingError(
                f"{where}: the {protocol}:// backend is not installed — pip install '{_EXTRAS[protocol]} "
                f"(missing: {', '.join(missing)})"
            )
        return
    import fsspec

    try:
        opened_by_url = not _required_arguments(fsspec.get_filesystem_class(protocol))
    except ImportError as exc:
        extra = _EXTRAS.get(protocol)
        hint = f"pip install '{extra}" if extra else f"install the fsspec backend for {protocol}://"
        raise BackendMissingError(f"{where}: the {protocol}:// backend is not installed — {hint} ({exc})") from None
    except ValueError:
        opened_by_url = False
    if not opened_by_url:  # ftp://, sftp://, …: the file system needs a host it is never given here
        raise BackendMissingError(
            f"{where}: unknown URL scheme {protocol!r} — use s3://BUCKET/PREFIX, gs://BUCKET/PREFIX, file:///PATH, "
            "a local path, or an fsspec scheme that needs no host"
        )


def _required_arguments(cls: Any) -> list[str]:
    """The arguments ``cls()`` cannot do without (an FTP file system's ``host``): such a scheme is never usable,
    as :func:`connect` makes the file system from the scheme alone."""
    import inspect

    try:
        parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]  # fsspec's metaclass hides it
    except (TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in parameters if p.kind in kinds and p.default is inspect.Parameter.empty]


def connect(url: str, *, timeout: float) -> tuple[Backend, str]:
    """A backend for ``url`` and the root path inside it."""
    require_backend(url)
    protocol, path = split_url(url)
    backend: Backend
    if protocol == "file":
        import fsspec  # here, not at the top: S3 transfers never need it (~35-60 ms of every command's start)

        return LocalBackend(fsspec.filesystem("file"), root=path), path
    if protocol in ("s3", "s3a"):
        from sdk.stores._s3 import S3Backend

        backend = S3Backend.create(timeout)
    elif protocol in ("gs", "gcs"):
        from sdk.stores._gcs import GCSBackend

        backend = GCSBackend.create(timeout)
    else:
        import fsspec

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

    def upload_file(self, path: str, local: Path, *, fd: int | None = None) -> tuple[ObjectInfo | None, int, int]:
        """Upload the file ``local`` to ``path``: what the store's answer says it stored (None: ask with
        :meth:`describe`), and the CRC32C and size of the bytes sent. Here: read whole, then :meth:`upload`.
        ``fd``: the file already open (:mod:`sdk.data.push` opens it without following links); it is read by offset,
        and ``local`` only names it."""
        data = local.read_bytes() if fd is None else _read_fd(fd)
        crc = checksum.crc32c(data)
        return self.upload(path, data, crc32c=crc), crc, len(data)

    def upload_memory(self, size: int) -> int:
        """The bytes :meth:`upload_file` holds in memory for a file of ``size`` (all of it, here)."""
        return size

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

    def layout(self, path: str, size: int, *, exact: bool = False) -> PartLayout:
        """The parts ``path`` (of ``size`` bytes) was uploaded in: one, here (S3 answers for its multipart uploads;
        ``exact``: each part asked for rather than the sizes assumed from the first)."""
        return PartLayout(sizes=(size,))

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
    """A local directory: atomic renames and hard links instead of conditional requests. Symbolic links below
    ``root`` are not the store's: never listed, never deleted through (:mod:`sdk.stores._locallinks`)."""

    def __init__(self, fs: Any, *, root: str) -> None:
        super().__init__(fs)
        self.root = root

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
        return _locallinks.names(path)

    def delete(self, path: str, *, recursive: bool) -> None:
        _locallinks.remove(self.root, path, recursive=recursive)
        self.invalidate(path)

    def check_root(self, root: str) -> None:
        Path(root).mkdir(parents=True, exist_ok=True)
        if not os.access(root, os.W_OK):
            raise PermissionError(f"{root} is not writable")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _status(exc: BaseException) -> int | None:
    """The HTTP status of a botocore ClientError or an :class:`sdk.stores._s3http.S3Error`."""
    status = getattr(exc, "status", None)
    if isinstance(status, int):
        return status
    response = getattr(exc, "response", None)
    return response.get("ResponseMetadata", {}).get("HTTPStatusCode") if isinstance(response, dict) else None


_MD5_HEX = re.compile(r"[0-9a-f]{32}")


def _listed_checksums(info: dict[str, Any]) -> Checksums:
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


def _fingerprint(info: dict[str, Any]) -> str:
    for key in ("ETag", "etag", "generation", "crc32c", "md5Hash"):
        if info.get(key):
            return f"{key}:{str(info[key]).strip(chr(34))}"
    mtime = info.get("mtime") or info.get("LastModified") or info.get("updated") or ""
    return f"mtime:{mtime}:{info.get('size')}"


def _read_fd(fd: int) -> bytes:
    """The whole file open as ``fd``, read by offset from its start (the descriptor's position is untouched)."""
    chunks, offset, want = [], 0, max(os.fstat(fd).st_size, 1 << 16)
    while chunk := os.pread(fd, want, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)

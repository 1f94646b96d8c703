"""A location in any object store, as an fsspec URL, with retries, checksums and conditional create.

``open_store(url)`` gives a :class:`Store` rooted at ``url``; every method takes a path relative to that root.
Every call goes through one retry loop (tenacity: bounded exponential backoff with jitter, each retry logged
with the URL and the error) and one classifier that turns backend exceptions into podtrain's error tree:
transient errors are retried, permanent ones fail at once with a message naming the URL and the fix.
The backends' own retry loops are turned off where they can be (s3fs, botocore) so there is one loop, whose
sleep is injected — unit tests never sleep. gcsfs keeps its internal retry (it cannot be configured per
instance); ours wraps it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import tenacity

from sdk import backend as _backend
from sdk.backend import Checksums, ObjectInfo
from sdk.errors import PodtrainError, TransientStorageError
from sdk.fault import classify
from sdk.log import get_logger

__all__ = ["Checksums", "ObjectInfo", "RetryPolicy", "Store", "open_store", "require_backend", "split_url"]

T = TypeVar("T")
log = get_logger("podtrain.storage")
split_url = _backend.split_url
require_backend = _backend.require_backend


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How hard to try. ``timeout`` bounds a single request (connect and each read), so a stall is an error."""

    attempts: int = 6
    initial_wait: float = 0.25
    max_wait: float = 8.0
    jitter: float = 0.5
    timeout: float = 60.0


class Store:
    """One root location. Paths given to methods are relative POSIX paths under the root."""

    def __init__(
        self,
        url: str,
        *,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.retry = retry or RetryPolicy()
        self._sleep = sleep
        self.backend, self.root = _backend.connect(url, timeout=self.retry.timeout)
        self.url = self.backend.unstrip(self.root)

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    # -- paths -------------------------------------------------------------------------------------------
    def path(self, rel: str = "") -> str:
        """The backend path of ``rel``."""
        rel = rel.strip("/")
        return f"{self.root}/{rel}" if rel else self.root

    def url_of(self, rel: str = "") -> str:
        """The full URL of ``rel``, for messages and for the user."""
        return self.backend.unstrip(self.path(rel))

    def child(self, rel: str) -> Store:
        """A store rooted at ``rel`` under this one, sharing the connection and policy."""
        other = object.__new__(Store)
        other.retry, other._sleep, other.backend = self.retry, self._sleep, self.backend
        other.root = self.path(rel)
        other.url = self.backend.unstrip(other.root)
        return other

    # -- operations --------------------------------------------------------------------------------------
    def put(self, rel: str, data: bytes, *, crc32c: int | None = None, exclusive: bool = False) -> bool:
        """Write ``data`` at ``rel``; the store checks ``crc32c`` on arrival where it can.

        With ``exclusive``, the write is a conditional create (S3 ``If-None-Match: *``, GCS
        ``ifGenerationMatch=0``, a hard link on a local disk): it returns False, writing nothing, when the
        object already exists with other content. An identical object (our own write, retried after a lost
        response) counts as written.
        """

        def attempt() -> bool:
            created = self.backend.put(self.path(rel), data, crc32c=crc32c, exclusive=exclusive)
            if created:
                return True
            existing = self.backend.get(self.path(rel))
            return existing == data

        return self._call("put", rel, attempt)

    def upload(self, rel: str, data: bytes, *, crc32c: int) -> ObjectInfo:
        """Write ``data`` at ``rel`` (the store checks ``crc32c`` on arrival) and return what the store then holds:
        from its answer where it says (S3 single-part, GCS), else from one metadata request."""

        def attempt() -> ObjectInfo:
            return self.backend.upload(self.path(rel), data, crc32c=crc32c) or self.backend.describe(self.path(rel))

        return self._call("put", rel, attempt)

    def upload_file(self, rel: str, local: Path) -> tuple[ObjectInfo, int, int]:
        """Upload the file ``local`` to ``rel`` (streamed in parts where the store allows) and return what the
        store then holds, with the CRC32C and size of the bytes sent (the store checked that CRC32C, or each
        part's, on arrival)."""

        def attempt() -> tuple[ObjectInfo, int, int]:
            info, crc, size = self.backend.upload_file(self.path(rel), local)
            return (info or self.backend.describe(self.path(rel))), crc, size

        return self._call("put", rel, attempt)

    def upload_memory(self, size: int) -> int:
        """The bytes :meth:`upload_file` holds in memory at once for a file of ``size``."""
        return self.backend.upload_memory(size)

    def get(self, rel: str) -> bytes:
        """The whole object at ``rel``."""
        return self._call("get", rel, lambda: self.backend.get(self.path(rel)))

    def exists(self, rel: str) -> bool:
        return self._call("exists", rel, lambda: self.backend.exists(self.path(rel)))

    def size(self, rel: str) -> int:
        return self._call("size", rel, lambda: self.backend.size(self.path(rel)))

    def native_crc32c(self, rel: str) -> int | None:
        """The CRC32C the store itself recorded for the object, or None where it keeps none."""
        return self._call("checksum", rel, lambda: self.backend.native_crc32c(self.path(rel)))

    def list(self, rel: str = "") -> list[str]:
        """Names (not paths) of the direct children of ``rel``; empty when it does not exist."""
        return self._call("list", rel, lambda: self.backend.list(self.path(rel)))

    def walk(self, rel: str = "") -> Iterator[str]:
        """Every object under ``rel``, as paths relative to ``rel``."""
        yield from self._call("find", rel, lambda: self.backend.find(self.path(rel)))

    def read(self, rel: str, start: int | None = None, end: int | None = None) -> tuple[bytes, Checksums]:
        """Bytes ``[start, end)`` of ``rel`` (all of it when ``start`` is None), and the whole object's checksums
        where the answer carried them (``{"crc32c": int, "crc32": int, "md5": hex}``, any subset)."""
        return self._call("get", rel, lambda: self.backend.read(self.path(rel), start, end))

    def describe(self, rel: str) -> ObjectInfo:
        """Size, fingerprint and the store's whole-object checksums of ``rel`` (any of crc32c, crc32, md5)."""
        return self._call("describe", rel, lambda: self.backend.describe(self.path(rel)))

    def objects(self, rel: str = "") -> dict[str, ObjectInfo]:
        """Every object under ``rel`` by name (``""`` when ``rel`` is an object): size, fingerprint, checksums."""
        return self._call("find", rel, lambda: self.backend.objects(self.path(rel)))

    def delete(self, rel: str, *, recursive: bool = False) -> None:
        """Remove ``rel`` (and everything under it with ``recursive``); missing is fine."""
        self._call("delete", rel, lambda: self.backend.delete(self.path(rel), recursive=recursive))

    def ensure_root(self) -> None:
        """Fail fast, with a message, when the root's bucket is missing or not ours to use."""
        self._call("check", "", lambda: self.backend.check_root(self.root))

    # -- the one retry loop ------------------------------------------------------------------------------
    def _call(self, op: str, rel: str, fn: Callable[[], T]) -> T:
        url = self.url_of(rel)

        def classified() -> T:
            try:
                return fn()
            except PodtrainError:
                raise
            except Exception as exc:
                raise classify(exc, url=url, op=op) from exc

        def before_sleep(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            wait = state.next_action.sleep if state.next_action else 0.0
            log.warning(
                "storage.retry",
                op=op,
                url=url,
                attempt=state.attempt_number,
                wait_s=round(wait, 3),
                error=str(exc),
            )

        policy = self.retry
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(policy.attempts),
            wait=_backoff(policy),
            retry=tenacity.retry_if_exception_type(TransientStorageError),
            sleep=self._sleep,
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            return retrying(classified)
        except TransientStorageError as exc:
            raise TransientStorageError(
                f"{op} {url} still failing after {policy.attempts} attempts: {exc}", url=url
            ) from exc


def _backoff(policy: RetryPolicy) -> Callable[[tenacity.RetryCallState], float]:
    """``initial_wait * 2**(n-1)`` plus up to ``jitter`` seconds, capped at ``max_wait`` (before retry n)."""

    def wait(state: tenacity.RetryCallState) -> float:
        exponential = policy.initial_wait * 2 ** (state.attempt_number - 1)
        return float(min(policy.max_wait, exponential + random.uniform(0, policy.jitter)))

    return wait


def open_store(url: str, *, retry: RetryPolicy | None = None, sleep: Callable[[float], None] = time.sleep) -> Store:
    """A :class:`Store` for ``url`` (``s3://``, ``gs://``, ``file://``, a plain path, any fsspec URL)."""
    return Store(url, retry=retry, sleep=sleep)

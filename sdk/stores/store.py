"""A location in any object store, as an fsspec URL, with retries, checksums and conditional create.

``open_store(url)`` gives a :class:`Store` rooted at ``url``; every method takes a path relative to that root.
Every call goes through one retry loop (tenacity: bounded exponential backoff with jitter, each retry logged
with the URL and the error) and one classifier that turns backend exceptions into podtrain's error tree:
transient errors are retried, permanent ones fail at once with a message naming the URL and the fix. Throttling
(the store asking for fewer requests) is retried differently: the store's requests in flight are limited by an
AIMD limit that halves on each throttled answer (:mod:`sdk.stores._throttle`), waits are longer (full jitter), and the
retries go on for a time budget rather than a count of tries.
The backends' own retry loops are turned off where they can be (botocore) so there is one loop, whose
sleep is injected — unit tests never sleep. gcsfs keeps its internal retry (it cannot be configured per
instance); ours wraps it.

A backend is anything that meets :class:`sdk.stores.protocol.Backend`, found by the URL's scheme in
:mod:`sdk.stores.registry`; what a store offers beyond that protocol (``exists``, ``size``, ``native_crc32c``,
``walk``, ``get``, ``upload``) is made here from it, once for every store.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import tenacity

from sdk.errors import (
    ConfigError,
    PodtrainError,
    StorageNotFoundError,
    ThrottledStorageError,
    TransientStorageError,
)
from sdk.log import get_logger
from sdk.stores import registry
from sdk.stores._fault import classify
from sdk.stores._throttle import AdaptiveLimit
from sdk.stores.protocol import Backend, Checksums, ObjectInfo, PartLayout
from sdk.stores.registry import require_backend, split_url

__all__ = [
    "Backend",
    "Checksums",
    "ObjectInfo",
    "PartLayout",
    "RetryPolicy",
    "Store",
    "open_store",
    "require_backend",
    "split_url",
]

T = TypeVar("T")
log = get_logger("podtrain.storage")


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How hard to try. ``timeout`` bounds a single request (connect and each read), so a stall is an error.

    Transient errors: ``attempts`` tries in all, ``initial_wait * 2**(n-1)`` plus up to ``jitter`` seconds before
    retry n, capped at ``max_wait``. Throttled answers do not count as tries: before the n-th retry of a throttled
    request it waits a random time in ``[0, throttle_initial_wait * 2**(n-1)]`` (full jitter), capped at
    ``throttle_max_wait`` and at ``timeout`` (the stall window), and it gives up ``throttle_seconds``
    (``PODTRAIN_THROTTLE_SECONDS``) after its first throttled answer (:mod:`sdk.stores._throttle`).
    """

    attempts: int = 6
    initial_wait: float = 0.25
    max_wait: float = 8.0
    jitter: float = 0.5
    timeout: float = 60.0
    throttle_initial_wait: float = 1.0
    throttle_max_wait: float = 30.0
    throttle_seconds: float = 300.0

    def __post_init__(self) -> None:
        if not 0 < self.throttle_seconds < float("inf"):
            raise ConfigError(f"throttle_seconds={self.throttle_seconds!r}: a finite number of seconds above 0")
        if not (0 <= self.throttle_initial_wait <= self.throttle_max_wait < float("inf")):
            raise ConfigError(
                f"throttle waits {self.throttle_initial_wait!r}..{self.throttle_max_wait!r}: need 0 <= initial <= max"
            )


class Store:
    """One root location. Paths given to methods are relative POSIX paths under the root."""

    def __init__(
        self,
        url: str,
        *,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``sleep`` waits between tries; ``clock`` measures the throttling budget (inject both in tests)."""
        self.retry = retry or RetryPolicy()
        self._sleep, self._clock = sleep, clock
        self.backend: Backend
        self.backend, self.root = registry.connect(url, timeout=self.retry.timeout)
        self.url = self.backend.url(self.root)
        self.limiter = AdaptiveLimit(self.url, clock=clock)  # shared by every thread using this store

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    # -- paths -------------------------------------------------------------------------------------------
    def path(self, rel: str = "") -> str:
        """The backend path of ``rel``."""
        rel = rel.strip("/")
        return f"{self.root}/{rel}" if rel else self.root

    def url_of(self, rel: str = "") -> str:
        """The full URL of ``rel``, for messages and for the user."""
        return self.backend.url(self.path(rel))

    def child(self, rel: str) -> Store:
        """A store rooted at ``rel`` under this one, sharing the connection, policy and request limit."""
        other = object.__new__(Store)
        other.retry, other._sleep, other._clock, other.backend = self.retry, self._sleep, self._clock, self.backend
        other.limiter = self.limiter
        other.root = self.path(rel)
        other.url = self.backend.url(other.root)
        return other

    # -- operations --------------------------------------------------------------------------------------
    def put(self, rel: str, data: bytes | bytearray, *, crc32c: int | None = None, exclusive: bool = False) -> bool:
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
            existing, _ = self.backend.read(self.path(rel))
            return existing == data

        return self._call("put", rel, attempt)

    def upload(self, rel: str, data: bytes, *, crc32c: int) -> ObjectInfo:
        """Write ``data`` at ``rel`` (the store checks ``crc32c`` on arrival) and return what the store then holds,
        from one metadata request after the write (pushes of files, which need no such request where the store's
        answer says it, use :meth:`upload_file`)."""

        def attempt() -> ObjectInfo:
            self.backend.put(self.path(rel), data, crc32c=crc32c, exclusive=False)
            return self.backend.describe(self.path(rel))

        return self._call("put", rel, attempt)

    def upload_file(self, rel: str, local: Path, *, fd: int | None = None) -> tuple[ObjectInfo, int, int]:
        """Upload the file ``local`` to ``rel`` (streamed in parts where the store allows) and return what the
        store then holds, with the CRC32C and size of the bytes sent (the store checked that CRC32C, or each
        part's, on arrival). ``fd``: the file already open; read by offset (every try from the start), never
        reopened by name — ``local`` then only names it (:mod:`sdk.data.push` opens files without following links)."""

        def attempt() -> tuple[ObjectInfo, int, int]:
            info, crc, size = self.backend.upload_file(self.path(rel), local, fd=fd)
            return (info or self.backend.describe(self.path(rel))), crc, size

        return self._call("put", rel, attempt)

    def upload_memory(self, size: int) -> int:
        """The bytes :meth:`upload_file` holds in memory at once for a file of ``size``."""
        return self.backend.upload_memory(size)

    def get(self, rel: str) -> bytes:
        """The whole object at ``rel``."""
        return self._call("get", rel, lambda: self.backend.read(self.path(rel))[0])

    def exists(self, rel: str) -> bool:
        """Whether the object ``rel`` exists (one metadata request: a missing object is an answer, not an error)."""
        try:
            self._call("exists", rel, lambda: self.backend.describe(self.path(rel)))
        except StorageNotFoundError:
            return False
        return True

    def size(self, rel: str) -> int:
        return self._call("size", rel, lambda: self.backend.describe(self.path(rel)).size)

    def native_crc32c(self, rel: str) -> int | None:
        """The CRC32C the store itself recorded for the object, or None where it keeps none."""

        def crc32c() -> int | None:
            crc = self.backend.describe(self.path(rel)).checksums.get("crc32c")
            return None if crc is None else int(crc)

        return self._call("checksum", rel, crc32c)

    def list(self, rel: str = "") -> list[str]:
        """Names (not paths) of the direct children of ``rel``; empty when it does not exist."""
        return self._call("list", rel, lambda: self.backend.list(self.path(rel)))

    def walk(self, rel: str = "") -> Iterator[str]:
        """Every object under ``rel``, as paths relative to ``rel`` (sorted; not ``rel`` itself when it is one)."""
        found = self._call("find", rel, lambda: self.backend.objects(self.path(rel)))
        yield from sorted(name for name in found if name)

    def read(self, rel: str, start: int | None = None, end: int | None = None) -> tuple[bytes, Checksums]:
        """Bytes ``[start, end)`` of ``rel`` (all of it when ``start`` is None), and the whole object's checksums
        where the answer carried them (``{"crc32c": int, "crc32": int, "md5": hex}``, any subset)."""
        return self._call("get", rel, lambda: self.backend.read(self.path(rel), start, end))

    def describe(self, rel: str) -> ObjectInfo:
        """Size, fingerprint and the store's checksums of ``rel``: any of crc32c, crc32, md5 (the whole object's),
        and of a multipart upload crc32c_parts, crc32_parts, md5_parts (checked through :meth:`layout`)."""
        return self._call("describe", rel, lambda: self.backend.describe(self.path(rel)))

    def layout(self, rel: str, size: int, *, exact: bool = False) -> PartLayout:
        """The parts ``rel`` (``size`` bytes) was uploaded in (S3 multipart; one part elsewhere): one request, the
        others' sizes assumed from the first's; ``exact``: one request per part."""
        return self._call("describe", rel, lambda: self.backend.layout(self.path(rel), size, exact=exact))

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
        url, limiter = self.url_of(rel), self.limiter

        def classified() -> T:
            ticket, outcome = limiter.acquire(), "failed"
            try:
                result = fn()
                outcome = "ok"
                return result
            except PodtrainError as exc:
                outcome = _outcome(exc)
                raise
            except Exception as exc:
                error = classify(exc, url=url, op=op)
                outcome = _outcome(error)
                raise error from exc
            finally:
                limiter.release(ticket, outcome)

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
                throttled=isinstance(exc, ThrottledStorageError),
            )

        schedule = _Schedule(self.retry, self._clock)
        retrying = tenacity.Retrying(
            stop=schedule.stop,
            wait=schedule.wait,
            retry=tenacity.retry_if_exception_type(TransientStorageError),
            sleep=self._sleep,
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            return retrying(classified)
        except ThrottledStorageError as exc:
            cause = " ".join(str(exc).removeprefix(f"{op} {url}: ").split())
            raise ThrottledStorageError(
                f"{op} {url}: the store kept throttling this request (asking for fewer requests) for "
                f"{schedule.throttled_for():.0f} s, past the {self.retry.throttle_seconds:g} s throttling budget "
                f"(PODTRAIN_THROTTLE_SECONDS) — retry later, or send fewer requests (fewer workers, objects spread "
                f"over more prefixes); last answer: {cause}",
                url=url,
            ) from exc
        except TransientStorageError as exc:
            raise TransientStorageError(
                f"{op} {url} still failing after {schedule.tries} attempts: {exc}", url=url
            ) from exc


def _outcome(error: BaseException) -> str:
    """How a failed try counts for the request limit (:meth:`sdk.stores._throttle.AdaptiveLimit.release`)."""
    if isinstance(error, ThrottledStorageError):
        return "throttled"
    return "failed" if isinstance(error, TransientStorageError) else "ok"  # a permanent error is still an answer


class _Schedule:
    """One call's retries, as tenacity's ``wait`` and ``stop``: transient errors by count, throttling by time."""

    def __init__(self, policy: RetryPolicy, clock: Callable[[], float]) -> None:
        self.policy, self.clock = policy, clock
        self.failures = 0  # transient errors other than throttling
        self.throttled = 0
        self.since: float | None = None  # this call's first throttled answer: its budget runs from there
        self._last: tuple[int, float, bool] = (0, 0.0, False)  # attempt number -> (wait, stop), decided once

    @property
    def tries(self) -> int:
        return self.failures + self.throttled

    def throttled_for(self) -> float:
        return 0.0 if self.since is None else max(0.0, self.clock() - self.since)

    def wait(self, state: tenacity.RetryCallState) -> float:
        return self._decide(state)[0]

    def stop(self, state: tenacity.RetryCallState) -> bool:
        return self._decide(state)[1]

    def _decide(self, state: tenacity.RetryCallState) -> tuple[float, bool]:
        if self._last[0] != state.attempt_number:  # tenacity asks wait and stop after each failure, in either order
            exc = state.outcome.exception() if state.outcome else None
            decided = self._throttle() if isinstance(exc, ThrottledStorageError) else self._transient()
            self._last = (state.attempt_number, *decided)
        return self._last[1], self._last[2]

    def _transient(self) -> tuple[float, bool]:
        """``initial_wait * 2**(n-1)`` plus up to ``jitter`` seconds, capped at ``max_wait`` (before retry n)."""
        policy = self.policy
        self.failures += 1
        exponential = policy.initial_wait * 2 ** min(self.failures - 1, 30)
        wait = min(policy.max_wait, exponential + random.uniform(0, policy.jitter))
        return float(wait), self.failures >= policy.attempts

    def _throttle(self) -> tuple[float, bool]:
        """Full jitter up to ``throttle_initial_wait * 2**(n-1)`` (capped), while the budget lasts."""
        policy, now = self.policy, self.clock()
        self.throttled += 1
        if self.since is None:
            self.since = now
        left = self.since + policy.throttle_seconds - now
        if left <= 0:
            return 0.0, True
        exponential = policy.throttle_initial_wait * 2 ** min(self.throttled - 1, 30)
        return min(random.uniform(0, min(policy.throttle_max_wait, policy.timeout, exponential)), left), False


def open_store(
    url: str,
    *,
    retry: RetryPolicy | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> Store:
    """A :class:`Store` for ``url`` (``s3://``, ``gs://``, ``file://``, a plain path, any fsspec URL)."""
    return Store(url, retry=retry, sleep=sleep, clock=clock)

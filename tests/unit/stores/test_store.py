"""Store: the retry loop (backoff, give-up, what is never retried, logging), backend lookup, URLs.

Runs on fsspec's memory:// store with a wrapper that makes chosen calls fail, and a fake sleep: nothing here
sleeps or talks to a server. The full storage contract runs on memory:// too.
"""

from __future__ import annotations

import errno
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fsspec
import pytest

from sdk.errors import (
    BackendMissingError,
    ConfigError,
    PermanentStorageError,
    StorageNotFoundError,
    StoragePermissionError,
    TransientStorageError,
)
from sdk.stores.store import RetryPolicy, Store, open_store, require_backend, split_url
from tests.integration.test_storage_contract import StoreContract

if TYPE_CHECKING:
    from tests.conftest import CapturedLog, RecordedSleep

_OPS = {"put", "read", "describe", "list", "objects", "delete", "check_root"}  # the Backend protocol's calls


class Flaky:
    """Wraps a store's backend: each backend call first takes the next queued exception, if any, and raises it."""

    def __init__(self, inner: Any, failures: list[BaseException]) -> None:
        self.inner = inner
        self.failures = list(failures)
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name not in _OPS:
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            if self.failures:
                raise self.failures.pop(0)
            return attr(*args, **kwargs)

        return call


def _flaky(store: Store, *failures: BaseException) -> Flaky:
    flaky = Flaky(store.backend, list(failures))
    store.backend = flaky
    return flaky


class TestMemoryStore(StoreContract):
    """The storage contract on fsspec's memory:// store (exclusive put checks first: not atomic)."""

    @pytest.fixture
    def url(self, memory_url: str) -> str:
        return memory_url


@pytest.fixture
def store(memory_url: str, no_sleep: RecordedSleep) -> Store:
    return open_store(memory_url, sleep=no_sleep, retry=RetryPolicy(attempts=4, initial_wait=0.5, jitter=0.0))


# -- retries ---------------------------------------------------------------------------------------------------
def test_transient_errors_are_retried_until_the_call_succeeds(store: Store, no_sleep: RecordedSleep) -> None:
    """A reset, a timeout and a SlowDown in a row cost three retries, then the put and get work."""
    flaky = _flaky(store, ConnectionResetError(), TimeoutError(), OSError(errno.EBUSY, "SlowDown"))
    assert store.put("obj", b"payload") is True
    assert store.get("obj") == b"payload"
    assert flaky.calls == ["put", "put", "put", "put", "read"]
    assert len(no_sleep.calls) == 3


def test_waits_grow_exponentially_and_stop_at_max_wait(memory_url: str, no_sleep: RecordedSleep) -> None:
    """Without jitter the waits are initial_wait * 2**(n-1), capped at max_wait."""
    policy = RetryPolicy(attempts=6, initial_wait=0.25, max_wait=1.5, jitter=0.0)
    store = open_store(memory_url, retry=policy, sleep=no_sleep)
    _flaky(store, *(ConnectionResetError() for _ in range(5)))
    store.put("obj", b"x")
    assert no_sleep.calls == [0.25, 0.5, 1.0, 1.5, 1.5]


def test_jitter_adds_at_most_its_bound_to_each_wait(memory_url: str, no_sleep: RecordedSleep) -> None:
    """Each wait lies between the exponential step and that step plus ``jitter`` (capped at max_wait)."""
    policy = RetryPolicy(attempts=5, initial_wait=1.0, max_wait=5.0, jitter=0.5)
    store = open_store(memory_url, retry=policy, sleep=no_sleep)
    _flaky(store, *(TimeoutError() for _ in range(4)))
    store.exists("obj")
    for wait, step in zip(no_sleep.calls, [1.0, 2.0, 4.0, 5.0], strict=True):
        assert step <= wait <= min(step + 0.5, 5.0)


def test_gives_up_after_the_configured_attempts_naming_the_url(store: Store, no_sleep: RecordedSleep) -> None:
    """When every attempt fails, a TransientStorageError says which URL and how many attempts."""
    flaky = _flaky(store, *(ConnectionResetError("peer reset") for _ in range(10)))
    with pytest.raises(TransientStorageError) as caught:
        store.get("ckpt/shard-0")
    error = caught.value
    assert error.transient
    assert error.url == store.url_of("ckpt/shard-0")
    assert store.url_of("ckpt/shard-0") in str(error)
    assert "after 4 attempts" in str(error)
    assert "peer reset" in str(error)
    assert flaky.calls == ["read"] * 4
    assert len(no_sleep.calls) == 3


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (FileNotFoundError("no such key"), StorageNotFoundError),
        (PermissionError("AccessDenied"), StoragePermissionError),
        (ValueError("Bad Request: invalid argument"), PermanentStorageError),
        (FileExistsError("precondition failed"), PermanentStorageError),
    ],
)
def test_permanent_errors_fail_at_once_without_sleeping(
    store: Store, no_sleep: RecordedSleep, raised: BaseException, expected: type[Exception]
) -> None:
    """Not-found, access-denied and bad-request errors are raised after one call, classified, never retried."""
    flaky = _flaky(store, raised, raised)
    with pytest.raises(expected) as caught:
        store.size("obj")
    assert not isinstance(caught.value, TransientStorageError)
    assert store.url_of("obj") in str(caught.value)
    assert flaky.calls == ["describe"]
    assert no_sleep.calls == []


def test_each_retry_is_logged_with_the_url_and_the_error(
    store: Store, no_sleep: RecordedSleep, captured_log: CapturedLog
) -> None:
    """Every retry writes one storage.retry line: op, URL, attempt number, wait and the error text."""
    _flaky(store, ConnectionResetError("reset by peer"), TimeoutError("read timed out"))
    store.put("a/b", b"x")
    lines = captured_log.records("storage.retry")
    assert [line["attempt"] for line in lines] == [1, 2]
    assert {line["op"] for line in lines} == {"put"}
    assert {line["url"] for line in lines} == {store.url_of("a/b")}
    assert "reset by peer" in lines[0]["error"]
    assert "read timed out" in lines[1]["error"]
    assert [line["wait_s"] for line in lines] == [round(w, 3) for w in no_sleep.calls]


def test_permanent_errors_are_not_logged_as_retries(store: Store, captured_log: CapturedLog) -> None:
    """A failure that is not retried writes no storage.retry line."""
    with pytest.raises(StorageNotFoundError):
        store.get("missing")
    assert captured_log.records("storage.retry") == []


def test_a_child_store_retries_with_its_parents_policy_and_sleep(store: Store, no_sleep: RecordedSleep) -> None:
    """child() shares the retry policy and the injected sleep."""
    child = store.child("sub")
    _flaky(child, ConnectionResetError())
    assert child.put("f", b"x") is True
    assert len(no_sleep.calls) == 1
    assert store.get("sub/f") == b"x"


# -- exclusive put under retries ---------------------------------------------------------------------------------
def _lose_first_answer(store: Store) -> None:
    """The backend's first put is carried out, but its answer is lost (the connection resets)."""
    real_put, lost = store.backend.put, list[str]()

    def put(path: str, data: bytes, **kwargs: Any) -> bool:
        created = real_put(path, data, **kwargs)
        if not lost:
            lost.append(path)
            raise ConnectionResetError("answer lost")
        return bool(created)

    store.backend.put = put  # type: ignore[method-assign]


def test_exclusive_put_retried_after_a_lost_answer_counts_as_written(store: Store) -> None:
    """Our own write, found on retry with the same bytes, is a success rather than a conflict."""
    _lose_first_answer(store)
    assert store.put("MANIFEST", b"ours", exclusive=True) is True
    assert store.get("MANIFEST") == b"ours"


def test_exclusive_put_after_a_retry_still_loses_to_other_content(store: Store) -> None:
    """A retry does not turn someone else's object into ours."""
    store.put("MANIFEST", b"theirs")
    _flaky(store, ConnectionResetError())
    assert store.put("MANIFEST", b"ours", exclusive=True) is False
    assert store.get("MANIFEST") == b"theirs"


# -- backends and URLs -------------------------------------------------------------------------------------------
def test_unknown_scheme_is_a_config_error_naming_the_schemes_to_use() -> None:
    """open_store on a scheme nobody implements fails before any I/O, saying which schemes work."""
    with pytest.raises(BackendMissingError) as caught:
        open_store("nosuchstore://bucket/key")
    message = str(caught.value)
    assert "'nosuchstore'" in message
    assert "s3://" in message
    assert "gs://" in message
    assert isinstance(caught.value, ConfigError)
    assert caught.value.fault == "user"


def test_require_backend_names_the_variable_that_holds_the_url() -> None:
    """When a setting carries the bad URL, the message starts with VARIABLE='url'."""
    with pytest.raises(BackendMissingError, match=r"^PODTRAIN_CHECKPOINT_URI='nosuchstore://b/k'"):
        require_backend("nosuchstore://b/k", "PODTRAIN_CHECKPOINT_URI")


@pytest.mark.parametrize(
    ("url", "fix"),
    [
        ("s3://bucket/key", "pip install 'podtrain[s3]'"),
        ("gs://bucket/key", "pip install 'podtrain[gcs]'"),
        ("abfs://container/key", "install the fsspec backend for abfs://"),
    ],
)
def test_missing_backend_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch, url: str, fix: str) -> None:
    """A known scheme whose package is not installed names the pip extra (or the fsspec backend) to add."""

    def not_installed(protocol: str) -> type:
        raise ImportError(f"No module named '{protocol}fs'")

    monkeypatch.setattr(fsspec, "get_filesystem_class", not_installed)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(  # botocore and gcsfs are looked for without being imported
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("botocore", "gcsfs") else real_find_spec(name, *a),
    )
    with pytest.raises(BackendMissingError) as caught:
        open_store(url)
    assert fix in str(caught.value)
    assert "not installed" in str(caught.value)


@pytest.mark.parametrize("url", ["s3://", "gs://", "s3:///prefix", "gcs:///"])
def test_a_url_that_names_no_bucket_is_a_config_error_before_any_io(url: str) -> None:
    """``s3://`` would otherwise reach botocore's parameter check (or gcsfs's retries against no bucket)."""
    with pytest.raises(BackendMissingError, match=r"names no bucket — use \w+://BUCKET/PREFIX$") as caught:
        open_store(url)
    assert isinstance(caught.value, ConfigError)


@pytest.mark.parametrize("url", ["ftp://host/dir", "webhdfs://host/dir"])
def test_a_scheme_whose_file_system_needs_a_host_is_refused_as_unknown(url: str) -> None:
    """fsspec knows ftp://, but its file system cannot be made from the scheme alone (it needs ``host``), which is
    all the fsspec store (:mod:`sdk.stores._fsspec`) gives it: refused up front (exit 2), not a TypeError later."""
    with pytest.raises(BackendMissingError, match=r"^PODTRAIN_DATA_URI=.*unknown URL scheme .* needs no host$"):
        require_backend(url, "PODTRAIN_DATA_URI")


def test_installed_backends_pass_require_backend() -> None:
    """s3, gs, file and memory are all available in the dev environment."""
    for url in ("s3://b/k", "gs://b/k", "file:///tmp/x", "memory://x", "relative/dir"):
        assert require_backend(url) is None, url  # raises BackendMissingError when a backend is missing


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("s3://bucket/a/b/", ("s3", "bucket/a/b")),
        ("S3://bucket/key", ("s3", "bucket/key")),
        ("gs://bucket", ("gs", "bucket")),
        ("file:///data/ckpt", ("file", "/data/ckpt")),
        ("/abs/path", ("file", "/abs/path")),
    ],
)
def test_split_url_gives_protocol_and_path(url: str, expected: tuple[str, str]) -> None:
    """Schemes are lower-cased, trailing slashes dropped, plain paths are local files."""
    assert split_url(url) == expected


def test_split_url_makes_relative_and_home_paths_absolute(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A relative path is taken from the working directory and ``~`` is expanded."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert split_url("ckpt/run") == ("file", str(tmp_path / "ckpt" / "run"))
    assert split_url("~/ckpt") == ("file", str(tmp_path / "home" / "ckpt"))


def test_url_of_joins_relative_paths_under_the_root(store: Store, memory_url: str) -> None:
    """url_of strips stray slashes; the empty path is the root itself."""
    assert store.url == memory_url
    assert store.url_of("") == memory_url
    assert store.url_of("/a/b/") == f"{memory_url}/a/b"


def test_a_local_path_store_writes_where_the_path_points(tmp_path: Path) -> None:
    """A plain directory path works like a file:// URL and creates missing folders."""
    store = open_store(str(tmp_path / "x" / "y"))
    store.put("f.bin", b"data")
    assert (tmp_path / "x" / "y" / "f.bin").read_bytes() == b"data"
    assert store.url == (tmp_path / "x" / "y").as_uri()

"""Storage under faults: the fault proxy between podtrain and real S3/GCS servers on 127.0.0.1.

Throttling, a connection reset mid-answer, a lost answer to an upload and a stall past the timeout are all
survived (on S3 through both request paths: the lean client and botocore's), with the data intact; a slow but
flowing transfer is not a timeout; retries are logged; when every attempt fails, the error names the URL. gcsfs
retries 5xx and broken connections itself, sleeping 1-2 s and more between tries, so GCS fault counts stay at one,
and tests that must exhaust gcsfs make its sleeps instant.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
from gcsfs.core import GCSFileSystem

from sdk.errors import TransientStorageError
from sdk.stores import checksum
from sdk.stores.store import RetryPolicy, Store, open_store
from tests.faultproxy import FaultProxy

if TYPE_CHECKING:
    from tests.conftest import CapturedLog, RecordedSleep

UPLOAD = {"s3": "PUT", "seaweedfs": "PUT", "gcs": "POST"}  # the request that carries an object's bytes
DOWNLOAD_PATH = {"s3": r"^/podtrain-test/root/", "gcs": r"^/download/"}  # GETs of object bodies
DOWNLOAD_PATH["seaweedfs"] = DOWNLOAD_PATH["s3"]
DATA = os.urandom(512 * 1024)
_TRIES = {"s3": 1, "gcs": GCSFileSystem.retries}  # requests per attempt of ours: gcsfs retries inside it


@pytest.fixture(params=["s3", "s3-botocore", "seaweedfs", "gcs"])
def path(request: pytest.FixtureRequest) -> str:
    """The store and, for S3 (moto), which of its two request paths (the lean client, or botocore's client);
    ``seaweedfs`` is S3 on SeaweedFS through the lean client."""
    return str(request.param)


@pytest.fixture
def backend(path: str) -> str:
    return path.partition("-")[0]


@pytest.fixture
def url(request: pytest.FixtureRequest, backend: str, path: str) -> str:
    url = str(request.getfixturevalue(f"{backend}_url"))
    if path == "s3-botocore":
        request.getfixturevalue("s3_botocore")
    return url


@pytest.fixture
def proxy(url: str, backend: str, fault_proxy: Callable[[str], FaultProxy]) -> FaultProxy:
    return fault_proxy(backend)


def _store(url: str, sleep: Callable[[float], None], **policy: float) -> Store:
    return open_store(url, sleep=sleep, retry=RetryPolicy(**policy))  # type: ignore[arg-type]


def _verify(store: Store, rel: str) -> None:
    assert store.get(rel) == DATA
    assert store.native_crc32c(rel) == checksum.crc32c(DATA)


def test_put_and_get_survive_throttling(url: str, backend: str, proxy: FaultProxy, no_sleep: RecordedSleep) -> None:
    """503 SlowDown on the first upload tries and the first download try: both succeed, the data verifies."""
    store = _store(url, no_sleep)
    tries = 1 if backend == "gcs" else 2
    upload_fault = proxy.fail(503, method=UPLOAD[backend], times=tries)
    download_fault = proxy.fail(503, method="GET", path=DOWNLOAD_PATH[backend], times=1)
    assert store.put("obj", DATA) is True
    _verify(store, "obj")
    assert (upload_fault.hits, download_fault.hits) == (tries, 1)
    assert upload_fault.seen == tries + 1


def test_get_survives_a_connection_reset_mid_answer(url: str, backend: str, proxy: FaultProxy) -> None:
    """A reset after 64 KiB of a download is retried; the bytes read back whole."""
    store = _store(url, lambda _: None)
    store.put("obj", DATA)
    fault = proxy.reset(after=64 * 1024, method="GET", path=DOWNLOAD_PATH[backend])
    _verify(store, "obj")
    assert fault.hits == 1
    assert fault.seen == 2


def test_exclusive_put_whose_answer_was_lost_counts_as_written(url: str, backend: str, proxy: FaultProxy) -> None:
    """The store writes the object but the answer is reset; the retry finds our own bytes and reports success."""
    store = _store(url, lambda _: None)
    fault = proxy.drop(method=UPLOAD[backend])
    assert store.put("MANIFEST.json", DATA, exclusive=True) is True
    _verify(store, "MANIFEST.json")
    assert fault.hits == 1
    assert fault.seen == 2  # the retry went to the store and was refused as existing


def test_a_stall_longer_than_the_timeout_is_cut_and_retried(url: str, backend: str, proxy: FaultProxy) -> None:
    """A store that takes the request and then says nothing for 20 s is abandoned after timeout, then retried."""
    store = _store(url, lambda _: None, timeout=0.5)
    stall = proxy.stall(20.0, method=UPLOAD[backend])
    started = time.monotonic()
    assert store.put("obj", DATA) is True
    assert time.monotonic() - started < 10
    stall = proxy.stall(20.0, method="GET", path=DOWNLOAD_PATH[backend])
    _verify(store, "obj")
    assert stall.hits == 1
    assert time.monotonic() - started < 15


def test_a_slow_but_flowing_download_is_not_a_timeout(
    url: str, backend: str, proxy: FaultProxy, no_sleep: RecordedSleep
) -> None:
    """The timeout bounds each wait for bytes, not the transfer: 1 s of steady 128 KiB pieces beats timeout=0.6."""
    store = _store(url, no_sleep, timeout=0.6)
    store.put("obj", DATA)
    slow = proxy.slow(128 * 1024, 0.25, method="GET", path=DOWNLOAD_PATH[backend])
    assert store.get("obj") == DATA
    assert slow.seen == 1  # one download, never retried
    assert no_sleep.calls == []


@pytest.mark.usefixtures("fast_gcsfs_retries")
def test_each_retry_is_logged_with_the_url_and_the_error(
    url: str, proxy: FaultProxy, no_sleep: RecordedSleep, captured_log: CapturedLog
) -> None:
    """Two failed attempts give two storage.retry lines naming the object's URL and the store's error."""
    store = _store(url, no_sleep)
    proxy.fail(503, method=UPLOAD[proxy.flavor], times=2 * _TRIES[proxy.flavor])
    assert store.put("dir/obj", DATA) is True
    lines = captured_log.records("storage.retry")
    assert [line["attempt"] for line in lines] == [1, 2]
    for line in lines:
        assert line["url"] == store.url_of("dir/obj")
        assert line["op"] == "put"
        assert "503" in line["error"] or "reduce your request rate" in line["error"]
    assert len(no_sleep.calls) == 2
    _verify(store, "dir/obj")


@pytest.mark.usefixtures("fast_gcsfs_retries")
def test_exhausted_attempts_raise_a_transient_error_naming_the_url(
    url: str, proxy: FaultProxy, no_sleep: RecordedSleep, captured_log: CapturedLog
) -> None:
    """When the store answers 500 to every try, the put fails after the policy's attempts with the URL.
    (Throttling — S3's 503 SlowDown — is retried for a time budget instead: tests/adversarial/test_throttling.py.)"""
    store = _store(url, no_sleep, attempts=3)
    fault = proxy.fail(500, times=None)
    with pytest.raises(TransientStorageError) as caught:
        store.put("obj", DATA)
    assert caught.value.url == store.url_of("obj")
    assert store.url_of("obj") in str(caught.value)
    assert "after 3 attempts" in str(caught.value)
    assert len(no_sleep.calls) == 2
    assert len(captured_log.records("storage.retry")) == 2
    assert fault.hits == 3 * _TRIES[proxy.flavor]

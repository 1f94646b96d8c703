"""Checkpoints on real protocol servers: the contract on S3 (moto and SeaweedFS) and GCS (fake-gcs-server), and their
faults."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from sdk.checkpoints.checkpointer import Checkpointer
from sdk.errors import StorageNotFoundError, StoragePermissionError
from sdk.stores.store import RetryPolicy
from tests.checkpoint_contract import CheckpointContract, _same, _state, _weights
from tests.conftest import CapturedLog, RecordedSleep
from tests.faultproxy import FaultProxy

UPLOAD = {"s3": "PUT", "seaweedfs": "PUT", "gcs": "POST"}
FILE_PATH = r"attempt-\d"  # requests for state files (not the manifest), in S3 and GCS URL forms alike


class TestOnS3(CheckpointContract):
    """The contract on S3 through moto's server on 127.0.0.1, on both request paths (lean client, botocore's)."""

    @pytest.fixture(params=["lean", "botocore"])
    def url(self, request: pytest.FixtureRequest, s3_url: str) -> str:
        if request.param == "botocore":
            request.getfixturevalue("s3_botocore")
        return s3_url


class TestOnSeaweedFS(CheckpointContract):
    """The contract on SeaweedFS, a real S3 implementation that checks signatures and body checksums, through
    podtrain's own signing client (botocore's path runs the storage contract there; here it would add ~25 s)."""

    @pytest.fixture
    def url(self, seaweedfs_url: str) -> str:
        return seaweedfs_url


class TestOnGCS(CheckpointContract):
    """The contract on GCS through fake-gcs-server on 127.0.0.1."""

    @pytest.fixture
    def url(self, gcs_url: str) -> str:
        return gcs_url


@pytest.fixture(params=["s3", "s3-botocore", "seaweedfs", "gcs"])
def backend(request: pytest.FixtureRequest) -> str:
    """The store (for S3 on both request paths: the lean client, and botocore's through an AWS config file; and
    on SeaweedFS, a real S3 implementation, through the lean client)."""
    if request.param == "s3-botocore":
        request.getfixturevalue("s3_botocore")
    return str(request.param).partition("-")[0]


def test_save_and_load_survive_throttling_resets_and_corrupt_reads(
    backend: str, fault_proxy: Callable[[str], FaultProxy], no_sleep: RecordedSleep, captured_log: CapturedLog
) -> None:
    """503/SlowDown on an upload, a reset mid-download, a byte flipped in transit: save and load still succeed."""
    proxy = fault_proxy(backend)
    url = "gs://podtrain-test/root" if backend == "gcs" else "s3://podtrain-test/root"
    policy = RetryPolicy(attempts=6, timeout=10)
    original = _state(1)
    proxy.fail(503, method=UPLOAD[backend], skip=1, times=1)
    Checkpointer(url, run_id="r1", attempt=1, retry=policy, sleep=no_sleep).save(5, original)

    proxy.reset(after=100, method="GET", path=FILE_PATH, times=1)
    proxy.flip(offset=50, method="GET", path=FILE_PATH, times=1)
    restored = _state(2)
    assert Checkpointer(url, run_id="r1", attempt=2, retry=policy, sleep=no_sleep).load(restored) == 5
    assert _same(_weights(restored), _weights(original))
    assert captured_log.records("checkpoint.reread"), "the damaged read is read again, not a fallback"
    assert Checkpointer(url, attempt=3, retry=policy, sleep=no_sleep).verify(5).step == 5
    fired = [f for f in proxy.faults if f.hits]
    assert len(fired) == 3
    if backend != "gcs":  # gcsfs retries 5xx inside its own loop, below ours
        assert any(r["op"] == "put" for r in captured_log.records("storage.retry"))


def test_save_retries_a_stalled_upload_past_the_timeout(
    backend: str, fault_proxy: Callable[[str], FaultProxy], no_sleep: RecordedSleep
) -> None:
    """An upload whose answer never comes is timed out and retried; the checkpoint commits and verifies."""
    proxy = fault_proxy(backend)
    url = "gs://podtrain-test/root" if backend == "gcs" else "s3://podtrain-test/root"
    proxy.stall(4.0, method=UPLOAD[backend], skip=2, times=1)
    policy = RetryPolicy(attempts=4, timeout=1.5)
    Checkpointer(url, run_id="r1", attempt=1, retry=policy, sleep=no_sleep).save(9, _state(9))
    assert Checkpointer(url, attempt=2, retry=policy, sleep=no_sleep).verify(9).step == 9
    assert proxy.faults[0].hits == 1


def test_access_denied_fails_fast_with_what_to_fix(
    backend: str, fault_proxy: Callable[[str], FaultProxy], no_sleep: RecordedSleep
) -> None:
    """403 on every request: StoragePermissionError naming the URL and the credentials, and no retries."""
    proxy = fault_proxy(backend)
    url = "gs://podtrain-test/root" if backend == "gcs" else "s3://podtrain-test/root"
    proxy.fail(403, times=None)
    with pytest.raises(StoragePermissionError) as info:
        Checkpointer(url, attempt=1, sleep=no_sleep).save(1, {"model": torch.nn.Linear(2, 2)})
    assert "podtrain-test" in str(info.value)
    assert "credentials" in str(info.value)
    assert no_sleep.calls == []


@pytest.mark.parametrize("backend_url", ["s3_url", "seaweedfs_url", "gcs_url"])
def test_missing_bucket_fails_fast_on_save_and_on_resume(
    backend_url: str, request: pytest.FixtureRequest, no_sleep: RecordedSleep
) -> None:
    """A bucket that does not exist is a StorageNotFoundError naming it, at once — never 'no checkpoints'."""
    scheme = request.getfixturevalue(backend_url).split("://")[0]
    url = f"{scheme}://no-such-bucket-here/run"
    with pytest.raises(StorageNotFoundError, match="no-such-bucket-here"):
        Checkpointer(url, attempt=1, sleep=no_sleep).load({"model": torch.nn.Linear(2, 2)})
    with pytest.raises(StorageNotFoundError, match="bucket exists"):
        Checkpointer(url, attempt=1, sleep=no_sleep).save(1, {"model": torch.nn.Linear(2, 2)})
    assert no_sleep.calls == []

"""sdk.stores._listing: a pull's first S3 listing, started early, is used once and never replaces the real listing's
errors or freshness."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from sdk.errors import StorageNotFoundError
from sdk.stores import _listing as listing
from sdk.stores import _s3http as s3http
from sdk.stores.store import open_store


@pytest.fixture
def lists(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, str]]:
    """Every ListObjectsV2 sdk.stores._s3http makes: (thread name, bucket, prefix)."""
    seen: list[tuple[str, str, str]] = []
    real = s3http.S3HTTP.list

    def spy(self: s3http.S3HTTP, bucket: str, prefix: str, **kwargs: Any) -> Any:
        seen.append((threading.current_thread().name, bucket, prefix))
        return real(self, bucket, prefix, **kwargs)

    monkeypatch.setattr(s3http.S3HTTP, "list", spy)
    return seen


def test_a_started_listing_is_what_the_store_lists_and_only_once(s3_url: str, lists: list[Any]) -> None:
    """start() lists in a background thread; the store's objects() takes that answer instead of listing again."""
    store = open_store(f"{s3_url}/data")
    for name in ("a.bin", "sub/b.bin"):
        store.put(name, b"x" * 10)
    listing.start(f"{s3_url}/data/")
    assert sorted(store.objects()) == ["a.bin", "sub/b.bin"]
    assert [t for t, _, _ in lists] == ["podtrain-listing"], "one listing, made by the head start"
    assert sorted(store.objects()) == ["a.bin", "sub/b.bin"] and len(lists) == 2, "used once: the next one lists"


def test_a_failed_head_start_leaves_the_real_listing_and_its_message(s3_url: str) -> None:
    """A missing bucket makes the early listing fail silently; the store's own listing raises the usual error."""
    listing.start("s3://no-such-bucket-here/data")
    with pytest.raises(StorageNotFoundError):
        open_store("s3://no-such-bucket-here/data").objects()


def test_a_stale_answer_is_not_used(s3_url: str, lists: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """An answer older than FRESH_SECONDS is dropped and the store lists again, so it sees what changed since."""
    store = open_store(f"{s3_url}/data")
    store.put("old.bin", b"1")
    listing.start(f"{s3_url}/data")
    monkeypatch.setattr(listing, "FRESH_SECONDS", 0.0)
    store.put("new.bin", b"2")
    assert sorted(store.objects()) == ["new.bin", "old.bin"]


def test_only_s3_urls_with_keys_in_the_environment_get_a_head_start(
    s3_url: str, monkeypatch: pytest.MonkeyPatch, lists: list[Any]
) -> None:
    """file:// and gs:// are ignored; S3 with credentials that need botocore (a profile) gets no early listing."""
    listing.start("file:///tmp/x")
    listing.start("gs://bucket/x")
    monkeypatch.setenv("AWS_PROFILE", "prod")
    listing.start(f"{s3_url}/data")
    assert listing.take("podtrain-test", "root/data/") is None
    assert lists == []

"""Pulling a dataset (sdk.pull) from file://, S3 (moto) and GCS (fake-gcs-server) on 127.0.0.1."""

from __future__ import annotations

import os
from collections import namedtuple
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sdk.errors import InsufficientSpaceError, StorageNotFoundError, StoragePermissionError
from sdk.pull import INDEX_NAME, PARTIAL_SUFFIX, pull
from sdk.storage import RetryPolicy, Store, open_store
from tests.faultproxy import FaultProxy

FILES = {"train/a.bin": os.urandom(3000), "train/b.bin": os.urandom(70_000), "val/c.txt": b"hello", "README": b"x"}


def _upload(url: str) -> None:
    store = open_store(url)
    for rel, data in FILES.items():
        store.put(f"data/{rel}", data)


@pytest.fixture
def gets(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every object read through a Store, recorded (the real read still happens)."""
    seen: list[str] = []
    original = Store.get

    def spy(self: Store, rel: str) -> bytes:
        seen.append(rel)
        return original(self, rel)

    monkeypatch.setattr(Store, "get", spy)
    return seen


def _local(dest: Path) -> dict[str, bytes]:
    return {
        p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file() and p.name != INDEX_NAME
    }


def test_cold_pull_fetches_everything_verified_and_a_warm_pull_nothing(
    store_url: str, tmp_path: Path, gets: list[str]
) -> None:
    """Cold: every object lands whole, no partial file is left. Warm: nothing is read from the store."""
    _upload(store_url)
    dest = tmp_path / "data"
    first = pull([f"{store_url}/data"], dest)
    assert (first.files, first.fetched, first.skipped) == (4, 4, 0)
    assert _local(dest) == FILES
    assert not list(dest.rglob(f"*{PARTIAL_SUFFIX}"))
    gets.clear()
    second = pull([f"{store_url}/data"], dest)
    assert (second.fetched, second.skipped, second.bytes_fetched) == (0, 4, 0)
    assert gets == []


def test_a_changed_object_is_fetched_again_and_only_it(store_url: str, tmp_path: Path, gets: list[str]) -> None:
    """An object rewritten in the store is fetched again; the others are not."""
    _upload(store_url)
    dest = tmp_path / "data"
    pull([f"{store_url}/data"], dest)
    open_store(store_url).put("data/val/c.txt", b"changed!")
    gets.clear()
    result = pull([f"{store_url}/data"], dest)
    assert result.fetched == 1 and gets == ["val/c.txt"]
    assert (dest / "val" / "c.txt").read_bytes() == b"changed!"


def test_include_and_exclude_globs_choose_the_files(store_url: str, tmp_path: Path) -> None:
    """include keeps only matching names, exclude drops matching ones."""
    _upload(store_url)
    dest = tmp_path / "data"
    pull([f"{store_url}/data"], dest, include=["train/*"], exclude=["*b.bin"])
    assert set(_local(dest)) == {"train/a.bin"}


def test_an_interrupted_pull_continues_where_it_stopped(
    store_url: str, tmp_path: Path, gets: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pull that dies after two files: the next one fetches only the other two."""
    _upload(store_url)
    dest = tmp_path / "data"
    spy = Store.get
    calls: list[str] = []

    def dying(self: Store, rel: str) -> bytes:
        if len(calls) >= 2:
            raise KeyboardInterrupt("the pod went away")
        calls.append(rel)
        return spy(self, rel)

    monkeypatch.setattr(Store, "get", dying)
    with pytest.raises(KeyboardInterrupt):
        pull([f"{store_url}/data"], dest, workers=1)
    monkeypatch.setattr(Store, "get", spy)
    gets.clear()
    result = pull([f"{store_url}/data"], dest)
    assert result.fetched == 2 and set(gets) == set(FILES) - set(calls)
    assert _local(dest) == FILES


def test_a_single_object_url_is_pulled_by_its_name(store_url: str, tmp_path: Path) -> None:
    """A URL naming one object pulls that object into the folder under its own name."""
    _upload(store_url)
    pull([f"{store_url}/data/val/c.txt"], tmp_path / "one")
    assert _local(tmp_path / "one") == {"c.txt": b"hello"}


def test_a_prefix_with_nothing_under_it_is_a_clear_error(store_url: str, tmp_path: Path) -> None:
    """An empty or mistyped prefix fails at once, naming the URL and the variable."""
    _upload(store_url)
    with pytest.raises(StorageNotFoundError, match="PODTRAIN_DATA_URI"):
        pull([f"{store_url}/no-such-prefix"], tmp_path / "data")


def test_not_enough_disk_fails_before_fetching(
    store_url: str, tmp_path: Path, gets: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A volume without room: InsufficientSpaceError naming the sizes and the folder, nothing read."""
    _upload(store_url)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("sdk.pull.shutil.disk_usage", lambda path: usage(10**9, 10**9, 1000))
    with pytest.raises(InsufficientSpaceError, match="bigger volume"):
        pull([f"{store_url}/data"], tmp_path / "data")
    assert gets == []


@pytest.mark.parametrize("backend", ["s3", "gcs"])
def test_a_corrupted_transfer_is_read_again_and_access_denied_fails_fast(
    backend: str, tmp_path: Path, fault_proxy: Callable[[str], FaultProxy], request: Any
) -> None:
    """A byte flipped in transit is caught (size/CRC32C) and read again; a 403 fails at once with the URL."""
    url = request.getfixturevalue(f"{backend}_url")
    _upload(url)
    proxy = fault_proxy(backend)
    proxy.flip(offset=100, method="GET", path="b.bin", times=1)
    pull([f"{url}/data"], tmp_path / "data", retry=RetryPolicy(attempts=3, timeout=10))
    assert _local(tmp_path / "data") == FILES
    proxy.fail(403, times=None)
    with pytest.raises(StoragePermissionError, match="podtrain-test"):
        pull([f"{url}/data"], tmp_path / "other", retry=RetryPolicy(attempts=3, timeout=10))


def test_run_pull_data_uses_the_configured_uri_and_folder(store_url: str, tmp_path: Path) -> None:
    """run.pull_data() with PODTRAIN_DATA_URI/_DIR set fetches there; a second call fetches nothing."""
    import sdk
    from sdk.config import Config

    _upload(store_url)
    config = Config(data_uri=f"{store_url}/data", data_dir=str(tmp_path / "d"), checkpoint_uri=str(tmp_path / "c"))
    with sdk.init(config.with_changes(attempt=1)) as run:
        assert run.pull_data().fetched == 4
        assert run.pull_data().fetched == 0
    assert _local(tmp_path / "d") == FILES

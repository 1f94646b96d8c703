"""The S3 store's own checks on what a server answers (sdk.stores._s3), with a client that answers as told."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from sdk.errors import PermanentStorageError
from sdk.stores._s3 import S3Backend


class _Answers:
    """A client whose listing answers with the given keys, whatever prefix is asked; deletes are recorded."""

    def __init__(self, keys: list[str]) -> None:
        self.keys, self.deleted = keys, []  # type: list[str], list[str]

    def list(self, bucket: str, prefix: str, *, delimiter: str = "") -> Iterator[dict[str, Any]]:
        for key in self.keys:
            yield {"Key": key, "Size": 1, "ETag": '"0"'}

    def delete_many(self, bucket: str, keys: list[str]) -> None:
        self.deleted.extend(keys)

    def delete(self, bucket: str, key: str) -> None:
        self.deleted.append(key)


def _backend(client: _Answers) -> S3Backend:
    backend = S3Backend((), 5.0)
    backend.__dict__["client"] = client  # the cached client, as the store would have made it
    return backend


@pytest.mark.parametrize("operation", ["objects", "list", "delete"])
def test_a_listing_answering_keys_outside_the_prefix_is_refused_and_nothing_is_deleted(operation: str) -> None:
    """A server or proxy listing `runs/r1/` but answering `other/secret` would name pulled files after a foreign key
    or have a recursive delete remove it: one permanent error naming the key, and no delete sent."""
    client = _Answers(["runs/r1/step-1/MANIFEST.json", "other/secret"])
    backend = _backend(client)
    with pytest.raises(PermanentStorageError, match="'other/secret', outside it"):
        if operation == "delete":
            backend.delete("bucket/runs/r1", recursive=True)
        else:
            getattr(backend, operation)("bucket/runs/r1")
    assert client.deleted == []


def test_a_listing_inside_the_prefix_is_used_as_it_comes() -> None:
    """Keys under the prefix pass the check unchanged: the store's listing and recursive delete work as before."""
    client = _Answers(["runs/r1/a", "runs/r1/sub/b"])
    backend = _backend(client)
    assert sorted(backend.objects("bucket/runs/r1")) == ["a", "sub/b"]
    assert backend.list("bucket/runs/r1") == ["a", "sub"]
    backend.delete("bucket/runs/r1", recursive=True)
    assert client.deleted == ["runs/r1/a", "runs/r1/sub/b", "runs/r1"]

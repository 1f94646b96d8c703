"""sdk.stores.registry and sdk.stores.protocol: a store is one module, one registry line and one contract subclass.

``DictBackend`` below is such a store, in this very module: it meets :class:`sdk.stores.protocol.Backend`, its
``connect`` is registered for ``dict://`` by one line (``monkeypatch.setitem``), and the whole storage contract
runs on it. The stores podtrain ships are held to the same protocol, and to no import cycle among their modules.
"""

from __future__ import annotations

import ast
import importlib
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdk.stores import checksum, registry
from sdk.stores.protocol import Backend, Checksums, ObjectInfo, PartLayout
from sdk.stores.store import open_store
from tests.integration.test_storage_contract import StoreContract

STORES_DIR = Path(__file__).resolve().parents[3] / "sdk" / "stores"
_BUCKETS: dict[str, dict[str, bytes]] = {}
_LOCK = threading.Lock()


def connect(url: str, *, timeout: float) -> tuple[Backend, str]:
    """The factory ``dict://`` is registered with: a backend and the root path in it."""
    return DictBackend(), url.partition("://")[2].rstrip("/")


class DictBackend:
    """Objects in a process-wide dict, by ``bucket/key``: the smallest store that keeps the contract."""

    def url(self, path: str) -> str:
        return f"dict://{path}"

    def _bucket(self, path: str) -> tuple[dict[str, bytes], str]:
        bucket, _, key = path.partition("/")
        return _BUCKETS.setdefault(bucket, {}), key

    def put(self, path: str, data: bytes, *, crc32c: int | None, exclusive: bool) -> bool:
        objects, key = self._bucket(path)
        with _LOCK:
            if exclusive and key in objects:
                return False
            objects[key] = bytes(data)
        return True

    def upload_file(self, path: str, local: Path, *, fd: int | None = None) -> tuple[ObjectInfo | None, int, int]:
        data = local.read_bytes() if fd is None else os.pread(fd, os.fstat(fd).st_size, 0)
        self.put(path, data, crc32c=None, exclusive=False)
        return None, checksum.crc32c(data), len(data)

    def upload_memory(self, size: int) -> int:
        return size

    def read(self, path: str, start: int | None = None, end: int | None = None) -> tuple[bytes, Checksums]:
        objects, key = self._bucket(path)
        if key not in objects:
            raise FileNotFoundError(path)
        data = objects[key]
        return (data, {}) if start is None else (data[start:end], {})

    def describe(self, path: str) -> ObjectInfo:
        data, _ = self.read(path)
        crc = checksum.crc32c(data)
        return ObjectInfo(len(data), f"crc32c:{crc}", {})

    def layout(self, path: str, size: int, *, exact: bool = False) -> PartLayout:
        return PartLayout(sizes=(size,))

    def objects(self, path: str) -> dict[str, ObjectInfo]:
        objects, key = self._bucket(path)
        prefix = f"{key}/" if key else ""
        names = [k[len(prefix) :] for k in list(objects) if k.startswith(prefix)] + ([""] if key in objects else [])
        return {name: self.describe(f"{path}/{name}" if name else path) for name in names}

    def list(self, path: str) -> list[str]:
        return sorted({name.split("/", 1)[0] for name in self.objects(path)} - {""})

    def delete(self, path: str, *, recursive: bool) -> None:
        objects, key = self._bucket(path)
        with _LOCK:
            objects.pop(key, None)
            for name in [k for k in objects if recursive and k.startswith(f"{key}/")]:
                del objects[name]

    def check_root(self, root: str) -> None:
        return None


class TestARegisteredStore(StoreContract):
    """The whole storage contract on a store that exists only as this module plus one registry line."""

    @pytest.fixture
    def url(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
        monkeypatch.setitem(registry.STORES, "dict", f"{__name__}:connect")
        bucket = f"b-{uuid.uuid4().hex[:8]}"
        yield f"dict://{bucket}/root"
        _BUCKETS.pop(bucket, None)


def test_a_registered_scheme_opens_its_module_s_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """open_store finds the module by the scheme's line; nothing else in podtrain names it."""
    monkeypatch.setitem(registry.STORES, "dict", f"{__name__}:connect")
    store = open_store("dict://bucket/run")
    assert isinstance(store.backend, DictBackend)
    assert store.url == "dict://bucket/run"


@pytest.mark.parametrize(
    "url",
    ["file:///tmp/podtrain-registry", "s3://bucket/run", "gs://bucket/run", "memory://podtrain-registry"],
)
def test_every_store_podtrain_ships_meets_the_backend_protocol(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each registered module's ``connect`` (and the fsspec fallback's) gives a Backend, and the root in it;
    nothing is sent to make one."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")  # anonymous gcsfs: no credential look-up
    backend, root = registry.connect(url, timeout=5)
    assert isinstance(backend, Backend)
    assert backend.url(root).rstrip("/").endswith(url.partition("://")[2].rstrip("/"))


def test_the_registry_names_only_modules_that_exist_with_their_factory() -> None:
    """Every line of the table (and the fallback) is ``module:factory`` of an importable module."""
    for target in {*registry.STORES.values(), registry.FALLBACK}:
        module, _, factory = target.partition(":")
        assert callable(getattr(importlib.import_module(module), factory)), target


def test_no_module_of_sdk_stores_imports_one_that_imports_it_back() -> None:
    """Imports among sdk.stores' modules — at the top or inside functions — form no cycle: the registry names
    stores by string, and no store imports another store's private names."""
    graph: dict[str, set[str]] = {}
    for path in STORES_DIR.glob("*.py"):
        name = f"sdk.stores.{path.stem}".removesuffix(".__init__")
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                found |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        graph[name] = {m for m in found if m.startswith("sdk.stores.")} - {name}
    graph = {name: {m for m in targets if m in graph} for name, targets in graph.items()}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in graph[start])

    assert [name for name in graph if reaches(name, name, set())] == []

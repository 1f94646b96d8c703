"""The warm cache of a pulled folder: a line is written only after the file it names is on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdk import warmcache


def test_a_landed_file_gets_its_line_only_after_the_volume_is_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """record() holds the line; commit() syncs (once, for every pending file) and then writes them all."""
    synced: list[list[str]] = []
    index_path = tmp_path / warmcache.INDEX_NAME

    def sync(folder: Path, files: list[Path]) -> None:
        assert not index_path.exists() or index_path.read_text() == "", "a line was written before the sync"
        synced.append(sorted(p.name for p in files))

    monkeypatch.setattr(warmcache, "_sync", sync)
    index = warmcache.WarmCache(index_path)
    for name in ("a.bin", "b.bin"):
        (tmp_path / name).write_bytes(b"x" * 10)
        index.record(tmp_path / name, name, 10, f"etag-{name}")
    assert synced == [] and not index_path.exists(), "below the thresholds nothing is written yet"
    index.close()
    assert synced == [["a.bin", "b.bin"]]
    lines = [json.loads(line) for line in index_path.read_text().splitlines()]
    assert [line["rel"] for line in lines] == ["a.bin", "b.bin"]
    assert warmcache.WarmCache(index_path).current("a.bin", tmp_path / "a.bin", 10, "etag-a.bin")


def test_the_real_sync_flushes_without_error(tmp_path: Path) -> None:
    """syncfs where libc has it, else fsync per file: either way it returns, files intact."""
    (tmp_path / "f").write_bytes(b"data")
    warmcache._sync(tmp_path, [tmp_path / "f", tmp_path / "gone"])
    assert (tmp_path / "f").read_bytes() == b"data"

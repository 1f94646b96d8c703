"""The warm cache of a pulled folder: a line is written only after the file it names is on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdk.data import _warmcache as warmcache


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


def test_a_line_after_a_torn_last_line_is_not_glued_onto_it(tmp_path: Path) -> None:
    """A pull cut off mid-line (or a full disk) leaves a torn last line; the next record starts a line of its own,
    so neither it nor the records after it are lost."""
    index_path = tmp_path / warmcache.INDEX_NAME
    (tmp_path / "a.bin").write_bytes(b"x")
    index_path.write_text(json.dumps({"rel": "old", "size": 1, "fingerprint": "f", "mtime_ns": 1}) + '\n{"rel": "to')
    index = warmcache.WarmCache(index_path)
    index.record(tmp_path / "a.bin", "a.bin", 1, "etag-a")
    index.close()
    assert set(warmcache.WarmCache(index_path).entries) == {"old", "a.bin"}


def test_the_index_is_never_read_or_appended_through_a_symlink(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("the user's file\n")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / warmcache.INDEX_NAME).symlink_to(outside)
    with pytest.raises(OSError, match=r"symbolic link|Too many levels"):
        warmcache.WarmCache(tmp_path / "d" / warmcache.INDEX_NAME)
    assert outside.read_text() == "the user's file\n"


def test_a_record_takes_the_mtime_it_is_given(tmp_path: Path) -> None:
    """The pull records the mtime from the descriptor it checked the file through, not from a path lookup."""
    index = warmcache.WarmCache(tmp_path / warmcache.INDEX_NAME)
    index.record(tmp_path / "never-looked-up", "x", 3, "etag", mtime_ns=123)
    index.close()
    assert warmcache.WarmCache(tmp_path / warmcache.INDEX_NAME).entries["x"]["mtime_ns"] == 123


def test_kept_pieces_are_written_after_the_partial_file_is_synced_and_read_back_only_for_the_same_object(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """keep_pieces() waits for commit(), which syncs the partial file first; kept_pieces() answers for the same
    size, fingerprint and piece size only; a later line for the name (the file landed whole) wins."""
    synced: list[list[str]] = []
    index_path = tmp_path / warmcache.INDEX_NAME
    monkeypatch.setattr(warmcache, "_sync", lambda folder, files: synced.append([p.name for p in files]))
    index = warmcache.WarmCache(index_path)
    partial = tmp_path / "big.bin.podtrain-partial"
    index.keep_pieces(partial, "big.bin", 3 * 2**20, "etag-1", piece_size=2**20, crcs={0: 7, 2**20: 0}, digest="crc32c")
    assert not index_path.exists(), "nothing is written before the sync"
    index.close()
    assert synced == [["big.bin.podtrain-partial"]]
    again = warmcache.WarmCache(index_path)
    assert again.kept_pieces("big.bin", 3 * 2**20, "etag-1", 2**20) == ("crc32c", {0: 7, 2**20: 0})
    assert not again.current("big.bin", tmp_path / "big.bin", 3 * 2**20, "etag-1"), "kept pieces are no file"
    for changed in (("big.bin", 3 * 2**20, "etag-2", 2**20), ("big.bin", 4 * 2**20, "etag-1", 2**20)):
        assert again.kept_pieces(*changed) == ("", {}), "another version of the object: start over"
    assert again.kept_pieces("big.bin", 3 * 2**20, "etag-1", 2**21) == ("", {}), "another piece size"
    (tmp_path / "big.bin").write_bytes(b"x")
    again.record(tmp_path / "big.bin", "big.bin", 3 * 2**20, "etag-1")
    again.close()
    assert warmcache.WarmCache(index_path).kept_pieces("big.bin", 3 * 2**20, "etag-1", 2**20) == ("", {})

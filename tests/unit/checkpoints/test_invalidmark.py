"""sdk.checkpoints.invalidmark: a full check's finding kept beside a committed checkpoint, bound to the manifest it was
about."""

from __future__ import annotations

import json
from pathlib import Path

from sdk.checkpoints import invalidmark
from sdk.checkpoints.invalidmark import DamagedRange
from sdk.checkpoints.manifest import FileEntry, Manifest
from sdk.stores.store import Store, open_store


def _manifest(attempt: int, step: int = 7) -> Manifest:
    files = {"model.safetensors": FileEntry(size=10, crc32c="0000abcd")}
    return Manifest(run_id="r1", attempt=attempt, step=step, world_size=1, files=files, torch="2.5")


def test_a_mark_is_read_back_with_its_reason_and_who_found_it(tmp_path: Path) -> None:
    store = open_store(tmp_path.as_uri())
    manifest = _manifest(1)
    assert invalidmark.read(store, manifest) is None
    assert invalidmark.mark(store, manifest, "model.safetensors has CRC32C 1, manifest says 2", by="a test")
    reason = invalidmark.read(store, manifest)
    assert reason is not None and reason.startswith("model.safetensors has CRC32C 1") and "found by a test" in reason
    invalidmark.clear(store, 7)
    assert invalidmark.read(store, manifest) is None


def test_a_mark_about_an_earlier_commit_of_the_step_does_not_apply_to_a_new_one(tmp_path: Path) -> None:
    """A superseded commit's manifest is removed and the step committed again: the old finding is not about it."""
    store = open_store(tmp_path.as_uri())
    assert invalidmark.mark(store, _manifest(1), "corrupt", by="a test")
    assert invalidmark.read(store, _manifest(2)) is None


def test_a_damaged_mark_is_ignored(tmp_path: Path) -> None:
    store = open_store(tmp_path.as_uri())
    store.put(f"step-0000000007/{invalidmark.MARK_NAME}", b"\xff not json")
    assert invalidmark.read(store, _manifest(1)) is None
    store.put(f"step-0000000007/{invalidmark.MARK_NAME}", b"[1, 2]")
    assert invalidmark.read(store, _manifest(1)) is None


def test_a_mark_that_cannot_be_written_is_no_error(tmp_path: Path) -> None:
    """Read-only to us (here: a file where the step folder would be): the finding is not remembered, and says so."""
    (tmp_path / "step-0000000007").write_text("not a folder")
    assert invalidmark.mark(open_store(tmp_path.as_uri()), _manifest(1), "corrupt", by="a test") is False


def _ranged_manifest() -> Manifest:
    files = {
        "attempt-1/rank-0/sharded.safetensors": FileEntry(size=1000, crc32c="0000abcd"),
        "attempt-1/rank-1/sharded.safetensors": FileEntry(size=500, crc32c="0000dcba"),
    }
    return Manifest(run_id="r1", attempt=1, step=7, world_size=2, files=files, torch="2.5")


def _put_ranges(store: Store, manifest: Manifest, ranges: object) -> None:
    """A mark for ``manifest`` whose ranges are written as given (what a hostile or damaged mark could hold)."""
    document = {"manifest_crc32c": invalidmark._identity(manifest), "reason": "x", "ranges": ranges}
    store.put(f"step-0000000007/{invalidmark.MARK_NAME}", json.dumps(document).encode())


def test_damaged_ranges_come_back_as_they_were_marked(tmp_path: Path) -> None:
    """The ranges a load found damaged, with their expected CRC32Cs, are read back by the next load, in order."""
    store = open_store(tmp_path.as_uri())
    manifest = _ranged_manifest()
    assert invalidmark.damaged_ranges(store, manifest) == []
    ranges = [
        DamagedRange("attempt-1/rank-1/sharded.safetensors", 8, 500, 0xFFFFFFFF),
        DamagedRange("attempt-1/rank-0/sharded.safetensors", 0, 1, 0),
    ]
    assert invalidmark.mark(store, manifest, "CRC32C mismatch", by="a load on rank 1", ranges=ranges)
    assert invalidmark.damaged_ranges(store, manifest) == ranges
    assert invalidmark.read(store, manifest) is not None
    assert invalidmark.mark(store, manifest, "corrupt", by="verify")  # a mark without ranges has none
    assert invalidmark.damaged_ranges(store, manifest) == []


def test_ranges_that_do_not_fit_a_file_of_the_manifest_are_left_out(tmp_path: Path) -> None:
    """A hostile or damaged mark cannot point a read anywhere: each ill-formed entry is dropped, the good kept."""
    store = open_store(tmp_path.as_uri())
    manifest = _ranged_manifest()
    name = "attempt-1/rank-0/sharded.safetensors"
    good = {"file": name, "start": 10, "end": 20, "crc32c": "0badf00d"}
    bad = [
        {**good, "file": "attempt-1/rank-2/sharded.safetensors"},  # not in the manifest
        {**good, "file": "../../etc/passwd"},
        {**good, "file": 3},
        {**good, "end": 1001},  # past the file's end
        {**good, "start": -1},
        {**good, "start": 20},  # empty
        {**good, "start": 30},  # reversed
        {**good, "start": True},
        {**good, "end": "20"},
        {**good, "start": 10.0},
        {**good, "crc32c": "0BADF00D"},
        {**good, "crc32c": "badf00d"},
        {**good, "crc32c": 195948557},
        {k: v for k, v in good.items() if k != "crc32c"},
        "not an object",
        [name, 10, 20, "0badf00d"],
    ]
    for part in (bad[:8], bad[8:]):  # at most 16 entries are read: each bad one is left out for its own fault
        _put_ranges(store, manifest, [*part, good])
        assert invalidmark.damaged_ranges(store, manifest) == [DamagedRange(name, 10, 20, 0x0BADF00D)]
    _put_ranges(store, manifest, {"file": name})  # not a list
    assert invalidmark.damaged_ranges(store, manifest) == []


def test_a_mark_for_another_manifest_gives_no_ranges(tmp_path: Path) -> None:
    """Ranges found in an earlier commit of the step say nothing about the files of a new one."""
    store = open_store(tmp_path.as_uri())
    manifest = _ranged_manifest()
    found = DamagedRange("attempt-1/rank-0/sharded.safetensors", 10, 20, 1)
    assert invalidmark.mark(store, manifest, "corrupt", by="a test", ranges=[found])
    other = Manifest(run_id="r1", attempt=2, step=7, world_size=2, files=manifest.files, torch="2.5")
    assert invalidmark.damaged_ranges(store, other) == []
    assert invalidmark.damaged_ranges(store, manifest) == [found]
    store.put(f"step-0000000007/{invalidmark.MARK_NAME}", b"\xff not json")
    assert invalidmark.damaged_ranges(store, manifest) == []


def test_a_mark_keeps_at_most_16_ranges(tmp_path: Path) -> None:
    """A load that found many ranges damaged writes (and the next one reads) the first 16: the mark stays small."""
    store = open_store(tmp_path.as_uri())
    manifest = _ranged_manifest()
    ranges = [DamagedRange("attempt-1/rank-0/sharded.safetensors", i, i + 1, i) for i in range(40)]
    assert invalidmark.mark(store, manifest, "corrupt", by="a test", ranges=ranges)
    assert invalidmark.damaged_ranges(store, manifest) == ranges[:16]
    _put_ranges(
        store, manifest, [{"file": r.file, "start": r.start, "end": r.end, "crc32c": "00000000"} for r in ranges]
    )
    assert len(invalidmark.damaged_ranges(store, manifest)) == 16

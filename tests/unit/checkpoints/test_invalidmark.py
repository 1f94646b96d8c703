"""sdk.checkpoints.invalidmark: a full check's finding kept beside a committed checkpoint, bound to the manifest it was
about."""

from __future__ import annotations

from pathlib import Path

from sdk.checkpoints import invalidmark
from sdk.checkpoints.manifest import FileEntry, Manifest
from sdk.stores.store import open_store


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

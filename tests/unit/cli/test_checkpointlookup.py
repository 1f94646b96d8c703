"""entrypoint._checkpointlookup: the next attempt number and the newest committed checkpoint, read from manifests
within a time limit."""

from __future__ import annotations

from pathlib import Path

import pytest

from entrypoint._checkpointlookup import derive_attempt, newest_checkpoint


def test_newest_checkpoint_of_a_missing_local_store_is_none(tmp_path: Path) -> None:
    """A local checkpoint location that does not exist means no checkpoint, and it is not created."""
    step, url, note = newest_checkpoint(str(tmp_path / "nothing"), run_id="r", attempt=None, timeout=5)
    assert (step, url) == (None, None) and "no checkpoint committed" in note
    assert not (tmp_path / "nothing").exists()


def test_newest_checkpoint_reads_manifests(tmp_path: Path) -> None:
    """The newest committed step is found from manifests; an uncommitted folder is skipped."""
    import torch

    from sdk.checkpoints.checkpointer import Checkpointer

    ckpt = Checkpointer(str(tmp_path / "ck"), run_id="r", attempt=1)
    ckpt.save(5, {"model": torch.nn.Linear(2, 2)})
    ckpt.save(7, {"model": torch.nn.Linear(2, 2)})
    ckpt.store.put("step-0000000009/attempt-1/model.pt", b"partial")  # never committed
    step, url, note = newest_checkpoint(str(tmp_path / "ck"), run_id="r", attempt=None, timeout=10)
    assert step == 7 and url is not None and url.endswith("step-0000000007") and note == ""


def test_newest_checkpoint_reports_an_unreadable_store() -> None:
    """A store that cannot be read gives no checkpoint and says why."""
    step, url, note = newest_checkpoint("memory://podtrain-nope/x", run_id="r", attempt=1, timeout=5)
    assert (step, url) == (None, None)
    assert note


def test_derive_attempt_is_one_more_than_the_newest_seen_and_reserved(tmp_path: Path) -> None:
    """An empty store gives attempt 1; after attempt 3 saved, the next is 4; each number derived is reserved in the
    store, so deriving again (another supervisor) gives the next one."""
    import torch

    from sdk.checkpoints.checkpointer import Checkpointer

    assert derive_attempt(str(tmp_path / "none"), run_id="r", timeout=5) == (1, "")
    assert (tmp_path / "none" / "attempts" / "attempt-1.reserved.json").is_file()
    assert derive_attempt(str(tmp_path / "none"), run_id="r", timeout=5) == (2, "")
    Checkpointer(str(tmp_path / "ck"), run_id="r", attempt=3).save(1, {"model": torch.nn.Linear(2, 2)})
    assert derive_attempt(str(tmp_path / "ck"), run_id="r", timeout=10) == (4, "")


def test_derive_attempt_says_why_when_the_store_cannot_be_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """A store nobody answers for (a closed port on 127.0.0.1) gives no attempt and the reason."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    attempt, note = derive_attempt("s3://podtrain-nope/x", run_id="r", timeout=5)
    assert attempt is None
    assert "s3://podtrain-nope/x" in note
    assert "Connection refused" in note or "Could not connect" in note, note  # the S3 client's words for it

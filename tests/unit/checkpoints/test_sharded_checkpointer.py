"""Sharded checkpoints of a 2-rank job on a local directory and on a file:// URL (the sharded contract suite)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.sharded_contract import ShardedCheckpointContract


class TestShardedOnLocalDirectory(ShardedCheckpointContract):
    """The sharded contract on a plain path."""

    @pytest.fixture
    def url(self, tmp_path: Path) -> str:
        return str(tmp_path / "ckpt")


class TestShardedOnFileUrl(ShardedCheckpointContract):
    """The sharded contract on an explicit file:// URL."""

    @pytest.fixture
    def url(self, tmp_path: Path) -> str:
        return f"file://{tmp_path}/ckpt"

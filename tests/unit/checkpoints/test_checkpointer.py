"""Checkpoints on a local directory and on fsspec's memory store (the contract suite), plus API errors."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import torch

from sdk.checkpoints.checkpointer import Checkpointer
from sdk.errors import CheckpointError, InvalidCheckpointError
from tests.checkpoint_contract import CheckpointContract


class TestOnLocalDirectory(CheckpointContract):
    """The contract on a plain path (file://)."""

    @pytest.fixture
    def url(self, tmp_path: Path) -> str:
        return str(tmp_path / "ckpt")


class TestOnFileUrl(CheckpointContract):
    """The contract on an explicit file:// URL."""

    @pytest.fixture
    def url(self, tmp_path: Path) -> str:
        return f"file://{tmp_path}/ckpt"


class TestOnMemory(CheckpointContract):
    """The contract on fsspec's memory:// store (no conditional create: exists-then-write)."""

    @pytest.fixture
    def url(self) -> str:
        return f"memory://podtrain-tests/{uuid.uuid4().hex}"


def test_state_names_must_be_file_safe(tmp_path: Path) -> None:
    """A state key that is not a safe file stem, or is reserved, is refused with the rule."""
    ckpt = Checkpointer(str(tmp_path), attempt=1)
    for bad in ("../x", "rng", "", "a b"):
        with pytest.raises(CheckpointError, match="not allowed"):
            ckpt.save(1, {bad: torch.nn.Linear(1, 1)})


def test_state_without_state_dict_is_refused(tmp_path: Path) -> None:
    """An object with no state_dict()/load_state_dict() that is not a dict is refused by name."""
    with pytest.raises(CheckpointError, match="'weights'"):
        Checkpointer(str(tmp_path), attempt=1).save(1, {"weights": [1, 2, 3]})


def test_loading_a_state_name_that_was_never_saved_says_what_was(tmp_path: Path) -> None:
    """Asking for 'scheduler' from a checkpoint without it names what the checkpoint holds."""
    Checkpointer(str(tmp_path), attempt=1).save(1, {"model": torch.nn.Linear(2, 2)})
    with pytest.raises(CheckpointError, match=r"no state for scheduler.*holds model"):
        Checkpointer(str(tmp_path), attempt=2).load({"model": torch.nn.Linear(2, 2), "scheduler": {}})


def test_a_state_that_does_not_fit_the_object_is_an_error_naming_it(tmp_path: Path) -> None:
    """Loading a checkpoint into a differently shaped model raises CheckpointError naming the state, no fallback."""
    Checkpointer(str(tmp_path), attempt=1).save(1, {"model": torch.nn.Linear(2, 2)})
    with pytest.raises(CheckpointError, match=r"state 'model' from checkpoint .* does not fit Linear"):
        Checkpointer(str(tmp_path), attempt=2).load({"model": torch.nn.Linear(3, 3)})


def test_an_empty_step_folder_is_not_a_checkpoint(tmp_path: Path) -> None:
    """An empty step-<n>/ directory (a save that died before its first byte) is skipped; verify says why."""
    Checkpointer(str(tmp_path), attempt=1).save(1, {"model": torch.nn.Linear(2, 2)})
    (tmp_path / "step-0000000002").mkdir()
    assert Checkpointer(str(tmp_path), attempt=2).load({"model": torch.nn.Linear(2, 2)}) == 1
    with pytest.raises(InvalidCheckpointError, match="no manifest"):
        Checkpointer(str(tmp_path), attempt=2).verify(2)

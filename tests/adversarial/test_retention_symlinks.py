"""Symbolic links in a local checkpoint store: retention and deletion never reach through them.

A store's own writes never make links; a link found in one is not the store's. So a step folder that is a link
is not a checkpoint of this store (ignored: never loaded, listed or deleted), deleting a link removes the link
and never what it points at, and nothing is ever deleted *through* a link below the store's root.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdk.checkpoints.checkpointer import Checkpointer
from sdk.checkpoints.manifest import MANIFEST_NAME, step_dir
from sdk.errors import PermanentStorageError
from sdk.stores.store import open_store

PODTRAIN = str(Path(sys.executable).with_name("podtrain"))


def _save(url: str, *steps: int, keep_last: int = 10) -> Checkpointer:
    ckpt = Checkpointer(url, run_id="links", attempt=1, keep_last=keep_last)
    for step in steps:
        ckpt.save(step, {"model": torch.nn.Linear(2, 2)})
    return ckpt


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def elsewhere(tmp_path: Path) -> Path:
    """A real, committed checkpoint of step 1 outside the store (another run's)."""
    _save(str(tmp_path / "elsewhere"), 1)
    return tmp_path / "elsewhere" / step_dir(1)


def test_retention_never_deletes_through_a_symlinked_step_folder(tmp_path: Path, elsewhere: Path) -> None:
    """step-1 of the store is a link to another run's checkpoint; saving 2 and 3 with keep_last=1 leaves it whole."""
    store = tmp_path / "store"
    store.mkdir()
    (store / step_dir(1)).symlink_to(elsewhere, target_is_directory=True)
    before = _tree(elsewhere)
    _save(str(store), 2, 3, keep_last=1)
    assert _tree(elsewhere) == before  # the manifest and every file are still there
    assert Checkpointer(str(tmp_path / "elsewhere"), attempt=1).verify(1).step == 1
    assert (store / step_dir(1)).is_symlink()  # not ours: not deleted either
    assert sorted(p.name for p in store.iterdir() if p.name.startswith("step-")) == [step_dir(1), step_dir(3)]


def test_a_symlinked_step_folder_is_not_a_checkpoint_of_the_store(tmp_path: Path, elsewhere: Path) -> None:
    """It is neither listed, loaded, nor shown by `podtrain checkpoints list --all`."""
    store = tmp_path / "store"
    store.mkdir()
    (store / step_dir(1)).symlink_to(elsewhere, target_is_directory=True)
    ckpt = Checkpointer(str(store), attempt=2)
    assert ckpt.scan() == []
    assert ckpt.load({"model": torch.nn.Linear(2, 2)}) is None
    out = subprocess.run([PODTRAIN, "checkpoints", "list", str(store), "--all"], capture_output=True, text=True)
    assert out.returncode == 0 and "Traceback" not in out.stderr
    assert "no valid checkpoints" in out.stdout


def test_deleting_a_link_removes_the_link_never_its_target(tmp_path: Path) -> None:
    """A link to a folder (recursive or not) and a link to a file: the link goes, the target stays whole."""
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "sub" / "MANIFEST.json").write_text("{}")
    (outside / "file").write_text("keep")
    store = open_store(str(tmp_path / "store"))
    store.put("real/x", b"x")
    root = Path(store.root)
    (root / "dirlink").symlink_to(outside, target_is_directory=True)
    (root / "dirlink2").symlink_to(outside, target_is_directory=True)
    (root / "real" / "filelink").symlink_to(outside / "file")
    store.delete("dirlink", recursive=True)
    store.delete("dirlink2")
    store.delete("real/filelink")
    assert not os.path.lexists(root / "dirlink") and not os.path.lexists(root / "dirlink2")
    assert not os.path.lexists(root / "real" / "filelink")
    assert (outside / "sub" / "MANIFEST.json").read_text() == "{}" and (outside / "file").read_text() == "keep"


def test_deleting_through_a_link_is_refused(tmp_path: Path) -> None:
    """`link/MANIFEST.json` and `link/sub` (recursive), link pointing out of the store or into it: refused, by name."""
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / MANIFEST_NAME).write_text("{}")
    store = open_store(str(tmp_path / "store"))
    store.put(f"{step_dir(1)}/{MANIFEST_NAME}", b"{}")
    root = Path(store.root)
    (root / step_dir(2)).symlink_to(outside, target_is_directory=True)
    (root / step_dir(3)).symlink_to(root / step_dir(1), target_is_directory=True)  # inside the store
    for rel, recursive in [
        (f"{step_dir(2)}/{MANIFEST_NAME}", False),
        (f"{step_dir(2)}/sub", True),
        (f"{step_dir(3)}/{MANIFEST_NAME}", False),
    ]:
        with pytest.raises(PermanentStorageError, match="symbolic link"):
            store.delete(rel, recursive=recursive)
    assert (outside / MANIFEST_NAME).exists() and (outside / "sub").is_dir()
    assert (root / step_dir(1) / MANIFEST_NAME).exists()


def test_deleting_dot_dot_out_of_the_store_is_refused(tmp_path: Path) -> None:
    """A relative path that climbs out of the root is refused, whatever is there."""
    (tmp_path / "victim").write_text("keep")
    store = open_store(str(tmp_path / "store"))
    store.put("x", b"x")
    with pytest.raises(PermanentStorageError, match=r"'\.\.'"):
        store.delete("../victim")
    assert (tmp_path / "victim").read_text() == "keep"


def test_a_folder_holding_a_link_out_is_removed_without_following_it(tmp_path: Path) -> None:
    """Retention removing a real step folder whose writer sub-folder is a link out: the link goes, not the target."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "weights").write_text("keep")
    store = open_store(str(tmp_path / "store"))
    store.put(f"{step_dir(1)}/real", b"x")
    (Path(store.root) / step_dir(1) / "attempt-1").symlink_to(outside, target_is_directory=True)
    store.delete(step_dir(1), recursive=True)
    assert not os.path.lexists(Path(store.root) / step_dir(1))
    assert (outside / "weights").read_text() == "keep"


def test_a_store_whose_root_is_a_link_works_as_before(tmp_path: Path) -> None:
    """The root itself may be a link (the user chose it): saving and pruning through it work."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "root-link").symlink_to(real, target_is_directory=True)
    _save(str(tmp_path / "root-link"), 1, 2, 3, keep_last=1)
    assert sorted(p.name for p in real.iterdir() if p.name.startswith("step-")) == [step_dir(3)]

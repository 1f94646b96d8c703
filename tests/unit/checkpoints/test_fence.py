"""Fencing: claims, which attempt supersedes which, and a stale run that learns it was fenced and stops."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from sdk.checkpoints._fence import (
    Claim,
    attempt_of_dir,
    claim,
    new_writer,
    read_claims,
    reserve_attempt,
    superseded_by,
    superseding,
    writer_dir,
)
from sdk.checkpoints.checkpointer import Checkpointer
from sdk.config import Config
from sdk.errors import CommitConflictError, StaleAttemptError
from sdk.lifecycle.preemption import Preemption
from sdk.run import Run
from sdk.stores.store import open_store


def test_a_claim_is_written_once_and_read_back(tmp_path: Path) -> None:
    """The first claim of an attempt stands; claiming again returns it unchanged."""
    store = open_store(str(tmp_path))
    assert claim(store, 2, 40) == Claim(2, 40)
    assert claim(store, 2, 99) == Claim(2, 40)
    claim(store, 3, 55)
    assert read_claims(store) == [Claim(2, 40), Claim(3, 55)]


def test_no_claims_in_an_empty_store(tmp_path: Path) -> None:
    """A store without the attempts folder has no claims (and nothing is created by looking)."""
    assert read_claims(open_store(str(tmp_path / "none"))) == []


def test_superseding_is_the_newest_newer_attempt() -> None:
    """Attempt 1 is superseded by the newest of 2 and 3; attempt 3 by nobody."""
    claims = [Claim(2, 10), Claim(3, 20)]
    assert superseding(claims, 1) == Claim(3, 20)
    assert superseding(claims, 3) is None


@pytest.mark.parametrize(
    ("attempt", "step", "superseded"),
    [(1, 10, False), (1, 11, True), (2, 20, False), (2, 21, True), (3, 99, False)],
)
def test_a_checkpoint_is_superseded_when_a_newer_attempt_resumed_before_its_step(
    attempt: int, step: int, superseded: bool
) -> None:
    """Attempt 2 resumed from 10 and attempt 3 from 20: later commits of older attempts are superseded."""
    claims = [Claim(2, 10), Claim(3, 20)]
    assert (superseded_by(claims, attempt, step) is not None) == superseded


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_stale_run_keeps_saving_after_the_new_attempt_started_and_is_stopped(tmp_path: Path, mode: str) -> None:
    """The old attempt's next save fails with StaleAttemptError; every checkpoint of the new attempt stays valid."""
    url = str(tmp_path / "ckpt")

    def make(attempt: int) -> Run:
        config = Config(checkpoint_uri=url, attempt=attempt, keep_last=2, checkpoint_mode=mode)  # type: ignore[arg-type]
        return Run(config, Checkpointer.from_config(config), Preemption(30))

    model = torch.nn.Linear(3, 3)
    old = make(1)
    old.resume({"model": model})
    for step in range(1, 6):
        old.checkpoint(step, {"model": model})
        old.wait()
    new = make(2)
    assert new.resume({"model": torch.nn.Linear(3, 3)}) == 5
    with pytest.raises(StaleAttemptError, match="superseded by attempt 2"):
        for step in range(6, 9):  # the old attempt goes on; at the latest the call after a failed save raises
            old.checkpoint(step, {"model": model})
            old.wait()
    for step in range(6, 10):
        new.checkpoint(step, {"model": model})
        new.wait()
    new.close()
    old.close(failed=True, timeout=10)
    reader = Checkpointer(url, attempt=3)
    assert [(c.step, c.manifest.attempt) for c in reader.list()] == [(9, 2), (8, 2), (5, 1)]
    for info in reader.list():
        assert reader.verify(info.step).step == info.step


# -- writer folders and reserved attempt numbers (issue 14) --------------------------------------------------------
def test_writer_folders_name_their_attempt_in_either_form() -> None:
    """attempt-<n>-<writer> (now) and attempt-<n> (before writer ids) both belong to attempt n; nothing else does."""
    assert writer_dir(3, "0a1b2c3d4e5f") == "attempt-3-0a1b2c3d4e5f"
    assert writer_dir(3, None) == "attempt-3"
    assert [attempt_of_dir(n) for n in ("attempt-3-0a1b2c3d4e5f", "attempt-3", "attempt-12/")] == [3, 3, 12]
    assert [attempt_of_dir(n) for n in ("attempt-x", "attempt-3-XYZ", "MANIFEST.json", "attempt-3.json")] == [None] * 4
    assert new_writer() != new_writer()


def test_a_reserved_number_is_never_given_twice_and_the_loser_takes_the_next(tmp_path: Path) -> None:
    """The next number after everything seen (folders, claims, reservations) is reserved by a conditional create;
    a number another process reserved first is skipped, never shared."""
    store = open_store(str(tmp_path))
    assert reserve_attempt(store, 0) == 1
    assert reserve_attempt(store, 0) == 2, "a reservation counts as taken"
    claim(store, 5, 0)
    assert reserve_attempt(store, 3) == 6, "a claim counts as taken"
    assert reserve_attempt(store, 9) == 10, "so does the newest attempt seen in the step folders"
    # another process reserved 11 between our listing and our create: we take 12
    store.put("attempts/attempt-11.reserved.json", b'{"attempt": 11, "by": "someone else"}', exclusive=True)
    listed = store.list

    def stale_list(rel: str = "") -> list[str]:
        return [n for n in listed(rel) if n != "attempt-11.reserved.json"]

    store.list = stale_list  # type: ignore[method-assign]
    assert reserve_attempt(store, 0) == 12
    assert [c.attempt for c in read_claims(open_store(str(tmp_path)))] == [5], "reservations are not claims"


def test_processes_deriving_at_once_all_get_different_numbers(tmp_path: Path) -> None:
    """Eight writers derive their attempt from one store at the same moment: eight different numbers."""
    url = str(tmp_path / "ckpt")
    Checkpointer(url, attempt=2).save(1, {"model": torch.nn.Linear(2, 2)})
    start = threading.Barrier(8)

    def derive(_: int) -> int:
        writer = Checkpointer(url)
        start.wait()
        return writer.attempt

    with ThreadPoolExecutor(8) as pool:
        numbers = list(pool.map(derive, range(8)))
    assert sorted(numbers) == list(range(3, 11))


def test_two_writers_of_one_attempt_never_share_a_file_and_the_loser_removes_its_own(tmp_path: Path) -> None:
    """Same attempt, same step: each writes into its own folder; the second commit is refused and its files go."""
    url = str(tmp_path / "ckpt")
    first, second = Checkpointer(url, attempt=4), Checkpointer(url, attempt=4)
    assert first.writer != second.writer
    folder = tmp_path / "ckpt" / "step-0000000007"
    exists = second.store.exists
    second.store.exists = lambda rel: False if rel.endswith("MANIFEST.json") else exists(rel)  # type: ignore[method-assign]
    info = first.save(7, {"model": torch.nn.Linear(3, 3)})
    with pytest.raises(CommitConflictError):
        second.save(7, {"model": torch.nn.Linear(3, 3)})
    assert {p.name for p in folder.iterdir()} == {f"attempt-4-{first.writer}", "MANIFEST.json"}
    assert Checkpointer(url, attempt=5).verify(7).manifest.files == info.manifest.files


def test_a_checkpoint_written_before_writer_ids_still_loads_verifies_and_is_pruned(tmp_path: Path) -> None:
    """The old layout (files under attempt-<n>/, named so in the manifest) loads and verifies; retention still
    knows which attempt left an uncommitted old-style folder."""
    url = str(tmp_path / "ckpt")
    original = torch.nn.Linear(3, 3)
    Checkpointer(url, attempt=2, writer="0a1b2c3d4e5f").save(5, {"model": original})
    step = tmp_path / "ckpt" / "step-0000000005"
    (step / "attempt-2-0a1b2c3d4e5f").rename(step / "attempt-2")
    manifest = json.loads((step / "MANIFEST.json").read_text())
    manifest["files"] = {n.replace("attempt-2-0a1b2c3d4e5f/", "attempt-2/"): e for n, e in manifest["files"].items()}
    (step / "MANIFEST.json").write_text(json.dumps(manifest))
    (tmp_path / "ckpt" / "step-0000000001" / "attempt-1").mkdir(parents=True)  # an old attempt's unfinished save
    (tmp_path / "ckpt" / "step-0000000001" / "attempt-1" / "model.safetensors").write_bytes(b"partial")
    reader = Checkpointer(url, attempt=3)
    assert reader.verify(5).step == 5
    restored = torch.nn.Linear(3, 3)
    assert reader.load({"model": restored}) == 5
    assert torch.equal(restored.weight, original.weight)
    assert {e.step: e.attempts for e in reader.scan()}[1] == frozenset({1})
    assert reader.prune() == [1]

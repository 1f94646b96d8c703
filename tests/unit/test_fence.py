"""Fencing: claims, which attempt supersedes which, and a stale run that learns it was fenced and stops."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sdk.checkpoint import Checkpointer
from sdk.config import Config
from sdk.errors import StaleAttemptError
from sdk.fence import Claim, claim, read_claims, superseded_by, superseding
from sdk.preemption import Preemption
from sdk.run import Run
from sdk.storage import open_store


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

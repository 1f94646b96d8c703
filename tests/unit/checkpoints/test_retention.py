"""Retention: what may be deleted, and the checkpoints that never are."""

from __future__ import annotations

from sdk.checkpoints._retention import Committed, Uncommitted, plan_deletions


def _c(*steps: int, attempt: int = 1) -> list[Committed]:
    return [Committed(s, attempt) for s in steps]


def test_keeps_the_newest_n_and_deletes_older() -> None:
    """keep_last=2 of five commits deletes the three oldest."""
    assert plan_deletions(_c(10, 20, 30, 40, 50), [], attempt=1, keep_last=2) == [10, 20, 30]


def test_never_deletes_the_checkpoint_the_run_resumed_from() -> None:
    """The resumed-from checkpoint survives even when it falls out of keep_last."""
    assert plan_deletions(_c(10, 20, 30, 40), [], attempt=2, keep_last=1, resumed_from=20) == [10, 30]


def test_keep_every_k_keeps_multiples_forever() -> None:
    """keep_every=100 keeps steps 100 and 200 though they are old."""
    assert plan_deletions(_c(50, 100, 150, 200, 250, 300), [], attempt=1, keep_last=1, keep_every=100) == [50, 150, 250]


def test_never_deletes_what_a_newer_attempt_committed() -> None:
    """A zombie of attempt 1 leaves attempt 2's commits alone, however old."""
    committed = [Committed(10, 2), Committed(20, 2), Committed(30, 1)]
    assert plan_deletions(committed, [], attempt=1, keep_last=1) == []


def test_uncommitted_folders_of_older_attempts_are_cleaned_only_behind_the_newest_commit() -> None:
    """Leftovers of attempt 1 below the newest commit go; ours, newer ones and unknown ones stay."""
    uncommitted = [
        Uncommitted(15, frozenset({1})),  # older attempt, behind newest commit: delete
        Uncommitted(16, frozenset({2})),  # our own attempt: keep
        Uncommitted(17, frozenset()),  # unknown writer: keep
        Uncommitted(99, frozenset({1})),  # ahead of the newest commit: keep
    ]
    assert plan_deletions(_c(20), uncommitted, attempt=2, keep_last=3) == [15]


def test_nothing_is_deleted_before_anything_committed() -> None:
    """With no commit at all, even stale leftovers stay (there is nothing newer to stand on)."""
    assert plan_deletions([], [Uncommitted(5, frozenset({1}))], attempt=2, keep_last=1) == []

"""Which checkpoints may be deleted: a pure decision, so every rule is easy to test.

Rules (they protect against deleting the checkpoint a run stands on):

* keep the newest ``keep_last`` committed checkpoints, and every step that is a multiple of ``keep_every``;
* never the checkpoint this run resumed from (a crash before the next commit would leave nothing);
* never anything a newer attempt committed (a zombie pod of an old attempt must not touch the new one's work);
* only checkpoints older than the newest committed one are ever candidates;
* uncommitted folders are removed only when every writer folder in them is from an older attempt than ours,
  and they are older than our newest commit (a folder being written right now by us, or by another process of
  our own attempt number, is never touched).

Only what the store lists is ever a candidate: on a local disk a step folder that is a symbolic link is not
listed (not the store's), and deletion never goes through a link (:mod:`sdk.stores._locallinks`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Committed", "Uncommitted", "plan_deletions"]


@dataclass(frozen=True)
class Committed:
    step: int
    attempt: int


@dataclass(frozen=True)
class Uncommitted:
    step: int
    attempts: frozenset[int]  # attempts with a writer folder (attempt-<n>[-<writer>]/) there; empty when unknown


def plan_deletions(
    committed: Iterable[Committed],
    uncommitted: Iterable[Uncommitted],
    *,
    attempt: int,
    keep_last: int,
    keep_every: int | None = None,
    resumed_from: int | None = None,
) -> list[int]:
    """The steps whose folders may be deleted now, oldest first."""
    ordered = sorted(committed, key=lambda c: c.step, reverse=True)
    if not ordered:
        return []
    newest = ordered[0].step
    keep = {c.step for c in ordered[:keep_last]}
    doomed: set[int] = set()
    for c in ordered[keep_last:]:
        if c.step in keep or c.step == resumed_from or c.attempt > attempt:
            continue
        if keep_every and c.step % keep_every == 0:
            continue
        doomed.add(c.step)
    for u in uncommitted:
        if u.step < newest and u.attempts and max(u.attempts) < attempt:
            doomed.add(u.step)
    return sorted(doomed)

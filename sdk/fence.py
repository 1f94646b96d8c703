"""Fencing: a newer attempt of a run takes over its checkpoints, and an older one still running (a zombie) stops.

A pod that Kubernetes has given up on can keep running: a partitioned node, a kubelet that lost contact. Its
attempt goes on training and saving while the orchestrator's retry — a newer attempt — resumes from the same
checkpoints. Two writers must then never corrupt each other:

* **Files** never collide: every attempt writes under its own ``step-N/attempt-<n>/`` (see :mod:`sdk.checkpoint`).
* **Claims.** When an attempt resumes (or first saves), it writes ``attempts/attempt-<n>.json`` with a conditional
  create: ``{"attempt": n, "resumed_from": S}``. From then on it owns the run's timeline after step ``S``.
* **Writers check.** An attempt looks for claims of newer attempts before it uploads a step and again right
  before it commits; finding one, it raises :class:`~sdk.errors.StaleAttemptError` and writes, commits and
  deletes nothing more — the old attempt learns it was fenced and stops.
* **Readers decide.** A check can race with a claim (the old attempt checks, the new one claims, the old one
  commits), so readers do not trust writers: a manifest of attempt ``a`` for step ``s`` is *superseded* when a
  claim of an attempt ``n > a`` resumed from a step ``< s``. Superseded checkpoints are never resumed from,
  a newer attempt saving that step replaces them, and retention deletes them like uncommitted folders.

So a zombie can waste its own work, but never overwrite, commit over, or delete a newer attempt's checkpoints,
and nothing it commits after a newer attempt took over is ever loaded.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from sdk.errors import StorageNotFoundError
from sdk.storage import Store

__all__ = ["CLAIMS_DIR", "Claim", "claim", "read_claims", "superseded_by", "superseding"]

CLAIMS_DIR = "attempts"
_NAME = re.compile(r"^attempt-(\d+)\.json$")


@dataclass(frozen=True)
class Claim:
    """Attempt ``attempt`` took over the run after step ``resumed_from`` (0: from the start)."""

    attempt: int
    resumed_from: int


def _name(attempt: int) -> str:
    return f"{CLAIMS_DIR}/attempt-{attempt}.json"


def read_claims(store: Store) -> list[Claim]:
    """Every claim in the store, oldest attempt first (unreadable ones are skipped: a claim only narrows)."""
    try:
        names = store.list(CLAIMS_DIR)
    except StorageNotFoundError:
        return []
    claims = []
    for name in names:
        match = _NAME.match(name.rsplit("/", 1)[-1])
        if not match:
            continue
        try:
            body = json.loads(store.get(f"{CLAIMS_DIR}/{name.rsplit('/', 1)[-1]}"))
            claims.append(Claim(attempt=int(body["attempt"]), resumed_from=int(body["resumed_from"])))
        except (StorageNotFoundError, ValueError, KeyError, TypeError):
            continue
    return sorted(claims, key=lambda c: c.attempt)


def claim(store: Store, attempt: int, resumed_from: int) -> Claim:
    """Write this attempt's claim (once: a claim already there for this attempt is kept and returned)."""
    body = {"attempt": attempt, "resumed_from": resumed_from, "created": datetime.now(UTC).isoformat()}
    if store.put(_name(attempt), json.dumps(body).encode(), exclusive=True):
        return Claim(attempt, resumed_from)
    existing = json.loads(store.get(_name(attempt)))
    return Claim(attempt=int(existing["attempt"]), resumed_from=int(existing["resumed_from"]))


def superseding(claims: Iterable[Claim], attempt: int) -> Claim | None:
    """The newest claim of an attempt newer than ``attempt``, or None when ``attempt`` may still write."""
    newer = [c for c in claims if c.attempt > attempt]
    return max(newer, key=lambda c: c.attempt) if newer else None


def superseded_by(claims: Iterable[Claim], attempt: int, step: int) -> Claim | None:
    """The claim that makes a checkpoint of ``attempt`` at ``step`` a superseded one, or None."""
    for c in claims:
        if c.attempt > attempt and step > c.resumed_from:
            return c
    return None

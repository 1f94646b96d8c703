"""Fencing: a newer attempt of a run takes over its checkpoints, and an older one still running (a zombie) stops.

A pod that Kubernetes has given up on can keep running: a partitioned node, a kubelet that lost contact. Its
attempt goes on training and saving while the orchestrator's retry — a newer attempt — resumes from the same
checkpoints. Two writers must then never corrupt each other:

* **Files** never collide: every writer — one process, or the ranks of one job together — writes under its own
  ``step-N/attempt-<n>-<writer>/`` (:func:`writer_dir`), ``<writer>`` a random id, so even two processes given the
  same attempt number never share a file; only the manifest, created conditionally, decides whose files count.
  The manifest's file names carry that folder. Checkpoints written before writer ids (``attempt-<n>/``) load alike.
* **Numbers.** A derived attempt number is reserved with a conditional create of
  ``attempts/attempt-<n>.reserved.json`` (:func:`reserve_attempt`); a process that loses that race takes the next
  number, so two processes deriving at once never get the same one.
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
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from sdk.errors import CheckpointError, StorageNotFoundError
from sdk.stores import boundedjson
from sdk.stores.store import Store

__all__ = [
    "CLAIMS_DIR",
    "Claim",
    "attempt_of_dir",
    "claim",
    "new_writer",
    "read_claims",
    "reserve_attempt",
    "superseded_by",
    "superseding",
    "writer_dir",
]

CLAIMS_DIR = "attempts"
_NAME = re.compile(r"^attempt-(\d+)\.json$")
_TAKEN = re.compile(r"^attempt-(\d+)(?:\.reserved)?\.json$")  # a claim or a reservation: the number is taken
_WRITER_DIR = re.compile(r"^attempt-(\d+)(?:-[0-9a-f]{1,32})?$")
_RESERVE_TRIES = 100  # numbers tried after the newest taken one: each failure is another process's success


@dataclass(frozen=True)
class Claim:
    """Attempt ``attempt`` took over the run after step ``resumed_from`` (0: from the start)."""

    attempt: int
    resumed_from: int


def _name(attempt: int) -> str:
    return f"{CLAIMS_DIR}/attempt-{attempt}.json"


def new_writer() -> str:
    """A random writer id, 12 hex digits: one per process (the ranks of a job share one, see
    :mod:`sdk.lifecycle.agreement`)."""
    return secrets.token_hex(6)


def writer_dir(attempt: int, writer: str | None) -> str:
    """The folder, inside a step folder, that holds one writer's files: ``attempt-<n>-<writer>``
    (``attempt-<n>`` without an id, as before writer ids: ranks that agreed on no id share it by attempt)."""
    return f"attempt-{attempt}-{writer}" if writer else f"attempt-{attempt}"


def attempt_of_dir(name: str) -> int | None:
    """The attempt a writer folder (either form) belongs to, or None when ``name`` is not one."""
    match = _WRITER_DIR.match(name.rstrip("/"))
    return int(match.group(1)) if match else None


def reserve_attempt(store: Store, newest_seen: int) -> int:
    """Reserve the next free attempt number: above ``newest_seen`` and every number claimed or reserved in the store.

    The reservation is a conditional create, so of two processes deriving at once only one gets a number; the
    other takes the next. The body carries a random id, so another process's reservation never reads as our own
    (a create retried after a lost answer finds its own identical body and counts as done).
    """
    try:
        names = store.list(CLAIMS_DIR)
    except StorageNotFoundError:
        names = []
    taken = [int(m.group(1)) for name in names if (m := _TAKEN.match(name.rsplit("/", 1)[-1]))]
    number = max([newest_seen, *taken]) + 1
    by = new_writer()
    for _ in range(_RESERVE_TRIES):
        body = {"attempt": number, "by": by, "created": datetime.now(UTC).isoformat()}
        if store.put(f"{CLAIMS_DIR}/attempt-{number}.reserved.json", json.dumps(body).encode(), exclusive=True):
            return number
        number += 1
    raise CheckpointError(
        f"{store.url_of(CLAIMS_DIR)}: attempt numbers up to {number - 1} are all taken by other processes; "
        "set PODTRAIN_ATTEMPT explicitly"
    )


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
            rel = f"{CLAIMS_DIR}/{name.rsplit('/', 1)[-1]}"
            body = boundedjson.loads(store.get(rel), what=store.url_of(rel), max_bytes=2**16, max_depth=4)
            claims.append(Claim(attempt=int(body["attempt"]), resumed_from=int(body["resumed_from"])))
        except (StorageNotFoundError, ValueError, KeyError, TypeError):
            continue
    return sorted(claims, key=lambda c: c.attempt)


def claim(store: Store, attempt: int, resumed_from: int) -> Claim:
    """Write this attempt's claim (once: a claim already there for this attempt is kept and returned)."""
    body = {"attempt": attempt, "resumed_from": resumed_from, "created": datetime.now(UTC).isoformat()}
    if store.put(_name(attempt), json.dumps(body).encode(), exclusive=True):
        return Claim(attempt, resumed_from)
    existing = boundedjson.loads(store.get(_name(attempt)), what=_name(attempt), max_bytes=2**16, max_depth=4)
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

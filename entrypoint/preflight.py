"""What ``podtrain run`` checks before pulling anything or starting the child, so a setting to fix costs seconds.

- The output folder (``PODTRAIN_OUTPUT_DIR``) exists or is created now, and may be written: the child can write
  there at once (a read-only root filesystem with no volume at ``/output`` says so here, not at the first save).
- A temporary folder can be written (``TMPDIR``, else ``/tmp``, ``/var/tmp``, ...): the supervisor keeps the
  child's progress report there, and Python's ``tempfile`` fails with a traceback without one.
- The checkpoint store is reachable and writable: a small probe object (``.podtrain-probe-<random>``) is written
  and deleted at its root. A local (``file://``) store writes nothing: its nearest existing folder must be a folder
  this process may write. A missing bucket, a read-only store and missing credentials each say so.

Each failure is one sentence and an exit code: 2 for a setting to fix (never retried), 69 when the store did not
answer within the time allowed (retry later). Reaching the data URI is left to the pull, which follows at once and
reports an unreachable endpoint the same way (69, naming the cause).
"""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path
from typing import Any

from entrypoint._timebox import within
from sdk.errors import TransientStorageError
from sdk.outcomes import EXIT_CONFIG, EXIT_UNAVAILABLE

__all__ = ["check", "check_checkpoint_store", "check_output_dir", "check_temp_dir"]


def check(config: Any, *, timeout: float) -> tuple[int, str] | None:
    """``(exit code, sentence)`` for the first check that fails, or None when all pass."""
    return (
        check_output_dir(config.output_dir)
        or check_temp_dir()
        or check_checkpoint_store(config.checkpoint_uri, timeout=timeout)
    )


def check_output_dir(path: str) -> tuple[int, str] | None:
    """Create ``path`` (and its parents) when missing."""
    if not path:
        return None
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        return EXIT_CONFIG, f"PODTRAIN_OUTPUT_DIR {path} is not a folder: point it at a folder, or remove the file"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return EXIT_CONFIG, f"PODTRAIN_OUTPUT_DIR {path} cannot be created: {exc.strerror or exc}"
    problem = _local_problem(folder)
    return None if problem is None else (EXIT_CONFIG, f"PODTRAIN_OUTPUT_DIR {path} is not writable: {problem}")


def check_temp_dir() -> tuple[int, str] | None:
    """A temporary folder this process may write exists (what ``tempfile`` would pick)."""
    try:
        tempfile.gettempdir()
    except (FileNotFoundError, OSError) as exc:
        wanted = os.environ.get("TMPDIR") or "/tmp"  # noqa: S108  (the folder named in the advice)
        return EXIT_CONFIG, (
            f"no writable temporary folder ({wanted} and the usual others; "
            f"{exc.strerror or 'none usable'}): mount a writable volume at /tmp (an emptyDir), or set TMPDIR to a "
            "writable folder"
        )
    return None


def check_checkpoint_store(uri: str, *, timeout: float) -> tuple[int, str] | None:
    """The checkpoint store at ``uri`` takes a write, within ``timeout`` seconds."""
    from sdk.stores.store import split_url

    protocol, path = split_url(uri)
    if protocol == "file":
        problem = _local_problem(Path(path))
        return None if problem is None else (EXIT_CONFIG, f"checkpoint store {uri} is not writable: {problem}")
    error, problem = within(timeout, lambda: _probe(uri, timeout), "podtrain-preflight")
    if problem:  # did not answer in time
        return EXIT_UNAVAILABLE, f"checkpoint store {uri} {problem}"
    if error is None:
        return None
    code = EXIT_UNAVAILABLE if isinstance(error, TransientStorageError) else EXIT_CONFIG
    return code, f"checkpoint store {uri} is not writable: {error}"


def _probe(uri: str, timeout: float) -> Exception | None:
    """Write and delete a probe object at the store's root; the error, or None."""
    from sdk.stores.store import RetryPolicy, open_store

    retry = RetryPolicy(attempts=2, initial_wait=0.1, max_wait=0.5, jitter=0.1, timeout=max(timeout, 1.0))
    name = f".podtrain-probe-{secrets.token_hex(6)}"
    try:
        store = open_store(uri, retry=retry)
        store.put(name, b"")
        store.delete(name)
    except Exception as exc:
        return exc
    return None


def _local_problem(path: Path) -> str | None:
    """Why nothing could be written under ``path`` (created on the first save), or None."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            return f"no folder of {path} exists"
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a folder"
    if os.statvfs(probe).f_flag & os.ST_RDONLY:
        return f"{probe} is on a read-only file system: mount a writable volume there, or choose another folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} may not be written by this process (its owner and mode, or a read-only mount)"
    return None

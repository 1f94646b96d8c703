"""The supervisor's side of the run record (:mod:`sdk.lifecycle.runrecord`), and ``podtrain record``.

``podtrain run`` writes its attempt's entry twice: ``running`` as the child starts (in the background, so a pod
deleted without a word still leaves a trace for chargeback), and the full entry once the child is gone and the
outputs are pushed. The child reports its steps through ``PODTRAIN_REPORT_FILE`` (:mod:`sdk.lifecycle.childreport`);
pull and
push figures come from the supervisor's own steps.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import tempfile
import threading
import time
from datetime import UTC, datetime
from typing import Any

from entrypoint import termination
from entrypoint._gpus import gpu_count
from entrypoint._timebox import within
from sdk.outcomes import EXIT_FAILED, EXIT_OK, RUNNING

__all__ = ["Recorder", "add_parser", "run"]

WRITE_CAP = 10.0  # seconds the final write may take when no deadline runs

EXAMPLES = """examples:
  podtrain record s3://bucket/artifacts/run-7
  podtrain record s3://bucket/artifacts/run-7/run.json --json
  podtrain record          # PODTRAIN_ARTIFACT_URI/<PODTRAIN_RUN_ID>

One row per attempt: outcome and exit code, node and GPUs, wall and GPU seconds (what chargeback sums), the
steps it trained and lost to a preemption, data pulled and artifacts pushed; then the totals.
"""


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "record",
        help="show a run's record: one row per attempt (outcome, GPU-seconds, steps lost, data, artifacts)",
        description="Print the run record kept under the artifact URI (run.json), merged from every attempt.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("uri", nargs="?", default=None, help="the run's artifact folder, or its run.json")
    parser.add_argument("--json", action="store_true", help="print the record as one JSON document")


def run(args: argparse.Namespace) -> int:
    """``podtrain record``: 0 with the record printed; 1 when the run has none."""
    import sys

    from sdk.config import Config
    from sdk.data.push import default_url
    from sdk.lifecycle import runrecord as record
    from sdk.stores.store import require_backend

    if args.uri:
        url = args.uri
    else:
        config = Config.from_env()
        url = default_url(config.artifact_uri, config.run_id)
    require_backend(url)
    found = record.read(url)
    if not found.get("attempts"):
        _require_bucket(url)  # a listing of a missing bucket is empty too: say which it is
        print(f"podtrain: no run record under {url}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(found, indent=1) if args.json else record.render(found))
    return EXIT_OK


def _require_bucket(url: str) -> None:
    """Raise :class:`~sdk.errors.StorageNotFoundError` (exit 2) when ``url``'s bucket does not exist; a local
    folder is left alone (checking it would create it)."""
    from sdk.errors import StorageNotFoundError
    from sdk.stores.store import open_store, split_url

    if split_url(url)[0] == "file":
        return
    store = open_store(url)
    try:
        store.ensure_root()
    except StorageNotFoundError as exc:
        bucket = url.split("://", 1)[-1].split("/", 1)[0]
        raise StorageNotFoundError(
            f"the bucket {bucket!r} of {url} does not exist: check the URL (PODTRAIN_ARTIFACT_URI)", url=url
        ) from exc


class Recorder:
    """One attempt's entry, from the supervisor's start to its exit."""

    def __init__(self, config: Any, log: Any) -> None:
        from sdk.data.push import default_url

        self.config, self.log = config, log
        self.url = default_url(config.artifact_uri, config.run_id)
        self.started = time.monotonic()
        self.entry: dict[str, Any] = {
            "run_id": config.run_id,
            "attempt": config.attempt,
            "started_at": _now(),
            "outcome": RUNNING,
            "pod": config.pod_index,
            "node": config.node_name or None,
            "host": socket.gethostname(),
            "gpu_count": gpu_count(),
        }
        folder = tempfile.mkdtemp(prefix="podtrain-report-")
        self.report_file = os.path.join(folder, "report.json")
        self._first: threading.Thread | None = None

    def pulled(self, result: Any) -> None:
        if result is not None:
            self.entry.update(data_bytes=result.bytes_fetched, data_files=result.fetched, data_seconds=result.seconds)

    def started_child(self) -> None:
        """Write the ``running`` entry in the background (a store that does not answer must not delay training)."""
        entry = dict(self.entry)
        self._first = threading.Thread(target=self._write, args=(entry,), name="podtrain-record", daemon=True)
        self._first.start()

    def finish(
        self,
        outcome: termination.Outcome,
        *,
        checkpoint_step: int | None,
        pushed: Any,
        message: str,
        exit_by: float | None,
    ) -> None:
        """Complete the entry and write it, within :data:`WRITE_CAP` seconds or half of what is left before
        ``exit_by``; a write that does not finish is logged, never waited on beyond that."""
        from sdk.lifecycle import childreport as report

        child = report.read(self.report_file)
        wall = time.monotonic() - self.started
        entry = self.entry
        entry.update(ended_at=_now(), outcome=outcome.outcome, exit_code=outcome.exit_code, message=message)
        if child.get("gpu_model"):
            entry.update(gpu_model=child["gpu_model"], gpu_count=child.get("gpu_count") or entry["gpu_count"])
        entry.update(wall_seconds=round(wall, 3), gpu_seconds=round(wall * (entry["gpu_count"] or 0), 3))
        resumed = child.get("resumed_from")
        last = child.get("last_step", resumed)
        entry.update(resumed_from=resumed, resumed_from_url=child.get("resumed_from_url"), last_step=last)
        entry["checkpoint_step"] = checkpoint_step
        if last is not None:
            entry["steps_done"] = max(0, last - (resumed or 0))
            kept = max(checkpoint_step or 0, resumed or 0)  # the next attempt resumes from here
            entry["steps_lost"] = 0 if outcome.exit_code == EXIT_OK else max(0, last - kept)
        if child.get("data_bytes") is not None:  # the child pulled too (run.pull_data): add it to the supervisor's
            for key in ("data_bytes", "data_files", "data_seconds"):
                entry[key] = round((entry.get(key) or 0) + child.get(key, 0), 3)
        if pushed is not None:
            entry.update(artifacts_bytes=pushed.bytes_sent, artifacts_files=pushed.files, artifacts_url=pushed.url)
        budget = WRITE_CAP if exit_by is None else max(0.0, (exit_by - time.monotonic()) / 2)
        if self._first is not None:
            self._first.join(budget / 2)
        _, problem = within(budget, lambda: self._write(dict(entry)), "podtrain-record")
        if problem:
            self.log.warning("supervisor.record_not_written", url=self.url, problem=problem)
        self._cleanup()

    def _write(self, entry: dict[str, Any]) -> None:
        from sdk.lifecycle import runrecord as record
        from sdk.stores.store import RetryPolicy

        try:
            record.write(self.url, entry, retry=RetryPolicy(attempts=3, initial_wait=0.2, max_wait=1.0, timeout=10.0))
        except Exception as exc:
            self.log.warning("supervisor.record_failed", url=self.url, error=str(exc))
            return
        self.log.info("supervisor.recorded", url=f"{self.url}/run.json", outcome=entry["outcome"])

    def _cleanup(self) -> None:
        folder = os.path.dirname(self.report_file)
        for name in os.listdir(folder) if os.path.isdir(folder) else ():  # the report, its .tmp, others' .stopped-*
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, name))
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(self.report_file))


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")

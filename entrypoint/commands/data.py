"""``podtrain pull``, and the supervisor's data pull before it starts the child.

The pull itself is :func:`sdk.data.pull.pull`; this module is its command line and its place in ``podtrain run``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from entrypoint._timebox import within
from sdk.outcomes import EXIT_INTERRUPTED, EXIT_OK

__all__ = [
    "EXAMPLES",
    "Interrupted",
    "add_parser",
    "pull_before_child",
    "push_after_child",
    "run",
    "run_push",
]

PUSH_CAP = 300.0  # seconds the supervisor spends pushing outputs when no deadline runs
MAX_WORKERS = 1024  # transfers in flight at once: each is a thread and a connection
MAX_PIECE_MIB = 4096  # one range's bytes are held in memory, workers x piece at most

EXAMPLES = """examples:
  podtrain pull s3://bucket/datasets/shakespeare/ --dest /data
  podtrain pull gs://bucket/imagenet/train gs://bucket/imagenet/val --dest /data --workers 32
  podtrain pull s3://bucket/corpus/ --include '*.parquet' --exclude 'tmp/*' --json
  podtrain pull s3://bucket/shards/ --dest /data --piece-mib 32 --stall-seconds 30 --no-progress
  PODTRAIN_DATA_URI=s3://bucket/corpus/ PODTRAIN_DATA_DIR=/data podtrain pull

A file is renamed into place only once its size and the store's checksum (CRC32C, CRC32 or an MD5 ETag, where it
keeps one; a multipart upload's checked through its parts) matched; files the store keeps no checksum for are
counted as unverified, or refused with --require-checksums (PODTRAIN_REQUIRE_CHECKSUMS=1). A second pull
fetches only what changed in the store (.podtrain-pull.jsonl in the folder remembers what was fetched); files
already there by other means are kept when their checksum matches. Objects over --piece-mib come in parallel
byte ranges; memory stays under workers x piece size. A key that cannot be a file inside the folder ('..', an
absolute or over-long name, a key that is also a prefix) stops the pull with exit 2 before anything is written;
a full disk is exit 1 with the files already there intact; two pulls into one folder take turns. Ctrl-C stops
after the pieces in flight (exit 130; twice: at once), keeping what landed, a large object's pieces included:
the same command again fetches only the rest.
"""


def add_parser(commands: Any) -> None:
    add_push_parser(commands)
    pull = commands.add_parser(
        "pull",
        help="fetch a dataset from object storage into a local folder (verified, resumable, warm cache)",
        description="Fetch every object under each URI into a local folder; skip what is already there unchanged.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pull.add_argument("uris", nargs="*", help="prefixes or objects (default: PODTRAIN_DATA_URI, comma-separated)")
    pull.add_argument("--dest", default=None, help="the local folder (default: PODTRAIN_DATA_DIR)")
    pull.add_argument("--include", action="append", default=None, help="only names matching this glob (repeatable)")
    pull.add_argument("--exclude", action="append", default=None, help="skip names matching this glob (repeatable)")
    _transfer_options(pull, "objects or byte ranges fetched at once")
    pull.add_argument(
        "--piece-mib", type=int, default=16, help="objects over this size come in ranges of this size (default 16)"
    )
    pull.add_argument(
        "--direct",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write files around the page cache where the file system allows (less CPU; default); "
        "--no-direct leaves them cached in memory for a first epoch that reads them at once",
    )
    pull.add_argument(
        "--require-checksums",
        action="store_true",
        default=None,
        help="fail (exit 2) on an object the store keeps no checksum for, rather than count it as unverified "
        "(default: PODTRAIN_REQUIRE_CHECKSUMS)",
    )


def add_push_parser(commands: Any) -> None:
    push = commands.add_parser(
        "push",
        help="upload a folder (the run's outputs) to object storage, verified; only new or changed files",
        description="Upload every file under DIR to URI "
        "(default: PODTRAIN_OUTPUT_DIR to PODTRAIN_ARTIFACT_URI/<run_id>).",
        epilog="examples:\n  podtrain push /output s3://bucket/artifacts/run-7\n"
        "  podtrain push /output/export gs://bucket/models/run-7 --workers 4 --json\n"
        "  podtrain push   # PODTRAIN_OUTPUT_DIR to PODTRAIN_ARTIFACT_URI/<run_id>\n\n"
        "Each file goes up with its CRC32C, which the store checks; its size and checksum are read back after.\n"
        "Pushing again sends only new or changed files (.podtrain-push.jsonl in the folder remembers).\n"
        "Symlinks are never followed out of DIR: links to files outside it, dangling links and links to folders\n"
        "are skipped and listed in the summary (not an error); a link to a file inside DIR goes up as a copy.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    push.add_argument("dir", nargs="?", default=None, help="the folder or file (default: PODTRAIN_OUTPUT_DIR)")
    push.add_argument("uri", nargs="?", default=None, help="where to (default: PODTRAIN_ARTIFACT_URI/<run_id>)")
    _transfer_options(push, "files uploaded at once")


def _transfer_options(parser: argparse.ArgumentParser, workers: str) -> None:
    """What pull and push share: concurrency, the stall limit, the bar, JSON output."""
    parser.add_argument("--workers", type=int, default=16, help=f"{workers} (default 16)")
    parser.add_argument(
        "--stall-seconds",
        type=float,
        default=None,
        help="a request that moves no byte for this long is cut and retried (default: PODTRAIN_STALL_SECONDS, 60)",
    )
    parser.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, help="a progress bar (default: on a terminal)"
    )
    parser.add_argument("--json", action="store_true", help="print the result as one JSON document")


def _retry(config: Any) -> Any:
    """The stores' retry policy for a pull or push: how long to ride out throttling (PODTRAIN_THROTTLE_SECONDS)."""
    from sdk.stores.store import RetryPolicy

    return RetryPolicy(throttle_seconds=config.throttle_seconds)


def run_push(args: argparse.Namespace) -> int:
    """``podtrain push``: 0 when everything is uploaded and verified."""
    from sdk.config import Config
    from sdk.data.push import default_url, push
    from sdk.log import configure

    config = Config.from_env(stall_seconds=args.stall_seconds)  # the flag checked like the variable
    if not 1 <= args.workers <= MAX_WORKERS:
        from sdk.errors import ConfigError

        raise ConfigError(f"--workers {args.workers} is invalid: use 1..{MAX_WORKERS}")
    source = args.dir or config.output_dir
    if not os.path.exists(source):
        from sdk.errors import ConfigError

        named = "DIR" if args.dir else "PODTRAIN_OUTPUT_DIR"
        raise ConfigError(f"nothing to push: {source} does not exist: name an existing folder or file ({named})")
    configure(fmt=config.log_format, level=config.log_level)
    result = push(
        source,
        args.uri or default_url(config.artifact_uri, config.run_id),
        workers=args.workers,
        stall_seconds=config.stall_seconds,
        retry=_retry(config),
        progress=args.progress,
    )
    if args.json:
        print(json.dumps(result.__dict__))
    else:
        sent = f"{result.sent} sent ({result.bytes_sent} bytes)"
        print(f"{result.url}: {result.files} files, {sent}, {result.skipped} unchanged{result.links_note()}")
    return EXIT_OK


def push_after_child(config: Any, exit_by: float | None, log: Any) -> tuple[Any, str]:
    """Push ``PODTRAIN_OUTPUT_DIR`` once the child is gone, whatever its outcome: ``(PushResult or None, note)``,
    the note saying why when it did not finish.

    After a SIGTERM the push gets a third of the time left before the supervisor must exit; otherwise up to
    :data:`PUSH_CAP` seconds.
    """
    from pathlib import Path

    from sdk.data.push import default_url, push

    folder = Path(config.output_dir)
    if not folder.exists() or not any(folder.iterdir()):
        return None, ""
    budget = PUSH_CAP if exit_by is None else max(0.0, (exit_by - time.monotonic()) / 3)

    def work() -> tuple[Any, Exception | None]:
        try:
            url = default_url(config.artifact_uri, config.run_id)
            return push(folder, url, stall_seconds=config.stall_seconds, retry=_retry(config)), None
        except Exception as exc:
            return None, exc

    done, problem = within(budget, work, "podtrain-push-outputs")
    if problem:  # still running: left behind, as a daemon thread
        log.warning("supervisor.push_incomplete", seconds=round(budget, 3))
        return None, f"outputs not fully pushed within {budget:.1f} s"
    result, error = done
    if error is not None:
        log.error("supervisor.push_failed", error=str(error))
        return None, f"outputs not pushed: {error}"
    log.info("supervisor.pushed", **result.__dict__)
    return result, ""


def run(args: argparse.Namespace) -> int:
    """``podtrain pull``: 0 when everything is in place; errors are raised for the CLI to map."""
    from sdk.config import Config

    config = Config.from_env(data_dir=args.dest, stall_seconds=args.stall_seconds)  # flags checked like variables
    uris = list(args.uris) or config.data_uris

    from sdk.data.pull import pull
    from sdk.errors import ConfigError
    from sdk.log import configure

    if not uris:
        raise ConfigError("nothing to pull: name a URI, or set PODTRAIN_DATA_URI")
    if not (1 <= args.workers <= MAX_WORKERS and 1 <= args.piece_mib <= MAX_PIECE_MIB):
        raise ConfigError(
            f"--workers {args.workers} / --piece-mib {args.piece_mib} is invalid: "
            f"--workers in 1..{MAX_WORKERS}, --piece-mib in 1..{MAX_PIECE_MIB}"
        )
    include, exclude = config.data_globs
    configure(fmt=config.log_format, level=config.log_level)
    with _interruptible(f"pull into {config.data_dir}") as cancel:
        result = pull(
            uris,
            config.data_dir,
            include=args.include or include,
            exclude=args.exclude or exclude,
            workers=args.workers,
            piece_size=args.piece_mib * 2**20,
            stall_seconds=config.stall_seconds,
            retry=_retry(config),
            progress=args.progress,
            direct=args.direct,
            require_checksums=bool(args.require_checksums or config.require_checksums),
            cancel=cancel,
        )
    if args.json:
        print(json.dumps({"dest": config.data_dir, **result.__dict__}))
    else:
        print(
            f"{config.data_dir}: {result.files} files, {result.fetched} fetched ({result.bytes_fetched} bytes), "
            f"{result.skipped} already there ({result.adopted} of them recognised by checksum), "
            f"in {result.seconds:.1f} s"
            + (f"; {result.unverified} unverified (the store keeps no checksum for them)" if result.unverified else "")
        )
    return EXIT_OK


class Interrupted(Exception):
    """Ctrl-C (SIGINT) stopped a command; its one line says what was kept. Exit 130
    (:data:`sdk.outcomes.EXIT_INTERRUPTED`)."""


@contextlib.contextmanager
def _interruptible(what: str) -> Iterator[threading.Event]:
    """Ctrl-C during the block sets the event it yields (the pull stops after the pieces in flight, keeping every
    file already in place) and the block's end raises :class:`Interrupted`; a second Ctrl-C exits 130 at once."""
    cancel = threading.Event()
    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        yield cancel
        return
    message = f"{what} interrupted (Ctrl-C): what landed is kept; run the same command again to fetch the rest"

    def on_sigint(signum: int, frame: Any) -> None:
        if cancel.is_set():  # the second Ctrl-C: stop now, without waiting for the pieces in flight
            sys.stderr.write(f"podtrain: {message}\n")
            sys.stderr.flush()
            os._exit(EXIT_INTERRUPTED)
        cancel.set()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield cancel
    except Exception as exc:
        if cancel.is_set():  # PullCancelled, or whatever the stop interrupted
            raise Interrupted(message) from exc
        raise
    finally:
        signal.signal(signal.SIGINT, previous)


def pull_before_child(
    config: Any, stopped: Callable[[], bool], log: Any, *, poll: float = 0.05
) -> tuple[Any, Exception | None]:
    """Pull ``PODTRAIN_DATA_URI`` into ``PODTRAIN_DATA_DIR`` before the child starts: ``(PullResult, None)``,
    ``(None, error)``, or ``(None, None)`` when there is nothing to pull or the pull was stopped.

    The pull runs in a thread so that a SIGTERM (``stopped()``) is noticed within ``poll`` seconds: the pull is
    then told to stop after the files in flight, and the supervisor goes on to exit 75 without starting the child.
    """
    from sdk.data.pull import pull

    if not config.data_uris:
        return None, None
    outcome: dict[str, Any] = {}
    cancel = threading.Event()
    include, exclude = config.data_globs

    def work() -> None:
        try:
            outcome["result"] = pull(
                config.data_uris,
                config.data_dir,
                include=include,
                exclude=exclude,
                cancel=cancel,
                stall_seconds=config.stall_seconds,
                retry=_retry(config),
                progress=False,  # the supervisor's output is the pod's log: log lines, not a bar
                require_checksums=config.require_checksums,
            )
        except Exception as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=work, name="podtrain-pull-data", daemon=True)
    started = time.monotonic()
    worker.start()
    while worker.is_alive():
        if stopped():
            cancel.set()
            log.warning("supervisor.pull_stopped", reason="SIGTERM during the data pull")
            worker.join(timeout=max(0.0, config.grace_seconds / 4))
            return None, None
        worker.join(timeout=poll)
    if "error" in outcome:
        log.error("supervisor.pull_failed", error=f"{type(outcome['error']).__name__}: {outcome['error']}")
        return None, outcome["error"]
    log.info("supervisor.pulled", wall_s=round(time.monotonic() - started, 3), **outcome["result"].__dict__)
    return outcome["result"], None

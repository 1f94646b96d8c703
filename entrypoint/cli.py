"""The ``podtrain`` command.

``podtrain run [options] -- CMD ...`` — the supervisor: validate the config, run CMD as a child in its own process
group, forward signals, own the grace-period deadline, exit with the contract's code and write the termination
message (:mod:`entrypoint.supervisor`, :mod:`entrypoint.termination`).

``podtrain checkpoints list URI`` — valid checkpoints, newest first (``--json`` for machines, ``--all`` to show
invalid folders and why). ``podtrain checkpoints verify URI [--step N]`` — exit 0 when the newest (or the
named) checkpoint verifies byte for byte, 1 with the reason when it does not.

``podtrain pull`` / ``podtrain push`` — the dataset in, the outputs out (:mod:`entrypoint.data`).
``podtrain record [URI]`` — the run record, one row per attempt (:mod:`entrypoint.record`).

Start-up stays light: torch is imported only by the commands that read checkpoints.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import threading
import time
from typing import Any

from entrypoint import data, record, smoke, termination
from entrypoint.early import EarlySignals
from sdk import redaction
from sdk.errors import ConfigError, PodtrainError, TransientStorageError, exit_code

__all__ = ["main"]

# One set of exit codes for every command: the supervisor's contract (entrypoint/termination.py).
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE = (
    termination.EXIT_OK,
    termination.EXIT_FAILED,
    termination.EXIT_CONFIG,
    termination.EXIT_UNAVAILABLE,
)

EXAMPLES = """examples:
  podtrain run -- python train.py --lr 3e-4
  podtrain run --grace-seconds 30 -- torchrun --nproc-per-node 8 train.py
  podtrain checkpoints list s3://my-bucket/runs/r1
  podtrain checkpoints list ./.podtrain/local/checkpoints --json
  podtrain checkpoints verify gs://my-bucket/runs/r1 --step 1200
"""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version  # ~0.05 s: only for --version

    try:
        return version("podtrain")
    except PackageNotFoundError:  # running from a source tree without an install
        return "unknown"


class _VersionAction(argparse.Action):
    """``--version``, looked up only when asked for."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        print(f"podtrain {_version()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="podtrain",
        description="Training runtime for preemptible GPU pods: verified checkpoints, exact resume.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_VersionAction, help="print podtrain's version and exit")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_run_parser(commands)
    data.add_parser(commands)
    record.add_parser(commands)
    smoke.add_parser(commands)
    checkpoints = commands.add_parser(
        "checkpoints",
        help="list and verify checkpoints",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = checkpoints.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="valid checkpoints under URI, newest first")
    listing.add_argument("uri", help="the run's checkpoint location (s3://, gs://, file://, a path)")
    listing.add_argument("--json", action="store_true", help="one JSON document on stdout")
    listing.add_argument("--all", action="store_true", help="also show folders that are not valid, and why")
    listing.add_argument(
        "--deep",
        action="store_true",
        help="read every file and check its CRC32C (default: sizes, and the store's CRC32C where it keeps one)",
    )
    verify = actions.add_parser("verify", help="verify the newest (or --step) checkpoint byte for byte")
    verify.add_argument("uri", help="the run's checkpoint location")
    verify.add_argument("--step", type=int, default=None, help="the step to verify (default: newest committed)")
    verify.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def main(argv: list[str] | None = None, *, early: EarlySignals | None = None) -> int:
    """``podtrain``: every byte it writes to stdout and stderr is redacted (:mod:`sdk.redaction`) — usage errors,
    the one-line error messages, logs, a traceback — and the URLs on its command line count as secrets too.

    ``argv`` None: the console script, whose process ends with this call; the streams then stay redacted for the
    interpreter's own last words (an uncaught exception's traceback).
    """
    redaction.remember(sys.argv[1:] if argv is None else argv)
    with redaction.redacted_streams(restore=argv is not None):
        return _main(argv, early)


def _main(argv: list[str] | None, early: EarlySignals | None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return _run(args, early)
    try:
        if args.command == "pull":
            return data.run(args)
        if args.command == "push":
            return data.run_push(args)
        if args.command == "record":
            return record.run(args)
        if args.command == "smoke":
            return smoke.run(args)
        if args.command == "checkpoints" and args.action == "list":
            return _list(args)
        if args.command == "checkpoints" and args.action == "verify":
            return _verify(args)
    except ConfigError as exc:
        print(f"podtrain: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except TransientStorageError as exc:
        print(f"podtrain: storage unavailable: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except PodtrainError as exc:
        print(f"podtrain: {exc}", file=sys.stderr)
        return exit_code(exc) or EXIT_FAILED
    return EXIT_USAGE  # pragma: no cover - argparse requires a command


def _checkpointer(uri: str) -> Any:
    from sdk.checkpoint import Checkpointer
    from sdk.storage import require_backend

    require_backend(uri)
    return Checkpointer(uri, attempt=1)  # read-only use: no attempt is derived or written


def _list(args: argparse.Namespace) -> int:
    ckpt = _checkpointer(args.uri)
    rows = []
    for entry in ckpt.scan():
        problem = ckpt.problem(entry, download=args.deep)
        ok = problem is None
        if not ok and not args.all:
            continue
        m = entry.manifest
        rows.append(
            {
                "step": entry.step,
                "valid": ok,
                "url": entry.url,
                "attempt": m.attempt if m else None,
                "created": m.created if m else None,
                "files": len(m.files) if m else None,
                "bytes": m.total_bytes if m else None,
                "problem": problem,
            }
        )
    if args.json:
        print(json.dumps({"uri": ckpt.url, "checkpoints": rows}, indent=1))
        return EXIT_OK
    if not rows:
        print(f"no valid checkpoints under {ckpt.url}")
        return EXIT_OK
    print(f"{'STEP':>10}  {'ATTEMPT':>7}  {'CREATED':<20}  {'FILES':>5}  {'SIZE':>10}  URL")
    for r in rows:
        size = _human(r["bytes"]) if r["bytes"] is not None else "-"
        attempt, created, files = r["attempt"] or "-", r["created"] or "-", r["files"] or "-"
        line = f"{r['step']:>10}  {attempt:>7}  {created:<20}  {files:>5}  {size:>10}  {r['url']}"
        print(line + ("" if r["valid"] else f"  INVALID: {r['problem']}"))
    return EXIT_OK


def _verify(args: argparse.Namespace) -> int:
    from sdk.errors import InvalidCheckpointError, NoCheckpointError

    ckpt = _checkpointer(args.uri)
    try:
        info = ckpt.verify(args.step, download=True)
    except (InvalidCheckpointError, NoCheckpointError) as exc:
        if args.json:
            print(json.dumps({"ok": False, "uri": ckpt.url, "step": args.step, "reason": str(exc)}))
        else:
            print(f"FAILED: {exc}")
        return EXIT_FAILED
    if args.json:
        print(json.dumps({"ok": True, "uri": info.url, "step": info.step, "bytes": info.manifest.total_bytes}))
    else:
        print(
            f"OK: {info.url} (step {info.step}, {len(info.manifest.files)} files, "
            f"{_human(info.manifest.total_bytes)}) verified: sizes and CRC32C match the manifest"
        )
    return EXIT_OK


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


# -- podtrain run ------------------------------------------------------------------------------------------
RUN_HELP = """Run CMD under the supervisor. Exit codes: 0 success, 1 the command failed (do not retry), 2 bad
configuration or usage (do not retry), 75 preempted (retry: SIGTERM received), 69 storage unavailable (retry).
The termination message (one line of JSON) goes to PODTRAIN_TERMINATION_LOG and is the last log line."""


def _add_run_parser(commands: Any) -> None:
    run = commands.add_parser(
        "run",
        help="run a training command under the supervisor (signals, deadline, exit codes)",
        description=RUN_HELP,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("--run-id", default=None, help="overrides PODTRAIN_RUN_ID")
    run.add_argument("--attempt", type=int, default=None, help="overrides PODTRAIN_ATTEMPT")
    run.add_argument("--grace-seconds", type=float, default=None, help="overrides PODTRAIN_GRACE_SECONDS")
    run.add_argument("--termination-log", default=None, help="overrides PODTRAIN_TERMINATION_LOG")
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="-- then the command and its arguments")


def _run(args: argparse.Namespace, early: EarlySignals | None = None) -> int:
    from entrypoint.supervisor import FORWARDED, Supervisor, outcome_of
    from sdk.config import Config
    from sdk.log import configure, get_logger
    from sdk.storage import require_backend

    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    try:
        config = Config.from_env(
            run_id=args.run_id,
            attempt=args.attempt,
            grace_seconds=args.grace_seconds,
            termination_log=args.termination_log,
        )
        require_backend(config.checkpoint_uri, "PODTRAIN_CHECKPOINT_URI")
        for uri in config.data_uris:
            require_backend(uri, "PODTRAIN_DATA_URI")
        if config.artifact_uri:
            require_backend(config.artifact_uri, "PODTRAIN_ARTIFACT_URI")
    except ConfigError as exc:
        return _run_config_error(args, str(exc))
    if not cmd:
        return _run_config_error(args, "no command given: use podtrain run [options] -- CMD [ARGS...]")
    from sdk import listing

    for uri in config.data_uris:  # S3: the dataset's first listing overlaps the attempt's look-up (sdk.listing)
        listing.start(uri)

    derived_note = ""
    stopping = early is not None and early.sigterm_at() is not None
    if config.attempt is None and not stopping:  # derived once here, so every rank of the child uses the same number
        attempt, derived_note = termination.derive_attempt(
            config.checkpoint_uri, run_id=config.run_id, timeout=min(10.0, config.grace_seconds / 2)
        )
        if attempt is not None:
            config = config.with_changes(attempt=attempt)
            os.environ["PODTRAIN_ATTEMPT"] = str(attempt)
    configure(
        run_id=config.run_id, attempt=config.attempt, rank=config.rank, fmt=config.log_format, level=config.log_level
    )
    log = get_logger("podtrain.supervisor")
    if derived_note:
        log.warning("supervisor.attempt_not_derived", reason=derived_note)
    log.info("supervisor.config", grace_seconds=config.grace_seconds, checkpoint_uri=config.checkpoint_uri)
    recorder = record.Recorder(config, log)
    pulled, failure = data.pull_before_child(config, lambda: bool(early and early.sigterm_at() is not None), log)
    recorder.pulled(pulled)
    if failure is not None:
        return _run_failed_before_child(args, config, failure, log, recorder)
    # The termination message needs sdk.checkpoint (0.25-0.5 s to import): imported while the child runs, so
    # the look-up in the last seconds of a grace period does not spend them importing.
    threading.Thread(target=importlib.import_module, args=("sdk.checkpoint",), daemon=True).start()
    os.environ["PODTRAIN_REPORT_FILE"] = recorder.report_file  # the child's steps, for the run record
    recorder.started_child()
    result = Supervisor(cmd, grace_seconds=config.grace_seconds, log=log, early=early.received if early else ()).run()
    for signum in FORWARDED:  # the child is gone: a late signal must not cut the termination message short
        signal.signal(signum, signal.SIG_IGN)
    outcome = outcome_of(result)
    pushed, push_note = data.push_after_child(config, result.exit_by, log)  # outputs go up whatever the outcome
    # Under preemption, half of what is left of the grace period goes to finding the checkpoint; the rest is spare.
    # Otherwise at most half a grace period, in case the pod is told to stop while we look.
    limit = min(10.0, config.grace_seconds / 2)
    timeout = limit if result.exit_by is None else max(0.0, (result.exit_by - time.monotonic()) / 2)
    step, checkpoint, note = termination.newest_checkpoint(
        config.checkpoint_uri, run_id=config.run_id, attempt=config.attempt, timeout=timeout
    )
    note = "; ".join(n for n in (note, push_note) if n)
    fields = termination.record(
        outcome,
        run_id=config.run_id,
        attempt=config.attempt,
        step=step,
        checkpoint=checkpoint,
        seconds=result.seconds,
        gpus=termination.gpu_count(),
        note=note,
    )
    recorder.finish(outcome, checkpoint_step=step, pushed=pushed, message=fields["message"], exit_by=result.exit_by)
    _finish(fields, config.termination_log, log)
    return outcome.exit_code


def _run_failed_before_child(
    args: argparse.Namespace, config: Any, error: Exception, log: Any, recorder: record.Recorder
) -> int:
    """The data pull failed: the child is not started; exit with the error's code and say why."""
    code = (exit_code(error) if isinstance(error, PodtrainError) else None) or EXIT_FAILED
    message = f"data pull failed before the child started: {error}"
    print(f"podtrain: {message}", file=sys.stderr)
    outcome = termination.Outcome(code, message)
    recorder.finish(outcome, checkpoint_step=None, pushed=None, message=message, exit_by=None)
    fields = termination.record(
        termination.Outcome(code, message),
        run_id=config.run_id,
        attempt=config.attempt,
        step=None,
        checkpoint=None,
        seconds=0.0,
        gpus=termination.gpu_count(),
    )
    _finish(fields, config.termination_log, log)
    return code


def _run_config_error(args: argparse.Namespace, message: str) -> int:
    """Exit 2 before any child starts: say what to fix on stderr, and in the termination message."""
    from sdk.log import get_logger

    print(f"podtrain: {message}", file=sys.stderr)
    path = args.termination_log or os.environ.get("PODTRAIN_TERMINATION_LOG") or termination.DEFAULT_TERMINATION_LOG
    fields = termination.record(
        termination.Outcome(termination.EXIT_CONFIG, message),
        run_id=args.run_id or os.environ.get("PODTRAIN_RUN_ID") or None,
        attempt=None,
        step=None,
        checkpoint=None,
        seconds=0.0,
        gpus=0,
    )
    _finish(fields, path, get_logger("podtrain.supervisor"))
    return termination.EXIT_CONFIG


def _finish(fields: dict[str, Any], path: str, log: Any) -> None:
    """Write the termination message (secrets masked by ``render``) to ``path`` and as the last log line."""
    line = termination.render(fields)
    termination.write_termination_log(
        path, line, warn=lambda text: log.warning("supervisor.termination_log", problem=text)
    )
    log.info("supervisor.termination", **json.loads(line))

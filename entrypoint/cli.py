"""The ``podtrain`` command.

``podtrain run [options] -- CMD ...`` — the supervisor: validate the config, run CMD as a child in its own process
group, forward signals, own the grace-period deadline, exit with the contract's code (:mod:`sdk.outcomes`, the
same codes for every command) and write the termination message (:mod:`entrypoint.supervisor`,
:mod:`entrypoint.termination`).

``podtrain checkpoints list|verify`` — a run's checkpoints, one checked byte for byte
(:mod:`entrypoint.commands.checkpoints`).

``podtrain pull`` / ``podtrain push`` — the dataset in, the outputs out (:mod:`entrypoint.commands.data`).
``podtrain record [URI]`` — the run record, one row per attempt (:mod:`entrypoint.commands.record`).

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

from entrypoint import termination
from entrypoint._checkpointlookup import derive_attempt, newest_checkpoint
from entrypoint._earlysignals import EarlySignals
from entrypoint._gpus import gpu_count
from entrypoint.commands import checkpoints, data, record, smoke
from sdk import redaction
from sdk.errors import ConfigError, PodtrainError, TransientStorageError, exit_code
from sdk.outcomes import EXIT_CONFIG, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_UNAVAILABLE

__all__ = ["main"]

EXAMPLES = """examples:
  podtrain pull s3://my-bucket/datasets/tiny --dest ./data
  podtrain run -- python train.py --lr 3e-4
  podtrain checkpoints list s3://my-bucket/runs/r1
  podtrain record s3://my-bucket/artifacts/r1
  podtrain push ./output s3://my-bucket/artifacts/r1

Every command has --help with its own examples: podtrain run --help, podtrain checkpoints list --help, ...
"""
RUN_EXAMPLES = """examples:
  podtrain run -- python train.py --lr 3e-4
  podtrain run --grace-seconds 30 -- torchrun --nproc-per-node 8 train.py
  PODTRAIN_RUN_ID=r2 podtrain run -- python examples/train.py --steps 60   # a new run, not a resume of 'local'
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
    parser.set_defaults(usage=parser)  # no command given: this parser's help (see _main)
    commands = parser.add_subparsers(dest="command")
    _add_run_parser(commands)
    data.add_parser(commands)
    record.add_parser(commands)
    smoke.add_parser(commands)
    checkpoints.add_parser(commands)
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


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line; `podtrain` or `podtrain checkpoints` alone prints its help and exits 2, a usage error."""
    args = build_parser().parse_args(argv)
    if args.command is None or (args.command == "checkpoints" and args.action is None):
        args.usage.print_help()
        raise SystemExit(EXIT_CONFIG)  # as argparse's own usage errors do
    return args


def _main(argv: list[str] | None, early: EarlySignals | None) -> int:
    args = _parse(argv)
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
            return checkpoints.list_checkpoints(args)
        if args.command == "checkpoints" and args.action == "verify":
            return checkpoints.verify(args)
    except ConfigError as exc:
        print(f"podtrain: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except TransientStorageError as exc:
        print(f"podtrain: storage unavailable: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except PodtrainError as exc:
        print(f"podtrain: {exc}", file=sys.stderr)
        return exit_code(exc) or EXIT_FAILED
    except data.Interrupted as exc:  # Ctrl-C: one line saying what was kept, no traceback
        print(f"podtrain: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print(f"podtrain: {args.command} interrupted (Ctrl-C)", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_CONFIG  # pragma: no cover - argparse requires a command


# -- podtrain run ------------------------------------------------------------------------------------------
RUN_HELP = """Run CMD under the supervisor, in three stages:
  1. before CMD starts: the dataset (PODTRAIN_DATA_URI) is pulled into PODTRAIN_DATA_DIR, when one is set;
  2. CMD runs in its own process group; stop signals are forwarded, the grace period's deadline is kept;
  3. after CMD ends, whatever its outcome: PODTRAIN_OUTPUT_DIR is pushed to PODTRAIN_ARTIFACT_URI/<run_id>.
Exit codes: 0 success, 1 the command failed (do not retry), 2 bad configuration or usage (do not retry),
75 preempted (retry: SIGTERM received), 69 storage unavailable (retry).
The termination message (one line of JSON) goes to PODTRAIN_TERMINATION_LOG and is the last log line."""


def _add_run_parser(commands: Any) -> None:
    run = commands.add_parser(
        "run",
        help="run a training command under the supervisor (signals, deadline, exit codes)",
        description=RUN_HELP,
        epilog=RUN_EXAMPLES,
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
    from sdk.stores.store import require_backend

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
    undecodable = [n for n, arg in enumerate(cmd) if any("\ud800" <= c <= "\udfff" for c in arg)]
    if undecodable:  # sys.argv holds bytes that are not UTF-8 as lone surrogates, which no UTF-8 writer takes
        return _run_config_error(
            args, f"the command's argument {undecodable[0]} holds bytes that are not UTF-8: pass UTF-8 text"
        )
    failed = _before_pull(args, config, early)
    if failed is not None:
        return failed

    derived_note = ""
    stopping = early is not None and early.sigterm_at() is not None
    if config.attempt is None and not stopping:  # derived once here, so every rank of the child uses the same number
        attempt, derived_note = derive_attempt(
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
    # The termination message needs sdk.checkpoints.checkpointer (0.25-0.5 s to import): imported while the child runs,
    # so
    # the look-up in the last seconds of a grace period does not spend them importing.
    threading.Thread(target=importlib.import_module, args=("sdk.checkpoints.checkpointer",), daemon=True).start()
    os.environ["PODTRAIN_REPORT_FILE"] = recorder.report_file  # the child's steps, for the run record
    recorder.started_child()
    result = Supervisor(cmd, grace_seconds=config.grace_seconds, log=log, early=early.received if early else ()).run()
    for signum in FORWARDED:  # the child is gone: a late signal must not cut the termination message short
        signal.signal(signum, signal.SIG_IGN)
    pushed, push_note = data.push_after_child(config, result.exit_by, log)  # outputs go up whatever the outcome
    completed, stopped = _child_said(recorder)
    outcome = outcome_of(result, completed=completed, stopped=stopped, push_problem=push_note)  # unpushed: 69
    # Under preemption, half of what is left of the grace period goes to finding the checkpoint; the rest is spare.
    # Otherwise at most half a grace period, in case the pod is told to stop while we look.
    limit = min(10.0, config.grace_seconds / 2)
    timeout = limit if result.exit_by is None else max(0.0, (result.exit_by - time.monotonic()) / 2)
    step, checkpoint, note = newest_checkpoint(
        config.checkpoint_uri, run_id=config.run_id, attempt=config.attempt, timeout=timeout
    )
    note = "; ".join(n for n in (note, push_note) if n and n not in outcome.message)
    fields = termination.record(
        outcome,
        run_id=config.run_id,
        attempt=config.attempt,
        step=step,
        checkpoint=checkpoint,
        seconds=result.seconds,
        gpus=gpu_count(),
        note=note,
    )
    recorder.finish(outcome, checkpoint_step=step, pushed=pushed, message=fields["message"], exit_by=result.exit_by)
    _finish(fields, config.termination_log, log)
    return outcome.exit_code


def _before_pull(args: argparse.Namespace, config: Any, early: EarlySignals | None) -> int | None:
    """Check the output folder and the checkpoint store (:mod:`entrypoint.preflight`) unless a SIGTERM came first:
    the exit code when a check failed (its sentence written as the termination message), else None."""
    from entrypoint import preflight

    if early is not None and early.sigterm_at() is not None:
        return None
    problem = preflight.check(config, timeout=min(10.0, config.grace_seconds / 2))
    return None if problem is None else _run_config_error(args, problem[1], code=problem[0])


def _child_said(recorder: record.Recorder) -> tuple[bool | None, str | None]:
    """From the child's last report (:mod:`sdk.lifecycle.childreport`): whether it reached its end (None: no report)
    and why its ranks stopped before it without a signal here, if they did."""
    from sdk.lifecycle import childreport as report

    child = report.read(recorder.report_file)
    return report.completed(child), report.stopped(child)


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
        gpus=gpu_count(),
    )
    _finish(fields, config.termination_log, log)
    return code


def _run_config_error(args: argparse.Namespace, message: str, *, code: int = EXIT_CONFIG) -> int:
    """Exit 2 (or ``code``) before any child starts: say what to fix on stderr, and in the termination message."""
    from sdk.log import get_logger

    print(f"podtrain: {message}", file=sys.stderr)
    path = args.termination_log or os.environ.get("PODTRAIN_TERMINATION_LOG") or termination.DEFAULT_TERMINATION_LOG
    fields = termination.record(
        termination.Outcome(code, message),
        run_id=args.run_id or os.environ.get("PODTRAIN_RUN_ID") or None,
        attempt=None,
        step=None,
        checkpoint=None,
        seconds=0.0,
        gpus=0,
    )
    _finish(fields, path, get_logger("podtrain.supervisor"))
    return code


def _finish(fields: dict[str, Any], path: str, log: Any) -> None:
    """Write the termination message (secrets masked by ``render``) to ``path`` and as the last log line."""
    line = termination.render(fields)
    termination.write_termination_log(
        path, line, warn=lambda text: log.warning("supervisor.termination_log", problem=text)
    )
    log.info("supervisor.termination", **json.loads(line))

"""``podtrain checkpoints list|verify``: a run's checkpoints, and one of them checked byte for byte.

``list URI`` — committed checkpoints, newest first (``--json`` for machines, ``--all`` to show the folders that are
not valid and why, ``--deep`` to read every byte). ``verify URI [--step N]`` or ``verify URI/step-N`` (the URL
``list`` prints) — exit 0 when that checkpoint (default: the newest) verifies byte for byte, 1 with the reason.
A checkpoint a full check found corrupt is remembered as such (:mod:`sdk.checkpoints.invalidmark`): later plain lists
show it
INVALID with the reason. Neither command imports torch.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from sdk.errors import ConfigError
from sdk.outcomes import EXIT_FAILED, EXIT_OK

__all__ = ["add_parser", "list_checkpoints", "verify"]

EXAMPLES = """examples:
  podtrain checkpoints list s3://my-bucket/runs/r1
  podtrain checkpoints list ./.podtrain/local/checkpoints --json
  podtrain checkpoints verify gs://my-bucket/runs/r1 --step 1200
"""
LIST_EXAMPLES = """examples:
  podtrain checkpoints list s3://my-bucket/runs/r1
  podtrain checkpoints list ./.podtrain/local/checkpoints --json
  podtrain checkpoints list gs://my-bucket/runs/r1 --all --deep   # also the invalid ones, every byte read

A checkpoint that --deep (or verify) found corrupt stays marked INVALID, with the reason, in later lists.
"""
VERIFY_EXAMPLES = """examples:
  podtrain checkpoints verify s3://my-bucket/runs/r1                     # the newest committed checkpoint
  podtrain checkpoints verify gs://my-bucket/runs/r1 --step 1200
  podtrain checkpoints verify s3://my-bucket/runs/r1/step-0000001200     # a URL that list printed
"""


def add_parser(commands: Any) -> None:
    checkpoints = commands.add_parser(
        "checkpoints",
        help="list and verify checkpoints",
        description="List a run's checkpoints, or verify one byte for byte.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    checkpoints.set_defaults(usage=checkpoints)  # `podtrain checkpoints` alone: this help (entrypoint.cli)
    actions = checkpoints.add_subparsers(dest="action")
    listing = actions.add_parser(
        "list",
        help="valid checkpoints under URI, newest first",
        description="The committed checkpoints under URI, newest first: step, attempt, time, files, size, URL\n"
        "(verify takes that URL). --all adds the folders that are not valid, with the reason.",
        epilog=LIST_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    listing.add_argument("uri", help="the run's checkpoint location (s3://, gs://, file://, a path)")
    listing.add_argument("--json", action="store_true", help="one JSON document on stdout")
    listing.add_argument("--all", action="store_true", help="also show folders that are not valid, and why")
    listing.add_argument(
        "--deep",
        action="store_true",
        help="read every file and check its CRC32C (default: sizes, and the store's CRC32C where it keeps one)",
    )
    verify_parser = actions.add_parser(
        "verify",
        help="verify the newest (or --step) checkpoint byte for byte",
        description="Read every file of the newest (or --step, or the step URL's) checkpoint and check its size\n"
        "and CRC32C against the manifest. Exit 0 when it verifies, 1 with the reason when it does not.",
        epilog=VERIFY_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verify_parser.add_argument("uri", help="the run's checkpoint location, or one checkpoint's URL (.../step-N)")
    verify_parser.add_argument("--step", type=int, default=None, help="the step to verify (default: newest committed)")
    verify_parser.add_argument("--json", action="store_true", help="print the result as JSON")


def _checkpointer(uri: str) -> Any:
    from sdk.checkpoints.checkpointer import Checkpointer
    from sdk.stores.store import require_backend

    require_backend(uri)
    return Checkpointer(uri, attempt=1)  # read-only use: no attempt is derived or written


def _problem(ckpt: Any, entry: Any, *, deep: bool) -> str | None:
    """Why ``entry`` is not valid: found now, or remembered from an earlier full check (deep checks update that)."""
    from sdk.checkpoints import invalidmark

    problem = ckpt.problem(entry, download=deep)
    if entry.manifest is None:
        return problem
    if deep and problem is not None:
        invalidmark.mark(ckpt.store, entry.manifest, problem, by="podtrain checkpoints list --deep")
    elif deep and entry.marked:  # valid again (a file restored by hand): the old finding no longer holds
        invalidmark.clear(ckpt.store, entry.step)
    elif problem is None and entry.marked:
        problem = invalidmark.read(ckpt.store, entry.manifest)
    return problem


def list_checkpoints(args: argparse.Namespace) -> int:
    """``podtrain checkpoints list``: committed checkpoints (also those known invalid, marked), newest first."""
    ckpt = _checkpointer(args.uri)
    rows = []
    for entry in ckpt.scan():
        problem = _problem(ckpt, entry, deep=args.deep)
        ok = problem is None
        if not ok and not args.all and entry.manifest is None:  # an uncommitted folder: only with --all
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
                "ranks": m.world_size if m else None,
                "sharded": list(m.sharded) if m else None,
                "problem": problem,
            }
        )
    if args.json:
        print(json.dumps({"uri": ckpt.url, "checkpoints": rows}, indent=1))
        return EXIT_OK
    if not rows:
        print(f"no valid checkpoints under {ckpt.url}")
        return EXIT_OK
    print(f"{'STEP':>10}  {'ATTEMPT':>7}  {'CREATED':<20}  {'RANKS':>9}  {'FILES':>5}  {'SIZE':>10}  URL")
    for r in rows:
        size = _human(r["bytes"]) if r["bytes"] is not None else "-"
        attempt, created, files = r["attempt"] or "-", r["created"] or "-", r["files"] or "-"
        ranks = "-" if r["ranks"] is None else f"{r['ranks']}{' sharded' if r['sharded'] else ''}"
        line = f"{r['step']:>10}  {attempt:>7}  {created:<20}  {ranks:>9}  {files:>5}  {size:>10}  {r['url']}"
        print(line + ("" if r["valid"] else f"  INVALID: {r['problem']}"))
    return EXIT_OK


def verify(args: argparse.Namespace) -> int:
    """``podtrain checkpoints verify``: 0 when the checkpoint verifies byte for byte, 1 with the reason."""
    from sdk.checkpoints import invalidmark
    from sdk.errors import InvalidCheckpointError, NoCheckpointError

    uri, step = _step_url(args.uri, args.step)
    ckpt = _checkpointer(uri)
    try:
        info = ckpt.verify(step, download=True)
    except (InvalidCheckpointError, NoCheckpointError) as exc:
        if isinstance(exc, InvalidCheckpointError):  # a committed one found corrupt: remembered for later lists
            entry = next((e for e in ckpt.scan() if e.url == exc.location and e.manifest is not None), None)
            if entry is not None:
                invalidmark.mark(ckpt.store, entry.manifest, exc.reason, by="podtrain checkpoints verify")
        if args.json:
            print(json.dumps({"ok": False, "uri": ckpt.url, "step": step, "reason": str(exc)}))
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


def _step_url(uri: str, step: int | None) -> tuple[str, int | None]:
    """``(run location, step)``: a URL ending in a step folder (what ``list`` prints) names that step's checkpoint."""
    from sdk.checkpoints.manifest import parse_step_dir

    base, _, name = uri.rstrip("/").rpartition("/")
    named = parse_step_dir(name) if base else None
    if named is None:
        return uri, step
    if step is not None and step != named:
        raise ConfigError(f"{uri} is the checkpoint of step {named}, and --step {step} names another: give one of them")
    return base, named


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover

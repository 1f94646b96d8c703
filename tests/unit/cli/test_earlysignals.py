"""entrypoint._earlysignals: the stop signals recorded before the supervisor took over."""

from __future__ import annotations

import ast
import signal
from pathlib import Path

from entrypoint._earlysignals import EarlySignals


def test_early_signals_record_and_report_the_first_sigterm() -> None:
    """The console script's early handlers record signals with their arrival; sigterm_at is the first TERM."""
    early = EarlySignals()
    early._record(signal.SIGINT, None)
    assert early.sigterm_at() is None
    early._record(signal.SIGTERM, None)
    early._record(signal.SIGTERM, None)
    assert early.sigterm_at() == early.received[1][1]


def test_early_signals_import_nothing_of_podtrain() -> None:
    """Imported by both the console script and the CLI, it imports only the standard library: neither imports the
    other to reach it."""
    import entrypoint._earlysignals as module

    tree = ast.parse(Path(module.__file__ or "").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {name for name in imported if name.split(".")[0] in ("sdk", "entrypoint")}

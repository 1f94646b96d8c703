"""The console script's first code: stop signals are recorded from the first moment ``podtrain run`` runs.

A SIGTERM can reach the pod while ``podtrain run`` is still importing and checking its config (~0.4 s). With
Python's default action it would die at once (exit 143, no termination message). So the console script's
entry point is :func:`main` here, which imports nothing heavy: it installs recording handlers for the
forwarded signals (:mod:`entrypoint._earlysignals`), then imports the CLI.
:class:`~entrypoint.supervisor.Supervisor` replays what was recorded (a SIGTERM keeps its real arrival time, so the
deadline is not moved) once its own handlers are in place.

What remains is the interpreter's own start-up before this module runs (tens of milliseconds); a SIGTERM there
ends the container with 143, which the DAG treats as a preemption too.

Once the command has returned, :func:`main` moves every object into the collector's permanent generation
(:func:`gc.freeze`). An interpreter that exits collects every tracked object it still holds — tens of
thousands after structlog's and asyncio's imports — which took 40-80 ms of a 0.5 s warm ``podtrain pull``
(measured); frozen, they are freed as the modules are torn down, with no cycle search. Nothing runs after it that
could leave cycles to collect; the process's own files and sockets are closed by then, its threads done or daemons.
"""

from __future__ import annotations

import gc
import sys
from typing import Any

from entrypoint._earlysignals import EarlySignals

__all__ = ["main"]


def main(argv: list[str] | None = None) -> Any:
    """``podtrain``: record stop signals first when the command is ``run``, then hand over to the CLI."""
    args = sys.argv[1:] if argv is None else argv
    early = EarlySignals().install() if args[:1] == ["run"] else None
    from entrypoint.cli import main as cli_main

    code = cli_main(argv, early=early)
    if argv is None:  # the console script, whose process ends now
        gc.freeze()  # see the module: nothing is left to collect, and collecting it would take ~40 ms
    return code

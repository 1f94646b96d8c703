"""Transfer progress: a bar on a terminal, a log line every few seconds and one at the end otherwise."""

from __future__ import annotations

import pytest

from sdk.data._progress import Progress
from tests.conftest import CapturedLog, ManualClock


def test_without_a_terminal_progress_is_a_log_line_every_period_and_one_at_the_end(captured_log: CapturedLog) -> None:
    """Lines at most every `every` seconds with files, bytes, rate and ETA; the last file always gives one."""
    clock = ManualClock(100.0)
    progress = Progress("pull", 3, 3 * 2**20, clock=clock, every=5.0, bar=False)
    for _ in range(2):
        clock.now += 1.0
        progress.add_bytes(2**20)
        progress.add_file()
    assert captured_log.records("pull.progress") == []
    clock.now += 4.0  # 6 s since the start
    progress.add_bytes(2**20)
    progress.add_file()
    progress.close()
    *periodic, line = captured_log.records("pull.progress")
    assert [p["files"] for p in periodic] == ["2/3"], "one line when the period passed, mid-file"
    assert (line["files"], line["bytes"], line["total"]) == ("3/3", 3 * 2**20, 3 * 2**20)
    assert line["mib_per_s"] == 0.5 and line["eta_s"] == 0.0


def test_on_a_terminal_a_bar_counts_the_bytes_and_no_log_line_is_written(
    captured_log: CapturedLog, capsys: pytest.CaptureFixture[str]
) -> None:
    """bar=True (the default when stderr is a TTY): tqdm draws on stderr; the log stays quiet."""
    progress = Progress("push", 2, 2048, bar=True)
    progress.add_bytes(1024)
    progress.add_file()
    progress.add_bytes(1024)
    progress.add_file()
    progress.close()
    err = capsys.readouterr().err
    assert "push" in err and "2.00k/2.00k" in err and "2/2 files" in err
    assert captured_log.records("push.progress") == []

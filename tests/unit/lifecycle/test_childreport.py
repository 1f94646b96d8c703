"""The child's progress report for the run record: throttled, written whole, absent without the variable."""

from __future__ import annotations

import json
import os
from pathlib import Path

from sdk.lifecycle import childreport as report
from sdk.lifecycle.childreport import Report
from tests.conftest import ManualClock


def test_steps_are_written_at_most_once_a_second_and_events_at_once(tmp_path: Path) -> None:
    """step() writes when EVERY seconds passed; update() writes at once; the file is always whole JSON."""
    clock = ManualClock()
    path = tmp_path / "report.json"
    rep = Report(str(path), clock=clock)
    rep.update(resumed_from=20, last_step=20)
    assert report.read(str(path))["resumed_from"] == 20
    clock.now = 0.5
    rep.step(21)
    assert report.read(str(path))["last_step"] == 20 and rep.pending
    clock.now = 1.6
    rep.step(22)
    assert report.read(str(path))["last_step"] == 22 and not rep.pending
    rep.step(22)
    rep.step(5)  # an older step never moves the count back
    assert rep.fields["last_step"] == 22 and not rep.pending
    assert json.loads(path.read_text())["gpu_count"] == 0, "no CUDA here: no GPU is claimed"
    assert not path.with_name("report.json.tmp").exists()


def test_without_a_report_file_nothing_is_written(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """python train.py on a laptop: no PODTRAIN_REPORT_FILE, no file anywhere."""
    monkeypatch.chdir(tmp_path)
    rep = Report("")
    rep.update(resumed_from=0)
    rep.step(1)
    rep.flush()
    assert list(tmp_path.iterdir()) == []


def test_a_missing_or_torn_report_reads_as_empty(tmp_path: Path) -> None:
    """The supervisor reads {} when the child died before writing, or left something that is not JSON."""
    assert report.read(str(tmp_path / "none.json")) == {}
    (tmp_path / "torn.json").write_text('{"last_step": 4')
    assert report.read(str(tmp_path / "torn.json")) == {}


def test_the_block_s_start_and_normal_end_are_reported_as_completed_false_then_true(tmp_path: Path) -> None:
    """begin() writes completed=False (no GPU look-up yet), complete() True; a report without it reads as None."""
    path = tmp_path / "report.json"
    rep = Report(str(path))
    rep.begin()
    child = report.read(str(path))
    assert report.completed(child) is False and "gpu_model" not in child
    rep.complete()
    assert report.completed(report.read(str(path))) is True
    assert report.completed({}) is None and report.completed({"completed": "yes"}) is None


def test_a_rank_without_steps_says_why_it_stopped_in_a_file_of_its_own_that_read_merges(tmp_path: Path) -> None:
    """Report(path, steps=False).stopped(why) writes ``<path>.stopped-<pid>``; read(path) takes ``stopped`` from it
    when the main report has none."""
    path = tmp_path / "report.json"
    Report(str(path), steps=False).stopped("ranks 2, 3 went silent")
    assert json.loads((tmp_path / f"report.json.stopped-{os.getpid()}").read_text()) == {
        "stopped": "ranks 2, 3 went silent"
    }
    assert not path.exists()
    assert report.stopped(report.read(str(path))) == "ranks 2, 3 went silent"
    Report(str(path)).update(last_step=7)
    child = report.read(str(path))
    assert child["last_step"] == 7 and report.stopped(child) == "ranks 2, 3 went silent"


def test_the_main_report_s_own_stopped_wins_over_another_process_s(tmp_path: Path) -> None:
    """Local rank 0's ``stopped`` is the one read, whatever the other ranks of the pod wrote beside it."""
    path = tmp_path / "report.json"
    (tmp_path / "report.json.stopped-1").write_text(json.dumps({"stopped": "rank 3 went silent"}))
    Report(str(path)).stopped("preempted with the job's other ranks")
    assert report.stopped(report.read(str(path))) == "preempted with the job's other ranks"


def test_a_rank_without_steps_writes_no_step_report(tmp_path: Path) -> None:
    """steps=False (not local rank 0): update, step, begin, complete and flush leave the report file absent."""
    path = tmp_path / "report.json"
    rep = Report(str(path), clock=ManualClock(), steps=False)
    rep.begin()
    rep.update(resumed_from=3)
    rep.step(4)
    rep.flush()
    rep.complete()
    assert list(tmp_path.iterdir()) == []


def test_stopped_reads_only_a_non_empty_string_and_caps_it_at_500_characters() -> None:
    """A missing, empty or non-string ``stopped`` is None; a long one is cut to 500 characters."""
    assert report.stopped({}) is None
    assert report.stopped({"stopped": ""}) is None
    assert report.stopped({"stopped": 75}) is None
    assert report.stopped({"stopped": ["preempted"]}) is None
    assert report.stopped({"stopped": "x" * 2000}) == "x" * 500
    assert report.stopped({"stopped": "preempted"}) == "preempted"

"""The child's progress report for the run record: throttled, written whole, absent without the variable."""

from __future__ import annotations

import json
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

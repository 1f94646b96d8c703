"""The run record: one object per attempt merged on read, run.json rewritten, the supervisor's entry, the table."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from entrypoint import termination
from entrypoint.commands.record import Recorder
from sdk.config import Config
from sdk.lifecycle import runrecord as record
from sdk.outcomes import EXIT_FAILED, EXIT_OK, EXIT_PREEMPTED
from sdk.stores.store import open_store


class _Log:
    def __init__(self) -> None:
        self.events: list[str] = []

    def __getattr__(self, level: str) -> Any:
        return lambda event, **fields: self.events.append(event)


def _entry(attempt: int, **fields: Any) -> dict[str, Any]:
    return {
        "run_id": "r1",
        "attempt": attempt,
        "outcome": "preempted",
        "started_at": f"2026-11-28T10:0{attempt}:00",
        **fields,
    }


def test_each_attempt_keeps_its_own_entry_and_run_json_holds_them_all(memory_url: str) -> None:
    """Attempts 2 then 1 written: read() and run.json list both, in attempt order, with totals."""
    record.write(memory_url, _entry(2, outcome="succeeded", wall_seconds=10.0, gpu_seconds=80.0, last_step=90))
    merged = record.write(memory_url, _entry(1, wall_seconds=5.5, gpu_seconds=44.0, steps_lost=3, last_step=40))
    assert [e["attempt"] for e in merged["attempts"]] == [1, 2]
    assert merged["totals"] == {
        "attempts": 2,
        "preemptions": 1,
        "wall_seconds": 15.5,
        "gpu_seconds": 124.0,
        "steps_lost": 3,
        "last_step": 90,
        "outcome": "succeeded",
    }
    assert record.read(memory_url) == merged
    assert json.loads(open_store(memory_url).get(record.RECORD_NAME)) == merged
    assert record.read(f"{memory_url}/run.json") == merged, "the URL of run.json itself is accepted"


def test_each_pod_of_an_attempt_keeps_its_own_entry_and_the_totals_count_the_attempt_once(memory_url: str) -> None:
    """Two pods of attempt 1 (preempted, each 4 steps lost) and of attempt 2: four entries, every pod's GPU-seconds
    summed, but 2 attempts, 1 preemption and 4 steps lost; the table gets a pod column."""
    for attempt, outcome in ((1, "preempted"), (2, "succeeded")):
        for pod in (1, 0):
            lost = 4 if attempt == 1 else 0
            record.write(memory_url, _entry(attempt, pod=pod, outcome=outcome, gpu_seconds=10.0 + pod, steps_lost=lost))
    merged = record.read(memory_url)
    assert [(e["attempt"], e["pod"]) for e in merged["attempts"]] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    totals = merged["totals"]
    assert (totals["attempts"], totals["preemptions"], totals["steps_lost"]) == (2, 1, 4)
    assert totals["gpu_seconds"] == 42.0
    assert sorted(open_store(memory_url).list(record.ATTEMPTS_DIR)) == [
        "attempt-0001-pod-0.json",
        "attempt-0001-pod-1.json",
        "attempt-0002-pod-0.json",
        "attempt-0002-pod-1.json",
    ]
    header = record.render(merged).splitlines()[1].split()
    assert header[:2] == ["attempt", "pod"]


def test_the_supervisor_entry_names_its_pod_from_the_job_completion_index(tmp_path: Path) -> None:
    """JOB_COMPLETION_INDEX (an Indexed Job's, a JobSet's) is the entry's pod; without it the entry has none."""
    config = Config.from_env(
        {"JOB_COMPLETION_INDEX": "1", "PODTRAIN_RUN_ID": "r1", "PODTRAIN_ATTEMPT": "2"},
        artifact_uri=(tmp_path / "art").as_uri(),
    )
    assert config.pod_index == 1
    assert Recorder(config, _Log()).entry["pod"] == 1
    assert Recorder(Config(run_id="r1", attempt=2), _Log()).entry["pod"] is None


def test_an_attempt_rewriting_its_entry_replaces_it_without_touching_the_others(memory_url: str) -> None:
    """The `running` entry at the start is replaced by the final one; the other attempt's entry stays."""
    record.write(memory_url, _entry(1))
    record.write(memory_url, _entry(2, outcome="running"))
    record.write(memory_url, _entry(2, outcome="succeeded"))
    assert [(e["attempt"], e["outcome"]) for e in record.read(memory_url)["attempts"]] == [
        (1, "preempted"),
        (2, "succeeded"),
    ]


def test_attempts_writing_at_the_same_time_lose_no_entry(file_url: str) -> None:
    """Eight attempts write concurrently: every entry is read back (each has its own object)."""
    threads = [threading.Thread(target=record.write, args=(file_url, _entry(n))) for n in range(1, 9)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [e["attempt"] for e in record.read(file_url)["attempts"]] == list(range(1, 9))


def test_an_unreadable_attempt_object_is_skipped_and_a_missing_record_is_empty(memory_url: str) -> None:
    """A torn object does not hide the other attempts; a run with no record reads as no attempts."""
    assert record.read(memory_url)["attempts"] == []
    record.write(memory_url, _entry(1))
    open_store(memory_url).put(f"{record.ATTEMPTS_DIR}/attempt-0002.json", b'{"attempt": 2, "outc')
    assert [e["attempt"] for e in record.read(memory_url)["attempts"]] == [1]


def test_the_table_shows_one_row_per_attempt_and_the_totals() -> None:
    """render(): a header, a row per attempt with GPUs, steps and data, then a totals line."""
    entries = [
        _entry(
            1,
            exit_code=75,
            gpu_model="NVIDIA H200",
            gpu_count=8,
            wall_seconds=100.0,
            gpu_seconds=800.0,
            resumed_from=0,
            last_step=57,
            steps_lost=7,
            data_bytes=3 * 2**20,
            data_seconds=1.5,
            node="gpu-7",
        ),
        _entry(2, outcome="succeeded", exit_code=0, gpu_count=0, resumed_from=50, last_step=90, steps_lost=0),
    ]
    text = record.render({"run_id": "r1", "url": "s3://b/a/r1", "attempts": entries})
    lines = text.splitlines()
    assert lines[0] == "run r1  (s3://b/a/r1)"
    assert lines[1].split()[:4] == ["attempt", "started", "(UTC)", "outcome"]
    assert (
        "8x NVIDIA H200" in lines[2] and "0->57" in lines[2] and "3.0 MiB in 1.5 s" in lines[2] and "gpu-7" in lines[2]
    )
    assert "50->90" in lines[3] and "succeeded" in lines[3]
    assert lines[4].startswith("total: 2 attempts, 1 preempted, 100.0 wall s, 800.0 GPU s, 7 steps lost, last step 90")


def test_the_table_says_nothing_for_what_an_attempt_never_reached_and_counts_in_words() -> None:
    """An attempt whose child never reported a step shows "-" for its steps (not "None->None"); one attempt is
    "1 attempt"; an unknown last step is "-"."""
    entry = _entry(1, outcome="failed", exit_code=1, resumed_from=None, last_step=None, wall_seconds=0.1)
    text = record.render({"run_id": "r1", "url": "file:///a/r1", "attempts": [entry]})
    assert "None" not in text, text
    row = text.splitlines()[2].split()
    assert row[row.index("failed") + 6] == "-", text  # outcome, exit, node, GPUs, wall s, GPU s, then steps
    assert text.splitlines()[-1].startswith("total: 1 attempt, 0 preempted,"), text
    assert "last step -," in text, text
    assert "2 attempts" in record.render({"attempts": [_entry(1), _entry(2)]})


@pytest.mark.parametrize(
    ("exit_code", "lost"),
    [(EXIT_PREEMPTED, 7), (EXIT_FAILED, 7), (EXIT_OK, 0)],
)
def test_the_supervisor_entry_counts_steps_done_and_lost_and_gpu_seconds(
    tmp_path: Path, exit_code: int, lost: int
) -> None:
    """From the child's report: resumed at 20, reached 57, newest checkpoint 50 → 37 done, 7 lost unless it
    succeeded; the child's GPU count times the wall time gives GPU-seconds; both pulls add up."""
    config = Config(run_id="r1", attempt=3, artifact_uri=(tmp_path / "art").as_uri(), node_name="gpu-node-7")
    recorder = Recorder(config, _Log())
    report = {
        "resumed_from": 20,
        "last_step": 57,
        "gpu_model": "NVIDIA H200",
        "gpu_count": 8,
        "data_bytes": 100,
        "data_files": 1,
        "data_seconds": 0.5,
    }
    Path(recorder.report_file).write_text(json.dumps(report))
    recorder.pulled(type("P", (), {"bytes_fetched": 1000, "fetched": 4, "seconds": 2.0})())
    outcome = termination.Outcome(exit_code, "why")
    recorder.finish(outcome, checkpoint_step=50, pushed=None, message="why", exit_by=None)
    (entry,) = record.read(f"{config.artifact_uri}/r1")["attempts"]
    assert (entry["attempt"], entry["node"], entry["exit_code"]) == (3, "gpu-node-7", exit_code)
    assert (entry["resumed_from"], entry["last_step"], entry["checkpoint_step"]) == (20, 57, 50)
    assert (entry["steps_done"], entry["steps_lost"]) == (37, lost)
    assert (entry["gpu_model"], entry["gpu_count"]) == ("NVIDIA H200", 8)
    assert entry["gpu_seconds"] == pytest.approx(entry["wall_seconds"] * 8, abs=0.01)
    assert (entry["data_bytes"], entry["data_files"], entry["data_seconds"]) == (1100, 5, 2.5)
    assert not Path(recorder.report_file).parent.exists(), "the report folder is removed"


def test_a_store_that_does_not_answer_does_not_hold_the_supervisor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record write that hangs is abandoned after the budget (half the time left) and logged."""
    gate = threading.Event()
    monkeypatch.setattr(record, "write", lambda *a, **k: gate.wait(30))
    log = _Log()
    recorder = Recorder(Config(run_id="r1", attempt=1, artifact_uri=(tmp_path / "a").as_uri()), log)
    started = time.monotonic()
    recorder.finish(
        termination.Outcome(0, "ok"), checkpoint_step=None, pushed=None, message="ok", exit_by=time.monotonic() + 0.4
    )
    assert time.monotonic() - started < 2
    assert log.events == ["supervisor.record_not_written"]
    gate.set()

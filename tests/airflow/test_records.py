"""Run records read with fsspec (chargeback, the best trial), the reports written as JSON and CSV, and the small
pieces the DAGs are made of: run ids and label values, sweep grids, settings from the environment."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
from podtrain_airflow import best_trial, chargeback, label_value, read_record, run_id, write_report
from podtrain_airflow.naming import LABEL_VALUE, RUN_ID
from podtrain_airflow.settings import Settings
from podtrain_airflow.sweep import trial_configs, trials


def attempt(n: int, outcome: str, gpu_seconds: float, **extra: Any) -> dict[str, Any]:
    return {
        "attempt": n,
        "outcome": outcome,
        "exit_code": {"succeeded": 0, "preempted": 75}.get(outcome, 1),
        "gpu_seconds": gpu_seconds,
        "wall_seconds": gpu_seconds / 2,
        **extra,
    }


def write_run(
    artifacts: Path,
    rid: str,
    attempts: list[dict[str, Any]],
    *,
    merged: bool = True,
    metrics: list[dict[str, Any]] | None = None,
) -> None:
    """A run's artifact folder as podtrain leaves it: per-attempt objects, run.json, metrics.jsonl."""
    folder = artifacts / rid
    (folder / ".podtrain").mkdir(parents=True)
    for entry in attempts:
        (folder / ".podtrain" / f"attempt-{entry['attempt']:04d}.json").write_text(json.dumps(entry))
    if merged:
        (folder / "run.json").write_text(json.dumps({"run_id": rid, "attempts": attempts}))
    if metrics is not None:
        (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))


def test_read_record_merges_attempt_objects(tmp_path: Path) -> None:
    """The per-attempt objects are the record, even when run.json lost a race and lists fewer attempts."""
    write_run(tmp_path, "r1", [attempt(1, "preempted", 100.0), attempt(2, "succeeded", 50.0)], merged=False)
    (tmp_path / "r1" / "run.json").write_text(json.dumps({"attempts": [attempt(1, "preempted", 100.0)]}))
    record = read_record(f"file://{tmp_path}", "r1")
    assert [a["attempt"] for a in record["attempts"]] == [1, 2]
    (tmp_path / "r2").mkdir()
    (tmp_path / "r2" / "run.json").write_text(json.dumps({"attempts": [attempt(1, "failed", 7.0)]}))
    assert [a["outcome"] for a in read_record(str(tmp_path), "r2")["attempts"]] == ["failed"]
    assert read_record(str(tmp_path), "missing")["attempts"] == []


def test_chargeback_counts_every_attempt_and_writes_json_and_csv(tmp_path: Path) -> None:
    """GPU-seconds per team, project and trial include preempted and failed attempts; JSON and CSV are written."""
    artifacts = tmp_path / "artifacts"
    write_run(artifacts, "r-a", [attempt(1, "preempted", 100.0), attempt(2, "succeeded", 50.5)])
    write_run(artifacts, "r-b", [attempt(1, "failed", 10.0)])
    runs = [
        {"run_id": "r-a", "team": "vision", "project": "p1", "trial": "t000"},
        {"run_id": "r-b", "team": "vision", "project": "p2", "trial": "t001"},
        {"run_id": "r-none", "team": "nlp", "project": "p1", "trial": "t002"},
    ]
    report = chargeback(runs, f"file://{artifacts}")
    assert report["gpu_seconds"] == 160.5
    assert report["by_team"] == {"vision": 160.5, "nlp": 0.0}
    assert report["by_project"] == {"p1": 150.5, "p2": 10.0}
    assert report["by_trial"] == {"t000": 150.5, "t001": 10.0, "t002": 0.0}
    first = report["rows"][0]
    assert (first["attempts"], first["preemptions"], first["outcome"]) == (2, 1, "succeeded")
    assert report["rows"][2]["outcome"] == "no record"
    urls = write_report(report, f"file://{tmp_path}/reports/run-1")
    assert urls == [
        f"file://{tmp_path}/reports/run-1/chargeback.json",
        f"file://{tmp_path}/reports/run-1/chargeback.csv",
    ]
    assert json.loads((tmp_path / "reports/run-1/chargeback.json").read_text())["gpu_seconds"] == 160.5
    rows = list(csv.DictReader((tmp_path / "reports/run-1/chargeback.csv").open()))
    assert [(r["trial"], float(r["gpu_seconds"])) for r in rows] == [("t000", 150.5), ("t001", 10.0), ("t002", 0.0)]


def test_best_trial_among_succeeded(tmp_path: Path) -> None:
    """The best trial is the succeeded one with the lowest final loss (highest with mode=max); failed ones are
    listed, never chosen."""
    write_run(
        tmp_path, "a", [attempt(1, "succeeded", 1.0)], metrics=[{"step": 50, "loss": 2.0}, {"step": 100, "loss": 1.5}]
    )
    write_run(
        tmp_path,
        "b",
        [attempt(1, "preempted", 1.0), attempt(2, "succeeded", 1.0)],
        metrics=[{"step": 100, "loss": 1.2}],
    )
    write_run(tmp_path, "c", [attempt(1, "failed", 1.0)], metrics=[{"step": 10, "loss": 0.1}])
    rows = [{"trial": t, "run_id": t} for t in ("a", "b", "c")]
    result = best_trial(rows, str(tmp_path))
    assert result["best"]["trial"] == "b" and result["best"]["loss"] == 1.2
    assert [t["outcome"] for t in result["trials"]] == ["succeeded", "succeeded", "failed"]
    assert best_trial(rows, str(tmp_path), mode="max")["best"]["trial"] == "a"
    assert best_trial(rows, str(tmp_path), metric="accuracy")["best"] is None
    with pytest.raises(ValueError, match="mode"):
        best_trial(rows, str(tmp_path), mode="median")


def test_label_values_and_run_ids() -> None:
    """Label values are valid and <= 63 characters, run ids valid for podtrain; distinct inputs stay distinct."""
    assert label_value("team-a") == "team-a"
    for text in ("Team A!", "x" * 200, "manual__2026-11-29T01:58:08+00:00", "-lead", "ünïcode", "...", ""):
        value = label_value(text)
        assert len(value) <= 63 and LABEL_VALUE.match(value), (text, value)
    assert label_value("a" * 64) != label_value("a" * 65)
    rid = run_id("podtrain_sweep", "manual__2026-11-29T01:58:08.123456+00:00", "t003")
    assert RUN_ID.match(rid) and rid.startswith("podtrain_sweep.manual__2026-11-29T01-58-08")
    assert rid == run_id("podtrain_sweep", "manual__2026-11-29T01:58:08.123456+00:00", "t003")
    assert rid != run_id("podtrain_sweep", "manual__2026-11-29T01:58:08.123456+00:00", "t004")
    assert RUN_ID.match(run_id("d", "r" * 300, "t")) and len(run_id("d", "r" * 300, "t")) <= 128
    assert run_id("dag", "run-1", "train") == "dag.run-1.train"


def test_sweep_grid_and_explicit_trials() -> None:
    """A grid gives every combination in a stable order; an explicit list wins; values become --flags."""
    assert trial_configs({"lr": [1, 2], "layers": [3, 4]}, None) == [
        {"lr": 1, "layers": 3},
        {"lr": 1, "layers": 4},
        {"lr": 2, "layers": 3},
        {"lr": 2, "layers": 4},
    ]
    assert trial_configs({"lr": [1]}, [{"lr": 9}]) == [{"lr": 9}]
    assert trial_configs(None, None) == [{}]
    with pytest.raises(ValueError, match="non-empty list"):
        trial_configs({"lr": 0.1}, None)
    planned = trials(["python", "t.py"], {"d_model": [64]}, None, fixed={"steps": 10})
    assert planned == [{"trial": "t000", "arguments": ["python", "t.py", "--steps", "10", "--d-model", "64"]}]


def test_settings_from_environment() -> None:
    """PODTRAIN_DAG_* set the deployment's choices; unset ones keep their defaults."""
    env = {
        "PODTRAIN_DAG_IMAGE": "reg/podtrain:1",
        "PODTRAIN_DAG_TRAIN_COMMAND": "python -u /app/train.py --device cuda",
        "PODTRAIN_DAG_GPUS": "2",
        "PODTRAIN_DAG_NODE_SELECTOR": "pool=a100,zone=x",
        "PODTRAIN_DAG_STORAGE_SECRET": "s3-creds",
        "PODTRAIN_DAG_SERVICE_ACCOUNT": "",
        "PODTRAIN_DAG_RETRY_DELAY_SECONDS": "1",
    }
    settings = Settings.from_env(env)
    assert settings.image == "reg/podtrain:1" and settings.gpus == 2
    assert settings.train_command == ("python", "-u", "/app/train.py", "--device", "cuda")
    assert settings.node_selector == {"pool": "a100", "zone": "x"}
    assert settings.service_account is None and settings.base_uri == Settings().base_uri
    shared = settings.pod()
    assert shared["secrets"][0].secret == "s3-creds" and shared["gpus"] == 2
    assert shared["retry_delay"].total_seconds() == 1 and shared["startup_check_interval_seconds"] == 5


def test_chargeback_of_a_gang_sums_every_pod_and_counts_each_attempt_once(tmp_path: Path) -> None:
    """A run over two pods: an entry per pod per attempt (``attempt-<N>-pod-<i>.json``, as podtrain writes them);
    GPU-seconds summed over all four, two attempts, one preemption, the last attempt's outcome."""
    folder = tmp_path / "gang" / ".podtrain"
    folder.mkdir(parents=True)
    entries = [
        attempt(1000, "preempted", 10.0, pod=0),
        attempt(1000, "preempted", 12.0, pod=1),
        attempt(1001, "succeeded", 20.0, pod=0),
        attempt(1001, "succeeded", 21.5, pod=1),
    ]
    for entry in entries:
        (folder / f"attempt-{entry['attempt']:04d}-pod-{entry['pod']}.json").write_text(json.dumps(entry))
    record = read_record(str(tmp_path), "gang")
    assert [(a["attempt"], a["pod"]) for a in record["attempts"]] == [(1000, 0), (1000, 1), (1001, 0), (1001, 1)]
    (row,) = chargeback([{"run_id": "gang", "trial": "train", "team": "t", "project": "p"}], str(tmp_path))["rows"]
    assert (row["attempts"], row["pods"], row["preemptions"], row["outcome"]) == (2, 2, 1, "succeeded")
    assert row["gpu_seconds"] == 63.5 and row["wall_seconds"] == 31.75
    (folder / "attempt-1002-pod-0.json").write_text(json.dumps(attempt(1002, "succeeded", 1.0, pod=0)))
    (folder / "attempt-1002-pod-1.json").write_text(json.dumps(attempt(1002, "failed", 1.0, pod=1)))
    (row,) = chargeback([{"run_id": "gang"}], str(tmp_path))["rows"]
    assert (row["attempts"], row["outcome"]) == (3, "failed"), "an attempt failed when any of its pods did"

"""Run records (``<artifact URI>/<run_id>/run.json`` and its per-attempt objects) read with fsspec: chargeback
(GPU-seconds per team, project and trial, preempted attempts included) and the best trial of a sweep.

The record's shape is podtrain's (its per-attempt objects under ``.podtrain/attempt-<N>.json`` are merged here the
way podtrain merges them, so a ``run.json`` that lost a race between two attempts does not hide one); this module
does not import podtrain, which is not installed where Airflow runs.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

import fsspec

from podtrain_airflow.naming import join_uri, run_id

__all__ = [
    "CHARGEBACK_COLUMNS",
    "best_trial",
    "chargeback",
    "chargeback_report",
    "final_metrics",
    "read_record",
    "write_report",
]

CHARGEBACK_COLUMNS = (
    "team",
    "project",
    "trial",
    "run_id",
    "attempts",
    "pods",
    "preemptions",
    "gpu_seconds",
    "wall_seconds",
    "outcome",
)


def read_record(artifact_uri: str, run_id: str) -> dict[str, Any]:
    """The run record of ``run_id`` under ``artifact_uri``: ``{"run_id", "attempts": [...]}``, merged from the
    per-attempt objects (else ``run.json``); no attempts when the run wrote nothing."""
    folder = join_uri(artifact_uri, run_id)
    fs, path = fsspec.core.url_to_fs(folder)
    attempts: list[dict[str, Any]] = []
    fs.invalidate_cache()  # a long-lived worker's listing cache must not hide a newer attempt
    try:
        names = fs.ls(f"{path}/.podtrain", detail=False)
    except (FileNotFoundError, OSError):
        names = []
    for name in sorted(str(n) for n in names):
        base = name.rsplit("/", 1)[-1]
        if base.startswith("attempt-") and base.endswith(".json"):
            try:
                attempts.append(json.loads(fs.cat_file(name)))
            except ValueError:
                continue
    if not attempts:
        try:
            stored = json.loads(fs.cat_file(f"{path}/run.json"))
        except (FileNotFoundError, OSError, ValueError):
            stored = {}
        attempts = list(stored.get("attempts") or [])
    attempts.sort(
        key=lambda e: (e.get("attempt") is None, e.get("attempt") or 0, e.get("pod") or 0, str(e.get("started_at")))
    )
    return {"run_id": run_id, "url": folder, "attempts": attempts}


def final_metrics(artifact_uri: str, run_id: str) -> dict[str, Any]:
    """The last line of the run's ``metrics.jsonl`` (pushed with its outputs), ``{}`` when there is none."""
    try:
        with fsspec.open(join_uri(artifact_uri, run_id, "metrics.jsonl"), "rt") as handle:
            lines = [line for line in handle.read().splitlines() if line.strip()]
    except (FileNotFoundError, OSError):
        return {}
    for line in reversed(lines):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return {}


def chargeback(runs: Iterable[Mapping[str, str]], artifact_uri: str) -> dict[str, Any]:
    """GPU-seconds of ``runs`` (each ``{"run_id", "team", "project", "trial"}``), every attempt counted: one row
    per run, and totals per team, per project and per trial. A run over several pods has an entry per pod per
    attempt: seconds are summed over every pod, attempts and preemptions counted once per attempt, ``pods`` is the
    most pods an attempt had."""
    rows = []
    for run in runs:
        entries = read_record(artifact_uri, run["run_id"])["attempts"]
        attempts = _by_attempt(entries)
        rows.append(
            {
                "team": run.get("team", ""),
                "project": run.get("project", ""),
                "trial": run.get("trial", ""),
                "run_id": run["run_id"],
                "attempts": len(attempts),
                "pods": max((len(pods) for pods in attempts), default=0),
                "preemptions": sum(1 for pods in attempts if any(e.get("outcome") == "preempted" for e in pods)),
                "gpu_seconds": round(sum(float(e.get("gpu_seconds") or 0) for e in entries), 3),
                "wall_seconds": round(sum(float(e.get("wall_seconds") or 0) for e in entries), 3),
                "outcome": _outcome(attempts[-1]) if attempts else "no record",
            }
        )
    totals: dict[str, dict[str, float]] = {"team": {}, "project": {}, "trial": {}}
    for row in rows:
        for key, sums in totals.items():
            sums[row[key]] = round(sums.get(row[key], 0.0) + row["gpu_seconds"], 3)
    return {
        "rows": rows,
        "gpu_seconds": round(sum(r["gpu_seconds"] for r in rows), 3),
        "by_team": totals["team"],
        "by_project": totals["project"],
        "by_trial": totals["trial"],
    }


def _by_attempt(entries: Iterable[Mapping[str, Any]]) -> list[list[Mapping[str, Any]]]:
    """The entries grouped by attempt, in order (an entry without an attempt number stands alone)."""
    groups: dict[Any, list[Mapping[str, Any]]] = {}
    for index, entry in enumerate(entries):
        key = entry.get("attempt") if entry.get("attempt") is not None else ("unnumbered", index)
        groups.setdefault(key, []).append(entry)
    return list(groups.values())


def _outcome(pods: Iterable[Mapping[str, Any]]) -> str:
    """An attempt's outcome: its pods' when they agree, else the first pod's that did not succeed."""
    outcomes = [str(e.get("outcome")) for e in pods]
    failed = [o for o in outcomes if o != "succeeded"]
    return failed[0] if failed else (outcomes[0] if outcomes else "no record")


def best_trial(
    trials: Iterable[Mapping[str, Any]], artifact_uri: str, *, metric: str = "loss", mode: str = "min"
) -> dict[str, Any]:
    """The best of ``trials`` (each ``{"run_id", "trial", ...}``) by the last value of ``metric`` in its metrics,
    among those whose newest attempt succeeded; every trial's outcome and value in ``"trials"``."""
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', not {mode!r}")
    seen = []
    for trial in trials:
        attempts = _by_attempt(read_record(artifact_uri, trial["run_id"])["attempts"])
        outcome = _outcome(attempts[-1]) if attempts else "no record"
        value = final_metrics(artifact_uri, trial["run_id"]).get(metric)
        number = float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
        seen.append({**trial, "outcome": outcome, metric: number})
    ranked = [t for t in seen if t["outcome"] == "succeeded" and t[metric] is not None]
    ranked.sort(key=lambda t: t[metric], reverse=mode == "max")
    return {"metric": metric, "mode": mode, "best": ranked[0] if ranked else None, "trials": seen}


def write_report(report: Mapping[str, Any], folder: str, name: str = "chargeback") -> list[str]:
    """Write ``report`` (from :func:`chargeback`) as ``<folder>/<name>.json`` and ``<name>.csv``; their URLs."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CHARGEBACK_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in report["rows"]:
        writer.writerow({k: row.get(k, "") for k in CHARGEBACK_COLUMNS})
    urls = [join_uri(folder, f"{name}.json"), join_uri(folder, f"{name}.csv")]
    for url, text in zip(urls, [json.dumps(report, indent=1) + "\n", out.getvalue()], strict=True):
        fs, path = fsspec.core.url_to_fs(url)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, text.encode())
    return urls


def chargeback_report(
    dag_id: str, dag_run_id: str, trials: Iterable[str], *, base_uri: str, team: str, project: str
) -> dict[str, Any]:
    """The chargeback of a DAG run's ``trials`` (each one run: ``run_id(dag_id, dag_run_id, trial)``), written to
    ``<base>/reports/<dag run>/chargeback.json`` and ``.csv`` (their URLs in ``"files"``): what the DAGs' ``report``
    task returns."""
    runs = [
        {"run_id": run_id(dag_id, dag_run_id, trial), "trial": trial, "team": team, "project": project}
        for trial in trials
    ]
    result = chargeback(runs, join_uri(base_uri, "artifacts"))
    result["files"] = write_report(result, join_uri(base_uri, "reports", run_id(dag_id, dag_run_id)))
    return result

"""The run record: one entry per attempt of a run (per pod of an attempt, in a job of several pods), kept beside its
artifacts, read by people and by chargeback.

Each attempt writes its own object, ``<artifact URI>/<run_id>/.podtrain/attempt-<N>.json`` (each pod of it
``attempt-<N>-pod-<i>.json``), so two attempts never overwrite each other's entry (a preempted attempt's supervisor
may still be writing while the next one starts). ``run.json`` beside the artifacts is the merged view, rewritten
from those objects after each write; :func:`read` merges the objects itself, so a ``run.json`` that lost a race is
never what a reader gets.

An entry (all fields optional but ``attempt`` and ``outcome``):

======================  =====================================================================================
``attempt``             the attempt number (``PODTRAIN_ATTEMPT``)
``pod``                 the pod's index in a job of several pods (``JOB_COMPLETION_INDEX``), else absent
``started_at``          UTC ISO time the supervisor started, ``ended_at`` when it wrote the entry
``outcome``             ``running`` (written at the start), then ``succeeded``, ``preempted``, ``failed``,
                        ``config_error`` or ``storage_unavailable``; ``exit_code`` and ``message`` with it
``node``, ``host``      the Kubernetes node (``PODTRAIN_NODE_NAME``, from the downward API) and the pod's host
``gpu_model``           as torch names it, and ``gpu_count``; ``gpu_seconds`` = ``wall_seconds`` x ``gpu_count``
``wall_seconds``        from the supervisor's start to the entry: the pod's time, pull and push included
``resumed_from``        the step the attempt resumed from (0: a fresh start) and ``resumed_from_url``
``last_step``           the newest step the training loop reached; ``steps_done`` = last - resumed from
``checkpoint_step``     the newest committed checkpoint at the end; ``steps_lost`` = last step - that, when the
                        attempt did not succeed (work the next attempt must redo)
``data_bytes``          bytes fetched by the data pull, ``data_files``, ``data_seconds``
``artifacts_bytes``     bytes pushed at the end, ``artifacts_files``, ``artifacts_url``
======================  =====================================================================================
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from sdk.redaction import redact_value
from sdk.stores import boundedjson
from sdk.stores.store import RetryPolicy, Store, open_store

__all__ = ["ATTEMPTS_DIR", "RECORD_NAME", "read", "render", "totals", "write"]

RECORD_NAME = "run.json"
_BYTES = 16 * 2**20  # bound of a record read back (sdk.stores.boundedjson)
ATTEMPTS_DIR = ".podtrain"


def write(url: str, entry: Mapping[str, Any], *, retry: RetryPolicy | None = None) -> dict[str, Any]:
    """Store ``entry`` as its attempt's object under ``url`` (the run's artifact folder), then rewrite ``run.json``
    from every attempt's object; return the merged record."""
    store = open_store(url, retry=retry)
    store.put(_entry_name(entry), _dump(entry))
    merged = _merge(store, run_id=entry.get("run_id"))
    store.put(RECORD_NAME, _dump(merged))
    return merged


def read(url: str, *, retry: RetryPolicy | None = None) -> dict[str, Any]:
    """The record of the run whose artifact folder is ``url`` (or the URL of its ``run.json``), merged from every
    attempt's object; ``{"attempts": []}`` when the run wrote none."""
    if url.rstrip("/").endswith("/" + RECORD_NAME):
        url = url.rstrip("/")[: -len(RECORD_NAME) - 1]
    store = open_store(url, retry=retry)
    merged = _merge(store, run_id=None)
    if not merged["attempts"] and store.exists(RECORD_NAME):  # a record written by hand, or by an older podtrain
        stored: dict[str, Any] = boundedjson.loads(
            store.get(RECORD_NAME), what=store.url, max_bytes=_BYTES, max_depth=32
        )
        return stored
    return merged


def totals(entries: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """What the attempts add up to: wall and GPU seconds over every pod of every attempt (chargeback sums these);
    attempts, preemptions and steps lost counted once per attempt, however many pods it had."""
    entries = list(entries)
    attempts: dict[Any, list[Mapping[str, Any]]] = {}
    for number, entry in enumerate(entries):  # an entry without a number is an attempt of its own
        attempts.setdefault(entry.get("attempt") if entry.get("attempt") is not None else ("?", number), []).append(
            entry
        )
    return {
        "attempts": len(attempts),
        "preemptions": sum(1 for pods in attempts.values() if any(e.get("outcome") == "preempted" for e in pods)),
        "wall_seconds": round(sum(float(e.get("wall_seconds") or 0) for e in entries), 3),
        "gpu_seconds": round(sum(float(e.get("gpu_seconds") or 0) for e in entries), 3),
        "steps_lost": sum(max(int(e.get("steps_lost") or 0) for e in pods) for pods in attempts.values()),
        "last_step": max((int(e["last_step"]) for e in entries if e.get("last_step") is not None), default=None),
        "outcome": entries[-1].get("outcome") if entries else None,
    }


def _merge(store: Store, *, run_id: Any) -> dict[str, Any]:
    entries = []
    for name in store.list(ATTEMPTS_DIR):
        if name.startswith("attempt-") and name.endswith(".json"):
            try:
                entries.append(
                    boundedjson.loads(store.get(f"{ATTEMPTS_DIR}/{name}"), what=name, max_bytes=_BYTES, max_depth=32)
                )
            except ValueError:
                continue  # not ours to interpret; the other attempts still count
    entries.sort(
        key=lambda e: (e.get("attempt") is None, e.get("attempt") or 0, e.get("pod") or 0, str(e.get("started_at")))
    )
    run_id = run_id or next((e.get("run_id") for e in entries if e.get("run_id")), None)
    return {"run_id": run_id, "url": store.url, "attempts": entries, "totals": totals(entries)}


def _entry_name(entry: Mapping[str, Any]) -> str:
    attempt = entry.get("attempt")
    # Without a number (the store was unreachable when it would have been derived) the start time tells it apart.
    suffix = f"{int(attempt):04d}" if attempt is not None else "x-" + str(entry.get("started_at", "")).replace(":", "")
    pod = entry.get("pod")
    return f"{ATTEMPTS_DIR}/attempt-{suffix}{'' if pod is None else f'-pod-{int(pod)}'}.json"


def _dump(value: Any) -> bytes:
    """The record as stored (and pushed with the artifacts): every string redacted first (:mod:`sdk.redaction`)."""
    return (json.dumps(redact_value(value), indent=1, sort_keys=False) + "\n").encode()


_COLUMNS = (
    ("attempt", "attempt"),
    ("pod", "pod"),
    ("started_at", "started (UTC)"),
    ("outcome", "outcome"),
    ("exit_code", "exit"),
    ("node", "node"),
    ("gpus", "GPUs"),
    ("wall_seconds", "wall s"),
    ("gpu_seconds", "GPU s"),
    ("steps", "steps"),
    ("steps_lost", "lost"),
    ("data", "data in"),
    ("artifacts", "artifacts out"),
)


def render(record: Mapping[str, Any]) -> str:
    """The record as a text table, one row per attempt (per pod of it, with a ``pod`` column), then the totals."""
    entries = record.get("attempts", [])
    pods = any(entry.get("pod") is not None for entry in entries)  # a job of several pods: a row per pod
    columns = [(key, title) for key, title in _COLUMNS if pods or key != "pod"]
    rows = [[title for _, title in columns]]
    for entry in entries:
        rows.append([_cell(entry, key) for key, _ in columns])
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = [f"run {record.get('run_id') or '?'}  ({record.get('url', '')})"]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    t = record.get("totals") or totals(record.get("attempts", []))
    attempts = f"{t['attempts']} attempt" + ("" if t["attempts"] == 1 else "s")
    lines.append(
        f"total: {attempts}, {t['preemptions']} preempted, {t['wall_seconds']:.1f} wall s, "
        f"{t['gpu_seconds']:.1f} GPU s, {t['steps_lost']} steps lost, last step {_known(t['last_step'])}, "
        f"outcome {_known(t['outcome'])}"
    )
    return "\n".join(lines)


def _known(value: Any, unknown: str = "-") -> str:
    return unknown if value is None else str(value)


def _cell(entry: Mapping[str, Any], key: str) -> str:
    if key == "gpus":
        model, count = entry.get("gpu_model"), entry.get("gpu_count") or 0
        return f"{count}x {model}" if model and count else str(count)
    if key == "steps":  # from the step it resumed from to the last it reached; "-": the child reported none
        start, last = entry.get("resumed_from"), entry.get("last_step")
        return "-" if start is None and last is None else f"{_known(start, '?')}->{_known(last, '?')}"
    if key == "data":
        return _bytes_and_seconds(entry.get("data_bytes"), entry.get("data_seconds"))
    if key == "artifacts":
        return _bytes_and_seconds(entry.get("artifacts_bytes"), None, files=entry.get("artifacts_files"))
    if key == "started_at":
        return str(entry.get(key) or "-")[:19].replace("T", " ")
    value = entry.get(key)
    if isinstance(value, float):
        return f"{value:.1f}"
    return "-" if value is None else str(value)


def _bytes_and_seconds(nbytes: Any, seconds: Any, *, files: Any = None) -> str:
    if nbytes is None:
        return "-"
    text = f"{int(nbytes) / 2**20:.1f} MiB"
    if files is not None:
        text += f" / {files} files"
    if seconds is not None:
        text += f" in {float(seconds):.1f} s"
    return text

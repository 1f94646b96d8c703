"""A hyperparameter sweep: one GPU pod per trial (a grid or a list of trials from the DAG's params), at most
PODTRAIN_DAG_MAX_PARALLEL_TRIALS at once, each its own run id and checkpoint prefix and retried on preemption
only; then the best trial by its final metric, and the chargeback report."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import fsspec
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import Param, dag, task
from podtrain_airflow import (
    PodtrainPodOperator,
    best_trial,
    join_uri,
    pod_kwargs,
    preflight_pod,
    run_id,
)
from podtrain_airflow.settings import Settings
from podtrain_airflow.sweep import trials

SETTINGS = Settings.from_env()


@dag(
    dag_id="podtrain_sweep",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    tags=["podtrain", "gpu", "sweep"],
    params={
        "grid": Param(
            {"lr": [1e-3, 3e-3], "layers": [2, 4]},
            type="object",
            description="every combination of these values is a trial (used when 'trials' is empty)",
        ),
        "trials": Param([], type="array", description='explicit trials, e.g. [{"lr": 0.001, "layers": 2}]'),
        "steps": Param(500, type="integer", minimum=1),
        "checkpoint_every": Param(50, type="integer", minimum=1),
        "metric": Param("loss", type="string", description="the metrics.jsonl field that ranks trials"),
        "mode": Param("min", enum=["min", "max"]),
    },
    doc_md=__doc__,
)
def podtrain_sweep() -> None:
    shared = SETTINGS.pod()
    preflight = preflight_pod(**shared)

    @task
    def make_trials(**context: Any) -> list[dict[str, Any]]:
        """The trials of this run: ``[{"trial": "t000", "arguments": [...]}, ...]``."""
        params = context["params"]
        fixed = {"steps": params["steps"], "checkpoint_every": params["checkpoint_every"]}
        return trials(SETTINGS.train_command, params["grid"], params["trials"], fixed=fixed)

    planned = make_trials()
    runs = PodtrainPodOperator.partial(
        task_id="trial",
        max_active_tis_per_dag=SETTINGS.max_parallel_trials,
        **({"pool": SETTINGS.pool} if SETTINGS.pool else {}),
        **pod_kwargs(data=SETTINGS.dataset, cpu=SETTINGS.cpu, memory=SETTINGS.memory, retries=5, **shared),
    ).expand_kwargs(planned)

    @task(trigger_rule="all_done")
    def best(planned: list[dict[str, Any]], **context: Any) -> dict[str, Any]:
        """The best succeeded trial by its final metric, written beside the chargeback report."""
        dag_run, params = context["dag_run"], context["params"]
        rows = [
            {
                "trial": t["trial"],
                "run_id": run_id(dag_run.dag_id, dag_run.run_id, t["trial"]),
                "arguments": t["arguments"],
            }
            for t in planned
        ]
        result = best_trial(
            rows, join_uri(SETTINGS.base_uri, "artifacts"), metric=params["metric"], mode=params["mode"]
        )
        url = join_uri(SETTINGS.base_uri, "reports", run_id(dag_run.dag_id, dag_run.run_id), "best_trial.json")
        with fsspec.open(url, "wt", auto_mkdir=True) as handle:
            json.dump(result, handle, indent=1)
        return result

    @task(trigger_rule="all_done")
    def report(planned: list[dict[str, Any]], **context: Any) -> dict[str, Any]:
        """GPU-seconds per team, project and trial (every attempt of every trial)."""
        return SETTINGS.report(context["dag_run"], [t["trial"] for t in planned])

    preflight >> planned
    # best and report run whatever the trials did; the DAG run fails when a trial did.
    runs >> [best(planned), report(planned), EmptyOperator(task_id="all_succeeded")]


podtrain_sweep()

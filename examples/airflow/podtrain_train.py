"""Train one model on a GPU pod: a GPU preflight, the training run (retried on preemption only, resuming from its
checkpoint), then the chargeback report. Copy this file and podtrain_airflow/ into the DAGs folder; the
deployment's choices (image, bucket, GPU pool, team) come from PODTRAIN_DAG_* (podtrain_airflow/settings.py)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import Param, dag, task
from podtrain_airflow import podtrain_pod, preflight_pod
from podtrain_airflow.settings import Settings

SETTINGS = Settings.from_env()


@dag(
    dag_id="podtrain_train",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["podtrain", "gpu"],
    params={
        "steps": Param(500, type="integer", minimum=1, description="optimizer steps of the whole run"),
        "lr": Param(3e-3, type="number", exclusiveMinimum=0, description="peak learning rate"),
        "checkpoint_every": Param(50, type="integer", minimum=1, description="steps between checkpoints"),
    },
    doc_md=__doc__,
)
def podtrain_train() -> None:
    shared = SETTINGS.pod()
    preflight = preflight_pod(**shared)
    train = podtrain_pod(
        "train",
        command=SETTINGS.training_command(),
        trial="train",
        data=SETTINGS.dataset,
        cpu=SETTINGS.cpu,
        memory=SETTINGS.memory,
        retries=5,
        **shared,
    )

    @task(trigger_rule="all_done")
    def report(**context: Any) -> dict[str, Any]:
        """GPU-seconds of the training run (every attempt: failed and preempted ones too), as JSON and CSV."""
        return SETTINGS.report(context["dag_run"], ["train"])

    # The reports run whatever happened; the DAG run fails when training did (report alone would pass it).
    preflight >> train >> [report(), EmptyOperator(task_id="all_succeeded")]


podtrain_train()

"""Train one model on several GPU nodes as one gang: a GPU preflight on every node, the training run as a JobSet
(every pod runs torchrun over all of them; a preemption of any pod stops, commits and restarts the whole gang in the
cluster without spending a retry; a bug fails at once), then the chargeback report over every pod of every attempt.
Where the cluster has no JobSet controller, ``PODTRAIN_DAG_MULTINODE_BACKEND=indexed_job`` runs the same pods as an
Indexed Job that Airflow retries on preemption only. Settings: PODTRAIN_DAG_* (podtrain_airflow/settings.py)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import Param, dag, task
from podtrain_airflow import multinode_pod, multinode_preflight
from podtrain_airflow.settings import Settings

SETTINGS = Settings.from_env()


@dag(
    dag_id="podtrain_multinode",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["podtrain", "gpu", "multinode"],
    params={
        "steps": Param(500, type="integer", minimum=1, description="optimizer steps of the whole run"),
        "lr": Param(3e-3, type="number", exclusiveMinimum=0, description="peak learning rate"),
        "checkpoint_every": Param(50, type="integer", minimum=1, description="steps between checkpoints"),
    },
    doc_md=__doc__,
)
def podtrain_multinode() -> None:
    shared, gang = SETTINGS.pod(), SETTINGS.gang()
    preflight = multinode_preflight(**shared, **gang)
    train = multinode_pod(
        "train",
        command=SETTINGS.training_command(),
        trial="train",
        data=SETTINGS.dataset,
        cpu=SETTINGS.cpu,
        memory=SETTINGS.memory,
        retries=5,
        max_restarts=SETTINGS.max_restarts,
        **shared,
        **gang,
    )

    @task(trigger_rule="all_done")
    def report(**context: Any) -> dict[str, Any]:
        """GPU-seconds of the training run over every pod of every attempt (preempted ones too), as JSON and CSV."""
        return SETTINGS.report(context["dag_run"], ["train"])

    # The report runs whatever happened; the DAG run fails when training did (report alone would pass it).
    preflight >> train >> [report(), EmptyOperator(task_id="all_succeeded")]


podtrain_multinode()

"""A task's pod built offline, as its worker would build it: a hand-made runtime context (what the podtrain
operators, their templates and task mapping read), the operator's own rendering, its ``build_pod_request_obj``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DAGS = REPO / "examples" / "airflow"
RUN_ID = "manual__2026-11-29T01:58:08.123456+00:00"


class FakeTaskInstance:
    """What rendering and ``build_pod_request_obj`` read from a task instance, and XCom pulls for mapping."""

    def __init__(self, task: Any, run_id: str, map_index: int, try_number: int, xcoms: dict[str, Any]) -> None:
        self.task = task
        self.dag_id = task.dag_id
        self.task_id = task.task_id
        self.run_id = run_id
        self.map_index = map_index
        self.try_number = try_number
        self._xcoms = xcoms

    def xcom_pull(self, task_ids: str | None = None, key: str = "return_value", **_: Any) -> Any:
        return self._xcoms[task_ids]

    def xcom_push(self, key: str, value: Any) -> None:
        self._xcoms[f"{self.task_id}.{key}"] = value


class FakeDagRun:
    def __init__(self, dag_id: str, run_id: str, conf: dict[str, Any]) -> None:
        self.dag_id, self.run_id, self.conf = dag_id, run_id, conf
        self.run_type = "manual"


def make_context(
    task: Any,
    *,
    map_index: int = -1,
    try_number: int = 1,
    xcoms: dict[str, Any] | None = None,
    run_id: str = RUN_ID,
    conf: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A runtime context for ``task`` with just what the podtrain operators and their templates read."""
    from airflow.sdk.definitions.param import process_params

    dag = task.dag
    ti = FakeTaskInstance(task, run_id, map_index, try_number, dict(xcoms or {}))
    # conf is merged here, not given to process_params: that would set it on the DAG's own Param objects.
    dag_run = FakeDagRun(dag.dag_id, run_id, {})
    return {
        "dag": dag,
        "task": task,
        "ti": ti,
        "task_instance": ti,
        "dag_run": dag_run,
        "run_id": run_id,
        "params": {**process_params(dag, task, {}, suppress_exception=False), **(conf or {})},
        "ds": "2026-11-29",
    }


def render_and_build(task: Any, **kwargs: Any) -> tuple[Any, Any, dict[str, Any]]:
    """``(operator, V1Pod, context)``: ``task`` rendered as its worker would and its pod built, offline."""
    from airflow.sdk.definitions.mappedoperator import MappedOperator

    context = make_context(task, **kwargs)
    if isinstance(task, MappedOperator):
        task.render_template_fields(context)  # unmaps into context["task"], then renders that
        operator = context["task"]
    else:
        operator = task.prepare_for_execution()
        context["task"] = context["ti"].task = operator
        operator.render_template_fields(context)
    pod = operator.build_pod_request_obj(context, dry_run=True)
    return operator, pod, context

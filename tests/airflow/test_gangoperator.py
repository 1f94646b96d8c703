"""The gang operators' own path against the test Kubernetes API server and its JobSet controller, without Airflow
running them: created, followed in the worker (``deferrable=False``), judged as one gang, logged, cleaned up per
``on_finish_action``, and every way the wait can end turned into the exception that retries or fails."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from kubeapi import KubeAPIServer
from kubernetes.client import models as k8s
from offline import make_context
from podtrain_airflow import KubernetesUnavailable, PodtrainJobSetOperator, PodVanished
from podtrain_airflow.errors import TrainingFailed, Unschedulable

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(autouse=True)
def standard_logs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The operators log to their own standard logger here (``_operator`` sets it), so a test reads the lines."""
    from podtrain_airflow.multinode import GangOperator

    monkeypatch.setattr(GangOperator, "log", property(lambda self: self._log))


def _operator(kube: KubeAPIServer, tmp_path: Path, script: str, **kwargs: Any) -> Any:
    """A JobSet operator of 2 ``sh:test`` pods running ``script`` as it is, followed in the worker."""
    from airflow.sdk import DAG

    with DAG("gangs", schedule=None):
        op = PodtrainJobSetOperator(
            task_id="train",
            nodes=2,
            torchrun=False,
            image="sh:test",
            arguments=[script],
            base_uri="file:///tmp/never",
            team="t",
            project="p",
            config_file=str(kube.write_kubeconfig(tmp_path / "kubeconfig")),
            in_cluster=False,
            deferrable=False,
            poll_interval=0.2,
            termination_grace_period=2,
            **kwargs,
        )
    op._log = logging.getLogger(f"test.gangs.{id(op)}")  # a standard logger: the test reads what the task logs
    op._log.setLevel(logging.INFO)
    op.lines = []
    op._log.addHandler(_Lines(op.lines))
    return op


class _Lines(logging.Handler):
    def __init__(self, lines: list[str]) -> None:
        super().__init__(logging.INFO)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _run(op: Any) -> Any:
    context = make_context(op)
    return op.execute(context)


def test_a_gang_that_succeeds_returns_its_name_shows_pod_0s_log_and_is_deleted(
    kube: KubeAPIServer, tmp_path: Path
) -> None:
    op = _operator(kube, tmp_path, 'echo "hello from pod $JOB_COMPLETION_INDEX"')
    result = _run(op)
    assert result == {"name": op.gang, "kind": "jobset", "nodes": 2, "restarts": 0}
    text = "\n".join(op.lines)
    assert "[pod 0] hello from pod 0" in text and "hello from pod 1" not in text
    kube.wait_for(lambda: not kube.cluster.pods and not kube.jobsets(), 60, "the JobSet deleted with its pods")


def test_a_bug_on_one_pod_fails_the_task_at_once_and_keeps_nothing(kube: KubeAPIServer, tmp_path: Path) -> None:
    op = _operator(kube, tmp_path, 'test "$JOB_COMPLETION_INDEX" = 1 && exit 1; sleep 30')
    with pytest.raises(TrainingFailed, match=r"pod train-[a-z0-9-]+-node-0-1-\w+: failed"):
        _run(op)
    assert op.verdict.kind == "failed"
    (js,) = kube.jobsets(deleted=True)
    assert js["status"]["terminalState"] == "Failed" and js["status"]["restarts"] == 0


def test_delete_succeeded_pod_keeps_a_failed_gang_for_a_look(kube: KubeAPIServer, tmp_path: Path) -> None:
    op = _operator(kube, tmp_path, "exit 2", on_finish_action="delete_succeeded_pod")
    with pytest.raises(Exception, match="config_error"):
        _run(op)
    assert [js["metadata"]["name"] for js in kube.jobsets()] == [op.gang]


def test_keep_pod_keeps_a_succeeded_gang(kube: KubeAPIServer, tmp_path: Path) -> None:
    op = _operator(kube, tmp_path, "exit 0", on_finish_action="keep_pod")
    _run(op)
    assert [js["metadata"]["name"] for js in kube.jobsets()] == [op.gang]
    assert len(kube.pods()) == 2


def test_a_preempted_gang_whose_restarts_ran_out_is_retried_by_the_task(kube: KubeAPIServer, tmp_path: Path) -> None:
    """Exit 69 on every try: the JobSet restarts within max_restarts=1, then fails; the task retries it."""
    op = _operator(kube, tmp_path, "exit 69", max_restarts=1)
    with pytest.raises(Exception, match="storage_unavailable") as caught:
        _run(op)
    assert caught.value.verdict.retry
    (js,) = kube.jobsets(deleted=True)
    assert js["status"]["restarts"] == 1 and js["status"]["restartsCountTowardsMax"] == 1


@pytest.mark.parametrize(
    ("event", "error", "words"),
    [
        ({"status": "gone"}, PodVanished, "was deleted before it ended"),
        ({"status": "api_error", "message": "did not answer for 600 s"}, KubernetesUnavailable, "did not answer"),
    ],
)
def test_a_wait_that_ends_without_the_gang_ending_is_retried(
    kube: KubeAPIServer, tmp_path: Path, event: dict[str, Any], error: type[Exception], words: str
) -> None:
    op = _operator(kube, tmp_path, "exit 0")
    with pytest.raises(error, match=words):
        op.gang_finished(make_context(op), {"name": "train-x-t1", **event})


def test_an_unplaceable_pod_fails_the_task_naming_the_gpu_request(tmp_path: Path) -> None:
    with KubeAPIServer(images={"sh:test": ["sh", "-c"]}, allocatable={"nvidia.com/gpu": 1}) as kube:
        gpus = k8s.V1ResourceRequirements(limits={"nvidia.com/gpu": "2"})
        op = _operator(kube, tmp_path, "sleep 30", container_resources=gpus, schedule_timeout_seconds=1)
        op.gpu_request = "2 x nvidia.com/gpu"
        with pytest.raises(Unschedulable, match=r"2 x nvidia\.com/gpu"):
            _run(op)
        kube.wait_for(lambda: not kube.cluster.pods, 60, "the stuck gang deleted")


def test_on_kill_while_following_in_the_worker_deletes_the_gang(kube: KubeAPIServer, tmp_path: Path) -> None:
    op = _operator(kube, tmp_path, "sleep 60")
    op.gang = "train-killed-t1"
    pod = {
        "metadata": {"labels": {}},
        "spec": {"containers": [{"name": "base", "image": "sh:test", "args": ["sleep 60"]}]},
    }
    op.create(pod, op.gang)
    kube.wait_for(lambda: len(kube.cluster.pods) == 2, 60, "both pods")
    op.on_kill()
    kube.wait_for(lambda: not kube.cluster.pods, 60, "the pods deleted")
    assert op._killed

"""The operator's end-of-pod path without a cluster: ``cleanup()`` with a built pod and a remote pod, the
provider's own PodManager over a fake CoreV1Api, raises the right exception for every way a pod ends, deletes the
pod, and never lets a pod deleted under the task pass for a success."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes.client import models as k8s
from kubernetes.client.exceptions import ApiException
from podtrain_airflow import KubernetesUnavailable, PodPreempted, PodVanished, podtrain_pod
from podtrain_airflow.errors import PodFailure, PodRetryable
from test_classify import CASES, pod


class FakeCoreV1:
    """The CoreV1Api calls cleanup makes: read the pod, patch its labels, delete it."""

    def __init__(self, current: k8s.V1Pod | None) -> None:
        self.current = current
        self.calls: list[tuple[str, Any]] = []

    def read_namespaced_pod(self, name: str, namespace: str, **_: Any) -> k8s.V1Pod:
        self.calls.append(("read", name))
        if self.current is None:
            raise ApiException(status=404, reason="Not Found")
        return self.current

    def patch_namespaced_pod(self, name: str, namespace: str, body: Any, **_: Any) -> None:
        self.calls.append(("patch", body))

    def delete_namespaced_pod(self, name: str, namespace: str, **_: Any) -> None:
        self.calls.append(("delete", name))
        if self.current is None:
            raise ApiException(status=404, reason="Not Found")


def operator(current: k8s.V1Pod | None) -> tuple[Any, FakeCoreV1]:
    from airflow.providers.cncf.kubernetes.utils.pod_manager import PodManager

    op = podtrain_pod("train", command=["python", "t.py"], image="img:1", base_uri="s3://b/p", team="t", project="p")
    fake = FakeCoreV1(current)
    op.client = fake
    op.pod_manager = PodManager(kube_client=fake)
    return op, fake


def built() -> k8s.V1Pod:
    return k8s.V1Pod(metadata=k8s.V1ObjectMeta(name="train-x", namespace="default"))


def stale() -> k8s.V1Pod:
    """The remote pod as the operator saw it early on: Pending, no statuses yet."""
    return pod("Pending")


@pytest.mark.parametrize(("case", "final", "kind", "error"), CASES, ids=[c[0] for c in CASES])
def test_cleanup_raises_by_verdict(case: str, final: k8s.V1Pod | None, kind: str, error: type | None) -> None:
    """cleanup() re-reads the pod, deletes it, and ends the task with the verdict's exception (none on success)."""
    op, fake = operator(final)
    if error is None:
        op.cleanup(pod=built(), remote_pod=stale())
    else:
        with pytest.raises(error) as caught:
            op.cleanup(pod=built(), remote_pod=stale())
        assert isinstance(caught.value, PodRetryable if op.verdict.retry else PodFailure)
    assert op.verdict is not None and op.verdict.kind == kind
    assert ("delete", "train-x") in fake.calls
    assert fake.calls[0] == ("read", "train-x")
    assert any(call[0] == "patch" for call in fake.calls) is (error is not None)


def test_cleanup_after_on_kill_is_never_success() -> None:
    """A task stopped mid-run (on_kill deleted its pod) ends in PodPreempted, not in a quiet success."""
    op, fake = operator(pod("Succeeded", exit_code=0))
    op._killed = True
    with pytest.raises(PodPreempted, match="task was stopped"):
        op.cleanup(pod=built(), remote_pod=stale())
    assert fake.calls == []


def test_cleanup_without_a_remote_pod_leaves_the_error_in_flight() -> None:
    """When the pod was never created, cleanup adds nothing: the creation error is what the task ends with."""
    op, fake = operator(None)
    op.cleanup(pod=built(), remote_pod=None)
    assert fake.calls == []


def test_cleanup_when_the_pod_is_gone() -> None:
    """A pod that no longer exists when the task looks again (node lost, deleted) is retried as vanished."""
    op, _ = operator(None)
    with pytest.raises(PodVanished, match="no longer exists"):
        op.cleanup(pod=built(), remote_pod=stale())


def test_execute_turns_api_outages_into_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 503 from the API server before the pod exists is retryable; a 403 stays the provider's (not retried)."""
    from airflow.sdk import RetryAction
    from podtrain_airflow import retry_policy

    ti = type("TI", (), {"try_number": 1, "map_index": -1, "xcom_push": lambda *a, **k: None})()
    context = {"ti": ti, "dag_run": None, "run_id": "r"}
    for status, expected in ((503, KubernetesUnavailable), (403, ApiException)):
        op, _ = operator(None)
        op.pod_request_obj = built()

        def refuse(*_: Any, status: int = status, **__: Any) -> None:
            raise ApiException(status=status, reason="refused")

        monkeypatch.setattr(op, "get_or_create_pod", refuse)
        with pytest.raises(expected) as caught:
            op.execute(context)
        decision = retry_policy().evaluate(caught.value, try_number=1, max_tries=4)
        assert decision.action is (RetryAction.RETRY if status == 503 else RetryAction.FAIL)

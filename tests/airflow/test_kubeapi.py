"""The API server half of the test Kubernetes (``kubeapi.py``, ``_kubepods.py``, ``_kubehttp.py``,
``_kubedisruption.py``) through the official ``kubernetes`` client: selectors, patches, graceful deletes, events,
scheduling, unknown endpoints, kubeconfig, preemption, and the provider's KubernetesPodOperator end to end.
The kubelet half (processes, status, logs, termination messages, env and volumes) is ``test_kubelet.py``, which
shares this module's client helpers."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

kubernetes = pytest.importorskip("kubernetes")
from kubeapi import KubeAPIServer  # noqa: E402
from kubernetes import client as k8s  # noqa: E402
from kubernetes import config as k8s_config  # noqa: E402
from kubernetes.client.rest import ApiException  # noqa: E402

NS = "default"


def pod_body(
    name: str,
    script: str | None = None,
    *,
    image: str = "busybox:1.36",
    args: list[str] | None = None,
    labels: dict[str, str] | None = None,
    env: list[dict[str, Any]] | None = None,
    grace: int | None = None,
    policy: str | None = None,
    volumes: list[dict[str, Any]] | None = None,
    mounts: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "base", "image": image}
    if script is not None:
        container["command"] = ["sh", "-c", script]
    if args is not None:
        container["args"] = args
    if env:
        container["env"] = env
    if policy:
        container["terminationMessagePolicy"] = policy
    if mounts:
        container["volumeMounts"] = mounts
    spec: dict[str, Any] = {"containers": [container], "restartPolicy": "Never"}
    if grace is not None:
        spec["terminationGracePeriodSeconds"] = grace
    if volumes:
        spec["volumes"] = volumes
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": labels or {}},
        "spec": spec,
    }


def wait_phase(api: k8s.CoreV1Api, name: str, *phases: str, timeout: float = 15) -> k8s.V1Pod:
    deadline = time.monotonic() + timeout
    while True:
        pod = api.read_namespaced_pod(name, NS)
        if pod.status.phase in phases:
            return pod
        if time.monotonic() > deadline:
            raise AssertionError(f"pod {name} stayed {pod.status.phase}, wanted {phases}")
        time.sleep(0.05)


def read_log(api: k8s.CoreV1Api, name: str, **kwargs: Any) -> str:
    """The pod log as text (raw, as the operator reads it: the client turns a preloaded log into ``str(bytes)``)."""
    return api.read_namespaced_pod_log(name, NS, container="base", _preload_content=False, **kwargs).data.decode()


def terminated(pod: k8s.V1Pod) -> k8s.V1ContainerStateTerminated:
    state = pod.status.container_statuses[0].state
    assert state.terminated is not None, state
    return state.terminated


def condition(pod: k8s.V1Pod, type_: str) -> k8s.V1PodCondition | None:
    return next((c for c in pod.status.conditions or [] if c.type == type_), None)


def test_list_by_label_selector(api: k8s.CoreV1Api) -> None:
    """labelSelector as the operator writes it (k=v, k!=v, !k, k in (...)) selects the right pods."""
    api.create_namespaced_pod(NS, pod_body("a1", "true", labels={"dag_id": "d", "task_id": "t", "run": "1"}))
    api.create_namespaced_pod(NS, pod_body("a2", "true", labels={"dag_id": "d", "task_id": "u", "run": "1"}))
    api.create_namespaced_pod(NS, pod_body("a3", "true", labels={"dag_id": "d", "task_id": "t", "airflow-worker": "9"}))

    def names(selector: str) -> list[str]:
        return sorted(p.metadata.name for p in api.list_namespaced_pod(NS, label_selector=selector).items)

    assert names("dag_id=d,task_id=t,already_checked!=True,!airflow-worker") == ["a1"]
    assert names("dag_id=d") == ["a1", "a2", "a3"]
    assert names("task_id in (u,x),run") == ["a2"]
    assert names("task_id notin (u)") == ["a1", "a3"]
    assert api.list_namespaced_pod("other").items == []
    assert [p.metadata.name for p in api.list_namespaced_pod(NS, field_selector="metadata.name=a2").items] == ["a2"]


def test_patch_labels(api: k8s.CoreV1Api) -> None:
    """A PATCH of metadata.labels (as patch_already_checked sends it) merges the labels; the selector sees it."""
    api.create_namespaced_pod(NS, pod_body("p1", "true", labels={"app": "x"}))
    wait_phase(api, "p1", "Succeeded")
    patched = api.patch_namespaced_pod("p1", NS, {"metadata": {"labels": {"already_checked": "True"}}})
    assert patched.metadata.labels == {"app": "x", "already_checked": "True"}
    assert patched.status.phase == "Succeeded"
    assert api.list_namespaced_pod(NS, label_selector="app=x,already_checked!=True").items == []
    # a JSON patch (a list of operations) works too
    api.patch_namespaced_pod("p1", NS, [{"op": "remove", "path": "/metadata/labels/app"}])
    assert api.read_namespaced_pod("p1", NS).metadata.labels == {"already_checked": "True"}


def test_delete_with_grace_sigterm_then_sigkill(kube: KubeAPIServer, api: k8s.CoreV1Api) -> None:
    """DELETE with gracePeriodSeconds: SIGTERM to the group, SIGKILL after the grace, then the pod is gone."""
    script = "trap 'echo got-term' TERM; echo up; while :; do sleep 0.05; done"
    api.create_namespaced_pod(NS, pod_body("stubborn", script, grace=30))
    kube.wait_for(lambda: "up" in kube.log_text(NS, "stubborn"), what="the container to start")
    t0 = time.monotonic()
    answer = api.delete_namespaced_pod("stubborn", NS, grace_period_seconds=1)
    assert answer.metadata.deletion_timestamp is not None
    kube.wait_for(lambda: kube.pods(NS) == [], timeout=10, what="the pod to go")
    elapsed = time.monotonic() - t0
    assert 0.9 <= elapsed < 5
    with pytest.raises(ApiException) as err:
        api.read_namespaced_pod("stubborn", NS)
    assert err.value.status == 404 and json.loads(err.value.body)["reason"] == "NotFound"
    last = kube.pod(NS, "stubborn", deleted=True)
    assert last["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 137
    assert "got-term" in kube.log_text(NS, "stubborn")
    reasons = [e.reason for e in api.list_namespaced_event(NS, field_selector="involvedObject.name=stubborn").items]
    assert "Killing" in reasons


def test_delete_default_grace_comes_from_spec(kube: KubeAPIServer, api: k8s.CoreV1Api) -> None:
    """DELETE with V1DeleteOptions() and no grace uses the pod's terminationGracePeriodSeconds."""
    api.create_namespaced_pod(NS, pod_body("soft", "trap 'exit 0' TERM; while :; do sleep 0.05; done", grace=0))
    wait_phase(api, "soft", "Running")
    api.delete_namespaced_pod("soft", NS, body=k8s.V1DeleteOptions())
    kube.wait_for(lambda: kube.pods(NS) == [], timeout=5, what="the pod to go")
    assert (
        kube.pod(NS, "soft", deleted=True)["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 137
    )  # grace 0: straight to SIGKILL


def test_events_list(kube: KubeAPIServer, api: k8s.CoreV1Api) -> None:
    """Events: an EventList for any field selector; a pod's carry Scheduled/Started with involvedObject."""
    assert api.list_namespaced_event(NS, field_selector="involvedObject.name=nobody").items == []
    api.create_namespaced_pod(NS, pod_body("ev", "true"))
    wait_phase(api, "ev", "Succeeded")
    events = api.list_namespaced_event(NS, field_selector="involvedObject.name=ev").items
    assert [e.reason for e in events] == ["Scheduled", "Pulled", "Created", "Started"]
    assert all(e.involved_object.name == "ev" and e.metadata.uid for e in events)
    assert events[-1].involved_object.field_path == "spec.containers{base}"


def test_unschedulable_gpu_request_stays_pending() -> None:
    """With allocatable/node_labels: too many GPUs or a foreign nodeSelector stay Pending, Unschedulable."""
    with KubeAPIServer(allocatable={"nvidia.com/gpu": 1}, node_labels={"pool": "gpu"}) as kube:
        cfg = k8s.Configuration()
        cfg.host = kube.url
        api = k8s.CoreV1Api(k8s.ApiClient(cfg))

        def gpu_pod(name: str, gpus: int, pool: str) -> dict[str, Any]:
            body = pod_body(name, "echo ran")
            body["spec"]["containers"][0]["resources"] = {"limits": {"nvidia.com/gpu": str(gpus), "cpu": "1"}}
            body["spec"]["nodeSelector"] = {"pool": pool}
            return body

        api.create_namespaced_pod(NS, gpu_pod("fits", 1, "gpu"))
        assert wait_phase(api, "fits", "Succeeded").spec.node_name == kube.node_name
        api.create_namespaced_pod(NS, gpu_pod("greedy", 2, "gpu"))
        api.create_namespaced_pod(NS, gpu_pod("astray", 1, "cpu"))
        time.sleep(0.2)
        for name, why in (("greedy", "1 Insufficient nvidia.com/gpu"), ("astray", "didn't match Pod's node")):
            pod = api.read_namespaced_pod(name, NS)
            assert pod.status.phase == "Pending" and pod.spec.node_name is None
            assert pod.status.container_statuses is None
            scheduled = condition(pod, "PodScheduled")
            assert (scheduled.status, scheduled.reason) == ("False", "Unschedulable")
            assert why in scheduled.message
            events = api.list_namespaced_event(NS, field_selector=f"involvedObject.name={name}").items
            assert [(e.reason, e.type) for e in events] == [("FailedScheduling", "Warning")]
            api.delete_namespaced_pod(name, NS)
        assert [p.metadata.name for p in api.list_namespaced_pod(NS).items] == ["fits"]


def test_unknown_endpoints_answer_status(kube: KubeAPIServer, api: k8s.CoreV1Api) -> None:
    """Endpoints the server lacks answer a Kubernetes Status: 404 NotFound, 405 MethodNotAllowed."""
    with pytest.raises(ApiException) as err:
        api.list_namespaced_config_map(NS)
    assert err.value.status == 404
    status = json.loads(err.value.body)
    assert (status["kind"], status["reason"]) == ("Status", "NotFound")
    request = urllib.request.Request(f"{kube.url}/api/v1/namespaces/{NS}/pods", method="DELETE")
    with pytest.raises(urllib.error.HTTPError) as http_err:
        urllib.request.urlopen(request, timeout=5)
    assert http_err.value.code == 405
    assert json.loads(http_err.value.read())["reason"] == "MethodNotAllowed"
    with pytest.raises(ApiException) as err:
        api.create_namespaced_pod(NS, pod_body("dup", "true"))
        api.create_namespaced_pod(NS, pod_body("dup", "true"))
    assert err.value.status == 409
    assert api.list_namespaced_pod(NS, watch=False).kind == "PodList"


def test_kubeconfig_and_generate_name(kube: KubeAPIServer, tmp_path: Path) -> None:
    """The written kubeconfig loads with the official loader; generateName gives the pod a fresh name."""
    cfg = k8s.Configuration()
    k8s_config.load_kube_config(
        config_file=str(kube.write_kubeconfig(tmp_path / "kubeconfig")), client_configuration=cfg
    )
    assert cfg.host == kube.url
    api = k8s.CoreV1Api(k8s.ApiClient(cfg))
    body = pod_body("", "true")
    body["metadata"] = {"generateName": "trial-"}
    created = api.create_namespaced_pod(NS, body)
    assert re.fullmatch(r"trial-[0-9a-f]{5}", created.metadata.name)
    assert [p.metadata.name for p in api.list_pod_for_all_namespaces().items] == [created.metadata.name]


# ------------------------------------------------------------------------------------- preemption


def test_preempt(kube: KubeAPIServer, api: k8s.CoreV1Api) -> None:
    """preempt(): DisruptionTarget condition, SIGTERM; the container's exit 75 and message are reported."""
    script = (
        'trap \'printf "{\\"outcome\\": \\"preempted\\"}" > "$PODTRAIN_TERMINATION_LOG"; exit 75\' TERM; '
        "echo ready; while :; do sleep 0.05; done"
    )
    api.create_namespaced_pod(NS, pod_body("victim", script, grace=20))
    kube.wait_for(lambda: "ready" in kube.log_text(NS, "victim"), what="the container to start")
    t0 = time.monotonic()
    kube.preempt(NS, "victim")
    assert time.monotonic() - t0 < 5  # it exited on SIGTERM, well within the grace
    pod = api.read_namespaced_pod("victim", NS)
    assert pod.status.phase == "Failed"
    disruption = condition(pod, "DisruptionTarget")
    assert disruption is not None and disruption.status == "True" and disruption.reason == "PreemptionByScheduler"
    term = terminated(pod)
    assert term.exit_code == 75
    assert json.loads(term.message) == {"outcome": "preempted"}
    assert "Preempted" in [e.reason for e in api.list_namespaced_event(NS).items]


def test_preempt_sigkills_after_grace_and_eviction(kube: KubeAPIServer, api: k8s.CoreV1Api) -> None:
    """A container ignoring SIGTERM is SIGKILLed (137) after the pod's grace; TerminationByKubelet is Evicted."""
    api.create_namespaced_pod(NS, pod_body("deaf", "trap '' TERM; echo ready; while :; do sleep 0.05; done", grace=1))
    kube.wait_for(lambda: "ready" in kube.log_text(NS, "deaf"), what="the container to start")
    t0 = time.monotonic()
    final = kube.preempt(NS, "deaf", reason="TerminationByKubelet")
    assert time.monotonic() - t0 >= 0.9
    assert final["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 137
    pod = api.read_namespaced_pod("deaf", NS)
    assert (pod.status.reason, condition(pod, "DisruptionTarget").reason) == ("Evicted", "TerminationByKubelet")


def test_preempt_remove_deletes_the_pod(kube: KubeAPIServer, api: k8s.CoreV1Api) -> None:
    """preempt(remove=True) deletes the object once the container has terminated, as the scheduler does."""
    api.create_namespaced_pod(NS, pod_body("gone", "trap 'exit 75' TERM; while :; do sleep 0.05; done"))
    wait_phase(api, "gone", "Running")
    final = kube.preempt(NS, "gone", remove=True)
    assert final["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 75
    with pytest.raises(ApiException) as err:
        api.read_namespaced_pod("gone", NS)
    assert err.value.status == 404


def test_preempt_when_log_matches(kube: KubeAPIServer, api: k8s.CoreV1Api) -> None:
    """preempt_when(): a background thread preempts the next matching pod once its log matches."""
    preempter = kube.preempt_when(r"step 3\b", label_selector="role=train", count=1)
    api.create_namespaced_pod(NS, pod_body("other", "echo step 3; sleep 0.3", labels={"role": "eval"}))
    script = "trap 'exit 75' TERM; i=0; while :; do i=$((i+1)); echo step $i; sleep 0.05; done"
    api.create_namespaced_pod(NS, pod_body("trainer", script, labels={"role": "train"}))
    preempter.join(timeout=10)
    assert preempter.error is None and preempter.preempted == ["trainer"]
    pod = api.read_namespaced_pod("trainer", NS)
    assert terminated(pod).exit_code == 75 and condition(pod, "DisruptionTarget").status == "True"
    assert condition(api.read_namespaced_pod("other", NS), "DisruptionTarget") is None


# ------------------------------------------------------------------------------- the real operator


def _context(dag_id: str, task_id: str, run_id: str) -> dict[str, Any]:
    """Just what KubernetesPodOperator.execute reads from a context when it runs without deferral."""

    class TI:
        try_number = 1
        map_index = -1

        def __init__(self) -> None:
            self.dag_id, self.task_id, self.run_id = dag_id, task_id, run_id
            self.pushed: dict[str, Any] = {}

        def xcom_push(self, key: str, value: Any) -> None:
            self.pushed[key] = value

    ti = TI()
    return {"ti": ti, "task_instance": ti, "run_id": run_id, "dag_run": None, "dag": None}


def test_kubernetes_pod_operator_runs_a_pod(kube: KubeAPIServer, tmp_path: Path) -> None:
    """The provider's KubernetesPodOperator creates, follows, reads and deletes a pod through this server."""
    pod_module = pytest.importorskip("airflow.providers.cncf.kubernetes.operators.pod")
    kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")
    ok = pod_module.KubernetesPodOperator(
        task_id="hello",
        name="hello",
        namespace=NS,
        image="busybox:1.36",
        cmds=["sh", "-c"],
        arguments=["echo from-the-pod; echo second"],
        config_file=str(kubeconfig),
        in_cluster=False,
        get_logs=True,
        on_finish_action="delete_pod",
        startup_check_interval_seconds=1,
        termination_message_policy="FallbackToLogsOnError",
        log_events_on_failure=True,
    )
    context = _context("kubeapi_smoke", "hello", "manual__1")
    ok.execute(context)
    kube.wait_for(lambda: kube.pods(NS) == [], timeout=5, what="the operator to delete its pod")
    name = context["ti"].pushed["pod_name"]
    assert kube.log_text(NS, name) == "from-the-pod\nsecond\n"
    methods = {(m, re.sub(r"\?.*", "", p).replace(name, "{name}")) for m, p in kube.requests}
    assert ("POST", "/api/v1/namespaces/default/pods") in methods
    assert ("GET", "/api/v1/namespaces/default/pods/{name}/log") in methods
    assert ("DELETE", "/api/v1/namespaces/default/pods/{name}") in methods

    # preempted while the operator follows its log: the failure carries the container's termination message
    preempter = kube.preempt_when("^ready$", label_selector="task_id=victim")
    victim = pod_module.KubernetesPodOperator(
        task_id="victim",
        name="victim",
        namespace=NS,
        image="busybox:1.36",
        cmds=["sh", "-c"],
        arguments=[
            "trap 'echo preempted-by-test > \"$PODTRAIN_TERMINATION_LOG\"; exit 75' TERM; "
            "echo ready; while :; do sleep 0.05; done"
        ],
        config_file=str(kubeconfig),
        in_cluster=False,
        get_logs=True,
        on_finish_action="delete_pod",
        startup_check_interval_seconds=1,
        termination_grace_period=5,
        termination_message_policy="FallbackToLogsOnError",
    )
    with pytest.raises(Exception, match="preempted-by-test") as err:
        victim.execute(_context("kubeapi_smoke", "victim", "manual__1"))
    assert "returned a failure" in str(err.value)
    preempter.join(timeout=5)
    assert preempter.error is None and len(preempter.preempted) == 1
    final = kube.pod(NS, preempter.preempted[0], deleted=True)
    assert final["metadata"]["labels"]["already_checked"] == "True"  # patched before it was deleted
    assert final["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 75
    assert final["status"]["conditions"][0]["type"] == "DisruptionTarget"
    assert kube.pods(NS) == []

"""The trigger that follows a gang, against the test Kubernetes API server (``kubeapi.py`` with its JobSet
controller) through the provider's async hook and ``kubernetes_asyncio``: it fires once, with the JobSet as it ended,
or says the JobSet is gone, a pod cannot be placed, or the API does not answer; ``on_kill`` deletes the JobSet."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import pytest
from kubeapi import KubeAPIServer
from kubernetes import client as k8s
from podtrain_airflow import jobset
from podtrain_airflow.gangtrigger import GangTrigger

pytestmark = pytest.mark.timeout(120)


def _body(name: str, script: str, *, nodes: int = 2, resources: dict[str, Any] | None = None) -> dict[str, Any]:
    """A JobSet of ``nodes`` pods of the ``sh:test`` image running ``script``, with podtrain's failure rules."""
    pod = {
        "metadata": {"labels": {"app": "t"}},
        "spec": {
            "terminationGracePeriodSeconds": 2,
            "containers": [{"name": "base", "image": "sh:test", "args": [script], "resources": resources or {}}],
        },
    }
    return jobset.jobset_body(pod, name=name, nodes=nodes, procs_per_node=1, torchrun=False)


def _custom(kube: KubeAPIServer) -> k8s.CustomObjectsApi:
    cfg = k8s.Configuration()
    cfg.host = kube.url
    return k8s.CustomObjectsApi(k8s.ApiClient(cfg))


def _trigger(kubeconfig: Path, name: str, **kwargs: Any) -> GangTrigger:
    return GangTrigger(
        kind="jobset",
        name=name,
        namespace="default",
        config_file=str(kubeconfig),
        in_cluster=False,
        poll_interval=0.2,
        **kwargs,
    )


def _fire(trigger: GangTrigger) -> dict[str, Any]:
    async def first() -> Any:
        return await anext(trigger.run())

    event = asyncio.run(asyncio.wait_for(first(), 90))
    return dict(event.payload)


def test_fires_once_with_the_jobset_as_it_completed(kube: KubeAPIServer, tmp_path: Path) -> None:
    kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")
    _custom(kube).create_namespaced_custom_object(
        jobset.GROUP, jobset.VERSION, "default", jobset.PLURAL, _body("done", "exit 0")
    )
    event = _fire(_trigger(kubeconfig, "done"))
    assert (event["status"], event["name"]) == ("finished", "done")
    assert any(c["type"] == "Completed" and c["status"] == "True" for c in event["object"]["status"]["conditions"])


def test_a_failed_jobset_is_finished_too_and_says_so(kube: KubeAPIServer, tmp_path: Path) -> None:
    kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")
    _custom(kube).create_namespaced_custom_object(
        jobset.GROUP,
        jobset.VERSION,
        "default",
        jobset.PLURAL,
        _body("bug", 'test "$JOB_COMPLETION_INDEX" = 1 && exit 1; sleep 30'),
    )
    event = _fire(_trigger(kubeconfig, "bug"))
    assert event["status"] == "finished"
    assert event["object"]["status"].get("terminalState") == "Failed"


def test_a_jobset_that_is_not_there_is_gone(kube: KubeAPIServer, tmp_path: Path) -> None:
    event = _fire(_trigger(kube.write_kubeconfig(tmp_path / "kubeconfig"), "never-made"))
    assert event["status"] == "gone"


def test_a_pod_that_cannot_be_placed_past_the_schedule_timeout_ends_the_wait(tmp_path: Path) -> None:
    with KubeAPIServer(images={"sh:test": ["sh", "-c"]}, allocatable={"nvidia.com/gpu": 1}) as kube:
        kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")
        gpus = {"limits": {"nvidia.com/gpu": "2"}}
        _custom(kube).create_namespaced_custom_object(
            jobset.GROUP, jobset.VERSION, "default", jobset.PLURAL, _body("big", "sleep 30", resources=gpus)
        )
        event = _fire(_trigger(kubeconfig, "big", schedule_timeout=0.5))
        assert event["status"] == "unschedulable" and event["pod"].startswith("big-node-0-")


def test_an_api_that_does_not_answer_ends_the_wait_after_the_patience(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    with KubeAPIServer() as kube:
        config = kube.kubeconfig()
    config["clusters"][0]["cluster"]["server"] = f"http://127.0.0.1:{port}"
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps(config))
    event = _fire(_trigger(kubeconfig, "x", api_patience=0.5))
    assert event["status"] == "api_error" and "did not answer" in event["message"]


def test_on_kill_deletes_the_jobset_with_its_pods(kube: KubeAPIServer, tmp_path: Path) -> None:
    kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")
    _custom(kube).create_namespaced_custom_object(
        jobset.GROUP, jobset.VERSION, "default", jobset.PLURAL, _body("long", "sleep 60")
    )
    kube.wait_for(lambda: len([p for p in kube.cluster.pods.values() if p.started]) == 2, 60, "both pods running")
    asyncio.run(_trigger(kubeconfig, "long", grace_seconds=1).on_kill())
    kube.wait_for(lambda: not kube.cluster.pods and not kube.jobsets(), 60, "the JobSet gone with its pods")
    assert not kube.jobsets() and not kube.pods()
    assert [js["metadata"]["name"] for js in kube.jobsets(deleted=True)] == ["long"], "it was this JobSet, deleted"

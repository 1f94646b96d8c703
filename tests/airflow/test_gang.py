"""One verdict for a gang of pods: every pod classified on its own, then the strongest evidence wins (a bug over a
peer's preemption, a preemption over a vanished peer), so the task retries what retrying can fix and nothing else."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from kubernetes.client import models as k8s
from podtrain_airflow.gang import COMPLETION_INDEX, completion_index, gang_verdict
from test_classify import DISRUPTION, message, pod


def member(index: int, phase: str, **kwargs: Any) -> k8s.V1Pod:
    """Pod ``index`` of a gang (``train-<index>``), shaped as :func:`test_classify.pod`."""
    out = pod(phase, **kwargs)
    out.metadata.name = f"train-{index}"
    out.metadata.labels = {COMPLETION_INDEX: str(index)}
    return out


def ok(index: int) -> k8s.V1Pod:
    return member(index, "Succeeded", exit_code=0, term_message=message("succeeded", 0))


def stopped(index: int) -> k8s.V1Pod:
    """A pod that stopped because a peer was preempted: podtrain's exit 75."""
    return member(index, "Failed", exit_code=75, term_message=message("preempted", 75))


def test_every_index_succeeded_is_success_whatever_the_order() -> None:
    judged = gang_verdict([ok(1), ok(0)], nodes=2)
    assert judged.verdict.succeeded and judged.pod == ""
    assert set(judged.pods) == {"train-0", "train-1"}


def test_a_missing_index_is_not_success_but_a_vanished_pod() -> None:
    judged = gang_verdict([ok(0)], nodes=2)
    assert judged.verdict.kind == "vanished" and judged.verdict.retry
    assert "node(s) 1" in judged.verdict.message


def test_a_bug_on_any_pod_wins_over_its_peers_stopping_with_it() -> None:
    """Pod 1's train.py failed (exit 1); pod 0 then exits 1 too, or 75 if it saw the peer go first: never retried."""
    failed = member(1, "Failed", exit_code=1, term_message=message("failed", 1))
    judged = gang_verdict([stopped(0), failed], nodes=2)
    assert (judged.verdict.kind, judged.pod) == ("failed", "train-1")
    assert not judged.verdict.retry


def test_an_oom_kill_wins_over_the_peers_that_exit_75_naming_the_silent_rank() -> None:
    oom = member(1, "Failed", exit_code=137, reason="OOMKilled")
    judged = gang_verdict([stopped(0), oom], nodes=2)
    assert (judged.verdict.kind, judged.pod) == ("oom_killed", "train-1")


def test_a_preemption_of_one_pod_is_the_gangs_preemption_and_retried() -> None:
    disrupted = member(1, "Failed", exit_code=75, term_message=message("preempted", 75), conditions=[DISRUPTION])
    judged = gang_verdict([stopped(0), disrupted], nodes=2)
    assert judged.verdict.kind == "preempted" and judged.verdict.retry
    assert judged.pod == "train-0", "the lowest index of the strongest kind names the gang's verdict"


def test_storage_trouble_ending_with_its_peers_stopping_is_storage_trouble() -> None:
    """In one second (Kubernetes' resolution) pod 0 exits 69 and pod 1 stops with it (75): storage, retried."""
    storage = member(0, "Failed", exit_code=69, term_message=message("storage_unavailable", 69))
    judged = gang_verdict([storage, stopped(1)], nodes=2)
    assert (judged.verdict.kind, judged.pod) == ("storage_unavailable", "train-0")
    judged = gang_verdict([storage, ok(1)], nodes=2)
    assert (judged.verdict.kind, judged.pod) == ("storage_unavailable", "train-0")


def test_no_pods_at_all_is_vanished() -> None:
    judged = gang_verdict([], nodes=3)
    assert judged.verdict.kind == "vanished" and "0, 1, 2" in judged.verdict.message


@pytest.mark.parametrize(
    ("labels", "annotations", "index"),
    [({COMPLETION_INDEX: "3"}, None, 3), (None, {COMPLETION_INDEX: "2"}, 2), ({COMPLETION_INDEX: "x"}, None, None)],
)
def test_the_completion_index_comes_from_the_label_or_the_annotation(
    labels: dict[str, str] | None, annotations: dict[str, str] | None, index: int | None
) -> None:
    one = k8s.V1Pod(metadata=k8s.V1ObjectMeta(name="p", labels=labels, annotations=annotations))
    assert completion_index(one) == index


def test_the_pod_that_ended_first_is_the_cause_and_its_peers_stopped_after_are_consequences() -> None:
    """Pod 0 exits 69 (storage); the Job controller then stops pod 1 with SIGTERM (143, counted as a preemption on
    its own): the gang's verdict is storage unavailable, not a preemption."""
    storage = member(0, "Failed", exit_code=69, term_message=message("storage_unavailable", 69))
    killed = member(1, "Failed", exit_code=143)
    later = storage.status.container_statuses[0].state.terminated.finished_at + timedelta(seconds=2)
    killed.status.container_statuses[0].state.terminated.finished_at = later
    assert gang_verdict([killed, storage], nodes=2).verdict.kind == "storage_unavailable"
    assert gang_verdict([killed], nodes=2).verdict.kind == "preempted", "alone, a SIGTERM from outside is one"

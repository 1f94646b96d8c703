"""The DAG template, offline: every DAG loads; every pod (each trial of the sweep too) is rendered and built by the
real operator, validates against the Kubernetes schema (strict), and carries what a podtrain pod needs."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from kubernetes.client import ApiClient
from kubernetes.utils import parse_quantity
from offline import DAGS, REPO, RUN_ID, make_context, render_and_build

K8S_VERSION = "1.37.0"
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
PODTRAIN_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
POD_TASKS = {
    "podtrain_train": ["gpu_preflight", "train"],
    "podtrain_sweep": ["gpu_preflight"],
    "podtrain_multinode": ["gpu_preflight", "train"],  # each of its pods, before the JobSet copies it per node
}


def sweep_trials(dagbag: Any, conf: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """What the sweep's upstream task returns for the DAG's params (``conf`` overriding them)."""
    make = dagbag.dags["podtrain_sweep"].get_task("make_trials")
    result: list[dict[str, Any]] = make.python_callable(**make_context(make, conf=conf))
    return result


def every_pod(dagbag: Any) -> list[tuple[str, Any, Any]]:
    """``(name, operator, pod dict)`` for every pod task of every DAG and every trial of the sweep."""
    pods = []
    for dag_id, task_ids in POD_TASKS.items():
        for task_id in task_ids:
            op, pod, _ = render_and_build(dagbag.dags[dag_id].get_task(task_id))
            pods.append((f"{dag_id}.{task_id}", op, ApiClient().sanitize_for_serialization(pod)))
    planned = sweep_trials(dagbag)
    mapped = dagbag.dags["podtrain_sweep"].get_task("trial")
    for index in range(len(planned)):
        op, pod, _ = render_and_build(mapped, map_index=index, xcoms={"make_trials": planned})
        pods.append((f"podtrain_sweep.trial[{index}]", op, ApiClient().sanitize_for_serialization(pod)))
    return pods


@pytest.fixture(scope="module")
def pods(dagbag: Any) -> list[tuple[str, Any, Any]]:
    return every_pod(dagbag)


def env_of(pod: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in pod["spec"]["containers"][0]["env"]}


def test_dagbag_loads_every_dag_without_import_errors(dagbag: Any) -> None:
    """Every DAG file in examples/airflow imports cleanly and defines the expected DAGs and tasks."""
    assert dagbag.import_errors == {}
    assert set(dagbag.dag_ids) == {"podtrain_train", "podtrain_sweep", "podtrain_multinode"}
    assert {t.task_id for t in dagbag.dags["podtrain_multinode"].tasks} == {
        "gpu_preflight",
        "train",
        "report",
        "all_succeeded",
    }
    assert {t.task_id for t in dagbag.dags["podtrain_train"].tasks} == {
        "gpu_preflight",
        "train",
        "report",
        "all_succeeded",
    }
    assert {t.task_id for t in dagbag.dags["podtrain_sweep"].tasks} == {
        "gpu_preflight",
        "make_trials",
        "trial",
        "best",
        "report",
        "all_succeeded",
    }


def test_dags_serialize_with_their_retry_policy(dagbag: Any) -> None:
    """The DAGs survive the scheduler's serialization round trip, every pod task flagged as having a retry policy
    (the policy itself runs in the worker, from the parsed DAG)."""
    from airflow.serialization.serialized_objects import DagSerialization

    for dag_id, dag in dagbag.dags.items():
        again = DagSerialization.from_dict(DagSerialization.to_dict(dag))
        assert set(again.task_ids) == set(dag.task_ids)
        for task_id in [*POD_TASKS[dag_id], *(["trial"] if dag_id == "podtrain_sweep" else [])]:
            assert again.get_task(task_id).has_retry_policy, (dag_id, task_id)
            assert dag.get_task(task_id).retry_policy is not None


def test_preflight_runs_before_training(dagbag: Any) -> None:
    """The GPU preflight is upstream of every training pod, the reports run whatever the pods did, and a leaf
    that needs every pod to succeed keeps a failed training from passing for a successful DAG run."""
    train = dagbag.dags["podtrain_train"]
    assert train.get_task("train").upstream_task_ids == {"gpu_preflight"}
    assert train.get_task("report").trigger_rule == "all_done"
    for dag, pods in ((train, "train"), (dagbag.dags["podtrain_sweep"], "trial")):
        leaf = dag.get_task("all_succeeded")
        assert leaf.upstream_task_ids == {pods} and leaf.trigger_rule == "all_success" and not leaf.downstream_task_ids
    sweep = dagbag.dags["podtrain_sweep"]
    assert "gpu_preflight" in sweep.get_task("make_trials").upstream_task_ids
    assert sweep.get_task("trial").upstream_task_ids == {"make_trials"}
    for name in ("best", "report"):
        assert "trial" in sweep.get_task(name).upstream_task_ids
        assert sweep.get_task(name).trigger_rule == "all_done"


def test_sweep_bounds_concurrency_and_maps_every_trial(dagbag: Any) -> None:
    """The sweep is one mapped operator with max_active_tis_per_dag set; the grid gives one trial per combination."""
    mapped = dagbag.dags["podtrain_sweep"].get_task("trial")
    assert mapped.max_active_tis_per_dag == 4
    planned = sweep_trials(dagbag)
    assert [t["trial"] for t in planned] == ["t000", "t001", "t002", "t003"]
    explicit = sweep_trials(dagbag, conf={"trials": [{"lr": 0.01}, {"lr": 0.02, "layers": 3}]})
    assert [t["arguments"][-4:] for t in explicit] == [
        ["--checkpoint-every", "50", "--lr", "0.01"],
        ["--lr", "0.02", "--layers", "3"],
    ]


def test_every_pod_validates_against_the_kubernetes_schema(pods: list[tuple[str, Any, Any]]) -> None:
    """Each pod (every DAG's tasks and all sweep trials) validates against Kubernetes 1.37's schema, strictly."""
    assert len(pods) == 5 + 4
    for name, _, pod in pods:
        try:
            kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name}: {exc}")


def test_every_pod_requests_the_gpu_pool(pods: list[tuple[str, Any, Any]]) -> None:
    """GPU in limits (not requests-only, not `resources=`), the GPU taint tolerated, quantities that parse."""
    for name, _, pod in pods:
        resources = pod["spec"]["containers"][0]["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == "1", name
        tolerations = pod["spec"]["tolerations"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations, name
        for kind in ("requests", "limits"):
            for resource, quantity in resources[kind].items():
                assert parse_quantity(quantity) > 0, (name, resource, quantity)
        assert parse_quantity(resources["limits"]["memory"]) >= parse_quantity(resources["requests"]["memory"])
        for volume in pod["spec"]["volumes"]:
            if "emptyDir" in volume and "sizeLimit" in volume["emptyDir"]:
                assert parse_quantity(volume["emptyDir"]["sizeLimit"]) > 0, name


def test_gpu_type_and_node_selector_from_settings(monkeypatch: pytest.MonkeyPatch, render_pod: Any) -> None:
    """A GPU type becomes the nvidia.com/gpu.product selector, beside the deployment's own node selector."""
    from podtrain_airflow import podtrain_pod
    from podtrain_airflow.settings import Settings

    monkeypatch.setenv("PODTRAIN_DAG_GPU_TYPE", "NVIDIA-H100-80GB-HBM3")
    monkeypatch.setenv("PODTRAIN_DAG_NODE_SELECTOR", "cloud.google.com/gke-spot=true,pool=gpu")
    monkeypatch.setenv("PODTRAIN_DAG_GPUS", "8")
    shared = Settings.from_env().pod()
    from airflow.sdk import DAG

    with DAG("selector_check", schedule=None):
        task = podtrain_pod("train", command=["python", "t.py"], **shared)
    _, pod, _ = render_pod(task)
    assert pod.spec.node_selector == {
        "cloud.google.com/gke-spot": "true",
        "pool": "gpu",
        "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
    }
    assert pod.spec.containers[0].resources.limits["nvidia.com/gpu"] == "8"


def test_grace_period_is_one_value(pods: list[tuple[str, Any, Any]]) -> None:
    """terminationGracePeriodSeconds equals PODTRAIN_GRACE_SECONDS in every pod."""
    for name, op, pod in pods:
        assert pod["spec"]["terminationGracePeriodSeconds"] == 30, name
        assert env_of(pod)["PODTRAIN_GRACE_SECONDS"] == "30", name
        assert op.termination_grace_period == 30


def test_security_context_is_restricted(pods: list[tuple[str, Any, Any]]) -> None:
    """Non-root uid 1000, no privilege escalation, every capability dropped, seccomp RuntimeDefault."""
    for name, _, pod in pods:
        spec = pod["spec"]["securityContext"]
        assert (spec["runAsNonRoot"], spec["runAsUser"], spec["fsGroup"]) == (True, 1000, 1000), name
        assert spec["seccompProfile"] == {"type": "RuntimeDefault"}
        container = pod["spec"]["containers"][0]["securityContext"]
        assert container["allowPrivilegeEscalation"] is False
        assert container["capabilities"] == {"drop": ["ALL"]}
        assert container["seccompProfile"] == {"type": "RuntimeDefault"}
        assert "readOnlyRootFilesystem" not in container, "read-only root is a deployment's choice (off)"


def test_read_only_root_setting_makes_the_root_read_only_and_output_cache_tmp_writable(
    monkeypatch: pytest.MonkeyPatch, render_pod: Any
) -> None:
    """PODTRAIN_DAG_READ_ONLY_ROOT=1: readOnlyRootFilesystem, and emptyDirs at /output, /cache and /tmp (what the
    image writes besides /data), never at /workspace (a training image's code may live there); off by default; a
    value that is not a yes or a no fails at parse time."""
    from airflow.sdk import DAG
    from podtrain_airflow import podtrain_pod
    from podtrain_airflow.settings import Settings

    assert Settings.from_env({}).read_only_root is False
    monkeypatch.setenv("PODTRAIN_DAG_READ_ONLY_ROOT", "true")
    with DAG("read_only_check", schedule=None):
        task = podtrain_pod("train", command=["python", "t.py"], **Settings.from_env().pod())
    _, pod, _ = render_pod(task)
    body = ApiClient().sanitize_for_serialization(pod)
    kubernetes_validate.validate(body, K8S_VERSION, strict=True)
    container = body["spec"]["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    volumes = {v["name"]: v for v in body["spec"]["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    assert set(mounts) == {"/data", "/dev/shm", "/output", "/cache", "/tmp"}
    assert all("emptyDir" in mounts[path] for path in ("/output", "/cache", "/tmp"))
    with pytest.raises(ValueError, match="PODTRAIN_DAG_READ_ONLY_ROOT must be"):
        Settings.from_env({"PODTRAIN_DAG_READ_ONLY_ROOT": "sometimes"})


def test_env_contract(pods: list[tuple[str, Any, Any]]) -> None:
    """PODTRAIN_RUN_ID valid and distinct per trial, attempt = try number, URIs under one base, node from the
    downward API."""
    run_ids = set()
    for name, _, pod in pods:
        env = env_of(pod)
        rid = env["PODTRAIN_RUN_ID"]
        assert PODTRAIN_RUN_ID.match(rid), (name, rid)
        run_ids.add(rid)
        assert env["PODTRAIN_ATTEMPT"] == "1"
        assert env["PODTRAIN_CHECKPOINT_URI"] == f"s3://my-bucket/podtrain/checkpoints/{rid}"
        assert env["PODTRAIN_ARTIFACT_URI"] == "s3://my-bucket/podtrain/artifacts"
        assert env["PODTRAIN_NODE_NAME"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
        if "preflight" not in name:
            assert env["PODTRAIN_DATA_URI"] == "s3://my-bucket/podtrain/datasets/tiny"
    assert len(run_ids) == len(pods)


def test_run_id_is_stable_across_retries_and_attempt_follows_try_number(dagbag: Any, render_pod: Any) -> None:
    """The third try of a trial gets the same run id and checkpoint prefix as the first, and attempt 3."""
    planned = sweep_trials(dagbag)
    mapped = dagbag.dags["podtrain_sweep"].get_task("trial")
    _, first, _ = render_pod(mapped, map_index=2, try_number=1, xcoms={"make_trials": planned})
    _, third, _ = render_pod(mapped, map_index=2, try_number=3, xcoms={"make_trials": planned})
    env1 = {e.name: e.value for e in first.spec.containers[0].env}
    env3 = {e.name: e.value for e in third.spec.containers[0].env}
    assert env1["PODTRAIN_RUN_ID"] == env3["PODTRAIN_RUN_ID"]
    assert env1["PODTRAIN_CHECKPOINT_URI"] == env3["PODTRAIN_CHECKPOINT_URI"]
    assert (env1["PODTRAIN_ATTEMPT"], env3["PODTRAIN_ATTEMPT"]) == ("1", "3")
    _, other_run, _ = render_pod(mapped, map_index=2, xcoms={"make_trials": planned}, run_id="manual__2")
    assert {e.name: e.value for e in other_run.spec.containers[0].env}["PODTRAIN_RUN_ID"] != env1["PODTRAIN_RUN_ID"]


def test_labels_are_valid_and_name_who_pays(pods: list[tuple[str, Any, Any]]) -> None:
    """team, project, run and trial labels on every pod; every label value <= 63 characters and valid."""
    trials = []
    for name, _, pod in pods:
        labels = pod["metadata"]["labels"]
        assert labels["team"] == "ml-research" and labels["project"] == "podtrain-example", name
        assert labels["podtrain-run"] and labels["podtrain-trial"]
        trials.append(labels["podtrain-trial"])
        for key, value in labels.items():
            assert len(value) <= 63 and LABEL_VALUE.match(value), (name, key, value)
    assert trials == ["preflight", "train", "preflight", "preflight", "train", "t000", "t001", "t002", "t003"]


def test_args_not_command_and_finish_settings(pods: list[tuple[str, Any, Any]]) -> None:
    """Training pods give args only (the image's entrypoint `podtrain run` stays), the preflight replaces it with
    tini alone; logs followed, pod deleted at the end."""
    for name, op, pod in pods:
        container = pod["spec"]["containers"][0]
        if name.endswith("gpu_preflight"):
            assert container["command"] == ["tini", "-g", "--"], name
        else:
            assert not container.get("command"), name
        assert container["args"][:2] in (["python", "/app/train.py"], ["sh", "-c"]), name
        assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
        assert pod["spec"]["restartPolicy"] == "Never"
        assert op.get_logs is True and op.on_finish_action.value == "delete_pod"
        assert op.schedule_timeout_seconds >= 600 and op.retries >= 1
    preflight = next(pod for name, _, pod in pods if name == "podtrain_train.gpu_preflight")
    assert preflight["spec"]["containers"][0]["args"] == ["sh", "-c", "nvidia-smi && podtrain smoke --gpus 1"]
    train = next(pod for name, _, pod in pods if name == "podtrain_train.train")
    assert train["spec"]["containers"][0]["args"][2:] == ["--steps", "500", "--lr", "0.003", "--checkpoint-every", "50"]


def test_volumes_data_cache_and_memory_backed_shm(pods: list[tuple[str, Any, Any]]) -> None:
    """/data is a sized emptyDir (or a PVC), /dev/shm a memory-backed emptyDir."""
    for name, _, pod in pods:
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", name
        assert "sizeLimit" in volumes[mounts["/data"]]["emptyDir"], name


def test_data_pvc_secrets_and_service_account(render_pod: Any) -> None:
    """A PVC for the data cache, a Secret as env and as a volume, the service account: all reach the pod."""
    from airflow.providers.cncf.kubernetes.secret import Secret
    from airflow.sdk import DAG
    from podtrain_airflow import podtrain_pod

    with DAG("extras_check", schedule=None):
        task = podtrain_pod(
            "train",
            command=["python", "t.py"],
            image="img:1",
            base_uri="gs://b/p",
            team="Team A!",
            project="p",
            data_pvc="dataset-cache",
            service_account="trainer",
            secrets=[Secret("env", None, "s3-creds"), Secret("volume", "/var/run/secrets/gcs", "gcs-key")],
        )
    _, pod, _ = render_pod(task)
    body = ApiClient().sanitize_for_serialization(pod)
    kubernetes_validate.validate(body, K8S_VERSION, strict=True)
    volumes = {v["name"]: v for v in body["spec"]["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"] == {"claimName": "dataset-cache"}
    assert body["spec"]["serviceAccountName"] == "trainer"
    assert {"secretRef": {"name": "s3-creds"}} in body["spec"]["containers"][0]["envFrom"]
    assert any(v.get("secret", {}).get("secretName") == "gcs-key" for v in volumes.values())
    team = body["metadata"]["labels"]["team"]
    assert team.startswith("Team-A-") and len(team) == len("Team-A-") + 8 and LABEL_VALUE.match(team)


def test_factory_rejects_bad_values() -> None:
    """A quantity that does not parse, a grace period under 1 s or a negative GPU count fails at parse time."""
    from podtrain_airflow import pod_kwargs

    base = {"image": "i", "base_uri": "s3://b", "team": "t", "project": "p"}
    with pytest.raises(ValueError, match="memory"):
        pod_kwargs(memory="64 GB", **base)
    with pytest.raises(ValueError, match="grace_seconds"):
        pod_kwargs(grace_seconds=0, **base)
    with pytest.raises(ValueError, match="gpus"):
        pod_kwargs(gpus=-1, **base)
    cpu_only = pod_kwargs(gpus=0, **base)
    assert "nvidia.com/gpu" not in cpu_only["container_resources"].limits and cpu_only["tolerations"] == []


def test_preflight_checks_the_gpus_asked_for() -> None:
    """The preflight runs nvidia-smi and `podtrain smoke --gpus N` under tini, not `podtrain run`; a CPU pod only
    checks torch."""
    from podtrain_airflow import preflight_command, preflight_pod

    assert preflight_command(8) == ["sh", "-c", "nvidia-smi && podtrain smoke --gpus 8"]
    assert preflight_command(0) == ["podtrain", "smoke", "--allow-cpu"]
    pod = preflight_pod(image="i", base_uri="s3://b", team="t", project="p", gpus=4, gpu_type="NVIDIA-A100")
    assert pod.arguments[-1].endswith("--gpus 4") and pod.trial == "preflight" and "preflight" in pod.failure_hint
    assert pod.cmds == ["tini", "-g", "--"] and pod.preflight is True
    assert pod.container_resources.limits["nvidia.com/gpu"] == "4"


def test_image_entrypoint_matches_the_dockerfile() -> None:
    """The factory's expectation of the image's ENTRYPOINT is docker/Dockerfile's ENTRYPOINT line."""
    from podtrain_airflow import IMAGE_ENTRYPOINT

    text = (REPO / "docker" / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if line.startswith("ENTRYPOINT")]
    assert len(lines) == 1
    assert tuple(json.loads(lines[0].removeprefix("ENTRYPOINT").strip())) == IMAGE_ENTRYPOINT


def test_template_never_imports_the_training_sdk() -> None:
    """No file under examples/airflow imports podtrain's sdk or entrypoint (the Airflow side has no torch)."""
    for path in sorted(Path(DAGS).rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in {"sdk", "entrypoint", "torch"}, (path, name)


def test_run_id_in_context_is_airflows(render_pod: Any, dagbag: Any) -> None:
    """The pod's run id derives from the DAG id, the DAG run id and the trial, as the reports compute it."""
    from podtrain_airflow import run_id

    _, pod, _ = render_pod(dagbag.dags["podtrain_train"].get_task("train"))
    env = {e.name: e.value for e in pod.spec.containers[0].env}
    assert env["PODTRAIN_RUN_ID"] == run_id("podtrain_train", RUN_ID, "train")

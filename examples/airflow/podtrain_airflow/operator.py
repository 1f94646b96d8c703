"""The training pod: a KubernetesPodOperator that sets podtrain's environment contract and classifies how its pod
ended, and the factory that builds it (or its ``partial`` arguments, for a sweep) from a few arguments."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.providers.cncf.kubernetes.secret import Secret
from kubernetes.client import models as k8s
from kubernetes.client.exceptions import ApiException
from kubernetes.utils import parse_quantity
from urllib3.exceptions import HTTPError

from podtrain_airflow.classify import Verdict, classify
from podtrain_airflow.errors import KubernetesUnavailable, PodtrainTaskError, error_for, retry_policy
from podtrain_airflow.naming import join_uri, label_value, run_id

__all__ = [
    "IMAGE_ENTRYPOINT",
    "PREFLIGHT_ENTRYPOINT",
    "PodtrainPodOperator",
    "pod_kwargs",
    "podtrain_pod",
    "preflight_command",
    "preflight_kwargs",
    "preflight_pod",
]

# The image's ENTRYPOINT (docker/Dockerfile): a pod passes `arguments` (the training command) and never `cmds`,
# so `podtrain run` always stands between tini and the training process.
IMAGE_ENTRYPOINT = ("tini", "-g", "--", "podtrain", "run", "--")
# The preflight is not training: it replaces the entrypoint with tini alone, so `podtrain smoke` writes the
# termination message itself (under `podtrain run` the supervisor's own message would replace smoke's cause).
PREFLIGHT_ENTRYPOINT = ("tini", "-g", "--")


def preflight_command(gpus: int) -> list[str]:
    """The preflight's command: ``nvidia-smi``, then ``podtrain smoke`` expecting ``gpus`` GPUs (a CPU pod:
    ``podtrain smoke --allow-cpu``, which checks torch only)."""
    if gpus <= 0:
        return ["podtrain", "smoke", "--allow-cpu"]
    return ["sh", "-c", f"nvidia-smi && podtrain smoke --gpus {int(gpus)}"]


PREFLIGHT_HINT = (
    "the GPU preflight failed: no usable GPU in a pod of this node pool. nvidia-smi missing or failing means the "
    "NVIDIA device plugin or container toolkit is not on the node; a CUDA error from `podtrain smoke` means the "
    "driver is older than the image's CUDA needs; an unschedulable pod means the node selector or tolerations "
    "point at the wrong pool"
)
GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"  # set by NVIDIA GPU feature discovery on every GPU node
UID = 1000  # the image's user (USER 1000:1000)
# With read_only_root: the emptyDirs a read-only image needs (docker/Dockerfile: PODTRAIN_OUTPUT_DIR, XDG_CACHE_HOME
# and TRITON_CACHE_DIR, and /tmp). /workspace stays the image's: a training image may have put its code there.
READ_ONLY_ROOT_WRITABLE = {"output": "/output", "cache": "/cache", "tmp": "/tmp"}  # noqa: S108
_TRANSIENT_API = {429, 500, 502, 503, 504}


class PodtrainPodOperator(KubernetesPodOperator):
    """A KubernetesPodOperator for the podtrain image.

    At pod-build time it adds the run's environment (``PODTRAIN_RUN_ID`` from the DAG, the DAG run and the trial,
    so every retry of one run gets the same id; ``PODTRAIN_ATTEMPT`` = the try number; the checkpoint, artifact
    and data URIs under ``base_uri``) and the chargeback labels. When the pod is done, :meth:`cleanup` reads it
    once more and ends the task with :func:`~podtrain_airflow.classify.classify`'s verdict: nothing on success, a
    :class:`~podtrain_airflow.errors.PodRetryable` to retry, a :class:`~podtrain_airflow.errors.PodFailure` to
    fail at once. A task whose pod was deleted under it (``on_kill``) never ends as a success.
    """

    template_fields: Sequence[str] = (*KubernetesPodOperator.template_fields, "trial", "base_uri", "data_uri")

    def __init__(
        self,
        *,
        base_uri: str,
        team: str,
        project: str,
        trial: str = "",
        data_uri: str = "",
        gpu_request: str = "",
        failure_hint: str = "",
        preflight: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.base_uri = base_uri
        self.team = team
        self.project = project
        self.trial = trial
        self.data_uri = data_uri
        self.gpu_request = gpu_request
        self.failure_hint = failure_hint
        self.preflight = preflight
        self.verdict: Verdict | None = None

    def podtrain_run_id(self, context: Mapping[str, Any]) -> str:
        """The run id of this task's pod: DAG id, DAG run id and trial (stable across retries of the run)."""
        return run_id(context["dag_run"].dag_id, context["dag_run"].run_id, self.trial or self.task_id)

    def podtrain_env(self, context: Mapping[str, Any]) -> dict[str, str]:
        """The environment contract's per-run values (the factory sets the per-DAG ones)."""
        rid = self.podtrain_run_id(context)
        env = {
            "PODTRAIN_RUN_ID": rid,
            "PODTRAIN_ATTEMPT": str(context["ti"].try_number),
            "PODTRAIN_CHECKPOINT_URI": join_uri(self.base_uri, "checkpoints", rid),
            "PODTRAIN_ARTIFACT_URI": join_uri(self.base_uri, "artifacts"),
        }
        if self.data_uri:
            env["PODTRAIN_DATA_URI"] = (
                self.data_uri if "://" in self.data_uri else join_uri(self.base_uri, "datasets", self.data_uri)
            )
        return env

    def build_pod_request_obj(self, context: Any = None, *, dry_run: bool = False) -> k8s.V1Pod:
        if context is not None:
            contract = self.podtrain_env(context)
            kept = [e for e in _env_list(self.env_vars) if e.name not in contract]
            self.env_vars = kept + [k8s.V1EnvVar(name=k, value=v) for k, v in contract.items()]
            self.labels = {
                **self.labels,
                "team": label_value(self.team),
                "project": label_value(self.project),
                "podtrain-run": label_value(contract["PODTRAIN_RUN_ID"]),
                "podtrain-trial": label_value(self.trial or self.task_id),
            }
        return super().build_pod_request_obj(context, dry_run=dry_run)

    def execute(self, context: Any) -> Any:
        try:
            return super().execute(context)
        except PodtrainTaskError:
            raise
        except ApiException as exc:
            if exc.status in _TRANSIENT_API:
                raise KubernetesUnavailable(f"the Kubernetes API answered {exc.status} {exc.reason}") from exc
            raise
        except HTTPError as exc:
            raise KubernetesUnavailable(f"the Kubernetes API could not be reached: {exc}") from exc

    def cleanup(
        self,
        pod: k8s.V1Pod,
        remote_pod: k8s.V1Pod,
        xcom_result: dict[Any, Any] | None = None,
        context: Any = None,
    ) -> None:
        if self._killed:
            # on_kill deleted the pod (the task process was told to stop): the provider's cleanup returns quietly
            # here, and the task would be marked successful with its work undone.
            self.verdict = Verdict("preempted", "the task was stopped and its pod deleted before it finished")
            raise error_for(self.verdict, pod_name=_name(pod))
        if not remote_pod:
            # The pod was never created: the exception in flight says why.
            super().cleanup(pod=pod, remote_pod=remote_pod, xcom_result=xcom_result, context=context)
            return
        final = self._read_final(remote_pod)
        provider_error: Exception | None = None
        try:
            super().cleanup(pod=pod, remote_pod=final or remote_pod, xcom_result=xcom_result, context=context)
        except Exception as exc:  # the provider's own "returned a failure"; ours below says which
            provider_error = exc
        self.verdict = classify(final, self.base_container_name, gpu_request=self.gpu_request, preflight=self.preflight)
        self.log.info("pod %s: %s (%s)", _name(remote_pod), self.verdict.kind, self.verdict.message)
        if self.verdict.succeeded:
            if provider_error is not None:
                raise provider_error
            return
        raise error_for(self.verdict, pod_name=_name(remote_pod), hint=self.failure_hint) from provider_error

    def _read_final(self, remote_pod: k8s.V1Pod) -> k8s.V1Pod | None:
        """The pod as the API has it now; ``None`` when it no longer exists."""
        try:
            return self.pod_manager.read_pod(remote_pod)
        except ApiException as exc:
            if exc.status == 404:
                return None
            self.log.warning("could not read pod %s again (%s); classifying what was seen", _name(remote_pod), exc)
        except Exception as exc:
            self.log.warning("could not read pod %s again (%s); classifying what was seen", _name(remote_pod), exc)
        return remote_pod


def pod_kwargs(
    *,
    image: str,
    base_uri: str,
    team: str,
    project: str,
    command: Sequence[str] | None = None,
    data: str = "",
    gpus: int = 1,
    gpu_type: str = "",
    cpu: str = "4",
    memory: str = "16Gi",
    cpu_limit: str | None = None,
    memory_limit: str | None = None,
    grace_seconds: int = 30,
    data_cache_size: str = "100Gi",
    data_pvc: str | None = None,
    shm_size: str = "8Gi",
    read_only_root: bool = False,
    namespace: str = "default",
    service_account: str | None = None,
    secrets: Sequence[Secret] = (),
    env: Mapping[str, str] | None = None,
    node_selector: Mapping[str, str] | None = None,
    tolerations: Sequence[k8s.V1Toleration] = (),
    schedule_timeout_seconds: int = 1800,
    startup_timeout_seconds: int = 900,
    retries: int = 3,
    retry_delay: timedelta = timedelta(seconds=30),
    failure_hint: str = "",
    **extra: Any,
) -> dict[str, Any]:
    """The keyword arguments of a :class:`PodtrainPodOperator` for the podtrain image: for ``podtrain_pod`` or
    ``PodtrainPodOperator.partial(task_id=..., **pod_kwargs(...)).expand_kwargs(trials)``. ``command`` is the
    training command, given to the image's entrypoint as the container's args. ``extra`` goes to the operator as
    given (``trial``, ``max_active_tis_per_dag``, ``pool``, ``labels``, ...)."""
    if not isinstance(grace_seconds, int) or grace_seconds < 1:
        raise ValueError(f"grace_seconds must be a whole number of seconds >= 1, not {grace_seconds!r}")
    if not isinstance(gpus, int) or gpus < 0:
        raise ValueError(f"gpus must be a whole number >= 0, not {gpus!r}")
    for what, value in {
        "cpu": cpu,
        "memory": memory,
        "cpu_limit": cpu_limit,
        "memory_limit": memory_limit,
        "data_cache_size": data_cache_size,
        "shm_size": shm_size,
    }.items():
        if value is not None and "{{" not in str(value):
            try:
                parse_quantity(value)
            except ValueError as exc:
                raise ValueError(f"{what}={value!r} is not a Kubernetes quantity (e.g. '8', '500m', '64Gi')") from exc

    limits = {"cpu": cpu_limit, "memory": memory_limit or memory}
    if gpus:
        limits[GPU_RESOURCE] = str(gpus)
    selector = dict(node_selector or {})
    tolerate = list(tolerations)
    if gpus:
        if gpu_type:
            selector.setdefault(GPU_PRODUCT_LABEL, gpu_type)
        tolerate.append(k8s.V1Toleration(key=GPU_RESOURCE, operator="Exists", effect="NoSchedule"))

    data_source = (
        k8s.V1Volume(name="data", persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(claim_name=data_pvc))
        if data_pvc
        else k8s.V1Volume(name="data", empty_dir=k8s.V1EmptyDirVolumeSource(size_limit=data_cache_size))
    )
    volumes = [
        data_source,
        k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory", size_limit=shm_size)),
    ]
    mounts = [
        k8s.V1VolumeMount(name="data", mount_path="/data"),
        k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm"),  # noqa: S108  (the container's shared memory)
    ]
    if read_only_root:  # what the image writes besides /data: the output, the caches, temporary files
        for name, path in READ_ONLY_ROOT_WRITABLE.items():
            volumes.append(k8s.V1Volume(name=name, empty_dir=k8s.V1EmptyDirVolumeSource()))
            mounts.append(k8s.V1VolumeMount(name=name, mount_path=path))
    env_vars = [k8s.V1EnvVar(name=k, value=str(v)) for k, v in (env or {}).items()]
    env_vars += [
        k8s.V1EnvVar(name="PODTRAIN_GRACE_SECONDS", value=str(grace_seconds)),
        k8s.V1EnvVar(
            name="PODTRAIN_NODE_NAME",
            value_from=k8s.V1EnvVarSource(field_ref=k8s.V1ObjectFieldSelector(field_path="spec.nodeName")),
        ),
    ]
    seccomp = k8s.V1SeccompProfile(type="RuntimeDefault")
    if command is not None:  # a sweep gives each trial's `arguments` through expand_kwargs instead
        extra = {"arguments": list(command), **extra}
    return {
        "image": image,
        "base_uri": base_uri,
        "data_uri": data,
        "team": team,
        "project": project,
        "gpu_request": f"{gpus} x {GPU_RESOURCE}" + (f" ({gpu_type})" if gpu_type else "") if gpus else "",
        "failure_hint": failure_hint,
        "namespace": namespace,
        "container_resources": k8s.V1ResourceRequirements(
            requests={"cpu": cpu, "memory": memory},
            limits={k: v for k, v in limits.items() if v is not None},
        ),
        "node_selector": selector,
        "tolerations": tolerate,
        "volumes": volumes,
        "volume_mounts": mounts,
        "env_vars": env_vars,
        "secrets": list(secrets),
        "service_account_name": service_account,
        "security_context": k8s.V1PodSecurityContext(
            run_as_non_root=True, run_as_user=UID, run_as_group=UID, fs_group=UID, seccomp_profile=seccomp
        ),
        "container_security_context": k8s.V1SecurityContext(
            allow_privilege_escalation=False,
            capabilities=k8s.V1Capabilities(drop=["ALL"]),
            read_only_root_filesystem=read_only_root or None,
            run_as_non_root=True,
            seccomp_profile=seccomp,
        ),
        "termination_grace_period": grace_seconds,
        "termination_message_policy": "FallbackToLogsOnError",
        "get_logs": True,
        "on_finish_action": "delete_pod",
        "schedule_timeout_seconds": schedule_timeout_seconds,
        "startup_timeout_seconds": startup_timeout_seconds,
        "deferrable": False,
        "retries": retries,
        "retry_delay": retry_delay,
        "retry_policy": retry_policy(),
        **extra,
    }


def podtrain_pod(task_id: str, **kwargs: Any) -> PodtrainPodOperator:
    """A :class:`PodtrainPodOperator` named ``task_id``, built from :func:`pod_kwargs`' arguments."""
    return PodtrainPodOperator(task_id=task_id, **pod_kwargs(**kwargs))


def preflight_kwargs(gpus: int) -> dict[str, Any]:
    """What a preflight changes in :func:`pod_kwargs`' arguments: its command under ``tini`` alone, a small pod,
    the preflight's classification and hint, fewer retries."""
    return {
        "command": preflight_command(gpus),
        "cmds": list(PREFLIGHT_ENTRYPOINT),
        "preflight": True,
        "trial": "preflight",
        "cpu": "1",
        "memory": "4Gi",
        "shm_size": "1Gi",
        "data_cache_size": "1Gi",
        "retries": 2,
        "failure_hint": PREFLIGHT_HINT,
    }


def preflight_pod(task_id: str = "gpu_preflight", **kwargs: Any) -> PodtrainPodOperator:
    """A small pod with the training pods' GPU request, selector and tolerations that runs ``nvidia-smi`` and
    ``podtrain smoke`` (torch sees the GPU, CUDA and driver versions, a matmul, NCCL): run it before training so a
    wrong node pool fails in minutes, with a message naming the likely cause. It runs under ``tini`` alone (not
    ``podtrain run``: smoke's termination message is the cause the classifier reports, and the preflight keeps no
    run record). ``kwargs`` as for :func:`pod_kwargs` (the shared ones: image, base URI, GPUs, ...)."""
    return podtrain_pod(task_id, **{**preflight_kwargs(kwargs.get("gpus", 1)), **kwargs})


def _env_list(env: Any) -> list[k8s.V1EnvVar]:
    if isinstance(env, dict):
        return [k8s.V1EnvVar(name=k, value=v) for k, v in env.items()]
    return list(env or [])


def _name(pod: k8s.V1Pod | None) -> str:
    return pod.metadata.name if pod is not None and pod.metadata is not None else "?"

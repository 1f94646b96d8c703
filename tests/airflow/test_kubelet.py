"""The kubelet half of the test Kubernetes (``_kubelet.py``, ``_kubecontainer.py``) through the official
``kubernetes`` client: pods as local processes, their phase, exit code and log, followed logs, termination
messages, the image's entrypoint, env, Secrets and volumes mapped to local paths, the process group killed on
stop, and the training environment's ``podtrain run --`` as an image's entrypoint."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

kubernetes = pytest.importorskip("kubernetes")
from kubeapi import KubeAPIServer  # noqa: E402
from kubernetes import client as k8s  # noqa: E402
from kubernetes.client.rest import ApiException  # noqa: E402
from test_kubeapi import NS, condition, pod_body, read_log, terminated, wait_phase  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def test_failing_pod_reports_exit_code_and_log(kube: KubeAPIServer, api: k8s.CoreV1Api) -> None:
    """A container that prints and exits 3 ends Failed, exit code 3, reason Error, its output as the log."""
    created = api.create_namespaced_pod(NS, pod_body("fails", "echo hello; exit 3"))
    assert created.metadata.uid and created.spec.node_name == kube.node_name
    pod = wait_phase(api, "fails", "Succeeded", "Failed")
    assert pod.status.phase == "Failed"
    term = terminated(pod)
    assert (term.exit_code, term.reason) == (3, "Error")
    assert term.message is None  # policy File and nothing written
    assert read_log(api, "fails") == "hello\n"
    assert condition(pod, "Ready").status == "False"
    assert condition(pod, "PodScheduled").status == "True"


def test_succeeding_pod(api: k8s.CoreV1Api) -> None:
    """A container that exits 0 ends Succeeded, reason Completed, Ready False with reason PodCompleted."""
    api.create_namespaced_pod(NS, pod_body("works", "echo ok"))
    pod = wait_phase(api, "works", "Succeeded", "Failed")
    assert pod.status.phase == "Succeeded"
    term = terminated(pod)
    assert (term.exit_code, term.reason) == (0, "Completed")
    assert term.started_at is not None and term.finished_at is not None
    assert condition(pod, "Ready").reason == "PodCompleted"
    assert pod.status.container_statuses[0].container_id.startswith("containerd://")


def test_follow_log_streams_while_running(api: k8s.CoreV1Api) -> None:
    """A followed log (timestamps=true) yields lines while the container runs and ends when it exits."""
    api.create_namespaced_pod(NS, pod_body("talks", "echo one; sleep 0.6; echo two; sleep 0.3; echo three"))
    wait_phase(api, "talks", "Running", "Succeeded")
    resp = api.read_namespaced_pod_log(
        "talks", NS, container="base", follow=True, timestamps=True, _preload_content=False
    )
    seen: list[tuple[float, bytes]] = []
    for chunk in resp.stream(amt=None, decode_content=True):
        seen.append((time.monotonic(), chunk))
    end = time.monotonic()
    text = b"".join(c for _, c in seen).decode()
    lines = text.splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == ["one", "two", "three"]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z", line.split(" ", 1)[0]) for line in lines)
    assert len(seen) >= 2 and end - seen[0][0] > 0.5  # "one" came long before the stream ended
    assert terminated(api.read_namespaced_pod("talks", NS)).exit_code == 0
    # since_seconds keeps only what is recent; a log of a pod still creating is a 400
    assert read_log(api, "talks", since_seconds=3600).count("\n") == 3
    assert read_log(api, "talks", tail_lines=1) == "three\n"


def test_termination_message_from_file(api: k8s.CoreV1Api) -> None:
    """The file the container writes at PODTRAIN_TERMINATION_LOG is the terminated state's message."""
    script = 'echo noise; printf \'{"outcome": "succeeded"}\' > "$PODTRAIN_TERMINATION_LOG"'
    api.create_namespaced_pod(NS, pod_body("says", script, policy="FallbackToLogsOnError"))
    pod = wait_phase(api, "says", "Succeeded", "Failed")
    assert json.loads(terminated(pod).message) == {"outcome": "succeeded"}


def test_fallback_to_logs_on_error(api: k8s.CoreV1Api) -> None:
    """FallbackToLogsOnError: a failed container with no message file gets the tail of its log as message."""
    script = "for i in $(seq 1 100); do echo line-$i; done; echo boom >&2; exit 1"
    api.create_namespaced_pod(NS, pod_body("falls", script, policy="FallbackToLogsOnError"))
    message = terminated(wait_phase(api, "falls", "Failed")).message
    lines = message.splitlines()
    assert lines[-1] == "boom" and len(lines) == 80 and lines[0] == "line-22"
    # the same failure under the default policy (File) has no message
    api.create_namespaced_pod(NS, pod_body("quiet", script))
    assert terminated(wait_phase(api, "quiet", "Failed")).message is None


def test_image_entrypoint_env_and_secrets(kube: KubeAPIServer, api: k8s.CoreV1Api) -> None:
    """No command: the image's mapped entrypoint + args; env from value, $(VAR), fieldRef and secretKeyRef."""
    kube.add_secret(NS, "creds", {"token": "s3cr3t"})
    env = [
        {"name": "PLAIN", "value": "plain"},
        {"name": "DERIVED", "value": "$(PLAIN)-more"},
        {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
    ]
    api.create_namespaced_pod(
        NS, pod_body("mapped", image="sh:test", args=['echo "$DERIVED $NODE $POD $TOKEN"'], env=env)
    )
    wait_phase(api, "mapped", "Succeeded")
    assert kube.log_text(NS, "mapped") == f"plain-more {kube.node_name} mapped s3cr3t\n"

    # an image with no entrypoint mapping and no command never starts; a missing secret neither
    api.create_namespaced_pod(NS, pod_body("noimage", image="unknown:1"))
    missing = [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k"}}}]
    api.create_namespaced_pod(NS, pod_body("nosecret", "true", env=missing))
    for name, reason in (("noimage", "ErrImageNeverPull"), ("nosecret", "CreateContainerConfigError")):
        kube.wait_for(
            lambda n=name: (
                "waiting" in kube.pod(NS, n)["status"]["containerStatuses"][0]["state"]
                and kube.pod(NS, n)["status"]["containerStatuses"][0]["state"]["waiting"]["reason"]
                != "ContainerCreating"
            ),
            what=f"{name} to be stuck",
        )
        pod = api.read_namespaced_pod(name, NS)
        assert pod.status.phase == "Pending"
        assert pod.status.container_statuses[0].state.waiting.reason == reason
        with pytest.raises(ApiException) as err:
            read_log(api, name)
        assert err.value.status == 400
        api.delete_namespaced_pod(name, NS)
    kube.wait_for(lambda: len(kube.pods(NS)) == 1, timeout=5, what="stuck pods to go")


def test_image_cmd_env_and_workdir() -> None:
    """An image mapped with entrypoint/cmd/env/workdir: CMD runs unless args replace it, ENV and WORKDIR apply."""
    image = {
        "entrypoint": ["sh", "-c"],
        "cmd": ['echo "cmd $GREETING $DATA $PWD"'],
        "env": {"GREETING": "hi", "DATA": "/data/in"},
        "workdir": "/data",
    }
    with KubeAPIServer(images={"app:test": image}) as kube:
        cfg = k8s.Configuration()
        cfg.host = kube.url
        api = k8s.CoreV1Api(k8s.ApiClient(cfg))
        volumes = [{"name": "data", "emptyDir": {}}]
        mounts = [{"name": "data", "mountPath": "/data"}]
        api.create_namespaced_pod(NS, pod_body("cmd", image="app:test", volumes=volumes, mounts=mounts))
        args = ['echo "args $GREETING"']
        api.create_namespaced_pod(NS, pod_body("args", image="app:test", args=args, volumes=volumes, mounts=mounts))
        wait_phase(api, "cmd", "Succeeded")
        wait_phase(api, "args", "Succeeded")
        local = kube.pod_dir(NS, "cmd") / "volumes" / "data"
        assert kube.log_text(NS, "cmd") == f"cmd hi {local}/in {local}\n"
        assert kube.log_text(NS, "args") == "args hi\n"


def test_volume_mount_paths_are_local(kube: KubeAPIServer, api: k8s.CoreV1Api) -> None:
    """A mounted emptyDir is a local directory; env values and args naming the mount path point there."""
    volumes = [{"name": "data", "emptyDir": {}}, {"name": "tok", "secret": {"secretName": "creds"}}]
    mounts = [{"name": "data", "mountPath": "/data"}, {"name": "tok", "mountPath": "/var/run/tok"}]
    kube.add_secret(NS, "creds", {"token": "abc"})
    env = [{"name": "OUT", "value": "/data/out.txt"}, {"name": "URI", "value": "file:///data/x"}]
    script = 'echo written > "$OUT"; echo "$URI"; cat /var/run/tok/token; echo; echo "$1"'
    body = pod_body("vol", None, env=env, volumes=volumes, mounts=mounts)
    body["spec"]["containers"][0]["command"] = ["sh", "-c", script, "sh", "--dir=/data"]
    api.create_namespaced_pod(NS, body)
    pod = wait_phase(api, "vol", "Succeeded", "Failed")
    local = kube.pod_dir(NS, "vol") / "volumes" / "data"
    lines = kube.log_text(NS, "vol").splitlines()
    assert lines[0] == f"file://{local}/x"
    assert lines[-1] == f"--dir={local}"
    assert (local / "out.txt").read_text() == "written\n"
    assert pod.status.phase == "Succeeded"
    assert lines[1] == "abc"  # the secret volume's file, through the path rewritten in the script
    assert (kube.pod_dir(NS, "vol") / "volumes" / "tok" / "token").read_text() == "abc"


def test_stop_kills_every_process_group(tmp_path: Path) -> None:
    """Stopping the server kills the process group of a pod still running (children included)."""
    with KubeAPIServer() as kube:
        cfg = k8s.Configuration()
        cfg.host = kube.url
        api = k8s.CoreV1Api(k8s.ApiClient(cfg))
        api.create_namespaced_pod(NS, pod_body("forever", f"sleep 300 & echo $! > {tmp_path}/child; wait"))
        kube.wait_for(
            lambda: (tmp_path / "child").exists() and (tmp_path / "child").read_text().strip() != "",
            what="the child to start",
        )
        leader = kube.pid(NS, "forever")
    child = int((tmp_path / "child").read_text())
    for pid in (leader, child):
        assert not alive(pid), pid


def alive(pid: int | None) -> bool:
    """Whether the process exists and is not a zombie (PID 1 here may never reap one)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_podtrain_entrypoint_preempted(tmp_path: Path) -> None:
    """The image's entrypoint mapped to the local ``podtrain run --``: preempted, it reports exit 75 + JSON."""
    python = REPO / ".venv" / "bin" / "python"
    if not python.exists():
        pytest.skip("the training environment (.venv) is not built")
    images = {"podtrain:test": [str(python), "-m", "entrypoint", "run", "--"]}
    with KubeAPIServer(images=images, extra_env={"PYTHONPATH": str(REPO)}) as kube:
        env = [{"name": "PODTRAIN_RUN_ID", "value": "r1"}, {"name": "PODTRAIN_GRACE_SECONDS", "value": "5"}]
        body = pod_body(
            "train",
            image="podtrain:test",
            env=env,
            grace=10,
            args=["sh", "-c", "echo ready; while :; do sleep 0.05; done"],
        )
        kube.api_create(NS, body)
        kube.wait_for(lambda: "ready" in kube.log_text(NS, "train"), what="the child to start")
        final = kube.preempt(NS, "train")
    term = final["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 75
    record = json.loads(term["message"])
    assert (record["outcome"], record["exit_code"], record["run_id"]) == ("preempted", 75, "r1")

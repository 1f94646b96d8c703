"""The test kubelet's podman runtime (``_kubepodman.py``) as a translation: a pod spec in, ``podman run``'s argv and
environment out. No podman runs here (that is ``test_e2e_image.py``, ``make image-test``): these pin what each
field of the spec becomes, so a spec the image tests pass is the spec the translation understood."""

from __future__ import annotations

import os
import signal
import stat
from pathlib import Path
from typing import Any

import pytest
from _kubecontainer import ContainerWaiting
from _kubeobjects import Cluster, Node, Pod
from _kubepodman import Podman

IMAGE = "localhost/podtrain-example:0.1.0-cpu"
FS_GROUP = 4242 if os.geteuid() == 0 else os.getgid()  # only root may give a folder another group


def pod_obj(container: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "train-abc", "namespace": "default", "uid": "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"},
        "spec": {"containers": [{"name": "base", "image": "podtrain:test", **container}], **spec},
        "status": {},
    }


def translate(tmp_path: Path, obj: dict[str, Any], **runtime: Any) -> tuple[list[str], dict[str, str], Path]:
    cluster = Cluster(Node(name="gpu-node-1", directory=tmp_path / "node"))
    cluster.secrets[("default", "s3")] = {"AWS_SECRET_ACCESS_KEY": "s3cr3t"}
    pod = Pod(obj, tmp_path / "pod")
    pod.dir.mkdir(parents=True)
    argv, env, _, term = Podman(images={"podtrain:test": IMAGE}, **runtime).prepare(cluster, pod)
    return argv, env, term


def flag_values(argv: list[str], flag: str) -> list[str]:
    return [argv[n + 1] for n, a in enumerate(argv) if a == flag]


def test_the_restricted_read_only_pod_becomes_user_group_read_only_and_dropped_capabilities(tmp_path: Path) -> None:
    """runAsUser/Group, fsGroup, readOnlyRootFilesystem (without podman's own tmpfs), no privilege escalation and
    dropped capabilities reach ``podman run``; the image's ENTRYPOINT stays (no --entrypoint) and args follow it."""
    obj = pod_obj(
        {
            "args": ["python", "/app/train.py", "--steps", "$(STEPS)"],
            "env": [{"name": "STEPS", "value": "40"}],
            "securityContext": {
                "readOnlyRootFilesystem": True,
                "allowPrivilegeEscalation": False,
                "capabilities": {"drop": ["ALL"]},
                "seccompProfile": {"type": "RuntimeDefault"},
            },
        },
        securityContext={"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000},
    )
    argv, _, _ = translate(tmp_path, obj)
    assert argv[:3] == ["podman", "--storage-driver", "overlay"] and argv[3] == "run"
    assert flag_values(argv, "--user") == ["1000:1000"] and flag_values(argv, "--group-add") == ["1000"]
    assert "--read-only" in argv and "--read-only-tmpfs=false" in argv
    assert flag_values(argv, "--security-opt") == ["no-new-privileges"] and "--cap-drop=ALL" in argv
    assert "--entrypoint" not in argv
    assert argv[argv.index(IMAGE) :] == [IMAGE, "python", "/app/train.py", "--steps", "40"]
    assert flag_values(argv, "--network") == ["host"] and flag_values(argv, "--pull") == ["never"]


def test_volumes_are_bind_mounts_writable_by_fs_group_and_shm_is_its_size(tmp_path: Path) -> None:
    """An emptyDir is a local folder mounted at its path, mode 2777 and group fsGroup as the kubelet leaves it; a
    readOnly mount is ``:ro``; a memory-backed emptyDir at /dev/shm is ``--shm-size``; the termination-message
    file is a local file mounted at terminationMessagePath, writable by the container's user."""
    obj = pod_obj(
        {
            "volumeMounts": [
                {"name": "data", "mountPath": "/data"},
                {"name": "dshm", "mountPath": "/dev/shm"},
                {"name": "keys", "mountPath": "/keys", "readOnly": True},
            ],
            "terminationMessagePath": "/run/podtrain/message",
        },
        securityContext={"fsGroup": FS_GROUP},
        volumes=[
            {"name": "data", "emptyDir": {"sizeLimit": "1Gi"}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}},
            {"name": "keys", "emptyDir": {}},
        ],
    )
    argv, _, term = translate(tmp_path, obj)
    volumes = dict(v.split(":", 1)[::-1] for v in flag_values(argv, "--volume") if not v.endswith(":ro"))
    read_only = [v for v in flag_values(argv, "--volume") if v.endswith(":ro")]
    data = Path(volumes["/data"])
    assert data.is_dir() and stat.S_IMODE(data.stat().st_mode) == 0o2777 and data.stat().st_gid == FS_GROUP
    assert read_only == [f"{tmp_path / 'pod' / 'volumes' / 'keys'}:/keys:ro"]
    assert flag_values(argv, "--shm-size") == ["8g"] and "/dev/shm" not in volumes
    assert volumes["/run/podtrain/message"] == str(term) and stat.S_IMODE(term.stat().st_mode) == 0o666


def test_env_goes_by_name_with_secrets_and_the_downward_api_resolved(tmp_path: Path) -> None:
    """The container's env (values, a Secret key, spec.nodeName) and the runtime's own env are handed to podman by
    name only: no value, a secret least of all, is on the command line; the values are in podman's environment."""
    obj = pod_obj(
        {
            "env": [
                {"name": "PODTRAIN_GRACE_SECONDS", "value": "20"},
                {
                    "name": "AWS_SECRET_ACCESS_KEY",
                    "valueFrom": {"secretKeyRef": {"name": "s3", "key": "AWS_SECRET_ACCESS_KEY"}},
                },
                {"name": "PODTRAIN_NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            ]
        }
    )
    argv, env, _ = translate(tmp_path, obj, env={"NVIDIA_VISIBLE_DEVICES": "0"})
    named = {a.removeprefix("--env=") for a in argv if a.startswith("--env=")}
    assert named == {"NVIDIA_VISIBLE_DEVICES", "PODTRAIN_GRACE_SECONDS", "AWS_SECRET_ACCESS_KEY", "PODTRAIN_NODE_NAME"}
    assert not [a for a in argv if "s3cr3t" in a]
    assert (env["AWS_SECRET_ACCESS_KEY"], env["PODTRAIN_NODE_NAME"], env["PODTRAIN_GRACE_SECONDS"]) == (
        "s3cr3t",
        "gpu-node-1",
        "20",
    )


def test_a_command_replaces_the_entrypoint_and_injected_files_are_read_only(tmp_path: Path) -> None:
    """A container ``command`` is podman's ``--entrypoint`` (its first word; the rest go before ``args``), as
    Kubernetes replaces the image's ENTRYPOINT; files the node injects (nvidia-smi) are mounted read-only."""
    obj = pod_obj({"command": ["tini", "-g", "--"], "args": ["podtrain", "smoke"]})
    argv, _, _ = translate(tmp_path, obj, inject={"/usr/local/bin/nvidia-smi": "/opt/stub/nvidia-smi"})
    assert flag_values(argv, "--entrypoint") == ["tini"]
    assert argv[argv.index(IMAGE) :] == [IMAGE, "-g", "--", "podtrain", "smoke"]
    assert "/opt/stub/nvidia-smi:/usr/local/bin/nvidia-smi:ro" in flag_values(argv, "--volume")


def test_unknown_images_and_root_users_leave_the_container_waiting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An image the node does not hold waits with ErrImageNeverPull; runAsNonRoot with an image whose USER is root
    (checked with podman image inspect), or with runAsUser 0, waits with CreateContainerConfigError."""
    with pytest.raises(ContainerWaiting) as unknown:
        translate(tmp_path / "a", {**pod_obj({}), "spec": {"containers": [{"name": "base", "image": "other:1"}]}})
    assert unknown.value.reason == "ErrImageNeverPull"

    class Inspected:
        stdout = "root\n"

    monkeypatch.setattr(Podman, "run", lambda self, *args, **kwargs: Inspected())
    with pytest.raises(ContainerWaiting, match="non-numeric or root user") as root_image:
        translate(tmp_path / "b", pod_obj({}, securityContext={"runAsNonRoot": True}))
    assert root_image.value.reason == "CreateContainerConfigError"
    with pytest.raises(ContainerWaiting, match="breaks non-root policy"):
        translate(tmp_path / "c", pod_obj({}, securityContext={"runAsNonRoot": True, "runAsUser": 0}))


def test_signals_go_to_the_container_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM and SIGKILL are ``podman kill --signal`` to the pod's container (PID 1 inside it), named for the
    pod's uid; removal is forced and ignores a container that is already gone."""
    calls: list[tuple[str, ...]] = []
    monkeypatch.setattr(Podman, "run", lambda self, *args, **kwargs: calls.append(args))
    runtime = Podman(images={})
    pod = Pod(pod_obj({}), tmp_path)
    runtime.signal(pod, signal.SIGTERM)
    runtime.remove(pod)
    name = runtime.name(pod)
    assert name == "k8s_0f1e2d3c4b5a69788796a5b4"
    assert calls == [("kill", "--signal", "SIGTERM", name), ("rm", "--force", "--time", "0", "--ignore", name)]

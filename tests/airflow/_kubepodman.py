"""A real container runtime for the test kubelet: a pod's container runs in its image with podman, as containerd
would run it on a node, instead of as a local process (``_kubecontainer.py``).

What the kubelet gives the container, translated to ``podman run`` (the CRI's ``CreateContainer``):

* the image: the pod's ``image`` is looked up in :attr:`Podman.images` (the pod's name -> a local image built by
  ``make image``), pulled never; an image missing there waits with ``ErrImageNeverPull``.
* argv: no ``--entrypoint`` unless the container has a ``command``: the image's ENTRYPOINT (``tini -g --
  podtrain run --``) runs as PID 1, followed by the pod's ``args`` or else the image's CMD; ``$(VAR)`` expanded.
* identity: ``runAsUser``/``runAsGroup`` (container over pod) -> ``--user``; ``fsGroup`` -> ``--group-add`` and
  the group of every volume; ``runAsNonRoot`` with no ``runAsUser`` checks the image's ``USER`` is a non-zero
  number (else ``CreateContainerConfigError``, the kubelet's own check).
* hardening: ``readOnlyRootFilesystem`` -> ``--read-only`` with no tmpfs of podman's own (Kubernetes adds none);
  ``allowPrivilegeEscalation: false`` -> ``no-new-privileges``; ``capabilities`` -> ``--cap-drop``/``--cap-add``;
  seccomp ``RuntimeDefault`` is podman's default profile.
* volumes: every ``volumeMount`` is a bind mount of the local directory ``_kubecontainer`` makes for it (emptyDir,
  PVC, Secret, ConfigMap), mode 2777 and group ``fsGroup`` as the kubelet leaves an emptyDir; ``readOnly`` ->
  ``:ro``. An emptyDir with ``medium: Memory`` at ``/dev/shm`` is the container's ``--shm-size``.
* env: the container's ``env``/``envFrom`` as ``_kubecontainer`` resolves them (Secrets, fieldRefs), handed to
  podman by name only (values never on a command line), over the image's own ENV; ``HOSTNAME`` by
  ``--hostname``.
* names: the cluster's ``hosts`` (a JobSet's or headless Service's pod DNS names -> 127.0.0.1) as ``--add-host``,
  so a gang's pods find pod 0 by the name the pod spec gives, as cluster DNS would resolve it.
* the termination message: a local file bind-mounted at ``terminationMessagePath`` (default
  ``/dev/termination-log``), writable by the container's user, read by the kubelet when the container ends.
* signals: :meth:`Podman.signal` is ``podman kill --signal``, delivered to the container's PID 1 as the CRI's
  ``StopContainer`` delivers SIGTERM (then SIGKILL after the grace period; the kubelet keeps that clock).
* not translated: resource limits (no cgroup controllers are delegated here), the pod network (``--network host``,
  so the pod reaches the S3 server on 127.0.0.1), probes, init containers.

:attr:`Podman.inject` places host files in the container read-only, as a device plugin's runtime hook injects
``nvidia-smi`` and the driver's libraries into a GPU container.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _kubecontainer import ContainerWaiting, env_from, env_value, expand, volume_dirs
from _kubeobjects import DEFAULT_TERMINATION_MESSAGE_PATH, Cluster, Pod

_QUANTITY = re.compile(r"(\d+)(Ki|Mi|Gi|Ti|k|M|G|T)?")
_PODMAN_UNIT = {None: "b", "Ki": "k", "Mi": "m", "Gi": "g", "k": "k", "M": "m", "G": "g"}


@dataclass(frozen=True, kw_only=True)
class Podman:
    """podman as the node's container runtime (root, the storage ``make image`` built into)."""

    images: Mapping[str, str]
    storage_driver: str = "overlay"
    containers_conf: Path | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    inject: Mapping[str, str] = field(default_factory=dict)  # container path -> host file, read-only
    launched: list[list[str]] = field(default_factory=list)  # the argv of every container run, in order

    def command(self, *args: str) -> list[str]:
        return ["podman", "--storage-driver", self.storage_driver, *args]

    def process_env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.containers_conf is not None:
            env["CONTAINERS_CONF"] = str(self.containers_conf)
        return env

    def run(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(*args), env=self.process_env(), capture_output=True, text=True, check=check, timeout=timeout
        )

    def name(self, pod: Pod) -> str:
        return "k8s_" + pod.obj["metadata"]["uid"].replace("-", "")[:24]

    def prepare(self, cluster: Cluster, pod: Pod) -> tuple[list[str], dict[str, str], str, Path]:
        """argv (``podman run …``), its environment, cwd and the local termination-message file."""
        spec, c = pod.obj["spec"], pod.container
        image = self.images.get(c.get("image", ""))
        if image is None:
            raise ContainerWaiting(
                "ErrImageNeverPull", f'Container image "{c.get("image", "")}" is not present with pull policy of Never'
            )
        flags = ["run", "--name", self.name(pod), "--pull", "never", "--network", "host", "--rm"]
        flags += ["--hostname", spec.get("hostname") or pod.obj["metadata"]["name"]]
        flags += [f"--add-host={name}:{address}" for name, address in sorted(cluster.hosts.items())]
        flags += self._security(spec, c, image)
        flags += self._volumes(cluster, pod)
        term_file = pod.dir / "termination-log"
        term_file.write_bytes(b"")
        term_file.chmod(0o666)
        flags += ["--volume", f"{term_file}:{c.get('terminationMessagePath') or DEFAULT_TERMINATION_MESSAGE_PATH}"]

        container_env: dict[str, str] = dict(self.env)
        container_env.update(env_from(cluster, c, pod.obj["metadata"]["namespace"]))
        for var in c.get("env") or []:
            value = env_value(cluster, pod, var, container_env)
            if value is not None:
                container_env[var["name"]] = value
        flags += [f"--env={name}" for name in container_env]  # by name: the value comes from podman's environment
        if c.get("workingDir"):
            flags += ["--workdir", c["workingDir"]]
        command = [expand(a, container_env) for a in c.get("command") or []]
        args = [expand(a, container_env) for a in c.get("args") or []]
        if command:
            flags += ["--entrypoint", command[0]]
            args = command[1:] + args
        argv = self.command(*flags, image, *args)
        self.launched.append(argv)
        return argv, self.process_env() | container_env, str(pod.dir), term_file

    def _security(self, spec: Mapping[str, Any], c: Mapping[str, Any], image: str) -> list[str]:
        psc, csc = spec.get("securityContext") or {}, c.get("securityContext") or {}
        user, group = csc.get("runAsUser", psc.get("runAsUser")), csc.get("runAsGroup", psc.get("runAsGroup"))
        non_root = csc.get("runAsNonRoot", psc.get("runAsNonRoot"))
        if non_root and user is None:
            image_user = self.run("image", "inspect", "--format", "{{.Config.User}}", image).stdout.strip()
            uid = image_user.partition(":")[0]
            if not uid.isdigit() or int(uid) == 0:
                raise ContainerWaiting(
                    "CreateContainerConfigError",
                    f"container has runAsNonRoot and image has non-numeric or root user ({image_user or 'root'})",
                )
        if non_root and user is not None and int(user) == 0:
            raise ContainerWaiting("CreateContainerConfigError", "container's runAsUser breaks non-root policy")
        flags = []
        if user is not None:
            flags += ["--user", f"{user}:{group}" if group is not None else str(user)]
        if psc.get("fsGroup") is not None:
            flags += ["--group-add", str(psc["fsGroup"])]
        if csc.get("readOnlyRootFilesystem"):
            flags += ["--read-only", "--read-only-tmpfs=false"]
        if csc.get("allowPrivilegeEscalation") is False:
            flags += ["--security-opt", "no-new-privileges"]
        caps = csc.get("capabilities") or {}
        flags += [f"--cap-drop={cap}" for cap in caps.get("drop") or []]
        flags += [f"--cap-add={cap}" for cap in caps.get("add") or []]
        if (csc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type") == "Unconfined":
            flags += ["--security-opt", "seccomp=unconfined"]
        return flags

    def _volumes(self, cluster: Cluster, pod: Pod) -> list[str]:
        spec, c = pod.obj["spec"], pod.container
        fs_group = (spec.get("securityContext") or {}).get("fsGroup")
        volumes = {v.get("name"): v for v in spec.get("volumes") or []}
        flags = []
        for vm in c.get("volumeMounts") or []:
            empty = (volumes.get(vm.get("name")) or {}).get("emptyDir")
            if vm.get("mountPath") == "/dev/shm" and empty is not None and empty.get("medium") == "Memory":
                flags += ["--shm-size", _podman_size(empty.get("sizeLimit") or "64Mi")]
        read_only = {vm["mountPath"].rstrip("/"): bool(vm.get("readOnly")) for vm in c.get("volumeMounts") or []}
        for path, local in volume_dirs(cluster, pod).items():
            _volume_permissions(Path(local), fs_group)
            flags += ["--volume", f"{local}:{path}" + (":ro" if read_only.get(path) else "")]
        for path, host in self.inject.items():
            flags += ["--volume", f"{host}:{path}:ro"]
        return flags

    def signal(self, pod: Pod, sig: int) -> None:
        """``sig`` to the container's PID 1 (nothing when the container is already gone)."""
        self.run("kill", "--signal", signal.Signals(sig).name, self.name(pod), check=False, timeout=60)

    def remove(self, pod: Pod) -> None:
        """The container and whatever is left of it (``podman run --rm`` removes it when it ends on its own)."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.run("rm", "--force", "--time", "0", "--ignore", self.name(pod), check=False, timeout=60)


def _podman_size(quantity: str) -> str:
    m = _QUANTITY.fullmatch(str(quantity))
    if m is None or m.group(2) not in _PODMAN_UNIT:
        raise ContainerWaiting("CreateContainerConfigError", f"unsupported emptyDir sizeLimit {quantity!r}")
    return m.group(1) + _PODMAN_UNIT[m.group(2)]


def _volume_permissions(local: Path, fs_group: Any) -> None:
    """As the kubelet leaves an emptyDir: every user may write it; with ``fsGroup``, owned by that group, setgid."""
    if local.is_dir():
        if fs_group is not None:
            os.chown(local, -1, int(fs_group))
        local.chmod(0o2777 if fs_group is not None else 0o777)

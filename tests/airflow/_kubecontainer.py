"""What the kubelet gives a pod's one container (``spec.containers[0]``) before it starts it: argv, environment,
working directory, volumes as local directories and the local file behind the termination-message path.

This is the kubelet half's translation of a container spec onto this machine, cut from ``_kubelet.py`` (which
runs the result and reports what it did) because it is pure spec-to-local mapping: no process and no status.
A spec that cannot be run raises :class:`ContainerWaiting`, which leaves the container waiting with that reason.

* argv = the container's ``command`` + ``args`` (``$(VAR)`` expanded as Kubernetes does); without a ``command``
  the image's ENTRYPOINT comes from the node's ``images`` (image -> a dict with ``entrypoint``, ``cmd``, ``env``,
  ``workdir``), followed by the pod's ``args`` or else the image's ``cmd``. An image with no mapping and no
  ``command`` waits with reason ``ErrImageNeverPull``.
* cwd: the node's ``cwd``, default the pod's own directory; the container's ``workingDir`` or the image's
  ``workdir`` when a mount or ``paths`` maps it.
* env: ``PATH`` (the server's), ``HOSTNAME`` (``spec.hostname``, else the pod's name), ``HOME`` (the pod directory),
  then ``extra_env``, then the mapped image's ``env``, then the container's ``envFrom``/``env``: plain ``value``;
  ``valueFrom.fieldRef`` (``metadata.name``, ``metadata.namespace``, ``metadata.uid``, ``metadata.labels['k']``,
  ``metadata.annotations['k']``, ``spec.nodeName``, ``spec.serviceAccountName``, ``status.podIP``,
  ``status.hostIP``); ``valueFrom.secretKeyRef``/``configMapKeyRef`` and ``envFrom`` from the cluster's Secrets and
  ConfigMaps (a missing required key waits with ``CreateContainerConfigError``); ``resourceFieldRef`` gives the
  limit (or request) as written. ``env_overrides`` come last.
* volumes: every ``volumeMount`` (except under ``/dev``) is a local directory: ``emptyDir`` ->
  ``<pod dir>/volumes/<volume>``, a ``persistentVolumeClaim`` -> ``<server dir>/pvc/<namespace>/<claim>``
  (shared by every pod that mounts the claim, and kept across pods as a claim is), ``secret``/``configMap`` -> a
  directory holding one file per key. Env values and argv items that name a mount path (``/data``, ``/data/x``,
  ``--dir=/data``, ``file:///data/x``) are rewritten to the local directory (``extra_env`` and the image's
  ``env`` too), as are the node's ``paths`` (container path -> local path). In ``extra_env``, ``env_overrides``
  and ``paths``, ``{pod_dir}``, ``{pod_name}``, ``{namespace}`` are replaced.
* host names: a JobSet pod's DNS names (``<hostname>.<subdomain>``, with ``.<ns>.svc`` and
  ``.<ns>.svc.cluster.local``) resolve to 127.0.0.1, where every pod runs; there is no DNS, so the cluster's
  ``hosts`` table (filled by the JobSet controller, and from headless Services selecting a pod with a hostname and
  subdomain) is applied instead: a container env value or argv item (after
  ``$(VAR)`` expansion) holding such a name as a whole host token (``x.y``, ``--addr=x.y``, ``tcp://x.y:29500``)
  gets the address in its place. Only a container's own ``env`` and argv are rewritten, not ``extra_env``.
* the termination message: the container's ``terminationMessagePath`` (default ``/dev/termination-log``) is
  ``<pod dir>/termination-log``; ``PODTRAIN_TERMINATION_LOG`` is set to that file when the pod leaves it unset
  or sets it to ``terminationMessagePath``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from _kubeobjects import DEFAULT_TERMINATION_MESSAGE_PATH, Cluster, Pod


class ContainerWaiting(Exception):
    """The container cannot start: it stays ``waiting`` with this ``reason`` and ``message``."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


def prepare(cluster: Cluster, pod: Pod) -> tuple[list[str], dict[str, str], str, Path]:
    """argv, env, cwd and the local termination-message file of the pod's container (under ``cluster.cond``)."""
    node = cluster.node
    meta, c = pod.obj["metadata"], pod.container
    ns = meta["namespace"]
    fill = {"pod_dir": str(pod.dir), "pod_name": meta["name"], "namespace": ns}

    def subst(text: str) -> str:
        return text.format(**fill) if "{" in text else text

    mounts = volume_dirs(cluster, pod)  # container path -> local path
    mounts.update({k: subst(v) for k, v in node.paths.items()})
    term_path = c.get("terminationMessagePath") or DEFAULT_TERMINATION_MESSAGE_PATH
    term_file = pod.dir / "termination-log"
    term_file.write_bytes(b"")

    env: dict[str, str] = {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "HOSTNAME": pod.obj["spec"].get("hostname") or meta["name"],
        "HOME": str(pod.dir),
    }
    image = node.images.get(c.get("image", ""))
    env.update({k: _rewrite(subst(v), mounts) for k, v in node.extra_env.items()})
    if image is not None:
        env.update({k: _rewrite(subst(v), mounts) for k, v in (image.get("env") or {}).items()})
    env.update(env_from(cluster, c, ns))
    for var in c.get("env") or []:
        value = env_value(cluster, pod, var, env)
        if value is not None:
            env[var["name"]] = _resolve_hosts(_rewrite(value, mounts), cluster.hosts)
    if env.get("PODTRAIN_TERMINATION_LOG") in (None, term_path):
        env["PODTRAIN_TERMINATION_LOG"] = str(term_file)
    env.update({k: subst(v) for k, v in node.env_overrides.items()})

    command = list(c.get("command") or [])
    args = list(c.get("args") or [])
    if not command:  # the image's ENTRYPOINT, and its CMD unless the pod gives args
        if image is None:
            raise ContainerWaiting(
                "ErrImageNeverPull",
                f'Container image "{c.get("image", "")}" is not present with pull policy of Never '
                "(no local entrypoint is mapped for it)",
            )
        command = list(image.get("entrypoint") or [])
        if not args:
            args = list(image.get("cmd") or [])
    if not command + args:
        raise ContainerWaiting("CreateContainerError", "no command specified")
    argv = [_resolve_hosts(_rewrite(expand(a, env), mounts), cluster.hosts) for a in command + args]
    cwd = str(node.cwd) if node.cwd is not None else str(pod.dir)
    workdir = c.get("workingDir") or (image or {}).get("workdir")
    if workdir and _rewrite(workdir, mounts) != workdir:  # a container directory that is mapped here
        cwd = _rewrite(workdir, mounts)
    return argv, env, cwd, term_file


def env_from(cluster: Cluster, c: Mapping[str, Any], ns: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in c.get("envFrom") or []:
        prefix = source.get("prefix", "")
        for kind, store in (("secretRef", cluster.secrets), ("configMapRef", cluster.config_maps)):
            ref = source.get(kind)
            if ref is None:
                continue
            data = store.get((ns, ref.get("name", "")))
            if data is None:
                if ref.get("optional"):
                    continue
                what = "secret" if kind == "secretRef" else "configmap"
                raise ContainerWaiting("CreateContainerConfigError", f'{what} "{ref.get("name")}" not found')
            env.update({prefix + k: v for k, v in data.items()})
    return env


def env_value(cluster: Cluster, pod: Pod, var: Mapping[str, Any], env: Mapping[str, str]) -> str | None:
    if "value" in var and var["value"] is not None:
        return expand(str(var["value"]), env)
    source = var.get("valueFrom")
    if not source:
        return ""
    meta, ns = pod.obj["metadata"], pod.obj["metadata"]["namespace"]
    if "fieldRef" in source:
        path = source["fieldRef"].get("fieldPath", "")
        m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
        if m:
            return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
        value = {
            "metadata.name": meta["name"],
            "metadata.namespace": ns,
            "metadata.uid": meta["uid"],
            "spec.nodeName": cluster.node.name,
            "spec.serviceAccountName": pod.obj["spec"].get("serviceAccountName", "default"),
            "status.podIP": "127.0.0.1",
            "status.hostIP": "127.0.0.1",
        }.get(path)
        if value is None:
            raise ContainerWaiting("CreateContainerConfigError", f"unsupported fieldPath {path!r}")
        return value
    for kind, store, what in (
        ("secretKeyRef", cluster.secrets, "secret"),
        ("configMapKeyRef", cluster.config_maps, "configmap"),
    ):
        if kind in source:
            ref = source[kind]
            data = store.get((ns, ref.get("name", "")))
            if data is None or ref.get("key") not in data:
                if ref.get("optional"):
                    return None
                detail = (
                    f'{what} "{ref.get("name")}" not found'
                    if data is None
                    else f"couldn't find key {ref.get('key')} in {what.capitalize()} {ns}/{ref.get('name')}"
                )
                raise ContainerWaiting("CreateContainerConfigError", detail)
            return data[ref["key"]]
    if "resourceFieldRef" in source:
        resource = source["resourceFieldRef"].get("resource", "")
        kind, _, res = resource.partition(".")
        resources = pod.container.get("resources") or {}
        value = (resources.get(kind) or {}).get(res) or (resources.get("requests") or {}).get(res)
        return "0" if value is None else str(value)
    return ""


def volume_dirs(cluster: Cluster, pod: Pod) -> dict[str, str]:
    """Create the local directory of every volume mount; container path -> local path."""
    ns = pod.obj["metadata"]["namespace"]
    volumes = {v.get("name"): v for v in pod.obj["spec"].get("volumes") or []}
    mounts: dict[str, str] = {}
    for vm in pod.container.get("volumeMounts") or []:
        path = vm.get("mountPath", "")
        if not path or path == "/dev" or path.startswith("/dev/"):
            continue
        volume = volumes.get(vm.get("name")) or {}
        if "persistentVolumeClaim" in volume:
            claim = volume["persistentVolumeClaim"].get("claimName", vm["name"])
            local = cluster.node.directory / "pvc" / ns / claim
        else:
            local = pod.dir / "volumes" / vm["name"]
        local.mkdir(parents=True, exist_ok=True)
        for kind, store, key in (("secret", cluster.secrets, "secretName"), ("configMap", cluster.config_maps, "name")):
            if kind in volume:
                data = store.get((ns, volume[kind].get(key, ""))) or {}
                items = volume[kind].get("items")
                pairs = [(i["key"], i.get("path", i["key"])) for i in items] if items else [(k, k) for k in data]
                for k, rel in pairs:
                    if k in data:
                        (local / rel).parent.mkdir(parents=True, exist_ok=True)
                        (local / rel).write_text(data[k])
        target = local / vm["subPath"] if vm.get("subPath") else local
        mounts[path.rstrip("/") or "/"] = str(target)
    return mounts


_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: a defined variable is replaced, ``$$`` is ``$``, others stay."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _VAR_REF.sub(sub, text)


def _rewrite(text: str, mounts: Mapping[str, str]) -> str:
    """Replace container paths (``/data``, ``/data/x``, ``--d=/data``, ``file:///data``) with local ones."""
    for path in sorted(mounts, key=len, reverse=True):
        if path == "/":
            continue
        pattern = re.compile(r"(?:(?<=file://)|(?<![\w.\-/:~$]))" + re.escape(path) + r"(?=/|$|[^\w.\-])")
        text = pattern.sub(mounts[path].replace("\\", "\\\\"), text)
    return text


def _resolve_hosts(text: str, hosts: Mapping[str, str]) -> str:
    """Replace every name of ``hosts`` that stands in ``text`` as a whole host token with its address."""
    for name in sorted((h for h in hosts if h in text), key=len, reverse=True):
        text = re.sub(r"(?<![\w.-])" + re.escape(name) + r"(?![\w-]|\.[\w-])", hosts[name], text)
    return text

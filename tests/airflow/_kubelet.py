"""The kubelet half of the test Kubernetes: every scheduled pod's container runs as a local process, and what the
process does becomes the pod's status, log and termination message.

The API server half creates, patches and deletes objects and never touches a process; this half is the only
code that starts, signals and waits on one, and the only writer of container status. The halves meet in the
:class:`~_kubeobjects.Cluster`'s objects, as Kubernetes' API server and kubelet meet only in the API, so either
can be read without the other. ``_kubecontainer.py`` gives it the container's argv, env, cwd and volumes.

Per pod (one container is run: ``spec.containers[0]``; init containers and sidecars are not run, and no container
is restarted, as with ``restartPolicy: Never``):

* the process runs in its own session (so a signal reaches its whole group, as ``tini -g`` forwards it), with
  stdout and stderr together as the pod log. A container that cannot be configured stays waiting (the reason
  from :class:`~_kubecontainer.ContainerWaiting`); an argv whose program is missing ends as exit 128, reason
  ``StartError``.
* status: ``Pending`` (PodScheduled, container waiting ``ContainerCreating``) -> ``Running`` (all conditions True,
  ``state.running``) -> ``Succeeded`` (exit 0) / ``Failed``, ``state.terminated`` with ``exitCode`` (128 + N when
  a signal N ended the process), ``reason`` ``Completed``/``Error``, ``message``, ``startedAt``/``finishedAt``.
  A pod evicted (``status.reason: Evicted``) is ``Failed`` whatever its exit code.
* the termination message is the container's termination-message file (at most 4096 bytes) or, under
  ``terminationMessagePolicy: FallbackToLogsOnError`` when the file is empty and the container failed, the last
  80 lines of the log (at most 2048 bytes).
* termination (a delete, a preemption): SIGTERM to the process group, SIGKILL after the grace period; a pod that
  never started ends ``Failed`` with ``ContainerStatusUnknown``.
* the log as the API serves it (:meth:`Kubelet.log_chunks`): timestamps, since, tail, limit, and a followed log
  that ends when the container has terminated.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from _kubecontainer import ContainerWaiting, prepare
from _kubeobjects import CONTAINER_ID, Cluster, Pod, rfc3339, rfc3339_nano

MAX_TERMINATION_MESSAGE = 4096
FALLBACK_LOG_LINES = 80
FALLBACK_LOG_BYTES = 2048


class Kubelet:
    """Runs the pods of one :class:`~_kubeobjects.Cluster`; every method but :meth:`start`, :meth:`stop` and
    :meth:`log_chunks` is called with ``cluster.cond`` held."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster

    def admit(self, pod: Pod) -> None:
        """A pod just scheduled here: conditions not ready, its container waiting in ``ContainerCreating``."""
        self._set_conditions(pod, ready=False)
        self._container_status(pod, {"waiting": {"reason": "ContainerCreating"}}, ready=False, started=False)

    def start(self, pod: Pod) -> None:
        """Run the admitted pod in a thread (after the node's ``start_delay``)."""
        threading.Thread(target=self._run, args=(pod,), name=f"pod-{pod.key[1]}", daemon=True).start()

    def stop(self) -> None:
        """The node goes: the cluster is stopping, every process group still running is killed and reaped."""
        cluster = self.cluster
        with cluster.cond:
            cluster.stopping = True
            pods = list(cluster.all_pods)
            cluster.cond.notify_all()
        for pod in pods:
            pod.kill_requested.set()
            proc = pod.proc
            if proc is not None and proc.poll() is None:
                self._signal(pod, proc, signal.SIGKILL)
        for pod in pods:
            proc = pod.proc
            if proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)

    def terminate(self, pod: Pod, grace: float) -> None:
        """SIGTERM the process group now, SIGKILL after ``grace`` seconds (in a thread)."""
        cluster = self.cluster
        with cluster.cond:
            if pod.terminating or pod.finished:
                if grace == 0 and pod.proc is not None and pod.proc.poll() is None:
                    self._signal(pod, pod.proc, signal.SIGKILL)
                return
            pod.terminating = True
            cluster.event(pod, "Killing", f"Stopping container {pod.container['name']}")
            if not pod.started:  # never started: it will not start
                pod.kill_requested.set()
                if pod.stuck:
                    self._finish_unstarted(pod)
                cluster.cond.notify_all()
                return

        def kill() -> None:
            proc = pod.proc
            if proc is None:
                return
            if grace > 0:
                self._signal(pod, proc, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=grace)
            if proc.poll() is None:
                self._signal(pod, proc, signal.SIGKILL)

        pod.killer = threading.Thread(target=kill, name=f"kill-{pod.key[1]}", daemon=True)
        pod.killer.start()

    # ------------------------------------------------------------------------------------- running

    def _signal(self, pod: Pod, proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        """``sig`` to the container: its process group, or through the node's container runtime to its PID 1."""
        runtime = self.cluster.node.runtime
        if runtime is None:
            _killpg(proc, sig)
            return
        runtime.signal(pod, sig)
        if sig == signal.SIGKILL:
            _killpg(proc, sig)  # and the runtime's client

    def _run(self, pod: Pod) -> None:
        cluster = self.cluster
        if cluster.node.start_delay:
            pod.kill_requested.wait(cluster.node.start_delay)
        with cluster.cond:
            if pod.kill_requested.is_set() or cluster.stopping:
                self._finish_unstarted(pod)
                return
            try:
                runtime = cluster.node.runtime
                argv, env, cwd, term_file = (runtime.prepare if runtime else prepare)(cluster, pod)
            except ContainerWaiting as w:
                pod.stuck = True
                self._waiting(pod, w.reason, w.message)
                return
            image = pod.container.get("image", "")
            cluster.event(pod, "Pulled", f'Container image "{image}" already present on machine')
            cluster.event(pod, "Created", f"Created container: {pod.container['name']}")
            started_at = rfc3339()
            pod.started = True
            try:
                proc = subprocess.Popen(
                    argv,
                    env=env,
                    cwd=cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as e:
                cluster.event(pod, "Failed", f"Error: failed to create containerd task: {e}", "Warning")
                self._append_log(pod, f"exec {argv[0] if argv else ''!r}: {e.strerror or e}\n".encode())
                self._finish(
                    pod,
                    exit_code=128,
                    reason="StartError",
                    started_at=started_at,
                    term_file=term_file,
                    start_error=str(e),
                )
                return
            pod.proc = proc
            pod.started_ns = time.time_ns()
            cluster.event(pod, "Started", f"Started container {pod.container['name']}")
            pod.obj["status"]["phase"] = "Running"
            self._set_conditions(pod, ready=True)
            self._container_status(pod, {"running": {"startedAt": started_at}}, ready=True, started=True)
            cluster.touch(pod)
        reader = threading.Thread(target=self._read_output, args=(pod, proc), daemon=True)
        reader.start()
        code = proc.wait()
        _killpg(proc, signal.SIGKILL)  # what is left of the container's processes goes with it
        if cluster.node.runtime is not None:
            cluster.node.runtime.remove(pod)
        reader.join(timeout=5)
        exit_code = code if code >= 0 else 128 - code
        with cluster.cond:
            reason = "Completed" if exit_code == 0 else "Error"
            self._finish(pod, exit_code=exit_code, reason=reason, started_at=started_at, term_file=term_file)

    def _waiting(self, pod: Pod, reason: str, message: str, type_: str = "Warning") -> None:
        self._container_status(pod, {"waiting": {"reason": reason, "message": message}}, ready=False, started=False)
        text = f"Error: {reason}: {message}" if reason != "ErrImageNeverPull" else message
        self.cluster.event(pod, "Failed", text, type_)
        self.cluster.touch(pod)

    def _read_output(self, pod: Pod, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        with proc.stdout:
            for line in iter(proc.stdout.readline, b""):
                with self.cluster.cond:
                    self._append_log(pod, line)

    def _append_log(self, pod: Pod, line: bytes) -> None:
        pod.log.append((time.time_ns(), line))
        self.cluster.cond.notify_all()

    # ------------------------------------------------------------------------------------- status

    def _finish_unstarted(self, pod: Pod) -> None:
        pod.started = True
        pod.finished = True
        pod.finished_ns = time.time_ns()
        pod.obj["status"]["phase"] = "Failed"
        self._set_conditions(pod, ready=False, reason="PodFailed")
        self._container_status(
            pod,
            {
                "terminated": {
                    "exitCode": 137,
                    "reason": "ContainerStatusUnknown",
                    "message": "The container could not be located when the pod was terminated",
                    "startedAt": None,
                    "finishedAt": rfc3339(),
                }
            },
            ready=False,
            started=False,
        )
        self.cluster.done(pod)

    def _finish(
        self,
        pod: Pod,
        *,
        exit_code: int,
        reason: str,
        started_at: str,
        term_file: Path,
        start_error: str | None = None,
    ) -> None:
        message = start_error or _read_termination_message(term_file)
        policy = pod.container.get("terminationMessagePolicy", "File")
        if not message and exit_code != 0 and policy == "FallbackToLogsOnError":
            message = _tail(b"".join(line for _, line in pod.log))
        terminated: dict[str, Any] = {
            "exitCode": exit_code,
            "reason": reason,
            "startedAt": started_at,
            "finishedAt": rfc3339(),
            "containerID": pod.obj["metadata"]["annotations"][CONTAINER_ID],
        }
        if message:
            terminated["message"] = message
        evicted = pod.obj["status"].get("reason") == "Evicted"
        phase = "Succeeded" if exit_code == 0 and not evicted else "Failed"
        pod.obj["status"]["phase"] = phase
        self._set_conditions(pod, ready=False, reason="PodCompleted" if phase == "Succeeded" else "PodFailed")
        self._container_status(pod, {"terminated": terminated}, ready=False, started=False)
        pod.finished = True
        pod.finished_ns = time.time_ns()
        self.cluster.done(pod)

    def _set_conditions(self, pod: Pod, ready: bool, reason: str | None = None) -> None:
        stamp = rfc3339()
        status = pod.obj["status"]
        old = {c["type"]: c for c in status.get("conditions", [])}
        wanted = {
            "PodReadyToStartContainers": True,
            "Initialized": True,
            "Ready": ready,
            "ContainersReady": ready,
            "PodScheduled": True,
        }
        conds = [old["DisruptionTarget"]] if "DisruptionTarget" in old else []
        for type_, value in wanted.items():
            text = "True" if value else "False"
            prev = old.get(type_)
            cond = {
                "type": type_,
                "status": text,
                "lastProbeTime": None,
                "lastTransitionTime": prev["lastTransitionTime"] if prev and prev["status"] == text else stamp,
            }
            if not value and type_ in ("Ready", "ContainersReady"):
                cond["reason"] = reason or "ContainersNotReady"
                if reason is None:
                    cond["message"] = f"containers with unready status: [{pod.container['name']}]"
            conds.append(cond)
        status["conditions"] = conds

    def _container_status(self, pod: Pod, state: dict[str, Any], *, ready: bool, started: bool) -> None:
        c = pod.container
        status: dict[str, Any] = {
            "name": c["name"],
            "image": c.get("image", ""),
            "imageID": f"{c.get('image', '')}@sha256:{'0' * 64}" if "waiting" not in state else "",
            "ready": ready,
            "restartCount": 0,
            "started": started,
            "state": state,
            "lastState": {},
        }
        if "waiting" not in state:
            status["containerID"] = pod.obj["metadata"]["annotations"].get(CONTAINER_ID, "")
        pod.obj["status"]["containerStatuses"] = [status]

    # ------------------------------------------------------------------------------------- log

    def log_chunks(self, pod: Pod, opts: Mapping[str, Any]) -> Iterator[bytes]:
        """The pod log as the API sends it; a followed log ends when the container has terminated."""
        cluster = self.cluster

        def render(entries: Sequence[tuple[int, bytes]]) -> bytes:
            if opts["timestamps"]:
                return b"".join(rfc3339_nano(ts).encode() + b" " + line for ts, line in entries)
            return b"".join(line for _, line in entries)

        with cluster.cond:
            entries = [e for e in pod.log if opts["since_ns"] is None or e[0] >= opts["since_ns"]]
            if opts["tail"] is not None:
                entries = entries[-opts["tail"] :] if opts["tail"] > 0 else []
            index = len(pod.log)
        sent = 0
        limit = opts["limit"]
        first = render(entries)
        if first:
            if limit is not None:
                first = first[:limit]
            sent += len(first)
            yield first
        if not opts["follow"]:
            return
        while True:
            with cluster.cond:
                while len(pod.log) == index and not pod.finished and not cluster.stopping:
                    cluster.cond.wait(0.5)
                new = pod.log[index:]
                index = len(pod.log)
                over = (pod.finished or cluster.stopping) and not new
            if new:
                chunk = render(new)
                if limit is not None:
                    chunk = chunk[: max(0, limit - sent)]
                    if not chunk:
                        return
                sent += len(chunk)
                yield chunk
            if over:
                return


def _killpg(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _read_termination_message(path: Path) -> str:
    try:
        data = path.read_bytes()[:MAX_TERMINATION_MESSAGE]
    except OSError:
        return ""
    return data.decode(errors="replace")


def _tail(log: bytes) -> str:
    """FallbackToLogsOnError's message: the log's last 80 lines, at most 2048 bytes."""
    lines = log.splitlines(keepends=True)[-FALLBACK_LOG_LINES:]
    data = b"".join(lines)[-FALLBACK_LOG_BYTES:]
    return data.decode(errors="replace")

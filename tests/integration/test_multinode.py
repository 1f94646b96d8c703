"""Two pods of one job on 127.0.0.1, as a JobSet runs them: each ``podtrain run -- torchrun --nnodes=2
--node-rank=<i> --nproc-per-node=2 --master-addr=127.0.0.1 --master-port=<p> …`` (static rendezvous, gloo, CPU).

The subject is ``sharded_worker.py`` (FSDP2 over all 4 ranks, the public ``import sdk`` API). A preemption takes one
pod: SIGTERM reaches that pod's supervisor only, yet the whole gang must stop at one step, commit it once, and
both supervisors exit 75 within the grace period; the next attempt of both resumes and finishes bitwise as an
uninterrupted run. A pod that vanishes (SIGKILL of its whole process tree: its connections close) or stops
answering (SIGSTOP: they stay open, as when a node drops off the network) must not leave the other hanging in a
collective: it exits 75 within the grace period, naming the ranks that went silent; a retry on one pod resumes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from sdk.checkpoints.checkpointer import Checkpointer
from sdk.lifecycle import runrecord
from sdk.outcomes import EXIT_PREEMPTED
from tests.integration.test_ranks import _env as ranks_env
from tests.integration.test_sharded import _differences

WORKER = str(Path(__file__).with_name("sharded_worker.py"))
WATCHDOG = "200"  # a rank still alive after this long prints its stacks and exits (a hang fails, not stalls)
GRACE = 20.0  # PODTRAIN_GRACE_SECONDS of test_ranks' environment
STEPS = 60
EVERY = 4


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pod(node: int, port: int, out: Path, *, steps: int, sleep: float, nodes: int = 2) -> list[str]:
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={nodes}",
        f"--node-rank={node}",
        "--nproc-per-node=2",
        "--master-addr=127.0.0.1",
        f"--master-port={port}",
        WORKER,
        "--model",
        "fsdp",
        "--steps",
        str(steps),
        "--every",
        str(EVERY),
        "--sleep",
        str(sleep),
        "--out",
        str(out),
        "--watchdog",
        WATCHDOG,
    ]
    return [sys.executable, "-m", "entrypoint", "run", "--", *torchrun]


def _env(tmp: Path, attempt: int, uri: str, node: int) -> dict[str, str]:
    return {
        **ranks_env(tmp, attempt, uri, run_id="multinode"),
        "PODTRAIN_TERMINATION_LOG": str(_message(tmp, attempt, node)),
        "JOB_COMPLETION_INDEX": str(node),  # as an Indexed Job (a JobSet) numbers its pods
    }


def _message(tmp: Path, attempt: int, node: int) -> Path:
    return tmp / f"termination-{attempt}-pod{node}"


@contextmanager
def _gang(
    tmp: Path, uri: str, attempt: int, *, steps: int, sleep: float, nodes: int = 2
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Both pods of one attempt, each its own session (a pod's process tree), output in a file per pod."""
    port, out = _free_port(), tmp / f"attempt-{attempt}"
    pods: list[subprocess.Popen[bytes]] = []
    try:
        for node in range(nodes):
            with (tmp / f"attempt-{attempt}-pod{node}.log").open("w") as sink:
                pods.append(
                    subprocess.Popen(
                        _pod(node, port, out, steps=steps, sleep=sleep, nodes=nodes),
                        env=_env(tmp, attempt, uri, node),
                        start_new_session=True,
                        stdout=sink,
                        stderr=subprocess.STDOUT,
                    )
                )
        yield pods
    finally:
        for pod in pods:
            if pod.poll() is None:
                _vanish(pod)
                pod.wait()


def _tree(pid: int) -> list[int]:
    """``pid`` and every process below it (torchrun starts each worker in a session of its own, so a pod's
    processes share no process group: a vanished pod is its whole tree)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], []))
    return tree


def _vanish(pod: subprocess.Popen[bytes]) -> None:
    """SIGKILL every process of the pod at once, as a node that is gone."""
    for pid in _tree(pod.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue


def _logs(tmp: Path, attempt: int) -> str:
    logs = sorted(tmp.glob(f"attempt-{attempt}-pod*.log"))
    return "\n".join(f"--- {log.stem}:\n" + log.read_text(errors="replace")[-4000:] for log in logs)


def _wait_for_a_checkpoint(tmp: Path, ckpt: Path, attempt: int, pods: list[subprocess.Popen[bytes]]) -> None:
    give_up = time.monotonic() + 180
    while not list(ckpt.glob("step-*/MANIFEST.json")):
        if any(pod.poll() is not None for pod in pods):
            pytest.fail(f"a pod ended before any checkpoint:\n{_logs(tmp, attempt)}")
        assert time.monotonic() < give_up, "no checkpoint within 180 s"
        time.sleep(0.1)
    time.sleep(0.4)  # a few steps past the first policy save


def _state(out: Path, name: str) -> dict[str, Any]:
    return dict(torch.load(out / f"{name}.pt", weights_only=True))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The gathered final state of an uninterrupted run of the same two pods."""
    tmp = tmp_path_factory.mktemp("reference")
    with _gang(tmp, (tmp / "ckpt").as_uri(), 1, steps=STEPS, sleep=0.0) as pods:
        codes = [pod.wait(timeout=240) for pod in pods]
    assert codes == [0, 0], _logs(tmp, 1)
    return _state(tmp / "attempt-1", f"final-{STEPS}")


@pytest.mark.timeout(900)
def test_sigterm_to_one_pod_stops_the_gang_at_one_committed_step_and_both_resume_bitwise(
    tmp_path: Path, reference: dict[str, Any]
) -> None:
    """SIGTERM to pod 1's supervisor only: all 4 ranks stop at one step, committed once with every rank's files,
    and both supervisors exit 75 within the grace period, pod 0's too. The next attempt of both pods resumes from
    that step and ends bitwise where an uninterrupted run ends."""
    ckpt = tmp_path / "ckpt"
    uri = ckpt.as_uri()
    with _gang(tmp_path, uri, 1, steps=STEPS, sleep=0.05) as pods:
        _wait_for_a_checkpoint(tmp_path, ckpt, 1, pods)
        os.kill(pods[1].pid, signal.SIGTERM)
        sent = time.monotonic()
        codes = [pod.wait(timeout=90) for pod in pods]
        took = time.monotonic() - sent
    assert codes == [EXIT_PREEMPTED, EXIT_PREEMPTED], _logs(tmp_path, 1)
    assert took < GRACE, f"the gang took {took:.1f} s to stop, over the {GRACE} s grace period"
    out = tmp_path / "attempt-1"
    reports = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(4)]
    assert all(r["stopped"] for r in reports), reports
    (stop,) = {r["last"] for r in reports}
    assert 0 < stop < STEPS
    committed = Checkpointer(uri).list()
    assert committed[0].step == stop and committed[0].manifest.world_size == 4
    assert {f.split("/")[1] for f in committed[0].manifest.files if "/rank-" in f} == {f"rank-{r}" for r in range(4)}
    messages = [json.loads(_message(tmp_path, 1, node).read_text()) for node in (0, 1)]
    assert [(m["outcome"], m["step"]) for m in messages] == [("preempted", stop)] * 2, messages

    with _gang(tmp_path, uri, 2, steps=STEPS, sleep=0.0) as pods:
        codes = [pod.wait(timeout=240) for pod in pods]
    assert codes == [0, 0], _logs(tmp_path, 2)
    retry = tmp_path / "attempt-2"
    assert {json.loads((retry / f"rank-{r}.json").read_text())["start"] for r in range(4)} == {stop}
    assert _differences(_state(retry, f"final-{STEPS}"), reference) == [], "the resumed run ends elsewhere"
    run = runrecord.read(str(tmp_path / "artifacts" / "multinode"))
    assert [(e["attempt"], e["pod"], e["outcome"]) for e in run["attempts"]] == [
        (1, 0, "preempted"),
        (1, 1, "preempted"),
        (2, 0, "succeeded"),
        (2, 1, "succeeded"),
    ]
    assert (run["totals"]["attempts"], run["totals"]["preemptions"]) == (2, 1)
    assert run["totals"]["wall_seconds"] == pytest.approx(sum(e["wall_seconds"] for e in run["attempts"]), abs=0.01)


@pytest.mark.timeout(600)
def test_a_pod_that_vanishes_makes_the_other_exit_75_within_the_grace_period_naming_the_silent_ranks(
    tmp_path: Path,
) -> None:
    """SIGKILL of pod 1's whole process tree mid-training: pod 0's ranks find their peers gone in the next
    collective, and pod 0's supervisor exits 75 (a retry resumes from the last commit) within the grace period,
    its termination message naming ranks 2 and 3 as silent. The retry gets one pod only: its 2 ranks resume the
    4 ranks' last commit and finish."""
    ckpt = tmp_path / "ckpt"
    with _gang(tmp_path, ckpt.as_uri(), 1, steps=400, sleep=0.05) as pods:
        _wait_for_a_checkpoint(tmp_path, ckpt, 1, pods)
        _vanish(pods[1])
        killed = time.monotonic()
        code = pods[0].wait(timeout=90)
        took = time.monotonic() - killed
    assert code == EXIT_PREEMPTED, _logs(tmp_path, 1)
    assert took < GRACE, f"pod 0 took {took:.1f} s to give up, over the {GRACE} s grace period"
    message = json.loads(_message(tmp_path, 1, 0).read_text())
    assert message["outcome"] == "preempted", message
    assert "ranks 2, 3" in message["message"], message
    (last,) = [c.step for c in Checkpointer(ckpt.as_uri()).list()[:1]]
    with _gang(tmp_path, ckpt.as_uri(), 2, steps=last + 8, sleep=0.0, nodes=1) as pods:
        code = pods[0].wait(timeout=240)
    assert code == 0, _logs(tmp_path, 2)
    retry = [json.loads((tmp_path / "attempt-2" / f"rank-{r}.json").read_text()) for r in range(2)]
    assert {(r["world"], r["start"], r["last"]) for r in retry} == {(2, last, last + 8)}


@pytest.mark.timeout(600)
def test_a_pod_that_stops_answering_makes_the_other_exit_75_within_the_grace_period(tmp_path: Path) -> None:
    """SIGSTOP of pod 1's whole tree (a node gone from the network: its connections stay open, nothing answers).
    gloo would wait in the collective for its timeout (30 minutes); the peer watch names ranks 2 and 3 silent and
    pod 0 exits 75 within the grace period."""
    ckpt = tmp_path / "ckpt"
    with _gang(tmp_path, ckpt.as_uri(), 1, steps=400, sleep=0.05) as pods:
        _wait_for_a_checkpoint(tmp_path, ckpt, 1, pods)
        for pid in _tree(pods[1].pid):
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                continue
        stopped = time.monotonic()
        try:
            code = pods[0].wait(timeout=90)
        finally:
            took = time.monotonic() - stopped
            _vanish(pods[1])
    assert code == EXIT_PREEMPTED, _logs(tmp_path, 1)
    assert took < GRACE, f"pod 0 took {took:.1f} s to give up, over the {GRACE} s grace period"
    message = json.loads(_message(tmp_path, 1, 0).read_text())
    assert message["outcome"] == "preempted" and "ranks 2, 3 went silent" in message["message"], message

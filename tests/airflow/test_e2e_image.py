"""The image, run for real: ``make image`` builds ``docker/Dockerfile`` and ``docker/Dockerfile.example`` with
buildah (``docker/build-local.sh``); these tests run them with podman (root, ``--network host``), as a node's
container runtime would.

* the image's own contract: its non-root ``USER``, its ENTRYPOINT, ``podtrain --help`` and ``podtrain smoke``; an
  orphan the training command leaves is reaped;
* a pod's life with a file:// bucket (a bind-mounted folder), with the root filesystem read-only: SIGTERM to PID 1
  (tini) reaches the supervisor and the training process, the run exits 75 inside the grace period, the
  termination message lands at ``/dev/termination-log``; a second run, its message at a configured path, resumes
  from that checkpoint and finishes;
* ``podtrain_train`` from the DAGs folder with every pod in the image (``_kubepodman.Podman`` as the test kubelet's
  runtime) against moto on 127.0.0.1: preempted once, retried, resumed, finished, charged; ``podtrain_multinode``
  likewise, two pods of ``torchrun`` over gloo, one preempted, the gang restarted by its JobSet and resumed;
* what a change to ``train.py`` or to podtrain costs in layers: ``test_image_layers.py``.

Marked ``image``: ``make image-test`` (as root) runs them after building the image, and CI calls it after
``make test``. Without the image or podman they fail, never skip: ``make image-test`` builds the image first.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _kubepodman import Podman
from e2e_support import REPO, TRAINING_PYTHON, MotoS3Server, check_gang_resumed, deployment, free_port
from image_support import BASE, ENTRYPOINT, EXAMPLE, inspect, podman

pytestmark = [pytest.mark.image, pytest.mark.timeout(900)]
__all__ = ["podman"]  # the fixture, imported for pytest

GRACE = 20  # seconds, the pod's terminationGracePeriodSeconds and PODTRAIN_GRACE_SECONDS


def test_image_runs_as_its_non_root_user_with_tini_in_front_of_podtrain_run(podman: Podman) -> None:
    """The base image's contract with a pod: numeric non-root USER (runAsNonRoot can check it), ENTRYPOINT
    ``tini -g -- podtrain run --``, the example's CMD ``python /app/train.py``; ``--help`` and smoke run in it."""
    base, example = inspect(podman, BASE)["Config"], inspect(podman, EXAMPLE)["Config"]
    assert base["User"] == "1000:1000" and base["Entrypoint"] == ENTRYPOINT and base["WorkingDir"] == "/workspace"
    assert example["Entrypoint"] == ENTRYPOINT and example["Cmd"] == ["python", "/app/train.py"]

    helped = podman.run("run", "--rm", "--entrypoint", "podtrain", BASE, "--help")
    assert helped.stdout.startswith("usage: podtrain") and "{run,push,pull,record,smoke,checkpoints}" in helped.stdout
    smoke = podman.run("run", "--rm", "--entrypoint", '["tini", "-g", "--", "podtrain", "smoke", "--allow-cpu"]', BASE)
    assert "smoke passed" in smoke.stdout + smoke.stderr, smoke.stdout + smoke.stderr
    who = podman.run("run", "--rm", "--entrypoint", "id", BASE)
    assert who.stdout.startswith("uid=1000(podtrain) gid=1000(podtrain)"), who.stdout


def test_an_orphan_the_training_command_leaves_is_reaped_not_left_a_zombie(podman: Podman) -> None:
    """The image's ENTRYPOINT in front of a command that orphans a child: the orphan, reparented to tini (PID 1)
    or to the supervisor, is reaped when it exits; no zombie is left in the container."""
    script = '(sleep 0.3 &); sleep 2; grep -l "^State:.*Z" /proc/[0-9]*/status; echo "zombies checked"'
    ran = podman.run("run", "--rm", "--network", "host", EXAMPLE, "sh", "-c", script)
    lines = [line for line in ran.stdout.splitlines() if not line.startswith("{")]
    assert lines == ["zombies checked"], ran.stdout + ran.stderr


class Container:
    """One ``podman run`` of the example image as a pod would run it, its log read as it comes."""

    def __init__(self, podman: Podman, name: str, flags: list[str], args: list[str]):
        self.podman, self.name = podman, name
        self.lines: list[str] = []
        self.cond = threading.Condition()
        argv = podman.command("run", "--name", name, "--rm", "--network", "host", *flags, EXAMPLE, *args)
        self.proc = subprocess.Popen(
            argv, env=podman.process_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self.cond:
                self.lines.append(line)
                self.cond.notify_all()

    def wait_for(self, event: str, timeout: float) -> dict[str, Any]:
        with self.cond:
            found = self.cond.wait_for(lambda: self.proc.poll() is not None or self.events(event), timeout)
            assert found and self.events(event), f"no {event} in {timeout} s:\n{self.log()[-3000:]}"
            return self.events(event)[-1]

    def events(self, event: str) -> list[dict[str, Any]]:
        out = []
        for line in self.lines:
            if line.startswith("{") and f'"{event}"' in line:
                record = json.loads(line)
                if record.get("event") == event:
                    out.append(record)
        return out

    def log(self) -> str:
        return "".join(self.lines)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)


@pytest.fixture
def containers(podman: Podman) -> Iterator[list[Container]]:
    started: list[Container] = []
    yield started
    for c in started:
        podman.run("rm", "--force", "--time", "0", "--ignore", c.name, check=False)
        c.proc.kill()
        c.proc.wait()


def test_file_bucket_sigterm_to_pid1_exits_75_in_the_grace_period_and_the_next_run_resumes(
    podman: Podman, containers: list[Container], tmp_path: Path
) -> None:
    """A read-only root filesystem, uid 1000, no capabilities, the bucket a bind-mounted folder (file://):
    ``podman kill --signal TERM`` (the runtime's StopContainer) reaches tini, the supervisor and train.py; exit 75
    well inside the grace period, the termination message says preempted at the committed step; a second run
    resumes from that step, finishes, and writes its message where PODTRAIN_TERMINATION_LOG says."""
    bucket = tmp_path / "bucket"
    subprocess.run(
        [str(TRAINING_PYTHON), str(REPO / "examples" / "dataset.py"), "--out", str(bucket / "data"), "--mib", "0.25"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    volumes = {name: tmp_path / name for name in ("data", "output", "cache", "tmp", "term")}
    for path in [bucket, *volumes.values()]:
        path.mkdir(exist_ok=True)
        path.chmod(0o777)  # an emptyDir's mode
    term = volumes["term"] / "termination-log"
    term.write_text("")
    term.chmod(0o666)

    def flags(*extra: str) -> list[str]:
        mounts = [f"{bucket}:/bucket", *(f"{volumes[n]}:/{n}" for n in ("data", "output", "cache", "tmp"))]
        env = {
            "PODTRAIN_RUN_ID": "image-file",
            "PODTRAIN_DATA_URI": "file:///bucket/data",
            "PODTRAIN_CHECKPOINT_URI": "file:///bucket/checkpoints",
            "PODTRAIN_ARTIFACT_URI": "file:///bucket/artifacts",
            "PODTRAIN_GRACE_SECONDS": str(GRACE),
        }
        return [
            "--read-only",
            "--read-only-tmpfs=false",
            "--cap-drop=ALL",
            "--security-opt=no-new-privileges",
            *(f"--volume={m}" for m in mounts),
            *(f"--env={k}={v}" for k, v in env.items()),
            *extra,
        ]

    args = ["python", "/app/train.py", "--steps", "400", "--checkpoint-every", "10", "--log-every", "10"]
    args += ["--device", "cpu", "--threads", "1"]
    first = Container(podman, "podtrain-test-first", flags(f"--volume={term}:/dev/termination-log"), args)
    containers.append(first)
    committed = first.wait_for("checkpoint.committed", timeout=300)
    pid1 = podman.run("exec", first.name, "cat", "/proc/1/cmdline").stdout.split("\0")
    assert pid1[:6] == ENTRYPOINT, pid1
    killed = time.monotonic()
    podman.run("kill", "--signal", "TERM", first.name)
    code = first.wait(timeout=GRACE + 30)
    seconds = time.monotonic() - killed
    log = first.log()
    assert code == 75, log[-3000:]
    assert seconds < GRACE, f"exited {seconds:.1f} s after SIGTERM, grace {GRACE} s"
    assert first.events("supervisor.sigterm") and first.events("supervisor.forwarded"), log[-3000:]
    preempted = first.events("run.preempted")
    assert preempted, f"train.py never saw the signal:\n{log[-3000:]}"
    message = json.loads(term.read_text())
    assert (message["outcome"], message["exit_code"]) == ("preempted", 75), message
    assert message["step"] == preempted[-1]["checkpoint"] >= committed["step"], (message, committed)
    assert any(volumes["data"].iterdir()), "the supervisor pulled the dataset into the /data volume"

    custom = volumes["term"] / "message"
    custom.write_text("")
    custom.chmod(0o666)
    second = Container(
        podman,
        "podtrain-test-second",
        flags(f"--volume={custom}:/run/podtrain/message", "--env=PODTRAIN_TERMINATION_LOG=/run/podtrain/message"),
        args,
    )
    containers.append(second)
    assert second.wait(timeout=300) == 0, second.log()[-3000:]
    (resumed,) = second.events("checkpoint.resumed")
    assert resumed["step"] == message["step"], resumed
    done = json.loads(custom.read_text())
    assert (done["outcome"], done["exit_code"], done["step"]) == ("succeeded", 0, 400), done
    (record,) = (bucket / "artifacts").rglob("run.json")
    run = json.loads(record.read_text())
    assert [a["outcome"] for a in run["attempts"]] == ["preempted", "succeeded"], run
    print(f"SIGTERM to exit 75 in the image: {seconds:.2f} s")


def test_a_read_only_root_without_its_volumes_is_exit_2_naming_the_volume_to_mount(
    podman: Podman, tmp_path: Path
) -> None:
    """A pod spec that makes the root read-only but forgets a volume: no /output is exit 2 naming
    PODTRAIN_OUTPUT_DIR; /output but no /tmp is exit 2 naming /tmp and TMPDIR. Each before the child starts, one
    line in the log and in the termination message, never a traceback."""
    bucket, output = tmp_path / "bucket", tmp_path / "output"
    for folder in (bucket, output):
        folder.mkdir()
        folder.chmod(0o777)
    term = tmp_path / "termination-log"
    cases = {
        "PODTRAIN_OUTPUT_DIR /output is not writable: /output is on a read-only file system": [],
        "no writable temporary folder (/tmp": [f"--volume={output}:/output"],
    }
    for expected, volumes in cases.items():
        term.write_text("")
        term.chmod(0o666)
        ran = podman.run(
            *("run", "--rm", "--network", "host", "--read-only", "--read-only-tmpfs=false"),
            *(f"--volume={bucket}:/bucket", f"--volume={term}:/dev/termination-log", *volumes),
            *("--env=PODTRAIN_CHECKPOINT_URI=file:///bucket/c", "--env=PODTRAIN_ARTIFACT_URI=file:///bucket/a"),
            *(EXAMPLE, "python", "/app/train.py", "--steps", "5"),
            check=False,
        )
        out = ran.stdout + ran.stderr
        assert ran.returncode == 2, out
        assert "Traceback" not in out, out
        message = json.loads(term.read_text())
        assert (message["outcome"], message["exit_code"]) == ("config_error", 2)
        assert message["message"].startswith(expected), message


@pytest.mark.usefixtures("airflow_db")
def test_train_dag_in_the_image_is_preempted_retried_resumed_and_charged(
    podman: Podman, s3: MotoS3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """podtrain_train with every pod in the example image (the test kubelet's podman runtime) and the template's
    read-only root filesystem: the preflight's smoke, training preempted once after a checkpoint (SIGTERM to the
    container's PID 1), retried by Airflow, resumed, finished and pushed; the run record has both attempts, the
    chargeback report charges both."""
    from podtrain_airflow import run_id

    settings = {"READ_ONLY_ROOT": "1"}
    with deployment(monkeypatch, s3, tmp_path, bucket="e2e-image", runtime=podman, settings=settings) as dep:
        run = dep.run_preempting("podtrain_train")
        dag, dag_run, states, seconds = run.dag, run.dag_run, run.states, run.seconds
        assert dag_run.state == "success", states
        assert states[("gpu_preflight", -1)] == ("success", 1)
        assert states[("train", -1)] == ("success", 2)
        rid = run_id(dag.dag_id, dag_run.run_id, "train")
        first, second = dep.read_json(f"{dep.base_uri}/artifacts/{rid}/run.json")["attempts"]
        assert (first["outcome"], first["exit_code"], second["outcome"]) == ("preempted", 75, "succeeded")
        assert first["checkpoint_step"] and second["resumed_from"] == first["checkpoint_step"]
        assert second["last_step"] == 40
        report = dep.read_json(f"{dep.base_uri}/reports/{run_id(dag.dag_id, dag_run.run_id)}/chargeback.json")
        (row,) = report["rows"]
        assert (row["attempts"], row["preemptions"], row["outcome"]) == (2, 1, "succeeded")
        launched = podman.launched[-3:]  # the preflight, two training attempts
        assert len(launched) == 3 and all(EXAMPLE in argv for argv in launched), launched
        for argv in launched:
            assert "--read-only" in argv and "--user" in argv and "--cap-drop=ALL" in argv, argv
            assert [a for a in argv if a.endswith((":/output", ":/cache", ":/tmp"))], argv
        assert [argv[argv.index(EXAMPLE) + 1 :][:2] for argv in launched[1:]] == [["python", "/app/train.py"]] * 2
        leftover = podman.run("ps", "--all", "--format", "{{.Names}}").stdout.split()
        assert not [n for n in leftover if n.startswith("k8s_")], leftover
    print(f"podtrain_train in the image: {seconds:.1f} s")


@pytest.mark.usefixtures("airflow_db")
def test_multinode_dag_in_the_image_one_pod_preempted_the_gang_restarts_resumes_and_finishes(
    podman: Podman, s3: MotoS3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """podtrain_multinode with both pods in the image (``podtrain run -- torchrun`` from the image's venv, gloo
    between the containers, pod 0 found by its JobSet DNS name): pod 1 preempted as it saves, both pods exit 75,
    the JobSet restarts the gang in the cluster (no Airflow retry), which resumes from the committed step."""
    settings = {"NODES": "2", "PROCS_PER_NODE": "1", "MASTER_PORT": str(free_port()), "POLL_SECONDS": "1"}
    with deployment(monkeypatch, s3, tmp_path, bucket="e2e-image-gang", runtime=podman, settings=settings) as dep:
        index = "batch.kubernetes.io/job-completion-index"
        run = dep.run_preempting(
            "podtrain_multinode", pattern=r"checkpoint\.started", label_selector=f"podtrain-trial=train,{index}=1"
        )
        assert run.dag_run.state == "success", run.states
        assert run.states[("train", -1)] == ("success", 1), "the JobSet restarted in the cluster: no Airflow retry"
        check_gang_resumed(dep.run_record(run.dag, run.dag_run), (1000, 1001))
        gang = [argv for argv in podman.launched if any(a.startswith("--add-host=") for a in argv)]
        assert len(gang) >= 4, "both attempts' two pods ran in the image with the gang's names"
    print(f"podtrain_multinode in the image: {run.seconds:.1f} s")

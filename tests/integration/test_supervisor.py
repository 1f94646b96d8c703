"""`podtrain run` as the pod runs it: the installed console script, real child processes and real signals.

The supervisor runs in its own session (``start_new_session``), so the signals sent to it never reach pytest.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from sdk.checkpoints.checkpointer import Checkpointer

PODTRAIN = str(Path(sys.executable).with_name("podtrain"))
PY = sys.executable


class Run:
    """One supervisor process with its own termination-log path and file:// checkpoint store."""

    def __init__(self, tmp: Path, cmd: list[str], *, env: dict[str, str] | None = None, module: bool = False) -> None:
        self.tmp = tmp
        self.termlog = tmp / "termination-log"
        self.env = {
            **os.environ,
            "PODTRAIN_RUN_ID": "sup",
            "PODTRAIN_ATTEMPT": "1",
            "PODTRAIN_CHECKPOINT_URI": f"file://{tmp}/ckpt",
            "PODTRAIN_TERMINATION_LOG": str(self.termlog),
            "PODTRAIN_GRACE_SECONDS": "10",
            **(env or {}),
        }
        head = [PY, "-m", "entrypoint"] if module else [PODTRAIN]
        self.proc = subprocess.Popen(
            [*head, "run", "--", *cmd],
            env=self.env,
            cwd=tmp,
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.stderr = ""

    def wait(self, timeout: float = 30) -> int:
        _, self.stderr = self.proc.communicate(timeout=timeout)
        return self.proc.returncode

    def message(self) -> dict[str, object]:
        text = self.termlog.read_text()
        assert text.endswith("\n") and text.count("\n") == 1, text
        assert len(text.rstrip("\n").encode()) <= 4096
        return json.loads(text)

    def last_log_line(self) -> dict[str, object]:
        return json.loads(self.stderr.strip().splitlines()[-1])


def _script(tmp: Path, name: str, body: str) -> str:
    path = tmp / name
    path.write_text(textwrap.dedent(body))
    return str(path)


def _wait_for(path: Path, timeout: float = 15) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.02)


def test_child_exit_zero_succeeds(tmp_path: Path) -> None:
    """A child exiting 0 gives exit 0, outcome succeeded, and the same JSON as the last log line."""
    run = Run(tmp_path, ["true"])
    assert run.wait() == 0, run.stderr
    msg = run.message()
    assert list(msg) == [
        "outcome",
        "exit_code",
        "run_id",
        "attempt",
        "step",
        "checkpoint",
        "seconds",
        "gpu_seconds",
        "message",
    ]
    assert msg["outcome"] == "succeeded" and msg["exit_code"] == 0
    assert msg["run_id"] == "sup" and msg["attempt"] == 1
    assert msg["checkpoint"] is None and msg["step"] is None and "no checkpoint" in str(msg["message"])
    last = run.last_log_line()
    assert {k: last[k] for k in msg} == msg


def test_python_m_entrypoint_run_and_gpu_seconds(tmp_path: Path) -> None:
    """`python -m entrypoint run` works too; gpu_seconds counts CUDA_VISIBLE_DEVICES (2 GPUs: twice the seconds)."""
    run = Run(tmp_path, [PY, "-c", "import time; time.sleep(0.3)"], env={"CUDA_VISIBLE_DEVICES": "0,1"}, module=True)
    assert run.wait() == 0, run.stderr
    msg = run.message()
    assert float(msg["seconds"]) >= 0.3  # type: ignore[arg-type]
    assert msg["gpu_seconds"] == pytest.approx(2 * float(msg["seconds"]), abs=0.01)  # type: ignore[arg-type]


def test_an_unset_attempt_is_derived_once_and_given_to_the_child(tmp_path: Path) -> None:
    """PODTRAIN_ATTEMPT unset: the supervisor derives it from the store and exports it, so all ranks agree."""
    seen = tmp_path / "attempt.txt"
    run = Run(tmp_path, ["sh", "-c", f'echo "$PODTRAIN_ATTEMPT" > {seen}'], env={"PODTRAIN_ATTEMPT": ""})
    assert run.wait() == 0, run.stderr
    assert seen.read_text().strip() == "1"
    assert run.message()["attempt"] == 1
    from sdk.checkpoints.checkpointer import Checkpointer

    Checkpointer(f"file://{tmp_path}/ckpt", run_id="sup", attempt=1).save(3, {"model": torch.nn.Linear(2, 2)})
    run = Run(tmp_path, ["sh", "-c", f'echo "$PODTRAIN_ATTEMPT" > {seen}'], env={"PODTRAIN_ATTEMPT": ""})
    assert run.wait() == 0, run.stderr
    assert seen.read_text().strip() == "2"


def test_child_exit_3_fails(tmp_path: Path) -> None:
    """A child exiting 3 gives exit 1, outcome failed."""
    run = Run(tmp_path, ["sh", "-c", "exit 3"])
    assert run.wait() == 1
    msg = run.message()
    assert msg["outcome"] == "failed" and msg["exit_code"] == 1 and "exited 3" in str(msg["message"])


@pytest.mark.parametrize(("code", "outcome"), [(2, "config_error"), (69, "storage_unavailable"), (75, "preempted")])
def test_child_exit_codes_of_the_contract_pass_through(tmp_path: Path, code: int, outcome: str) -> None:
    """A child exiting 2, 69 or 75 gives that exit code and outcome."""
    run = Run(tmp_path, ["sh", "-c", f"exit {code}"])
    assert run.wait() == code
    assert run.message()["outcome"] == outcome


def test_child_killed_by_sigkill_not_by_us_fails_naming_the_signal(tmp_path: Path) -> None:
    """A child SIGKILLed by someone else (the OOM killer) gives exit 1 with SIGKILL in the message."""
    run = Run(tmp_path, ["sh", "-c", "kill -KILL $$"])
    assert run.wait() == 1
    msg = run.message()
    assert msg["outcome"] == "failed" and "SIGKILL" in str(msg["message"])


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"PODTRAIN_GRACE_SECONDS": "abc"}, "PODTRAIN_GRACE_SECONDS"),
        ({"PODTRAIN_GRACE_SECONDS": "0"}, "PODTRAIN_GRACE_SECONDS"),
        ({"PODTRAIN_CHECKPOINT_URI": "nosuch://x"}, "PODTRAIN_CHECKPOINT_URI"),
    ],
)
def test_bad_config_exits_2_before_the_child_starts(tmp_path: Path, env: dict[str, str], words: str) -> None:
    """A bad setting gives exit 2 naming the variable, and the child never runs."""
    marker = tmp_path / "child-ran"
    run = Run(tmp_path, ["touch", str(marker)], env=env)
    assert run.wait() == 2
    assert not marker.exists()
    assert words in run.stderr
    msg = run.message()
    assert msg["outcome"] == "config_error" and words in str(msg["message"])


def test_no_command_is_a_usage_error(tmp_path: Path) -> None:
    """`podtrain run --` with no command exits 2."""
    run = Run(tmp_path, [])
    assert run.wait() == 2
    assert "no command" in run.stderr


CHILD_EXITS_75 = """
    import pathlib, signal, sys, time
    def stop(signum, frame):
        sys.exit(75)
    signal.signal(signal.SIGTERM, stop)
    pathlib.Path(sys.argv[1]).touch()
    time.sleep(60)
    sys.exit(0)
"""


def test_sigterm_child_exits_75_preempted_with_newest_checkpoint(tmp_path: Path) -> None:
    """SIGTERM to the supervisor, child stops with 75: exit 75, preempted, newest committed checkpoint named."""
    ckpt = Checkpointer(f"file://{tmp_path}/ckpt", run_id="sup", attempt=1)
    for step in (10, 20):
        ckpt.save(step, {"model": torch.nn.Linear(3, 2)})
    ready = tmp_path / "ready"
    run = Run(tmp_path, [PY, _script(tmp_path, "child.py", CHILD_EXITS_75), str(ready)])
    _wait_for(ready)
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait() == 75, run.stderr
    msg = run.message()
    assert msg["outcome"] == "preempted" and msg["exit_code"] == 75
    assert msg["step"] == 20
    assert str(msg["checkpoint"]).endswith("step-0000000020")


def test_sigterm_child_ignoring_it_is_killed_at_the_deadline(tmp_path: Path) -> None:
    """A child ignoring SIGTERM is SIGKILLed (whole group) at the deadline; exit 75 within the 5 s grace."""
    ready = tmp_path / "ready"
    child = _script(
        tmp_path,
        "stubborn.py",
        """
        import os, pathlib, signal, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        pathlib.Path(sys.argv[1] + ".pid").write_text(str(os.getpid()))
        pathlib.Path(sys.argv[1]).touch()
        time.sleep(60)
        """,
    )
    run = Run(tmp_path, [PY, child, str(ready)], env={"PODTRAIN_GRACE_SECONDS": "5"})
    _wait_for(ready)
    child_pid = int((tmp_path / "ready.pid").read_text())
    sent = time.monotonic()
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait() == 75, run.stderr
    took = time.monotonic() - sent
    assert 3.5 < took < 5.0, took  # killed at 5 - min(5, 1.0) = 4.0 s, out before the grace ends
    msg = run.message()
    assert msg["outcome"] == "preempted" and "deadline" in str(msg["message"])
    with pytest.raises(ProcessLookupError):
        os.kill(child_pid, 0)  # killed and reaped


def test_forwarded_sigterm_reaches_a_grandchild(tmp_path: Path) -> None:
    """SIGTERM is sent to the child's whole process group, so a grandchild hears it too."""
    ready, heard = tmp_path / "ready", tmp_path / "grandchild-heard"
    grandchild = _script(
        tmp_path,
        "grandchild.py",
        """
        import pathlib, signal, sys, time
        def stop(signum, frame):
            pathlib.Path(sys.argv[2]).write_text(signal.Signals(signum).name)
            sys.exit(0)
        signal.signal(signal.SIGTERM, stop)
        pathlib.Path(sys.argv[1]).touch()
        time.sleep(60)
        """,
    )
    child = _script(
        tmp_path,
        "parent.py",
        f"""
        import signal, subprocess, sys
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only the grandchild acts on it
        sys.exit(75 if subprocess.call([{PY!r}, {grandchild!r}, *sys.argv[1:]]) == 0 else 1)
        """,
    )
    run = Run(tmp_path, [PY, child, str(ready), str(heard)])
    _wait_for(ready)
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait() == 75, run.stderr
    assert heard.read_text() == "SIGTERM"


def test_termination_file_is_one_valid_json_line_even_with_a_huge_message(tmp_path: Path) -> None:
    """A message far over 4 KiB (a 20,000-character command name) is cut: one line of valid JSON ≤ 4,096 bytes."""
    run = Run(tmp_path, ["/nonexistent/" + "x" * 20_000])
    assert run.wait() == 2
    msg = run.message()  # checks: one line, ≤ 4096 bytes, parses
    assert msg["outcome"] == "config_error" and str(msg["message"]).endswith("…")
    assert len(str(msg["message"])) > 3000

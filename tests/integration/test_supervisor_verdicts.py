"""`podtrain run`'s verdicts tell the truth: exit 0 after SIGTERM, outputs not pushed, a supervisor killed outright.

Through the installed console script, with real child processes and real signals (see ``test_supervisor.py``).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from sdk.stores.store import open_store
from tests.integration.test_supervisor import PY, Run, _script, _wait_for

SDK_CHILD_SWALLOWS_THE_STOP = """
    import pathlib, sys, time
    import sdk
    try:
        with sdk.init() as run:
            pathlib.Path(sys.argv[1]).touch()
            for step in range(100_000):
                if run.should_stop():
                    break
                run.log_metrics(step, loss=1.0)
                time.sleep(0.01)
    except SystemExit:
        pass  # the user's code swallows the 75: the process exits 0 at step ~10 of 100,000
"""

SDK_CHILD_FINISHES = """
    import pathlib, signal, sys, time
    import sdk
    heard = []
    with sdk.init() as run:
        signal.signal(signal.SIGTERM, lambda *_: heard.append(1))  # not a stop signal here: the loop runs on
        pathlib.Path(sys.argv[1]).touch()
        while not heard:
            time.sleep(0.01)
        for step in range(5):
            run.log_metrics(step, loss=1.0)
"""

PLAIN_CHILD_EXITS_0_ON_SIGTERM = """
    import pathlib, signal, sys, time
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    pathlib.Path(sys.argv[1]).touch()
    time.sleep(60)
"""


def test_an_sdk_child_exiting_0_after_sigterm_without_completing_is_preempted_75(tmp_path: Path) -> None:
    """Exit 0 right after SIGTERM, the SDK's block never reached its end: 75, so the DAG retries and resumes."""
    ready = tmp_path / "ready"
    run = Run(tmp_path, [PY, _script(tmp_path, "child.py", SDK_CHILD_SWALLOWS_THE_STOP), str(ready)])
    _wait_for(ready, timeout=60)
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait(timeout=60) == 75, run.stderr
    msg = run.message()
    assert msg["outcome"] == "preempted" and msg["exit_code"] == 75
    assert "did not report completion" in str(msg["message"])


def test_an_sdk_child_that_completes_after_sigterm_still_succeeds(tmp_path: Path) -> None:
    """SIGTERM is not a stop signal for this child; it finishes its loop and the block's end reports completion."""
    ready = tmp_path / "ready"
    run = Run(
        tmp_path,
        [PY, _script(tmp_path, "child.py", SDK_CHILD_FINISHES), str(ready)],
        env={"PODTRAIN_STOP_SIGNALS": "SIGUSR1"},
    )
    _wait_for(ready, timeout=60)
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait(timeout=60) == 0, run.stderr
    msg = run.message()
    assert msg["outcome"] == "succeeded" and "reported completion" in str(msg["message"])


def test_a_child_without_the_sdk_exiting_0_after_sigterm_is_trusted(tmp_path: Path) -> None:
    """No completion report can exist without the SDK: exit 0 stays succeeded, and the message says it is trusted."""
    ready = tmp_path / "ready"
    run = Run(tmp_path, [PY, _script(tmp_path, "child.py", PLAIN_CHILD_EXITS_0_ON_SIGTERM), str(ready)])
    _wait_for(ready)
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait() == 0, run.stderr
    msg = run.message()
    assert msg["outcome"] == "succeeded"
    assert "no completion report" in str(msg["message"])


def test_a_successful_child_whose_outputs_cannot_be_pushed_exits_69(tmp_path: Path) -> None:
    """The artifact store is unusable (its folder sits under a file): 69, so the retry resumes and pushes."""
    (tmp_path / "not-a-folder").write_text("x")
    run = Run(
        tmp_path,
        [PY, "-c", "import os, pathlib; pathlib.Path(os.environ['PODTRAIN_OUTPUT_DIR'], 'model.bin').write_text('m')"],
        env={
            "PODTRAIN_OUTPUT_DIR": str(tmp_path / "output"),
            "PODTRAIN_ARTIFACT_URI": f"file://{tmp_path}/not-a-folder/artifacts",
        },
    )
    (tmp_path / "output").mkdir()
    assert run.wait() == 69, run.stderr
    msg = run.message()
    assert msg["outcome"] == "storage_unavailable" and msg["exit_code"] == 69
    assert "outputs not pushed" in str(msg["message"])


def _gone(pid: int) -> bool:
    """True once ``pid`` is dead (a zombie waiting for its reaper counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


def test_the_child_and_a_grandchild_die_with_a_sigkilled_supervisor(tmp_path: Path) -> None:
    """SIGKILL the supervisor: the child (parent-death signal) and its group (the watchdog) follow it."""
    ready = tmp_path / "ready"
    grandchild = _script(
        tmp_path,
        "grandchild.py",
        """
        import os, pathlib, sys, time
        pathlib.Path(sys.argv[1] + ".grandchild").write_text(str(os.getpid()))
        pathlib.Path(sys.argv[1]).touch()
        time.sleep(120)
        """,
    )
    child = _script(
        tmp_path,
        "parent.py",
        f"""
        import os, pathlib, subprocess, sys
        pathlib.Path(sys.argv[1] + ".child").write_text(str(os.getpid()))
        subprocess.call([{PY!r}, {grandchild!r}, sys.argv[1]])
        """,
    )
    run = Run(tmp_path, [PY, child, str(ready)])
    try:
        _wait_for(ready)
        pids = [int(Path(f"{ready}.{who}").read_text()) for who in ("child", "grandchild")]
        run.proc.send_signal(signal.SIGKILL)
        run.wait()
        end = time.monotonic() + 20  # normally well under a second; generous for a loaded machine
        while not all(_gone(pid) for pid in pids):
            assert time.monotonic() < end, f"outlived the supervisor: {[p for p in pids if not _gone(p)]}"
            time.sleep(0.05)
    finally:
        for name in ("child", "grandchild"):
            path = Path(f"{ready}.{name}")
            if path.exists() and not _gone(pid := int(path.read_text())):
                os.kill(pid, signal.SIGKILL)


# -- checks before anything is pulled --------------------------------------------------------------------------
CHILD_MARKS_ITS_START = "import pathlib, sys; pathlib.Path(sys.argv[1]).touch()"


def _preflight_run(tmp_path: Path, env: dict[str, str]) -> tuple[Run, Path]:
    started = tmp_path / "child-started"
    run = Run(tmp_path, [PY, "-c", CHILD_MARKS_ITS_START, str(started)], env=env)
    return run, started


def _one_line_on_stderr(run: Run) -> str:
    lines = [line for line in run.stderr.splitlines() if line.startswith("podtrain: ")]
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    return lines[0]


def test_missing_credentials_exit_2_with_a_hint_before_the_child(
    tmp_path: Path, s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No credentials anywhere in the chain: exit 2 naming them, not exit 1 with botocore's NoCredentialsError."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata look-up to wait for
    run, started = _preflight_run(tmp_path, {"PODTRAIN_CHECKPOINT_URI": f"{s3_url}/ckpt"})
    assert run.wait(timeout=120) == 2, run.stderr
    line = _one_line_on_stderr(run)
    assert "credentials" in line and "AWS_ACCESS_KEY_ID" in line, line
    assert not started.exists()
    msg = run.message()
    assert msg["outcome"] == "config_error" and "credentials" in str(msg["message"])


def test_a_missing_checkpoint_bucket_is_found_before_the_pull_and_named(tmp_path: Path, s3_url: str) -> None:
    """The checkpoint bucket does not exist: exit 2 saying so (not blaming credentials), nothing pulled, no child."""
    open_store(f"{s3_url}/data").put("a.bin", b"x" * 10)
    run, started = _preflight_run(
        tmp_path,
        {
            "PODTRAIN_CHECKPOINT_URI": "s3://no-such-bucket/ckpt",
            "PODTRAIN_DATA_URI": f"{s3_url}/data",
            "PODTRAIN_DATA_DIR": str(tmp_path / "data"),
        },
    )
    assert run.wait(timeout=120) == 2, run.stderr
    line = _one_line_on_stderr(run)
    assert "checkpoint store" in line and "no-such-bucket" in line and "credentials" not in line, line
    assert not started.exists() and not (tmp_path / "data" / "a.bin").exists()
    assert "checkpoint store" in str(run.message()["message"])


def test_an_unwritable_checkpoint_folder_is_exit_2_before_the_child(tmp_path: Path) -> None:
    """A file:// store that cannot be written (its folder would sit under a file): exit 2, named, no child."""
    (tmp_path / "a-file").write_text("x")
    run, started = _preflight_run(tmp_path, {"PODTRAIN_CHECKPOINT_URI": f"file://{tmp_path}/a-file/ckpt"})
    assert run.wait() == 2, run.stderr
    line = _one_line_on_stderr(run)
    assert "checkpoint store" in line and "not writable" in line and "credentials" not in line, line
    assert not started.exists()


def test_the_output_folder_is_created_before_the_child(tmp_path: Path) -> None:
    """PODTRAIN_OUTPUT_DIR that does not exist yet is created, so the child can write there at once."""
    out = tmp_path / "new" / "output"
    run = Run(
        tmp_path,
        [PY, "-c", "import os, sys; sys.exit(0 if os.path.isdir(os.environ['PODTRAIN_OUTPUT_DIR']) else 3)"],
        env={"PODTRAIN_OUTPUT_DIR": str(out)},
    )
    assert run.wait() == 0, run.stderr


def test_a_data_endpoint_that_does_not_resolve_is_one_line_not_a_failure_of_the_code(
    tmp_path: Path, s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AWS_ENDPOINT_URL names no host: one line saying the host name does not resolve, exit 2 (or 69 where the
    resolver itself is down), never exit 1 with a bare gaierror; the child does not start."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://podtrain-no-such-host.invalid:9000")
    run, started = _preflight_run(tmp_path, {"PODTRAIN_DATA_URI": f"{s3_url}/data"})
    assert run.wait(timeout=120) in (2, 69), run.stderr
    line = _one_line_on_stderr(run)
    assert "host name" in line and "nothing to pull" not in line, line
    assert not started.exists()

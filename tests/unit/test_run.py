"""sdk.init(): config, resume, checkpoint policy; and the light import of sdk."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import sdk
from sdk.config import Config
from tests.conftest import ManualClock


def test_import_sdk_and_the_cli_do_not_import_torch() -> None:
    """`import sdk`, config, storage, log, checkpoint listing and the CLI load without torch."""
    code = (
        "import sys, sdk, sdk.config, sdk.stores.store, sdk.log, sdk.errors, sdk.checkpoints.manifest, "
        "sdk.checkpoints.checkpointer, entrypoint.cli; "
        "sdk.Config; sdk.open_store; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_unknown_public_name_is_an_attribute_error() -> None:
    """The lazy namespace raises AttributeError for names it does not export."""
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = sdk.nope  # type: ignore[attr-defined]


def test_fresh_run_resumes_at_zero_then_continues_from_its_checkpoint(tmp_path: Path) -> None:
    """With no checkpoint, resume() is 0; after a checkpoint at step 4, a new run resumes at 4."""
    model = torch.nn.Linear(2, 2)
    config = Config(run_id="r", checkpoint_uri=str(tmp_path), attempt=1)
    with sdk.init(config) as run:
        assert run.resume({"model": model}) == 0
        assert run.checkpoint(4, {"model": model}) is not None
    with sdk.init(Config(run_id="r", checkpoint_uri=str(tmp_path), attempt=2)) as run:
        assert run.resume({"model": torch.nn.Linear(2, 2)}) == 4
        assert run.checkpointer.resumed_from == 4


def test_checkpoint_policy_saves_every_n_steps_unless_forced(tmp_path: Path) -> None:
    """checkpoint_every_steps=5 saves at 5 and 10 only; force=True saves anyway."""
    model = torch.nn.Linear(2, 2)
    config = Config(run_id="r", checkpoint_uri=str(tmp_path), attempt=1, checkpoint_every_steps=5, keep_last=10)
    with sdk.init(config.with_changes(checkpoint_mode="sync")) as run:
        saved = [s for s in range(1, 11) if run.checkpoint(s, {"model": model})]
        assert saved == [5, 10]
        assert run.checkpoint(11, {"model": model}, force=True) is not None
        assert [c.step for c in run.checkpointer.list()] == [11, 10, 5]


def test_init_reads_podtrain_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PODTRAIN_CHECKPOINT_URI and PODTRAIN_ATTEMPT reach the run's checkpointer."""
    monkeypatch.setenv("PODTRAIN_CHECKPOINT_URI", f"file://{tmp_path}/c")
    monkeypatch.setenv("PODTRAIN_ATTEMPT", "3")
    monkeypatch.setenv("PODTRAIN_RUN_ID", "env-run")
    with sdk.init() as run:
        assert run.checkpointer.url == f"file://{tmp_path}/c"
        assert run.checkpointer.attempt == 3
        assert run.config.run_id == "env-run"


def test_time_policy_saves_when_enough_seconds_passed(tmp_path: Path) -> None:
    """checkpoint_every_seconds=60: no save before a minute has passed since the last, one after."""
    from sdk.run import Run

    clock = ManualClock()
    config = Config(
        checkpoint_uri=str(tmp_path), attempt=1, checkpoint_every_seconds=60, keep_last=10, checkpoint_mode="sync"
    )
    run = Run(config, sdk.Checkpointer.from_config(config), clock=clock)
    model = torch.nn.Linear(2, 2)
    clock.now = 30
    assert run.checkpoint(1, {"model": model}) is None
    clock.now = 61
    assert run.checkpoint(2, {"model": model}) is not None
    clock.now = 100
    assert run.checkpoint(3, {"model": model}) is None


def test_preempted_run_commits_the_newest_step_and_exits_75(tmp_path: Path) -> None:
    """After a stop request, leaving the block saves the step last given to checkpoint() and exits 75."""
    from sdk.lifecycle.preemption import Preemption

    stop = Preemption(30)
    model = torch.nn.Linear(2, 2)
    with (
        pytest.raises(SystemExit) as exited,
        sdk.init(Config(checkpoint_uri=str(tmp_path), attempt=1, checkpoint_every_steps=10), preemption=stop) as run,
    ):
        for step in range(1, 100):
            run.checkpoint(step, {"model": model})
            if step == 13:
                stop.request()
            if run.should_stop():
                break
    assert exited.value.code == 75
    ckpt = sdk.Checkpointer(str(tmp_path), attempt=2)
    assert [c.step for c in ckpt.list()] == [13, 10]
    assert ckpt.list()[0].manifest.meta == {"emergency": True}


def test_preempted_run_skips_a_save_that_cannot_finish_in_time(tmp_path: Path) -> None:
    """When past saves were slower than the time left, the newest committed checkpoint stands; still exit 75."""
    from sdk.lifecycle.preemption import Preemption
    from sdk.run import Run

    clock = ManualClock()
    stop = Preemption(30, clock=clock)
    config = Config(checkpoint_uri=str(tmp_path), attempt=1, checkpoint_every_steps=10, checkpoint_mode="sync")
    run = Run(config, sdk.Checkpointer.from_config(config), stop, clock=clock)
    model = torch.nn.Linear(2, 2)
    save = run.checkpointer.save

    def slow_save(*args: Any, **kwargs: Any) -> Any:
        clock.now += 19.0  # this store takes 19 s per save: ~28.5 s with the safety factor
        return save(*args, **kwargs)

    run.checkpointer.save = slow_save  # type: ignore[method-assign]
    run.checkpoint(10, {"model": model})
    run.checkpoint(11, {"model": model})
    stop.request()
    clock.now += 1  # 19 s left of the 20 s the run may use
    run.finish_preempted()
    assert [c.step for c in sdk.Checkpointer(str(tmp_path), attempt=2).list()] == [10]


def test_several_ranks_without_an_attempt_number_is_a_config_error(tmp_path: Path) -> None:
    """WORLD_SIZE=2 with PODTRAIN_ATTEMPT unset: ranks could derive different numbers, so init says what to set."""
    from sdk.errors import ConfigError

    with (
        pytest.raises(SystemExit) as exited,
        sdk.init(Config(checkpoint_uri=str(tmp_path), world_size=2, rank=1)),
    ):
        pass
    assert exited.value.code == 2
    cause = exited.value.__cause__
    assert isinstance(cause, ConfigError) and "PODTRAIN_ATTEMPT is unset" in str(cause)


def test_checkpoint_mode_is_read_from_the_environment() -> None:
    """PODTRAIN_CHECKPOINT_MODE=sync parses (a Literal field, not a number); a bad value names the choices."""
    from sdk.errors import ConfigError

    assert Config.from_env({"PODTRAIN_CHECKPOINT_MODE": "sync"}).checkpoint_mode == "sync"
    with pytest.raises(ConfigError, match="overlap"):
        Config.from_env({"PODTRAIN_CHECKPOINT_MODE": "fast"})


@pytest.mark.parametrize(
    ("error", "code"),
    [
        ("TransientStorageError", 69),
        ("StoragePermissionError", 2),
        ("StorageNotFoundError", 2),
        ("ConfigError", 2),
    ],
)
def test_errors_leaving_the_block_become_the_contract_exit_codes(tmp_path: Path, error: str, code: int) -> None:
    """Storage down through the retries exits 69 (retry); a setting to fix exits 2 (never retry)."""
    from sdk import errors

    cls = getattr(errors, error)
    raised = (
        cls("s3://b/x: what went wrong") if error == "ConfigError" else cls("s3://b/x: what went wrong", url="s3://b/x")
    )
    with pytest.raises(SystemExit) as exited, sdk.init(Config(checkpoint_uri=str(tmp_path), attempt=1)):
        raise raised
    assert exited.value.code == code and exited.value.__cause__ is raised


def test_other_errors_leave_the_block_unchanged(tmp_path: Path) -> None:
    """A bug in the user's code is not turned into an exit code: it propagates as itself (exit 1)."""
    with pytest.raises(ZeroDivisionError), sdk.init(Config(checkpoint_uri=str(tmp_path), attempt=1)):
        _ = 1 / 0


_PREEMPTED_SCRIPT = """
import os, signal, sys, torch, sdk
with sdk.init(checkpoint_uri=sys.argv[1], attempt=1, grace_seconds=float(sys.argv[2])) as run:
    model = torch.nn.Linear(2, 2)
    for step in range(1, 100):
        run.checkpoint(step, {"model": model})
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        if run.should_stop():
            break
"""


@pytest.mark.parametrize(("grace", "fast"), [(5.0, True), (60.0, False)])
def test_a_preempted_run_skips_the_teardown_only_when_time_is_short(tmp_path: Path, grace: float, fast: bool) -> None:
    """With under 5 s left after the emergency save the process ends at once (os._exit); else a normal exit."""
    done = subprocess.run(
        [sys.executable, "-c", _PREEMPTED_SCRIPT, str(tmp_path / "ckpt"), str(grace)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 75, done.stderr[-2000:]
    assert ("run.exit_now" in done.stderr) == fast
    assert sdk.Checkpointer(str(tmp_path / "ckpt"), attempt=2).list()[0].step == 3


def test_each_background_save_logs_how_long_it_stalled_training(tmp_path: Path) -> None:
    """An async checkpoint logs ``checkpoint.started`` with the seconds the training loop was blocked (the copy),
    and ``checkpoint.committed`` with its bytes once written: what the demo's summary reports per checkpoint."""
    import contextlib
    import io
    import json

    model = torch.nn.Linear(64, 64)
    config = Config(run_id="r", checkpoint_uri=str(tmp_path), attempt=1, checkpoint_mode="async", log_format="json")
    stream = io.StringIO()
    try:
        with contextlib.redirect_stderr(stream), sdk.init(config) as run:  # init() logs to sys.stderr
            run.resume({"model": model})
            run.checkpoint(3, {"model": model}, force=True)
            run.wait()
    finally:
        sdk.log.configure()  # back to the test session's stderr, not this test's buffer
    records = [json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")]
    started = [r for r in records if r["event"] == "checkpoint.started"]
    committed = [r for r in records if r["event"] == "checkpoint.committed"]
    assert [r["step"] for r in started] == [3] and started[0]["mode"] == "async"
    assert 0 <= started[0]["stall_seconds"] < 5
    assert committed and committed[0]["step"] == 3 and committed[0]["bytes"] > 64 * 64 * 4

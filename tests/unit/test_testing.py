"""sdk.testing: a run on a temporary store, a preemption at a chosen step, and what they leave behind.

The loops here train a small model for real on CPU (dropout, a shuffled loader, AdamW), so that an inexact
resume would show in the weights.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import structlog
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sdk
from sdk import testing
from sdk.run import TEARDOWN_RESERVE, Run
from tests.conftest import ManualClock

STEPS = 10


class HardExit(Exception):
    """Raised in place of os._exit, so that a broken helper fails its test instead of ending pytest."""


@pytest.fixture(autouse=True)
def no_hard_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(code: int) -> None:
        raise HardExit(code)

    monkeypatch.setattr(os, "_exit", refuse)


def _train(run: Run, steps: int = STEPS, *, report: str = "checkpoint") -> tuple[int, list[int], nn.Module]:
    """A typical loop: (the step it resumed at, the steps it trained, the model)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.Generator().manual_seed(1)
    inputs = torch.randn(64, 8, generator=data)
    dataset = TensorDataset(inputs, inputs.sum(dim=1, keepdim=True))
    loader = sdk.ResumableLoader(
        DataLoader(dataset, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(2))
    )
    state = {"model": model, "optimizer": optimizer, "loader": loader}
    start = run.resume(state)
    batches, trained = loader.batches(), []
    for step in range(start, steps):
        x, y = next(batches)
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        trained.append(step + 1)
        if report == "checkpoint":
            run.checkpoint(step + 1, state)
        elif report == "should_checkpoint":
            if run.should_checkpoint(step + 1):
                run.checkpoint(step + 1, state)
        else:
            run.log_metrics(step + 1, loss=loss)
        if run.should_stop():
            break
    return start, trained, model


def test_importing_sdk_testing_does_not_import_torch() -> None:
    """Only opening a run loads torch, as with sdk.init(): a test module can import the helpers at the top."""
    code = "import sys, sdk.testing; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_loop_preempted_at_step_5_exits_75_with_step_5_committed(tmp_path: Path) -> None:
    # Every 3 steps: one policy save (3), nothing deferred, so step 5 can only be the emergency save. (Every 2 steps,
    # a save of 4 deferred behind 2's was owed to the call of step 5, which then committed 5 without the mark.)
    with pytest.raises(SystemExit) as stopped, testing.init(tmp_path, preempt_at=5, checkpoint_every_steps=3) as run:
        _, trained, _ = _train(run)
    assert stopped.value.code == testing.EXIT_PREEMPTED == 75
    assert trained == [1, 2, 3, 4, 5]
    assert testing.committed_steps(run) == [3, 5]
    assert run.checkpointer.list()[0].manifest.meta == {"emergency": True}
    assert run.preemption.signum == signal.SIGTERM


def test_a_fresh_run_resumes_at_step_5_with_the_weights_of_an_uninterrupted_run(tmp_path: Path) -> None:
    with testing.init(tmp_path / "straight", checkpoint_every_steps=2) as run:
        _, _, straight = _train(run)
    with pytest.raises(SystemExit), testing.init(tmp_path / "cut", preempt_at=5, checkpoint_every_steps=2) as run:
        _train(run)
    with testing.init(tmp_path / "cut", checkpoint_every_steps=2) as run:
        start, trained, resumed = _train(run)
    assert (start, trained) == (5, [6, 7, 8, 9, 10])
    assert run.checkpointer.attempt == 2
    assert testing.committed_steps(run)[-1] == STEPS
    expected = straight.state_dict()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in resumed.state_dict().items())


@pytest.mark.parametrize("report", ["checkpoint", "should_checkpoint", "log_metrics"])
def test_the_preemption_learns_the_step_from_any_step_call_of_the_loop(tmp_path: Path, report: str) -> None:
    """A loop that calls only should_checkpoint(), or only log_metrics(), is stopped at the step too."""
    with pytest.raises(SystemExit), testing.init(tmp_path, preempt_at=6, checkpoint_every_steps=4) as run:
        _, trained, _ = _train(run, report=report)
    assert trained[-1] == 6
    assert run.preemption.stopped_at == 6  # type: ignore[attr-defined]


def test_a_testing_run_ignores_the_podtrain_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PODTRAIN_* pointing at a real run (and torchrun's ranks) neither reach the run nor receive anything."""
    real = tmp_path / "real-run"
    for name, value in {
        "PODTRAIN_CHECKPOINT_URI": (real / "checkpoints").as_uri(),
        "PODTRAIN_ARTIFACT_URI": str(real / "artifacts"),
        "PODTRAIN_OUTPUT_DIR": str(real / "output"),
        "PODTRAIN_DATA_DIR": str(real / "data"),
        "PODTRAIN_REPORT_FILE": str(real / "report.json"),
        "PODTRAIN_RUN_ID": "production",
        "PODTRAIN_ATTEMPT": "7",
        "PODTRAIN_CHECKPOINT_MODE": "bogus",
        "WORLD_SIZE": "2",
        "RANK": "1",
    }.items():
        monkeypatch.setenv(name, value)
    with (
        pytest.raises(SystemExit) as stopped,
        testing.init(tmp_path / "test", preempt_at=3, checkpoint_mode="sync") as run,
    ):
        _, trained, _ = _train(run)
        run.log_metrics(trained[-1], loss=0.5)
    assert stopped.value.code == 75
    assert not real.exists()
    assert (run.config.run_id, run.config.world_size, run.checkpointer.attempt) == ("test", 1, 1)
    assert testing.committed_steps(run) == [1, 2, 3]
    assert [record["step"] for record in testing.metrics(run)] == [3]
    assert Path(run.config.output_dir) == tmp_path / "test" / "output"


def test_a_testing_run_installs_no_signal_handler(tmp_path: Path) -> None:
    stop_signals = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    before = [signal.getsignal(s) for s in stop_signals]
    with pytest.raises(SystemExit), testing.init(tmp_path, preempt_at=2) as run:
        during = [signal.getsignal(s) for s in stop_signals]
        _train(run)
    assert during == before
    assert [signal.getsignal(s) for s in stop_signals] == before


def test_a_preempted_run_on_another_thread_exits_75_there(tmp_path: Path) -> None:
    """No signal is sent or caught, so a test whose loop runs off the main thread works the same."""
    outcome: dict[str, Any] = {}

    def body() -> None:
        try:
            with testing.init(tmp_path, preempt_at=4, checkpoint_every_steps=2, checkpoint_mode="sync") as run:
                outcome["trained"] = _train(run)[1]
        except SystemExit as exc:
            outcome["code"] = exc.code
        except BaseException as exc:
            outcome["error"] = exc
        outcome["committed"] = testing.committed_steps(run)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive()
    assert outcome == {"trained": [1, 2, 3, 4], "code": 75, "committed": [2, 4]}


def test_the_simulated_deadline_never_comes_so_the_block_never_ends_the_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """sdk.init() ends a stopped run with os._exit when under TEARDOWN_RESERVE seconds are left; a simulated
    preemption's time stands still, however long the test's emergency save takes."""
    clock = ManualClock(1000.0)
    monkeypatch.setattr("time.monotonic", clock)
    preemption = testing.SimulatedPreemption(at_step=3)
    preemption.reached(3)
    clock.now += 3600
    assert preemption.requested
    assert preemption.seconds_left() == 20.0 >= TEARDOWN_RESERVE


def test_a_grace_too_short_for_a_normal_exit_is_refused_before_the_run_opens(tmp_path: Path) -> None:
    """A 5 s grace leaves 3 s: sdk.init() would end the test process with os._exit; refused with the reason."""
    with pytest.raises(ValueError, match=r"os\._exit"), testing.init(tmp_path, preempt_at=1, grace_seconds=5):
        pytest.fail("the run opened")
    assert not (tmp_path / "checkpoints").exists()


def test_capture_logs_sees_the_runs_events_which_structlogs_own_capture_misses(tmp_path: Path) -> None:
    with (
        structlog.testing.capture_logs() as structlog_events,
        testing.capture_logs() as events,
        pytest.raises(SystemExit),
        testing.init(tmp_path, preempt_at=2, checkpoint_every_steps=5) as run,
    ):
        _train(run)
    assert structlog_events == []
    names = [e["event"] for e in events]
    assert names[0] == "run.start"
    preempted = next(e for e in events if e["event"] == "run.preempted")
    assert (preempted["saved_now"], preempted["checkpoint"], preempted["run_id"]) == (True, 2, "test")


def test_the_structlog_configuration_is_put_back_when_the_run_ends(tmp_path: Path) -> None:
    sdk.log.configure(fmt="json")
    before = structlog.get_config()["processors"]
    with pytest.raises(SystemExit), testing.init(tmp_path, preempt_at=1) as run:
        assert structlog.get_config()["processors"] != before
        _train(run)
    assert structlog.get_config()["processors"] == before

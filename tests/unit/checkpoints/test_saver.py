"""Asynchronous checkpoints: snapshot consistency, one save in flight, failures that surface, overlap mode."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import sdk
from sdk.checkpoints._snapshot import Snapshot
from sdk.checkpoints.checkpointer import Checkpointer
from sdk.checkpoints.saver import MAX_TRANSIENT_FAILURES, AsyncSaver
from sdk.config import Config
from sdk.errors import StoragePermissionError, TransientStorageError
from sdk.lifecycle.preemption import Preemption
from sdk.run import Run
from tests.conftest import CapturedLog, WriteGate


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 2))


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _loaded(url: str, step: int | None = None) -> dict[str, torch.Tensor]:
    fresh = _model()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    assert Checkpointer(url, attempt=99).load({"model": fresh}, step=step) is not None
    return _weights(fresh)


@pytest.fixture
def run_factory(tmp_path: Path) -> Iterator[Callable[..., Run]]:
    runs: list[Run] = []

    def make(**changes: Any) -> Run:
        config = Config(checkpoint_uri=str(tmp_path / "ckpt"), attempt=1, keep_last=10).with_changes(**changes)
        run = Run(config, Checkpointer.from_config(config), Preemption(30))
        runs.append(run)
        return run

    yield make
    for run in runs:
        run.close(failed=True, timeout=10)


def test_weights_changed_right_after_checkpoint_are_not_in_the_committed_checkpoint(
    run_factory: Callable[..., Run], tmp_path: Path
) -> None:
    """checkpoint() returns before the write; mutating the weights at once leaves the old values committed."""
    run = run_factory()
    model = _model()
    before = _weights(model)
    gate = WriteGate(run.checkpointer)
    future = run.checkpoint(1, {"model": model})
    assert future is not None and not future.done()
    assert gate.entered.wait(10)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].running_mean.add_(5.0)  # type: ignore[operator]
    gate.open.set()
    info = future.result(timeout=30)
    assert info.step == 1
    saved = _loaded(str(tmp_path / "ckpt"))
    assert all(torch.equal(saved[k], before[k]) for k in before)
    assert not torch.equal(saved["0.weight"], model[0].weight)


def test_overlap_mode_copies_parameters_before_the_next_optimizer_step(
    run_factory: Callable[..., Run], tmp_path: Path
) -> None:
    """In overlap mode the next forward/backward run first; optimizer.step() waits for the copy to be done."""
    run = run_factory(checkpoint_mode="overlap")
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    x = torch.randn(4, 8)
    model(x).sum().backward()
    optimizer.step()
    before = _weights(model)
    momentum = {k: v["momentum_buffer"].clone() for k, v in optimizer.state.items()}
    gate = WriteGate(run.checkpointer)
    future = run.checkpoint(1, {"model": model, "optimizer": optimizer})
    assert future is not None
    assert gate.entered.wait(10)  # the writer's snapshot.wait() ran before the gate: copies are done now
    # the next step: forward changes BatchNorm statistics (copied at the call), the optimizer changes parameters
    optimizer.zero_grad()
    model(x).sum().backward()
    optimizer.step()
    gate.open.set()
    future.result(timeout=30)
    saved = _loaded(str(tmp_path / "ckpt"))
    assert all(torch.equal(saved[k], before[k]) for k in before)
    restored_opt = torch.optim.SGD(_model().parameters(), lr=0.5, momentum=0.9)
    Checkpointer(str(tmp_path / "ckpt"), attempt=99).load({"model": _model(), "optimizer": restored_opt})
    saved_momenta = [s["momentum_buffer"] for s in restored_opt.state_dict()["state"].values()]
    assert all(torch.equal(a, b) for a, b in zip(saved_momenta, momentum.values(), strict=True))


def test_overlap_step_before_the_background_copy_waits_for_it(run_factory: Callable[..., Run], tmp_path: Path) -> None:
    """An optimizer step that comes before the background copy makes the copy itself, then steps."""
    run = run_factory(checkpoint_mode="overlap")
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    before = _weights(model)
    assert run.saver is not None
    snapshot = run.saver.snapshot
    finish = snapshot.finish
    calls: list[str] = []

    def slow_background_finish() -> None:  # the background thread's call comes late
        calls.append(threading.current_thread().name)
        finish()

    block = threading.Event()
    original_wait = snapshot.wait

    def late_wait() -> None:
        block.wait(30)
        original_wait()

    snapshot.wait = late_wait  # type: ignore[method-assign]
    snapshot.finish = slow_background_finish  # type: ignore[method-assign]
    future = run.checkpoint(1, {"model": model, "optimizer": optimizer})
    assert future is not None and snapshot.pending
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()  # the pre-hook copies first
    assert calls == [threading.main_thread().name]
    assert not snapshot.pending
    assert run.saver.last_hook_wait > 0, "the time the step waited for the copy is measured"
    block.set()
    future.result(timeout=30)
    saved = _loaded(str(tmp_path / "ckpt"))
    assert all(torch.equal(saved[k], before[k]) for k in before)


def test_a_policy_save_due_while_one_is_in_flight_is_deferred_to_the_next_call(
    run_factory: Callable[..., Run], tmp_path: Path
) -> None:
    """At most one save in flight: a due save returns None at once, and the next call saves, due or not."""
    run = run_factory(checkpoint_every_steps=5)
    model = _model()
    gate = WriteGate(run.checkpointer)
    first = run.checkpoint(5, {"model": model})
    assert first is not None and gate.entered.wait(10)
    assert run.checkpoint(10, {"model": model}) is None  # due, but step 5 is still being written
    assert run.deferred_saves == 1
    gate.open.set()
    first.result(timeout=30)
    owed = run.checkpoint(11, {"model": model})  # not due by the policy; saved because 10 was deferred
    assert owed is not None and owed.result(timeout=30).step == 11
    assert run.checkpoint(12, {"model": model}) is None
    assert [c.step for c in Checkpointer(str(tmp_path / "ckpt"), attempt=9).list()] == [11, 5]


def test_force_waits_for_the_save_in_flight_then_saves(run_factory: Callable[..., Run]) -> None:
    """force=True never drops a save: it waits for the one in flight, then writes its own step."""
    run = run_factory()
    model = _model()
    gate = WriteGate(run.checkpointer)
    first = run.checkpoint(1, {"model": model})
    assert first is not None and gate.entered.wait(10)
    threading.Timer(0.2, gate.open.set).start()
    forced = run.checkpoint(2, {"model": model}, force=True)
    assert first.done()
    assert forced is not None and forced.result(timeout=30).step == 2


def test_snapshot_buffers_are_reused_between_saves() -> None:
    """The second snapshot of the same state copies into the same buffers: no allocation after the first."""
    model = _model()
    snapshot = Snapshot(pin_memory=False)
    first = dict(snapshot.take([("model", model.state_dict())]))["model"]
    pointers = {k: v.data_ptr() for k, v in first.items()}
    with torch.no_grad():
        model[0].weight.add_(1)
    second = dict(snapshot.take([("model", model.state_dict())]))["model"]
    assert {k: v.data_ptr() for k, v in second.items()} == pointers
    assert torch.equal(second["0.weight"], model[0].weight)
    assert snapshot.buffer_bytes == sum(v.numel() * v.element_size() for v in model.state_dict().values())


def test_snapshot_copies_nested_optimizer_state_and_shares_nothing() -> None:
    """An optimizer's nested state (int keys, lists, floats, tensors) comes back equal, and detached from it."""
    model = _model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()
    live = optimizer.state_dict()
    copied = dict(Snapshot().take([("optimizer", live)]))["optimizer"]
    assert copied["param_groups"] == live["param_groups"] and copied["param_groups"] is not live["param_groups"]
    for key, per_param in live["state"].items():
        for name, value in per_param.items():
            assert torch.equal(copied["state"][key][name], value)
            assert copied["state"][key][name].data_ptr() != value.data_ptr()


def test_a_permanent_background_failure_is_logged_then_raised_at_the_next_call(
    run_factory: Callable[..., Run], captured_log: CapturedLog
) -> None:
    """Access denied while writing in the background: logged at once, raised by the next checkpoint() call."""
    run = run_factory()

    def denied(*args: Any, **kwargs: Any) -> Any:
        raise StoragePermissionError("access denied to s3://b/x: check the credentials", url="s3://b/x")

    run.checkpointer.write = denied  # type: ignore[method-assign]
    future = run.checkpoint(1, {"model": _model()})
    assert future is not None
    with pytest.raises(StoragePermissionError):
        future.result(timeout=30)
    failed = captured_log.records("checkpoint.failed")
    assert failed and failed[0]["step"] == 1 and failed[0]["transient"] is False
    with pytest.raises(StoragePermissionError, match="credentials"):
        run.checkpoint(2, {"model": _model()})


def test_transient_background_failures_are_raised_only_after_several_in_a_row(
    run_factory: Callable[..., Run], captured_log: CapturedLog
) -> None:
    """A store down through its retries: each failure is logged; training goes on until three in a row."""
    run = run_factory()

    def down(*args: Any, **kwargs: Any) -> Any:
        raise TransientStorageError("503 from s3://b/x after 5 tries", url="s3://b/x")

    run.checkpointer.write = down  # type: ignore[method-assign]
    model = _model()
    for step in range(1, MAX_TRANSIENT_FAILURES):
        future = run.checkpoint(step, {"model": model})
        assert future is not None
        with pytest.raises(TransientStorageError):
            future.result(timeout=30)
    last = run.checkpoint(MAX_TRANSIENT_FAILURES, {"model": model})
    assert last is not None
    with pytest.raises(TransientStorageError):
        last.result(timeout=30)
    assert len(captured_log.records("checkpoint.failed")) == MAX_TRANSIENT_FAILURES
    with pytest.raises(TransientStorageError):
        run.checkpoint(MAX_TRANSIENT_FAILURES + 1, {"model": model})


def test_leaving_the_block_waits_for_the_save_in_flight(tmp_path: Path) -> None:
    """The end of `with sdk.init()` lets the last asynchronous save commit before the process goes on."""
    model = _model()
    with sdk.init(Config(checkpoint_uri=str(tmp_path), attempt=1)) as run:
        run.checkpoint(7, {"model": model})
    assert [c.step for c in Checkpointer(str(tmp_path), attempt=2).list()] == [7]
    assert run.last_checkpoint is not None and run.last_checkpoint.step == 7


def test_preemption_waits_for_the_save_in_flight_then_commits_the_newest_step(tmp_path: Path) -> None:
    """A stop while step 10 is being written: step 10 commits, then step 12 is saved as the emergency save."""
    stop = Preemption(30)
    model = _model()
    with (
        pytest.raises(SystemExit) as exited,
        sdk.init(Config(checkpoint_uri=str(tmp_path), attempt=1, checkpoint_every_steps=10), preemption=stop) as run,
    ):
        gate = WriteGate(run.checkpointer)
        for step in range(1, 100):
            run.checkpoint(step, {"model": model})
            if step == 12:
                stop.request()
                threading.Timer(0.2, gate.open.set).start()
            if run.should_stop():
                break
    assert exited.value.code == 75
    found = Checkpointer(str(tmp_path), attempt=2).list()
    assert [c.step for c in found] == [12, 10]
    assert found[0].manifest.meta == {"emergency": True}


def test_async_saver_reports_the_stall_and_the_write_time(tmp_path: Path) -> None:
    """The saver measures how long submit blocked and how long the background write took."""
    saver = AsyncSaver(Checkpointer(str(tmp_path), attempt=1))
    saver.submit(1, {"model": _model()})
    assert saver.close(timeout=30)
    assert saver.last_stall is not None and saver.last_stall >= 0
    assert len(saver.write_seconds) == 1 and saver.write_seconds[0] > 0
    assert saver.last_committed is not None and saver.last_committed.step == 1


def test_a_waiter_woken_by_the_save_finds_its_outcome_recorded(tmp_path: Path) -> None:
    """wait() returning means last_committed (or the failure to raise) is already set: no window between."""
    saver = AsyncSaver(Checkpointer(str(tmp_path), attempt=1, keep_last=1))
    model = torch.nn.Linear(2, 2)
    for step in range(1, 31):
        saver.submit(step, {"model": model})
        assert saver.wait(timeout=30)
        assert saver.last_committed is not None and saver.last_committed.step == step
    assert saver.close(timeout=30)

"""The supervisor's data pull: a SIGTERM during it stops the pull and no error is reported."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from entrypoint.commands.data import pull_before_child
from sdk.config import Config


class _Log:
    def __init__(self) -> None:
        self.events: list[str] = []

    def __getattr__(self, level: str) -> Any:
        return lambda event, **fields: self.events.append(event)


def test_a_sigterm_during_the_pull_cancels_it_and_the_child_is_left_to_the_supervisor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """stopped() turning true: the pull's cancel event is set, the call returns None (no failure to report)."""
    seen: dict[str, threading.Event] = {}

    def slow_pull(*args: Any, cancel: threading.Event, **kwargs: Any) -> Any:
        seen["cancel"] = cancel
        assert cancel.wait(10), "never cancelled"
        raise RuntimeError("cancelled")

    monkeypatch.setattr("sdk.data.pull.pull", slow_pull)
    config = Config(data_uri=(tmp_path / "s").as_uri(), data_dir=str(tmp_path / "d"), grace_seconds=4)
    calls = iter([False, False, True])
    log = _Log()
    assert pull_before_child(config, lambda: next(calls, True), log, poll=0.01) == (None, None)
    assert seen["cancel"].is_set()
    assert log.events == ["supervisor.pull_stopped"]


def test_no_data_uri_means_no_pull(tmp_path: Path) -> None:
    """Without PODTRAIN_DATA_URI nothing is pulled and nothing logged."""
    log = _Log()
    assert pull_before_child(Config(data_dir=str(tmp_path)), lambda: False, log) == (None, None)
    assert log.events == []

"""entrypoint.early: the console script's first code, and what it does once the command has returned."""

from __future__ import annotations

import gc
import sys

import pytest

from entrypoint import cli, early


@pytest.fixture
def freezes(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Every gc.freeze() call, with the CLI itself replaced by one that returns 0."""
    calls: list[bool] = []
    monkeypatch.setattr(gc, "freeze", lambda: calls.append(True))
    monkeypatch.setattr(cli, "main", lambda argv, early: 0)
    return calls


def test_the_console_script_freezes_the_heap_once_its_command_returned(
    freezes: list[bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`podtrain …` (argv from sys.argv) ends by freezing: the exiting interpreter skips collecting it all."""
    monkeypatch.setattr(sys, "argv", ["podtrain", "record", "s3://b/r"])
    assert early.main() == 0
    assert freezes == [True]


def test_a_caller_passing_arguments_keeps_its_collector(freezes: list[bool]) -> None:
    """main(argv) from Python (tests, an embedding program) goes on running afterwards: nothing is frozen."""
    assert early.main(["record", "s3://b/r"]) == 0
    assert freezes == []

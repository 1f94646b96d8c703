"""entrypoint._timebox: a call given a time limit returns its value, or says why it has none."""

from __future__ import annotations

import threading

from entrypoint._timebox import within


def test_a_call_that_returns_in_time_gives_its_value() -> None:
    """The value comes back with an empty reason."""
    assert within(5.0, lambda: 42, "podtrain-test") == (42, "")


def test_a_call_that_raises_gives_the_reason_not_the_exception() -> None:
    """An exception is reported as unreadable, with its text; nothing is raised."""

    def fail() -> None:
        raise OSError("connection refused")

    assert within(5.0, fail, "podtrain-test") == (None, "unreadable: connection refused")


def test_a_call_past_its_time_is_left_behind() -> None:
    """A call still running when the time is up gives no value and the time it was given; it goes on, unwaited."""
    release = threading.Event()
    done = threading.Event()

    def slow() -> None:
        release.wait()
        done.set()

    assert within(0.0, slow, "podtrain-test") == (None, "did not answer within 0.0 s")
    release.set()
    assert done.wait(5.0), "the call left behind still ends by itself"

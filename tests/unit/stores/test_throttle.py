"""The AIMD request limit (sdk.stores._throttle) and the retry loop's throttling policy (sdk.stores.store), without a
server.

The limit is driven directly; the retry loop runs on fsspec's memory:// store with a backend whose calls answer
S3 SlowDown on demand, and a fake time whose sleep moves its clock: nothing here sleeps or waits on a server.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest

from sdk.errors import (
    ConfigError,
    StorageNotFoundError,
    ThrottledStorageError,
    TransientStorageError,
    exit_code,
)
from sdk.outcomes import EXIT_UNAVAILABLE
from sdk.stores._s3http import S3Error
from sdk.stores._throttle import CEILING, AdaptiveLimit
from sdk.stores.store import RetryPolicy, Store, open_store

if TYPE_CHECKING:
    from tests.conftest import CapturedLog


class FakeTime:
    """A sleep that moves a clock instead of waiting."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now


def _slowdown() -> S3Error:
    return S3Error(503, "SlowDown", "Please reduce your request rate. (GET http://s3/b/k)")


class Answers:
    """Wraps a store's backend: each ``read`` first takes the next queued exception (or keeps raising ``forever``)."""

    def __init__(self, inner: Any, queued: list[BaseException], forever: Callable[[], BaseException] | None) -> None:
        self.inner, self.queued, self.forever = inner, list(queued), forever
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def read(self, path: str, start: int | None = None, end: int | None = None) -> tuple[bytes, dict[str, Any]]:
        self.calls += 1
        if self.queued:
            raise self.queued.pop(0)
        if self.forever is not None:
            raise self.forever()
        data, sums = self.inner.read(path, start, end)
        return bytes(data), dict(sums)


def _answers(store: Store, *queued: BaseException, forever: Callable[[], BaseException] | None = None) -> Answers:
    answers = Answers(store.backend, list(queued), forever)
    store.backend = answers
    return answers


@pytest.fixture
def fake_time() -> FakeTime:
    return FakeTime()


def _store(url: str, fake_time: FakeTime, **policy: Any) -> Store:
    store = open_store(url, retry=RetryPolicy(**policy), sleep=fake_time.sleep, clock=fake_time.clock)
    store.put("obj", b"payload")
    return store


# -- the limit --------------------------------------------------------------------------------------------------
def test_before_any_throttling_the_limit_is_the_ceiling() -> None:
    """An unthrottled store is not limited in practice: the ceiling is above any caller's concurrency."""
    limit = AdaptiveLimit("s3://b")
    tickets = [limit.acquire() for _ in range(64)]
    assert limit.limit == CEILING and limit.in_flight == 64
    for ticket in tickets:
        limit.release(ticket, "ok")
    assert limit.in_flight == 0 and limit.episode_start is None


def test_a_throttled_round_halves_the_requests_in_flight_once(captured_log: CapturedLog) -> None:
    """16 requests in flight all throttled: the limit halves once, to 8 — the other 15 answers belong to the same
    congestion. A request sent after the decrease and throttled halves it again."""
    limit = AdaptiveLimit("s3://b", clock=lambda: 5.0)
    tickets = [limit.acquire() for _ in range(16)]
    for ticket in tickets:
        limit.release(ticket, "throttled")
    assert limit.limit == 8 and limit.episode_start == 5.0
    later = [limit.acquire() for _ in range(8)]
    limit.release(later[0], "throttled")
    assert limit.limit == 4
    assert [line["limit"] for line in captured_log.records("storage.throttle")] == [8, 4]
    assert captured_log.records("storage.throttle")[0]["url"] == "s3://b"


def test_the_limit_never_goes_below_one() -> None:
    """Throttled again and again with one request in flight, the store still gets one request at a time."""
    limit = AdaptiveLimit("s3://b")
    for _ in range(20):
        limit.release(limit.acquire(), "throttled")
    assert limit.limit == 1 and limit.lowest == 1


def test_each_clean_window_adds_one_and_the_first_ends_the_episode(captured_log: CapturedLog) -> None:
    """At limit L, L answers without throttling raise it to L+1; the throttling episode ends with a log line."""
    clock = iter([10.0, 12.5])
    limit = AdaptiveLimit("gs://b", clock=lambda: next(clock))
    tickets = [limit.acquire() for _ in range(8)]
    limit.release(tickets[0], "throttled")
    assert limit.limit == 4
    for ticket in tickets[1:5]:
        limit.release(ticket, "ok")
    assert limit.limit == 5 and limit.episode_start is None
    over = captured_log.records("storage.throttle_over")
    assert len(over) == 1 and over[0]["seconds"] == 2.5 and over[0]["lowest_limit"] == 4
    for _ in range(5):
        limit.release(limit.acquire(), "ok")
    assert limit.limit == 6


def test_answers_that_failed_neither_shrink_nor_grow_the_limit() -> None:
    """A reset or a timeout says nothing about the request rate: no decrease, and no credit towards a window."""
    limit = AdaptiveLimit("s3://b")
    limit.release(limit.acquire(), "throttled")
    for _ in range(5):
        limit.release(limit.acquire(), "failed")
    assert limit.limit == 1 and limit.episode_start is not None


def test_acquire_waits_until_a_slot_is_free() -> None:
    """With the limit at 2, a third request waits until one of the two in flight gives its slot back."""
    limit = AdaptiveLimit("s3://b")
    first = [limit.acquire() for _ in range(4)]
    limit.release(first[0], "throttled")  # 4 in flight -> limit 2
    for ticket in first[1:3]:
        limit.release(ticket, "failed")  # 1 left in flight
    held = limit.acquire()  # 2 in flight: full
    entered = threading.Event()

    def enter() -> None:
        limit.acquire()
        entered.set()

    waiter = threading.Thread(target=enter, daemon=True)
    waiter.start()
    assert not entered.wait(0.2), "no slot is free: the request waits"
    limit.release(held, "ok")
    assert entered.wait(10)
    assert limit.in_flight == 2


def test_a_ceiling_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        AdaptiveLimit("s3://b", ceiling=0)


# -- the retry loop -----------------------------------------------------------------------------------------------
def test_throttled_answers_do_not_count_as_attempts(memory_url: str, fake_time: FakeTime) -> None:
    """10 SlowDowns in a row with attempts=2: still fetched; one wait before each of the 10 retries."""
    store = _store(memory_url, fake_time, attempts=2)
    answers = _answers(store, *(_slowdown() for _ in range(10)))
    assert store.get("obj") == b"payload"
    assert answers.calls == 11 and len(fake_time.sleeps) == 10


def test_throttled_waits_are_full_jitter_capped_at_the_stall_window(memory_url: str, fake_time: FakeTime) -> None:
    """Before the n-th throttled retry: a wait in [0, min(initial * 2**(n-1), max, timeout)]; not always the cap."""
    store = _store(memory_url, fake_time, throttle_initial_wait=0.5, throttle_max_wait=30.0, timeout=3.0)
    _answers(store, *(_slowdown() for _ in range(40)))
    store.get("obj")
    for n, wait in enumerate(fake_time.sleeps, start=1):
        assert 0 <= wait <= min(0.5 * 2 ** (n - 1), 3.0)
    assert len(set(fake_time.sleeps)) > 1


def test_ordinary_transient_errors_keep_their_waits_between_throttles(memory_url: str, fake_time: FakeTime) -> None:
    """Resets interleaved with SlowDowns: the resets' waits are today's (0.25, 0.5, 1.0 without jitter), counted
    among themselves; the third reset with attempts=3 ends the call."""
    store = _store(memory_url, fake_time, attempts=3, jitter=0.0, throttle_initial_wait=0.0)
    reset = ConnectionResetError
    _answers(store, reset(), _slowdown(), reset(), _slowdown(), _slowdown(), reset())
    with pytest.raises(TransientStorageError, match="still failing after 6 attempts") as caught:
        store.get("obj")
    assert not isinstance(caught.value, ThrottledStorageError)
    assert fake_time.sleeps == [0.25, 0.0, 0.5, 0.0, 0.0]


def test_a_throttle_that_never_ends_gives_up_at_the_budget_in_one_line(
    memory_url: str, fake_time: FakeTime, captured_log: CapturedLog
) -> None:
    """SlowDown forever: the call retries until 120 s of throttling, then raises one line naming the budget's
    setting and what to do; the waits add up to the budget, not past it; exit code 69."""
    store = _store(memory_url, fake_time, throttle_seconds=120.0)
    _answers(store, forever=_slowdown)
    with pytest.raises(ThrottledStorageError) as caught:
        store.get("ckpt/shard-0")
    assert fake_time.now == pytest.approx(120.0)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"get {store.url_of('ckpt/shard-0')}: the store kept throttling this request")
    assert "for 120 s, past the 120 s throttling budget (PODTRAIN_THROTTLE_SECONDS)" in message
    assert "retry later" in message and message.endswith(
        "last answer: S3Error: 503 SlowDown: Please reduce your request rate. (GET http://s3/b/k)"
    )
    assert caught.value.url == store.url_of("ckpt/shard-0")
    assert exit_code(caught.value) == EXIT_UNAVAILABLE
    assert all(line["throttled"] for line in captured_log.records("storage.retry"))


def test_the_budget_runs_from_each_request_s_own_first_throttled_answer(memory_url: str, fake_time: FakeTime) -> None:
    """A store that lets other requests through is followed at its pace: a request first throttled 100 s into
    the store's throttling episode still gets its own 120 s before it gives up."""
    store = _store(memory_url, fake_time, throttle_seconds=120.0)
    store.limiter.release(store.limiter.acquire(), "throttled")  # the episode starts at 0
    fake_time.now = 100.0
    _answers(store, forever=_slowdown)
    with pytest.raises(ThrottledStorageError, match="for 120 s"):
        store.get("obj")
    assert fake_time.now == pytest.approx(220.0)


def test_permanent_errors_are_answers_and_are_not_retried(memory_url: str, fake_time: FakeTime) -> None:
    """A 404 during a throttling episode fails at once, and counts towards the clean window."""
    store = _store(memory_url, fake_time)
    store.limiter.release(store.limiter.acquire(), "throttled")
    with pytest.raises(StorageNotFoundError):
        store.get("missing")
    assert fake_time.sleeps == [] and store.limiter.limit == 2


def test_store_calls_wait_for_the_limit_and_children_share_it(memory_url: str, fake_time: FakeTime) -> None:
    """Every store call takes a slot of its store's limit, shared with its children: with the limit at 1 and
    that slot held, a child's get waits until it is given back."""
    store = _store(memory_url, fake_time)
    child = store.child("sub")
    assert child.limiter is store.limiter
    store.limiter.release(store.limiter.acquire(), "throttled")
    held = store.limiter.acquire()
    done = threading.Event()

    def look() -> None:
        child.exists("x")
        done.set()

    waiter = threading.Thread(target=look, daemon=True)
    waiter.start()
    assert not done.wait(0.2)
    store.limiter.release(held, "ok")
    assert done.wait(10)


def test_sixteen_threads_through_a_throttling_store_all_get_through_and_give_every_slot_back(memory_url: str) -> None:
    """16 threads, 10 reads each, through one store whose backend throttles its first 40 answers: every read
    returns the object, the limit went down from the requests in flight, and no slot is left taken."""
    store = open_store(memory_url, retry=RetryPolicy(throttle_initial_wait=0.001, throttle_max_wait=0.002))
    store.put("obj", b"x")
    lock, throttles, results = threading.Lock(), [40], []
    real_read = store.backend.read

    def read(path: str, start: int | None = None, end: int | None = None) -> tuple[bytes, dict[str, Any]]:
        time.sleep(0.001)
        with lock:
            throttles[0] -= 1
            if throttles[0] >= 0:
                raise _slowdown()
        return real_read(path, start, end)

    store.backend.read = read  # type: ignore[method-assign]

    def reader() -> None:
        for _ in range(10):
            results.append(store.get("obj"))

    threads = [threading.Thread(target=reader) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == [b"x"] * 160
    assert store.limiter.lowest < 16
    assert store.limiter.in_flight == 0


@pytest.mark.parametrize(
    "options",
    [{"throttle_seconds": 0}, {"throttle_seconds": float("inf")}, {"throttle_initial_wait": 5, "throttle_max_wait": 1}],
)
def test_a_policy_without_a_finite_budget_is_refused(options: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        RetryPolicy(**options)  # type: ignore[arg-type]

"""sdk.lifecycle.peers: ranks that stop beating in the rendezvous store are named, the store's own silence too."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta

import pytest
import torch.distributed as dist

from sdk.lifecycle import peers
from sdk.lifecycle.peers import DONE, FAILED, PeerWatch
from tests.conftest import ManualClock

PREFIX = "podtrain/peers/attempt-1"


def key(rank: int) -> str:
    return f"{PREFIX}/beat/{rank}"


class FakeStore:
    """A c10d store in a dict: ``add`` creates a key at 0, ``multi_get`` answers ASCII ints (a missing key is an
    error, where TCPStore would wait for it). ``error``: raised by every call while set. ``frozen``: keys whose adds
    are lost."""

    def __init__(self) -> None:
        self.values: dict[str, int] = {}
        self.adds: list[tuple[str, int]] = []
        self.error: Exception | None = None
        self.frozen: set[str] = set()

    def add(self, key: str, amount: int) -> int:
        if self.error is not None:
            raise self.error
        self.adds.append((key, amount))
        if key not in self.frozen:
            self.values[key] = self.values.get(key, 0) + amount
        return self.values.get(key, 0)

    def multi_get(self, keys: list[str]) -> list[bytes]:
        if self.error is not None:
            raise self.error
        return [str(self.values[k]).encode("ascii") for k in keys]


def never_called(why: str, failed: bool) -> None:
    raise AssertionError(f"on_silent is the thread's, not check()'s: {why}")


def watch(
    store: FakeStore,
    clock: Callable[[], float],
    *,
    rank: int = 0,
    world_size: int = 4,
    silence: float = 10.0,
    where: str = "the rendezvous store",
) -> PeerWatch:
    return PeerWatch(
        store,
        rank=rank,
        world_size=world_size,
        prefix=PREFIX,
        silence=silence,
        on_silent=never_called,
        where=where,
        clock=clock,
    )


def started_store(world_size: int) -> FakeStore:
    """Every rank's counter created at 0, as start() leaves them."""
    store = FakeStore()
    for rank in range(world_size):
        store.add(key(rank), 0)
    return store


def run_until(
    store: FakeStore, clock: ManualClock, me: PeerWatch, last_beat: dict[int, float], until: int, *, start: int = 0
) -> tuple[str, bool] | None:
    """Each second from ``start`` to ``until``: every rank in ``last_beat`` beats while ``now`` <= its last beat,
    then ``me`` checks; the first thing check() found, or None."""
    for second in range(start, until + 1):
        clock.now = float(second)
        for rank, last in last_beat.items():
            if second <= last:
                store.add(key(rank), 1)
        found = me.check()
        if found is not None:
            return found
    return None


def test_a_rank_that_stops_beating_is_named_after_silence_seconds_not_before() -> None:
    """Rank 2's counter last moves at 0: nothing at 9 s, 'rank 2 went silent' at 10 s; the ranks still beating
    are not named."""
    store, clock = started_store(4), ManualClock()
    me = watch(store, clock)
    alive = {1: 1e9, 2: 0.0, 3: 1e9}
    assert run_until(store, clock, me, alive, 9) is None
    found = run_until(store, clock, me, alive, 10, start=10)
    assert found is not None
    why, failed = found
    assert why.startswith("rank 2 went silent") and not failed
    assert "rank 1" not in why and "3" not in why


def test_ranks_that_went_a_little_later_are_named_with_the_first_when_they_missed_two_beats() -> None:
    """Rank 2 stops at 0 and rank 3 at 3 (both gone): 'ranks 2, 3'; rank 4, which missed one beat, is not named."""
    store, clock = started_store(5), ManualClock()
    me = watch(store, clock, world_size=5)
    found = run_until(store, clock, me, {1: 1e9, 2: 0.0, 3: 3.0, 4: 9.0}, 10)
    assert found is not None
    why, failed = found
    assert why.startswith("ranks 2, 3 went silent") and not failed
    assert "4" not in why.split("went")[0]


def test_a_rank_that_never_started_is_never_silent() -> None:
    """A counter still at 0 (the rank has not beaten yet) is not a silence, however long it stays there."""
    store, clock = started_store(3), ManualClock()
    me = watch(store, clock, world_size=3)
    assert run_until(store, clock, me, {1: 1e9}, 100) is None
    assert store.values[key(2)] == 0


def test_a_rank_that_is_done_is_never_silent() -> None:
    """A rank that left the block (its stop() added DONE) stops beating without being taken for silent."""
    store, clock = started_store(3), ManualClock()
    me = watch(store, clock, world_size=3)
    assert run_until(store, clock, me, {1: 1e9, 2: 2.0}, 2) is None
    watch(store, clock, rank=2, world_size=3).stop()
    assert store.values[key(2)] >= DONE
    assert run_until(store, clock, me, {1: 1e9}, 100, start=3) is None


def test_a_rank_marked_failed_makes_check_return_at_once_naming_it() -> None:
    """A rank whose stop(failed=True) added FAILED: check() returns (a reason naming it, True) without waiting
    for a silence."""
    store, clock = started_store(3), ManualClock()
    me = watch(store, clock, world_size=3)
    assert run_until(store, clock, me, {1: 1e9, 2: 1e9}, 1) is None
    watch(store, clock, rank=2, world_size=3).stop(failed=True)
    assert store.values[key(2)] >= FAILED
    clock.now = 1.5
    found = me.check()
    assert found is not None
    why, failed = found
    assert why.startswith("rank 2 failed") and failed


def test_this_rank_is_never_named_silent_or_failed() -> None:
    """Its own counter frozen in the store, or past FAILED (its own stop), names nobody while the others beat."""
    store, clock = started_store(2), ManualClock()
    store.add(key(0), 1)
    store.frozen.add(key(0))
    me = watch(store, clock, world_size=2)
    assert run_until(store, clock, me, {1: 1e9}, 100) is None
    store.frozen.clear()
    store.add(key(0), FAILED)
    store.frozen.add(key(0))
    assert run_until(store, clock, me, {1: 1e9}, 200, start=101) is None


def test_a_store_that_does_not_answer_is_named_after_silence_seconds_of_failures() -> None:
    """Nothing while the store has failed for less than ``silence`` seconds; then a reason with the store's
    ``where`` and 'has not answered'."""
    store, clock = started_store(2), ManualClock()
    me = watch(store, clock, world_size=2, where="the rendezvous store at 10.0.0.1:29500")
    store.error = ConnectionError("Connection refused")
    for second in range(10):
        clock.now = float(second)
        assert me.check() is None
    clock.now = 9.9
    assert me.check() is None
    clock.now = 10.0
    found = me.check()
    assert found is not None
    why, failed = found
    assert "the rendezvous store at 10.0.0.1:29500 has not answered" in why and not failed
    assert "Connection refused" in why


def test_one_answer_from_the_store_resets_the_count_of_its_failures() -> None:
    """Failures from 0 to 8 s, an answer at 9 s, failures again: nothing until ``silence`` seconds after 10."""
    store, clock = started_store(2), ManualClock()
    me = watch(store, clock, world_size=2)
    store.error = OSError("timeout")
    for second in range(9):
        clock.now = float(second)
        assert me.check() is None
    clock.now, store.error = 9.0, None
    assert me.check() is None
    store.error = OSError("timeout")
    for second in range(10, 20):
        clock.now = float(second)
        assert me.check() is None
    clock.now = 20.0
    assert me.check() is not None


def test_verdict_without_waiting_is_none_when_nothing_was_found() -> None:
    """verdict(timeout=0) answers at once: None, every rank still beats."""
    store, clock = started_store(2), ManualClock()
    me = watch(store, clock, world_size=2, silence=3600)
    assert me.check() is None
    answers: list[str | None] = []
    asking = threading.Thread(target=lambda: answers.append(me.verdict(timeout=0)), daemon=True)
    asking.start()
    asking.join(timeout=5)  # a verdict that waited for its default (silence and two beats) would still be waiting
    assert answers == [None]


def test_start_creates_every_rank_s_counter_and_beats_once_and_stop_marks_done_or_failed_once() -> None:
    """start(): every key added 0, then this rank's 1; stop(): DONE, stop(failed=True): FAILED; a second stop
    writes nothing."""
    store = FakeStore()
    me = PeerWatch(
        store, rank=1, world_size=3, prefix=PREFIX, silence=10, on_silent=never_called, interval=3600
    )  # the thread never beats in this test
    me.start()
    try:
        assert store.adds == [(key(0), 0), (key(1), 0), (key(2), 0), (key(1), 1)]
    finally:
        me.stop()
    assert store.adds[4:] == [(key(1), DONE)]
    me.stop()
    me.stop(failed=True)
    assert len(store.adds) == 5
    assert me._thread is not None
    me._thread.join(timeout=10)
    assert not me._thread.is_alive()

    other = FakeStore()
    failing = PeerWatch(other, rank=0, world_size=2, prefix=PREFIX, silence=10, on_silent=never_called, interval=3600)
    failing.start()
    failing.stop(failed=True)
    failing.stop()
    assert other.adds[3:] == [(key(0), FAILED)]


@pytest.mark.parametrize(("grace", "silence"), [(20, 10.0), (4, 5.0), (300, 60.0)])
def test_silence_is_half_the_grace_period_within_5_and_60_seconds(grace: float, silence: float) -> None:
    """20 s of grace: 10; 4: the floor of 5; 300: the cap of 60."""
    assert peers.silence_for(grace) == silence


@pytest.mark.parametrize(
    ("error", "collective"),
    [
        (RuntimeError("[gloo/transport/tcp/pair.cc:534] Read error [10.0.0.2]:4242: Connection reset by peer"), True),
        (dist.DistBackendError("x"), True),
        (ValueError("Connection reset by peer"), False),
        (RuntimeError("shape mismatch"), False),
    ],
)
def test_collective_failures_are_told_from_other_errors(error: BaseException, collective: bool) -> None:
    """gloo's RuntimeError and torch's DistBackendError are collective failures; a ValueError with the same words,
    or a RuntimeError of the user's, are not."""
    assert peers.collective_failure(error) is collective


@pytest.mark.parametrize(
    ("world_size", "env"),
    [
        (1, {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}),
        (2, {"MASTER_PORT": "1"}),
        (2, {"MASTER_ADDR": "127.0.0.1"}),
        (2, {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": ""}),
        (2, {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500x"}),
        (2, {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "-1"}),
    ],
)
def test_no_watch_for_one_rank_or_without_a_store_to_reach(world_size: int, env: dict[str, str]) -> None:
    """One rank, or no MASTER_ADDR/MASTER_PORT (or a port that is not digits): no watch, and no connection tried
    (a connection to 127.0.0.1:1 would raise)."""
    watch_ = peers.watch_for(
        rank=0, world_size=world_size, attempt=1, grace_seconds=20, on_silent=never_called, env=env
    )
    assert watch_ is None


def test_a_real_tcpstore_names_the_rank_that_stopped_beating() -> None:
    """Two watches over torch's TCPStore on 127.0.0.1: once rank 1 stops beating for ``silence`` seconds (a fake
    clock), rank 0's check names it."""
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10))
    clients = [
        dist.TCPStore("127.0.0.1", server.port, is_master=False, timeout=timedelta(seconds=10)) for _ in range(2)
    ]
    for rank in range(2):  # as start() does, so multi_get never waits for a key
        server.add(key(rank), 0)
    clock = ManualClock()
    watches = [
        PeerWatch(clients[r], rank=r, world_size=2, prefix=PREFIX, silence=5, on_silent=never_called, clock=clock)
        for r in range(2)
    ]
    for second in range(3):  # both beat
        clock.now = float(second)
        assert watches[1].check() is None
        assert watches[0].check() is None
    for second in range(3, 7):  # rank 1 is gone after its beat at 2 s
        clock.now = float(second)
        assert watches[0].check() is None
    clock.now = 7.0
    found = watches[0].check()
    assert found is not None
    assert found[0].startswith("rank 1 went silent") and not found[1]
    assert int(server.get(key(0))) == 8 and int(server.get(key(1))) == 3


def test_a_store_outage_shorter_than_silence_does_not_name_the_ranks_that_could_not_beat_through_it() -> None:
    """Nobody could beat while the store was away: once it answers again, silence is counted from then."""
    store, clock = started_store(2), ManualClock()
    me = watch(store, clock, world_size=2)
    store.add(key(1), 1)
    assert me.check() is None
    store.error = OSError("store down")
    for second in range(1, 11):
        clock.now = float(second)
        assert me.check() is None
    clock.now, store.error = 10.5, None
    assert me.check() is None
    clock.now = 20.0
    store.add(key(1), 1)
    assert me.check() is None


def test_a_second_run_in_one_process_watches_fresh_counters_not_the_ones_the_first_left_done() -> None:
    """Each sdk.init() of a process opens keys of its own: three runs in turn, each ended (done), never leave a
    counter past FAILED for the next run to read as a failed rank."""
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10))
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(server.port)}
    for _ in range(3):
        watches = [
            peers.watch_for(rank=r, world_size=2, attempt=1, grace_seconds=20, on_silent=never_called, env=env)
            for r in (0, 1)
        ]
        assert all(w is not None for w in watches)
        found = [w.check() for w in watches if w is not None]
        assert found == [None, None]
        for w in watches:
            assert w is not None
            w.stop()


@pytest.mark.parametrize(
    ("error", "failed"),
    [
        (SystemExit(0), False),
        (SystemExit(None), False),
        (SystemExit(1), True),
        (SystemExit(75), True),
        (KeyboardInterrupt(), True),
        (ValueError("a bug"), True),
    ],
)
def test_only_an_exit_with_code_0_leaves_the_block_done_rather_than_failed(error: BaseException, failed: bool) -> None:
    """sys.exit(0) inside the block ends the run as intended: the other ranks must not stop as failed."""
    assert peers.failed_by(error) is failed

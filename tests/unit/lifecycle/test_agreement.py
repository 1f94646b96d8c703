"""Cross-rank agreement: how often ranks agree, and what they agree on (one real gloo rank on 127.0.0.1)."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator

import pytest
import torch.distributed as dist

from sdk.errors import ConfigError
from sdk.lifecycle.agreement import MAX_LATENCY, TARGET_SHARE, Agreement


@pytest.fixture(scope="module")
def gloo() -> Iterator[None]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class StepClock:
    """Each read advances time: ``step`` seconds between polls, ``cost`` inside an agreement."""

    def __init__(self, step: float, cost: float) -> None:
        self.now, self.step, self.cost, self.reads = 0.0, step, cost, 0

    def __call__(self) -> float:
        self.reads += 1
        self.now += self.cost if self.reads % 2 == 0 else self.step
        return self.now


def test_agreement_without_a_process_group_says_what_to_call() -> None:
    """WORLD_SIZE>1 with no process group: a ConfigError naming init_process_group."""
    if dist.is_initialized():
        pytest.skip("a process group exists in this process")
    with pytest.raises(ConfigError, match="init_process_group"):
        Agreement(2).poll(False)


def test_polls_agree_every_step_at_first_then_every_k(gloo: None) -> None:
    """The first polls agree every time (to measure); then K keeps the cost under the target share."""
    clock = StepClock(step=0.010, cost=0.001)
    agreement = Agreement(1, clock=clock)
    for _ in range(2):
        assert agreement.poll(False) is False
    assert agreement.collectives == 2
    k = agreement.every
    assert k > 1
    assert 0.001 / (k * 0.010) <= TARGET_SHARE * 1.5  # the measured cost per step is about the target share
    assert k * 0.010 <= MAX_LATENCY + 1e-9


def test_k_is_capped_so_a_stop_is_seen_within_about_a_second(gloo: None) -> None:
    """A costly agreement on slow steps still happens at least once per MAX_LATENCY."""
    agreement = Agreement(1, clock=StepClock(step=0.5, cost=0.5))
    for _ in range(2):
        agreement.poll(False)
    assert agreement.every == max(1, int(MAX_LATENCY / 0.5))


def test_a_stop_is_agreed_at_the_next_agreement_and_sticks(gloo: None) -> None:
    """A local stop becomes the agreed stop at the next agreement point, and stays true without collectives."""
    agreement = Agreement(1, clock=StepClock(step=0.010, cost=0.001))
    for _ in range(2):
        agreement.poll(False)
    k = agreement.every
    assert k == 20  # ceil(1 ms / (0.5 % of 10 ms))
    results = [agreement.poll(True) for _ in range(k)]
    assert results[:-1] == [False] * (k - 1) and results[-1] is True
    before = agreement.collectives
    assert agreement.poll(False) is True and agreement.collectives == before


def test_a_due_time_save_rides_on_the_agreement(gloo: None) -> None:
    """save_due raised on a rank is agreed at the next agreement point."""
    agreement = Agreement(1)
    agreement.poll(False, save_due=True)
    assert agreement.save_due is True
    assert agreement.settle(False) is False


def test_the_first_agreement_also_agrees_on_the_jobs_checkpoint_writer_id(gloo: None) -> None:
    """The ranks' writer id rides on their first collective (no collective of its own) and then stays fixed."""
    agreement = Agreement(1)
    assert agreement.writer_id() is None
    assert agreement.any(True, False) == (True, False)
    writer = agreement.writer_id()
    assert writer is not None and re.fullmatch(r"[0-9a-f]{12}", writer)
    assert agreement.collectives == 1
    assert agreement.all(True) is True
    assert agreement.writer_id() == writer


def test_group_is_the_default_group_when_it_is_gloo(gloo: None) -> None:
    """The checkpoint's collectives run on the same gloo group as the agreements: the default one here."""
    agreement = Agreement(1)
    assert agreement.group() is None
    assert agreement.collectives == 0


def test_group_refuses_a_process_group_of_another_size(gloo: None) -> None:
    with pytest.raises(ConfigError, match="WORLD_SIZE=2 but the process group has 1 ranks"):
        Agreement(2).group()


def test_broadcast_gives_rank_0s_value_on_every_rank(gloo: None) -> None:
    """Any picklable value, as rank 0 has it; one collective, and no writer id (it rides on the first reduction)."""
    agreement = Agreement(1)
    value = {"steps": [30, 20, 10], "url": "s3://b/run"}
    assert agreement.broadcast(value) == value
    assert agreement.broadcast(None) is None
    assert agreement.collectives == 2
    assert agreement.writer_id() is None

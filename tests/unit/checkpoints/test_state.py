"""The state protocol: reserved names, and an entry merged from every saving rank's state on another rank count."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from sdk.checkpoints import _state as trainstate
from sdk.checkpoints import serialization
from sdk.errors import CheckpointError

LOCATION = "mem://ckpt/step-0000000007"


@pytest.mark.parametrize("name", ["sharded", "rng"])
def test_the_reserved_names_are_refused_as_state_names(name: str) -> None:
    """'sharded' holds a rank's part of the sharded state, 'rng' the RNG streams: no user entry may take them."""
    with pytest.raises(CheckpointError, match=rf"state name '{name}' is not allowed.*not 'rng' or 'sharded'"):
        trainstate.check({name: {"x": 1}})


def test_names_that_only_start_like_a_reserved_one_are_state_names() -> None:
    """Only the exact reserved names are refused: these pass the check and are saved under their own names."""
    state = {"sharded_model": {"x": 1}, "rng2": {}}
    trainstate.check(state)
    assert [name for name, _ in trainstate.payloads(state)] == ["sharded_model", "rng2", trainstate.RNG_STEM]


class Position:
    """A per-rank data position that merges the saving ranks' positions: the smallest one, on every new rank."""

    def __init__(self, refuse: str | None = None) -> None:
        self.value: dict[str, Any] = {}
        self.refuse = refuse
        self.seen: list[Any] = []

    def state_dict(self) -> dict[str, Any]:
        return dict(self.value)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = dict(state)

    def reshard_state_dict(self, states: Sequence[dict[str, Any]], *, rank: int, world_size: int) -> dict[str, Any]:
        self.seen.append((list(states), rank, world_size))
        if self.refuse:
            raise ValueError(self.refuse)
        return {"index": min(s["index"] for s in states), "rank": rank}


def _files_of(rank: int, state: dict[str, Any]) -> dict[str, bytes]:
    return {f"attempt-1/rank-{rank}/{f.name}": f.data for f in serialization.encode("loader", state)}


def test_merged_gives_every_saving_ranks_decoded_state_to_reshard_state_dict() -> None:
    """Three saving ranks' files, decoded in rank order, for rank 1 of 2; the merged state is then put in place."""
    saved = [{"index": 40 + r, "epoch": 3} for r in range(3)]
    position = Position()
    value = trainstate.merged(
        "loader", position, [_files_of(r, s) for r, s in enumerate(saved)], rank=1, world_size=2, location=LOCATION
    )
    assert position.seen == [(saved, 1, 2)] and position.value == {}
    trainstate.put({"loader": position}, {"loader": value}, location=LOCATION)
    assert position.value == {"index": 40, "rank": 1}


def test_a_merge_the_object_refuses_is_a_checkpoint_error_naming_the_entry() -> None:
    """Its ValueError names the entry, the checkpoint, how many ranks saved it and on how many it failed."""
    position = Position(refuse="the epoch's order cannot be split over 3 ranks")
    per_rank = [_files_of(r, {"index": r}) for r in range(2)]
    with pytest.raises(CheckpointError) as info:
        trainstate.merged("loader", position, per_rank, rank=0, world_size=3, location=LOCATION)
    message = str(info.value)
    assert f"state 'loader' of checkpoint {LOCATION} (saved by 2 ranks) cannot be resumed on 3" in message
    assert "the epoch's order cannot be split over 3 ranks" in message
    assert position.value == {}

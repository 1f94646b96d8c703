"""sdk.errors: every error survives pickling (torch.distributed.checkpoint sends a rank's failure to the others)."""

from __future__ import annotations

import pickle

import pytest

from sdk import errors
from sdk.errors import (
    InvalidCheckpointError,
    MalformedDocumentError,
    PodtrainError,
    StorageNotFoundError,
    UnsafeCheckpointError,
    UnsafeKeyError,
)


def _all_error_classes() -> list[type[PodtrainError]]:
    found = [PodtrainError]
    for cls in found:
        found.extend(c for c in cls.__subclasses__() if c.__module__ == errors.__name__ and c not in found)
    return found


@pytest.mark.parametrize(
    "error",
    [
        InvalidCheckpointError("s3://b/step-1", "model.safetensors has CRC32C 1, manifest says 2"),
        UnsafeCheckpointError("s3://b/step-1", "needs os.system"),
        MalformedDocumentError("MANIFEST.json", "duplicate key 'step'"),
        StorageNotFoundError("no such object", url="s3://b/k"),
        UnsafeKeyError("a '..' component", key="../x"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_an_error_comes_back_from_pickle_with_its_type_message_and_fields(error: PodtrainError) -> None:
    """The class, message and every attribute (reason, location, url, key…) survive a pickle round trip."""
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error)
    assert str(back) == str(error)
    assert back.__dict__ == error.__dict__


def test_every_podtrain_error_class_pickles() -> None:
    """No error class of sdk.errors can be sent between ranks only to turn into a TypeError on arrival."""
    classes = _all_error_classes()
    assert len(classes) > 15
    for cls in classes:
        error = cls.__new__(cls)
        Exception.__init__(error, f"a {cls.__name__}")
        error.reason = "why"  # type: ignore[attr-defined]
        back = pickle.loads(pickle.dumps(error))
        assert type(back) is cls and str(back) == f"a {cls.__name__}" and back.reason == "why"  # type: ignore[attr-defined]


def test_a_state_that_does_not_fit_its_checkpoint_exits_2_and_damage_is_not_an_exit_code() -> None:
    """A mismatch to fix is never retried (2); a damaged checkpoint is not a way to die (it is skipped)."""
    from sdk.errors import CheckpointError, StateMismatchError, exit_code

    assert exit_code(StateMismatchError("state 'loader' differs across the 2 ranks")) == 2
    assert isinstance(StateMismatchError("x"), CheckpointError)
    assert exit_code(InvalidCheckpointError("s3://b/step-1", "CRC32C")) is None


def test_a_checkpoint_damaged_after_part_of_it_was_loaded_exits_69() -> None:
    """PartlyLoadedError: the state is half a checkpoint, the run must start again (69: retry), unlike damage found
    before anything was written (skipped, no exit code)."""
    from sdk.errors import CheckpointError, PartlyLoadedError, exit_code
    from sdk.outcomes import EXIT_UNAVAILABLE

    error = PartlyLoadedError("a checkpoint was found damaged after part of it had been loaded")
    assert exit_code(error) == EXIT_UNAVAILABLE == 69
    assert isinstance(error, CheckpointError) and not isinstance(error, InvalidCheckpointError)
    assert error.fault == "platform"

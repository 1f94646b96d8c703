"""What a checkpoint holds for the user: the state protocol, and putting loaded state back.

Anything with ``state_dict()``/``load_state_dict()`` is state (modules, optimizers, schedulers, scalers,
:class:`~sdk.data.loader.ResumableLoader`); a plain ``dict`` is saved as is and updated in place on load. RNG states
are added under the reserved name ``rng`` without being asked. Names become file stems, so they are limited to
letters, digits, ``_``, ``.`` and ``-``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from sdk.checkpoints.manifest import stem_of
from sdk.errors import InvalidCheckpointError, StateMismatchError

__all__ = ["RESERVED", "RNG_STEM", "SHARDED_STEM", "check", "decode", "merged", "payloads", "put"]

RNG_STEM = "rng"  # the RNG streams
SHARDED_STEM = "sharded"  # a rank's part of the sharded state (sdk.checkpoints._sharded)
RESERVED = (RNG_STEM, SHARDED_STEM)
_STEM = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def check(state: Mapping[str, Any]) -> None:
    """Refuse, with the rule, names that are not file-safe and objects that are not state."""
    for key, obj in state.items():
        if not isinstance(key, str) or not _STEM.match(key) or key in RESERVED:
            raise StateMismatchError(
                f"state name {key!r} is not allowed: use letters, digits, '_', '.', '-' (and not "
                f"{' or '.join(map(repr, RESERVED))})"
            )
        if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")) and not isinstance(obj, dict):
            raise StateMismatchError(
                f"state {key!r} ({type(obj).__name__}) has no state_dict()/load_state_dict() and is not a dict"
            )


def payloads(state: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    """``(name, what to serialize)`` for every entry, then the RNG states."""
    from sdk.checkpoints import _rng as rng

    for key, obj in state.items():
        yield key, obj.state_dict() if hasattr(obj, "state_dict") else dict(obj)
    yield RNG_STEM, rng.capture()


def decode(
    state: Mapping[str, Any], files: Mapping[str, bytes], *, location: str, safe_globals: Iterable[Any] = ()
) -> dict[str, Any]:
    """Decode verified ``files`` (name → bytes) into the value of each entry of ``state`` (by name) and, under
    :data:`RNG_STEM`, the RNG states; nothing is put in place (:func:`put` does).

    Raises :class:`CheckpointError` when a name is missing (a mismatch to fix, not damage: an older checkpoint
    would not fit either), :class:`InvalidCheckpointError` when a file cannot be decoded safely.
    """
    by_stem: dict[str, list[str]] = {}
    for name in sorted(files):
        by_stem.setdefault(stem_of(name), []).append(name)
    missing = [key for key in state if key not in by_stem]
    if missing:
        raise StateMismatchError(
            f"checkpoint {location} has no state for {', '.join(missing)} (it holds "
            f"{', '.join(sorted(s for s in by_stem if s != RNG_STEM))}); pass the same state names that were saved"
        )
    return {
        stem: _decoded(stem, {n: files[n] for n in names}, state.get(stem), location, safe_globals)
        for stem, names in by_stem.items()
        if stem in state or stem == RNG_STEM
    }


def merged(
    key: str,
    obj: Any,
    per_rank: Sequence[Mapping[str, bytes]],
    *,
    rank: int,
    world_size: int,
    location: str,
    safe_globals: Iterable[Any] = (),
) -> Any:
    """This rank's value of an entry that differs across the ranks that saved it, on a different number of ranks:
    its object's ``reshard_state_dict(states, rank=, world_size=)`` makes it from every saving rank's state."""
    states = [_decoded(key, files, obj, location, safe_globals) for files in per_rank]
    try:
        return obj.reshard_state_dict(states, rank=rank, world_size=world_size)
    except ValueError as exc:
        raise StateMismatchError(
            f"state {key!r} of checkpoint {location} (saved by {len(states)} ranks) cannot be resumed on "
            f"{world_size}: {exc}"
        ) from None


def put(state: Mapping[str, Any], values: Mapping[str, Any], *, location: str) -> None:
    """Put decoded ``values`` in place: each into its object of ``state``, then the RNG states (under
    :data:`RNG_STEM`). A value that does not fit its object raises :class:`StateMismatchError`."""
    from sdk.checkpoints import _rng as rng

    for key, value in values.items():
        if key != RNG_STEM:
            _put(key, state[key], value, location)
    if RNG_STEM in values:
        try:
            rng.restore(values[RNG_STEM])
        except (ValueError, TypeError, KeyError) as exc:
            raise InvalidCheckpointError(location, f"RNG state does not restore: {exc}") from None


def _decoded(stem: str, files: Mapping[str, bytes], obj: Any, location: str, safe_globals: Iterable[Any]) -> Any:
    import torch

    from sdk.checkpoints import serialization

    parts = {
        name: serialization.decode(
            name,
            data,
            location=location,
            safe_globals=safe_globals,
            # A module copies tensors into its parameters: read-only views over the download suffice.
            zero_copy=isinstance(obj, torch.nn.Module),
        )
        for name, data in files.items()
    }
    try:
        return serialization.assemble(parts)
    except ValueError as exc:
        raise InvalidCheckpointError(location, f"state {stem!r}: {exc}") from None


def _put(key: str, obj: Any, value: Any, location: str) -> None:
    try:
        if hasattr(obj, "load_state_dict"):
            obj.load_state_dict(value)
        else:
            obj.clear()
            obj.update(value)
    except (ValueError, TypeError, KeyError, RuntimeError) as exc:
        raise StateMismatchError(
            f"state {key!r} from checkpoint {location} does not fit {type(obj).__name__}: {exc}"
        ) from exc

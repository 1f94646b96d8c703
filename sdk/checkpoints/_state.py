"""What a checkpoint holds for the user: the state protocol, and putting loaded state back.

Anything with ``state_dict()``/``load_state_dict()`` is state (modules, optimizers, schedulers, scalers,
:class:`~sdk.data.loader.ResumableLoader`); a plain ``dict`` is saved as is and updated in place on load. RNG states
are added under the reserved name ``rng`` without being asked. Names become file stems, so they are limited to
letters, digits, ``_``, ``.`` and ``-``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from sdk.errors import CheckpointError, InvalidCheckpointError

__all__ = ["RNG_STEM", "check", "payloads", "restore"]

RNG_STEM = "rng"
_STEM = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def check(state: Mapping[str, Any]) -> None:
    """Refuse, with the rule, names that are not file-safe and objects that are not state."""
    for key, obj in state.items():
        if not isinstance(key, str) or not _STEM.match(key) or key == RNG_STEM:
            raise CheckpointError(
                f"state name {key!r} is not allowed: use letters, digits, '_', '.', '-' (and not {RNG_STEM!r})"
            )
        if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")) and not isinstance(obj, dict):
            raise CheckpointError(
                f"state {key!r} ({type(obj).__name__}) has no state_dict()/load_state_dict() and is not a dict"
            )


def payloads(state: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    """``(name, what to serialize)`` for every entry, then the RNG states."""
    from sdk.checkpoints import _rng as rng

    for key, obj in state.items():
        yield key, obj.state_dict() if hasattr(obj, "state_dict") else dict(obj)
    yield RNG_STEM, rng.capture()


def restore(
    state: Mapping[str, Any], files: Mapping[str, bytes], *, location: str, safe_globals: Iterable[Any] = ()
) -> None:
    """Decode verified ``files`` (name → bytes) into the objects of ``state`` and the RNGs.

    Raises :class:`CheckpointError` when a name is missing or a state does not fit its object (a mismatch
    to fix, not damage: an older checkpoint would not fit either), :class:`InvalidCheckpointError` when a file
    cannot be decoded safely.
    """
    import torch

    from sdk.checkpoints import _rng as rng
    from sdk.checkpoints import serialization

    by_stem: dict[str, list[str]] = {}
    for name in sorted(files):
        by_stem.setdefault(serialization.stem_of(name), []).append(name)
    missing = [key for key in state if key not in by_stem]
    if missing:
        raise CheckpointError(
            f"checkpoint {location} has no state for {', '.join(missing)} (it holds "
            f"{', '.join(sorted(s for s in by_stem if s != RNG_STEM))}); pass the same state names that were saved"
        )
    decoded: dict[str, Any] = {}
    for stem, names in by_stem.items():
        if stem not in state and stem != RNG_STEM:
            continue
        parts = {
            name: serialization.decode(
                name,
                files[name],
                location=location,
                safe_globals=safe_globals,
                # A module copies tensors into its parameters: read-only views over the download suffice.
                zero_copy=isinstance(state.get(stem), torch.nn.Module),
            )
            for name in names
        }
        try:
            decoded[stem] = serialization.assemble(parts)
        except ValueError as exc:
            raise InvalidCheckpointError(location, f"state {stem!r}: {exc}") from None
    for key, obj in state.items():
        try:
            if hasattr(obj, "load_state_dict"):
                obj.load_state_dict(decoded[key])
            else:
                obj.clear()
                obj.update(decoded[key])
        except (ValueError, TypeError, KeyError, RuntimeError) as exc:
            raise CheckpointError(
                f"state {key!r} from checkpoint {location} does not fit {type(obj).__name__}: {exc}"
            ) from exc
    if RNG_STEM in decoded:
        try:
            rng.restore(decoded[RNG_STEM])
        except (ValueError, TypeError, KeyError) as exc:
            raise InvalidCheckpointError(location, f"RNG state does not restore: {exc}") from None

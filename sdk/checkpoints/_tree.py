"""Nested state: the one walk over dicts, lists and tuples that snapshots and serialization share.

A ``state_dict()`` is a tree — an optimizer's holds ``{"state": {0: {"exp_avg": tensor, ...}}, "param_groups":
[...]}`` — and several parts of podtrain rebuild it with its leaves replaced: the snapshot copies tensors into
buffers, serialization takes large tensors out of a pickle and puts them back. Containers keep their type
(``OrderedDict`` stays one); named tuples and other objects are leaves.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["Path", "map_leaves"]

Path = tuple[Any, ...]


def map_leaves(
    value: Any,
    leaf: Callable[[Path, Any], Any],
    *,
    path: Path = (),
    is_leaf: Callable[[Any], bool] = lambda value: False,
) -> Any:
    """``value`` rebuilt with every leaf replaced by ``leaf(path, leaf_value)``.

    ``is_leaf`` marks containers to hand to ``leaf`` whole instead of walking into them.
    """
    if is_leaf(value):
        return leaf(path, value)
    if isinstance(value, Mapping):
        items = [(k, map_leaves(v, leaf, path=(*path, k), is_leaf=is_leaf)) for k, v in value.items()]
        try:
            return type(value)(items)  # type: ignore[call-arg]
        except TypeError:
            return dict(items)
    if isinstance(value, list | tuple) and not hasattr(value, "_fields"):
        return type(value)(map_leaves(v, leaf, path=(*path, i), is_leaf=is_leaf) for i, v in enumerate(value))
    return leaf(path, value)

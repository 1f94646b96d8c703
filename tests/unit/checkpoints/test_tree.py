"""map_leaves: the one walk over nested state."""

from __future__ import annotations

from collections import OrderedDict, namedtuple

from sdk.checkpoints._tree import map_leaves


def test_leaves_are_replaced_and_containers_keep_their_type_and_paths() -> None:
    """OrderedDict, list and tuple are rebuilt as themselves; each leaf sees its path; a named tuple is a leaf."""
    Point = namedtuple("Point", "x y")
    tree = OrderedDict(a=[1, (2, 3)], b={0: Point(4, 5)})
    seen: list[tuple] = []
    out = map_leaves(tree, lambda path, v: (seen.append(path), v if isinstance(v, Point) else v * 10)[1])
    assert isinstance(out, OrderedDict) and out == OrderedDict(a=[10, (20, 30)], b={0: Point(4, 5)})
    assert seen == [("a", 0), ("a", 1, 0), ("a", 1, 1), ("b", 0)]


def test_is_leaf_hands_a_container_over_whole() -> None:
    """A container that is_leaf picks is passed to leaf as it is, not walked into."""
    out = map_leaves(
        {"x": {"ref": 1}, "y": {"z": 2}},
        lambda p, v: "swapped" if v == {"ref": 1} else v,
        is_leaf=lambda v: v == {"ref": 1},
    )
    assert out == {"x": "swapped", "y": {"z": 2}}

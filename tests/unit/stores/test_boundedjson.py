"""sdk.stores.boundedjson: JSON from a store within size and depth bounds, every failure one clear error."""

from __future__ import annotations

import json
import random

import pytest

from sdk.errors import MalformedDocumentError, PodtrainError
from sdk.stores.boundedjson import check, loads

DEEP = 200_000


def _loads(data: bytes, *, max_bytes: int = 2**20, max_depth: int = 8, unique_keys: bool = False) -> object:
    return loads(data, what="doc.json", max_bytes=max_bytes, max_depth=max_depth, unique_keys=unique_keys)


def test_a_document_within_bounds_parses_like_json_loads() -> None:
    """Objects, arrays, strings with escapes and brackets, numbers: the same result as json.loads."""
    doc = {"a": [1, 2.5, None, True], "b": {"c": 'x"[{y\\', "d": []}, "é": "ü"}
    raw = json.dumps(doc, ensure_ascii=False).encode()
    assert _loads(raw) == doc


@pytest.mark.parametrize("shape", ["[]", "{}"], ids=["arrays", "objects"])
def test_200000_levels_deep_is_refused_with_the_depth_not_a_recursion_error(shape: str) -> None:
    """The C scanner's RecursionError never happens: the depth is measured first and named."""
    raw = b"[" * DEEP + b"]" * DEEP if shape == "[]" else b'{"a":' * DEEP + b"1" + b"}" * DEEP
    with pytest.raises(MalformedDocumentError, match=r"doc\.json .*nested 200,000 levels deep, over the limit of 8"):
        _loads(raw, max_bytes=2**24)


def test_unclosed_brackets_are_refused_before_the_scanner_recurses() -> None:
    """A truncated document of 200,000 open brackets is refused by depth (it would recurse before failing)."""
    with pytest.raises(MalformedDocumentError, match="levels deep"):
        _loads(b"[" * DEEP)


def test_depth_at_the_limit_parses_and_one_more_is_refused() -> None:
    """max_depth levels are fine, max_depth + 1 are not; {} counts as one level."""
    assert _loads(b"[" * 8 + b"]" * 8) == [[[[[[[[]]]]]]]]
    assert _loads(b'{"a": {"b": {}}}', max_depth=3) == {"a": {"b": {}}}
    with pytest.raises(MalformedDocumentError, match="nested 9 levels"):
        _loads(b"[" * 9 + b"]" * 9)
    with pytest.raises(MalformedDocumentError, match="nested 4 levels"):
        _loads(b'{"a": {"b": {"c": []}}}', max_depth=3)


def test_brackets_inside_strings_do_not_count() -> None:
    """Brackets in keys and values, escaped quotes and backslashes before a closing quote are string content."""
    tricky = {"[[[[[[[[[[": "]]]]]]]]]]", "q": '"[[[[[[[[[[', "b": "\\", "c": "[[[[[[[[[[\\"}
    raw = json.dumps(tricky).encode()
    assert _loads(raw, max_depth=1) == tricky
    mixed = {"a": ['"]]]]]]]]]]', [["{{{{{{{{{{"]]]}
    assert _loads(json.dumps(mixed).encode(), max_depth=4) == mixed


def test_closing_brackets_in_strings_cannot_hide_depth() -> None:
    """Closers inside strings between real openers do not lower the measured depth."""
    raw = b"".join(b'["]]]]",' for _ in range(20)) + b"1" + b"]" * 20
    with pytest.raises(MalformedDocumentError, match="nested 20 levels"):
        _loads(raw)


def test_depth_matches_a_reference_count_on_random_documents() -> None:
    """Random nested documents (strings with brackets and escapes): refused exactly when deeper than the limit."""
    rng = random.Random(14)

    def build(depth: int) -> object:
        if depth == 0:
            return rng.choice(["[", "]", "{", "}", '"', "\\", "x", ']]\\"[['])
        kind = rng.random()
        children = [build(depth - 1) for _ in range(rng.randint(1, 3))]
        return children if kind < 0.5 else {f"k{i}{rng.choice('[]{}')}": c for i, c in enumerate(children)}

    def reference(value: object) -> int:
        if isinstance(value, list):
            return 1 + max((reference(v) for v in value), default=0)
        if isinstance(value, dict):
            return 1 + max((reference(v) for v in value.values()), default=0)
        return 0

    for _ in range(300):
        doc = build(rng.randint(0, 9))
        raw = json.dumps(doc).encode()
        depth = reference(doc)
        for limit in (depth - 1, depth):
            if limit < 0:
                continue
            if depth > limit:
                with pytest.raises(MalformedDocumentError, match=f"nested {depth} levels"):
                    _loads(raw, max_depth=limit)
            else:
                assert _loads(raw, max_depth=limit) == doc


def test_size_is_checked_before_anything_is_parsed() -> None:
    """Over max_bytes is refused naming both sizes, even when the bytes are not JSON at all."""
    with pytest.raises(MalformedDocumentError, match=r"1,025 bytes, over the limit of 1,024"):
        _loads(b"\xff" * 1025, max_bytes=1024)


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b'{"a": 1', "not valid JSON"),
        (b"", "not valid JSON"),
        (b'{"a": "\xff"}', "not UTF-8"),
        (b"\xef\xbb\xbf{}", "not valid JSON"),
        (b'{"a": 1} x', "not valid JSON"),
        (b"1" * 5000, "not valid JSON"),
    ],
    ids=["truncated", "empty", "not-utf8", "bom", "trailing", "huge-int"],
)
def test_invalid_documents_are_one_clear_error(raw: bytes, says: str) -> None:
    """Truncated, empty, non-UTF-8, trailing garbage, integers past Python's digit limit: one error class."""
    with pytest.raises(MalformedDocumentError, match=says) as caught:
        _loads(raw, max_bytes=10_000)
    assert caught.value.what == "doc.json" and says in caught.value.reason


def test_duplicate_keys_are_refused_only_when_asked() -> None:
    """unique_keys refuses a key twice in one object, naming it; without it the last wins, as in json.loads."""
    raw = b'{"a": {"x": 1, "x": 2}}'
    assert _loads(raw) == {"a": {"x": 2}}
    with pytest.raises(MalformedDocumentError, match="duplicate key 'x' in one object"):
        _loads(raw, unique_keys=True)


def test_the_error_is_permanent_user_fault_and_a_value_error() -> None:
    """Callers that skip what they cannot interpret (`except ValueError`) skip it; retrying cannot help."""
    with pytest.raises(ValueError) as caught:
        _loads(b"[" * 100)
    error = caught.value
    assert isinstance(error, MalformedDocumentError) and isinstance(error, PodtrainError)
    assert error.transient is False and error.fault == "user"


def test_check_alone_bounds_a_document_being_written() -> None:
    """check() is the same bounds without parsing: what podtrain writes it can read back."""
    check(b'{"a": [1]}', what="out", max_bytes=100, max_depth=2)
    with pytest.raises(MalformedDocumentError, match="nested 3 levels"):
        check(b'{"a": [[1]]}', what="out", max_bytes=100, max_depth=2)

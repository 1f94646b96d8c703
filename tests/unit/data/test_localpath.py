"""sdk.data._localpath: the one function that turns an untrusted object key into a path in the pull's folder."""

from __future__ import annotations

import pytest

from sdk.data._localpath import INDEX_NAME, LOCK_NAME, PARTIAL_SUFFIX, find_clash, local_name, partial_name
from sdk.errors import UnsafeKeyError

SAFE = ["a", "train/a.bin", "x/y/z.parquet", ".hidden", "a..b", "...", "sub/.podtrain-pull.jsonl", "a b/c\\d", "é/ü"]


@pytest.mark.parametrize("key", SAFE)
def test_a_safe_key_lands_under_its_own_name_unchanged(key: str) -> None:
    """The path is the key itself: nothing is stripped, normalised or rewritten."""
    assert local_name(key) == key


@pytest.mark.parametrize(
    ("key", "why"),
    [
        ("..", "'..'"),
        ("../train.py", "'..'"),
        ("prefix/../../etc/passwd", "'..'"),
        ("a/..", "'..'"),
        ("/tmp/x", "absolute"),
        ("/", "absolute"),
        ("a//b", "empty component"),
        ("a/b/", "empty component"),
        ("", "empty"),
        ("./c", "'.'"),
        ("a/./c", "'.'"),
        (".", "'.'"),
        ("a\x00b", "NUL"),
    ],
)
def test_a_key_that_could_leave_the_folder_is_refused_never_rewritten(key: str, why: str) -> None:
    """`..`, `.`, empty and absolute components are refused with the reason; the key is named in the message."""
    with pytest.raises(UnsafeKeyError, match=why) as caught:
        local_name(key)
    assert repr(key) in str(caught.value)
    assert caught.value.key == key


def test_the_refusal_names_the_objects_url_and_the_folder_and_says_how_to_fix_it() -> None:
    with pytest.raises(UnsafeKeyError) as caught:
        local_name("../train.py", url="s3://b/data/../train.py", dest="/app/data")
    message = str(caught.value)
    assert "s3://b/data/../train.py" in message and "/app/data" in message and "exclude" in message.lower()
    assert "\n" not in message


def test_a_key_with_a_newline_is_named_on_one_line() -> None:
    """Messages quote the key, so a hostile key cannot forge a second log line."""
    with pytest.raises(UnsafeKeyError) as caught:
        local_name("../x\nlevel=info fake")
    assert "\n" not in str(caught.value) and "\\n" in str(caught.value)


def test_podtrains_own_file_names_are_refused_at_the_top_and_the_partial_suffix_anywhere() -> None:
    for key in (INDEX_NAME, LOCK_NAME, f"a{PARTIAL_SUFFIX}", f"d{PARTIAL_SUFFIX}/x", f"x/y{PARTIAL_SUFFIX}"):
        with pytest.raises(UnsafeKeyError, match="podtrain"):
            local_name(key)


def test_a_component_longer_than_the_file_system_allows_is_refused_with_its_length() -> None:
    assert local_name("a" * 255) == "a" * 255
    with pytest.raises(UnsafeKeyError, match="256 bytes"):
        local_name("d/" + "a" * 256)
    with pytest.raises(UnsafeKeyError, match="bytes"):
        local_name("é" * 128)  # 256 bytes in UTF-8, 128 characters
    assert local_name("a" * 20, name_max=20) == "a" * 20
    with pytest.raises(UnsafeKeyError, match="limit of 20"):
        local_name("a" * 21, name_max=20)


def test_a_path_longer_than_the_system_allows_is_refused() -> None:
    key = "/".join(["d" * 200] * 25)
    with pytest.raises(UnsafeKeyError, match="path"):
        local_name(key, dest="/data", path_max=4096)


def test_the_partial_name_fits_the_limit_even_for_the_longest_names() -> None:
    assert partial_name("a.bin") == "a.bin" + PARTIAL_SUFFIX
    long_a, long_b = "a" * 250, "a" * 249 + "b"
    assert len(partial_name(long_a)) <= 255 and partial_name(long_a).endswith(PARTIAL_SUFFIX)
    assert partial_name(long_a) != partial_name(long_b), "two long names never share a partial file"


def test_clashes_are_found_a_key_that_is_also_a_prefix_and_a_name_listed_twice() -> None:
    assert find_clash(["a/b", "a/c", "b", "ab/c"]) is None
    assert find_clash(["a", "a/b"]) == ("a", "a/b")
    assert find_clash(["x/y/z", "x/y"]) == ("x/y", "x/y/z")
    assert find_clash(["d/f", "e", "d/f"]) == ("d/f", "d/f")

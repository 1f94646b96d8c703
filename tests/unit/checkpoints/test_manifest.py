"""The manifest: exact layout, strict parsing, every bad input named."""

from __future__ import annotations

import json

import pytest

from sdk.checkpoints.manifest import FORMAT, FileEntry, Manifest, check_file_name, parse, parse_step_dir, step_dir
from sdk.errors import InvalidCheckpointError


def _manifest(**changes: object) -> dict:
    doc = {
        "format": FORMAT,
        "run_id": "r1",
        "attempt": 2,
        "step": 1200,
        "created": "2026-11-25T10:00:00Z",
        "world_size": 1,
        "files": {"model.safetensors": {"size": 4096, "crc32c": "1a2b3c4d"}},
        "torch": "2.13.0",
        "meta": {},
    }
    doc.update(changes)
    return doc


def _parse(doc: object) -> Manifest:
    return parse(json.dumps(doc).encode(), location="mem://x/step-0000001200")


def test_step_dir_is_ten_digits_so_lexical_order_is_numeric() -> None:
    """step-<10 digits>: sorting names sorts steps."""
    names = [step_dir(s) for s in (9, 10, 1200, 99)]
    assert step_dir(1200) == "step-0000001200"
    assert sorted(names) == [step_dir(s) for s in (9, 10, 99, 1200)]
    assert parse_step_dir("step-0000001200") == 1200
    assert parse_step_dir("step-12") is None
    assert parse_step_dir("tmp") is None


def test_manifest_round_trips_through_json() -> None:
    """to_json then parse gives back the same manifest, with the design's field names."""
    m = Manifest(
        run_id="r1",
        attempt=2,
        step=5,
        world_size=1,
        files={"a.pt": FileEntry(size=3, crc32c="0000abcd")},
        torch="2.13.0",
    )
    doc = json.loads(m.to_json())
    assert list(doc) == ["format", "run_id", "attempt", "step", "created", "world_size", "files", "torch", "meta"]
    assert parse(m.to_json(), location="x") == m


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'{"format": "podtrain.checkpoint/1", "run_id"', "not valid JSON"),
        (b"\xff\xfe garbage", "not valid JSON"),
        (b"[1, 2]", "not an object"),
        (json.dumps(_manifest(format="podtrain.checkpoint/9")).encode(), "unknown manifest format"),
        (json.dumps(_manifest(step="12")).encode(), "'step'"),
        (json.dumps(_manifest(attempt=True)).encode(), "'attempt'"),
        (json.dumps(_manifest(files={})).encode(), "'files'"),
        (json.dumps(_manifest(files={"../escape.pt": {"size": 1, "crc32c": "00000000"}})).encode(), "'..'"),
        (json.dumps(_manifest(files={"/etc/passwd": {"size": 1, "crc32c": "00000000"}})).encode(), "absolute"),
        (json.dumps(_manifest(files={"a\\b.pt": {"size": 1, "crc32c": "00000000"}})).encode(), "backslash"),
        (json.dumps(_manifest(files={"a.pt": {"size": -1, "crc32c": "00000000"}})).encode(), "'size'"),
        (json.dumps(_manifest(files={"a.pt": {"size": 1, "crc32c": "ABCDEF12"}})).encode(), "'crc32c'"),
        (json.dumps(_manifest(files={"a.pt": {"size": 1, "crc32c": "abc"}})).encode(), "'crc32c'"),
        (json.dumps(_manifest(files={"a.pt": 7})).encode(), "not an object"),
        (json.dumps(_manifest(meta=[])).encode(), "'meta'"),
    ],
)
def test_bad_manifests_are_rejected_with_the_reason(raw: bytes, reason: str) -> None:
    """Each way a manifest can be wrong raises InvalidCheckpointError naming the failed check and the location."""
    with pytest.raises(InvalidCheckpointError) as info:
        parse(raw, location="s3://b/r1/step-0000001200")
    assert reason in info.value.reason
    assert "s3://b/r1/step-0000001200" in str(info.value)


def test_file_names_must_stay_inside_the_step_folder() -> None:
    """Relative POSIX names only: no '..', no leading '/', no backslash, no empty parts, not the manifest."""
    assert check_file_name("model.safetensors") is None
    assert check_file_name("rank0/optimizer.pt") is None
    for bad in ("", "..", "a/../b", "/abs", "a\\b", "a//b", "./a", "MANIFEST.json", "a\nb"):
        assert check_file_name(bad) is not None, bad


def test_valid_manifest_parses_every_field() -> None:
    """A manifest in the design's exact shape parses into typed fields."""
    m = _parse(_manifest())
    assert (m.run_id, m.attempt, m.step, m.world_size, m.torch) == ("r1", 2, 1200, 1, "2.13.0")
    assert m.files["model.safetensors"] == FileEntry(size=4096, crc32c="1a2b3c4d")
    assert m.total_bytes == 4096


def test_a_manifest_nested_200000_deep_is_invalid_not_a_recursion_error() -> None:
    """Depth is measured before parsing: the reason names it, in the meta or as the whole document."""
    deep_meta = json.dumps(_manifest(meta={"x": "DEEP"})).encode().replace(b'"DEEP"', b"[" * 200_000 + b"]" * 200_000)
    for raw in (b"{" * 200_000, deep_meta):
        with pytest.raises(InvalidCheckpointError, match=r"nested .* levels deep"):
            parse(raw, location="mem://x/step-0000001200")


def test_a_key_twice_in_a_manifest_is_invalid() -> None:
    """Two "files" (or two entries of one name) are refused: which one counts would be a guess."""
    raw = json.dumps(_manifest()).encode().replace(b'"torch":', b'"files": {}, "torch":')
    with pytest.raises(InvalidCheckpointError, match="duplicate key 'files'"):
        parse(raw, location="mem://x/step-0000001200")


def test_a_manifest_parse_would_refuse_is_never_written() -> None:
    """meta nested past the bound fails to_json with a CheckpointError; within it, it round-trips."""
    from sdk.checkpoints.manifest import MAX_MANIFEST_DEPTH
    from sdk.errors import CheckpointError

    def nested(levels: int) -> object:
        value: object = 1
        for _ in range(levels):
            value = {"k": value}
        return value

    def manifest(meta: object) -> Manifest:
        files = {"a.pt": FileEntry(size=1, crc32c="00000000")}
        return Manifest(run_id="r", attempt=1, step=3, world_size=1, files=files, torch="2", meta={"m": meta})

    with pytest.raises(CheckpointError, match="manifest of step 3 cannot be written: nested"):
        manifest(nested(MAX_MANIFEST_DEPTH)).to_json()
    ok = manifest(nested(MAX_MANIFEST_DEPTH - 2))
    assert parse(ok.to_json(), location="here").meta == ok.meta


def _sharded_manifest(**changes: object) -> dict:
    files = {
        "attempt-1/sharded.json": {"size": 10, "crc32c": "0000abcd"},
        "attempt-1/rank-0/sharded.safetensors": {"size": 20, "crc32c": "0000abce"},
        "attempt-1/rank-1/sharded.safetensors": {"size": 20, "crc32c": "0000abcf"},
    }
    return _manifest(format="podtrain.checkpoint/2", world_size=2, files=files, sharded=["model", "optim"], **changes)


def test_a_manifest_with_sharded_entries_is_written_and_read_as_format_2() -> None:
    """Naming sharded state makes the manifest podtrain.checkpoint/2 (older readers skip it), and it parses back."""
    from sdk.checkpoints.manifest import FORMAT_SHARDED

    m = Manifest(
        run_id="r1",
        attempt=1,
        step=5,
        world_size=2,
        files={"attempt-1/sharded.json": FileEntry(size=3, crc32c="0000abcd")},
        torch="2.13.0",
        sharded=("model", "optim"),
    )
    doc = json.loads(m.to_json())
    assert doc["format"] == FORMAT_SHARDED == "podtrain.checkpoint/2"
    assert doc["sharded"] == ["model", "optim"]
    back = parse(m.to_json(), location="x")
    assert back.sharded == ("model", "optim")
    assert back.format == FORMAT_SHARDED
    assert (back.run_id, back.step, back.world_size, back.files) == (m.run_id, m.step, m.world_size, m.files)


def test_a_manifest_without_sharded_entries_stays_format_1_without_the_field() -> None:
    m = Manifest(
        run_id="r", attempt=1, step=1, world_size=1, files={"a.pt": FileEntry(size=1, crc32c="00000000")}, torch="2"
    )
    doc = json.loads(m.to_json())
    assert doc["format"] == FORMAT and "sharded" not in doc
    assert parse(m.to_json(), location="x").sharded == ()


def test_a_format_2_manifest_parses_its_sharded_names() -> None:
    m = _parse(_sharded_manifest())
    assert m.sharded == ("model", "optim") and m.world_size == 2


@pytest.mark.parametrize("sharded", [None, [], "model", ["model", 3], ["model", ""], [None], {"model": 1}], ids=repr)
def test_a_format_2_manifest_without_a_list_of_state_names_is_invalid(sharded: object) -> None:
    """Missing (None here), empty, not a list, or holding a non-string or empty name: the reason names 'sharded'."""
    doc = _sharded_manifest()
    if sharded is None:
        del doc["sharded"]
    else:
        doc["sharded"] = sharded
    with pytest.raises(InvalidCheckpointError, match="'sharded' must be a non-empty list of state names"):
        _parse(doc)


@pytest.mark.parametrize("sharded", [["model"], []], ids=repr)
def test_a_format_1_manifest_with_a_sharded_field_is_invalid(sharded: object) -> None:
    """A reader of format 1 would ignore the field and load sharded files as per-rank ones: refused, even empty."""
    with pytest.raises(InvalidCheckpointError, match=r"'sharded' in a 'podtrain\.checkpoint/1' manifest"):
        _parse(_manifest(sharded=sharded))

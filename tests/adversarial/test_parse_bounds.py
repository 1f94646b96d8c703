"""Damaged checkpoints whose CRCs match their manifest: skipped on resume, reported by the CLI, never a crash.

Each case is crafted for real on a file:// store and on moto's S3: a checkpoint of step 1 is intact, the one of
step 2 is damaged *and its manifest rewritten with the damaged file's true size and CRC32C*, so only parsing can
catch it. Resume must fall back to step 1 with the reason logged (``checkpoint.skipped``); the installed
``podtrain checkpoints list`` / ``verify`` must name the reason in one line, exit as documented, no traceback.
"""

from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from sdk.checkpoints.checkpointer import Checkpointer
from sdk.checkpoints.manifest import MANIFEST_NAME, FileEntry, parse, step_dir
from sdk.stores import checksum
from sdk.stores.store import open_store
from tests.conftest import CapturedLog

PODTRAIN = str(Path(sys.executable).with_name("podtrain"))
DEEP = 200_000


@pytest.fixture(params=["file", "s3"])
def url(request: pytest.FixtureRequest) -> str:
    """A fresh location on a local disk (file://) and on moto's S3."""
    return str(request.getfixturevalue(f"{request.param}_url"))


def _state(seed: int) -> dict[str, Any]:
    """A module (safetensors read as views), a flat tensor dict (read by the safetensors library), a pickle."""
    torch.manual_seed(seed)
    return {
        "model": torch.nn.Linear(4, 4),
        "table": {"w": torch.arange(6.0) + seed, "b": torch.ones(3) * seed},
        "counter": {"epoch": seed, "tag": f"seed-{seed}"},
    }


def _save(url: str, *steps: int) -> None:
    ckpt = Checkpointer(url, run_id="adversarial", attempt=1, keep_last=100)
    for step in steps:
        ckpt.save(step, _state(step))


def _damage(url: str, step: int, file: str, transform: Callable[[bytes], bytes]) -> None:
    """Replace ``file`` of ``step`` by ``transform(bytes)`` and rewrite the manifest with its true size and CRC."""
    store = open_store(url)
    folder = step_dir(step)
    manifest = parse(store.get(f"{folder}/{MANIFEST_NAME}"), location=folder)
    name = next(n for n in manifest.files if n.rsplit("/", 1)[-1] == file)
    data = transform(store.get(f"{folder}/{name}"))
    crc = checksum.crc32c(data)
    store.put(f"{folder}/{name}", data, crc32c=crc)
    files = {**manifest.files, name: FileEntry(size=len(data), crc32c=checksum.to_hex(crc))}
    store.put(f"{folder}/{MANIFEST_NAME}", dataclasses.replace(manifest, files=files).to_json())


def _replace_manifest(url: str, step: int, data: bytes) -> None:
    open_store(url).put(f"{step_dir(step)}/{MANIFEST_NAME}", data)


def _podtrain(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PODTRAIN, *args], capture_output=True, text=True, timeout=300)


def _no_traceback(out: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in out.stdout + out.stderr, out.stdout + out.stderr
    assert "RecursionError" not in out.stdout + out.stderr


# -- safetensors -------------------------------------------------------------------------------------------------
Header = dict[str, Any]


def _split(data: bytes) -> tuple[Header, bytes]:
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def _join(header: bytes | Header, body: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + body


def _big_small(header: Header) -> tuple[str, str]:
    """The names of the largest and the smallest tensor."""

    def size(name: str) -> int:
        begin, end = header[name]["data_offsets"]
        return int(end - begin)

    names = sorted((k for k in header if k != "__metadata__"), key=size, reverse=True)
    return names[0], names[-1]


def _edit(edit: Callable[[Header, str, str, int], None]) -> Callable[[bytes], bytes]:
    def transform(data: bytes) -> bytes:
        header, body = _split(data)
        big, small = _big_small(header)
        edit(header, big, small, len(body))
        return _join(header, body)

    return transform


def _negative_shape(h: Header, big: str, small: str, body: int) -> None:
    shape = [-d for d in h[big]["shape"]]
    h[big]["shape"] = shape if len(shape) % 2 == 0 else [*shape, -1]  # a positive product: the byte count fits


def _overlap(h: Header, big: str, small: str, body: int) -> None:
    begin, end = h[big]["data_offsets"]
    size = h[small]["data_offsets"][1] - h[small]["data_offsets"][0]
    h[big]["data_offsets"] = [0, end - begin]
    h[small]["data_offsets"] = [end - begin - size, end - begin]  # inside the big one's bytes


def _deep_in_entry(data: bytes) -> bytes:
    header, body = _split(data)
    big, _ = _big_small(header)
    header[big]["x"] = "DEEP"
    raw = json.dumps(header).encode().replace(b'"DEEP"', b"[" * DEEP + b"]" * DEEP)
    return _join(raw, body)


def _duplicate_name(data: bytes) -> bytes:
    header, body = _split(data)
    big, small = _big_small(header)
    raw = json.dumps(header).encode().replace(f'"{small}":'.encode(), f'"{big}":'.encode())
    return _join(raw, body)


def _set(key: str, value: Callable[[Any], Any], which: str = "big") -> Callable[[bytes], bytes]:
    def edit(h: Header, big: str, small: str, body: int) -> None:
        name = big if which == "big" else small
        h[name][key] = value(h[name][key])

    return _edit(edit)


def _past_end(h: Header, big: str, small: str, body: int) -> None:
    begin, end = h[small]["data_offsets"]
    h[small]["data_offsets"] = [body, body + end - begin]


def _metadata(value: Any) -> Callable[[bytes], bytes]:
    def edit(h: Header, big: str, small: str, body: int) -> None:
        h["__metadata__"] = value

    return _edit(edit)


def _header_length(data: bytes) -> bytes:
    return (len(data) + 1).to_bytes(8, "little") + data[8:]


def _trailing(data: bytes) -> bytes:
    return data + bytes(8)


SAFETENSORS: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    # case: (damage, what the reason must say)
    "negative shape with a positive product": (_edit(_negative_shape), "shape"),
    "string offsets": (_set("data_offsets", lambda o: [str(x) for x in o]), "data_offsets"),
    "200,000-deep nested JSON header": (_deep_in_entry, "nested"),
    "overlapping tensors": (_edit(_overlap), "overlap"),
    "header length larger than the file": (_header_length, "header length"),
    "offsets past the end": (_edit(_past_end), "data_offsets"),
    "unknown dtype": (_set("dtype", lambda d: "Q9"), "dtype"),
    "shape product overflows 64 bits": (_set("shape", lambda s: [2**62, 2**62]), "shape"),
    "shape product does not match the bytes": (_set("shape", lambda s: [3, 1]), "shape"),
    "float shape": (_set("shape", lambda s: [float(d) for d in s]), "shape"),
    "duplicate tensor names": (_duplicate_name, "duplicate"),
    "__metadata__ a list": (_metadata([1, 2]), "__metadata__"),
    "__metadata__ of non-strings": (_metadata({"k": {"nested": 1}}), "__metadata__"),
    "bytes no tensor owns": (_trailing, "no tensor"),
    "header not an object": (lambda data: _join(b"[1, 2]", _split(data)[1]), "object"),
}


@pytest.mark.parametrize("stem", ["model", "table"], ids=["module-views", "dict-copies"])
@pytest.mark.parametrize("case", list(SAFETENSORS))
def test_resume_skips_a_checkpoint_with_a_damaged_safetensors_header(
    url: str, case: str, stem: str, captured_log: CapturedLog
) -> None:
    """Checkpointer.load falls back to step 1 and logs checkpoint.skipped with the reason; nothing crashes."""
    damage, says = SAFETENSORS[case]
    _save(url, 1, 2)
    _damage(url, 2, f"{stem}.safetensors", damage)
    state = _state(99)
    assert Checkpointer(url, attempt=2).load(state) == 1
    assert torch.equal(state["model"].weight, _state(1)["model"].weight)
    assert state["counter"] == {"epoch": 1, "tag": "seed-1"}
    skipped = captured_log.records("checkpoint.skipped")
    assert len(skipped) == 1, skipped
    assert f"{stem}.safetensors" in skipped[0]["reason"] and says in skipped[0]["reason"], skipped[0]["reason"]


# -- pickles -----------------------------------------------------------------------------------------------------
def _with_pickle(pickle: bytes, *, compress: int = zipfile.ZIP_STORED) -> Callable[[bytes], bytes]:
    """A torch.save archive with its ``data.pkl`` replaced by ``pickle``."""

    def transform(data: bytes) -> bytes:
        out = io.BytesIO()
        with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
            for info in src.infolist():
                body = pickle if info.filename.endswith("/data.pkl") else src.read(info)
                dst.writestr(info.filename, body, compress_type=compress)
        return out.getvalue()

    return transform


_STATE = b"\x80\x02}X\x05\x00\x00\x00epoch"  # {"epoch": <what follows>}, closed by SETITEM and STOP
_DEEP_PICKLE = _STATE + b"]" * DEEP + b"a" * (DEEP - 1) + b"s."  # lists nested 200,000 deep
_CYCLE_PICKLE = _STATE + b"]q\x01h\x01as."  # a list that contains itself
_LAUGHS = 21  # each list holds the previous one twice: 2**21 lists once expanded, from ~170 bytes
_LAUGHS_PICKLE = (  # open 21 lists, then from the innermost out: list i gets list i-1 twice (one copy from memo)
    _STATE
    + b"](" * _LAUGHS
    + b"]q\x00"
    + b"".join(b"h" + bytes([i - 1]) + b"eq" + bytes([i]) for i in range(1, _LAUGHS + 1))
    + b"s."
)
_CODE_PICKLE = b"\x80\x02cos\nsystem\n(S'echo pwned'\ntR."  # os.system('echo pwned')
_BIG_STRING = 32 * 2**20
_BOMB = b"\x80\x02X" + _BIG_STRING.to_bytes(4, "little") + b"a" * _BIG_STRING + b"."  # 32 MiB, deflates to ~32 KiB

PICKLES: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "code outside the allow-list": (_with_pickle(_CODE_PICKLE), "allow-list"),
    "200,000-deep nesting": (_with_pickle(_DEEP_PICKLE), "nests deeper"),
    "a reference cycle": (_with_pickle(_CYCLE_PICKLE), "cycle"),
    "shared references doubling 21 times": (_with_pickle(_LAUGHS_PICKLE), "expands"),
    "compressed (a zip bomb)": (_with_pickle(_BOMB, compress=zipfile.ZIP_DEFLATED), "compressed"),
}


@pytest.mark.parametrize("case", list(PICKLES))
def test_resume_skips_a_checkpoint_with_a_crafted_pickle(url: str, case: str, captured_log: CapturedLog) -> None:
    """A .pt whose pickle needs code, nests 200,000 deep, holds a cycle, expands exponentially or is compressed
    (a zip bomb): step 1 is loaded instead."""
    damage, says = PICKLES[case]
    _save(url, 1, 2)
    _damage(url, 2, "counter.pt", damage)
    state = _state(99)
    assert Checkpointer(url, attempt=2).load(state) == 1
    assert state["counter"] == {"epoch": 1, "tag": "seed-1"}
    skipped = captured_log.records("checkpoint.skipped")
    assert len(skipped) == 1, skipped
    assert "counter.pt" in skipped[0]["reason"] and says in skipped[0]["reason"], skipped[0]["reason"]


def test_resume_skips_a_pickle_over_the_size_bound(
    file_url: str, captured_log: CapturedLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pickle larger than the bound is refused before it is unpickled (the bound is lowered for the test)."""
    import sdk.checkpoints._statefile

    monkeypatch.setattr(sdk.checkpoints._statefile, "MAX_PICKLE_BYTES", 2**20)
    _save(file_url, 1, 2)
    _damage(file_url, 2, "counter.pt", _with_pickle(b"\x80\x02}" + b"N" * (2 * 2**20) + b"."))
    state = _state(99)
    assert Checkpointer(file_url, attempt=2).load(state) == 1
    (skipped,) = captured_log.records("checkpoint.skipped")
    assert "counter.pt" in skipped["reason"] and "pickle" in skipped["reason"], skipped["reason"]


# -- JSON documents ----------------------------------------------------------------------------------------------
def _deep_manifest(url: str, step: int) -> None:
    _replace_manifest(url, step, b"[" * DEEP + b"]" * DEEP)


def _deep_meta(url: str, step: int) -> None:
    folder = step_dir(step)
    store = open_store(url)
    raw = store.get(f"{folder}/{MANIFEST_NAME}")
    doc = json.loads(raw)
    doc["meta"] = {"x": "DEEP"}
    text = json.dumps(doc).encode().replace(b'"DEEP"', b'{"a":' * DEEP + b"1" + b"}" * DEEP)
    store.put(f"{folder}/{MANIFEST_NAME}", text)


MANIFESTS: dict[str, Callable[[str, int], None]] = {
    "200,000-deep MANIFEST.json": _deep_manifest,
    "200,000-deep meta in a valid manifest": _deep_meta,
}


@pytest.mark.parametrize("case", list(MANIFESTS))
def test_resume_and_list_skip_a_deeply_nested_manifest(url: str, case: str, captured_log: CapturedLog) -> None:
    """A manifest nested 200,000 deep is a damaged checkpoint (no RecursionError): resume loads step 1."""
    _save(url, 1, 2)
    MANIFESTS[case](url, 2)
    ckpt = Checkpointer(url, attempt=2)
    [entry] = [e for e in ckpt.scan() if e.step == 2]
    assert entry.manifest is None and entry.problem is not None and "nested" in entry.problem, entry.problem
    assert [c.step for c in ckpt.list()] == [1]
    assert ckpt.load(_state(99)) == 1
    (skipped,) = captured_log.records("checkpoint.skipped")
    assert "nested" in skipped["reason"]


def test_a_deeply_nested_claim_is_ignored(url: str) -> None:
    """A claim (attempts/attempt-<n>.json) nested 200,000 deep only narrows nothing: list and resume work."""
    _save(url, 1, 2)
    open_store(url).put("attempts/attempt-9.json", b"[" * DEEP + b"]" * DEEP)
    ckpt = Checkpointer(url, attempt=2)
    assert [c.step for c in ckpt.list()] == [2, 1]
    assert ckpt.load(_state(99)) == 2
    out = _podtrain("checkpoints", "list", url)
    _no_traceback(out)
    assert out.returncode == 0


def test_a_deeply_nested_attempt_record_is_skipped(url: str) -> None:
    """An attempt record nested 200,000 deep is skipped by the run record's reader like any unreadable one."""
    from sdk.lifecycle import runrecord as record

    record.write(url, {"attempt": 1, "run_id": "r", "outcome": "succeeded"})
    open_store(url).put(f"{record.ATTEMPTS_DIR}/attempt-2.json", b"[" * DEEP + b"]" * DEEP)
    merged = record.read(url)
    assert [e["attempt"] for e in merged["attempts"]] == [1]


def test_a_deeply_nested_rank_record_is_a_clear_error(url: str) -> None:
    """Rank 0 gathering a rank record nested 200,000 deep gets one clear error naming it, no RecursionError."""
    from sdk.checkpoints import _ranks as ranks
    from sdk.errors import MalformedDocumentError

    store = open_store(url)
    store.put("step-0000000005/attempt-1-ab/rank-0.json", b"[" * DEEP + b"]" * DEEP)
    with pytest.raises(MalformedDocumentError, match=r"rank-0\.json is not a readable JSON document: nested"):
        ranks.gather(store, "step-0000000005", "attempt-1-ab", 1, timeout=0)


@pytest.mark.parametrize(
    "body",
    [b"[]", b'{"files": []}', b'{"files": {"m.pt": 3}}', b'{"files": {"m.pt": {"size": "x", "crc32c": "0"}}}', b"{}"],
    ids=["a-list", "files-a-list", "entry-a-number", "size-not-a-number", "no-files"],
)
def test_a_rank_record_of_the_wrong_shape_is_a_clear_error(url: str, body: bytes) -> None:
    """Valid JSON that is not a rank record: one CheckpointError naming the record, never a TypeError/KeyError."""
    from sdk.checkpoints import _ranks as ranks
    from sdk.errors import CheckpointError

    store = open_store(url)
    store.put("step-0000000005/attempt-1-ab/rank-0.json", body)
    with pytest.raises(CheckpointError, match=r"rank-0\.json is not a rank record .*the step is not committed"):
        ranks.gather(store, "step-0000000005", "attempt-1-ab", 1, timeout=0)


# -- the CLI -----------------------------------------------------------------------------------------------------
def test_checkpoints_list_and_verify_report_every_damaged_checkpoint(url: str) -> None:
    """One store, step 1 intact and one damaged step per case: `list --all --deep` marks each invalid with its
    reason (it runs the checks verify runs); `verify --step N` exits 1 naming the reason in one line for a case of
    each kind (a header, a manifest, an archive); plain `list` works; no traceback anywhere."""
    cases: dict[str, tuple[int, str]] = {}
    step = 1
    _save(url, 1)
    for name, (damage, says) in SAFETENSORS.items():
        step += 1
        _save(url, step)
        _damage(url, step, "model.safetensors", damage)
        cases[name] = (step, says)
    for name, craft in MANIFESTS.items():
        step += 1
        _save(url, step)
        craft(url, step)
        cases[name] = (step, "nested")
    step += 1
    _save(url, step)
    _damage(url, step, "counter.pt", PICKLES["compressed (a zip bomb)"][0])
    cases["compressed archive"] = (step, "compressed")

    out = _podtrain("checkpoints", "list", url, "--all", "--deep", "--json")
    _no_traceback(out)
    assert out.returncode == 0, out.stderr
    rows = {row["step"]: row for row in json.loads(out.stdout)["checkpoints"]}
    assert rows[1]["valid"], rows[1]
    for name, (step, says) in cases.items():
        assert not rows[step]["valid"] and says in rows[step]["problem"], (name, rows[step])

    out = _podtrain("checkpoints", "list", url)
    _no_traceback(out)
    assert out.returncode == 0

    kinds = ["200,000-deep nested JSON header", "overlapping tensors", "200,000-deep MANIFEST.json"]
    for name in [*kinds, "compressed archive"]:
        step, says = cases[name]
        out = _podtrain("checkpoints", "verify", url, "--step", str(step))
        _no_traceback(out)
        assert out.returncode == 1, (name, out.stdout, out.stderr)
        lines = out.stdout.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("FAILED:") and says in lines[0], (name, out.stdout)
    assert _podtrain("checkpoints", "verify", url, "--step", "1").returncode == 0

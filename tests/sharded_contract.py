"""The sharded checkpoint contract, one suite for every store: subclass it with a ``url`` fixture.

Several real ranks are the only way to make a sharded checkpoint, so :func:`made_source` runs
``tests/sharded_source.py`` under torchrun (2 ranks, gloo, CPU) once per test process: it saves steps 10, 20 and 30
of an FSDP2 model and Adam (plus a plain dict entry) and the gathered full state of each step. Each test copies
those files into its fresh store through the store API and loads them here, in one process without
``torch.distributed`` (world size 1: DCP resharding 2 → 1) into a plain model and optimizer of the same
architecture. Tampering goes through the same store API, so every bad-input case runs on every backend.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

from sdk.checkpoints.checkpointer import Checkpointer
from sdk.checkpoints.manifest import step_dir
from sdk.errors import CheckpointError, InvalidCheckpointError, PartlyLoadedError
from sdk.stores import checksum
from sdk.stores.store import open_store
from tests.checkpoint_contract import _Exploit
from tests.conftest import CapturedLog
from tests.sharded_source import LR, RUN_ID, STEPS, WORLD_SIZE, WRITER, build, extra

__all__ = ["ShardedCheckpointContract", "Source", "made_source"]

REPO = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).with_name("sharded_source.py")
OWN = f"attempt-1-{WRITER}"  # the saving job's folder inside each step folder
INDEX = f"{OWN}/sharded.json"
_PAYLOAD = re.compile(r"sharded(?:-\d{5}-of-\d{5})?\.(?:safetensors|pt)")


@dataclass(frozen=True)
class Source:
    """The checkpoints of the 2-rank job (a local folder) and the full state of each step it saved."""

    root: Path
    full: dict[int, dict[str, Any]]


_made: list[Source | str] = []  # the source, or why it could not be made (not tried again for every test)


def made_source(tmp_path_factory: pytest.TempPathFactory) -> Source:
    """The 2-rank job's checkpoints, made once per test process (one torchrun, ~15-30 s on 2 busy cores)."""
    if not _made:
        out = tmp_path_factory.mktemp("sharded-source")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        env["PODTRAIN_LOG_LEVEL"] = "warning"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT)]
        done = subprocess.run([*cmd, "--out", str(out)], env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
        if done.returncode == 0:
            full = {step: torch.load(out / f"full-{step}.pt", weights_only=True) for step in STEPS}
            _made.append(Source(out / "ckpt", full))
        else:  # the ranks' own tracebacks come first in torchrun's output, its summary last
            _made.append(f"sharded_source.py failed ({done.returncode}):\n{done.stderr[:6000]}")
    made = _made[0]
    assert isinstance(made, Source), made
    return made


def _copy(url: str, source: Source, steps: Iterable[int] = STEPS) -> None:
    """Put the files of ``steps`` into the store at ``url`` (each with its CRC32C, as a save sends it)."""
    store = open_store(url)
    for step in steps:
        folder = source.root / step_dir(step)
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            data = path.read_bytes()
            store.put(path.relative_to(source.root).as_posix(), data, crc32c=checksum.crc32c(data))


def _plain(lr: float = 0.5) -> dict[str, Any]:
    """An unsharded model of the saved architecture (other weights), a fresh Adam (another lr) and an empty dict."""
    model = build()
    generator = torch.Generator().manual_seed(999)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.uniform_(-1, 1, generator=generator)
    return {"model": model, "optimizer": torch.optim.Adam(model.parameters(), lr=lr), "extra": {}}


def _full(state: dict[str, Any]) -> dict[str, Any]:
    """The full model and optimizer state of ``state``, keyed as the source's reference is."""
    options = StateDictOptions(full_state_dict=True)
    model, optimizer = state["model"], state["optimizer"]
    return {
        "model": get_model_state_dict(model, options=options),
        "optimizer": get_optimizer_state_dict(model, optimizer, options=options),
    }


def _differences(actual: Any, expected: Any, path: str = "") -> list[str]:
    """Where two nested states differ (tensors bitwise, with dtype and shape), as readable paths."""
    if isinstance(expected, torch.Tensor):
        same = isinstance(actual, torch.Tensor) and actual.dtype == expected.dtype and torch.equal(actual, expected)
        return [] if same else [path]
    if isinstance(expected, dict):
        if not isinstance(actual, dict) or actual.keys() != expected.keys():
            return [f"{path} (keys)"]
        return [d for k in expected for d in _differences(actual[k], expected[k], f"{path}/{k}")]
    if isinstance(expected, list | tuple):
        if not isinstance(actual, list | tuple) or len(actual) != len(expected):
            return [f"{path} (length)"]
        return [
            d for i, (a, e) in enumerate(zip(actual, expected, strict=True)) for d in _differences(a, e, f"{path}/{i}")
        ]
    return [] if actual == expected else [f"{path}: {actual!r} != {expected!r}"]


def _moments(full: dict[str, Any]) -> set[tuple[str, str]]:
    """Every (parameter, optimizer moment) of a full optimizer state: what a round trip must bring back."""
    return {(param, name) for param, per in full["optimizer"]["state"].items() for name in per}


# -- ways to damage the index, each with the rule its refusal names -----------------------------------------------
def _overlap(doc: dict[str, Any]) -> None:
    doc["tensors"]["model.0.weight"]["chunks"][1]["offsets"] = [2, 0]


def _gap(doc: dict[str, Any]) -> None:
    doc["tensors"]["model.0.weight"]["chunks"][0]["sizes"] = [3, 6]


def _foreign_rank(doc: dict[str, Any]) -> None:
    doc["tensors"]["model.2.bias"]["chunks"][1]["rank"] = WORLD_SIZE


def _unknown_dtype(doc: dict[str, Any]) -> None:
    doc["tensors"]["model.2.weight"]["dtype"] = "float99"


DAMAGED_INDEX: dict[str, tuple[Callable[[dict[str, Any]], None] | bytes, str]] = {
    "overlapping chunks": (_overlap, r"'model\.0\.weight'.* overlap"),
    "a gap": (_gap, r"'model\.0\.weight': its chunks do not cover its size \[8, 6\]"),
    "a rank outside the saving world": (_foreign_rank, r"rank 2 is not one of the 2 ranks that saved"),
    "an unknown dtype": (_unknown_dtype, r"'model\.2\.weight'.* dtype 'float99'"),
    "bad JSON": (b'{"format": "podtrain.sharded/1", "tensors": {', r"sharded\.json: not valid JSON"),
}


class ShardedCheckpointContract:
    """Behaviour every store must give sharded checkpoints. Subclasses provide the ``url`` fixture."""

    @pytest.fixture
    def source(self, tmp_path_factory: pytest.TempPathFactory) -> Source:
        return made_source(tmp_path_factory)

    @pytest.fixture
    def saved(self, url: str, source: Source) -> Source:
        """The 2-rank job's steps 10, 20 and 30, committed in the store at ``url``."""
        _copy(url, source)
        return source

    def _load(self, url: str, state: dict[str, Any] | None = None) -> tuple[int | None, dict[str, Any]]:
        state = _plain() if state is None else state
        return Checkpointer(url, run_id=RUN_ID, attempt=2).load(state), state

    def _manifest(self, url: str, step: int) -> dict[str, Any]:
        return json.loads(open_store(url).get(f"{step_dir(step)}/MANIFEST.json"))

    def _listed(self, url: str, step: int, pattern: str) -> str:
        """The one file of the manifest of ``step`` whose path matches ``pattern`` (from its end)."""
        (name,) = [n for n in self._manifest(url, step)["files"] if re.search(f"{pattern}$", n)]
        return str(name)

    def _replace(self, url: str, step: int, name: str, data: bytes) -> None:
        """Put ``data`` in place of the listed file ``name`` and make the manifest's entry match it (size, CRC)."""
        store = open_store(url)
        doc = self._manifest(url, step)
        doc["files"][name] = {"size": len(data), "crc32c": checksum.to_hex(checksum.crc32c(data))}
        store.put(f"{step_dir(step)}/{name}", data)
        store.put(f"{step_dir(step)}/MANIFEST.json", json.dumps(doc).encode())

    # -- the happy path ----------------------------------------------------------------------------------
    def test_a_two_rank_sharded_checkpoint_loads_whole_into_one_plain_process(self, url: str, saved: Source) -> None:
        """Resharded 2 → 1: the plain model and every Adam moment equal the 2-rank job's full state at step 30,
        the hyperparameters are the saved ones, and the per-rank dict entry comes back."""
        step, state = self._load(url)
        assert step == 30
        loaded = _full(state)
        assert _moments(loaded) == _moments(saved.full[30]) != set()
        assert {name for _, name in _moments(loaded)} == {"step", "exp_avg", "exp_avg_sq"}
        assert _differences(loaded, saved.full[30]) == []
        assert state["optimizer"].param_groups[0]["lr"] == LR
        assert state["extra"] == extra(30)

    def test_layout_is_a_format_2_manifest_one_index_and_each_ranks_files(self, url: str, saved: Source) -> None:
        """The manifest (format 2) names the sharded entries and lists, with size and CRC32C, one sharded.json in
        the job's folder and each rank's sharded payload and per-rank files under rank-<r>/; it verifies."""
        store = open_store(url)
        doc = self._manifest(url, 30)
        assert doc["format"] == "podtrain.checkpoint/2"
        assert doc["sharded"] == ["model", "optimizer"]
        assert (doc["run_id"], doc["attempt"], doc["step"], doc["world_size"]) == (RUN_ID, 1, 30, WORLD_SIZE)
        assert [n for n in doc["files"] if n.endswith("sharded.json")] == [INDEX]
        for rank in range(WORLD_SIZE):
            mine = sorted(n.removeprefix(f"{OWN}/rank-{rank}/") for n in doc["files"] if f"/rank-{rank}/" in n)
            assert mine[:2] == ["extra.pt", "rng.pt"], mine
            assert len(mine) >= 3 and all(_PAYLOAD.fullmatch(n) for n in mine[2:]), mine
        assert len(doc["files"]) == len([n for n in doc["files"] if "/rank-" in n]) + 1
        for name, entry in doc["files"].items():
            data = store.get(f"{step_dir(30)}/{name}")
            assert entry == {"size": len(data), "crc32c": checksum.to_hex(checksum.crc32c(data))}, name
        index = json.loads(store.get(f"{step_dir(30)}/{INDEX}"))
        assert index["format"] == "podtrain.sharded/1" and index["world_size"] == WORLD_SIZE
        assert {c["rank"] for t in index["tensors"].values() for c in t["chunks"]} == {0, 1}
        assert Checkpointer(url, attempt=2).verify(30).step == 30
        assert [c.step for c in Checkpointer(url, attempt=2).list()] == [30, 20, 10]

    # -- damage: each falls back to the previous valid checkpoint ---------------------------------------------
    def _flip(self, url: str, name: str, where: Callable[[int], int]) -> None:
        """Flip one bit of the listed file ``name`` of step 30 at ``where(size)`` (same size, manifest unchanged)."""
        rel = f"{step_dir(30)}/{name}"
        data = bytearray(open_store(url).get(rel))
        data[where(len(data))] ^= 0x01
        open_store(url).put(rel, bytes(data))

    @pytest.mark.parametrize(
        ("where", "reason"),
        [
            pytest.param(lambda size: size - 1, "CRC32C", id="in-a-tensor"),
            pytest.param(lambda size: 20, "not a valid safetensors file|CRC32C", id="in-the-header"),
        ],
    )
    def test_a_shard_payload_with_wrong_bytes_fails_its_check_and_falls_back(
        self, url: str, saved: Source, captured_log: CapturedLog, where: Callable[[int], int], reason: str
    ) -> None:
        """One flipped bit (same size) in rank 1's sharded payload: verify says CRC32C, a load skips step 30 —
        where the store keeps the object's CRC32C, before reading it; else by the tensor's own CRC32C, or the
        header's structure — and step 20 loads whole."""
        name = self._listed(url, 30, r"rank-1/sharded\.safetensors")
        self._flip(url, name, where)
        with pytest.raises(InvalidCheckpointError, match="CRC32C"):
            Checkpointer(url, attempt=2).verify(30)
        step, state = self._load(url)
        assert step == 20
        assert _differences(_full(state), saved.full[20]) == []
        assert state["extra"] == extra(20)
        (skipped,) = captured_log.records("checkpoint.skipped")
        assert re.search(reason, skipped["reason"]) and "rank-1/sharded" in skipped["reason"], skipped["reason"]

    def test_damage_found_once_part_was_loaded_stops_the_run_and_the_retry_skips_it_before_writing(
        self, url: str, saved: Source
    ) -> None:
        """Only step 30 left, a bit flipped in the last tensor of rank 1's payload. Where the store keeps no CRC32C
        of its own, the load finds it while copying tensors in: no older checkpoint can load over the half-written
        state, so the load raises PartlyLoadedError (exit 69) and marks the damaged range; the next attempt reads
        that range first and skips step 30 before writing anything. Where the store keeps one, the first load
        already skips it before writing. Either way the state a run then starts from is the one it built."""
        store = open_store(url)
        for step in (10, 20):
            store.delete(f"{step_dir(step)}/MANIFEST.json")
            store.delete(step_dir(step), recursive=True)
        name = self._listed(url, 30, r"rank-1/sharded\.safetensors")
        self._flip(url, name, lambda size: size - 1)
        built = _full(_plain())
        if store.native_crc32c(f"{step_dir(30)}/{name}") is None:
            with pytest.raises(PartlyLoadedError, match="found damaged after part of it had been loaded"):
                self._load(url)
            assert "rank-1/sharded" in str(store.get(f"{step_dir(30)}/INVALID.json"))
        step, state = self._load(url)
        assert step is None
        assert _differences(_full(state), built) == []
        assert state["extra"] == {}

    def test_a_listed_shard_payload_that_is_missing_falls_back(
        self, url: str, saved: Source, captured_log: CapturedLog
    ) -> None:
        """Rank 0's sharded payload gone from the store: step 30 is skipped as incomplete, step 20 loads whole."""
        name = self._listed(url, 30, r"rank-0/sharded\.safetensors")
        open_store(url).delete(f"{step_dir(30)}/{name}")
        step, state = self._load(url)
        assert step == 20
        assert _differences(_full(state), saved.full[20]) == []
        (skipped,) = captured_log.records("checkpoint.skipped")
        assert f"{name} is listed in the manifest but missing" in skipped["reason"]

    def test_a_step_folder_of_shards_without_a_manifest_is_not_a_checkpoint(self, url: str, saved: Source) -> None:
        """Every rank's files and the index but no MANIFEST.json (rank 0 died before the commit): never listed,
        never loaded, and verify says why."""
        open_store(url).delete(f"{step_dir(30)}/MANIFEST.json")
        ckpt = Checkpointer(url, attempt=2)
        assert [c.step for c in ckpt.list()] == [20, 10]
        (newest,) = [e for e in ckpt.scan() if e.step == 30]
        assert newest.manifest is None and newest.attempts == frozenset({1})
        with pytest.raises(InvalidCheckpointError, match="no manifest"):
            ckpt.verify(30)
        step, state = self._load(url)
        assert step == 20
        assert _differences(_full(state), saved.full[20]) == []

    def _damage_index(self, url: str, case: str) -> str:
        """Step 30's index damaged as ``case`` says, its manifest entry recomputed to match; the rule to expect."""
        damage, rule = DAMAGED_INDEX[case]
        if isinstance(damage, bytes):
            data = damage
        else:
            doc = json.loads(open_store(url).get(f"{step_dir(30)}/{INDEX}"))
            damage(doc)
            data = json.dumps(doc).encode()
        self._replace(url, 30, INDEX, data)
        return rule

    @pytest.mark.parametrize("case", list(DAMAGED_INDEX))
    def test_a_damaged_index_with_a_matching_crc_falls_back_naming_the_rule(
        self, url: str, saved: Source, captured_log: CapturedLog, case: str
    ) -> None:
        """sharded.json damaged and its manifest entry recomputed to match: the index's own checks refuse it, the
        warning says which rule, and step 20 loads whole."""
        rule = self._damage_index(url, case)
        step, state = self._load(url)
        assert step == 20, case
        assert _differences(_full(state), saved.full[20]) == []
        (skipped,) = captured_log.records("checkpoint.skipped")
        assert re.search(rule, skipped["reason"]), skipped["reason"]

    @pytest.mark.parametrize("case", list(DAMAGED_INDEX))
    def test_verify_refuses_a_damaged_index_naming_the_rule(self, url: str, saved: Source, case: str) -> None:
        """``Checkpointer.verify`` (as ``podtrain checkpoints verify``) raises InvalidCheckpointError with the rule
        for every index a load refuses, though its CRC32C matches the manifest."""
        rule = self._damage_index(url, case)
        with pytest.raises(InvalidCheckpointError, match=rule):
            Checkpointer(url, attempt=2).verify(30)

    def test_a_format_2_manifest_without_an_index_falls_back(
        self, url: str, saved: Source, captured_log: CapturedLog
    ) -> None:
        """A manifest naming sharded entries but listing no sharded.json (and none in the store) is skipped."""
        store = open_store(url)
        doc = self._manifest(url, 30)
        del doc["files"][INDEX]
        store.delete(f"{step_dir(30)}/{INDEX}")
        store.put(f"{step_dir(30)}/MANIFEST.json", json.dumps(doc).encode())
        step, state = self._load(url)
        assert step == 20
        assert _differences(_full(state), saved.full[20]) == []
        (skipped,) = captured_log.records("checkpoint.skipped")
        assert re.search(r"must list one sharded\.json, .*lists 0", skipped["reason"]), skipped["reason"]

    def test_verify_and_list_refuse_a_format_2_manifest_without_an_index(self, url: str, saved: Source) -> None:
        """What a load skips, ``verify`` (``podtrain checkpoints verify``) and ``list`` do not call valid."""
        store = open_store(url)
        doc = self._manifest(url, 30)
        del doc["files"][INDEX]
        store.delete(f"{step_dir(30)}/{INDEX}")
        store.put(f"{step_dir(30)}/MANIFEST.json", json.dumps(doc).encode())
        assert [c.step for c in Checkpointer(url, attempt=2).list()] == [20, 10]
        with pytest.raises(InvalidCheckpointError, match=r"must list one sharded\.json"):
            Checkpointer(url, attempt=2).verify(30)

    def test_a_pickle_in_a_shard_payload_that_would_run_code_is_refused_even_with_a_matching_crc(
        self, url: str, saved: Source, tmp_path: Path, captured_log: CapturedLog
    ) -> None:
        """rank-1/sharded.pt replaced by a pickle whose loading runs a command, the manifest updated to match:
        refused unrun, and step 20 loads whole."""
        marker = tmp_path / "pwned"
        buffer = io.BytesIO()
        torch.save({"optimizer.param_groups.0.lr": _Exploit(str(marker))}, buffer)
        self._replace(url, 30, self._listed(url, 30, r"rank-1/sharded\.pt"), buffer.getvalue())
        step, state = self._load(url)
        assert not marker.exists()
        assert step == 20
        assert _differences(_full(state), saved.full[20]) == []
        (skipped,) = captured_log.records("checkpoint.skipped")
        assert "rank-1/sharded.pt needs code outside the allow-list to load, refused" in skipped["reason"]

    # -- attempts and retention -------------------------------------------------------------------------
    def test_a_stale_attempts_sharded_commit_after_a_newer_claim_is_never_loaded(
        self, url: str, source: Source
    ) -> None:
        """Attempt 2 claims the run from step 20; attempt 1's job then commits step 30: listed nowhere, verify
        names it superseded, and a load takes step 20."""
        _copy(url, source, (10, 20))
        Checkpointer(url, run_id=RUN_ID, attempt=2).claim(20)
        _copy(url, source, (30,))
        ckpt = Checkpointer(url, attempt=2)
        (newest,) = [e for e in ckpt.scan() if e.step == 30]
        assert newest.manifest is None and "superseded" in (newest.problem or "")
        assert [c.step for c in ckpt.list()] == [20, 10]
        with pytest.raises(InvalidCheckpointError, match="superseded"):
            ckpt.verify(30)
        step, state = self._load(url)
        assert step == 20
        assert _differences(_full(state), source.full[20]) == []

    def test_retention_deletes_sharded_checkpoints_like_any_other(self, url: str, saved: Source) -> None:
        """One process resumed from the 2-rank job's step 30 saves 31 and 32 with keep_last=2: steps 10 and 20 go,
        every rank's files and the index with them; the checkpoint resumed from stays."""
        ckpt = Checkpointer(url, run_id=RUN_ID, attempt=2, keep_last=2)
        state = _plain()
        assert ckpt.load(state) == 30
        ckpt.save(31, state)
        ckpt.save(32, state)
        assert [c.step for c in ckpt.list()] == [32, 31, 30]
        left = {name.split("/", 1)[0] for name in open_store(url).walk() if name.startswith("step-")}
        assert left == {step_dir(30), step_dir(31), step_dir(32)}
        assert Checkpointer(url, attempt=3).verify(30).manifest.sharded == ("model", "optimizer")

    # -- a state that does not fit: an error to fix, never a fallback -------------------------------------------
    def test_a_state_without_a_saved_sharded_entry_is_an_error_naming_it(self, url: str, saved: Source) -> None:
        """No 'optimizer' in the state passed: CheckpointError saying to pass the saved names; nothing loaded."""
        state = _plain()
        del state["optimizer"]
        before = {k: v.clone() for k, v in state["model"].state_dict().items()}
        with pytest.raises(
            CheckpointError, match=r"holds sharded state 'optimizer' and the state passed has none"
        ) as info:
            Checkpointer(url, run_id=RUN_ID, attempt=2).load(state)
        assert not isinstance(info.value, InvalidCheckpointError)
        assert _differences(state["model"].state_dict(), before) == []
        assert state["extra"] == {}

    def test_a_non_module_in_place_of_a_sharded_entry_is_an_error_naming_it(self, url: str, saved: Source) -> None:
        """A dict where the checkpoint has the sharded 'optimizer': CheckpointError naming both; nothing loaded."""
        state = _plain()
        state["optimizer"] = {"lr": 0.1}
        before = {k: v.clone() for k, v in state["model"].state_dict().items()}
        with pytest.raises(
            CheckpointError, match=r"state 'optimizer' .* was saved sharded .* here it is a dict"
        ) as info:
            Checkpointer(url, run_id=RUN_ID, attempt=2).load(state)
        assert not isinstance(info.value, InvalidCheckpointError)
        assert _differences(state["model"].state_dict(), before) == []
        assert state["optimizer"] == {"lr": 0.1}

"""The checkpoint contract, one suite for every store: subclass it with a ``url`` fixture.

Each backend's test module does ``class TestOnS3(CheckpointContract)`` and provides ``url`` (a fresh, empty
location). Tampering goes through the same store API, so every bad-input case runs on every backend.
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from sdk.checkpoints.checkpointer import Checkpointer
from sdk.checkpoints.manifest import FORMAT, step_dir
from sdk.errors import CommitConflictError, InvalidCheckpointError, NoCheckpointError, StaleAttemptError
from sdk.stores import checksum
from sdk.stores.store import open_store


class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def _state(seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(4, 6)).sum().backward()
    opt.step()
    return {"model": model, "optimizer": opt, "extra": {"best_loss": float(seed)}}


def _listed(url: str, step: int, name: str) -> str:
    """The path, inside the step folder, of the state file ``name`` as the manifest lists it (under the writer's
    own ``attempt-<n>-<writer>/``); the manifest itself as is."""
    if name == "MANIFEST.json":
        return name
    files = json.loads(open_store(url).get(f"{step_dir(step)}/MANIFEST.json"))["files"]
    (listed,) = [n for n in files if n.rsplit("/", 1)[-1] == name]
    return str(listed)


def _weights(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in state["model"].state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class CheckpointContract:
    """Behaviour every store must give checkpoints. Subclasses provide the ``url`` fixture."""

    @pytest.fixture
    def saved(self, url: str) -> dict[int, dict[str, torch.Tensor]]:
        """Three committed checkpoints (steps 10, 20, 30) with different weights; returns weights by step."""
        ckpt = Checkpointer(url, run_id="r1", attempt=1, keep_last=10)
        weights = {}
        for step in (10, 20, 30):
            state = _state(step)
            ckpt.save(step, state)
            weights[step] = _weights(state)
        return weights

    def _load(self, url: str) -> tuple[int | None, dict[str, Any], Checkpointer]:
        ckpt = Checkpointer(url, run_id="r1", attempt=2)
        state = _state(999)
        return ckpt.load(state), state, ckpt

    def _tamper(self, url: str, rel: str, data: bytes | None) -> None:
        store = open_store(url)
        if data is None:
            store.delete(rel)
        else:
            store.put(rel, data)

    def _manifest(self, url: str, step: int) -> dict[str, Any]:
        return json.loads(open_store(url).get(f"{step_dir(step)}/MANIFEST.json"))

    def _assert_fell_back(self, url: str, saved: dict, caplog_text: str, reason: str) -> None:
        step, state, _ = self._load(url)
        assert step == 20
        assert _same(_weights(state), saved[20])

    # -- the happy path ----------------------------------------------------------------------------------
    def test_save_then_load_restores_every_state_exactly(self, url: str) -> None:
        """Model, optimizer and a plain dict come back equal, and load returns the step."""
        original = _state(1)
        Checkpointer(url, run_id="r1", attempt=1).save(42, original)
        step, restored, _ = self._load(url)
        assert step == 42
        assert _same(_weights(restored), _weights(original))
        a, b = restored["optimizer"].state_dict(), original["optimizer"].state_dict()
        assert torch.equal(a["state"][0]["exp_avg"], b["state"][0]["exp_avg"])
        assert restored["extra"] == {"best_loss": 1.0}

    def test_layout_is_step_folder_with_a_manifest_listing_size_and_crc32c(self, url: str) -> None:
        """step-<10 digits>/ holds the state files and a manifest with each file's size and CRC32C."""
        Checkpointer(url, run_id="r1", attempt=3).save(1200, _state(1))
        store = open_store(url)
        doc = self._manifest(url, 1200)
        assert doc["format"] == FORMAT
        assert (doc["run_id"], doc["attempt"], doc["step"], doc["world_size"]) == ("r1", 3, 1200, 1)
        names = {"model.safetensors", "optimizer.pt", "extra.pt", "rng.pt"}
        (folder,) = {n.rsplit("/", 1)[0] for n in doc["files"]}  # one writer folder: attempt-<n>-<writer id>
        assert re.fullmatch(r"attempt-3-[0-9a-f]{12}", folder), folder
        assert {n.rsplit("/", 1)[1] for n in doc["files"]} == names
        for name, entry in doc["files"].items():
            data = store.get(f"step-0000001200/{name}")
            assert entry == {"size": len(data), "crc32c": checksum.to_hex(checksum.crc32c(data))}

    def test_manifest_is_written_after_every_state_file(self, url: str) -> None:
        """The commit (MANIFEST.json) is the last object written in a save."""
        ckpt = Checkpointer(url, run_id="r1", attempt=1)
        order: list[str] = []
        put = ckpt.store.put

        def recording_put(rel: str, data: bytes, **kw: Any) -> bool:
            result = put(rel, data, **kw)
            order.append(rel.rsplit("/", 1)[-1])
            return result

        ckpt.store.put = recording_put  # type: ignore[method-assign]
        ckpt.save(5, _state(5))
        assert order[-1] == "MANIFEST.json"
        assert len(order) == 5  # four state files, then the manifest

    def test_a_model_state_split_into_shards_round_trips(self, url: str, monkeypatch: pytest.MonkeyPatch) -> None:
        """Past the shard size the model is saved as several safetensors files and loads back whole."""
        monkeypatch.setattr("sdk.checkpoints.serialization.SHARD_BYTES", 200)
        original = _state(3)
        Checkpointer(url, run_id="r1", attempt=1).save(8, original)
        shards = [n for n in self._manifest(url, 8)["files"] if n.rsplit("/", 1)[-1].startswith("model-")]
        assert len(shards) >= 2
        assert all(n.endswith(f"-of-{len(shards):05d}.safetensors") for n in shards)
        step, restored, _ = self._load(url)
        assert step == 8
        assert _same(_weights(restored), _weights(original))

    def test_list_gives_valid_checkpoints_newest_first(self, url: str, saved: dict) -> None:
        """Listing reads manifests and orders by step, newest first."""
        assert [c.step for c in Checkpointer(url, attempt=1).list()] == [30, 20, 10]

    def test_store_native_crc32c_matches_the_manifest_where_the_store_keeps_one(self, url: str, saved: dict) -> None:
        """The store's own CRC32C (S3 x-amz-checksum-crc32c, GCS crc32c) equals the manifest's."""
        store = open_store(url)
        doc = self._manifest(url, 30)
        for name, entry in doc["files"].items():
            native = store.native_crc32c(f"{step_dir(30)}/{name}")
            if native is not None:
                assert checksum.to_hex(native) == entry["crc32c"]

    def test_attempt_is_derived_from_the_store_when_unset(self, url: str, saved: dict) -> None:
        """With no attempt configured, a new writer takes the newest attempt seen plus one."""
        assert Checkpointer(url).attempt == 2

    def test_a_second_commit_of_the_same_step_is_refused(self, url: str) -> None:
        """Two writers cannot both commit one step: the second gets CommitConflictError, the first stands."""
        first = _state(1)
        Checkpointer(url, run_id="r1", attempt=1).save(7, first)
        with pytest.raises(CommitConflictError):
            Checkpointer(url, run_id="r1", attempt=2).save(7, _state(2))
        step, _, _ = self._load(url)
        assert step == 7
        assert self._manifest(url, 7)["attempt"] == 1

    def test_an_older_attempt_still_running_is_fenced_by_a_newer_ones_claim(self, url: str) -> None:
        """After attempt 2 claims the run, attempt 1 can no longer save, commit or prune: StaleAttemptError."""
        old = Checkpointer(url, run_id="r1", attempt=1, keep_last=1)
        old.save(10, _state(10))
        new = Checkpointer(url, run_id="r1", attempt=2, keep_last=1)
        assert new.load(_state(0)) == 10
        new.claim(10)
        new.save(11, _state(11))
        with pytest.raises(StaleAttemptError, match="superseded by attempt 2"):
            old.save(12, _state(12))
        with pytest.raises(StaleAttemptError):
            old.prune()
        assert [c.step for c in new.list()] == [11, 10]  # 10: the checkpoint attempt 2 resumed from
        assert Checkpointer(url, attempt=3).attempt == 3, "claims count when the next attempt is derived"

    def test_a_stale_commit_racing_the_claim_is_never_loaded_and_gives_way(self, url: str) -> None:
        """A commit attempt 1 slipped in after attempt 2's claim is skipped by readers and replaced on save."""
        old = Checkpointer(url, run_id="r1", attempt=1, keep_last=10)
        old.save(10, _state(10))
        new = Checkpointer(url, run_id="r1", attempt=2, keep_last=10)
        new.claim(10)
        old._check_not_superseded = lambda doing: []  # type: ignore[method-assign] # it checked just before the claim
        old.save(11, _state(99))
        scanned = {e.step: e for e in new.scan()}
        assert scanned[11].manifest is None and "superseded" in (scanned[11].problem or "")
        assert [c.step for c in new.list()] == [10]
        restored = _state(0)
        assert new.load(restored) == 10
        new.save(11, _state(11))  # the stale commit gives way to the newer attempt's own
        assert self._manifest(url, 11)["attempt"] == 2
        step, state, _ = self._load(url)
        assert step == 11 and _same(_weights(state), _weights(_state(11)))

    def test_retention_keeps_the_last_n_and_the_resumed_one(self, url: str) -> None:
        """keep_last=2 prunes old commits after a newer one commits, never the checkpoint resumed from."""
        Checkpointer(url, run_id="r1", attempt=1, keep_last=10).save(1, _state(1))
        ckpt = Checkpointer(url, run_id="r1", attempt=2, keep_last=2)
        assert ckpt.load(_state(0)) == 1
        for step in (2, 3, 4):
            ckpt.save(step, _state(step))
        assert [c.step for c in ckpt.list()] == [4, 3, 1]

    # -- bad input: each falls back to the previous valid checkpoint ------------------------------------------
    @pytest.mark.parametrize(
        ("case", "rel", "data"),
        [
            ("missing manifest", "MANIFEST.json", None),
            ("truncated manifest", "MANIFEST.json", b'{"format": "podtrain.checkpoint/1", "run'),
            ("not JSON", "MANIFEST.json", b"\x00\x01garbage"),
            ("JSON not an object", "MANIFEST.json", b'["step", 30]'),
            ("a file missing", "optimizer.pt", None),
            ("size mismatch", "model.safetensors", b"short"),
        ],
    )
    def test_newest_broken_checkpoint_falls_back(
        self, url: str, saved: dict, case: str, rel: str, data: bytes | None
    ) -> None:
        """A broken newest checkpoint is skipped and the previous valid one loads."""
        self._tamper(url, f"{step_dir(30)}/{_listed(url, 30, rel)}", data)
        step, state, _ = self._load(url)
        assert step == 20, case
        assert _same(_weights(state), saved[20])

    def test_checksum_mismatch_falls_back(self, url: str, saved: dict) -> None:
        """One flipped byte (same size) is caught by CRC32C and the previous checkpoint loads."""
        rel = f"{step_dir(30)}/{_listed(url, 30, 'model.safetensors')}"
        data = bytearray(open_store(url).get(rel))
        data[-1] ^= 0x01
        self._tamper(url, rel, bytes(data))
        with pytest.raises(InvalidCheckpointError, match="CRC32C"):
            Checkpointer(url, attempt=1).verify(30)
        assert self._load(url)[0] == 20

    @pytest.mark.parametrize("bad_name", ["../escape.pt", "/abs.pt", "dir\\file.pt"])
    def test_manifest_with_an_unsafe_path_falls_back(self, url: str, saved: dict, bad_name: str) -> None:
        """A manifest naming a file outside the step folder makes the checkpoint invalid."""
        doc = self._manifest(url, 30)
        doc["files"][bad_name] = {"size": 1, "crc32c": "00000000"}
        self._tamper(url, f"{step_dir(30)}/MANIFEST.json", json.dumps(doc).encode())
        assert self._load(url)[0] == 20

    def test_unknown_format_version_falls_back(self, url: str, saved: dict) -> None:
        """A manifest of a format this version does not know is skipped."""
        doc = self._manifest(url, 30)
        doc["format"] = "podtrain.checkpoint/2"
        self._tamper(url, f"{step_dir(30)}/MANIFEST.json", json.dumps(doc).encode())
        assert self._load(url)[0] == 20

    def test_a_pickle_that_would_run_code_is_refused_even_with_a_matching_checksum(
        self, url: str, saved: dict, tmp_path: Path
    ) -> None:
        """A crafted optimizer.pt, with its manifest entry updated to match, is refused and never runs."""
        marker = tmp_path / "pwned"
        buffer = io.BytesIO()
        torch.save({"state": _Exploit(str(marker))}, buffer)
        payload = buffer.getvalue()
        doc = self._manifest(url, 30)
        entry = {"size": len(payload), "crc32c": checksum.to_hex(checksum.crc32c(payload))}
        optimizer = _listed(url, 30, "optimizer.pt")
        doc["files"][optimizer] = entry
        self._tamper(url, f"{step_dir(30)}/{optimizer}", payload)
        self._tamper(url, f"{step_dir(30)}/MANIFEST.json", json.dumps(doc).encode())
        assert self._load(url)[0] == 20
        assert not marker.exists()

    def test_a_step_folder_without_a_manifest_is_not_a_checkpoint(self, url: str, saved: dict) -> None:
        """A newer folder holding only stray files (an interrupted save) is ignored."""
        self._tamper(url, f"{step_dir(99)}/model.safetensors", b"partial")
        assert [c.step for c in Checkpointer(url, attempt=1).list()] == [30, 20, 10]
        assert self._load(url)[0] == 30

    def test_no_valid_checkpoint_left_is_a_clear_none_and_verify_says_why(self, url: str) -> None:
        """When every checkpoint is broken, load returns None (start fresh) and verify raises with the reason."""
        Checkpointer(url, run_id="r1", attempt=1).save(1, _state(1))
        self._tamper(url, f"{step_dir(1)}/{_listed(url, 1, 'rng.pt')}", None)
        assert self._load(url)[0] is None
        with pytest.raises(InvalidCheckpointError, match=r"rng\.pt is listed in the manifest but missing"):
            Checkpointer(url, attempt=1).verify()

    def test_empty_location_has_no_checkpoint(self, url: str) -> None:
        """A fresh location loads nothing and verify says there is no checkpoint."""
        assert self._load(url)[0] is None
        with pytest.raises(NoCheckpointError):
            Checkpointer(url, attempt=1).verify()

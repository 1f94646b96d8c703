"""Which files a rank restores its per-rank entries from, on the saving number of ranks or another one."""

from __future__ import annotations

import pytest

from sdk.checkpoints._ranks import rank_of, sources
from sdk.checkpoints.manifest import FileEntry

WRITER = "attempt-1-0123456789ab"


def _files(rank: int, **stems: str) -> dict[str, FileEntry]:
    """Rank ``rank``'s files: ``name="crc"`` per file (``loader_pt`` is ``loader.pt``)."""
    return {
        f"{WRITER}/rank-{rank}/{name.replace('_', '.', 1)}": FileEntry(size=10, crc32c=crc)
        for name, crc in stems.items()
    }


def _saved_by_two() -> dict[str, FileEntry]:
    """Two ranks: a sharded payload each, the same scheduler, different loader positions, their RNG streams."""
    files: dict[str, FileEntry] = {f"{WRITER}/sharded.json": FileEntry(size=99, crc32c="0000beef")}
    for rank in (0, 1):
        files.update(
            _files(
                rank,
                sharded_safetensors=f"5ade{rank}000",
                sharded_pt=f"5adf{rank}000",
                sched_pt="5c4ed000",
                loader_pt=f"10ad{rank}000",
                rng_pt=f"0000{rank}000",
            )
        )
    return files


def test_on_the_saving_number_of_ranks_a_rank_restores_its_own_files_but_the_sharded_payload() -> None:
    """Same world size: every file under the rank's folder, except the sharded stem (DCP loads it) and the index."""
    got = sources(
        _saved_by_two(), ["sched", "loader"], rank=1, world_size=2, saved_world=2, rng_stem="rng", skip=("sharded",)
    )
    assert sorted(got.own) == [f"{WRITER}/rank-1/{n}" for n in ("loader.pt", "rng.pt", "sched.pt")]
    assert got.merged == {} and got.rng_missing is False


def test_on_more_ranks_an_entry_every_rank_saved_alike_loads_from_rank_0s_files() -> None:
    """The scheduler has the same name, size and CRC32C on both saving ranks: rank 0's file, for every new rank."""
    files = _saved_by_two()
    for rank in range(3):
        got = sources(files, ["sched"], rank=rank, world_size=3, saved_world=2, rng_stem="rng")
        assert f"{WRITER}/rank-0/sched.pt" in got.own
        assert f"{WRITER}/rank-1/sched.pt" not in got.own
        assert got.merged == {}


def test_an_entry_saved_in_several_files_alike_loads_all_of_rank_0s() -> None:
    files = {
        **_files(0, opt_pt="aaaa0000", opt_safetensors="bbbb0000"),
        **_files(1, opt_pt="aaaa0000", opt_safetensors="bbbb0000"),
    }
    got = sources(files, ["opt"], rank=0, world_size=1, saved_world=2, rng_stem="rng")
    assert sorted(got.own) == [f"{WRITER}/rank-0/opt.pt", f"{WRITER}/rank-0/opt.safetensors"]


def test_an_entry_that_differs_across_saving_ranks_is_merged_from_every_ranks_files() -> None:
    """The loaders' positions differ: one list per saving rank, in rank order, nothing of it in ``own``."""
    got = sources(_saved_by_two(), ["sched", "loader"], rank=0, world_size=3, saved_world=2, rng_stem="rng")
    assert got.merged == {
        "loader": [
            {f"{WRITER}/rank-0/loader.pt": FileEntry(size=10, crc32c="10ad0000")},
            {f"{WRITER}/rank-1/loader.pt": FileEntry(size=10, crc32c="10ad1000")},
        ]
    }
    assert not any(name.endswith("loader.pt") for name in got.own)


@pytest.mark.parametrize("differ", ["size", "crc32c", "name"])
def test_an_entry_differing_in_size_crc_or_file_names_is_not_alike(differ: str) -> None:
    files = _files(0, loader_pt="10ad0000")
    entry = FileEntry(size=11 if differ == "size" else 10, crc32c="10ad9999" if differ == "crc32c" else "10ad0000")
    files[f"{WRITER}/rank-1/{'loader-00001-of-00001.safetensors' if differ == 'name' else 'loader.pt'}"] = entry
    got = sources(files, ["loader"], rank=0, world_size=1, saved_world=2, rng_stem="rng")
    assert list(got.merged) == ["loader"]


def test_a_rank_that_existed_restores_its_own_rng_streams() -> None:
    """Going from 2 ranks to 3 (or 1), ranks 0 and 1 get their own RNG file back."""
    files = _saved_by_two()
    for world in (1, 3):
        for rank in range(min(world, 2)):
            got = sources(files, ["sched"], rank=rank, world_size=world, saved_world=2, rng_stem="rng")
            rng = [name for name in got.own if name.endswith("/rng.pt")]
            assert rng == [f"{WRITER}/rank-{rank}/rng.pt"]
            assert got.rng_missing is False


def test_a_new_rank_keeps_its_own_rng_streams() -> None:
    """Rank 2 of 3 did not exist in a job of 2: no RNG file, and rng_missing says so."""
    got = sources(_saved_by_two(), ["sched"], rank=2, world_size=3, saved_world=2, rng_stem="rng")
    assert not any(name.endswith("/rng.pt") for name in got.own)
    assert got.rng_missing is True


def test_on_another_number_of_ranks_the_sharded_payload_and_index_are_not_per_rank_sources() -> None:
    """Only the stems asked for (the per-rank entries) and the RNG: DCP reads the sharded payloads itself."""
    got = sources(_saved_by_two(), ["sched", "loader"], rank=1, world_size=3, saved_world=2, rng_stem="rng")
    assert not any("sharded" in name for name in got.own)
    assert "sharded" not in got.merged


@pytest.mark.parametrize(
    ("name", "rank"),
    [
        (f"{WRITER}/rank-3/model.safetensors", 3),
        (f"{WRITER}/rank-12/sharded-00002-of-00004.safetensors", 12),
        ("rank-0/rng.pt", 0),
        (f"{WRITER}/rank-3.json", None),
        (f"{WRITER}/sharded.json", None),
        ("model.safetensors", None),
        (f"{WRITER}/frank-3/model.pt", None),
    ],
)
def test_rank_of_is_the_rank_whose_folder_holds_a_file(name: str, rank: int | None) -> None:
    """A rank's folder is a whole path component ``rank-<n>/``; records and the index belong to no rank."""
    assert rank_of(name) == rank

"""examples/dataset.py: the example's corpus is deterministic, sized as asked, and written to folders or URLs."""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "dataset.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("example_dataset", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


dataset = _load()


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_the_same_seed_gives_the_same_bytes_and_another_seed_other_bytes(tmp_path: Path) -> None:
    """Two writes with one seed are byte-identical; a different seed changes every shard."""
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        dataset.write_dataset(str(tmp_path / name), shards=3, mib=0.05, seed=seed)
    a, b, c = (_digests(tmp_path / n) for n in "abc")
    assert a == b
    assert all(a[name] != c[name] for name in a)


def test_the_bytes_do_not_depend_on_the_process(tmp_path: Path) -> None:
    """The CLI in a fresh interpreter (another hash seed) writes what the function writes in this one."""
    dataset.write_dataset(str(tmp_path / "here"), shards=2, mib=0.02, seed=7)
    cmd = [sys.executable, str(SCRIPT), "--out", str(tmp_path / "cli"), "--shards", "2", "--mib", "0.02", "--seed", "7"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={"PYTHONHASHSEED": "123"})
    assert out.returncode == 0, out.stderr
    assert "wrote 2 shards" in out.stdout
    assert _digests(tmp_path / "cli") == _digests(tmp_path / "here")


@pytest.mark.parametrize(("shards", "mib"), [(1, 0.01), (4, 0.25), (7, 0.1)])
def test_shard_count_and_sizes_are_as_asked(tmp_path: Path, shards: int, mib: float) -> None:
    """N shards named shard-000.txt…, summing to exactly the asked MiB, sizes differing by at most one byte; nothing
    else is written."""
    dataset.write_dataset(str(tmp_path), shards=shards, mib=mib, seed=0)
    files = sorted(tmp_path.iterdir())
    assert [p.name for p in files] == [f"shard-{i:03d}.txt" for i in range(shards)]
    sizes = [p.stat().st_size for p in files]
    assert sum(sizes) == round(mib * 2**20)
    assert max(sizes) - min(sizes) <= 1


def test_the_text_is_ascii_sentences_of_the_grammar(tmp_path: Path) -> None:
    """Shards hold ASCII lines ending in " ." (but the last, which may be cut), with number agreement and sums."""
    dataset.write_dataset(str(tmp_path), shards=1, mib=0.05, seed=1)
    text = (tmp_path / "shard-000.txt").read_bytes().decode("ascii")
    lines = text.split("\n")[:-1]
    assert len(lines) > 500 and all(line.endswith(" .") for line in lines)
    words = set(text.split())
    assert {"a", "some", "every", "plus", "is"} <= words
    assert not any(line.startswith("a ") and line.split()[1][0] in "aeiou" for line in lines)  # "an" before vowels
    numbers = dataset.NUMBERS
    for line in lines:
        if " plus " in line:
            a, _, b, _, total, _ = line.split()
            assert numbers.index(a) + numbers.index(b) == numbers.index(total)


def test_a_url_destination_is_written_through_fsspec(tmp_path: Path) -> None:
    """A file:// URL gets the same shards as the plain folder."""
    dataset.write_dataset((tmp_path / "url").as_uri(), shards=2, mib=0.01, seed=2)
    dataset.write_dataset(str(tmp_path / "plain"), shards=2, mib=0.01, seed=2)
    assert _digests(tmp_path / "url") == _digests(tmp_path / "plain")


def test_too_few_bytes_for_the_shards_is_refused() -> None:
    """Asking for more shards than bytes is an error, not empty files."""
    with pytest.raises(ValueError, match="too small"):
        dataset.write_dataset("/nonexistent", shards=10, mib=1e-6)

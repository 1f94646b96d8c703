"""A dataset key is untrusted input: a pull never writes outside its folder, never through a symlink, and a key
that cannot land as a file stops the pull with a clear message. Real moto S3 and real files; real CLIs."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from sdk.data._localpath import INDEX_NAME, LOCK_NAME, PARTIAL_SUFFIX
from sdk.data.pull import pull
from sdk.errors import DataPathError, DestinationBusyError, UnsafeKeyError
from sdk.stores.store import Store, open_store
from tests.conftest import CapturedLog

PODTRAIN = str(Path(sys.executable).with_name("podtrain"))

pytestmark = pytest.mark.s3_servers  # the S3 tests run on moto and on SeaweedFS


@pytest.fixture(params=["file", "s3", "seaweedfs"])
def any_url(request: pytest.FixtureRequest) -> str:
    """A fresh location on a local folder, on moto's S3 and on SeaweedFS's."""
    return str(request.getfixturevalue(f"{request.param}_url"))


def _files(folder: Path) -> dict[str, bytes]:
    """Every regular file under ``folder`` (podtrain's own index and lock left out), by relative name."""
    if not folder.exists():
        return {}
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and not p.is_symlink() and p.name not in (INDEX_NAME, LOCK_NAME)
    }


def _podtrain(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PODTRAIN, *args], capture_output=True, text=True, timeout=120, env={**os.environ, **env}, cwd=cwd
    )


# -- keys that point out of the folder -------------------------------------------------------------------------
@pytest.mark.s3_servers("moto", reason="SeaweedFS refuses to store a key with a . or .. component (400 InvalidRequest)")
@pytest.mark.parametrize("hostile", ["ds/../train.py", "ds/sub/../../train.py", "ds/.."])
def test_a_key_with_a_dotdot_component_fails_the_pull_and_writes_nothing(
    s3_url: str, tmp_path: Path, hostile: str
) -> None:
    """`prefix/../train.py` with the data folder in app/data would overwrite app/train.py: refused (naming the key
    and why) before any file is written, the safe keys next to it included."""
    store = open_store(s3_url)
    store.put("ds/ok.txt", b"fine")
    store.put(hostile, b"print('attacker')")
    app = tmp_path / "app"
    app.mkdir()
    (app / "train.py").write_text("print('mine')")
    with pytest.raises(UnsafeKeyError, match=r"'\.\.'") as caught:
        pull([f"{s3_url}/ds"], app / "data")
    assert hostile.removeprefix("ds/") in str(caught.value)
    assert (app / "train.py").read_text() == "print('mine')"
    assert _files(tmp_path) == {"app/train.py": b"print('mine')"}, "nothing landed, inside the folder or out"


@pytest.mark.s3_servers("moto", reason="SeaweedFS stores prefix//abs/path as prefix/abs/path: no absolute key")
def test_an_absolute_key_fails_the_pull_and_writes_nothing(s3_url: str, tmp_path: Path) -> None:
    """`prefix//abs/path` names an absolute path once the prefix is taken off: refused, nothing written there."""
    outside = tmp_path / "outside" / "x"
    store = open_store(s3_url)
    store.put(f"ds/{outside}", b"attacker")  # ds//tmp/.../outside/x
    store.put("ds/ok.txt", b"fine")
    with pytest.raises(UnsafeKeyError, match="absolute"):
        pull([f"{s3_url}/ds"], tmp_path / "data")
    assert not outside.exists() and not outside.parent.exists()
    assert _files(tmp_path) == {}


@pytest.mark.parametrize("shape", ["folder", "leaf"])
def test_a_symlink_planted_in_the_folder_is_never_written_through(any_url: str, tmp_path: Path, shape: str) -> None:
    """A symlinked folder inside the destination is refused (exit 2 material, naming it); a symlink where a file
    goes is neither adopted nor written through: the target outside stays as it was."""
    store = open_store(any_url)
    store.put("ds/sub/x.bin", b"dataset bytes")
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "data"
    (dest / "sub").mkdir(parents=True) if shape == "leaf" else dest.mkdir()
    if shape == "folder":
        (dest / "sub").symlink_to(outside, target_is_directory=True)
        with pytest.raises(DataPathError, match="symbolic link"):
            pull([f"{any_url}/ds"], dest)
        assert list(outside.iterdir()) == []
    else:
        (outside / "x.bin").write_bytes(b"dataset bytes")  # same content: would be adopted through the link
        (dest / "sub" / "x.bin").symlink_to(outside / "x.bin")
        pull([f"{any_url}/ds"], dest)
        assert not (dest / "sub" / "x.bin").is_symlink()
        assert (dest / "sub" / "x.bin").read_bytes() == b"dataset bytes"
        assert [p.name for p in outside.iterdir()] == ["x.bin"]


def test_a_leftover_partial_file_that_is_a_symlink_is_replaced_never_written_through(
    any_url: str, tmp_path: Path
) -> None:
    """A `<name>.podtrain-partial` left in the folder (a killed pull), here a link to a file outside: the pull
    removes it and creates its own; today the file outside is truncated and overwritten through the link."""
    open_store(any_url).put("ds/x.bin", b"dataset bytes")
    outside = tmp_path / "precious"
    outside.write_bytes(b"keep me")
    dest = tmp_path / "data"
    dest.mkdir()
    (dest / f"x.bin{PARTIAL_SUFFIX}").symlink_to(outside)
    pull([f"{any_url}/ds"], dest)
    assert outside.read_bytes() == b"keep me"
    assert (dest / "x.bin").read_bytes() == b"dataset bytes"
    assert not (dest / f"x.bin{PARTIAL_SUFFIX}").is_symlink()


def test_a_warm_index_planted_as_a_symlink_is_refused_and_its_target_untouched(s3_url: str, tmp_path: Path) -> None:
    """`.podtrain-pull.jsonl` linked to a file outside: today its lines are appended to that file."""
    open_store(s3_url).put("ds/x.bin", b"dataset bytes")
    outside = tmp_path / "train.py"
    outside.write_text("print('mine')\n")
    dest = tmp_path / "data"
    dest.mkdir()
    (dest / INDEX_NAME).symlink_to(outside)
    with pytest.raises(DataPathError, match="symbolic link"):
        pull([f"{s3_url}/ds"], dest)
    assert outside.read_text() == "print('mine')\n"


def test_a_folder_swapped_for_a_symlink_while_the_pull_runs_cannot_redirect_it(
    s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The folder is swapped for a symlink to outside between the file's creation and its rename: the file is
    written and renamed through the folder that was opened, never through the symlink."""
    store = open_store(s3_url)
    store.put("ds/sub/x.bin", b"dataset bytes")
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "data"
    original = Store.read

    def swapping(self: Store, rel: str, *args: Any) -> Any:
        if (dest / "sub").is_dir() and not (dest / "sub").is_symlink():
            (dest / "sub").rename(dest / "moved")
            (dest / "sub").symlink_to(outside, target_is_directory=True)
        return original(self, rel, *args)

    monkeypatch.setattr(Store, "read", swapping)
    with contextlib.suppress(DataPathError):  # refusing is fine too; writing outside is not
        pull([f"{s3_url}/ds"], dest)
    assert list(outside.iterdir()) == []
    assert _files(dest / "moved") in ({"x.bin": b"dataset bytes"}, {})


# -- keys that cannot land as files ----------------------------------------------------------------------------
def test_a_key_that_is_both_an_object_and_a_prefix_fails_clearly_before_anything_lands(
    s3_url: str, tmp_path: Path
) -> None:
    store = open_store(s3_url)
    store.put("ds/a", b"file")
    store.put("ds/a/b", b"under it")
    store.put("ds/c", b"other")
    with pytest.raises(UnsafeKeyError, match=r"'a'.*'a/b'"):
        pull([f"{s3_url}/ds"], tmp_path / "data")
    assert _files(tmp_path) == {}


def test_the_same_name_from_two_sources_fails_clearly(s3_url: str, tmp_path: Path) -> None:
    store = open_store(s3_url)
    store.put("one/x.bin", b"1")
    store.put("two/x.bin", b"2")
    with pytest.raises(UnsafeKeyError, match="twice"):
        pull([f"{s3_url}/one", f"{s3_url}/two"], tmp_path / "data")
    assert _files(tmp_path) == {}


@pytest.mark.s3_servers("moto", reason="SeaweedFS refuses a key component over 255 bytes (400 KeyTooLongError)")
def test_a_component_longer_than_the_file_system_allows_fails_clearly(s3_url: str, tmp_path: Path) -> None:
    store = open_store(s3_url)
    store.put("ds/" + "n" * 300, b"x")
    with pytest.raises(UnsafeKeyError, match="300 bytes"):
        pull([f"{s3_url}/ds"], tmp_path / "data")


@pytest.mark.parametrize("name", [INDEX_NAME, LOCK_NAME, f"x.bin{PARTIAL_SUFFIX}", f"d{PARTIAL_SUFFIX}/x"])
def test_a_key_named_like_podtrains_own_files_fails_clearly(s3_url: str, tmp_path: Path, name: str) -> None:
    """The warm index's own name (today its lines are appended to the user's object), the lock's, the partial
    suffix: refused, and nothing is written."""
    store = open_store(s3_url)
    store.put(f"ds/{name}", b'{"rel": "user data"}\n')
    store.put("ds/ok.txt", b"fine")
    with pytest.raises(UnsafeKeyError, match="podtrain"):
        pull([f"{s3_url}/ds"], tmp_path / "data")
    assert _files(tmp_path) == {}
    assert not (tmp_path / "data" / INDEX_NAME).exists()


def test_a_file_where_a_folder_must_go_fails_clearly_and_is_kept(any_url: str, tmp_path: Path) -> None:
    store = open_store(any_url)
    store.put("ds/a/b", b"under a")
    dest = tmp_path / "data"
    dest.mkdir()
    (dest / "a").write_bytes(b"the user's file")
    with pytest.raises(DataPathError, match="'a'"):
        pull([f"{any_url}/ds"], dest)
    assert (dest / "a").read_bytes() == b"the user's file"


# -- two pulls into one folder ---------------------------------------------------------------------------------
def _hold_lock(folder: Path) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def test_a_pull_waits_for_another_pull_into_the_same_folder_then_finds_its_files(
    s3_url: str, tmp_path: Path, captured_log: CapturedLog
) -> None:
    """The second pull says it waits for another pull, writes nothing meanwhile, and goes on once it is done."""
    store = open_store(s3_url)
    for i in range(5):
        store.put(f"ds/f{i}.bin", os.urandom(1000))
    dest = tmp_path / "data"
    held = _hold_lock(dest)
    outcome: dict[str, Any] = {}
    second = threading.Thread(target=lambda: outcome.update(result=pull([f"{s3_url}/ds"], dest)))
    second.start()
    deadline = time.monotonic() + 30
    while not captured_log.records("pull.waiting") and second.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        (waiting,) = captured_log.records("pull.waiting")
        assert "another pull" in waiting["reason"] and second.is_alive()
        assert _files(dest) == {}, "nothing written while the other pull holds the folder"
    finally:
        os.close(held)  # the other pull is done
        second.join(timeout=60)
    assert outcome["result"].fetched == 5 and len(_files(dest)) == 5


def test_a_pull_that_cannot_get_the_folder_in_time_fails_clearly(s3_url: str, tmp_path: Path) -> None:
    open_store(s3_url).put("ds/f.bin", b"x")
    dest = tmp_path / "data"
    held = _hold_lock(dest)
    try:
        with pytest.raises(DestinationBusyError, match="another pull") as caught:
            pull([f"{s3_url}/ds"], dest, lock_wait=0.2)
        assert str(dest) in str(caught.value)
    finally:
        os.close(held)
    assert _files(dest) == {}


def test_two_podtrain_pulls_at_once_into_one_folder_both_succeed(s3_url: str, tmp_path: Path) -> None:
    """Today both die with FileNotFoundError on the partial file; with the lock one waits for the other."""
    store = open_store(s3_url)
    expected = {f"f{i:02d}.bin": os.urandom(20_000 + i) for i in range(30)}
    for name, data in expected.items():
        store.put(f"ds/{name}", data)
    dest = tmp_path / "data"
    args = [PODTRAIN, "pull", f"{s3_url}/ds", "--dest", str(dest), "--json", "--workers", "4"]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
        assert "Traceback" not in err
    assert sorted(json.loads(out)["fetched"] for out, _ in outputs)[1] == 30
    assert _files(dest) == expected
    assert not list(dest.rglob(f"*{PARTIAL_SUFFIX}"))
    assert not (dest / LOCK_NAME).exists(), "the lock file goes with its last holder"


# -- end to end: the command line -----------------------------------------------------------------------------
@pytest.mark.s3_servers("moto", reason="SeaweedFS refuses to store a key with a . or .. component (400 InvalidRequest)")
def test_podtrain_run_with_a_hostile_key_exits_2_naming_it_and_never_starts_the_child(
    s3_url: str, tmp_path: Path
) -> None:
    """`podtrain run` with PODTRAIN_DATA_DIR=app/data and a key `ds/../train.py`: exit 2, one line naming the
    key, app/train.py untouched, the child never ran."""
    store = open_store(s3_url)
    store.put("ds/ok.txt", b"fine")
    store.put("ds/../train.py", b"import os; os.system('touch pwned')")
    app = tmp_path / "app"
    app.mkdir()
    (app / "train.py").write_text("print('mine')")
    ran = tmp_path / "child-ran"
    env = {
        "PODTRAIN_DATA_URI": f"{s3_url}/ds",
        "PODTRAIN_DATA_DIR": "app/data",
        "PODTRAIN_ATTEMPT": "1",
        "PODTRAIN_CHECKPOINT_URI": str(tmp_path / "ckpt"),
        "PODTRAIN_TERMINATION_LOG": str(tmp_path / "term"),
    }
    done = _podtrain("run", "--", sys.executable, "-c", f"open({str(ran)!r}, 'w')", env=env, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("podtrain:")]
    assert len(lines) == 1 and "../train.py" in lines[0] and "'..'" in lines[0], done.stderr
    assert (app / "train.py").read_text() == "print('mine')"
    assert not ran.exists() and not (tmp_path / "pwned").exists()
    assert not (app / "data" / "ok.txt").exists()
    assert "../train.py" in json.loads((tmp_path / "term").read_text())["message"]


def test_podtrain_pull_with_a_hostile_key_exits_2_with_one_line(s3_url: str, tmp_path: Path) -> None:
    store = open_store(s3_url)
    store.put("ds/a", b"file")
    store.put("ds/a/b", b"both a file and a folder")
    done = _podtrain("pull", f"{s3_url}/ds", "--dest", "d", env={}, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("podtrain:")]
    assert "'a'" in line and "'a/b'" in line

"""Racing writers never break a committed checkpoint, and two processes never obtain one derived attempt number.

Real processes (``checkpoint_writer_worker.py``, and ``podtrain run`` for the supervisor's derivation) save the
same steps to one store at once — a local folder (file://) and moto S3 — then the installed
``podtrain checkpoints verify`` must pass on every committed step, and the files the manifest lists must be
exactly the ones its committer wrote. Several trials run inside each test, so a lucky interleaving cannot pass
it; the ``race`` trials force the one that broke shared folders (a slow writer's uploads landing after a fast
writer's commit).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sdk.checkpoints.manifest import MANIFEST_NAME, parse, step_dir
from sdk.stores.store import open_store

WORKER = str(Path(__file__).with_name("checkpoint_writer_worker.py"))
PODTRAIN = str(Path(sys.executable).with_name("podtrain"))  # the console script installed beside this python
PEERS = 2
TIMEOUT = 240


@pytest.fixture(params=["file", "s3"])
def ckpt_url(request: pytest.FixtureRequest) -> Iterator[str]:
    yield str(request.getfixturevalue(f"{request.param}_url")) + "/ckpt"


def _env(url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PODTRAIN_")}
    env.update(
        PODTRAIN_CHECKPOINT_URI=url,
        PODTRAIN_RUN_ID="writers",
        PODTRAIN_LOG_LEVEL="warning",
        PODTRAIN_KEEP_LAST="100",
        **extra,
    )
    return env


def _start(cmd: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    """Started in ``cwd``: whatever a process writes to its default places (./.podtrain) stays in the test's folder."""
    return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(procs: list[subprocess.Popen[str]]) -> None:
    """Wait for every process; on the first failure stop the others (they would wait for it at a barrier)."""
    try:
        for proc in procs:
            _, stderr = proc.communicate(timeout=TIMEOUT)
            assert proc.returncode == 0, stderr[-3000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


def _peers(url: str, sync: Path, *, trials: int, race: int, derive: bool, attempt: str | None) -> list[list[dict]]:
    """Start every peer at once, wait for them, return each one's results (one entry per trial: steps 10, 20…);
    the first ``race`` trials force the slow writer's interleaving."""
    sync.mkdir()
    env = _env(url, **({"PODTRAIN_ATTEMPT": attempt} if attempt else {}))
    outs = [sync / f"out-{i}.json" for i in range(PEERS)]
    procs = []
    for i, out in enumerate(outs):
        cmd = [sys.executable, WORKER, "--index", str(i), "--peers", str(PEERS), "--trials", str(trials)]
        cmd += ["--first-trial", "1", "--race", str(race), "--sync", str(sync), "--out", str(out)]
        cmd += ["--derive"] * derive
        procs.append(_start(cmd, env, sync))
    _finish(procs)
    return [json.loads(out.read_text()) for out in outs]


def _check_trial(url: str, results: list[dict[str, Any]]) -> dict[str, Any]:
    """One step saved by every peer: exactly one committed, the others were told so, and the committed
    checkpoint is exactly the winner's and passes `podtrain checkpoints verify`. Returns the winner's result."""
    step = results[0]["step"]
    winners = [r for r in results if r["committed"]]
    assert len(winners) == 1, results
    for loser in results:
        if not loser["committed"]:
            assert "already committed" in loser["error"], loser
    store = open_store(url)
    manifest = parse(store.get(f"{step_dir(step)}/{MANIFEST_NAME}"), location=url)
    assert manifest.attempt == winners[0]["attempt"]
    listed = {name: [e.size, e.crc32c] for name, e in manifest.files.items()}
    assert listed == winners[0]["files"], "the committed manifest lists the winner's files"
    verified = subprocess.run(
        [PODTRAIN, "checkpoints", "verify", url, "--step", str(step), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(url),
    )
    assert verified.returncode == 0, (step, verified.stdout, verified.stderr[-2000:])
    assert json.loads(verified.stdout)["ok"] is True
    return winners[0]


def test_two_writers_with_the_same_attempt_never_break_the_committed_checkpoint(ckpt_url: str, tmp_path: Path) -> None:
    """Same PODTRAIN_ATTEMPT, same steps, at once: the loser of the commit never touches the winner's files."""
    for results in _by_trial(_peers(ckpt_url, tmp_path / "sync", trials=5, race=3, derive=False, attempt="4")):
        assert {r["attempt"] for r in results} == {4}
        _check_trial(ckpt_url, results)


def test_two_processes_deriving_the_attempt_at_once_get_different_numbers(ckpt_url: str, tmp_path: Path) -> None:
    """Every peer derives its attempt from the same store before any saves: the numbers all differ, and the
    step they then all save is committed once, intact."""
    seen: list[int] = []
    for results in _by_trial(_peers(ckpt_url, tmp_path / "sync", trials=3, race=2, derive=True, attempt=None)):
        attempts = [r["attempt"] for r in results]
        assert len(set(attempts)) == PEERS, f"two processes derived the same attempt: {results}"
        assert not set(attempts) & set(seen), "a number already taken in an earlier trial was derived again"
        seen += attempts
        _check_trial(ckpt_url, results)


def test_two_podtrain_runs_started_together_derive_different_attempts(ckpt_url: str, tmp_path: Path) -> None:
    """Two `podtrain run` supervisors derive the attempt from one store at once and export it to their child:
    the children get different numbers, and the step both save is committed once, intact."""
    for trial in range(2):
        sync = tmp_path / f"run-{trial}"
        sync.mkdir()
        outs = [sync / f"out-{i}.json" for i in range(PEERS)]
        procs = []
        for i, out in enumerate(outs):
            child = [sys.executable, WORKER, "--index", str(i), "--peers", str(PEERS), "--first-trial", str(trial + 1)]
            child += ["--sync", str(sync), "--out", str(out)]
            env = _env(ckpt_url, PODTRAIN_TERMINATION_LOG=str(sync / f"termination-{i}"))
            procs.append(_start([PODTRAIN, "run", "--", *child], env, sync))
        _finish(procs)
        results = [json.loads(out.read_text())[0] for out in outs]
        assert len({r["attempt"] for r in results}) == PEERS, f"two supervisors derived the same attempt: {results}"
        _check_trial(ckpt_url, results)


def _by_trial(per_peer: list[list[dict[str, Any]]]) -> list[list[dict[str, Any]]]:
    return [list(trial) for trial in zip(*per_peer, strict=True)]

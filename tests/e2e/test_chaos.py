"""Chaos tests of preemption with real processes: `podtrain run -- python chaos_train.py`, real signals, real crashes.

A *chain* is one run (one run id, one ``file://`` checkpoint store) across attempts: attempts 1..k are interrupted
at seeded random moments, then one more runs to the end, and its final weights must equal those of an
uninterrupted run bit for bit (a chain that reaches its last step early is complete, and the seed's remaining
trials go to a fresh run). Each attempt also draws its checkpoint mode (async, overlap, sync) from the
seed. Every assertion names its seed and attempt; the seed lists are fixed, so a failure reproduces
(timing aside) by running the same test again. Chains run a few at a time in threads: each attempt is real
processes that spend most of their life importing torch. ``-m slow`` adds the long soak variants.

Moments: ``time`` — a delay after the supervisor installed its signal handlers (the child may not exist yet, or
be importing torch with no handler of its own); ``init`` — as soon as ``sdk.init`` installed the child's handler
(``resume`` may be running); ``step`` — right after a given training step completed; ``save`` (SIGKILL only) —
while a checkpoint folder is being written. Handlers are read from ``/proc/PID/status`` (``SigCgt``).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from sdk.checkpoints.checkpointer import Checkpointer, CheckpointInfo

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ROOT / "tests" / "e2e" / "chaos_train.py"
PY = sys.executable

STEPS, EVERY, STEP_SLEEP = 120, 20, 0.004  # STEPS is a multiple of EVERY: a run that ends has its last step saved
GRACE = 5.0
MODES = ("async", "overlap", "sync")
WORKERS = 2  # chains at once
PROCESS_TIMEOUT = 180.0  # generous: on a loaded 2-core machine torch's import alone can take 15 s

# Trials per seed: one chain of attempts per seed, as long as possible, since every attempt costs a torch import.
SIGTERM_SEEDS, SIGTERM_SLOW_SEEDS, SIGTERM_PER_SEED = [1, 2], list(range(100, 110)), 10  # 20 and 100 trials
SIGKILL_SEEDS, SIGKILL_SLOW_SEEDS, SIGKILL_PER_SEED = [1, 2], list(range(100, 110)), 3  # 6 and 30 trials


# -- reading what a run left behind --------------------------------------------------------------------------------
@dataclass
class Progress:
    """What chaos_train.py wrote: its pid, the step it resumed from, the steps it completed."""

    pid: int | None = None
    start: int | None = None
    steps: list[int] = field(default_factory=list)

    @property
    def last(self) -> int | None:
        return self.steps[-1] if self.steps else None


def _progress(path: Path) -> Progress:
    """Parse a progress file; a last line cut short by a crash is ignored."""
    found = Progress()
    if not path.exists():
        return found
    for line in path.read_text().splitlines(keepends=True):
        if not line.endswith("\n"):
            break
        key, _, value = line.strip().rpartition(" ")
        if key == "pid":
            found.pid = int(value)
        elif key == "start":
            found.start = int(value)
        elif not key and value.isdigit():
            found.steps.append(int(value))
    return found


def _committed(uri: str) -> CheckpointInfo | None:
    """The newest committed checkpoint whose files check out (sizes), or None."""
    infos = Checkpointer(uri, run_id="chaos", attempt=1).list()
    return infos[0] if infos else None


def _log_events(path: Path, event: str) -> list[dict[str, Any]]:
    """The JSON log lines of ``event`` in a captured stderr file (other lines, e.g. tracebacks, are skipped)."""
    found = []
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and record.get("event") == event:
                found.append(record)
    return found


def _unread(message: dict[str, Any]) -> bool:
    """Whether the supervisor killed the child at the deadline and then had too little time to read the store.

    The message then says so instead of naming the checkpoint: allowed, by design. (The child's Python teardown
    after an import of torch takes 1.5-3 s on a loaded 2-core machine, so with a 5 s grace it can overrun.)
    """
    text = str(message["message"])
    return message["step"] is None and "at the grace-period deadline" in text and "did not answer" in text


def _termination_message(path: Path, ctx: str) -> dict[str, Any]:
    """The termination message: exactly one line of JSON, at most 4,096 bytes."""
    assert path.exists(), f"{ctx}: no termination message written"
    text = path.read_text()
    assert text.endswith("\n") and text.count("\n") == 1, f"{ctx}: not one line: {text!r}"
    assert len(text.rstrip("\n").encode()) <= 4096, ctx
    message = json.loads(text)
    assert isinstance(message, dict), f"{ctx}: {text!r}"
    return message


# -- processes -----------------------------------------------------------------------------------------------------
def _catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler for ``signum`` installed (False when it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("SigCgt:"):
            return bool((int(line.split()[1], 16) >> (signum - 1)) & 1)
    return False


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            kids.append(int(entry))
    return kids


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        for kid in _children(todo.pop()):
            found.append(kid)
            todo.append(kid)
    return found


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def _crash(supervisor: subprocess.Popen[bytes]) -> None:
    """SIGKILL the supervisor and everything under it at once, as a node loss would; return when all are dead.

    The child leads its own process group (the supervisor starts it in a new session), so killing the
    supervisor's group is not enough: the supervisor is frozen first (it can start nothing more), then its
    descendants are found and frozen, then all of them get SIGKILL.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(supervisor.pid, signal.SIGSTOP)
    victims = _descendants(supervisor.pid)
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
    for pid in victims:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(supervisor.pid, signal.SIGKILL)
    supervisor.wait(timeout=30)
    end = time.monotonic() + 30
    while not all(_gone(pid) for pid in victims):
        assert time.monotonic() < end, f"processes {victims} survived SIGKILL"
        time.sleep(0.01)


@dataclass
class Attempt:
    """One supervised attempt of a chain: its process and the files it writes."""

    number: int
    mode: str
    proc: subprocess.Popen[bytes]
    progress: Path
    weights: Path
    termlog: Path
    stderr: Path

    def tail(self, lines: int = 25) -> str:
        text = self.stderr.read_text(errors="replace") if self.stderr.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Chain:
    """One run across attempts: a run id, a checkpoint store, and a folder for every attempt's files."""

    folder: Path
    seed: int
    rng: random.Random = field(default_factory=random.Random)
    reference: Reference | None = None
    uri: str = field(init=False)
    store: Path = field(init=False)

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.store = self.folder / "ckpt"
        self.uri = self.store.as_uri()

    def start(
        self, number: int, *, mode: str = "async", args: Iterable[str] = (), env: dict[str, str] | None = None
    ) -> Attempt:
        """``python -m entrypoint run -- python chaos_train.py ...`` in its own session, output to files."""
        progress, weights = self.folder / f"progress-{number}", self.folder / f"weights-{number}.pt"
        stderr, termlog = self.folder / f"stderr-{number}", self.folder / f"termination-{number}"
        train = [PY, str(TRAIN), "--steps", str(STEPS), "--every", str(EVERY), "--sleep", str(STEP_SLEEP)]
        train += ["--progress", str(progress), "--weights", str(weights), "--checkpoint-mode", mode, *args]
        variables = {
            **os.environ,
            "PODTRAIN_RUN_ID": "chaos",
            "PODTRAIN_ATTEMPT": str(number),
            "PODTRAIN_CHECKPOINT_URI": self.uri,
            "PODTRAIN_OUTPUT_DIR": str(self.folder / f"output-{number}"),  # outputs and records stay in the test's
            "PODTRAIN_ARTIFACT_URI": str(self.folder / "artifacts"),  # folder, never the working directory
            "PODTRAIN_GRACE_SECONDS": str(GRACE),
            "PODTRAIN_TERMINATION_LOG": str(termlog),
            "PODTRAIN_LOG_LEVEL": "warning",
            "PODTRAIN_LOG_FORMAT": "json",
            **(env or {}),
        }
        with stderr.open("wb") as err:
            proc = subprocess.Popen(
                [PY, "-m", "entrypoint", "run", "--", *train],
                env=variables,
                cwd=ROOT,
                start_new_session=True,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        return Attempt(number, mode, proc, progress, weights, termlog, stderr)

    def ctx(self, attempt: Attempt, what: str = "") -> str:
        return f"seed {self.seed} attempt {attempt.number} [{attempt.mode}]{' ' + what if what else ''}"


# -- choosing and waiting for the moment ---------------------------------------------------------------------------
def _pick_moment(rng: random.Random, resumed_from: int, *, saves: bool = False) -> tuple[str, float]:
    """``(kind, value)``: when to send the signal (see the module docstring)."""
    r = rng.random()
    if r < (0.15 if saves else 0.3):
        return "time", round(rng.uniform(0.0, 1.5), 3)
    if r < (0.25 if saves else 0.4):
        return "init", 0.0
    if saves and r < 0.65:
        return "save", 0.0
    return "step", float(rng.randint(min(resumed_from + 1, STEPS - 10), STEPS - 10))


def _pending_save(store: Path, attempt: int) -> bool:
    """Whether this attempt is writing a step folder that has no manifest yet (a save in flight)."""
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(store):
            folder = store / name
            writing = any(folder.glob(f"attempt-{attempt}-*")) or (folder / f"attempt-{attempt}").is_dir()
            if writing and not (folder / "MANIFEST.json").exists():  # its writer folder, with or without an id
                return True
    return False


def _wait_for_moment(attempt: Attempt, kind: str, value: float, store: Path) -> bool:
    """Wait for the moment; False when the attempt ended first."""
    end = time.monotonic() + PROCESS_TIMEOUT
    ready: float | None = None  # when the supervisor's handlers were in place
    while attempt.proc.poll() is None:
        now = time.monotonic()
        assert now < end, f"attempt {attempt.number} did not reach {kind} {value} in {PROCESS_TIMEOUT} s"
        if ready is None and _catches(attempt.proc.pid, signal.SIGTERM):
            ready = now
        if ready is not None:
            if kind == "time" and now - ready >= value:
                return True
            progress = _progress(attempt.progress)
            if kind == "init" and progress.pid and _catches(progress.pid, signal.SIGTERM):
                return True
            if kind == "step" and (progress.last or 0) >= value:
                return True
            if kind == "save" and (_pending_save(store, attempt.number) or (progress.last or 0) >= STEPS - 1):
                return True  # (no save left to catch near the end: crash anyway)
        time.sleep(0.0005 if kind == "save" else 0.002)
    return False


# -- the reference run ---------------------------------------------------------------------------------------------
class Reference:
    """An uninterrupted run's final weights: started once per module, waited for on first use (thread-safe)."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.weights_path = folder / "weights.pt"
        env = {
            **os.environ,
            "PODTRAIN_RUN_ID": "reference",
            "PODTRAIN_ATTEMPT": "1",
            "PODTRAIN_CHECKPOINT_URI": (folder / "ckpt").as_uri(),
            "PODTRAIN_OUTPUT_DIR": str(folder / "output"),
            "PODTRAIN_ARTIFACT_URI": str(folder / "artifacts"),
            "PODTRAIN_LOG_LEVEL": "warning",
        }
        cmd = [PY, str(TRAIN), "--steps", str(STEPS), "--every", str(EVERY), "--checkpoint-mode", "sync"]
        cmd += ["--progress", str(folder / "progress"), "--weights", str(self.weights_path)]
        self.proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._lock = threading.Lock()
        self._weights: dict[str, torch.Tensor] | None = None

    def weights(self) -> dict[str, torch.Tensor]:
        with self._lock:
            if self._weights is None:
                _, err = self.proc.communicate(timeout=PROCESS_TIMEOUT)
                assert self.proc.returncode == 0, f"the reference run failed: {err.decode(errors='replace')}"
                self._weights = torch.load(self.weights_path, weights_only=True)
            return self._weights


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reference]:
    ref = Reference(tmp_path_factory.mktemp("chaos-reference"))
    yield ref
    if ref.proc.poll() is None:
        ref.proc.kill()
        ref.proc.wait()


def _assert_same_weights(path: Path, reference: Reference | None, ctx: str) -> None:
    assert reference is not None and path.exists(), f"{ctx}: no final weights written"
    got, want = torch.load(path, weights_only=True), reference.weights()
    assert got.keys() == want.keys(), ctx
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, f"{ctx}: final weights differ from the uninterrupted run's in {differ}"


def _finish(chain: Chain, number: int) -> Attempt:
    """Run one more attempt to its end: exit 0, outcome succeeded, every step after its resume, same weights."""
    attempt = chain.start(number, mode=chain.rng.choice(MODES))
    rc = attempt.proc.wait(timeout=PROCESS_TIMEOUT)
    ctx = chain.ctx(attempt, "(run to completion)")
    assert rc == 0, f"{ctx}: exit {rc}\n{attempt.tail()}"
    message = _termination_message(attempt.termlog, ctx)
    assert (message["outcome"], message["exit_code"], message["step"]) == ("succeeded", 0, STEPS), f"{ctx}: {message}"
    progress = _progress(attempt.progress)
    assert progress.start is not None, f"{ctx}: never resumed\n{attempt.tail()}"
    assert progress.steps == list(range(progress.start + 1, STEPS + 1)), f"{ctx}: {progress}"
    _assert_skipped_only_uncommitted(attempt, ctx)
    _assert_same_weights(attempt.weights, chain.reference, ctx)
    return attempt


def _run_chains(seeds: list[int], chain: Callable[[int], dict[str, Any]]) -> list[dict[str, Any]]:
    """Run ``chain(seed)`` for every seed, WORKERS at a time; fail naming every seed that failed."""
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        futures = {seed: pool.submit(chain, seed) for seed in seeds}
    failures, results = [], []
    for seed, future in futures.items():
        error = future.exception()
        if error is None:
            results.append(future.result())
        else:
            failures.append(f"seed {seed}: {type(error).__name__}: {error}")
    if failures:
        pytest.fail(f"{len(failures)} of {len(seeds)} chains failed:\n" + "\n\n".join(failures), pytrace=False)
    return results


def _summary(results: list[dict[str, Any]]) -> str:
    trials = [t for r in results for t in r["trials"]]
    lost = collections.Counter(t["lost"] for t in trials)
    exits = collections.Counter(t["rc"] for t in trials)
    kinds = collections.Counter(t["kind"] for t in trials)
    took = max((t.get("took", 0.0) for t in trials), default=0.0)
    left = sum(t.get("uncommitted", 0) for t in trials)
    deadline = sum(t.get("deadline", False) for t in trials)
    unread = sum(t.get("unread", False) for t in trials)
    return (
        f"{len(trials)} trials in {sum(r['runs'] for r in results)} runs; exits {dict(exits)}; moments {dict(kinds)}; "
        f"steps lost {dict(lost)}; slowest exit after the signal {took:.2f} s; children killed at the deadline "
        f"{deadline} (message without checkpoint: {unread}); half-written folders left {left}"
    )


# -- the chaos chains -----------------------------------------------------------------------------------------------
def _sigterm_attempt(chain: Chain, number: int, resumed_from: int, trials: list[dict[str, Any]]) -> tuple[int, bool]:
    """One attempt preempted at a seeded moment; returns (the step the next attempt resumes from, run finished)."""
    kind, value = _pick_moment(chain.rng, resumed_from)
    attempt = chain.start(number, mode=chain.rng.choice(MODES))
    ctx = chain.ctx(attempt, f"(SIGTERM at {kind} {value})")
    signalled = _wait_for_moment(attempt, kind, value, chain.store)
    if signalled:
        os.kill(attempt.proc.pid, signal.SIGTERM)
    sent = time.monotonic()
    rc = attempt.proc.wait(timeout=PROCESS_TIMEOUT)
    took = time.monotonic() - sent
    _assert_skipped_only_uncommitted(attempt, ctx)
    if not signalled:  # it ran to the end before the moment came: fine, but no trial
        assert rc == 0, f"{ctx}: exit {rc} before the signal\n{attempt.tail()}"
        assert _termination_message(attempt.termlog, ctx)["outcome"] == "succeeded", ctx
        _assert_same_weights(attempt.weights, chain.reference, ctx)
        return STEPS, True
    assert took < GRACE, f"{ctx}: the supervisor exited {took:.2f} s after SIGTERM; grace is {GRACE} s"
    assert rc in (0, 75), f"{ctx}: exit {rc}\n{attempt.tail()}"
    message = _termination_message(attempt.termlog, ctx)
    newest = _committed(chain.uri)
    want = {
        "outcome": "preempted" if rc == 75 else "succeeded",
        "exit_code": rc,
        "run_id": "chaos",
        "attempt": number,
        "step": newest.step if newest else None,
        "checkpoint": newest.url if newest else None,
    }
    got = {k: message[k] for k in want}
    deadline = "at the grace-period deadline" in str(message["message"])
    unread = _unread(message)
    if unread:
        got.update(step=want["step"], checkpoint=want["checkpoint"])
    assert got == want, f"{ctx}: message {message}\n{attempt.tail()}"

    progress = _progress(attempt.progress)
    if progress.start is not None:
        assert progress.start == resumed_from, f"{ctx}: resumed from {progress.start}, not {resumed_from}"
    last = progress.last or resumed_from  # the last step this attempt completed
    after = newest.step if newest else 0
    assert after >= resumed_from, f"{ctx}: the newest checkpoint went back from {resumed_from} to {after}"
    assert last - after <= 1, f"{ctx}: step {last} completed, the next attempt can only resume from {after}"
    trials.append({"kind": kind, "rc": rc, "lost": last - after, "took": took, "deadline": deadline, "unread": unread})
    if rc == 0:  # it finished before the signal took effect
        _assert_same_weights(attempt.weights, chain.reference, ctx)
    return after, rc == 0


def _sigkill_attempt(chain: Chain, number: int, resumed_from: int, trials: list[dict[str, Any]]) -> tuple[int, bool]:
    """One attempt crashed (SIGKILL to every process) at a seeded moment; check what the store holds after it."""
    kind, value = _pick_moment(chain.rng, resumed_from, saves=True)
    attempt = chain.start(number, mode=chain.rng.choice(MODES))
    ctx = chain.ctx(attempt, f"(SIGKILL at {kind} {value})")
    crashed = _wait_for_moment(attempt, kind, value, chain.store)
    if crashed:
        _crash(attempt.proc)
    _assert_skipped_only_uncommitted(attempt, ctx)
    progress = _progress(attempt.progress)
    if progress.start is not None:
        assert progress.start == resumed_from, f"{ctx}: resumed from {progress.start}, not {resumed_from}"
    if not crashed:  # it ran to the end before the moment came: fine, but no trial
        assert attempt.proc.returncode == 0, f"{ctx}: exit {attempt.proc.returncode}\n{attempt.tail()}"
        _assert_same_weights(attempt.weights, chain.reference, ctx)
        return STEPS, True

    # What a crash leaves: committed checkpoints are whole (every byte checked); the rest have no manifest.
    checkpointer = Checkpointer(chain.uri, run_id="chaos", attempt=1)
    entries = checkpointer.scan()
    for entry in entries:
        if entry.manifest is not None:
            problem = checkpointer.problem(entry, download=True)
            assert problem is None, f"{ctx}: committed checkpoint {entry.url} is broken after a crash: {problem}"
    newest = max((e.step for e in entries if e.manifest is not None), default=0)
    last = progress.last or resumed_from
    # (+1: a step's checkpoint is committed inside run.checkpoint(), before its progress line is written)
    ok = resumed_from <= newest <= last + 1
    assert ok, f"{ctx}: newest checkpoint {newest}, steps done {resumed_from}..{last}"
    uncommitted = [e.step for e in entries if e.manifest is None and e.step > newest]
    trials.append({"kind": kind, "rc": attempt.proc.returncode, "lost": last - newest, "uncommitted": len(uncommitted)})
    return newest, False


def _assert_skipped_only_uncommitted(attempt: Attempt, ctx: str) -> None:
    """On its way to the newest committed checkpoint, a resume passed over folders without a manifest only."""
    for skipped in _log_events(attempt.stderr, "checkpoint.skipped"):
        assert "no manifest" in str(skipped.get("reason")), f"{ctx}: the resume skipped {skipped}"


def _chaos(folder: Path, seed: int, how: str, wanted: int, reference: Reference) -> dict[str, Any]:
    """``wanted`` seeded trials (SIGTERM or SIGKILL) on chains of attempts; each chain then runs to the end.

    A chain whose attempt finishes before its signal lands is complete; the next trials go to a fresh run.
    """
    rng = random.Random(seed)
    interrupt = _sigterm_attempt if how == "sigterm" else _sigkill_attempt
    trials: list[dict[str, Any]] = []
    runs = 0
    while len(trials) < wanted:
        runs += 1
        chain = Chain(folder / f"{how}-{seed}-{runs}", seed, rng=rng, reference=reference)
        number, resumed_from, finished = 0, 0, False
        while len(trials) < wanted and not finished:
            number += 1
            resumed_from, finished = interrupt(chain, number, resumed_from, trials)
        if not finished:
            final = _finish(chain, number + 1)
            assert _progress(final.progress).start == resumed_from, f"seed {seed}: the last attempt resumed elsewhere"
    return {"seed": seed, "trials": trials, "runs": runs}


# -- SIGTERM -------------------------------------------------------------------------------------------------------
def test_sigterm_at_random_moments_exits_in_grace_and_loses_at_most_one_step(
    tmp_path: Path, reference: Reference
) -> None:
    """20 seeded SIGTERMs: 75 (or 0) within grace, message names the newest commit, <=1 step lost, exact weights."""
    results = _run_chains(SIGTERM_SEEDS, lambda s: _chaos(tmp_path, s, "sigterm", SIGTERM_PER_SEED, reference))
    assert sum(len(r["trials"]) for r in results) >= 20
    print(_summary(results))


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_sigterm_soak_100_trials(tmp_path: Path, reference: Reference) -> None:
    """The default SIGTERM chaos test's checks over 100 seeded trials."""
    results = _run_chains(SIGTERM_SLOW_SEEDS, lambda s: _chaos(tmp_path, s, "sigterm", SIGTERM_PER_SEED, reference))
    assert sum(len(r["trials"]) for r in results) >= 100
    print(_summary(results))


def test_sigterm_while_the_supervisor_starts_still_exits_75_with_a_message(tmp_path: Path) -> None:
    """A SIGTERM while `podtrain run` is still starting (here: deriving the attempt from a store that does not
    answer) is caught from its first line: no child is started, exit 75 within the grace period, a message.

    The contract is "exited before SIGTERM + grace", checked against the grace this test sets: a long one, since
    the start-up's imports alone can take seconds on a loaded machine (6.2 s once, against the chains' 5 s)."""
    grace = 30.0
    env = {**_storage_down(), "PODTRAIN_ATTEMPT": "", "PODTRAIN_GRACE_SECONDS": str(grace)}
    attempt = Chain(tmp_path, seed=0).start(1, env=env)
    end = time.monotonic() + 30
    while not _catches(attempt.proc.pid, signal.SIGTERM):  # entrypoint.early's handler: imports still to come
        assert attempt.proc.poll() is None and time.monotonic() < end, attempt.tail()
        time.sleep(0.0005)
    os.kill(attempt.proc.pid, signal.SIGTERM)
    sent = time.monotonic()
    rc = attempt.proc.wait(timeout=PROCESS_TIMEOUT)
    took = time.monotonic() - sent
    assert rc == 75, f"exit {rc}\n{attempt.tail()}"
    assert took < grace, f"exited {took:.1f} s after SIGTERM, grace {grace} s\n{attempt.tail()}"
    message = _termination_message(attempt.termlog, "start-up")
    assert message["outcome"] == "preempted" and message["checkpoint"] is None, message
    assert _progress(attempt.progress).pid is None, "the child must not start after the SIGTERM"


# -- SIGKILL -------------------------------------------------------------------------------------------------------
def test_sigkill_at_random_moments_resumes_from_the_newest_valid_checkpoint(
    tmp_path: Path, reference: Reference, outcome_runs: dict[str, Future[tuple[Chain, Attempt, int]]]
) -> None:
    """Seeded SIGKILLs of all processes: commits stay whole, resume takes the newest one, final weights exact."""
    results = _run_chains(SIGKILL_SEEDS, lambda s: _chaos(tmp_path, s, "sigkill", SIGKILL_PER_SEED, reference))
    trials = [t for r in results for t in r["trials"]]
    assert len(trials) >= len(SIGKILL_SEEDS) * SIGKILL_PER_SEED
    assert all(t["rc"] == -signal.SIGKILL or t["rc"] == 0 for t in trials), trials
    print(_summary(results))


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_sigkill_soak(tmp_path: Path, reference: Reference) -> None:
    """The default SIGKILL chaos test's checks over 30 seeded crashes."""
    results = _run_chains(SIGKILL_SLOW_SEEDS, lambda s: _chaos(tmp_path, s, "sigkill", SIGKILL_PER_SEED, reference))
    trials = [t for r in results for t in r["trials"]]
    assert len(trials) >= len(SIGKILL_SLOW_SEEDS) * SIGKILL_PER_SEED
    assert all(t["rc"] == -signal.SIGKILL or t["rc"] == 0 for t in trials), trials
    print(_summary(results))


# -- the termination message for every outcome ---------------------------------------------------------------------
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _storage_down() -> dict[str, str]:
    """An S3 checkpoint URI whose endpoint refuses connections (nothing listens), with dummy credentials."""
    return {
        "PODTRAIN_CHECKPOINT_URI": "s3://podtrain-chaos/run",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{_closed_port()}",
        "AWS_ACCESS_KEY_ID": "chaos",
        "AWS_SECRET_ACCESS_KEY": "chaos-secret-key",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


# outcome: (expected exit code, extra environment, chaos_train.py arguments)
OUTCOME_RUNS: dict[str, tuple[int, dict[str, str], list[str]]] = {
    "succeeded": (0, {}, []),
    "failed": (1, {}, ["--fail-at", "25"]),  # a user bug: the script raises
    "config_error": (2, {"PODTRAIN_GRACE_SECONDS": "abc"}, []),
    "preempted": (75, {}, []),  # SIGTERM after step 30
    "storage_unavailable": (69, {}, []),  # _storage_down()
}


def _outcome_run(folder: Path, outcome: str) -> tuple[Chain, Attempt, int]:
    _, env, args = OUTCOME_RUNS[outcome]
    chain = Chain(folder, seed=0)
    attempt = chain.start(1, args=args, env=_storage_down() if outcome == "storage_unavailable" else env)
    if outcome == "preempted" and _wait_for_moment(attempt, "step", 30, chain.store):
        os.kill(attempt.proc.pid, signal.SIGTERM)
    return chain, attempt, attempt.proc.wait(timeout=PROCESS_TIMEOUT)


@pytest.fixture(scope="module")
def outcome_runs(
    tmp_path_factory: pytest.TempPathFactory, reference: Reference
) -> Iterator[dict[str, Future[tuple[Chain, Attempt, int]]]]:
    """The five outcome runs, started together. The SIGKILL test asks for them too, so they start during it and
    their waits (storage-down sleeps ~8 s in retries) overlap its crashes, which assert nothing about time."""
    with ThreadPoolExecutor(max_workers=len(OUTCOME_RUNS)) as pool:
        yield {name: pool.submit(_outcome_run, tmp_path_factory.mktemp(name), name) for name in OUTCOME_RUNS}


@pytest.mark.parametrize(
    "outcome",
    [
        "succeeded",
        "failed",
        "config_error",
        "preempted",
        "storage_unavailable",
    ],
)
def test_termination_message_is_json_for_every_outcome(
    outcome: str, outcome_runs: dict[str, Future[tuple[Chain, Attempt, int]]]
) -> None:
    """Real CLI and SDK: each outcome exits with its code and writes one JSON line naming it and the newest commit."""
    chain, attempt, rc = outcome_runs[outcome].result(timeout=PROCESS_TIMEOUT)
    code = OUTCOME_RUNS[outcome][0]
    ctx = outcome
    message = _termination_message(attempt.termlog, ctx)
    fields = ["outcome", "exit_code", "run_id", "attempt", "step", "checkpoint", "seconds", "gpu_seconds", "message"]
    assert list(message) == fields, ctx
    assert message["run_id"] == "chaos", f"{ctx}: {message}"
    assert "chaos-secret-key" not in attempt.termlog.read_text(), f"{ctx}: secret in the message"
    assert (rc, message["outcome"], message["exit_code"]) == (code, outcome, code), (
        f"{ctx}: exit {rc}, message {message}\n{attempt.tail()}"
    )
    progress = _progress(attempt.progress)
    newest = None if outcome in ("config_error", "storage_unavailable") else _committed(chain.uri)
    if not _unread(message):
        assert message["step"] == (newest.step if newest else None), f"{ctx}: {message}"
        assert message["checkpoint"] == (newest.url if newest else None), f"{ctx}: {message}"
    if outcome == "succeeded":
        assert message["step"] == STEPS and progress.last == STEPS, f"{ctx}: {message}"
    elif outcome == "failed":
        assert progress.last == 24 and message["step"] == 20, f"{ctx}: {message}, {progress}"
        assert "child exited 1" in str(message["message"]), f"{ctx}: {message}"
        assert "injected failure" in attempt.stderr.read_text(), ctx
    elif outcome == "config_error":
        assert progress.pid is None, f"{ctx}: the child ran"
        assert "PODTRAIN_GRACE_SECONDS" in str(message["message"]), f"{ctx}: {message}"
    elif outcome == "preempted":
        assert progress.last is not None and progress.last >= 30, f"{ctx}: {progress}"
        assert newest is not None and newest.step == progress.last, f"{ctx}: step {progress.last} was not saved"
    else:
        assert progress.start is None and not progress.steps, f"{ctx}: training started on a store that is down"

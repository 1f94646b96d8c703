"""Sharded and replicated checkpoints across world sizes: torchrun with gloo on CPU, FSDP2 and DDP, real SIGTERM.

The subject is ``sharded_worker.py``, which uses the public ``import sdk`` API only. A checkpoint saved by N ranks
resumes on M: the gathered full model and optimizer state right after the resume is bitwise the one saved, and
training goes on; DDP's replicated state is written once, not once per rank; the data position carries over, so
every sample of the interrupted epoch is trained on exactly once and the next epoch is the new world's own draw.
Resuming on the same number of ranks, bitwise equal to an uninterrupted run, is test_ranks.py's.

Launches are few (a 4-rank torchrun takes ~20 s to start on a loaded 2-core machine): one chain of three runs
(4 ranks, then 3, then 2) serves the state and the data tests of FSDP2.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DistributedSampler, TensorDataset

from sdk.checkpoints.checkpointer import Checkpointer
from sdk.outcomes import EXIT_PREEMPTED
from tests.integration.sharded_worker import BATCH_SIZE, CLASSES, DATASET_SIZE, FEATURES, SAMPLER_SEED
from tests.integration.test_ranks import _env as ranks_env

WORKER = str(Path(__file__).with_name("sharded_worker.py"))
LAUNCH_TIMEOUT = 240  # seconds for one torchrun, start to end, on a loaded 2-core machine
WATCHDOG = "200"  # a rank still alive after this long prints its stacks and exits (a hang fails, not stalls)

# The numbers divide evenly, so that no rank is ever short of a batch and nothing is padded or dropped: with
# DATASET_SIZE = 192 and BATCH_SIZE = 2 per rank an epoch is 24 steps on 4 ranks, 32 on 3 and 48 on 2 (192 is a
# multiple of 4*2, 3*2 and 2*2). 4 ranks stopped after step 12 leave 96 samples of epoch 0: 16 steps on 3 ranks.
# 3 ranks stopped 16 steps into epoch 2 (step 76) leave 96 samples: 24 steps on 2 ranks, then epoch 3 whole.
# Any stop of 4 ranks leaves a multiple of 8 samples of its epoch: whole steps on 2 ranks (the SIGTERM test).
STEPS_PER_EPOCH = {world: DATASET_SIZE // (world * BATCH_SIZE) for world in (4, 3, 2)}
CHAIN = ((4, 12), (3, 76), (2, 148))  # (ranks, the step that run stops at), run after run on one checkpoint URI
EVERY = 4  # steps between policy checkpoints: 12, 76 and 148 are policy saves


@dataclass(frozen=True)
class Launch:
    """One torchrun of the worker: its folder, its ranks, how it ended."""

    out: Path
    world: int
    attempt: int
    returncode: int
    output: str

    def why(self) -> str:
        """The lines of the output that say what went wrong (else its tail), for assertion messages: errors, and
        the stacks a rank printed when it crashed or hung (the worker's faulthandler and watchdog)."""
        lines = self.output.splitlines()
        picked = [
            line for line in lines if re.search(r"Error|error:|terminate called", line) and "error_file" not in line
        ][-25:]
        for at, line in enumerate(lines):
            if line.startswith(("Fatal Python error", "Timeout (")):
                picked += lines[at : at + 60]
                break
        return "\n".join(picked) or self.output[-3000:]

    def report(self, rank: int) -> dict[str, Any]:
        return dict(json.loads((self.out / f"rank-{rank}.json").read_text()))

    def reports(self) -> list[dict[str, Any]]:
        return [self.report(rank) for rank in range(self.world)]

    def state(self, name: str) -> dict[str, Any]:
        """A gathered full state rank 0 wrote: ``resumed`` or ``final-<step>``."""
        return dict(torch.load(self.out / f"{name}.pt", weights_only=True))


def _torchrun(world: int, out: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={world}",
        WORKER,
        "--out",
        str(out),
        "--watchdog",
        WATCHDOG,
        *args,
    ]


def _env(tmp: Path, attempt: int, uri: str) -> dict[str, str]:
    return ranks_env(tmp, attempt, uri, run_id="sharded")


def _launch(tmp: Path, uri: str, attempt: int, world: int, *args: str) -> Launch:
    out = tmp / f"attempt-{attempt}"
    proc = subprocess.run(
        _torchrun(world, out, *args),
        env=_env(tmp, attempt, uri),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=LAUNCH_TIMEOUT,
    )
    return Launch(out, world, attempt, proc.returncode, proc.stdout)


def _differences(got: Any, want: Any, path: str = "state") -> list[str]:
    """Where two gathered states differ (tensors bitwise, with their dtypes); [] when they are equal."""
    if isinstance(got, dict) and isinstance(want, dict):
        if got.keys() != want.keys():
            return [f"{path}: keys {sorted(map(str, got))} != {sorted(map(str, want))}"]
        return [d for key in want for d in _differences(got[key], want[key], f"{path}[{key!r}]")]
    if isinstance(got, list | tuple) and isinstance(want, list | tuple):
        if len(got) != len(want):
            return [f"{path}: {len(got)} items != {len(want)}"]
        return [d for i, (g, w) in enumerate(zip(got, want, strict=True)) for d in _differences(g, w, f"{path}[{i}]")]
    if isinstance(got, torch.Tensor) or isinstance(want, torch.Tensor):
        same = (
            isinstance(got, torch.Tensor)
            and isinstance(want, torch.Tensor)
            and got.dtype == want.dtype
            and torch.equal(got, want)
        )
        return [] if same else [path]
    return [] if got == want else [f"{path}: {got!r} != {want!r}"]


def _assert_moments_present(full: dict[str, Any]) -> None:
    """The comparison is not vacuous: every parameter has its Adam step and both moments in the state."""
    parameters = set(full["model"])
    assert parameters, "no parameters in the gathered state"
    assert set(full["optimizer"]["state"]) == parameters
    for name, moments in full["optimizer"]["state"].items():
        assert {"step", "exp_avg", "exp_avg_sq"} <= set(moments), name
        assert moments["exp_avg"].shape == full["model"][name].shape, name


def _samples(*launches: Launch) -> list[dict[str, Any]]:
    """Every sample record of the launches: one per rank and step, with the rank and attempt that wrote it."""
    records = []
    for launch in launches:
        for rank in range(launch.world):
            path = launch.out / f"samples-rank{rank}-attempt{launch.attempt}.jsonl"
            for line in path.read_text().splitlines():
                records.append({**json.loads(line), "rank": rank, "attempt": launch.attempt, "world": launch.world})
    return records


def _drawn(world: int, rank: int, epoch: int) -> list[int]:
    """What rank ``rank`` of an uninterrupted ``world``-rank run draws in ``epoch``: DistributedSampler itself."""
    indices = TensorDataset(torch.arange(DATASET_SIZE))
    sampler: DistributedSampler[int] = DistributedSampler(
        indices, num_replicas=world, rank=rank, shuffle=True, seed=SAMPLER_SEED
    )
    sampler.set_epoch(epoch)
    return list(sampler)


def _consumed(records: list[dict[str, Any]], epoch: int, rank: int | None = None) -> list[int]:
    """The indices trained on in ``epoch`` (by ``rank``, in step order), as the records say."""
    chosen = [r for r in records if r["epoch"] == epoch and (rank is None or r["rank"] == rank)]
    return [i for r in sorted(chosen, key=lambda r: (r["step"], r["rank"])) for i in r["indices"]]


def _assert_seen_exactly_once(records: list[dict[str, Any]], epoch: int) -> None:
    seen = Counter(_consumed(records, epoch))
    twice = sorted(i for i, n in seen.items() if n > 1)
    missing = sorted(set(range(DATASET_SIZE)) - set(seen))
    assert not twice and not missing, f"epoch {epoch}: seen more than once {twice}, never seen {missing}"
    assert sum(seen.values()) == DATASET_SIZE


# -- FSDP2: 4 ranks, then 3, then 2 ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fsdp_chain(tmp_path_factory: pytest.TempPathFactory) -> list[Launch]:
    """An FSDP2 run on 4 ranks to step 12 (mid-epoch 0), resumed on 3 ranks to step 76 (mid-epoch 2), resumed
    on 2 ranks to step 148 (the end of epoch 3), one checkpoint URI. Stops at the first launch that fails (the
    tests assert on the return codes)."""
    tmp = tmp_path_factory.mktemp("fsdp-chain")
    uri = (tmp / "ckpt").as_uri()
    launches: list[Launch] = []
    for attempt, (world, steps) in enumerate(CHAIN, start=1):
        args = ("--model", "fsdp", "--steps", str(steps), "--every", str(EVERY))
        launches.append(_launch(tmp, uri, attempt, world, *args))
        if launches[-1].returncode != 0:
            break
    return launches


@pytest.mark.timeout(900)
def test_fsdp_state_of_4_ranks_resumes_bitwise_on_3_then_2_ranks_and_training_goes_on(
    fsdp_chain: list[Launch],
) -> None:
    """Each resume on another number of ranks restores every parameter and every Adam moment exactly as saved
    (gathered full states compared bitwise), starts from the saved step, and the loss keeps falling."""
    for launch in fsdp_chain:
        assert launch.returncode == 0, f"{launch.world} ranks, attempt {launch.attempt}:\n{launch.why()}"
    assert len(fsdp_chain) == len(CHAIN)
    first = fsdp_chain[0]
    assert {(r["start"], r["last"], r["stopped"]) for r in first.reports()} == {(0, CHAIN[0][1], False)}
    for saved, resumed in itertools.pairwise(fsdp_chain):
        stop = CHAIN[saved.attempt - 1][1]
        end = CHAIN[resumed.attempt - 1][1]
        assert {(r["start"], r["last"]) for r in resumed.reports()} == {(stop, end)}, (saved.world, resumed.world)
        want = saved.state(f"final-{stop}")
        got = resumed.state("resumed")
        _assert_moments_present(want)
        assert _differences(got, want) == [], f"{saved.world} ranks -> {resumed.world} ranks at step {stop}"
        # Training goes on from there, not from scratch: the loss over the whole dataset (no batch's noise) in
        # the first steps after the resume is below the first run's first steps, and it keeps falling.
        losses = resumed.report(0)["dataset_losses"]
        assert len(losses) == end - stop
        assert mean(losses[:4]) < mean(first.report(0)["dataset_losses"][:4]), (resumed.world, losses[:4])
        assert mean(losses[-4:]) < mean(losses[:4]), (resumed.world, losses)


@pytest.mark.timeout(900)
def test_interrupted_epochs_are_seen_exactly_once_across_world_sizes_and_the_next_is_the_new_worlds_draw(
    fsdp_chain: list[Launch],
) -> None:
    """Epoch 0, begun by 4 ranks and finished by 3, and epoch 2, begun by 3 and finished by 2, each train on every
    sample exactly once; epoch 1 (3 ranks) and epoch 3 (2 ranks) are, rank by rank and in order, what an
    uninterrupted run of that many ranks draws from DistributedSampler."""
    for launch in fsdp_chain:
        assert launch.returncode == 0, f"{launch.world} ranks, attempt {launch.attempt}:\n{launch.why()}"
    assert len(fsdp_chain) == len(CHAIN)
    records = _samples(*fsdp_chain)
    assert len(records) == 4 * 12 + 3 * (76 - 12) + 2 * (148 - 76), "one record per rank and step"
    by_epoch = {
        e: {(r["attempt"], r["world"]) for r in records if r["epoch"] == e} for e in {r["epoch"] for r in records}
    }
    assert by_epoch == {0: {(1, 4), (2, 3)}, 1: {(2, 3)}, 2: {(2, 3), (3, 2)}, 3: {(3, 2)}}

    for epoch in (0, 2):  # the interrupted ones
        _assert_seen_exactly_once(records, epoch)
    before_stop = [r for r in records if r["attempt"] == 1]
    for rank in range(4):  # before the first stop: plain DistributedSampler on 4 ranks
        assert _consumed(before_stop, 0, rank) == _drawn(4, rank, 0)[: CHAIN[0][1] * BATCH_SIZE]
    for epoch, world in ((1, 3), (3, 2)):  # the next epoch after each resume: the new world's own draw
        assert len({r["step"] for r in records if r["epoch"] == epoch}) == STEPS_PER_EPOCH[world]
        for rank in range(world):
            assert _consumed(records, epoch, rank) == _drawn(world, rank, epoch), (epoch, world, rank)


# -- DDP: replicated state written once --------------------------------------------------------------------------
HIDDEN_DDP = 256  # ~75k parameters: model and Adam moments (~0.9 MB) dwarf what each rank keeps (~25 kB)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Launch, Path]:
    """A 2-rank DDP run (the wrapper is the checkpointed state) to step 8, policy saves at 4 and 8."""
    tmp = tmp_path_factory.mktemp("ddp")
    args = ("--model", "ddp", "--hidden", str(HIDDEN_DDP), "--steps", "8", "--every", "4")
    return _launch(tmp, (tmp / "ckpt").as_uri(), 1, 2, *args), tmp / "ckpt"


@pytest.mark.timeout(600)
def test_a_ddp_checkpoint_of_2_ranks_holds_the_replicated_model_and_optimizer_once(
    ddp_run: tuple[Launch, Path], tmp_path: Path
) -> None:
    """Bytes per checkpoint of 2 DDP ranks are at most 1.1x those of one process saving the same model and
    optimizer: the replicas are written once (what each rank must keep, RNG and data position, is small)."""
    launch, ckpt = ddp_run
    assert launch.returncode == 0, launch.why()
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(FEATURES, HIDDEN_DDP), nn.ReLU(), nn.Linear(HIDDEN_DDP, HIDDEN_DDP), nn.ReLU(),
        nn.Linear(HIDDEN_DDP, CLASSES),
    )  # fmt: skip
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    nn.functional.cross_entropy(model(torch.randn(4, FEATURES)), torch.arange(4)).backward()
    optimizer.step()  # Adam's moments exist, as in the run's checkpoints
    single = Checkpointer((tmp_path / "single").as_uri()).save(8, {"model": model, "optimizer": optimizer})
    one_process = single.manifest.total_bytes
    assert one_process > 3 * 4 * sum(p.numel() for p in model.parameters())  # weights and two moments, fp32

    committed = Checkpointer(ckpt.as_uri()).list()
    assert sorted(c.step for c in committed) == [4, 8]
    for info in committed:
        assert info.manifest.world_size == 2
        ratio = info.manifest.total_bytes / one_process
        assert ratio <= 1.1, f"step {info.step}: {info.manifest.total_bytes} bytes = {ratio:.2f}x one process's"


@pytest.mark.timeout(600)
def test_a_ddp_checkpoint_of_2_ranks_resumes_bitwise_on_3_ranks_holding_the_inner_module(
    ddp_run: tuple[Launch, Path], tmp_path: Path
) -> None:
    """Saved with the DDP wrapper as state by 2 ranks, resumed by 3 ranks whose state holds the module inside
    their wrapper: the gathered model and optimizer equal the saved ones bitwise, and the run goes on."""
    launch, ckpt = ddp_run
    assert launch.returncode == 0, launch.why()
    shutil.copytree(ckpt, tmp_path / "ckpt")  # the store as the 2 ranks left it; this test's own copy
    args = ("--model", "ddp-module", "--hidden", str(HIDDEN_DDP), "--steps", "12", "--every", "4")
    resumed = _launch(tmp_path, (tmp_path / "ckpt").as_uri(), 2, 3, *args)
    assert resumed.returncode == 0, resumed.why()
    assert {(r["start"], r["last"]) for r in resumed.reports()} == {(8, 12)}
    want = launch.state("final-8")
    _assert_moments_present(want)
    assert _differences(resumed.state("resumed"), want) == []


# -- a real SIGTERM to 4 FSDP2 ranks under podtrain run, the retry on 2 -----------------------------------------
@pytest.mark.timeout(600)
def test_sigterm_stops_4_fsdp_ranks_at_one_committed_step_and_2_ranks_resume_from_it(tmp_path: Path) -> None:
    """SIGTERM to `podtrain run` mid-training: the 4 ranks stop at one step, it is committed once, exit 75. The
    retry on 2 ranks restores that step's state bitwise, and finishes the interrupted epoch with every sample of
    it trained on exactly once over both attempts."""
    uri = (tmp_path / "ckpt").as_uri()
    out1 = tmp_path / "attempt-1"
    steps = "400"  # far more than the run gets to before the signal
    worker = _torchrun(4, out1, "--model", "fsdp", "--steps", steps, "--every", str(EVERY), "--sleep", "0.05")
    cmd = [sys.executable, "-m", "entrypoint", "run", "--", *worker]
    log = tmp_path / "attempt-1.log"  # a file, not a pipe nobody reads while the run goes on
    with log.open("w") as sink:
        proc = subprocess.Popen(
            cmd, env=_env(tmp_path, 1, uri), start_new_session=True, stdout=sink, stderr=subprocess.STDOUT
        )
    try:
        give_up = time.monotonic() + 180
        while not list((tmp_path / "ckpt").glob("step-*/MANIFEST.json")):
            if proc.poll() is not None:
                why = Launch(out1, 4, 1, proc.returncode, log.read_text(errors="replace")).why()
                pytest.fail(f"exited {proc.returncode} before any checkpoint:\n{why}")
            assert time.monotonic() < give_up, "no checkpoint within 180 s"
            time.sleep(0.1)
        time.sleep(0.4)  # a few steps past the first policy save
        os.kill(proc.pid, signal.SIGTERM)
        sent = time.monotonic()
        proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = log.read_text(errors="replace")
    first = Launch(out1, 4, 1, proc.returncode, output)
    assert proc.returncode == EXIT_PREEMPTED, first.why()
    assert time.monotonic() - sent < 30

    reports = first.reports()
    assert all(r["stopped"] for r in reports), reports
    (stop,) = {r["last"] for r in reports}  # every rank stopped at one step
    assert 0 < stop < int(steps)
    committed = Checkpointer(uri).list()
    assert [c.step for c in committed].count(stop) == 1
    assert committed[0].step == stop, "the step the ranks stopped at is the newest committed one"
    assert committed[0].manifest.world_size == 4
    assert len(list((tmp_path / "ckpt" / f"step-{stop:010d}").glob("MANIFEST.json"))) == 1
    message = json.loads((tmp_path / "termination-1").read_text())
    assert message["outcome"] == "preempted" and message["step"] == stop

    # The retry on 2 ranks runs to the end of the interrupted epoch: the samples 4 ranks left, 2*BATCH_SIZE a step.
    epoch = stop // STEPS_PER_EPOCH[4]
    left = DATASET_SIZE - (stop % STEPS_PER_EPOCH[4]) * 4 * BATCH_SIZE
    end = stop + left // (2 * BATCH_SIZE)
    retry = _launch(tmp_path, uri, 2, 2, "--model", "fsdp", "--steps", str(end), "--every", str(EVERY))
    assert retry.returncode == 0, retry.why()
    assert {(r["start"], r["last"]) for r in retry.reports()} == {(stop, end)}
    want = first.state(f"final-{stop}")
    _assert_moments_present(want)
    assert _differences(retry.state("resumed"), want) == []

    records = _samples(first, retry)
    assert {r["epoch"] for r in records if r["attempt"] == 2} == {epoch}
    _assert_seen_exactly_once(records, epoch)

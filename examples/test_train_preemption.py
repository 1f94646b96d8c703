"""Tests of train.py's loop with ``sdk.testing``: what a preemption at step 5 does to it, without a pod or a signal.

The pattern to copy for your own ``train.py``: keep the loop in a function that takes the run (``train(run,
args, where)`` here), open the run with ``sdk.testing.init(tmp_path, preempt_at=N)`` instead of ``sdk.init()``,
and check what the next attempt would find. Run it with::

    pytest examples/test_train_preemption.py

Every location is under pytest's ``tmp_path``; ``PODTRAIN_*`` variables set in the shell are not read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dataset  # examples/dataset.py: pytest puts this test's folder on sys.path
import pytest
import torch
import train  # examples/train.py, the script under test
from safetensors.torch import load_file

from sdk import testing

STEPS = 12
CPU = train.Where(torch.device("cpu"), rank=0, local_rank=0, world=1)  # one process, no torchrun


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A small generated dataset (32 KiB, about 120 batches of 8 an epoch) in a local folder."""
    folder = tmp_path / "corpus"
    dataset.write_dataset(str(folder), shards=2, mib=1 / 32)
    return folder


def run_train(root: Path, corpus: Path, capsys: pytest.CaptureFixture[str], **options: Any) -> dict[str, Any]:
    """train.py's loop in a testing run on ``root``; returns its last line, the summary (train.done/train.stopped)."""
    # --dropout: it draws from the RNG every step, so an exact resume needs the RNG states back too
    flags = ["--steps", str(STEPS), "--batch-size", "8", "--log-every", "4", "--dropout", "0.1"]
    args = train.parse_args(["--data", str(corpus), *flags])
    with testing.init(root, checkpoint_every_steps=4, **options) as run:
        train.train(run, args, CPU)
    return dict(json.loads(capsys.readouterr().out.splitlines()[-1]))


def test_a_preemption_at_step_5_commits_step_5_and_exits_75(
    tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        run_train(tmp_path, corpus, capsys, preempt_at=5)
    assert stopped.value.code == testing.EXIT_PREEMPTED
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert (summary["event"], summary["end_step"]) == ("train.stopped", 5)
    assert not (tmp_path / "output" / "export").exists()  # a stopped run exports nothing


def test_the_next_attempt_resumes_at_step_5_and_ends_with_the_uninterrupted_weights(
    tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    straight = run_train(tmp_path / "straight", corpus, capsys)
    with pytest.raises(SystemExit):
        run_train(tmp_path / "cut", corpus, capsys, preempt_at=5)
    resumed = run_train(tmp_path / "cut", corpus, capsys)

    assert (straight["event"], straight["start_step"]) == ("train.done", 0)
    assert (resumed["event"], resumed["start_step"], resumed["end_step"]) == ("train.done", 5, STEPS)
    expected = load_file(straight["export"])
    weights = load_file(resumed["export"])
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[name], expected[name]) for name in expected)

"""sdk.init(): config, resume, checkpoint policy; and the light import of sdk."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sdk
from sdk.config import Config


def test_import_sdk_and_the_cli_do_not_import_torch() -> None:
    """`import sdk`, config, storage, log, checkpoint listing and the CLI load without torch."""
    code = (
        "import sys, sdk, sdk.config, sdk.storage, sdk.log, sdk.errors, sdk.manifest, sdk.checkpoint, entrypoint.cli; "
        "sdk.Config; sdk.open_store; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_unknown_public_name_is_an_attribute_error() -> None:
    """The lazy namespace raises AttributeError for names it does not export."""
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = sdk.nope  # type: ignore[attr-defined]


def test_fresh_run_resumes_at_zero_then_continues_from_its_checkpoint(tmp_path: Path) -> None:
    """With no checkpoint, resume() is 0; after a checkpoint at step 4, a new run resumes at 4."""
    model = torch.nn.Linear(2, 2)
    config = Config(run_id="r", checkpoint_uri=str(tmp_path), attempt=1)
    with sdk.init(config) as run:
        assert run.resume({"model": model}) == 0
        assert run.checkpoint(4, {"model": model}) is not None
    with sdk.init(Config(run_id="r", checkpoint_uri=str(tmp_path), attempt=2)) as run:
        assert run.resume({"model": torch.nn.Linear(2, 2)}) == 4
        assert run.checkpointer.resumed_from == 4


def test_checkpoint_policy_saves_every_n_steps_unless_forced(tmp_path: Path) -> None:
    """checkpoint_every_steps=5 saves at 5 and 10 only; force=True saves anyway."""
    model = torch.nn.Linear(2, 2)
    with sdk.init(run_id="r", checkpoint_uri=str(tmp_path), attempt=1, checkpoint_every_steps=5, keep_last=10) as run:
        saved = [s for s in range(1, 11) if run.checkpoint(s, {"model": model})]
        assert saved == [5, 10]
        assert run.checkpoint(11, {"model": model}, force=True) is not None
        assert [c.step for c in run.checkpointer.list()] == [11, 10, 5]


def test_init_reads_podtrain_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PODTRAIN_CHECKPOINT_URI and PODTRAIN_ATTEMPT reach the run's checkpointer."""
    monkeypatch.setenv("PODTRAIN_CHECKPOINT_URI", f"file://{tmp_path}/c")
    monkeypatch.setenv("PODTRAIN_ATTEMPT", "3")
    monkeypatch.setenv("PODTRAIN_RUN_ID", "env-run")
    with sdk.init() as run:
        assert run.checkpointer.url == f"file://{tmp_path}/c"
        assert run.checkpointer.attempt == 3
        assert run.config.run_id == "env-run"

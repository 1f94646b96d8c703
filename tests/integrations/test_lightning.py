"""podtrain_pl.fit in one process: exact resume at every kind of stop, damage, cadence, export, signals, refusals.

Each run is the real Lightning Trainer (a small MLP with dropout, AdamW, a cosine schedule stepped every step, 96
samples shuffled by the global RNG in batches of 4: 24 steps an epoch) on the real Checkpointer with a local store,
opened with ``sdk.testing.init``: a stop is requested at a chosen step (``preempt_at``), the block ends with
``SystemExit(75)`` as after a SIGTERM, and a new Trainer resumes from the store. The reference is the same Trainer
run by Lightning alone, uninterrupted. The real signal, ``podtrain run`` and two ranks are in
test_lightning_processes.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lightning")

import torch
import yaml
from lightning.pytorch.callbacks import Callback, OnExceptionCheckpoint
from safetensors.torch import load_file

from sdk import testing
from sdk.integrations import lightning as podtrain_pl
from tests.integrations import pl_worker

REPO = Path(__file__).resolve().parents[2]
STEPS = 60


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


VARIANTS: dict[str, dict[str, Any]] = {
    "steps": {},  # max_steps=60: 24 steps an epoch, shuffled
    "epochs": {"max_steps": -1, "max_epochs": 3},  # 72 steps, epoch-based
    "accumulate": {"accumulate_grad_batches": 2, "steps": 30},  # 12 optimizer steps an epoch
    # validation every 10 batches and at each epoch's end, 2 batches of a DataLoader with a generator of its own
    "validate": {"validate": True, "val_check_interval": 10, "limit_val_batches": 2},
}
_references: dict[str, dict[str, torch.Tensor]] = {}


def plain(tmp: Path, variant: str) -> dict[str, torch.Tensor]:
    """The uninterrupted reference: the same Trainer, Lightning alone (computed once per variant)."""
    if variant not in _references:
        trainer, model, data = pl_worker.build(tmp / f"plain-{variant}", **VARIANTS[variant])
        trainer.fit(model, datamodule=data)
        _references[variant] = weights(model)
    return _references[variant]


@pytest.fixture
def reference(tmp_path: Path) -> dict[str, torch.Tensor]:
    return plain(tmp_path, "steps")


def attempt(
    root: Path,
    *,
    stop_at: int | None = None,
    sync: bool = False,
    callbacks: tuple[Callback, ...] = (),
    variant: str = "steps",
    **fit: Any,
) -> tuple[int | None, torch.nn.Module, Any, podtrain_pl.Fitted | None]:
    """One attempt through podtrain_pl.fit, stopped as by a SIGTERM during step ``stop_at`` (sdk.testing learns the
    step from the run.should_checkpoint() the integration asks every step): (exit code or None, model, run, Fitted).

    ``sync``: saves in the loop. Asynchronous saves (the default) are *deferred* when the previous one is still being
    written — by design, the loop never waits on storage — so which cadence steps get committed depends on timing;
    the tests of the cadence itself save synchronously."""
    trainer, model, data = pl_worker.build(root / "user", callbacks=callbacks, **VARIANTS[variant])
    code, fitted = None, None
    mode = "sync" if sync else "async"
    try:
        with testing.init(root, keep_last=100, preempt_at=stop_at, checkpoint_mode=mode) as run:
            fitted = podtrain_pl.fit(run, trainer, model, datamodule=data, **fit)
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, model, run, fitted


def assert_equal(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert got.keys() == ref.keys()
    diverged = [k for k in ref if not torch.equal(got[k], ref[k])]
    assert not diverged, f"{len(diverged)} tensors differ from the uninterrupted run, e.g. {diverged[0]}"


def test_fit_is_lightning_alone_plus_commits_at_the_modelcheckpoint_cadence_and_an_export(
    tmp_path: Path, reference: dict[str, torch.Tensor]
) -> None:
    """Uninterrupted under podtrain: the same weights as Lightning alone (podtrain's data wrapper draws the same
    order), a commit at every ModelCheckpoint(every_n_train_steps=5) step, and an export with the hparams."""
    code, model, run, fitted = attempt(tmp_path, sync=True)
    assert code is None and fitted == podtrain_pl.Fitted(start=0, step=STEPS, stopped=False)
    assert testing.committed_steps(run) == list(range(5, STEPS + 1, 5))
    assert_equal(weights(model), reference)
    export = tmp_path / "output" / "export"
    assert_equal(load_file(export / "model.safetensors"), reference)
    sidecar = json.loads((export / "model.json").read_text())
    assert sidecar["step"] == STEPS and sidecar["hparams"] == {"width": 16, "lr": 0.05, "steps": STEPS}
    assert yaml.safe_load((export / "hparams.yaml").read_text()) == sidecar["hparams"]
    assert [r["step"] for r in testing.metrics(run)] == list(range(5, STEPS + 1, 5))  # log_every_n_steps=5


@pytest.mark.parametrize(
    ("variant", "stop", "final"),
    [
        pytest.param("steps", 13, 60, id="mid-first-epoch"),
        pytest.param("steps", 24, 60, id="last-batch-of-an-epoch"),
        pytest.param("steps", 37, 60, id="mid-second-epoch-between-saves"),
        pytest.param("epochs", 30, 72, id="max-epochs"),
        pytest.param("accumulate", 17, 30, id="gradient-accumulation"),
        pytest.param("validate", 20, 60, id="validation-step"),
        pytest.param("validate", 24, 60, id="validation-at-epoch-end"),
    ],
)
def test_a_stop_commits_its_step_and_the_resume_ends_bitwise_equal(
    tmp_path: Path, variant: str, stop: int, final: int
) -> None:
    """A stop during step ``stop``: that step committed (marked the emergency's), exit 75; a new Trainer resumes
    there — model, AdamW, schedule, loop progress, the DataLoader's position in the shuffled epoch, RNG — and ends
    torch.equal to the uninterrupted run."""
    code, _, run, fitted = attempt(tmp_path, stop_at=stop, variant=variant)
    assert code == testing.EXIT_PREEMPTED and fitted == podtrain_pl.Fitted(start=0, step=stop, stopped=True)
    newest = run.checkpointer.list()[0]
    assert newest.step == stop and newest.manifest.meta.get("emergency") is True

    code, model, run, fitted = attempt(tmp_path, variant=variant)
    assert code is None and fitted == podtrain_pl.Fitted(start=stop, step=final, stopped=False)
    assert_equal(weights(model), plain(tmp_path, variant))


def test_a_damaged_newest_checkpoint_is_skipped_for_the_previous_one_and_lightnings_files_never_decide(
    tmp_path: Path, reference: dict[str, torch.Tensor]
) -> None:
    """Commits at 5, 10, 15 and the stop's 17; step 17's model file damaged on the store, and Lightning's own
    ``last.ckpt`` made garbage: the resume skips 17 (CRC32C), loads 15, never reads a .ckpt, ends bitwise equal."""
    code, _, run, _ = attempt(tmp_path, stop_at=17, sync=True)
    assert code == testing.EXIT_PREEMPTED and testing.committed_steps(run) == [5, 10, 15, 17]
    (model_file,) = (tmp_path / "checkpoints" / "step-0000000017").glob("*/model.safetensors")
    data = bytearray(model_file.read_bytes())
    data[-1] ^= 0xFF
    model_file.write_bytes(bytes(data))
    lightning_last = tmp_path / "user" / "lightning" / "last.ckpt"
    assert lightning_last.exists()
    lightning_last.write_bytes(b"not a checkpoint")

    with testing.capture_logs() as logs:
        code, model, run, fitted = attempt(tmp_path)
    assert code is None and fitted == podtrain_pl.Fitted(start=15, step=STEPS, stopped=False)
    skipped = [e for e in logs if e["event"] == "checkpoint.skipped"]
    assert skipped and "step-0000000017" in json.dumps(skipped[0], default=str)
    assert_equal(weights(model), reference)


class _Handlers(Callback):
    """Records the SIGTERM handler in force while the fit runs."""

    def __init__(self) -> None:
        self.seen: list[Any] = []

    def on_train_batch_end(self, *args: Any) -> None:
        self.seen.append(signal.getsignal(signal.SIGTERM))


def test_lightnings_sigterm_handler_is_never_installed(tmp_path: Path) -> None:
    """Lightning's handler broadcasts from inside the signal handler (a DDP deadlock, lightning#20806) and raises
    SIGTERMException mid-loop: during podtrain_pl.fit the handler in force stays the one before the fit."""
    before = signal.getsignal(signal.SIGTERM)
    probe = _Handlers()
    code, *_ = attempt(tmp_path, callbacks=(probe,))
    assert code is None and probe.seen
    assert all(handler is before for handler in probe.seen), {type(h).__name__ for h in probe.seen}
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize(
    "case",
    [
        ({"ckpt_path": "last"}, (), 1, "drop ckpt_path"),
        ({}, (OnExceptionCheckpoint(dirpath="."),), 1, "remove OnExceptionCheckpoint"),
        ({}, (), 2, "but WORLD_SIZE=1: start every rank with torchrun under podtrain run"),
    ],
    ids=["ckpt_path", "on-exception-checkpoint", "lightning-launcher"],
)
def test_what_would_bypass_podtrain_is_refused_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: tuple[dict[str, Any], tuple[Callback, ...], int, str]
) -> None:
    """Refused before anything trains: exit 2 (never retried) and one line naming what to change."""
    fit, callbacks, devices, expected = case
    trainer, model, data = pl_worker.build(tmp_path / "user", callbacks=callbacks, devices=devices)
    with pytest.raises(SystemExit) as stopped, testing.init(tmp_path) as run:
        podtrain_pl.fit(run, trainer, model, datamodule=data, **fit)
    assert stopped.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("podtrain: ") and expected in line, line
    assert trainer.global_step == 0 and testing.committed_steps(run) == []


def test_import_sdk_never_imports_lightning() -> None:
    code = "import sys, sdk, sdk.integrations, sdk.run; sys.exit('lightning' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=120).returncode == 0


def test_a_checkpoint_that_does_not_fit_the_trainer_stops_the_resume_with_what_to_change(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Attempt 2's configure_optimizers() drops the LR schedule: the checkpoint verifies but does not fit, so the
    resume stops (exit 2, never retried, nothing trained) rather than continue a different run."""
    code, *_ = attempt(tmp_path, stop_at=7)
    assert code == testing.EXIT_PREEMPTED
    trainer, model, data = pl_worker.build(tmp_path / "user")
    model.configure_optimizers = lambda: torch.optim.AdamW(model.parameters(), lr=0.05)  # type: ignore[method-assign]
    with pytest.raises(SystemExit) as stopped, testing.init(tmp_path) as run:
        podtrain_pl.fit(run, trainer, model, datamodule=data)
    assert stopped.value.code == 2 and trainer.global_step == 0
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("podtrain: ") and "1 LR scheduler states and configure_optimizers() returned 0" in line
    assert "resume with the optimizers and schedulers the run was started with" in line, line

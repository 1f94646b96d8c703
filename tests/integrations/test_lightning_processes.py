"""podtrain_pl.fit as a pod runs it: `podtrain run`, a real SIGTERM, fresh processes, and two ranks under torchrun.

Every attempt is a new process tree started the way the pod starts it (``python -m entrypoint run -- …``) on a
file:// store, in its own session so the signal never reaches pytest. The worker (pl_worker.py) is a user's
script: their Trainer, ``podtrain_pl.fit(run, trainer, model, datamodule=dm)`` inside ``sdk.init()``, one sleep per
batch so that the signal lands mid-run. The references are the same Trainer run by Lightning alone (``--plain``).

Two ranks are started by torchrun, under ``podtrain run``, with the Trainer's DDP strategy (gloo on CPU): that is
the way a user runs Lightning in a pod, since podtrain's ``sdk.init()`` needs every rank's ``RANK``/``WORLD_SIZE``
before the Trainer exists, and Lightning's own launcher would start the other ranks only inside ``fit()``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("lightning")

from tests.integrations._processes import ProcessContract, Worker


class TestLightningProcesses(ProcessContract):
    """The contract (``_processes.ProcessContract``) for ``podtrain_pl.fit``: the DDP model and AdamW saved sharded,
    once; the Trainer's loops and RNG per rank; one process is refused a 2-rank checkpoint because each rank's
    DataLoader position is its share of the data; Lightning's own SIGTERM handler never runs; the example's export
    carries the model's hyperparameters."""

    worker = Worker("pl_worker.py", run_id="pl", framework="Lightning")
    rank_files = ("trainer", "rng")
    sharded = frozenset({"model", "optimizer"})
    example = "train_lightning.py"

    def check_stderr(self, stderr: str) -> None:
        assert "SIGTERMException" not in stderr and "Received SIGTERM" not in stderr  # Lightning's handler never ran

    def check_export(self, export: Path) -> None:
        sidecar = json.loads((export / "model.json").read_text())
        assert sidecar["step"] == 6 and sidecar["hparams"]["context"] == 32
        assert (export / "model.safetensors").stat().st_size > 0

    @pytest.mark.slow  # ~60 s on 2 loaded cores: four runs of two ranks and one of one
    def test_two_ranks_stop_at_one_step_commit_it_once_and_resume_exactly(self, tmp_path: Path) -> None:
        super().test_two_ranks_stop_at_one_step_commit_it_once_and_resume_exactly(tmp_path)

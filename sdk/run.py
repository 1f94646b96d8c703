"""``sdk.init()``: the one context ``train.py`` opens; it ties config, logs, checkpoints and preemption together.

Off the cluster it needs nothing: with no ``PODTRAIN_*`` variables set, checkpoints go to ``./.podtrain``.

Leaving the block normally commits the newest step given to :meth:`Run.checkpoint` when no checkpoint of it was
committed yet (:meth:`Run.finish`): a policy save deferred behind a slow one, or a step the policy did not ask for,
is never lost at the end of the loop. Leaving it with an exception saves nothing more.

On a stop signal (SIGTERM from the kubelet; ``PODTRAIN_STOP_SIGNALS``) :meth:`Run.should_stop` turns true.
When the block then ends, the run commits the newest step it was given to :meth:`Run.checkpoint` if that can
finish before the deadline (estimated from the measured duration of earlier saves; a half-written checkpoint
is never loaded, so trying costs nothing but time), says why when it cannot, and exits with 75 so the
orchestrator retries from the checkpoint that stands.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any

from sdk import log as _log
from sdk.checkpoints.checkpointer import Checkpointer, CheckpointInfo
from sdk.checkpoints.saver import AsyncSaver
from sdk.config import Config
from sdk.data import outputs
from sdk.data.pull import PullResult
from sdk.data.push import PushResult
from sdk.errors import ConfigError, PodtrainError, exit_code
from sdk.lifecycle import peers
from sdk.lifecycle.agreement import Agreement
from sdk.lifecycle.childreport import Report
from sdk.lifecycle.peers import PeerWatch
from sdk.lifecycle.preemption import Preemption
from sdk.outcomes import EXIT_FAILED, EXIT_PREEMPTED
from sdk.redaction import redact
from sdk.stores.store import RetryPolicy

__all__ = ["Run", "init"]

SAVE_ESTIMATE_FACTOR = 1.5  # an emergency save is tried when 1.5x the typical recent save still fits
TEARDOWN_RESERVE = 5.0  # seconds: with less left before the deadline, a preempted run exits without teardown
CLOSE_TIMEOUT = 600.0  # seconds the end of the block waits for a save in flight after an error in the block
_DEFAULT_RUN_ID = next(f.default for f in dataclasses.fields(Config) if f.name == "run_id")  # "local"


class Run:
    """A training run's handle: resume, checkpoint by policy, and notice preemption.

    **The last step is saved.** Call :meth:`checkpoint` after every step (after the optimizer's update): the
    policy decides which calls save, and every call records ``(step, state)``. When the ``with sdk.init()``
    block ends normally, :meth:`finish` commits that newest recorded step unless this run already committed it,
    whether it was a due save deferred behind a save still in flight, a step the policy did not ask for (a
    policy of every 5 steps and a loop of 12 ends with step 12 committed, saved with ``meta["final"] = True``),
    or a save that failed transiently. The state is saved as it is when the block ends, under the step last
    given to :meth:`checkpoint`. A block left by an exception saves nothing more (the state may be half-updated:
    the checkpoints already committed stand); a stop request ends through :meth:`finish_preempted` instead.
    """

    def __init__(
        self,
        config: Config,
        checkpointer: Checkpointer,
        preemption: Preemption | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.checkpointer = checkpointer
        self.preemption = preemption or Preemption(config.grace_seconds, signals=config.stop_signals)
        self.log = _log.get_logger("podtrain.run")
        self.saver: AsyncSaver | None = None
        if config.checkpoint_mode != "sync":
            self.saver = AsyncSaver(checkpointer, overlap=config.checkpoint_mode == "overlap", clock=clock)
        self._clock = clock
        self._last_checkpoint: CheckpointInfo | None = None
        self._last_save_at = clock()
        self._save_seconds: deque[float] = deque(maxlen=5)  # the latest synchronous saves
        self._latest: tuple[int, Mapping[str, Any]] | None = None
        self._latest_meta: Mapping[str, Any] | None = None  # the meta given with the newest step
        self._owed = False  # a policy save was due while another was in flight: the next call saves
        self.deferred_saves = 0
        self.agreement = Agreement(config.world_size) if config.world_size > 1 else None
        if self.agreement is not None:  # the ranks' one writer folder: agreed with their first collective
            checkpointer.shared_writer = self.agreement.writer_id
            checkpointer.collective = self.agreement  # sharded saves and loads agree on the same group
        self._metrics: dict[str, Any] | None = None  # the last record log_metrics() wrote
        self.report = Report(config.report_file, clock=clock, steps=config.local_rank == 0)  # this pod's steps
        self.peers: PeerWatch | None = None  # the other ranks' beats, in a job of several (sdk.lifecycle.peers)

    @property
    def last_checkpoint(self) -> CheckpointInfo | None:
        """The newest checkpoint this run committed (an async save counts once its commit is done)."""
        committed = [c for c in (self._last_checkpoint, self.saver and self.saver.last_committed) if c]
        return max(committed, key=lambda c: c.step, default=None)

    def resume(self, state: Mapping[str, Any]) -> int:
        """Load the newest valid checkpoint into ``state``; return its step (0 when there is none)."""
        step = self.checkpointer.load(state)
        if self.config.rank == 0:  # this attempt now owns the run after `step`; older ones are fenced
            self.checkpointer.claim(step or 0)
        self.report.update(resumed_from=step or 0, resumed_from_url=self.checkpointer.resumed_url, last_step=step or 0)
        if step is None:
            self.log.info("run.fresh_start", checkpoint_uri=self.checkpointer.url)
            return 0
        if self.config.rank == 0:
            self._say_resumed(step)
        return step

    def _say_resumed(self, step: int) -> None:
        """One line: which run resumes, from where; a run id left at its default gets how to start anew instead."""
        text = f"resuming run '{self.config.run_id}' from step {step} at {self.checkpointer.resumed_url}"
        if self.config.run_id == _DEFAULT_RUN_ID:  # likely a second `python train.py`, not a retry
            self.log.warning("run.resumed", message=f"{text}; set PODTRAIN_RUN_ID for a new run")
        else:
            self.log.info("run.resumed", message=text)

    def pull_data(self, *uris: str, dest: str | None = None, **options: Any) -> PullResult:
        """Fetch the dataset (``uris``, default ``PODTRAIN_DATA_URI``) into ``dest`` (default ``PODTRAIN_DATA_DIR``).

        Under ``podtrain run`` the supervisor has already pulled it, so this finds everything in place and fetches
        nothing; run directly, it does the pull. Options are :func:`sdk.data.pull.pull`'s (``include``, ``workers``…).
        With several ranks each rank pulls into its own ``dest`` unless they share one (then pull on one rank).
        """
        from sdk.data.pull import pull
        from sdk.errors import ConfigError

        sources = list(uris) or self.config.data_uris
        if not sources:
            raise ConfigError("nothing to pull: pass a URI, or set PODTRAIN_DATA_URI")
        include, exclude = self.config.data_globs
        options.setdefault("include", include)
        options.setdefault("exclude", exclude)
        options.setdefault("retry", self._retry())
        options.setdefault("require_checksums", self.config.require_checksums)
        result = pull(sources, dest or self.config.data_dir, **options)
        self.report.update(data_bytes=result.bytes_fetched, data_files=result.fetched, data_seconds=result.seconds)
        return result

    def push_artifacts(self, path: str | None = None, *, name: str | None = None, **options: Any) -> PushResult:
        """Upload ``path`` (default ``PODTRAIN_OUTPUT_DIR``) to ``PODTRAIN_ARTIFACT_URI/<run_id>[/name]``.

        Verified and incremental (:mod:`sdk.data.push`): calling it again sends only new or changed files. Under
        ``podtrain run`` the output folder is also pushed when the child ends, whatever the outcome.
        """
        from sdk.data.push import default_url, push

        url = default_url(self.config.artifact_uri, self.config.run_id)
        options.setdefault("retry", self._retry())
        return push(path or self.config.output_dir, f"{url}/{name}" if name else url, **options)

    def _retry(self) -> RetryPolicy:
        """The store retry policy of this run's pulls and pushes: the throttling budget from its config."""
        return RetryPolicy(throttle_seconds=self.config.throttle_seconds)

    def log_metrics(self, step: int, **values: Any) -> None:
        """Append ``{"step": step, "time": ..., **values}`` as a JSON line to ``PODTRAIN_OUTPUT_DIR/metrics.jsonl``
        (``metrics-rank<r>.jsonl`` on ranks other than 0); pushed with the outputs. Tensors become numbers."""
        self._metrics = outputs.append_metrics(self.config.output_dir, step, values, rank=self.config.rank)
        self.report.step(step)

    def export(self, model: Any, *, step: int, name: str = "model", **meta: Any) -> PushResult:
        """Write the final weights as ``export/<name>.safetensors`` with a JSON sidecar (step, run_id, attempt,
        the last metrics, ``meta``) in ``PODTRAIN_OUTPUT_DIR``, push both, and verify them in the store."""
        from sdk.data.push import default_url, push

        sidecar = {"run_id": self.config.run_id, "attempt": self.checkpointer.attempt, "step": step}
        folder = outputs.write_export(
            self.config.output_dir, model, name=name, sidecar={**sidecar, "metrics": self._metrics, **meta}
        )
        return push(folder, f"{default_url(self.config.artifact_uri, self.config.run_id)}/export")

    def _peers_gone(self, why: str, failed: bool) -> None:
        """From the peer watch's thread: ranks went silent (or one failed). This rank is most likely stuck in a
        collective it cannot leave, and nothing can be committed without them: tell the supervisor, exit now — 75
        (the retry resumes from the last commit), or 1 when a rank failed (its error is the job's)."""
        self.log.error("run.peer_failed" if failed else "run.peers_silent", reason=why)
        if not failed:
            self.report.stopped(why)  # podtrain run exits 75 whatever code torchrun makes of this one
        print(f"podtrain: rank {self.config.rank}: {why}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(EXIT_FAILED if failed else EXIT_PREEMPTED)

    def should_stop(self) -> bool:
        """True once a stop signal arrived: break out of the loop; the block's end saves what fits, exits 75.

        Call it once per step. With several ranks it is agreed (:mod:`sdk.lifecycle.agreement`): every rank gets True at
        the same step, at the first agreement after a rank saw the signal (agreements are at most ~1 s apart).
        """
        if self.agreement is not None:
            return self.agreement.poll(self.preemption.requested, self._due_by_time())
        return self.preemption.requested

    def stopping(self) -> bool:
        """At the end of the block: whether to finish as preempted (agreed once more with several ranks)."""
        if self.agreement is not None:
            return self.agreement.settle(self.preemption.requested)
        return self.preemption.requested

    def should_checkpoint(self, step: int) -> bool:
        """Whether the policy asks for a checkpoint at ``step``.

        ``PODTRAIN_CHECKPOINT_EVERY_STEPS`` and/or ``PODTRAIN_CHECKPOINT_EVERY_SECONDS`` (either one due is
        enough); with neither set, every call saves.
        """
        every_steps, every_seconds = self.config.checkpoint_every_steps, self.config.checkpoint_every_seconds
        if every_steps is None and every_seconds is None:
            return True
        due_by_steps = every_steps is not None and step % every_steps == 0
        if self.agreement is not None:  # with several ranks the clock's verdict is agreed in should_stop()
            return due_by_steps or self.agreement.save_due
        return due_by_steps or self._due_by_time()

    def _due_by_time(self) -> bool:
        every_seconds = self.config.checkpoint_every_seconds
        return every_seconds is not None and self._clock() - self._last_save_at >= every_seconds

    def checkpoint(
        self,
        step: int,
        state: Mapping[str, Any],
        *,
        force: bool = False,
        meta: Mapping[str, Any] | None = None,
    ) -> Future[CheckpointInfo] | None:
        """Checkpoint ``state`` as it is after ``step`` steps when the policy says so (or ``force``).

        Asynchronous by default (``PODTRAIN_CHECKPOINT_MODE``): the state is copied into reused CPU buffers and
        the call returns; the write and commit finish in the background. Returns a future of the committed
        checkpoint, or None when nothing was started. A policy save that falls due while the previous save is
        still in flight is *deferred*, not queued and not waited for: the next call saves, due or not (the
        training loop never waits on storage for a policy save; a newer step is saved instead of an older one);
        when the loop ends before a next call, the end of the block saves it (see :meth:`finish`).
        ``force=True`` waits for the save in flight and saves this step. A background failure that must be
        raised (see :mod:`sdk.checkpoints.saver`) is raised here.

        Every call also records ``(step, state)`` (and ``meta``) as what the end of the block — an emergency save
        on preemption, or :meth:`finish` — commits when it is not committed yet.
        """
        if self.saver:
            self.saver.check()
        self._latest = (step, state)
        self._latest_meta = meta
        self.report.step(step)
        due = force or self._owed or self.should_checkpoint(step)
        busy = bool(self.saver and self.saver.busy)
        if self.agreement is not None and due:
            # Ranks save the same steps: due is the same on every rank (steps, or the agreed time flag); a save
            # is deferred when any rank is still writing the previous one. Only due steps cost a collective.
            (busy,) = self.agreement.any(busy)
        if not due:
            return None
        if self.agreement is not None:
            self.agreement.save_due = False
        if self.config.rank == 0 and self.checkpointer.claimed is None:
            self.checkpointer.claim()
        if self.saver is None:
            return self._save_now(step, state, meta)
        if busy and not force:
            self._owed = True
            self.deferred_saves += 1
            self.log.debug("checkpoint.deferred", step=step, in_flight=self.saver.inflight_step)
            return None
        self._owed = False
        self._last_save_at = self._clock()
        future = self.saver.submit(step, state, meta=meta)
        stall = self.saver.last_stall or 0.0
        self.log.info("checkpoint.started", step=step, stall_seconds=round(stall, 4), mode=self.config.checkpoint_mode)
        return future

    def wait(self, timeout: float | None = None) -> CheckpointInfo | None:
        """Wait for the save in flight; raise its failure; return the newest committed checkpoint."""
        if self.saver:
            self.saver.wait(timeout)
        return self.last_checkpoint

    def _save_now(self, step: int, state: Mapping[str, Any], meta: Mapping[str, Any] | None) -> Future[CheckpointInfo]:
        started = self._clock()
        self._last_checkpoint = self.checkpointer.save(step, state, meta=meta)
        self._save_seconds.append(self._clock() - started)
        self._last_save_at = self._clock()
        done: Future[CheckpointInfo] = Future()
        done.set_result(self._last_checkpoint)
        return done

    def _save_estimate(self) -> float | None:
        """1.5x the median of the latest saves (the first save, which opens connections and allocates buffers,
        is usually the slowest and should not veto an emergency save for the rest of the run)."""
        measured = [*self._save_seconds, *(self.saver.write_seconds if self.saver else ())]
        return statistics.median(measured) * SAVE_ESTIMATE_FACTOR if measured else None

    def finish(self) -> CheckpointInfo | None:
        """At the normal end of the block: commit the newest step given to :meth:`checkpoint` if it is not yet.

        Waits for the save in flight and raises its failure (as :meth:`close` does); then, when this run has
        not committed the step last given to :meth:`checkpoint` (or a newer one), saves it synchronously — the
        loop has ended, so no snapshot is needed — with that call's ``meta`` plus ``"final": True``, and logs
        ``run.final_save``. Returns the checkpoint committed here, or None.

        With several ranks the decision is agreed (one all-reduce; every rank leaves the loop at the same step,
        so every rank gets here): all ranks save when any rank has not committed the step (rank 0 commits only
        once every rank's files are in), and none does when a rank's save in flight failed (that rank raises).
        """
        failure: Exception | None = None
        if self.saver is not None:
            try:
                self.saver.wait()
            except Exception as exc:  # logged by the saver already; raised below, after the agreement
                failure = exc
        latest, committed = self._latest, self._committed_step()
        owed = failure is None and latest is not None and (committed is None or latest[0] > committed)
        failed_elsewhere = False
        if self.agreement is not None:
            owed, failed_elsewhere = self.agreement.any(owed, failure is not None)
        if failure is not None:
            raise failure
        if not owed or latest is None:
            return None
        step, state = latest
        if failed_elsewhere:
            self.log.warning(
                "run.final_save", step=step, saved=False, reason="the save in flight on another rank failed"
            )
            return None
        if self.config.rank == 0 and self.checkpointer.claimed is None:
            self.checkpointer.claim()
        deferred, self._owed = self._owed, False
        self._save_now(step, state, {**(self._latest_meta or {}), "final": True})
        info = self._last_checkpoint
        assert info is not None
        self.log.info("run.final_save", step=step, saved=True, deferred=deferred, previous=committed, url=info.url)
        return info

    def finish_preempted(self) -> None:
        """Commit the newest step if it fits before the deadline, log the outcome; the caller exits 75.

        A save in flight is waited for first (until the deadline at most): it is the newest committed state
        the next attempt can have. Then the step last given to :meth:`checkpoint` is saved synchronously — the
        loop has stopped, so no snapshot is needed — when 1.5x the typical recent save still fits. With
        several ranks, they save only if every rank can (one agreement), since rank 0 commits only after all.
        """
        if not self.preemption.requested:  # another rank got the signal: this one's deadline starts now
            self.preemption.request()
            self.report.fields["stopped"] = "preempted with the job's other ranks (a stop signal reached one of them)"
        self.report.flush()  # the steps reached, before anything that might not finish in time
        reason = self._emergency_blocker()
        save = reason is None
        if self.agreement is not None:
            save = self.agreement.all(save)
            reason = reason or (None if save else "another rank cannot save in time")
        if not save or self._latest is None:
            left = self.preemption.seconds_left() or 0.0
            self.log.warning(
                "run.preempted",
                saved_now=False,
                checkpoint=self._committed_step(),
                seconds_left=round(left, 3),
                reason=reason,
            )
            return
        step, state = self._latest
        self.checkpointer.rank_timeout = max(1.0, self.preemption.seconds_left() or 0.0)
        self._save_now(step, state, {"emergency": True})
        info = self._last_checkpoint
        assert info is not None
        self.log.warning("run.preempted", saved_now=True, checkpoint=info.step, url=info.url)

    def _emergency_blocker(self) -> str | None:
        """Why the emergency save cannot or need not happen on this rank, or None when it should."""
        if self.saver and self.saver.busy:
            try:
                if not self.saver.wait(timeout=max(0.0, self.preemption.seconds_left() or 0.0)):
                    return f"the save of step {self.saver.inflight_step} did not finish before the deadline"
            except Exception as exc:  # logged by the saver already; the older checkpoint stands
                return f"the save in flight failed: {exc}"
        committed = self._committed_step()
        if self._latest is None or self._latest[0] == committed:
            return "the newest step is already committed" if self._latest else "no step was given to checkpoint()"
        left = self.preemption.seconds_left() or 0.0
        estimate = self._save_estimate()
        if estimate is not None and estimate > left:
            return f"saving step {self._latest[0]} takes ~{estimate:.2f}s, {left:.2f}s left before the deadline"
        return None

    def close(self, *, failed: bool = False, timeout: float | None = None) -> None:
        """Let the save in flight finish (up to ``timeout``); raise its failure unless the block already failed."""
        if self.saver is None:
            return
        if failed:
            try:
                self.saver.close(timeout=CLOSE_TIMEOUT if timeout is None else timeout)
            except Exception as exc:
                self.log.error("checkpoint.failed_at_exit", error=str(exc))
            return
        self.saver.close(timeout)

    def _committed_step(self) -> int | None:
        info = self.last_checkpoint
        return info.step if info else None


@contextmanager
def init(config: Config | None = None, *, preemption: Preemption | None = None, **overrides: Any) -> Iterator[Run]:
    """Open a run: config from ``overrides`` then ``PODTRAIN_*``; logs with run_id/attempt/rank; stop signals.

    Leaving the block normally commits the newest step given to ``run.checkpoint()`` if it is not committed yet
    (:meth:`Run.finish`); after a stop request, it commits what fits and exits with 75. A run that dies of storage down
    through the retries exits with 69 (retry later), of a setting to fix (a bad variable, a missing bucket,
    denied credentials) with 2 (never retry): the orchestrator acts on the code (:func:`sdk.errors.exit_code`).
    """
    try:
        with _opened(config, preemption, overrides) as run:
            yield run
    except PodtrainError as exc:
        code = exit_code(exc)
        if code is None:
            raise
        _log.get_logger("podtrain.run").error("run.failed", error=f"{type(exc).__name__}: {exc}", exit_code=code)
        print(f"podtrain: {redact(str(exc))}", file=sys.stderr, flush=True)
        raise SystemExit(code) from exc


@contextmanager
def _opened(config: Config | None, preemption: Preemption | None, overrides: dict[str, Any]) -> Iterator[Run]:
    config = config or Config.from_env(**overrides)
    if config.world_size > 1 and config.attempt is None:
        raise ConfigError(
            f"PODTRAIN_ATTEMPT is unset with WORLD_SIZE={config.world_size}: every rank must use the same attempt "
            "number; set it, or start the ranks under `podtrain run`, which derives it once for all of them"
        )
    _log.configure(
        run_id=config.run_id,
        attempt=config.attempt,
        rank=config.rank,
        fmt=config.log_format,
        level=config.log_level,
    )
    checkpointer = Checkpointer.from_config(config)
    _log.bind(attempt=checkpointer.attempt)
    run = Run(config, checkpointer, preemption)
    run.preemption.install()
    run.log.info("run.start", checkpoint_uri=checkpointer.url, world_size=config.world_size)
    run.report.begin()  # the SDK is in use: after a SIGTERM the supervisor trusts an exit 0 only once complete()
    _watch_peers(run)
    try:
        try:
            yield run
        except BaseException as exc:
            if run.peers is not None:
                if peers.collective_failure(exc):  # peers gone? then the watch ends this process as preempted
                    run.log.warning(
                        "run.collective_failed", waiting_s=round(run.peers.silence, 1), error=str(exc)[:300]
                    )
                    run.peers.verdict()
                run.peers.stop(failed=peers.failed_by(exc))
            run.close(failed=True)
            raise
        if run.stopping():
            run.finish_preempted()
            run.close(failed=True, timeout=max(0.0, run.preemption.seconds_left() or 0.0))
            if run.peers is not None:
                run.peers.stop()
            _exit_preempted(run)
        try:
            run.finish()
        except BaseException:
            run.close(failed=True)
            raise
        run.close()
        run.report.complete()  # the block reached its end without a stop request (sdk.lifecycle.childreport)
    finally:
        if run.peers is not None:
            run.peers.stop()
        run.preemption.uninstall()
        if run.report.pending:
            run.report.flush()
    run.log.info("run.end", last_checkpoint=run.last_checkpoint.url if run.last_checkpoint else None)


def _watch_peers(run: Run) -> None:
    """Start beating with the other ranks (:mod:`sdk.lifecycle.peers`), in a job of several; a store that cannot be
    reached leaves the run without the watch, with a warning."""
    config = run.config
    if config.world_size < 2:
        return
    try:
        run.peers = peers.watch_for(
            rank=config.rank,
            world_size=config.world_size,
            attempt=run.checkpointer.attempt,
            grace_seconds=config.grace_seconds,
            on_silent=run._peers_gone,
            env=os.environ,
        )
    except Exception as exc:  # a watch is a safety net: the run goes on without it
        run.log.warning("run.peers_unwatched", reason=f"{type(exc).__name__}: {exc}"[:300])


def _exit_preempted(run: Run) -> None:
    """Exit 75; without the interpreter's teardown when too little time is left for it.

    Tearing down an interpreter that imported torch takes 1.5-3.4 s on a small machine (measured); with less
    than :data:`TEARDOWN_RESERVE` seconds before the deadline the process ends at once (``os._exit``, after
    flushing the standard streams): the checkpoint is committed, and the supervisor's SIGKILL would otherwise
    cut the teardown anyway. atexit handlers then do not run.
    """
    left = run.preemption.seconds_left() or 0.0
    if left >= TEARDOWN_RESERVE:
        raise SystemExit(EXIT_PREEMPTED)
    run.log.warning("run.exit_now", seconds_left=round(left, 3), reason="too little time for a full teardown")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_PREEMPTED)

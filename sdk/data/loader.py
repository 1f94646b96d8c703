"""The data position: a DataLoader wrapper whose place in the data survives a restart exactly.

A shuffling :class:`~torch.utils.data.DataLoader` draws its order when an epoch's iterator is created: the
iterator draws the workers' base seed from the loader's generator (the global torch RNG when it has none),
then the sampler draws its permutation from its own generator (again the global RNG when it has none).
So the position in the data is not "the generator's state now" but three things: the epoch, the number of
batches consumed in it, and the generators' states *at the start of that epoch*. Restoring the generators'
current states instead gives the right epoch order only by accident, and later epochs go wrong.

:class:`ResumableLoader` keeps those three things. To continue an epoch it puts the generators back to the
epoch's start, creates the epoch's iterator again (so the same base seed and the same permutation are drawn),
and skips the consumed batches inside the sampler: the skipped entries are index lists pulled from the
(batch) sampler and dropped, so the dataset is never asked for them (no ``__getitem__``, no worker task, no
collate). When the loader has no generator of its own, the epoch's draws came from the global torch RNG;
the replay sets the global RNG to its state at the start of the epoch for those draws only, and puts it back
before the first batch is fetched, so the model's RNG stream (dropout…) continues from the checkpoint.

Exactness holds for samplers that draw their randomness when their iteration starts (RandomSampler,
SubsetRandomSampler, WeightedRandomSampler, DistributedSampler, BatchSampler over any of these). Samplers
with ``set_epoch`` (DistributedSampler) are told the epoch before each epoch starts. With ``num_workers > 0``,
a dataset whose ``__getitem__`` draws random numbers in the workers (random augmentation) is exact after a
resume at an epoch boundary; after a mid-epoch resume its workers start the remaining batches freshly seeded,
so derive per-sample randomness from the index (or seed it from the epoch) if it must be exact too. With
``num_workers=0`` the dataset draws from the process's RNGs, which :mod:`sdk.checkpoints._rng` restores, and all is
exact.

On another number of ranks (a job saved by N ranks resumes on M), :meth:`~ResumableLoader.reshard_state_dict`
makes each M-rank state out of the N saved ones. That needs a DistributedSampler (as the sampler, or inside the
BatchSampler that ``batch_size=`` builds): N ranks in lockstep consumed one prefix of the epoch's shared
permutation, whose length each state records (``sharding``; the arithmetic is in :mod:`sdk.data._distsampler`).
The M ranks split the rest of the epoch by DistributedSampler's rules for M ranks (padding by repeating the rest's
first samples, or cutting its tail with ``drop_last``), in batches of their own size: each sample of the
interrupted epoch is handed out once, save that padding. Later epochs are exactly an uninterrupted M-rank run's,
and a remainder can itself be saved and resharded. Not carried over: worker seeds (the new ranks draw them from
their own generators or RNG). Other samplers give each rank its own order, not a share of one: refused.

Not supported (rejected with a message): iterable-style datasets (a position in a stream cannot be skipped
to without reading it) and ``persistent_workers=True`` (the base seed is then drawn once per worker life,
not per epoch, and workers' RNG states live in other processes).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler

from sdk.data import _distsampler

__all__ = ["ResumableLoader"]

STATE_VERSION = 2  # 2 added ``sharding``; version-1 states still load (on the same number of ranks)
_END = object()


class ResumableLoader:
    """Wrap a map-style ``DataLoader`` so that its position (epoch, batch, order) can be saved and restored.

    Iterating yields the rest of the current epoch, then the position moves to the next epoch, so the usual
    loop works unchanged and resumes where it stopped::

        loader = ResumableLoader(DataLoader(ds, batch_size=32, shuffle=True, generator=g))
        for epoch in range(loader.epoch, epochs):      # after a resume: the interrupted epoch first
            for batch in loader:                       # the rest of that epoch, then whole epochs
                ...

    or, counting steps rather than epochs, ``batches = loader.batches()`` gives batches forever, epoch after
    epoch. ``state_dict()``/``load_state_dict()`` make it checkpointable state like a model or an optimizer.

    :attr:`epoch` and :attr:`batches_done` describe the position: the epoch the *next* batch comes from and
    how many of its batches were already handed out. The position moves to the next epoch as soon as the
    last batch of an epoch is handed out, so a checkpoint taken after it resumes at the next epoch.

    One iteration at a time: starting a new iteration (``iter(loader)``) closes an unfinished previous one
    and continues from the position it reached.
    """

    def __init__(self, loader: DataLoader[Any]) -> None:
        if not isinstance(loader, DataLoader):
            raise TypeError(f"ResumableLoader wraps a torch.utils.data.DataLoader, got {type(loader).__name__}")
        if isinstance(loader.dataset, IterableDataset):
            raise TypeError(
                "ResumableLoader needs a map-style dataset (with __getitem__ and __len__): a position in an "
                "IterableDataset cannot be reached without reading everything before it"
            )
        if loader.persistent_workers:
            raise ValueError(
                "ResumableLoader does not support persistent_workers=True: persistent workers draw their seed once, "
                "not per epoch, and keep RNG state in other processes; pass persistent_workers=False"
            )
        self._loader = loader
        index_sampler = loader.batch_sampler if loader.batch_sampler is not None else loader.sampler
        self._sampler = _SkippingSampler(index_sampler)
        self._iterable = _rebuild(loader, self._sampler)
        self._generators = _generators_of(loader)
        self._epoch_setters = _epoch_setters_of(loader)
        layout = _distsampler.describe(loader)  # or why the position cannot be resharded
        self._layout = layout if isinstance(layout, _distsampler.Layout) else None
        self._why_not_resharded = layout if isinstance(layout, str) else ""
        self._epoch = 0
        self._batches_done = 0
        # Where the current epoch's remainder starts in its permutation (0 unless resumed on other ranks).
        self._segment_start = 0
        # The generators' states when the current epoch began; None until its iterator is first created.
        self._start_states: list[torch.Tensor] | None = None
        self._start_global: torch.Tensor | None = None
        self._active: weakref.ref[Iterator[Any]] | None = None

    @property
    def loader(self) -> DataLoader[Any]:
        """The wrapped DataLoader (iterate this object, not that one, to keep the position)."""
        return self._loader

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from (0-based)."""
        return self._epoch

    @property
    def batches_done(self) -> int:
        """How many batches of :attr:`epoch` were already handed out (of its remainder, after a resharding)."""
        return self._batches_done

    def __len__(self) -> int:
        """Batches in a whole epoch."""
        return len(self._loader)

    def __iter__(self) -> Iterator[Any]:
        """The remaining batches of the current epoch; the position then moves to the next epoch."""
        self._close_active()
        iterator = self._epoch_batches()
        self._active = weakref.ref(iterator)
        return iterator

    def batches(self) -> Iterator[Any]:
        """Batches without end, epoch after epoch, from the current position (for loops that count steps)."""
        if len(self) == 0:
            raise ValueError("the DataLoader has no batches in an epoch; batches() would never yield")
        while True:
            yield from self

    def state_dict(self) -> dict[str, Any]:
        """The position, in types ``torch.load(weights_only=True)`` accepts.

        ``generator_states`` holds the states of the loader's own generators (the DataLoader's, then any other
        its samplers hold) at the start of the current epoch, or, when the epoch has not started yet, the states
        it will start from. ``global_rng_state`` is the global torch RNG's state at the start of the current
        epoch (None when it has not started: it will start from whatever the restored process RNG says).
        ``sharding`` (None without a DistributedSampler) records the sampler's layout and the global position.
        """
        started = self._start_states is not None
        if self._start_states is not None:
            states = [s.clone() for s in self._start_states]
        else:
            states = [g.get_state() for g in self._generators]
        return {
            "version": STATE_VERSION,
            "epoch": self._epoch,
            "batches_done": self._batches_done,
            "num_batches": len(self),
            "epoch_started": started,
            "generator_states": states,
            "global_rng_state": self._start_global.clone() if self._start_global is not None else None,
            "sharding": self._layout.state(self._segment_start, self._batches_done) if self._layout else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a position :meth:`state_dict` returned; ValueError if it does not fit this loader.

        An unfinished iteration is closed. Nothing is read here: the epoch's order is replayed, and the
        consumed batches skipped, when the next iteration starts (after the checkpoint has restored the RNGs).
        """
        epoch, done, started, states, start_global, segment_start = self._validated(state)
        self._close_active()
        self._epoch, self._batches_done, self._segment_start = epoch, done, segment_start
        if started:
            self._start_states, self._start_global = states, start_global
        else:
            for generator, generator_state in zip(self._generators, states, strict=True):
                generator.set_state(generator_state)
            self._start_states, self._start_global = None, None

    def reshard_state_dict(self, states: list[dict[str, Any]], *, rank: int, world_size: int) -> dict[str, Any]:
        """The state this loader (``rank`` of ``world_size``) loads to continue from the ranks' saved ``states``.

        ``states`` holds each saving rank's :meth:`state_dict` (index = old rank). Their common position (the
        epoch, and how many samples of its permutation all ranks consumed) carries over: this loader gets its
        share of the epoch's rest (see the module docstring), then whole epochs. ValueError when it cannot: no
        DistributedSampler, malformed or disagreeing states, or a sampler that orders epochs differently.
        """
        layout = self._layout or self._why_not_resharded
        epoch, consumed = _distsampler.merged_position(states, layout, rank=rank, world_size=world_size)
        if len(states) == world_size:
            return dict(states[rank])  # the rank's own state: exact, generators included
        assert self._layout is not None  # merged_position refuses a loader without one
        return {
            **self.state_dict(),  # this loader's generators: worker seeds are not carried over
            "epoch": epoch,
            "batches_done": 0,
            "epoch_started": False,
            "global_rng_state": None,
            "sharding": self._layout.state(consumed, 0),
        }

    # -- iteration ---------------------------------------------------------------------------------------
    def _epoch_batches(self) -> Iterator[Any]:
        for set_epoch in self._epoch_setters:
            set_epoch(self._epoch)
        restore_global = self._begin_epoch()
        expected = self._epoch_length(self._segment_start)
        iterator: Iterator[Any] | None = None
        try:
            iterator = iter(self._iterable)
            batch = next(iterator, _END)
            while batch is not _END:
                self._batches_done += 1
                if self._batches_done >= expected:
                    # The sampler is exhausted: this only confirms the end (it fetches nothing), so a checkpoint
                    # taken after the last batch already points at the next epoch.
                    if next(iterator, _END) is not _END:
                        raise RuntimeError(
                            f"the DataLoader yielded more than len() = {expected} batches in an epoch; "
                            "ResumableLoader needs a sampler whose len() is exact"
                        )
                    self._next_epoch()
                    yield batch
                    return
                yield batch
                batch = next(iterator, _END)
            self._next_epoch()  # the sampler ran out before len() batches
        finally:
            restore_global()
            del iterator

    def _begin_epoch(self) -> Callable[[], None]:
        """Arm the sampler for this epoch; return what puts the global RNG back (idempotent)."""
        # A resharded remainder's (batches of) indices replace the sampler's for the rest of its epoch.
        layout, start = self._layout, self._segment_start
        entries = layout.entries(self._epoch, start) if layout is not None and start else None
        if self._start_states is None:
            self._start_states = [g.get_state() for g in self._generators]
            self._start_global = torch.get_rng_state()
            self._sampler.arm(skip=0, on_ready=_nothing, entries=entries)
            return _nothing
        # Replay: the epoch's draws happen again from the epoch's start states, the consumed batches are skipped.
        for generator, generator_state in zip(self._generators, self._start_states, strict=True):
            generator.set_state(generator_state)
        now = torch.get_rng_state()
        assert self._start_global is not None
        torch.set_rng_state(self._start_global)
        restored = False

        def restore_global() -> None:
            nonlocal restored
            if not restored:
                restored = True
                torch.set_rng_state(now)

        self._sampler.arm(skip=self._batches_done, on_ready=restore_global, entries=entries)
        return restore_global

    def _epoch_length(self, segment_start: int) -> int:
        """Batches of an epoch (of its remainder from ``segment_start``, after a resharding)."""
        return len(self) if segment_start == 0 or self._layout is None else self._layout.batches(segment_start)

    def _next_epoch(self) -> None:
        self._epoch += 1
        self._batches_done = 0
        self._segment_start = 0
        self._start_states, self._start_global = None, None

    def _close_active(self) -> None:
        active = self._active() if self._active is not None else None
        self._active = None
        if active is not None and hasattr(active, "close"):
            active.close()

    def _validated(self, state: Any) -> tuple[int, int, bool, list[torch.Tensor], torch.Tensor | None, int]:
        if not isinstance(state, dict):
            raise ValueError(
                f"loader state must be a dict from ResumableLoader.state_dict(), got {type(state).__name__}"
            )
        if state.get("version") not in (1, STATE_VERSION):
            raise ValueError(f"loader state has version {state.get('version')!r}, expected {STATE_VERSION}")
        for key in ("epoch", "batches_done", "num_batches"):
            value = state.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"loader state {key} must be a non-negative int, got {value!r}")
        if state["num_batches"] != len(self):
            raise ValueError(
                f"loader state is for {state['num_batches']} batches per epoch, this loader has {len(self)}: "
                "the dataset, batch size or sampler changed, so the saved position means nothing here"
            )
        started = state.get("epoch_started")
        if not isinstance(started, bool):
            raise ValueError("loader state epoch_started must be a bool")
        done = state["batches_done"]
        segment_start = _distsampler.saved_segment_start(state, self._layout)
        if (started and done >= self._epoch_length(segment_start)) or (not started and done != 0):
            raise ValueError(f"loader state batches_done {done} is impossible with epoch_started={started}")
        states = state.get("generator_states")
        if not isinstance(states, list) or len(states) != len(self._generators):
            raise ValueError(
                f"loader state has {len(states) if isinstance(states, list) else 'no'} generator states, "
                f"this loader has {len(self._generators)} generator(s)"
            )
        for i, (generator_state, generator) in enumerate(zip(states, self._generators, strict=True)):
            reference = generator.get_state()
            if not _same_kind(generator_state, reference):
                raise ValueError(f"loader state generator_states[{i}] does not fit this loader's generator")
        start_global = state.get("global_rng_state")
        if started and not _same_kind(start_global, torch.get_rng_state()):
            raise ValueError("loader state global_rng_state must be the torch RNG state of the epoch's start")
        if not started and start_global is not None:
            raise ValueError("loader state global_rng_state must be None when the epoch has not started")
        return state["epoch"], done, started, states, start_global, segment_start


class _SkippingSampler(Sampler[Any]):
    """The DataLoader's (batch) sampler, able to drop the first ``skip`` entries of one epoch.

    Dropped entries are index lists only: the DataLoader never sees them, so nothing is fetched for them.
    ``on_ready`` runs once the epoch's randomness has been drawn and the skip is done, before the first
    entry reaches the DataLoader (and so before any data is fetched).
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self._skip = 0
        self._on_ready: Callable[[], None] = _nothing
        self._entries: list[Any] | None = None

    def arm(self, *, skip: int, on_ready: Callable[[], None], entries: list[Any] | None) -> None:
        """Set up the next epoch: skip ``skip`` entries of ``entries`` (the inner sampler's when None)."""
        self._skip, self._on_ready, self._entries = skip, on_ready, entries

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[Any]:
        # A generator: nothing runs until the DataLoader asks for the first entry. A multi-worker DataLoader
        # creates a first iterator it never uses; that one must not consume the armed skip.
        skip, on_ready, override = self._skip, self._on_ready, self._entries
        self._skip, self._on_ready, self._entries = 0, _nothing, None
        try:
            entries = iter(self.inner if override is None else override)
            for _ in range(skip):
                next(entries)
            first = next(entries)
        except StopIteration:
            return
        finally:
            on_ready()
        yield first
        yield from entries


def _nothing() -> None:
    return None


def _rebuild(loader: DataLoader[Any], index_sampler: _SkippingSampler) -> DataLoader[Any]:
    """A DataLoader like ``loader`` but reading its indices through ``index_sampler``."""
    options: dict[str, Any] = {
        "num_workers": loader.num_workers,
        "collate_fn": loader.collate_fn,
        "pin_memory": loader.pin_memory,
        "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn,
        "multiprocessing_context": loader.multiprocessing_context,
        "generator": loader.generator,
    }
    if loader.num_workers > 0:
        options["prefetch_factor"] = loader.prefetch_factor
    if getattr(loader, "pin_memory_device", ""):
        options["pin_memory_device"] = loader.pin_memory_device
    if hasattr(loader, "in_order"):
        options["in_order"] = loader.in_order
    if loader.batch_sampler is not None:
        return DataLoader(loader.dataset, batch_sampler=index_sampler, **options)
    return DataLoader(loader.dataset, batch_size=None, sampler=index_sampler, **options)


def _parts(loader: DataLoader[Any]) -> list[Any]:
    """The loader's sampling objects, each once."""
    parts: list[Any] = []
    for part in (loader.sampler, loader.batch_sampler, getattr(loader.batch_sampler, "sampler", None)):
        if part is not None and all(part is not p for p in parts):
            parts.append(part)
    return parts


def _generators_of(loader: DataLoader[Any]) -> list[torch.Generator]:
    """The DataLoader's generator, then every other generator its samplers hold, each once."""
    found: list[torch.Generator] = []
    for owner in (loader, *_parts(loader)):
        generator = getattr(owner, "generator", None)
        if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
            found.append(generator)
    return found


def _epoch_setters_of(loader: DataLoader[Any]) -> list[Callable[[int], None]]:
    return [part.set_epoch for part in _parts(loader) if callable(getattr(part, "set_epoch", None))]


def _same_kind(value: Any, reference: torch.Tensor) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == reference.dtype and value.shape == reference.shape

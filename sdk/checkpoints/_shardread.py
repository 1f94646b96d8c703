"""The saving ranks' sharded payloads, for a load: checked before it, each tensor read by its byte range during it.

A rank's ``sharded`` payload is a pickle of its objects (``sharded.pt``: optimizer hyperparameters, and a
placeholder per tensor) and safetensors files holding its tensors, each tensor's CRC32C in the header
(:mod:`sdk.checkpoints.serialization`). A load on M ranks of a checkpoint of N needs some tensors of some saving
ranks; reading whole files into memory first, to check them before any byte reaches the state, cost a fresh copy of
everything (page faults, copies: 3x DCP's load of the same state, docs/benchmarks.md) and up to twice the bytes
where N and M do not divide.

So a load happens in two steps, and every byte is read once:

* **Before the ranks agree to load** (:func:`open_payloads`): every payload file of the saving ranks this rank
  needs is checked against the manifest — its size, and the store's own CRC32C where it keeps one (S3, GCS: no data
  read); each pickle is read whole, checked and decoded (no code runs); each safetensors header is read by range and
  checked (:func:`sdk.checkpoints._statefile.safetensors_layout`); and byte ranges an earlier load found damaged
  (:mod:`sdk.checkpoints.invalidmark`) are read again (:func:`still_damaged`). Damage found here skips the
  checkpoint on every rank before anything was written.
* **During the load** (:meth:`StoredPayloads.tensors`): each needed tensor is read by range, several at once
  (``max_workers``, a bounded window: memory stays a few tensors), its CRC32C checked — a mismatch is read again,
  :data:`sdk.checkpoints._verify.READS` times in all — and handed over to be copied into the state. Damage found
  here (in a local folder, which keeps no checksum of its own, or a file changed since it was checked) may come
  after part of the state was written: the damaged ranges are recorded (:attr:`StoredPayloads.damaged`, then the
  checkpoint's mark), and :mod:`sdk.checkpoints._restore` needs an older checkpoint to load over the state, or stops
  the run (:class:`~sdk.errors.PartlyLoadedError`, exit 69) — whose retry skips the checkpoint before it writes.

Checking every byte before the load instead would read the checkpoint twice (twice the traffic from a network
volume), or hold all of it in memory first (what this replaced: 3x DCP's load time, docs/benchmarks.md).

A file written before tensors had their own CRC32C in the header is read whole, checked against the manifest, once.
"""

from __future__ import annotations

import threading
import warnings
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from sdk.checkpoints import _ranks as ranks
from sdk.checkpoints import _state as trainstate
from sdk.checkpoints import _statefile as statefile
from sdk.checkpoints import serialization
from sdk.checkpoints._shardload import TensorSpec
from sdk.checkpoints._verify import READS, check_files, check_metadata, read_verified
from sdk.checkpoints.invalidmark import DamagedRange
from sdk.checkpoints.manifest import FileEntry, stem_of, step_dir
from sdk.errors import InvalidCheckpointError, StorageNotFoundError
from sdk.log import get_logger
from sdk.stores import checksum
from sdk.stores.store import Store

__all__ = ["Place", "StoredPayloads", "open_payloads", "still_damaged"]

log = get_logger("podtrain.checkpoint")
_PLACEHOLDER = "__podtrain_tensor__"  # sdk.checkpoints.serialization's: {_PLACEHOLDER: name in the safetensors}


@dataclass(frozen=True)
class Place:
    """Where one saved tensor's bytes are: a payload file (its name in the manifest) and a byte range in it."""

    file: str
    start: int
    end: int
    dtype: str
    shape: tuple[int, ...]
    crc32c: int | None  # None: the file records no per-tensor CRC32C (read whole, checked by the manifest's)


class StoredPayloads:
    """The checked payloads of some saving ranks: objects at hand, tensors read by range when asked for."""

    def __init__(
        self,
        store: Store,
        *,
        step: int,
        url: str,
        files: Mapping[str, FileEntry],
        skeletons: Mapping[int, Mapping[str, Any]],
        places: Mapping[int, Mapping[str, Place]],
        max_workers: int,
    ) -> None:
        self._store, self._folder, self._url, self._files = store, step_dir(step), url, files
        self._skeletons, self._places, self._max_workers = skeletons, places, max_workers
        self._whole: dict[str, Future[bytes]] = {}  # files without per-tensor CRC32Cs, read once
        self._lock = threading.Lock()
        self.damaged: list[DamagedRange] = []  # the ranges whose bytes kept failing their CRC32C

    def lookup(self, rank: int, key: str) -> Any:
        """The saved object ``key`` of ``rank``, or for a tensor its dtype and shape (nothing read)."""
        value = self._value(rank, key)
        if isinstance(value, Place):
            return TensorSpec(serialization.dtype_of(value.dtype), value.shape)
        if isinstance(value, torch.Tensor):  # a tensor safetensors cannot hold stays in the pickle
            return TensorSpec(value.dtype, tuple(value.shape))
        return value

    def tensors(self, wanted: Iterable[tuple[int, str]]) -> Iterator[tuple[tuple[int, str], torch.Tensor]]:
        """Each of ``wanted`` (saving rank, key) as a tensor whose bytes were checked, in that order; read by range
        ``max_workers`` at a time, at most twice that many held. Every name is looked up before anything is read."""
        todo = deque((place, self._value(*place)) for place in wanted)
        for place, value in todo:
            if not isinstance(value, Place | torch.Tensor):
                raise InvalidCheckpointError(
                    self._url, f"{place[1]!r} of rank {place[0]} is a {type(value).__name__}, the index says a tensor"
                )
        window: deque[tuple[tuple[int, str], Future[torch.Tensor] | torch.Tensor]] = deque()
        with ThreadPoolExecutor(max_workers=self._max_workers, thread_name_prefix="podtrain-load") as pool:
            while todo or window:
                while todo and len(window) < 2 * self._max_workers:
                    place, value = todo.popleft()
                    got = pool.submit(self._tensor, *place, value) if isinstance(value, Place) else value
                    window.append((place, got))
                place, ready = window.popleft()
                yield place, ready.result() if isinstance(ready, Future) else ready

    def _value(self, rank: int, key: str) -> Any:
        skeleton = self._skeletons.get(rank)
        if skeleton is None or key not in skeleton:
            raise InvalidCheckpointError(self._url, f"the files of rank {rank} hold no {key!r}")
        value = skeleton[key]
        if isinstance(value, dict) and len(value) == 1 and _PLACEHOLDER in value:
            place = self._places.get(rank, {}).get(str(value[_PLACEHOLDER]))
            if place is None:
                raise InvalidCheckpointError(
                    self._url, f"{key!r} of rank {rank}: tensor {value[_PLACEHOLDER]!r} is in none of its files"
                )
            return place
        return value

    def _tensor(self, rank: int, key: str, place: Place) -> torch.Tensor:
        if place.start == place.end:
            return _view(b"", place)
        if place.crc32c is None:
            return _view(memoryview(self._whole_file(place.file).result())[place.start : place.end], place)
        return _view(self._read_range(rank, key, place), place)

    def _read_range(self, rank: int, key: str, place: Place) -> bytes:
        problem = ""
        for read in range(1, READS + 1):
            try:
                data, _ = self._store.read(f"{self._folder}/{place.file}", place.start, place.end)
            except StorageNotFoundError:
                raise InvalidCheckpointError(self._url, f"{place.file} is listed in the manifest but missing") from None
            if len(data) != place.end - place.start:
                problem = f"{place.file}: {key!r} of rank {rank} read {len(data)} bytes of {place.end - place.start}"
            elif (actual := checksum.crc32c(data)) != place.crc32c:
                problem = (
                    f"{place.file}: {key!r} of rank {rank} has CRC32C {checksum.to_hex(actual)}, its header says "
                    f"{checksum.to_hex(place.crc32c or 0)} (corrupt)"
                )
            else:
                return data
            if read < READS:
                log.warning("checkpoint.reread", url=self._url, file=place.file, read=read, reason=problem)
        with self._lock:
            self.damaged.append(DamagedRange(place.file, place.start, place.end, place.crc32c or 0))
        raise InvalidCheckpointError(self._url, problem)

    def _whole_file(self, name: str) -> Future[bytes]:
        """The verified bytes of ``name``, read once however many tensors of it are asked for."""
        with self._lock:
            future = self._whole.get(name)
            if future is None:
                future = self._whole[name] = Future()
                owner = True
            else:
                owner = False
        if owner:
            try:
                future.set_result(
                    read_verified(self._store, self._url, name, f"{self._folder}/{name}", self._files[name])
                )
            except BaseException as exc:
                if isinstance(exc, InvalidCheckpointError):  # the whole file is the range to read again next time
                    entry = self._files[name]
                    with self._lock:
                        self.damaged.append(DamagedRange(name, 0, entry.size, checksum.from_hex(entry.crc32c)))
                future.set_exception(exc)
        return future


def _view(data: bytes | memoryview, place: Place) -> torch.Tensor:
    """``data`` as the tensor ``place`` describes (read-only memory: the caller copies it into the state)."""
    dtype = serialization.dtype_of(place.dtype)
    if not len(data):
        return torch.empty(place.shape, dtype=dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return torch.frombuffer(data, dtype=dtype).reshape(place.shape)


def open_payloads(
    store: Store,
    step: int,
    url: str,
    files: Mapping[str, FileEntry],
    saving_ranks: Iterable[int],
    *,
    safe_globals: Iterable[Any] = (),
    max_workers: int = 8,
) -> StoredPayloads:
    """Check the sharded payload files of ``saving_ranks`` in the checkpoint of ``step`` (``files``: its manifest's)
    and read what a load needs up front: see the module's doc. Raises :class:`InvalidCheckpointError` for damage."""
    wanted = set(saving_ranks)
    mine = {n: e for n, e in files.items() if stem_of(n) == trainstate.SHARDED_STEM and ranks.rank_of(n) in wanted}
    pickles = {n: e for n, e in mine.items() if n.endswith(".pt")}
    tensor_files = {n: e for n, e in mine.items() if n.endswith(".safetensors")}
    folder = step_dir(step)

    def layout(name: str) -> tuple[str, statefile.Layout]:
        return name, _checked_layout(store, url, name, f"{folder}/{name}", tensor_files[name])

    with ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="podtrain-check") as pool:
        layouts = pool.map(layout, sorted(tensor_files))
        data = check_files(store, step, url, pickles, download=True, metadata=False, max_workers=max_workers)
        places: dict[int, dict[str, Place]] = {r: {} for r in wanted}
        for name, checked in layouts:
            rank = ranks.rank_of(name)
            assert rank is not None
            for entry in checked.entries:
                if entry.name in places[rank]:
                    raise InvalidCheckpointError(url, f"tensor {entry.name!r} of rank {rank} is in two of its files")
                crc = None if checked.crc32c is None else checked.crc32c[entry.name]
                places[rank][entry.name] = Place(name, entry.start, entry.end, entry.dtype, entry.shape, crc)
    skeletons: dict[int, Mapping[str, Any]] = {}
    for rank in wanted:
        pickled = [n for n in data if ranks.rank_of(n) == rank]
        if not pickled:  # tensors only: safetensors names are the keys
            skeletons[rank] = {name: {_PLACEHOLDER: name} for name in places[rank]}
            continue
        (name,) = pickled
        skeleton = serialization.decode(name, data.pop(name), location=url, safe_globals=safe_globals)
        if not isinstance(skeleton, dict) or not all(isinstance(k, str) for k in skeleton):
            raise InvalidCheckpointError(url, f"the sharded payload of rank {rank} is not a mapping of names")
        skeletons[rank] = skeleton
    return StoredPayloads(
        store, step=step, url=url, files=files, skeletons=skeletons, places=places, max_workers=max_workers
    )


def still_damaged(store: Store, step: int, url: str, ranges: Iterable[DamagedRange]) -> str | None:
    """Why the checkpoint of ``step`` is still damaged where an earlier load found it so (``ranges``, from its
    :mod:`sdk.checkpoints.invalidmark`), or None when every range now matches its CRC32C."""
    for found in ranges:
        try:
            data, _ = store.read(f"{step_dir(step)}/{found.file}", found.start, found.end)
        except StorageNotFoundError:
            return f"{found.file} is listed in the manifest but missing"
        if len(data) != found.end - found.start or checksum.crc32c(data) != found.crc32c:
            return (
                f"{found.file}: bytes {found.start:,}..{found.end:,} still fail their CRC32C (an earlier load found "
                "them damaged after part of the checkpoint was loaded)"
            )
    return None


def _checked_layout(store: Store, url: str, name: str, rel: str, entry: FileEntry) -> statefile.Layout:
    """The checked header of one safetensors payload file, after its size (and the store's CRC32C) was checked."""
    try:
        check_metadata(store, url, name, rel, entry)
        head, _ = store.read(rel, 0, min(entry.size, statefile.HEAD_BYTES))
        end = statefile.header_end(name, head, entry.size, location=url)
        if len(head) < end:
            head, _ = store.read(rel, 0, end)
    except StorageNotFoundError:
        raise InvalidCheckpointError(url, f"{name} is listed in the manifest but missing") from None
    return statefile.safetensors_layout(name, head, entry.size, location=url)

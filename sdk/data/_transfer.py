"""One object on its way into the pull's folder: pieces read, checked and landed, then verified whole and renamed.

:func:`sdk.data.pull.pull` lists and plans; a :class:`Transfer` per object does the rest. Its pieces are fetched by the
pull's thread pool in any order and written at their offsets into ``<name>.podtrain-partial``
(:mod:`sdk.data._landing`);
the last piece to arrive checks the whole — its length on disk, and the store's checksum: a full-object CRC
combined from the pieces', an MD5, or a multipart upload's part checksums (:class:`sdk.stores.integrity.PartCheck`) —
before the file is renamed into place and recorded in the warm index (:mod:`sdk.data._warmcache`).

A pull that is stopped keeps the pieces of a ranged object that landed (:meth:`Transfer.abandon` with ``keep``;
the warm index records their CRCs once the partial file is on disk). The next pull of the object, unchanged in the
store, plans only the other pieces (:attr:`Transfer.starts`); the first to open the file reads each kept piece back
and keeps it when its CRC is still the one recorded, or fetches it again. The whole-object check combines every
piece's CRC, kept or fetched, as before.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

from sdk.data._destination import Destination
from sdk.data._landing import LandingFile
from sdk.data._progress import Progress
from sdk.data._warmcache import BY_PARTS, WarmCache
from sdk.errors import PermanentStorageError, StorageNotFoundError, TransientStorageError, UnverifiedObjectError
from sdk.log import get_logger
from sdk.stores.integrity import PART_SUMS, Digest, PartCheck, Segment, matches
from sdk.stores.store import ObjectInfo, Store

__all__ = ["Transfer", "Wanted"]

log = get_logger("podtrain.pull")
_READS = 3


@dataclass(frozen=True)
class Wanted:
    store: Store
    rel: str  # in the store ("" when the URL is the object itself)
    name: str  # in the folder
    info: ObjectInfo


def _reader(data: bytes) -> Callable[[int, int], bytes]:
    """``read(offset, length)`` over bytes in memory (a whole object, checked by its parts)."""
    return lambda offset, length: data[offset : offset + length]


class Transfer:
    """One object on its way: its pieces land in ``<name>.podtrain-partial``; the last one verifies and renames."""

    def __init__(
        self,
        wanted: Wanted,
        folder: Destination,
        index: WarmCache,
        piece_size: int,
        *,
        direct: bool,
        require: bool = False,
    ) -> None:
        self.wanted, self.index, self.direct, self.require = wanted, index, direct, require
        self.folder, self.path = folder, folder.root / wanted.name
        self._dir_fd = -1  # the folder the file lands in, opened without following links (sdk.data._destination)
        self._leaf = self._partial = ""
        size = wanted.info.size
        self.piece_size = piece_size if size > piece_size else max(size, 1)
        self.every = list(range(0, size, self.piece_size)) or [0]  # every piece's start
        self.ranged = len(self.every) > 1
        self.starts = self.every  # the pieces to fetch: all but those an earlier, stopped pull kept
        self._kept_digest, self._kept = "", {}  # piece start -> its CRC, as an earlier pull recorded it
        if self.ranged:
            digest, kept = index.kept_pieces(wanted.name, size, wanted.info.fingerprint, self.piece_size)
            if kept and set(kept) < set(self.every):
                self._kept_digest, self._kept = digest, kept
                self.starts = [start for start in self.every if start not in kept]
        self._lock = threading.Lock()
        self._file: LandingFile | None = None
        self._parts: dict[int, tuple[Digest, int]] = {}  # piece start -> (its digest, its length)
        self._sums = dict(wanted.info.checksums)
        self._sums.pop("etag_md5", None)  # a hint, never a reason to fail
        self._check: PartCheck | None = None  # a multipart object's check by its parts (see _plan)
        self._exact = True  # whether _check's part sizes are the store's, not assumed
        self._segments: dict[int, list[Segment]] = {}  # piece start -> its bytes digested per part
        self._planned = False
        self.verified = False  # whether a checksum of the store's is compared (see _plan)
        self.done = False

    def open(self) -> LandingFile:
        with self._lock:
            if self._file is None:
                try:
                    if self._dir_fd < 0:
                        self._dir_fd, self._leaf = self.folder.folder_of(self.wanted.name, create=True)
                    self._partial = self.folder.partial_of(self._leaf)
                    resumed = bool(self._kept) and self._landing(resume=True) is not None
                    if not resumed:
                        self._landing(resume=False)
                except OSError as exc:
                    self.folder.explain(exc, self.wanted.name, self.wanted.store.url_of(self.wanted.rel))
                    raise
                if self.ranged:  # ranged GETs carry no checksum: what to check against, asked once
                    self._plan()
                if self._kept:
                    self._take_kept(resumed)
            assert self._file is not None
            return self._file

    def _landing(self, *, resume: bool) -> LandingFile | None:
        """The partial file, created (``resume`` False) or as an earlier pull left it (None when it is not there
        as recorded: then the object starts over)."""
        try:
            self._file = LandingFile(
                self._partial,
                self.wanted.info.size,
                direct=self.direct,
                preallocate=self.ranged,
                dir_fd=self._dir_fd,
                label=self.wanted.name,
                replace=not resume,
                resume=resume,
            )
        except OSError as exc:
            if not resume:
                raise
            log.info("pull.not_resumed", name=self.wanted.name, reason=str(exc))
            return None
        return self._file

    def _take_kept(self, resumed: bool) -> None:
        """The pieces an earlier, stopped pull kept: each read back from the partial file and kept when its CRC is
        the one recorded (and the object is still checked by its CRC); any other fetched again here."""
        assert self._file is not None
        kept, self._kept = self._kept, {}
        digest = Digest.for_checksums(self._sums)
        if self._check is not None:  # checked by its parts: every part's CRC/MD5 comes from the bytes read back
            usable = resumed and self._kept_digest == BY_PARTS
        else:
            usable = resumed and digest is not None and digest.name == self._kept_digest
        size, again = self.wanted.info.size, 0
        for start, crc in sorted(kept.items()):
            end = min(start + self.piece_size, size)
            if usable:
                data = self._landed(start, end - start)
                piece = Digest.of(data, self._sums)
                if len(data) == end - start and (self._check is not None or piece.value == crc):
                    if self._check is not None:
                        self._segments[start] = self._check.piece(start, data)
                    self._file.mark(start, len(data))
                    self._parts[start] = (piece, len(data))
                    continue
            again += 1
            data, piece = self._read_checked(start, end)
            self._file.write(data, start)
            self._parts[start] = (piece, len(data))
        log.info("pull.resumed", name=self.wanted.name, kept=len(kept) - again, fetched_again=again)

    def fetch(self, start: int, progress: Progress) -> None:
        """Read one piece, checked, and write it at its offset; the last piece completes the file."""
        file = self.open()
        end = min(start + self.piece_size, self.wanted.info.size)
        data, digest = self._read_checked(start, end)
        file.write(data, start)
        progress.add_bytes(len(data))
        with self._lock:
            self._parts[start] = (digest, len(data))
            last = len(self._parts) == len(self.every)
        if last:
            self._complete()
            progress.add_file()

    def _read_checked(self, start: int, end: int) -> tuple[bytes, Digest]:
        """The piece's bytes, of the right length; a whole object also matching the store's checksum."""
        problem = ""
        for read in range(1, _READS + 1):
            if self.ranged:
                data, _ = self.wanted.store.read(self.wanted.rel, start, end)
            else:
                data, sums = self.wanted.store.read(self.wanted.rel)
                self._sums.update(sums)
                self._plan()
            digest = Digest.of(data, self._sums)
            problem = "" if len(data) == end - start else f"{len(data)} bytes arrived, {end - start} expected"
            if not problem and self._check is not None:
                segments = self._check.piece(start, data)
                problem = "" if self.ranged else self._check_parts(segments, _reader(data))
                self._segments[start] = segments
            elif not problem and not self.ranged:
                problem = self._mismatch(digest)
            if not problem:
                return data, digest
            log.warning("pull.reread", url=self.wanted.store.url_of(self.wanted.rel), read=read, reason=problem)
        raise TransientStorageError(f"{self.wanted.store.url_of(self.wanted.rel)}: {problem}", url=self.url)

    @property
    def url(self) -> str:
        return self.wanted.store.url

    def _complete(self) -> None:
        if self.ranged:
            problem = self._check_pieces()
            if problem:  # pieces were each the right length, yet the whole is wrong: fetch it again, in order
                log.warning("pull.reread", url=self.wanted.store.url_of(self.wanted.rel), read=1, reason=problem)
                self._refetch_sequentially()
        assert self._file is not None
        file, self._file = self._file, None
        # Every byte written and the length on disk checked (sdk.data._landing), then renamed within the folder it was
        # created in; made durable with others before its index line is written (see sdk.data._warmcache).
        status = file.finish()
        try:
            os.replace(self._partial, self._leaf, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
        except OSError as exc:
            exc.filename = self.wanted.name
            self.folder.explain(exc, self.wanted.name, self.wanted.store.url_of(self.wanted.rel))
            raise
        self.done = True
        info = self.wanted.info
        self.index.record(self.path, self.wanted.name, info.size, info.fingerprint, mtime_ns=status.st_mtime_ns)

    def _refetch_sequentially(self) -> None:
        assert self._file is not None
        for read in range(2, _READS + 1):
            parts, segments = [], []
            for start in self.every:
                end = min(start + self.piece_size, self.wanted.info.size)
                data, _ = self.wanted.store.read(self.wanted.rel, start, end)
                self._file.write(data, start)
                if self._check is not None:
                    segments += self._check.piece(start, data)
                else:
                    parts.append((Digest.of(data, self._sums), len(data)))
            if self._check is not None:
                problem = self._check.check(segments, self._landed)
            else:
                problem = self._mismatch(Digest.combine(parts))
            if not problem:
                return
            log.warning("pull.reread", url=self.wanted.store.url_of(self.wanted.rel), read=read, reason=problem)
        raise TransientStorageError(f"{self.wanted.store.url_of(self.wanted.rel)}: {problem}", url=self.url)

    def _mismatch(self, digest: Digest) -> str:
        if matches(digest, self._sums):
            return ""
        theirs = self._sums.get(digest.name)
        shown = f"{theirs:08x}" if isinstance(theirs, int) else theirs
        return f"{digest.name} {digest.hexdigest()} != the store's {shown}"

    # -- what an object is checked against (sdk.stores.integrity) ----------------------------------------------------
    def _plan(self) -> None:
        """Once the store's checksums are known (a whole object's GET answer; for a ranged one the listing's, else
        one HEAD): a whole-object CRC is combined from the pieces (ranged) or computed (whole), as is a whole
        object's MD5; a multipart upload's COMPOSITE CRC or ETag, or the MD5 of a ranged object, is checked through
        the part layout (one more request for a multipart one); with none of these the object is unverified."""
        if self._planned:
            return
        size, store, rel = self.wanted.info.size, self.wanted.store, self.wanted.rel
        if self.ranged and not ("crc32c" in self._sums or "crc32" in self._sums):
            self._sums.update(store.describe(rel).checksums)
        crc = "crc32c" in self._sums or "crc32" in self._sums
        if not crc and self.ranged and "md5" in self._sums:  # no piece alone has the whole's MD5: read back
            self._check = PartCheck("md5", self._sums["md5"], (size,))
        elif not crc and "md5" not in self._sums and any(name in self._sums for name in PART_SUMS):
            self._check_by_layout()
        if self.ranged:
            self._sums.pop("md5", None)  # not computed per piece: the check above reads it back
        self.verified = crc or self._check is not None or "md5" in self._sums
        self._planned = True
        if not self.verified and self.require:
            raise UnverifiedObjectError(
                f"{store.url_of(rel)}: the store keeps no checksum for it (no CRC, and no ETag that is an MD5), and "
                "--require-checksums / PODTRAIN_REQUIRE_CHECKSUMS asks for one: upload it with a checksum (e.g. "
                "aws s3 cp --checksum-algorithm CRC32C) or pull without requiring checksums",
                url=self.url,
            )

    def _check_by_layout(self) -> None:
        """A multipart upload's check by its part layout (one request), unless the store gives none that fits (an
        S3-compatible server without ``?partNumber=``, a part count other than the ETag's): then the object stays
        unverified, and the log says why."""
        store, rel, size = self.wanted.store, self.wanted.rel, self.wanted.info.size
        try:
            layout = store.layout(rel, size)
        except StorageNotFoundError:
            raise
        except PermanentStorageError as exc:
            problem = str(exc)
        else:
            count = self._sums.get("parts", len(layout.sizes))
            problem = "" if count == len(layout.sizes) else f"{len(layout.sizes)} parts, where its ETag says {count}"
            if not problem:
                self._check, self._exact = PartCheck.for_checksums(self._sums, layout.sizes), layout.exact
                return
        log.warning("pull.no_part_layout", url=store.url_of(rel), reason=problem)

    def _check_parts(self, segments: list[Segment], landed: Callable[[int, int], bytes]) -> str:
        """:meth:`PartCheck.check`; when the part sizes were assumed and do not fit, the store's exact ones asked
        for and the bytes checked again (from the landed file for a ranged object) before they are blamed."""
        assert self._check is not None
        problem = self._check.check(segments, landed)
        if problem and not self._exact:
            size = self.wanted.info.size
            layout = self.wanted.store.layout(self.wanted.rel, size, exact=True)
            assumed, self._exact = self._check, True
            if layout.sizes == assumed.sizes:
                return problem  # the sizes were right: the bytes are wrong
            if sum(layout.sizes) != size:
                return f"its {len(layout.sizes)} parts hold {sum(layout.sizes)} bytes, {size} listed"
            self._check = PartCheck(assumed.name, assumed.expected, layout.sizes)
            step = self.piece_size
            segments = [seg for at in range(0, size, step) for seg in self._check.piece(at, landed(at, step))]
            problem = self._check.check(segments, landed)
        return problem

    def _check_pieces(self) -> str:
        """A ranged object, once every piece landed: its pieces' CRCs combined, or its check by parts."""
        if self._check is None:
            return self._mismatch(Digest.combine([self._parts[s] for s in self.every]))
        return self._check_parts([seg for start in self.every for seg in self._segments[start]], self._landed)

    def _landed(self, offset: int, length: int) -> bytes:
        """Bytes of the partial file as written (an MD5 over a part that came in several pieces reads them back),
        opened as it was created: in the folder's descriptor, never through a link."""
        fd = os.open(self._partial, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._dir_fd)
        try:
            return os.pread(fd, min(length, self.wanted.info.size - offset), offset)
        finally:
            os.close(fd)

    def abandon(self, *, keep: bool = False) -> None:
        """After the pull (a failure, a cancel, or success): close and remove what was not completed (it is
        fetched again next time); the file at the name before is untouched. ``keep`` (the pull was stopped): a
        ranged object checked by its CRC keeps the pieces that landed, for the next pull (see the module)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._dir_fd >= 0:
            if not self.done and self._partial and not (keep and self._keep()):
                with contextlib.suppress(OSError):
                    os.unlink(self._partial, dir_fd=self._dir_fd)
            os.close(self._dir_fd)
            self._dir_fd = -1

    def _keep(self) -> bool:
        """Record the landed pieces of a ranged object in the warm index, with their CRCs where the object is checked
        by a whole-object CRC (one checked by its parts is checked from the bytes read back); False when there is
        nothing to keep (no piece, or every piece: the whole failed its check) or no checksum to keep it by."""
        if not self.ranged or not 0 < len(self._parts) < len(self.every):
            return False
        digests = {digest.name for digest, _ in self._parts.values()}
        crcs: dict[int, int | None] = dict.fromkeys(self._parts)
        if self._check is None:
            if len(digests) != 1 or not digests <= {"crc32c", "crc32"}:
                return False  # unverified: nothing would show a kept piece is still right
            crcs = {start: digest.value for start, (digest, _) in self._parts.items() if isinstance(digest.value, int)}
        info = self.wanted.info
        self.index.keep_pieces(
            self.path.with_name(self._partial),
            self.wanted.name,
            info.size,
            info.fingerprint,
            piece_size=self.piece_size,
            crcs=crcs,
            digest=BY_PARTS if self._check is not None else digests.pop(),
        )
        return True

"""The pull's folder on disk: one pull at a time, no write through a symbolic link, clear errors when it fails.

* **One pull at a time.** :meth:`Destination.lock` takes an exclusive ``flock`` on
:data:`~sdk.data._localpath.LOCK_NAME`
  in the folder for the whole pull (the index is read under it). A second pull into the same folder — another
  ``podtrain pull``, ``run.pull_data()`` on a rank sharing the folder, the supervisor's pull — logs
  ``pull.waiting`` (naming the holder's pid) and waits up to ``lock_wait`` (:data:`LOCK_WAIT`, an hour), then
  finds what the first one fetched and fetches nothing again; past the wait it fails with
  :class:`~sdk.errors.DestinationBusyError`. The kernel drops the lock when its holder dies, so a crashed pull
  never blocks the next. (``flock`` locks are per open file, so two threads of one process exclude each other
  too; on NFS it is emulated with ``fcntl`` byte-range locks by Linux.)
* **No symlink followed below the folder.** The folder itself (``PODTRAIN_DATA_DIR``) may be a link — it is the
  user's. Below it every file is reached from a descriptor of the folder one component at a time
  (``openat(O_DIRECTORY | O_NOFOLLOW)``), created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` and renamed into place
  relative to the same descriptor. A link planted where a folder must be is refused
  (:class:`~sdk.errors.DataPathError`, naming it); one swapped in while the file is written changes nothing,
  since the descriptor still names the folder that was opened; a link where a file goes is replaced by the file,
  never written through, and never adopted. The names themselves come from :func:`sdk.data._localpath.local_name`.
* **Disk errors.** ``ENOSPC``, ``EDQUOT`` and ``EFBIG`` become one :class:`~sdk.errors.LocalDiskError` line: how
  much the pull needed, how much is free, which folder (:meth:`Destination.failure`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType

from sdk.data._localpath import LOCK_NAME, NAME_MAX, PATH_MAX, local_name, partial_name
from sdk.errors import DataPathError, DestinationBusyError, LocalDiskError, PodtrainError
from sdk.log import get_logger

__all__ = ["DISK_ERRNOS", "LOCK_WAIT", "Destination", "size_text"]

log = get_logger("podtrain.pull")
LOCK_WAIT = 3600.0  # seconds a pull waits for another pull into the same folder
LOCK_POLL = 0.25  # seconds between tries while waiting
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_IN_THE_WAY = frozenset({errno.ENOTDIR, errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST, errno.ELOOP})
_REFUSED = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENAMETOOLONG})
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FIX = "PODTRAIN_DATA_DIR / --dest"


class Destination:
    """The folder a pull writes into, opened once (a descriptor all its files are reached from); a context
    manager that releases the lock and the descriptor."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(os.path.abspath(root))
        self._lock_fd = -1
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise DataPathError(
                f"cannot use {self.root} as the pull's folder: {exc.strerror or exc}: set {_FIX} to a folder "
                "podtrain can create and write"
            ) from exc
        self.name_max = _pathconf(self.fd, "PC_NAME_MAX", NAME_MAX)
        self.path_max = _pathconf(self.fd, "PC_PATH_MAX", PATH_MAX)
        self._root_text = str(self.root)
        self._room = self.path_max - len(os.fsencode(self._root_text)) - 1  # bytes left for a name under the root

    def __enter__(self) -> Destination:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Release the lock (if held) and the folder's descriptor."""
        if self._lock_fd >= 0:
            with contextlib.suppress(OSError):  # removed while still held (see lock())
                os.unlink(LOCK_NAME, dir_fd=self.fd)
            os.close(self._lock_fd)  # closing the last descriptor drops the flock
            self._lock_fd = -1
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- names ---------------------------------------------------------------------------------------------
    def name_of(self, key: str, url: str = "") -> str:
        """Where the object ``key`` lands, relative to the folder (:func:`sdk.data._localpath.local_name`, with this
        file system's limits); ``url`` names the object in the error."""
        return local_name(key, name_max=self.name_max, room=self._room, url=url, dest=self._root_text)

    # -- the lock ------------------------------------------------------------------------------------------
    def lock(
        self,
        *,
        wait: float = LOCK_WAIT,
        stopped: Callable[[], bool] = lambda: False,
        sleep: Callable[[float], object] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> bool:
        """Take the folder's lock, waiting up to ``wait`` seconds for another pull to finish; False when
        ``stopped()`` became true while waiting. Held until :meth:`close`, which removes the lock file.

        The holder removes the file as it lets go, so a lock taken on a file that is no longer the folder's (same
        device and inode) is let go and taken again on the current one."""
        started, holder = clock(), None
        while True:
            fd = self._open_lock()
            try:
                while not _try_lock(fd):
                    if holder is None:
                        holder = _holder(fd) or 0
                        log.warning(
                            "pull.waiting",
                            dest=self._root_text,
                            holder_pid=holder or None,
                            wait_s=wait,
                            reason=f"another pull{_pid(holder)} is writing to this folder; waiting for it to finish",
                        )
                    if stopped():
                        os.close(fd)
                        return False
                    left = started + wait - clock()
                    if left <= 0:
                        raise DestinationBusyError(
                            f"another pull{_pid(holder)} has been writing to {self.root} for over {wait:g} s: let it "
                            f"finish, or give this one its own {_FIX}"
                        )
                    sleep(min(LOCK_POLL, left))
                current = _is_current(fd, self.fd)
            except BaseException:
                os.close(fd)
                raise
            if current:
                break
            os.close(fd)  # the file its last holder removed: take the folder's current one
        if holder is not None:
            log.info("pull.lock_taken", dest=self._root_text, waited_s=round(clock() - started, 3))
        with contextlib.suppress(OSError):  # the holder's pid, for a waiter's message; a full disk is fine
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        return True

    def _open_lock(self) -> int:
        try:
            return os.open(LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=self.fd)
        except OSError as exc:
            exc.filename = LOCK_NAME
            self.explain(exc, LOCK_NAME, "")
            raise self.failure(exc, need=0, files=0) from exc

    # -- files ---------------------------------------------------------------------------------------------
    def folder_of(self, name: str, *, create: bool) -> tuple[int, str]:
        """A descriptor of the folder that holds ``name`` (the caller closes it) and ``name``'s last component.

        Each folder is opened from its parent's descriptor without following a link (created first when missing
        and ``create``). An error names, in ``filename``, the component that failed (relative to the folder)."""
        parts = name.split("/")
        fd = os.dup(self.fd)
        try:
            for index in range(len(parts) - 1):
                part = parts[index]
                try:
                    try:
                        child = os.open(part, _DIR, dir_fd=fd)
                    except FileNotFoundError:
                        if not create:
                            raise
                        with contextlib.suppress(FileExistsError):
                            os.mkdir(part, 0o777, dir_fd=fd)
                        child = os.open(part, _DIR, dir_fd=fd)
                except OSError as exc:
                    exc.filename = "/".join(parts[: index + 1])
                    if exc.errno == errno.ENOTDIR and _is_link(part, fd):
                        exc.errno = errno.ELOOP  # O_DIRECTORY | O_NOFOLLOW on a link says ENOTDIR: say what it is
                    raise
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd, parts[-1]

    def partial_of(self, leaf: str) -> str:
        """The name ``leaf`` is written under until it is whole (:func:`sdk.data._localpath.partial_name`); it is
        created
        with ``O_EXCL`` (a leftover of an interrupted pull removed first), so nothing there is written through."""
        return partial_name(leaf, name_max=self.name_max)

    def open_existing(self, name: str) -> int | None:
        """A read-only descriptor of the regular file at ``name`` reached without following any link, or None
        (missing, a link, not a regular file, unreadable)."""
        try:
            folder_fd, leaf = self.folder_of(name, create=False)
        except OSError:
            return None
        try:
            fd = os.open(leaf, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=folder_fd)
        except OSError:
            return None
        finally:
            os.close(folder_fd)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return None
        return fd

    # -- errors --------------------------------------------------------------------------------------------
    def explain(self, exc: OSError, name: str, url: str) -> None:
        """Raise the :class:`~sdk.errors.DataPathError` (or :class:`~sdk.errors.LocalDiskError`) that says why the
        object ``name`` could not land; return for the disk-full errors, which :meth:`failure` reports with the
        pull's sizes."""
        if isinstance(exc, PodtrainError) or exc.errno in DISK_ERRNOS:
            return
        where = str(exc.filename) if exc.filename else name
        what = f"object {url!r}" if url else repr(name)
        if exc.errno == errno.ELOOP:
            why = (
                f"{where!r} there is a symbolic link, and podtrain never writes through one below its folder: "
                "remove the link (or pull into another folder)"
            )
        elif exc.errno == errno.ENOTDIR:
            why = f"{where!r} there is a file where a folder must be: move it away, or pull into another folder"
        elif exc.errno in _IN_THE_WAY:
            why = f"{where!r} there is a folder where the file must go: move it away, or pull into another folder"
        elif exc.errno in _REFUSED:
            why = f"{where!r} cannot be written there ({exc.strerror}): check {_FIX} and its permissions"
        else:
            raise LocalDiskError(
                f"{what} could not be written in {self.root}: {where!r}: {exc.strerror or exc}; the files that "
                "were there before are unchanged"
            ) from exc
        raise DataPathError(f"{what} cannot land in {self.root}: {why}") from exc

    @contextlib.contextmanager
    def landing_errors(self) -> Iterator[_Load]:
        """Turn the local disk's errors raised inside into one-line podtrain errors (:meth:`failure`), with the
        sizes the body sets on the value it is given (``need``, ``files``)."""
        load = _Load()
        try:
            yield load
        except OSError as exc:
            if isinstance(exc, PodtrainError):
                raise
            raise self.failure(exc, need=load.need, files=load.files) from exc

    def failure(self, exc: OSError, *, need: int, files: int) -> PodtrainError:
        """The one-line error for ``exc``, an error of the local disk during the pull (``need`` bytes to fetch
        in ``files`` files): no space, quota, file-size limit, or anything else :meth:`explain` knows."""
        if exc.errno not in DISK_ERRNOS:
            try:
                self.explain(exc, str(exc.filename or self.root), "")
            except PodtrainError as error:
                return error
            return LocalDiskError(f"writing into {self.root} failed: {exc}")
        try:
            free = size_text(shutil.disk_usage(self.root).free)
        except OSError:
            free = "an unknown amount"
        file = f" writing {str(exc.filename)!r}" if exc.filename else ""
        needed = f"this pull needed {size_text(need)} for {files} file{'s' if files != 1 else ''}, " if files else ""
        unchanged = "the files that were there before are unchanged"
        if exc.errno == errno.EFBIG:
            return LocalDiskError(
                f"a file is too large for the volume of {self.root}{file} ({exc.strerror}: the file system or a "
                f"file-size limit such as `ulimit -f` refuses it): {needed}{unchanged}"
            )
        full = "disk quota exceeded" if exc.errno == errno.EDQUOT else "no space left"
        return LocalDiskError(
            f"{full} on the volume of {self.root}{file}: {needed}{free} free — free some space or give "
            f"{_FIX} a bigger volume; {unchanged}"
        )


class _Load:
    """What the pull is about to write, for the disk-full message."""

    need = 0
    files = 0


def size_text(nbytes: int) -> str:
    """``20.0 MiB``, ``1.50 GiB``: sizes as the pull's messages give them."""
    if nbytes >= 2**30:
        return f"{nbytes / 2**30:.2f} GiB"
    return f"{nbytes / 2**20:.1f} MiB"


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _holder(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).decode().strip() or 0) or None
    return None


def _pid(holder: int | None) -> str:
    return f" (pid {holder})" if holder else ""


def _is_current(fd: int, folder_fd: int) -> bool:
    """Whether ``fd`` is still the folder's lock file (not one its holder removed as it let go)."""
    try:
        named = os.stat(LOCK_NAME, dir_fd=folder_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return os.path.samestat(named, os.fstat(fd))


def _is_link(name: str, folder_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=folder_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _pathconf(fd: int, name: str, default: int) -> int:
    try:
        value = os.fpathconf(fd, name)
    except (OSError, ValueError):
        return default
    return value if value > 0 else default

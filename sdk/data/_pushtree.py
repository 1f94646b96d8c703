"""The files a push sends: found, and opened, without ever following a link out of the folder.

:func:`scan` walks the folder without following directory links. A regular file is sent under its own name. A
symlink is resolved once, at the scan:

* its target is a regular file inside the folder: sent under the link's name, as a copy of the target (object
  stores have no links; a ``last.ckpt -> step-100.ckpt`` link is still found under its name in the bucket);
* its target is outside the folder (absolute, ``../``, or through another link), missing, a directory, or not a
  regular file: skipped, and named with the reason in the push's summary. Directory links are never followed,
  inside the folder or not (no loops, no second copy of a subtree).

:func:`open_beneath` then opens each file from a descriptor of the folder, one path component at a time, with
``O_NOFOLLOW`` on every component (and ``O_NONBLOCK``, so a FIFO cannot hang the push), and accepts only a
regular file: a file or folder replaced by a link after the scan is refused (:class:`Replaced`), never followed,
so what is read is always a file inside the folder. The folder itself, and a single file named as the source,
are the user's choice and are followed.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Entry", "Replaced", "open_beneath", "scan"]

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | _CLOEXEC

OUTSIDE = "its target is outside the folder"
DANGLING = "dangling: its target does not exist (or loops)"
DIRECTORY = "a link to a directory (not followed)"
SPECIAL = "its target is not a regular file"
REPLACED = "replaced by a link or a special file after the scan (not followed)"


@dataclass(frozen=True, kw_only=True)
class Entry:
    """A file to send: its name under the URL, the path under the folder that holds its bytes, size, mtime."""

    rel: str
    source: str  # ``rel`` itself, or a link's target
    size: int
    mtime_ns: int


class Replaced(Exception):
    """The entry is no longer a regular file reachable without a link (swapped after the scan)."""


def scan(root: str, keep: Callable[[str], bool]) -> tuple[list[Entry], dict[str, str]]:
    """Every file to send under the real folder ``root`` (sorted by name), and the links skipped: name -> why.

    ``keep(name)`` says whether a file (or link) of that base name is sent at all (records stay local).
    """
    files: list[Entry] = []
    skipped: dict[str, str] = {}
    pending = [""]
    while pending:
        sub = pending.pop()
        try:
            listing = os.scandir(os.path.join(root, sub) if sub else root)
        except PermissionError:  # an unreadable folder is passed over, as Path.rglob does
            continue
        with listing as found:
            for item in found:
                rel = f"{sub}/{item.name}" if sub else item.name
                if item.is_symlink():
                    if keep(item.name):
                        link = _link(root, rel, item.path, keep)
                        if isinstance(link, Entry):
                            files.append(link)
                        else:
                            skipped[rel] = link
                elif item.is_dir(follow_symlinks=False):
                    pending.append(rel)
                elif item.is_file(follow_symlinks=False) and keep(item.name):
                    info = item.stat(follow_symlinks=False)
                    files.append(Entry(rel=rel, source=rel, size=info.st_size, mtime_ns=info.st_mtime_ns))
    files.sort(key=lambda e: e.rel)
    return files, dict(sorted(skipped.items()))


def _link(root: str, rel: str, path: str, keep: Callable[[str], bool]) -> Entry | str:
    """The link at ``path`` as a file to send (its target's bytes under its own name), or why it is skipped."""
    target = os.path.realpath(path)
    if os.path.commonpath([root, target]) != root:
        return OUTSIDE  # decided without looking at the target
    try:
        info = os.stat(target)
    except OSError:
        return DANGLING
    if stat.S_ISDIR(info.st_mode):
        return DIRECTORY
    if not stat.S_ISREG(info.st_mode) or not keep(os.path.basename(target)):
        return SPECIAL
    source = os.path.relpath(target, root).replace(os.sep, "/")
    return Entry(rel=rel, source=source, size=info.st_size, mtime_ns=info.st_mtime_ns)


def open_beneath(root_fd: int, rel: str) -> tuple[int, os.stat_result]:
    """Open ``rel`` (``/``-separated, under the folder open as ``root_fd``) following no link; the descriptor and
    its stat. Raises :class:`Replaced` when a component is now a link or the file is not a regular one, and
    ``FileNotFoundError`` when it is gone."""
    *folders, name = rel.split("/")
    at = root_fd
    try:
        for folder in folders:
            inner = _open(folder, _DIR_FLAGS, at)
            if at != root_fd:
                os.close(at)
            at = inner
        fd = _open(name, _FILE_FLAGS, at)
    finally:
        if at != root_fd:
            os.close(at)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise Replaced(rel)
    return fd, info


def _open(name: str, flags: int, at: int) -> int:
    try:
        return os.open(name, flags, dir_fd=at)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENXIO):  # a link, a link to a folder, a socket
            raise Replaced(name) from exc
        raise

"""Symbolic links in a local store are not the store's: listing skips them, deletion never goes through them.

podtrain never makes a link in a store, so a link found in one was put there by someone else — a step folder
linked to another run's checkpoint, a writer folder linked out of the volume. Following it would let retention
delete what the link points at (it did: the manifest of another run's checkpoint). So, on a local store
(:class:`sdk.stores._local.LocalBackend`):

* :func:`names` — a folder's listing leaves links out (logged once each as ``store.link_ignored``): a step
  folder that is a link is no checkpoint of this store — never loaded, listed, pruned or deleted;
* :func:`remove` — deletes relative to directory descriptors opened one component at a time with
  ``O_NOFOLLOW`` from the store's root, so neither a link below the root nor one swapped in meanwhile is ever
  followed: a link *as the thing deleted* is unlinked (its target untouched); a link, ``..`` or ``.`` *on the
  way* is refused (:class:`~sdk.errors.PermanentStorageError`). Folders go with ``shutil.rmtree`` relative to
  the parent's descriptor, which unlinks the links inside them without following them. The root itself may
  be a link: the user chose it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import threading

from sdk.errors import PermanentStorageError
from sdk.log import get_logger

__all__ = ["names", "remove"]

log = get_logger("podtrain.storage")
_reported: set[str] = set()
_reported_lock = threading.Lock()
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0)


def names(path: str) -> list[str]:
    """The names in the folder ``path``, links left out (and dot-names unless they are folders)."""
    found = []
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.is_symlink():
                    _report(entry.path)
                elif not entry.name.startswith(".") or entry.is_dir(follow_symlinks=False):
                    found.append(entry.name)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(found)


def remove(root: str, path: str, *, recursive: bool) -> None:
    """Delete ``path`` (under ``root``) without following any link below ``root``; missing is fine."""
    parts = _parts(root, path)
    if not parts:  # the root itself
        root = root.rstrip("/") or "/"
        parent, name = os.path.dirname(root), os.path.basename(root)
        parts, root = [name], parent
    try:
        fd = os.open(root, _DIR_FLAGS)
    except (FileNotFoundError, NotADirectoryError):
        return
    try:
        for i, part in enumerate(parts[:-1]):
            try:
                inner = os.open(part, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                return
            except OSError as exc:  # a link gives ELOOP or ENOTDIR (with O_DIRECTORY), as a file does
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                if _is_link(fd, part):
                    raise _refused(path, "/".join(parts[: i + 1]), "is a symbolic link") from None
                return  # a file where a folder would be: nothing under it to delete
            os.close(fd)
            fd = inner
        _remove_in(fd, parts[-1], path, recursive=recursive)
    finally:
        os.close(fd)


def _remove_in(fd: int, name: str, path: str, *, recursive: bool) -> None:
    try:
        mode = os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(mode):  # a file or a link: the name goes, a link's target stays
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=fd)
        return
    if not recursive:
        raise IsADirectoryError(errno.EISDIR, f"{path} is a folder: delete it with recursive=True")
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(name, dir_fd=fd)  # fd-based: refuses a link swapped in for ``name``, never follows inner ones


def _is_link(fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False


def _parts(root: str, path: str) -> list[str]:
    """``path``'s components below ``root``; refused when it is not under it or climbs with ``..``."""
    root = root.rstrip("/")
    if path.rstrip("/") == root:
        return []
    if not path.startswith(root + "/"):
        raise _refused(path, path, f"is not under the store's root {root}")
    parts = path[len(root) + 1 :].rstrip("/").split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise _refused(path, part, "climbs out of the store or is empty")
    return parts


def _refused(path: str, where: str, why: str) -> PermanentStorageError:
    return PermanentStorageError(
        f"refusing to delete {path}: {where!r} {why}; podtrain never deletes through a symbolic link or out of a "
        "local store's root (remove it by hand if it is yours)",
        url=path,
    )


def _report(path: str) -> None:
    with _reported_lock:
        if path in _reported:
            return
        _reported.add(path)
    log.warning(
        "store.link_ignored",
        path=path,
        target=os.path.realpath(path),
        why="a symbolic link in a local store is not the store's: never listed, loaded or deleted through",
    )

"""Object key → local path: the one place where a dataset key, which is untrusted input, becomes a file name.

A pull writes the object ``key`` (relative to the listed prefix) at ``<folder>/<key>``: the key itself, never
rewritten — nothing stripped, normalised or escaped, so what lands is what the store calls it, or nothing.
:func:`local_name` refuses, with the reason, every key that is not a plain relative path inside the folder:

* a ``..`` component (``prefix/../train.py`` would overwrite the code next to the data), a ``.`` or empty one
  (``a//b``, a trailing ``/``), an absolute key (``prefix//tmp/x``), an empty key, a NUL byte;
* a component longer than the file system's ``NAME_MAX`` (bytes, not characters), or a whole path over
  ``PATH_MAX``: it could not be created, or opened afterwards;
* podtrain's own names: the warm index :data:`INDEX_NAME` and the lock :data:`LOCK_NAME` at the top of the
  folder, and any component ending in :data:`PARTIAL_SUFFIX` (files being written).

:func:`find_clash` finds the keys that are each fine but cannot all land: one key that is also another's folder
(``a`` and ``a/b``), or one name listed twice (from two URLs). Both are pure string work, a few hundred
nanoseconds a key, so a warm pull of a million keys pays well under a second for them.

A refused key stops the whole pull before anything is written (:class:`~sdk.errors.UnsafeKeyError`, exit 2): a
dataset silently missing files is worse than a clear stop. The symlink side — no component followed through a
link while writing — is :mod:`sdk.data._destination`'s.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable

from sdk.errors import UnsafeKeyError

__all__ = [
    "INDEX_NAME",
    "LOCK_NAME",
    "NAME_MAX",
    "PARTIAL_SUFFIX",
    "PATH_MAX",
    "find_clash",
    "local_name",
    "partial_name",
    "refusal",
]

INDEX_NAME = ".podtrain-pull.jsonl"  # the warm index (sdk.data._warmcache), at the top of the folder
LOCK_NAME = ".podtrain-pull.lock"  # one pull at a time per folder (sdk.data._destination)
PARTIAL_SUFFIX = ".podtrain-partial"  # a file being written, renamed once whole and checked
NAME_MAX = 255  # bytes in one component, where the file system does not say (os.pathconf PC_NAME_MAX)
PATH_MAX = 4096  # bytes in a whole path (Linux)
_RESERVED = {INDEX_NAME: "the warm index's", LOCK_NAME: "the pull lock's"}
_ENCODING = os.fsencode  # the file system's encoding, as the kernel will see the name


def refusal(key: str, *, name_max: int = NAME_MAX, room: int = PATH_MAX) -> str:
    """Why ``key`` cannot be a path inside the folder, or ``""`` when it can. ``room``: the bytes a path relative
    to the folder may have (``PATH_MAX`` less the folder's own path)."""
    if not key:
        return "it is empty"
    if key[0] == "/":
        return "it is absolute (it starts with '/'), so it would land outside the folder"
    if "\x00" in key:
        return "it contains a NUL byte, which no file name can hold"
    if key in _RESERVED:
        return f"it is {_RESERVED[key]} own file name in the folder, which podtrain uses"
    # Only a key with "//", a trailing "/", a component starting with "." or the partial suffix needs a look at
    # each component: most keys are checked by these few substring searches alone.
    if "//" in key or key[-1] == "/" or key[0] == "." or "/." in key or PARTIAL_SUFFIX in key:
        for part in key.split("/"):
            why = _component(part)
            if why:
                return why
    try:
        size = len(key) if key.isascii() else len(_ENCODING(key))
    except UnicodeError:
        return "it cannot be encoded as a file name on this system"
    if size > name_max:  # only a long key can have a long component
        for name in _ENCODING(key).split(b"/"):
            if len(name) > name_max:
                shown = name.decode("utf-8", "replace")[:24] + "…"
                return f"its component {shown!r} is {len(name)} bytes, over the file system's limit of {name_max}"
    if size >= room:
        return f"its local path would be {size} bytes long, over the system's limit ({room} here)"
    return ""


def _component(part: str) -> str:
    if part == "..":
        return "it has a '..' component, which points out of the folder"
    if part == ".":
        return "it has a '.' component (podtrain never rewrites a key to drop it)"
    if not part:
        return "it has an empty component ('//' or a trailing '/')"
    if part.endswith(PARTIAL_SUFFIX):
        return f"a component ends in {PARTIAL_SUFFIX!r}, the suffix podtrain gives files while they land"
    return ""


def local_name(
    key: str,
    *,
    name_max: int = NAME_MAX,
    path_max: int = PATH_MAX,
    room: int | None = None,
    url: str = "",
    dest: str = "",
) -> str:
    """The path, relative to the pull's folder ``dest``, where the object ``key`` lands: ``key`` itself.

    Raises :class:`~sdk.errors.UnsafeKeyError` naming the object (``url``, else the key), the folder and why,
    for every key :func:`refusal` gives a reason for (the whole path, ``dest/key``, must stay under
    ``path_max``; ``room``, when given, is that limit less ``dest`` already)."""
    if room is None:
        room = path_max - len(os.fsencode(dest)) - 1 if dest else path_max
    why = refusal(key, name_max=name_max, room=room)
    if why:
        raise UnsafeKeyError(refused_message(key, why, url=url, dest=dest), key=key)
    return key


def refused_message(key: str, why: str, *, url: str = "", dest: str = "") -> str:
    """One line: the object, why it cannot land, and the fix. Keys are quoted (``repr``), so a hostile key
    cannot forge a second line of a log."""
    what = f"object {url!r} (key {key!r})" if url else f"object key {key!r}"
    where = f" into {dest}" if dest else ""
    return (
        f"{what} cannot be pulled{where}: {why}; podtrain never writes outside its folder nor rewrites a key — "
        "rename the object, or leave it out with --exclude / PODTRAIN_DATA_EXCLUDE"
    )


def partial_name(leaf: str, *, name_max: int = NAME_MAX) -> str:
    """The name a file is written under, next to ``leaf``, until it is whole: ``leaf`` + :data:`PARTIAL_SUFFIX`,
    or — where that would pass ``name_max`` — a name derived from a hash of ``leaf`` (never shared by two)."""
    name = leaf + PARTIAL_SUFFIX
    if len(name) * 4 <= name_max or len(os.fsencode(name)) <= name_max:
        return name
    return "." + hashlib.sha256(os.fsencode(leaf)).hexdigest()[:40] + PARTIAL_SUFFIX


def find_clash(names: Iterable[str]) -> tuple[str, str] | None:
    """Two names that cannot both land, or None: ``(a, a)`` when ``a`` is listed twice, ``(a, a/b)`` when ``a``
    would have to be a file and a folder. One pass, a set look-up per ``/`` of each name."""
    seen: set[str] = set()
    folders: dict[str, str] = {}  # folder → a name under it
    for name in names:
        if name in seen:
            return name, name
        if name in folders:
            return name, folders[name]
        seen.add(name)
        slash = name.find("/")
        while slash >= 0:
            folder = name[:slash]
            if folder in seen:
                return folder, name
            folders.setdefault(folder, name)
            slash = name.find("/", slash + 1)
    return None

"""Which module serves which URL scheme, imported only when a URL needs it.

A store is one module with ``connect(url, *, timeout) -> (backend, root path)`` whose backend meets
:class:`sdk.stores.protocol.Backend`, and one line in :data:`STORES` (with, when it needs packages that are not
podtrain's own dependencies, one line in :data:`PACKAGES`, so a missing one is named before any I/O). Modules are
imported by name with :mod:`importlib`, so this module imports none of them: a pull from S3 never imports fsspec
(~35-60 ms) nor gcsfs, and no store module imports this one back.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any

from sdk.errors import BackendMissingError
from sdk.stores.protocol import Backend

__all__ = ["FALLBACK", "PACKAGES", "STORES", "connect", "require_backend", "split_url"]

# scheme -> "module:factory". "local" is read as "file" by split_url.
STORES = {
    "file": "sdk.stores._local:connect",
    "s3": "sdk.stores._s3:connect",
    "s3a": "sdk.stores._s3:connect",
    "gs": "sdk.stores._gcs:connect",
    "gcs": "sdk.stores._gcs:connect",
}
FALLBACK = "sdk.stores._fsspec:connect"  # any other scheme fsspec knows and can open from the URL alone

# scheme -> (the packages its module needs, found without importing them; the pip extra that brings them)
PACKAGES = {
    "s3": (("botocore",), "podtrain[s3]' (boto3)"),
    "s3a": (("botocore",), "podtrain[s3]' (boto3)"),
    "gs": (("gcsfs",), "podtrain[gcs]' (gcsfs)"),
    "gcs": (("gcsfs",), "podtrain[gcs]' (gcsfs)"),
}
_BUCKETED = ("s3", "s3a", "gs", "gcs")


def split_url(url: str) -> tuple[str, str]:
    """``(protocol, path)`` of ``url``; a plain path is ``file`` with an absolute path."""
    if "://" not in url:
        return "file", str(Path(url).expanduser().absolute())
    protocol, _, rest = url.partition("://")
    protocol = protocol.lower()
    if protocol in ("file", "local"):
        return "file", str(Path(rest).absolute())
    return protocol, rest.rstrip("/")


def require_backend(url: str, variable: str = "") -> None:
    """Raise :class:`BackendMissingError` when ``url``'s scheme is unknown, it names no bucket (``s3://``,
    ``gs:///x``), or its package is not installed."""
    protocol, path = split_url(url)
    where = f"{variable}={url!r}" if variable else repr(url)
    if protocol in _BUCKETED and not path.partition("/")[0]:
        raise BackendMissingError(f"{where} names no bucket — use {protocol}://BUCKET/PREFIX")
    if protocol in PACKAGES:  # found without importing them: botocore and gcsfs take ~0.1-0.5 s to import
        needed, extra = PACKAGES[protocol]
        missing = [name for name in needed if importlib.util.find_spec(name) is None]
        if missing:
            raise BackendMissingError(
                f"{where}: the {protocol}:// backend is not installed — pip install '{extra} "
                f"(missing: {', '.join(missing)})"
            )
        return
    if protocol in STORES:
        return
    import fsspec

    try:
        opened_by_url = not _required_arguments(fsspec.get_filesystem_class(protocol))
    except ImportError as exc:
        hint = f"install the fsspec backend for {protocol}://"
        raise BackendMissingError(f"{where}: the {protocol}:// backend is not installed — {hint} ({exc})") from None
    except ValueError:
        opened_by_url = False
    if not opened_by_url:  # ftp://, sftp://, …: the file system needs a host it is never given here
        raise BackendMissingError(
            f"{where}: unknown URL scheme {protocol!r} — use s3://BUCKET/PREFIX, gs://BUCKET/PREFIX, file:///PATH, "
            "a local path, or an fsspec scheme that needs no host"
        )


def _required_arguments(cls: Any) -> list[str]:
    """The arguments ``cls()`` cannot do without (an FTP file system's ``host``): such a scheme is never usable,
    as the fsspec store makes the file system from the scheme alone."""
    import inspect  # here: ~10 ms, and only for schemes podtrain has no module of its own for

    try:
        parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]  # fsspec's metaclass hides it
    except (TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in parameters if p.kind in kinds and p.default is inspect.Parameter.empty]


def connect(url: str, *, timeout: float) -> tuple[Backend, str]:
    """A backend for ``url`` and the root path inside it, from the module its scheme names."""
    require_backend(url)
    module, _, factory = STORES.get(split_url(url)[0], FALLBACK).partition(":")
    backend, root = getattr(importlib.import_module(module), factory)(url, timeout=timeout)
    return backend, str(root)

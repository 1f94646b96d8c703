"""One error tree for podtrain.

Every error says two things a caller needs to decide what to do next:

* ``transient`` — retrying the same operation may succeed (a 503, a reset connection, a timeout);
  permanent errors will fail the same way again, so they fail fast.
* ``fault`` — ``"user"`` when the user must change something (a bad variable, a missing bucket, wrong
  credentials, a corrupt checkpoint they pointed at), ``"platform"`` when the environment failed them
  (storage down, a node problem). :func:`exit_code` maps them onto the exit codes of :mod:`sdk.outcomes`.

Messages name the thing that failed (a URL, a variable) and what to do about it.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from sdk.outcomes import EXIT_CONFIG, EXIT_UNAVAILABLE

__all__ = [
    "BackendMissingError",
    "CheckpointError",
    "CommitConflictError",
    "ConfigError",
    "DataPathError",
    "DestinationBusyError",
    "InsufficientSpaceError",
    "InvalidCheckpointError",
    "LocalDiskError",
    "MalformedDocumentError",
    "NoCheckpointError",
    "PartlyLoadedError",
    "PodtrainError",
    "StaleAttemptError",
    "StateMismatchError",
    "StorageError",
    "StorageNotFoundError",
    "StoragePermissionError",
    "StorageTrustError",
    "StorageEndpointError",
    "ThrottledStorageError",
    "TransientStorageError",
    "PermanentStorageError",
    "UnsafeCheckpointError",
    "UnsafeKeyError",
    "UnverifiedObjectError",
    "exit_code",
]

Fault = Literal["user", "platform"]


class PodtrainError(Exception):
    """Base of every error podtrain raises on purpose.

    Every one survives pickling with its message and attributes (``reason``, ``url``…), whatever its constructor
    takes: torch.distributed.checkpoint sends a rank's exception to the others that way, and the ranks must still
    tell damage (skip to the previous checkpoint) from a mismatch (stop).
    """

    transient: ClassVar[bool] = False
    fault: ClassVar[Fault] = "platform"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuilt, (type(self), self.args, dict(self.__dict__)))


def _rebuilt(cls: type[PodtrainError], args: tuple[Any, ...], attributes: dict[str, Any]) -> PodtrainError:
    """An error as it was pickled, built without calling its constructor (whose arguments vary by class)."""
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    error.__dict__.update(attributes)
    return error


class ConfigError(PodtrainError, ValueError):
    """A setting is missing, malformed or out of range; the message names the variable and the fix."""

    fault: ClassVar[Fault] = "user"


class BackendMissingError(ConfigError):
    """A URL's scheme is unknown or unusable (``ftp://``: it needs a host), the URL names no bucket (``s3://``),
    or its fsspec backend is not installed; the message names the fix (the URL's form, or the package). Exit 2
    in every command, being a :class:`ConfigError`."""


class StorageError(PodtrainError):
    """An object-store operation failed. ``url`` is the location involved."""

    def __init__(self, message: str, *, url: str = "") -> None:
        super().__init__(message)
        self.url = url


class TransientStorageError(StorageError):
    """The store failed in a way that may pass: throttling, 5xx, a reset connection, a timeout."""

    transient = True
    fault: ClassVar[Fault] = "platform"


class ThrottledStorageError(TransientStorageError):
    """The store asked us to slow down (S3 ``SlowDown``, HTTP 429, GCS ``rateLimitExceeded``): retried with fewer
    requests in flight and longer waits (:mod:`sdk.stores._throttle`), within a time budget; past it, exit 69 as any
    storage outage (retry later)."""


class PermanentStorageError(StorageError):
    """The store refused in a way that will not pass by retrying."""

    fault: ClassVar[Fault] = "user"


class StorageNotFoundError(PermanentStorageError, FileNotFoundError):
    """A bucket or an object that must exist does not."""


class StoragePermissionError(PermanentStorageError, PermissionError):
    """Access denied or bad credentials."""


class StorageTrustError(PermanentStorageError):
    """The endpoint's TLS certificate is not signed by a CA this process trusts (a private CA not configured)."""


class StorageEndpointError(PermanentStorageError):
    """The endpoint's host name does not exist (DNS says so: a misspelt ``AWS_ENDPOINT_URL`` or URL)."""


class UnverifiedObjectError(PermanentStorageError):
    """An object the store keeps no checksum for, pulled with checksums required (``--require-checksums``,
    ``PODTRAIN_REQUIRE_CHECKSUMS``); nothing of it was put in place."""


class InsufficientSpaceError(PodtrainError):
    """The target volume cannot hold what is to be downloaded; the message names the sizes and the path."""

    fault: ClassVar[Fault] = "user"


class DataPathError(PodtrainError):
    """An object cannot land in the pull's folder: something there is in the way (a symbolic link, which is never
    followed below the folder; a file where a folder must be, or the reverse) or the folder cannot be written.
    The message names the object, the local path and the fix."""

    fault: ClassVar[Fault] = "user"


class UnsafeKeyError(DataPathError):
    """An object key cannot be a file in the pull's folder: a ``..``, ``.``, empty or absolute component, a name
    longer than the file system allows, podtrain's own file names, a key that is also a prefix, the same name
    twice. Refused (never rewritten) before anything is written; ``key`` is the key."""

    def __init__(self, message: str, *, key: str = "") -> None:
        super().__init__(message)
        self.key = key


class DestinationBusyError(PodtrainError):
    """Another pull held the folder's lock for longer than this pull would wait."""

    fault: ClassVar[Fault] = "platform"


class LocalDiskError(PodtrainError):
    """The local volume refused the pulled bytes (no space, quota, a file-size limit, an I/O error); no file was
    put in place and the files there before are intact. The message says how much was needed and is free, where."""

    fault: ClassVar[Fault] = "platform"


class MalformedDocumentError(PodtrainError, ValueError):
    """A JSON document read from a store (a manifest, a claim, a record, a safetensors header) is over its size
    or nesting bound, or is not UTF-8 JSON: damaged or crafted. Permanent (the same bytes fail the same way) and
    the user's to fix (repair or remove the object at ``what``); a ``ValueError``, so readers that skip what they
    cannot interpret skip it too. A damaged checkpoint found this way is skipped for the previous one, never fatal.
    """

    fault: ClassVar[Fault] = "user"

    def __init__(self, what: str, reason: str) -> None:
        super().__init__(f"{what} is not a readable JSON document: {reason}")
        self.what = what
        self.reason = reason


class CheckpointError(PodtrainError):
    """Base of checkpoint errors."""

    fault: ClassVar[Fault] = "user"


class InvalidCheckpointError(CheckpointError):
    """A checkpoint failed verification; ``reason`` says which check."""

    def __init__(self, location: str, reason: str) -> None:
        super().__init__(f"checkpoint {location} is invalid: {reason}")
        self.location = location
        self.reason = reason


class UnsafeCheckpointError(InvalidCheckpointError):
    """A checkpoint file would need arbitrary code (a pickle global outside the allow-list) to load."""


class StateMismatchError(CheckpointError):
    """The state does not fit the checkpoint, or cannot be saved as given: a state name, an object's type or shape,
    a model an optimizer's parameters are not in, an entry that cannot be resumed on this number of ranks. Not
    damage (an older checkpoint would not fit either, so there is no fallback) and the user's to fix: exit 2."""


class PartlyLoadedError(CheckpointError):
    """A checkpoint was found damaged after part of it had been loaded into the state (a file changed since it was
    checked, or its bytes kept arriving damaged), and no older checkpoint loaded over it: the state is neither the
    checkpoint nor the one the run built, so the run must start again — exit 69, whose retry checks every file
    before it loads anything."""

    fault: ClassVar[Fault] = "platform"


class NoCheckpointError(CheckpointError):
    """No valid checkpoint exists where one is required."""


class CommitConflictError(CheckpointError):
    """Another writer already committed this step (its manifest exists); ours was not written."""

    transient = False
    fault: ClassVar[Fault] = "platform"


class StaleAttemptError(CheckpointError):
    """A newer attempt of this run owns the checkpoint location; this (older) attempt must not write."""

    fault: ClassVar[Fault] = "platform"


def exit_code(error: BaseException) -> int | None:
    """The exit code a run that died of ``error`` reports, or None for an ordinary failure (1).

    Storage that stayed down through the retries, or kept throttling past the throttling budget, or a checkpoint
    that changed while it was loaded (:class:`PartlyLoadedError`) → 69 (retry later); a setting to fix — a bad
    variable, a missing bucket, denied credentials, an untrusted TLS certificate, an object with no checksum when
    checksums are required, a state that does not fit its checkpoint — → 2 (never retry: it would fail the same
    way).
    """
    if isinstance(error, TransientStorageError | PartlyLoadedError):
        return EXIT_UNAVAILABLE
    if isinstance(
        error,
        ConfigError
        | StorageNotFoundError
        | StoragePermissionError
        | StorageTrustError
        | StorageEndpointError
        | InsufficientSpaceError
        | DataPathError
        | UnverifiedObjectError
        | StateMismatchError,
    ):
        return EXIT_CONFIG
    return None

"""AWS Signature Version 4 for the S3 requests :mod:`sdk.stores._s3http` makes, with unsigned payloads.

botocore's ``S3SigV4Auth`` produces the same headers — a unit test holds the two equal over GETs, listings,
PUTs, multipart requests, session tokens and odd keys — but importing botocore costs ~65 ms of every
``podtrain`` command's start (measured with ``-X importtime``), and keys given as environment variables (a pod's
Secret) need nothing else from it. Credentials that must be fetched or refreshed (IRSA, instance profiles,
SSO, config files) still come from botocore's credential chain; only the arithmetic is here.

Payloads are not signed (``UNSIGNED-PAYLOAD``): every body podtrain sends carries its CRC32C, which S3 checks,
and hashing each body with SHA-256 to sign it would cost ~0.75 CPU-s per GiB.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import hmac
from collections.abc import Mapping
from urllib.parse import urlsplit

__all__ = ["UNSIGNED_PAYLOAD", "Keys", "host", "sign"]

UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
_UNSIGNED_HEADERS = frozenset(("expect", "transfer-encoding", "user-agent", "x-amzn-trace-id"))  # as botocore
_DEFAULT_PORTS = {"http": 80, "https": 443}


class Keys:
    """One set of AWS credentials (``token``: the session token of temporary credentials); immutable, and its
    ``repr`` never shows the secret or the token.

    Written out rather than a dataclass: importing :mod:`dataclasses` costs ~15 ms, and this module is imported by
    :mod:`sdk.stores._s3address`, which is kept to the standard library's light modules.
    """

    __slots__ = ("access_key", "secret_key", "token")
    access_key: str
    secret_key: str
    token: str | None

    def __init__(self, *, access_key: str, secret_key: str, token: str | None = None) -> None:
        for name, value in (("access_key", access_key), ("secret_key", secret_key), ("token", token)):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"Keys are immutable: cannot set {name}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Keys):
            return NotImplemented
        return (self.access_key, self.secret_key, self.token) == (other.access_key, other.secret_key, other.token)

    def __hash__(self) -> int:
        return hash((self.access_key, self.secret_key, self.token))

    def __repr__(self) -> str:
        return f"Keys(access_key={self.access_key!r})"


def sign(
    method: str,
    url: str,
    headers: Mapping[str, str],
    keys: Keys,
    region: str,
    *,
    now: datetime.datetime | None = None,
    service: str = "s3",
) -> dict[str, str]:
    """``headers`` plus ``X-Amz-Date``, ``X-Amz-Content-SHA256``, ``X-Amz-Security-Token`` (with a token) and
    ``Authorization`` for the request ``method url``. The URL's path and query must already be percent-encoded
    as they will be sent (S3 paths are signed as they are, not normalised)."""
    moment = (now or datetime.datetime.now(datetime.timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
    out = {k: v for k, v in headers.items() if k.lower() not in ("authorization", "x-amz-date")}
    out["X-Amz-Date"] = moment
    out["X-Amz-Content-SHA256"] = UNSIGNED_PAYLOAD
    if keys.token:
        out["X-Amz-Security-Token"] = keys.token
    parts = urlsplit(url)
    signed = {k.lower(): " ".join(v.split()) for k, v in out.items() if k.lower() not in _UNSIGNED_HEADERS}
    signed.setdefault("host", host(url))
    names = sorted(signed)
    canonical = "\n".join(
        (
            method.upper(),
            parts.path or "/",
            _canonical_query(parts.query),
            "".join(f"{n}:{signed[n]}\n" for n in names),
            ";".join(names),
            UNSIGNED_PAYLOAD,
        )
    )
    scope = f"{moment[:8]}/{region}/{service}/aws4_request"
    to_sign = f"AWS4-HMAC-SHA256\n{moment}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
    key = _signing_key(keys.secret_key, moment[:8], region, service)
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    out["Authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={keys.access_key}/{scope}, SignedHeaders={';'.join(names)}, Signature={signature}"
    )
    return out


def _canonical_query(query: str) -> str:
    """The query's ``key=value`` pairs sorted (already encoded; a bare ``key`` is ``key=``)."""
    if not query:
        return ""
    pairs = sorted(pair.partition("=")[::2] for pair in query.split("&"))
    return "&".join(f"{k}={v}" for k, v in pairs)


def host(url: str) -> str:
    """The Host header for ``url``, as botocore signs it: lower-case, the port only when not the scheme's default."""
    parts = urlsplit(url)
    name = parts.hostname or ""
    name = f"[{name}]" if ":" in name else name
    return name if parts.port is None or parts.port == _DEFAULT_PORTS.get(parts.scheme) else f"{name}:{parts.port}"


@functools.lru_cache(maxsize=16)
def _signing_key(secret: str, day: str, region: str, service: str) -> bytes:
    key = f"AWS4{secret}".encode()
    for part in (day, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key

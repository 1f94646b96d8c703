"""Where an S3 request goes and which keys sign it, decided from the environment, botocore only where needed.

:func:`resolve` answers for :mod:`sdk.stores._s3http`: a custom endpoint (``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL``: MinIO, moto, … with path-style addresses) or AWS's regional endpoints (virtual-hosted
addresses), the default region, and the keys. Keys and a region in the environment and no AWS config file (a pod
given a Secret as variables, or a test server) need no botocore session, whose import and set-up cost
~0.15-0.4 s of every ``podtrain pull``; anything else asks ``session()`` for botocore's credential chain and
configuration. It returns None — and the caller uses botocore — for what podtrain's own requests do not do:
proxies, FIPS or dual-stack endpoints, transfer acceleration, a config file's S3 settings or endpoint, or no
region at all.

This module is apart from :mod:`sdk.stores._s3http` because it imports only the standard library's light modules (no
``http.client``, ``ssl`` or XML parser: ~60 ms together), and botocore only through ``session()``: whether botocore is
needed at all is decided here, before anything heavy is imported.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

from sdk.stores import _sigv4 as sigv4

if TYPE_CHECKING:
    import ssl

__all__ = ["Address", "list_query", "resolve"]

_UNSUPPORTED_ENV = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "AWS_USE_FIPS_ENDPOINT")
_UNSUPPORTED_CONFIG = ("s3", "endpoint_url", "use_fips_endpoint", "use_dualstack_endpoint", "services")


class Address:
    """An S3 service and the keys for it: the URL of each request, its signed headers, the TLS context."""

    def __init__(
        self, keys: Callable[[], sigv4.Keys], *, endpoint: str | None, region: str, ca_bundle: str | None = None
    ) -> None:
        self.endpoint, self.region, self.ca_bundle = endpoint, region, ca_bundle
        self._keys = keys
        self._tls: ssl.SSLContext | None = None

    def url(self, bucket: str, key: str, query: Mapping[str, str] | None, region: str) -> str:
        """The request's URL, percent-encoded as it is sent and signed (``region``: the bucket's)."""
        path = quote(key, safe="/~")
        if self.endpoint:
            base = f"{self.endpoint.rstrip('/')}/{bucket}/{path}"
        elif "." in bucket or bucket.lower() != bucket:  # not a valid host name: path-style
            base = f"https://s3.{region}.amazonaws.com/{bucket}/{path}"
        else:
            base = f"https://{bucket}.s3.{region}.amazonaws.com/{path}"
        return base + ("?" + urlencode(query, quote_via=quote) if query else "")

    def sign(self, method: str, url: str, headers: Mapping[str, str], region: str) -> dict[str, str]:
        """``headers`` with ``Host`` (sent as signed, not left to the HTTP library) and the SigV4 headers."""
        return sigv4.sign(method, url, {**headers, "Host": sigv4.host(url)}, self._keys(), region)

    def tls_context(self) -> ssl.SSLContext:
        """The context for HTTPS connections (made once): ``AWS_CA_BUNDLE`` or the config's bundle, else the
        one botocore would use (certifi's, installed with it), else the system's."""
        if self._tls is None:
            import ssl  # only for HTTPS, and only when the first connection is made

            self._tls = ssl.create_default_context(cafile=self.ca_bundle or _ca_file())
        return self._tls


def list_query(prefix: str, token: str | None = None, delimiter: str = "") -> dict[str, str]:
    """The query of a ListObjectsV2 page (keys URL-encoded: S3's XML cannot carry every character a key can);
    ``delimiter``: one level only, deeper keys folded into common prefixes."""
    query = {"list-type": "2", "prefix": prefix, "encoding-type": "url"}
    if delimiter:
        query["delimiter"] = delimiter
    if token:
        query["continuation-token"] = token
    return query


def resolve(*, session: Callable[[], Any]) -> Address | None:
    """The environment's endpoint, region and keys, or None where only botocore will do (see the module)."""
    if any(os.environ.get(name) for name in _UNSUPPORTED_ENV):
        return None
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    bundle = os.environ.get("AWS_CA_BUNDLE")
    static = _static_keys()
    if static is not None:
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if not endpoint and not region:
            return None
        return Address(lambda: static, endpoint=endpoint, region=region or "us-east-1", ca_bundle=bundle)
    botocore_session = session()
    if any(key in botocore_session.get_scoped_config() for key in _UNSUPPORTED_CONFIG):
        return None
    region = botocore_session.get_config_variable("region")
    if not endpoint and not region:
        return None
    bundle = bundle or botocore_session.get_config_variable("ca_bundle")
    credentials = botocore_session.get_credentials()
    if credentials is None:  # botocore's own client then fails with its usual "Unable to locate credentials"
        return None

    def keys() -> sigv4.Keys:  # refreshed by botocore when they are temporary
        frozen = credentials.get_frozen_credentials()
        return sigv4.Keys(access_key=frozen.access_key, secret_key=frozen.secret_key, token=frozen.token)

    return Address(keys, endpoint=endpoint, region=region or "us-east-1", ca_bundle=bundle)


def _static_keys() -> sigv4.Keys | None:
    """The keys in ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` when nothing else could change what botocore
    would resolve (no profile, no config file or an empty one); else None."""
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    config_file = os.path.expanduser(os.environ.get("AWS_CONFIG_FILE") or "~/.aws/config")
    if not key or not secret or os.environ.get("AWS_PROFILE") or _has_content(config_file):
        return None
    return sigv4.Keys(access_key=key, secret_key=secret, token=os.environ.get("AWS_SESSION_TOKEN") or None)


def _has_content(path: str) -> bool:
    """Whether a config file exists and says anything (an empty one, or /dev/null, changes nothing)."""
    if path == os.devnull or not os.path.exists(path):
        return False
    try:
        return not os.path.isfile(path) or os.path.getsize(path) > 0
    except OSError:
        return True  # there, but unreadable here: let botocore decide


def _ca_file() -> str | None:
    """The CA bundle botocore would use: certifi's where it is installed (it comes with botocore), else the
    system's (None)."""
    try:
        import certifi
    except ImportError:
        return None
    return str(certifi.where())

"""Run ids, label values and URIs: what the pods are named by, made valid wherever they go."""

from __future__ import annotations

import hashlib
import re

__all__ = ["LABEL_VALUE", "RUN_ID", "dns_label", "join_uri", "label_value", "run_id"]

# Kubernetes label values: empty, or <= 63 characters, alphanumeric at both ends, [-_.] and alphanumerics between.
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
# PODTRAIN_RUN_ID as podtrain's config accepts it.
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _squeeze(text: str, allowed: str, limit: int) -> str:
    """``text`` with every run of other characters turned into one '-', alphanumeric at both ends, and when
    that changed it or it is over ``limit``: cut, with 8 hex digits of its SHA-256 so distinct inputs stay
    distinct."""
    cleaned = re.sub(f"[^{allowed}]+", "-", text).strip("-_.")
    if cleaned == text and len(cleaned) <= limit:
        return cleaned
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    head = cleaned[: limit - len(digest) - 1].rstrip("-_.")
    return f"{head}-{digest}" if head else digest


def label_value(text: str) -> str:
    """A valid Kubernetes label value standing for ``text`` (unchanged when it already is one)."""
    return _squeeze(str(text), "A-Za-z0-9_.-", 63)


def dns_label(*parts: str, limit: int = 40) -> str:
    """A DNS-1035 label standing for ``parts`` joined by '-' (lowercase alphanumerics and '-', a letter first, at
    most ``limit`` characters): a name for an object whose pods' host names are made from it (a JobSet's
    ``<name>-node-0-<index>`` must stay within 63 characters, the Job controller's suffix included)."""
    text = "-".join(str(p) for p in parts if p).lower()
    name = _squeeze(text, "a-z0-9-", limit - 2).strip("_.")
    return name if name[:1].isalpha() else f"p-{name}"


def run_id(*parts: str) -> str:
    """The podtrain run id of ``parts`` (DAG id, DAG run id, trial): the same parts give the same id, so a retry
    resumes the same run; valid for ``PODTRAIN_RUN_ID`` and as a path segment."""
    text = ".".join(str(p) for p in parts if p)
    return _squeeze(text, "A-Za-z0-9_.-", 128)


def join_uri(base: str, *parts: str) -> str:
    """``base`` and ``parts`` joined with single slashes: ``join_uri("s3://b/x/", "runs", "r1")``."""
    out = base.rstrip("/")
    for part in parts:
        if part:
            out += "/" + str(part).strip("/")
    return out

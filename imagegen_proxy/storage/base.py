"""The contract every image store keeps, and how objects are named."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Protocol
from urllib.parse import quote


class StorageError(Exception):
    """The store could not do it (unreachable, refused, misconfigured); the message names
    no secret."""


class ImageWriter(Protocol):
    """One object being written: raw bytes in, in any chunk size, memory bounded by one
    part; visible only once committed."""

    async def write(self, data: bytes) -> None: ...

    async def commit(self) -> None: ...

    async def abort(self) -> None:
        """Leave nothing visible; idempotent, and safe after a failed write or commit."""
        ...


class ImageStore(Protocol):
    """Where images are kept."""

    async def open(self, key: str, content_type: str) -> ImageWriter: ...

    async def url(self, key: str, ttl: float) -> str:
        """A GET URL of the object, unguessable, valid `ttl` seconds."""
        ...

    def read(self, key: str) -> AsyncIterator[bytes]:
        """The object's bytes in chunks (`StorageError` if it is not there)."""
        ...

    async def delete(self, key: str) -> None: ...

    async def sweep(self, older_than: datetime) -> int:
        """Delete the objects written before `older_than`; how many."""
        ...

    async def aclose(self) -> None: ...


# A component's most bytes: a file name may have 255, and the name adds `-{n}.{ext}`.
MAX_COMPONENT = 200


def _safe(text: str) -> str:
    """`text` as one key component: letters, digits, `.`, `_` and `-` as they are, the
    rest percent-escaped; never empty, never `.` or `..`; past `MAX_COMPONENT` bytes (a
    long project name, escaped), cut and told apart by a digest of the whole."""
    escaped = quote(text, safe="")  # `quote` keeps [A-Za-z0-9_.~-]: `~` is escaped below
    escaped = escaped.replace("~", "%7E")
    if escaped in ("", ".", ".."):
        escaped = escaped.replace(".", "%2E") or "%00"
    if len(escaped) > MAX_COMPONENT:
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        head = escaped[: MAX_COMPONENT - len(digest) - 1]
        cut = head.rfind("%", len(head) - 2)
        escaped = (head[:cut] if cut >= 0 else head) + "-" + digest
    return escaped


def object_key(
    project: str | None, request_id: str, index: int, extension: str, when: datetime
) -> str:
    """`{project}/{YYYY-MM-DD}/{request_id}-{index}.{extension}` (`_` without a project),
    every component escaped: no client-supplied text reaches a path or key as it is."""
    day = when.strftime("%Y-%m-%d")
    name = f"{_safe(request_id)}-{index}.{_safe(extension)}"
    return f"{_safe(project) if project is not None else '_'}/{day}/{name}"


def valid_key(key: str) -> bool:
    """Whether `key` has the shape `object_key` makes (a key from a URL is checked so)."""
    parts = key.split("/")
    if len(parts) != 3 or any(part in ("", ".", "..") for part in parts):
        return False
    allowed = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-%")
    return all(set(part) <= allowed for part in parts)

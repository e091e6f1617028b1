"""The contract every kind of upstream keeps."""

from __future__ import annotations

from typing import NamedTuple, Protocol

from ...wire.request import ImageRequest
from ...wire.routing import ImageOperation

# Upstream request headers: `str` pairs, what aiohttp takes (httpx takes them too).
TextHeaders = list[tuple[str, str]]


class Located(NamedTuple):
    """Where one request goes on an upstream: the URL, and the `model` to send in place of
    the client's (None: the client's own)."""

    url: str
    model: str | None = None


class Kind(Protocol):
    """What one kind of upstream does its own way. The URL is built only from the
    configuration and from values checked against conservative patterns."""

    # OpenAI's own API, whose shutdown dates `[limits] retired` applies; another service
    # keeps serving what it serves.
    is_openai_api: bool
    headers: TextHeaders  # sent with every request (an organization, a project)

    def credentials(self, key: str | None) -> TextHeaders:
        """The headers that carry the upstream key `key` (none without one)."""
        ...

    def serves(self, operation: ImageOperation) -> bool:
        """Whether it has the operation at all (generation, edit, variation)."""
        ...

    def locate(self, request: ImageRequest, pooled: bool) -> Located:
        """Where `request` goes here; a 400 `ProxyError` when it cannot go (a model that
        names no valid deployment). `pooled`: the upstream is one of a pool, where a
        request's deployment only names its model."""
        ...

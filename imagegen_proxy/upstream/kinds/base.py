"""The contract every kind of upstream keeps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

from ...wire.json_upload import Incoming
from ...wire.request import ImageRequest
from ...wire.routing import ImageOperation
from ..call import Answer, SendUpstream, TextHeaders, Timeouts


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
    # Who serves it, as OpenTelemetry's GenAI conventions name it (`gen_ai.provider.name`).
    system: str

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


@dataclass(frozen=True, slots=True)
class Job:
    """One request to a kind that speaks another API, as plain values: the normalized
    request, the provider's model for it, the headers that carry the upstream's credentials
    (nothing of the client's), the upstream's timeouts, and an edit's upload."""

    request: ImageRequest
    model: str
    headers: TextHeaders
    timeouts: Timeouts
    upload: Incoming | None = None


@runtime_checkable
class Translating(Kind, Protocol):
    """A kind whose upstream speaks its own API: it makes the provider's request(s) for a
    request and answers in OpenAI's wire (`translated.translate`)."""

    def check(self, request: ImageRequest) -> None:
        """Refuse, with a 400 naming the `param`, what this provider cannot do as asked (a
        size it has no match for, `n` above its maximum): never a silent change."""
        ...

    async def exchange(self, job: Job, send: SendUpstream) -> Answer:
        """Make `job`'s images with `send` (the transport); the answer in OpenAI's wire.
        A `ProxyError` raised here says the provider never had the request (its
        credentials could not be made); a provider's refusal is an answer
        (`translated.refused`)."""
        ...

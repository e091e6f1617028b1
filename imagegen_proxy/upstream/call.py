"""One attempt's request to an upstream as plain values (`Call`), and its answer (`Answer`).

The default aiohttp transport sends a `Call` as it is; any httpx transport or client (a
user's own, with its hooks) gets it as an `httpx.Request` (`httpx_sender`): httpx stays the
API, and the hot path builds none of its objects (see bench/README.md).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

# Upstream request headers: `str` pairs, what aiohttp takes (httpx takes them too).
TextHeaders = list[tuple[str, str]]
Content = bytes | AsyncIterator[bytes]


@dataclass(frozen=True, slots=True)
class Timeouts:
    """An upstream's timeouts, in seconds: httpx's four."""

    connect: float | None
    read: float | None
    write: float | None
    pool: float | None

    def as_httpx(self) -> dict[str, Any]:
        """As an httpx request's `timeout` extension."""
        return {"connect": self.connect, "read": self.read, "write": self.write, "pool": self.pool}


@dataclass(slots=True)
class Call:
    """One attempt's request to an upstream, as plain values.

    With `exchange`, the call is not sent as it is: `exchange(send)` makes the provider's
    own request(s) with `send` and answers in OpenAI's wire (a kind that speaks another API:
    `kinds.base.Translating`)."""

    url: str
    headers: TextHeaders
    content: Content
    timeouts: Timeouts
    method: str = "POST"
    exchange: Callable[[SendUpstream], Awaitable[Answer]] | None = None
    model: str | None = None  # the model the upstream is asked for (its traces tell it)


class Answer(Protocol):
    """An upstream's answer, its body not read yet. `aclose()` must be awaited, once."""

    @property
    def status(self) -> int: ...

    @property
    def raw_headers(self) -> Sequence[tuple[bytes, bytes]]: ...

    def header(self, name: str) -> str | None:
        """The value of the (lower-case) header `name`, None without one."""
        ...

    def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives, as sent (never decoded); failures raise httpx's errors."""
        ...

    async def aclose(self) -> None: ...


SendUpstream = Callable[[Call], Awaitable[Answer]]


def retry_after(value: str | None) -> float | None:
    """An upstream's `retry-after` in seconds (a number of seconds; dates are ignored)."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if 0 <= seconds <= 3600 else None


SendHttpx = Callable[[httpx.Request], Awaitable[httpx.Response]]


def client_sender(client: httpx.AsyncClient) -> SendUpstream:
    """Send through a user's own client, with its hooks, transport and settings."""

    async def send(request: httpx.Request) -> httpx.Response:
        return await client.send(request, stream=True)

    return httpx_sender(send)


def httpx_sender(send: SendHttpx) -> SendUpstream:
    """Send a `Call` as an `httpx.Request` with `send`."""

    async def send_call(call: Call) -> Answer:
        request = httpx.Request(
            call.method,
            call.url,
            headers=call.headers,
            content=call.content,
            extensions={"timeout": call.timeouts.as_httpx()},
        )
        return HttpxAnswer(await send(request))

    return send_call


class HttpxAnswer:
    """An `httpx.Response` as an `Answer`."""

    __slots__ = ("response",)

    def __init__(self, response: httpx.Response) -> None:
        self.response = response

    @property
    def status(self) -> int:
        return self.response.status_code

    @property
    def raw_headers(self) -> Sequence[tuple[bytes, bytes]]:
        return self.response.headers.raw

    def header(self, name: str) -> str | None:
        value: str | None = self.response.headers.get(name)
        return value

    def chunks(self) -> AsyncIterator[bytes]:
        return self.response.aiter_raw()

    async def aclose(self) -> None:
        await self.response.aclose()

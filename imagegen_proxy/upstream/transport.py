"""An httpx transport over aiohttp's HTTP/1.1 client.

httpx stays the API (a user's own `httpx.AsyncClient` works as well); this transport only
moves the bytes, measurably faster than httpx's pure-Python default (see bench/README.md).
Its contract is httpx's: `handle_async_request` returns a response whose stream must be
closed, and every failure is raised as the matching `httpx` exception. The proxy itself
calls `exchange`, the same without building httpx's request and response objects.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator

import aiohttp
import httpx
from yarl import URL

from ..config import ProxySettings
from .call import Call, SendUpstream, Timeouts, httpx_sender


def _as_httpx(exc: aiohttp.ClientError | OSError, writing: bool = False) -> httpx.TransportError:
    """aiohttp's exception `exc` as httpx's, the single place where the two meet.

    `exc` loses its traceback: aiohttp's frames in it hold `exc` itself, a reference cycle
    that would keep every frame of the request's way down (and their locals) for the cyclic
    GC. A function, not a context manager, for the same reason."""
    exc.__traceback__ = None
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(str(exc))
    if isinstance(exc, TimeoutError | aiohttp.SocketTimeoutError | aiohttp.ServerTimeoutError):
        return httpx.ReadTimeout(str(exc) or "timed out")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return httpx.ConnectError(str(exc))
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
        return httpx.RemoteProtocolError(str(exc) or "server disconnected")
    if isinstance(exc, aiohttp.ClientResponseError):  # a malformed status line or headers
        return httpx.RemoteProtocolError(str(exc))
    if isinstance(exc, aiohttp.ClientOSError | OSError):
        return (httpx.WriteError if writing else httpx.ReadError)(str(exc))
    return httpx.TransportError(str(exc))


class _Answer:
    """An aiohttp response as the proxy's `upstream.Answer`."""

    __slots__ = ("_response", "_transport", "raw_headers", "status")

    def __init__(self, response: aiohttp.ClientResponse, transport: AiohttpTransport) -> None:
        self._response = response
        self._transport: AiohttpTransport | None = transport
        self.status = response.status
        self.raw_headers = response.raw_headers

    def header(self, name: str) -> str | None:
        return self._response.headers.get(name)

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except (aiohttp.ClientError, OSError) as exc:
            raise _as_httpx(exc) from exc

    async def aclose(self) -> None:
        if self._transport is not None:
            self._transport.in_use -= 1
            self._transport = None
        # A body not read to its end leaves the connection unusable: close it, don't pool it.
        if self._response.content.at_eof():
            self._response.release()
        else:
            self._response.close()


class _Body(httpx.AsyncByteStream):
    def __init__(self, answer: _Answer) -> None:
        self._answer = answer

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._answer.chunks()

    async def aclose(self) -> None:
        await self._answer.aclose()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """Sends httpx requests with aiohttp. The session is made on first use, in the running
    loop; it stores no cookies and never decompresses (bytes pass as the upstream sent them)."""

    def __init__(self, limits: httpx.Limits | None = None) -> None:
        self._limits = limits or httpx.Limits()
        self._session: aiohttp.ClientSession | None = None
        self._guard: asyncio.Task[None] | None = None
        # HTTP(S)_PROXY and NO_PROXY are read once, not per request: aiohttp's own
        # trust_env also re-reads ~/.netrc in a thread for every request, which costs more
        # than everything else the proxy does.
        self._proxies = urllib.request.getproxies_environment()
        self._proxy_for: dict[tuple[str, str], str | None] = {}
        self._urls: dict[str, tuple[URL, str | None]] = {}
        self._timeouts: dict[Timeouts, aiohttp.ClientTimeout] = {}
        # Responses handed out and not closed yet: each holds a connection of the pool.
        self.in_use = 0

    def _url(self, url: str) -> tuple[URL, str | None]:
        """`url` parsed, and the proxy to reach it through (None: directly), per URL: a
        handful per process (Azure's are bounded by its targets' own caches)."""
        found = self._urls.get(url)
        if found is None:
            # As httpx sends it: escapes kept (yarl's own parsing would decode "%3A" to
            # ":", and a SigV4 signature covers the path as encoded).
            parsed = URL(str(httpx.URL(url)), encoded=True)
            key = (parsed.scheme, parsed.host or "")
            if key not in self._proxy_for:
                bypass = urllib.request.proxy_bypass_environment(  # type: ignore[attr-defined]
                    key[1], self._proxies
                )
                self._proxy_for[key] = None if bypass else self._proxies.get(key[0])
            found = parsed, self._proxy_for[key]
            if len(self._urls) >= 4096:
                self._urls.clear()
            self._urls[url] = found
        return found

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self._limits.max_connections or 0,
                limit_per_host=0,
                keepalive_timeout=self._limits.keepalive_expiry or 30.0,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                timeout=aiohttp.ClientTimeout(total=None),
            )
            # Servers that send no lifespan (Django's) never lead to aclose(): the session
            # is closed when the event loop winds down instead (asyncio.run cancels the
            # tasks still pending, and awaits them while the loop still runs).
            self._guard = asyncio.get_running_loop().create_task(_close_at_exit(self._session))
        return self._session

    def _timeout(self, given: Timeouts) -> aiohttp.ClientTimeout:
        timeout = self._timeouts.get(given)
        if timeout is None:  # a handful per process: one per configured upstream
            timeout = aiohttp.ClientTimeout(
                total=None, connect=given.pool, sock_connect=given.connect, sock_read=given.read
            )
            self._timeouts[given] = timeout
        return timeout

    async def exchange(self, call: Call) -> _Answer:
        """Send `call`; its answer, the body not read yet (`upstream.SendUpstream`). The
        call names its Accept-Encoding (aiohttp would ask for gzip, and nothing here
        decodes)."""
        url, proxy = self._url(call.url)
        try:
            response = await self._get_session().request(
                call.method,
                url,
                headers=call.headers,
                data=call.content or None,
                allow_redirects=False,
                proxy=proxy,
                timeout=self._timeout(call.timeouts),
            )
        except (aiohttp.ClientError, OSError) as exc:
            raise _as_httpx(exc, writing=True) from exc
        self.in_use += 1
        return _Answer(response, self)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        headers = request.headers.multi_items()
        if "accept-encoding" not in request.headers:
            headers.append(("accept-encoding", "identity"))  # the bytes pass as they come
        content: bytes | AsyncIterator[bytes]
        if isinstance(request.stream, httpx.ByteStream):
            content = request.content
        else:
            # A body sent as it is made (an upload being relayed): aiohttp chunks it itself.
            content = _chunks(request.stream)
            headers = [(k, v) for k, v in headers if k.lower() != "transfer-encoding"]
        given = request.extensions.get("timeout", {})
        timeouts = Timeouts(given.get("connect"), given.get("read"), None, given.get("pool"))
        answer = await self.exchange(Call(str(request.url), headers, content, timeouts))
        return httpx.Response(
            status_code=answer.status,
            headers=answer.raw_headers,
            stream=_Body(answer),
            request=request,
            extensions={"http_version": b"HTTP/1.1"},
        )

    @property
    def closed(self) -> bool:
        return self._session is None or self._session.closed

    async def aclose(self) -> None:
        if self._guard is not None:
            self._guard.cancel()
        if self._session is not None:
            await self._session.close()


async def _chunks(stream: httpx.AsyncByteStream | httpx.SyncByteStream) -> AsyncIterator[bytes]:
    assert isinstance(stream, httpx.AsyncByteStream)
    async for chunk in stream:
        yield chunk


async def _close_at_exit(session: aiohttp.ClientSession) -> None:
    try:
        await asyncio.get_running_loop().create_future()  # until cancelled
    finally:
        await session.close()


def create_transport(settings: ProxySettings) -> httpx.AsyncBaseTransport:
    """The default upstream transport: a pool sized for thousands of slow generations.

    The proxy calls it directly: no redirects are followed and no cookies are kept (a shared
    jar would hand one user's upstream cookies to the next).
    """
    limits = httpx.Limits(
        max_connections=settings.max_connections,
        max_keepalive_connections=settings.max_keepalive_connections,
        keepalive_expiry=settings.keepalive_expiry,
    )
    if settings.transport == "aiohttp":
        return AiohttpTransport(limits)
    return httpx.AsyncHTTPTransport(limits=limits)


def sender_for(transport: httpx.AsyncBaseTransport) -> SendUpstream:
    """How the proxy sends through `transport`: the aiohttp one takes a `Call` as it is."""
    if isinstance(transport, AiohttpTransport):
        return transport.exchange
    return httpx_sender(transport.handle_async_request)

"""An httpx transport over aiohttp's HTTP/1.1 client.

httpx stays the API (a user's own `httpx.AsyncClient` works as well); this transport only
moves the bytes, measurably faster than httpx's pure-Python default (see bench/README.md).
Its contract is httpx's: `handle_async_request` returns a response whose stream must be
closed, and every failure is raised as the matching `httpx` exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.request
from collections.abc import AsyncIterator, Iterator

import aiohttp
import httpx

_SKIP_AUTO_HEADERS = frozenset({"Accept-Encoding"})


@contextlib.contextmanager
def _mapped(writing: bool = False) -> Iterator[None]:
    """aiohttp's exceptions as httpx's, the single place where the two meet."""
    try:
        yield
    except aiohttp.ConnectionTimeoutError as exc:
        raise httpx.ConnectTimeout(str(exc)) from exc
    except (TimeoutError, aiohttp.SocketTimeoutError, aiohttp.ServerTimeoutError) as exc:
        raise httpx.ReadTimeout(str(exc) or "timed out") from exc
    except aiohttp.ClientConnectorError as exc:
        raise httpx.ConnectError(str(exc)) from exc
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError) as exc:
        raise httpx.RemoteProtocolError(str(exc) or "server disconnected") from exc
    except aiohttp.ClientResponseError as exc:  # a malformed status line or headers
        raise httpx.RemoteProtocolError(str(exc)) from exc
    except (aiohttp.ClientOSError, OSError) as exc:
        error = httpx.WriteError if writing else httpx.ReadError
        raise error(str(exc)) from exc
    except aiohttp.ClientError as exc:
        raise httpx.TransportError(str(exc)) from exc


class _Body(httpx.AsyncByteStream):
    def __init__(self, response: aiohttp.ClientResponse, transport: AiohttpTransport) -> None:
        self._response = response
        self._transport: AiohttpTransport | None = transport

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _mapped():
            async for chunk in self._response.content.iter_any():
                yield chunk

    async def aclose(self) -> None:
        if self._transport is not None:
            self._transport.in_use -= 1
            self._transport = None
        # A body not read to its end leaves the connection unusable: close it, don't pool it.
        if self._response.content.at_eof():
            self._response.release()
        else:
            self._response.close()


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
        self._timeouts: dict[tuple[float | None, ...], aiohttp.ClientTimeout] = {}
        # Responses handed out and not closed yet: each holds a connection of the pool.
        self.in_use = 0

    def _proxy(self, url: httpx.URL) -> str | None:
        key = (url.scheme, url.host)
        if key not in self._proxy_for:
            bypass = urllib.request.proxy_bypass_environment(  # type: ignore[attr-defined]
                url.host, self._proxies
            )
            self._proxy_for[key] = None if bypass else self._proxies.get(url.scheme)
        return self._proxy_for[key]

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

    def _timeout(self, request: httpx.Request) -> aiohttp.ClientTimeout:
        given = request.extensions.get("timeout", {})
        key = (given.get("pool"), given.get("connect"), given.get("read"))
        timeout = self._timeouts.get(key)
        if timeout is None:  # a handful per process: one per configured upstream
            timeout = aiohttp.ClientTimeout(
                total=None, connect=key[0], sock_connect=key[1], sock_read=key[2]
            )
            self._timeouts[key] = timeout
        return timeout

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        headers = request.headers.multi_items()
        data: bytes | AsyncIterator[bytes] | None
        if isinstance(request.stream, httpx.ByteStream):
            data = request.content or None
        else:
            # A body sent as it is made (an upload being relayed): aiohttp chunks it itself.
            data = _chunks(request.stream)
            headers = [(k, v) for k, v in headers if k.lower() != "transfer-encoding"]
        with _mapped(writing=True):
            response = await self._get_session().request(
                request.method,
                str(request.url),
                headers=headers,
                data=data,
                allow_redirects=False,
                proxy=self._proxy(request.url),
                skip_auto_headers=_SKIP_AUTO_HEADERS,
                timeout=self._timeout(request),
            )
        self.in_use += 1
        return httpx.Response(
            status_code=response.status,
            headers=response.raw_headers,
            stream=_Body(response, self),
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

"""The bundled proxy's front door: uvicorn's HTTP/1.1 protocol with three rules added.

- **Bounded heads.** A request's target and header fields are counted as they are parsed;
  beyond `max_header_bytes` or `max_header_count`: 431 and close, before the app is called.
- **Header timeout.** A request's head must be whole within `header_timeout` of the
  connection's start or of the previous response's end; then 408 and close, or a silent
  close when nothing came (an unsolicited 408 on an idle keep-alive connection confuses
  clients).
- **Connection cap.** A newcomer beyond `max_connections` evicts the oldest connection that
  is not running a request (as nginx reuses idle keep-alive connections), so a flood of idle
  sockets cannot lock out a client: closed silently, or with 503 if it had begun sending a
  request. When every connection is running one, the newcomer gets the 503.

Both of uvicorn's parsers (httptools, h11) get the same rules from one `_Door` per
connection and answer alike; `uvicorn_options()` says what to pass to `uvicorn.Config`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http
import importlib.util
import json
import logging
import resource
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import h11
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from ..config import ServerConfig
from ..wire.errors import ProxyError

logger = logging.getLogger("imagegen_proxy")

_HAS_HTTPTOOLS = importlib.util.find_spec("httptools") is not None  # uvicorn[standard]
# A header line's ": " and CRLF, which neither parser reports.
_FIELD_OVERHEAD = 4


@dataclass(frozen=True)
class Limits:
    """What the front door enforces (see `ServerConfig` for each one's meaning)."""

    max_header_bytes: int
    max_header_count: int
    header_timeout: float
    max_connections: int


def uvicorn_options(
    server: ServerConfig, *, http: Literal["auto", "httptools", "h11"] = "auto"
) -> dict[str, Any]:
    """What to pass to `uvicorn.Config` (or `uvicorn.run`) for the front door.

    `http="auto"` takes httptools when it is installed, else h11, as uvicorn does. An unset
    `max_connections` is sized to the open-files limit in force now: call this after
    `raise_open_files_limit()`.
    """
    limits = Limits(
        max_header_bytes=server.max_header_bytes,
        max_header_count=server.max_header_count,
        header_timeout=server.header_timeout,
        max_connections=server.max_connections or default_max_connections(_open_files()),
    )
    if http == "auto":
        http = "httptools" if _HAS_HTTPTOOLS else "h11"
    protocol = HttpToolsFrontDoor if http == "httptools" else H11FrontDoor
    # uvicorn instantiates `http` with its own arguments; the partial adds the limits. It
    # pickles as a reference to the class plus the limits, so the `--workers` processes
    # (spawned with the pickled Config) get the same front door.
    # Not `limit_concurrency`: uvicorn counts idle connections in it, the very flood the cap
    # is there to absorb, and would answer 503 to a client while idle sockets hold the slots.
    return {
        "http": functools.partial(protocol, limits=limits),
        # What uvicorn's own h11 protocol would buffer for a head; ours uses the same bound.
        "h11_max_incomplete_event_size": server.max_header_bytes,
    }


def raise_open_files_limit() -> int:
    """Raise this process's open-files limit to its hard limit; return the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        # An unlimited hard limit may be more than the kernel allows (macOS): keep the soft.
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    soft = _open_files()
    logger.info("open files limit: %d", soft)
    return soft


def default_max_connections(nofile: int) -> int:
    """The connection cap for an open-files limit of `nofile`.

    Each generation in flight holds two descriptors for minutes, the client's connection
    and the upstream one, so half of what is left after a reserve: 64 for the listener,
    logs, the event loop's own, the upstream pool's idle connections and the bursts of
    connections accepted before the cap evicts (see `_Door.opened`). Running out instead
    would fail an upstream connect (502) or stop the listener's accepts.
    """
    return max(16, (nofile - 64) // 2)


def _open_files() -> int:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return sys.maxsize if soft == resource.RLIM_INFINITY else soft


def _answer(error: ProxyError) -> tuple[bytes, bytes]:
    """An error's status line, and its header fields and body after the server's own."""
    status = f"HTTP/1.1 {error.status} {http.HTTPStatus(error.status).phrase}\r\n".encode()
    body = json.dumps(error.envelope()).encode()
    fields = [
        ("content-type", "application/json"),
        ("content-length", str(len(body))),
        *error.headers,
        ("connection", "close"),
    ]
    rest = "".join(f"{name}: {value}\r\n" for name, value in fields)
    return status, rest.encode("latin-1") + b"\r\n" + body


_TOO_LARGE = _answer(
    ProxyError(
        431,
        "The request's header fields are too large or too many.",
        code="request_header_fields_too_large",
    )
)
_TIMEOUT = _answer(
    ProxyError(408, "The request's header fields did not arrive in time.", code="request_timeout")
)
_OVERLOADED = _answer(
    ProxyError(
        503,
        "The server holds as many connections as it can, every one busy; retry shortly.",
        type="server_error",
        code="server_overloaded",
        headers=[("retry-after", "1")],
    )
)


class _Lobby:
    """One server's connections as the door sees them."""

    def __init__(self) -> None:
        # Connections not running a request, longest waiting first: whom a newcomer evicts.
        self.waiting: dict[_Door, None] = {}
        # Connections the door has closed that uvicorn still counts, until connection_lost.
        self.leaving = 0


# Per uvicorn server (tests run several in one process); gone with the server.
_lobbies: weakref.WeakKeyDictionary[ServerState, _Lobby] = weakref.WeakKeyDictionary()


class _Door:
    """One connection's rules. Its protocol reports what the parser sees; the door answers
    and closes the connection when a rule is broken, after which `closed` is true and the
    protocol feeds the parser nothing more."""

    def __init__(
        self, limits: Limits, loop: asyncio.AbstractEventLoop, server_state: ServerState
    ) -> None:
        self.closed = False
        self._limits = limits
        self._loop = loop
        self._server_state = server_state
        self._lobby = _lobbies.setdefault(server_state, _Lobby())
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._began = False  # bytes of a request came since the connection started waiting
        self._pending = 0  # requests whose head is whole and whose response is not
        self._heads = 0  # heads completed on this connection
        self._in_body = False  # the parser is inside a request's body
        # The head being parsed: bytes and fields the parser reported, and bytes fed to it
        # in chunks that held nothing else (httptools keeps a header line, unreported,
        # until it ends).
        self._head_bytes = 0
        self._head_fields = 0
        self._fed = 0

    def opened(self, transport: asyncio.Transport, connections: int) -> None:
        """A connection came; `connections` is how many uvicorn holds, this one included."""
        self._transport = transport
        # The event loop accepts a burst of connections before any of them gets here, so
        # the descriptors of a flood exceed the cap for a moment: the reserve in
        # `default_max_connections` is for that.
        if connections - 1 - self._lobby.leaving >= self._limits.max_connections:
            oldest = next(iter(self._lobby.waiting), None)
            if oldest is None:
                logger.warning(
                    "%d connections, every one running a request: 503 to a newcomer",
                    self._limits.max_connections,
                )
                self._close(_OVERLOADED)
                return
            oldest._close(_OVERLOADED if oldest._began else None)
        self._wait()

    def feed(self, data: bytes, parse: Callable[[bytes], None]) -> None:
        """Hand `data` to `parse` (uvicorn's data_received), counting it against the head
        limit when it all belongs to a head that is still incomplete."""
        if self.closed:
            return
        if self._pending == 0 and data:
            self._began = True
        in_head, heads = not self._in_body, self._heads
        parse(data)
        if in_head and self._heads == heads and not self.closed:
            self._fed += len(data)
            if self._fed > self._limits.max_header_bytes:
                self.refuse_head()

    def count(self, size: int, fields: int = 0) -> bool:
        """Count part of a head as the parser reports it: the request target's bytes, or a
        field's; False, having answered 431, once beyond a limit."""
        self._head_bytes += size + _FIELD_OVERHEAD * fields
        self._head_fields += fields
        if (
            self._head_bytes > self._limits.max_header_bytes
            or self._head_fields > self._limits.max_header_count
        ):
            self.refuse_head()
            return False
        return True

    def refuse_head(self) -> None:
        self._close(_TOO_LARGE)

    def head_complete(self) -> None:
        """A request's head is whole: the request runs, and may not be evicted."""
        self._heads += 1
        self._pending += 1
        self._in_body = True
        self._head_bytes = self._head_fields = self._fed = 0
        self._stop_waiting()

    def message_complete(self) -> None:
        self._in_body = False

    def response_complete(self, uvicorn_next: Callable[[], None]) -> None:
        """A response ended; `uvicorn_next` is uvicorn's own on_response_complete, which may
        start a pipelined request."""
        self._pending -= 1
        uvicorn_next()
        assert self._transport is not None
        if self._pending == 0 and not self.closed and not self._transport.is_closing():
            self._wait()

    def gone(self) -> None:
        """The connection is closed (connection_lost)."""
        if self.closed:
            self._lobby.leaving -= 1
        self.closed = True
        self._stop_waiting()

    def _wait(self) -> None:
        """Between requests: evictable, and the header timeout runs."""
        self._stop_waiting()
        self._began = False
        self._lobby.waiting[self] = None
        self._timer = self._loop.call_later(self._limits.header_timeout, self._timed_out)

    def _stop_waiting(self) -> None:
        self._lobby.waiting.pop(self, None)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        self._close(_TIMEOUT if self._began else None)

    def _close(self, answer: tuple[bytes, bytes] | None) -> None:
        if self.closed:
            return
        self.closed = True
        self._lobby.leaving += 1
        self._stop_waiting()
        assert self._transport is not None
        if answer is not None:
            status, rest = answer
            server = b"".join(
                name + b": " + value + b"\r\n" for name, value in self._server_state.default_headers
            )
            self._transport.write(status + server + rest)
        self._transport.close()


class _Stop(Exception):
    """Raised from a parser callback to stop the parser once the door has answered."""


class _CountingConnection(h11.Connection):
    """h11's server side, telling the door about each head (h11 reports one only once it
    is whole; its own buffer limit stops one that never ends) and each body's end."""

    def __init__(self, door: _Door, max_head: int) -> None:
        super().__init__(h11.SERVER, max_incomplete_event_size=max_head)
        self._door = door

    def next_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        try:
            event = super().next_event()
        except h11.RemoteProtocolError as exc:
            if exc.error_status_hint == 431:  # "Receive buffer too long"
                self._door.refuse_head()
            raise
        if isinstance(event, h11.Request):
            size = len(event.target) + sum(len(name) + len(value) for name, value in event.headers)
            if not self._door.count(size, len(event.headers)):
                raise h11.RemoteProtocolError("request head too large", error_status_hint=431)
            self._door.head_complete()
        elif isinstance(event, h11.EndOfMessage):
            self._door.message_complete()
        return event


class H11FrontDoor(H11Protocol):
    """uvicorn's h11 protocol behind the front door."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: Limits,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.door = _Door(limits, self.loop, server_state)
        # uvicorn reads every event from `self.conn`: the door sees each head there first.
        self.conn = _CountingConnection(self.door, limits.max_header_bytes)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.door.opened(transport, len(self.connections))

    def connection_lost(self, exc: Exception | None) -> None:
        self.door.gone()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self.door.feed(data, super().data_received)

    def on_response_complete(self) -> None:
        self.door.response_complete(super().on_response_complete)

    def send_400_response(self, msg: str) -> None:
        # uvicorn answers 400 to every parser error, ours included: the door answered those.
        if not self.door.closed:
            super().send_400_response(msg)


if _HAS_HTTPTOOLS:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HttpToolsFrontDoor(HttpToolsProtocol):
        """uvicorn's httptools protocol behind the front door."""

        def __init__(
            self,
            config: Config,
            server_state: ServerState,
            app_state: dict[str, Any],
            _loop: asyncio.AbstractEventLoop | None = None,
            *,
            limits: Limits,
        ) -> None:
            super().__init__(config, server_state, app_state, _loop)
            self.door = _Door(limits, self.loop, server_state)

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.door.opened(transport, len(self.connections))

        def connection_lost(self, exc: Exception | None) -> None:
            self.door.gone()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            self.door.feed(data, super().data_received)

        def on_response_complete(self) -> None:
            self.door.response_complete(super().on_response_complete)

        def send_400_response(self, msg: str) -> None:
            # uvicorn answers 400 to every parser error, including the _Stop of ours.
            if not self.door.closed:
                super().send_400_response(msg)

        def on_url(self, url: bytes) -> None:
            if not self.door.count(len(url)):
                raise _Stop
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            if not self.door.count(len(name) + len(value), fields=1):
                raise _Stop
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self.door.head_complete()
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self.door.message_complete()
            super().on_message_complete()

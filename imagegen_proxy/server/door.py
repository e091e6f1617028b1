"""One connection's rules at the bundled proxy's front door, whichever parser reads it
(`front_door.py` puts a `Door` in each of uvicorn's protocols): the head counted against
its bounds, the header timeout, and the connection cap, with each server's `_Lobby` of the
connections a newcomer may evict. A broken rule is answered here, and the connection closed.
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from uvicorn.server import ServerState

from ..wire.errors import ProxyError

logger = logging.getLogger("imagegen_proxy")

# A header line's ": " and CRLF, which neither parser reports.
_FIELD_OVERHEAD = 4


@dataclass(frozen=True)
class Limits:
    """What the front door enforces (see `ServerConfig` for each one's meaning)."""

    max_header_bytes: int
    max_header_count: int
    header_timeout: float
    max_connections: int


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
        self.waiting: dict[Door, None] = {}
        # Connections the door has closed that uvicorn still counts, until connection_lost.
        self.leaving = 0


# Per uvicorn server (tests run several in one process); gone with the server.
_lobbies: weakref.WeakKeyDictionary[ServerState, _Lobby] = weakref.WeakKeyDictionary()


class Door:
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

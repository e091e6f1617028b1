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

Both of uvicorn's parsers (httptools, h11) get the same rules from one `Door` (`door.py`) per
connection and answer alike; `uvicorn_options()` says what to pass to `uvicorn.Config`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.util
import logging
import resource
import sys
from typing import Any, Literal

import h11
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from ..config import ServerConfig
from .door import Door, Limits

logger = logging.getLogger("imagegen_proxy")

_HAS_HTTPTOOLS = importlib.util.find_spec("httptools") is not None  # uvicorn[standard]


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
    connections accepted before the cap evicts (see `Door.opened`). Running out instead
    would fail an upstream connect (502) or stop the listener's accepts.
    """
    return max(16, (nofile - 64) // 2)


def _open_files() -> int:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return sys.maxsize if soft == resource.RLIM_INFINITY else soft


class _Stop(Exception):
    """Raised from a parser callback to stop the parser once the door has answered."""


class _CountingConnection(h11.Connection):
    """h11's server side, telling the door about each head (h11 reports one only once it
    is whole; its own buffer limit stops one that never ends) and each body's end."""

    def __init__(self, door: Door, max_head: int) -> None:
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
        self.door = Door(limits, self.loop, server_state)
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
            self.door = Door(limits, self.loop, server_state)

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

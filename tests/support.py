"""Real servers on loopback for the tests: uvicorn in a thread, bound to 127.0.0.1:0."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

import httpx
import uvicorn

if TYPE_CHECKING:
    from imagegen_proxy.store import Store


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()
        self.url = ""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets)
        self.ready.set()

    def tasks(self) -> list[asyncio.Task[Any]]:
        """The tasks alive in the server's event loop."""

        async def alive() -> list[asyncio.Task[Any]]:
            return [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]

        return asyncio.run_coroutine_threadsafe(alive(), self.loop).result(5)


@contextlib.contextmanager
def serve(
    app: Any, *, lifespan: str = "auto", sock: socket.socket | None = None, **config: Any
) -> Iterator[str]:
    """Serve `app` with uvicorn on a free loopback port (or on `sock`, bound already: its
    URL known before the app is made); yield its base URL ("http://127.0.0.1:N")."""
    with serving(app, lifespan=lifespan, sock=sock, **config) as server:
        yield server.url


def bound() -> socket.socket:
    """A loopback socket bound to a free port, for `serve(..., sock=)`."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.contextmanager
def serving(
    app: Any, *, lifespan: str = "auto", sock: socket.socket | None = None, **config: Any
) -> Iterator[_Server]:
    """Like `serve`, but yield the server itself: its `url`, and its loop's `tasks()`."""
    sock = sock or bound()
    port = sock.getsockname()[1]
    server = _Server(
        uvicorn.Config(
            app,
            lifespan=lifespan,
            log_level="warning",
            timeout_graceful_shutdown=2,
            **config,
        )
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        if not server.ready.wait(10):
            raise RuntimeError("test server did not start")
        server.url = f"http://127.0.0.1:{port}"
        yield server
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def raw_request(
    url: str, headers: dict[str, str], body: bytes = b"", path: str = "/v1/images/generations"
) -> socket.socket:
    """Send a POST by hand on a new connection and return the socket: the test decides what
    is sent (a lying content-length, half a body) and when the client vanishes."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    sock.sendall(f"POST {path} HTTP/1.1\r\nhost: test\r\n{lines}\r\n".encode() + body)
    return sock


def json_request_headers(body: bytes, **extra: str) -> dict[str, str]:
    return {"content-type": "application/json", "content-length": str(len(body)), **extra}


def read_response(sock: socket.socket) -> httpx.Response:
    """Read one HTTP/1.1 response that has a content-length from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = [tuple(line.split(": ", 1)) for line in lines[1:]]
    length = int(dict(headers)["content-length"])
    while len(body) < length:
        body += sock.recv(65536)
    return httpx.Response(int(lines[0].split()[1]), headers=headers, content=body)


def on_store(url: str, work: Callable[[Store], Awaitable[Any]]) -> Any:
    """Run `work` on a `Store` of its own at `url` (brought to the newest schema first), in
    an event loop of its own: engines belong to the loop that made them."""
    from imagegen_proxy.store import Store

    async def main() -> Any:
        store = Store(url)
        try:
            await store.upgrade()
            return await work(store)
        finally:
            await store.aclose()

    return asyncio.run(main())


def until(condition: Callable[[], bool], within: float) -> float:
    """Seconds until `condition` held, polled every 50 ms; fails past `within` seconds."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < within, "not within the bound"
        time.sleep(0.05)
    return time.monotonic() - started

"""The ASGI plumbing every answer of the mock shares, whichever API it speaks: writing a whole
response, waiting out the mock's delay without outliving the client, rendering off the event
loop, and where on its host a request arrived."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
import anyio.to_thread

from ..types import Receive, Scope, Send
from ..wire.request import header

Headers = list[tuple[bytes, bytes]]
T = TypeVar("T")

JSON = (b"content-type", b"application/json")


async def respond(send: Send, status: int, body: bytes, headers: Headers) -> None:
    """Send a whole response: `headers`, a content-length, then `body` in one message."""
    headers.append((b"content-length", b"%d" % len(body)))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def until_disconnect(receive: Receive, work: Awaitable[None]) -> None:
    """Run `work`, abandoning it as soon as the client goes away."""
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        await work
        tg.cancel_scope.cancel()


async def after_delay(receive: Receive, delay: float, work: Callable[[], Awaitable[None]]) -> None:
    """Sleep `delay` seconds, then run `work`; both are abandoned if the client leaves. No
    delay means nothing to abandon early: no watcher then, and none of its overhead."""
    if delay <= 0:
        await work()
        return

    async def delayed() -> None:
        await anyio.sleep(delay)
        await work()

    await until_disconnect(receive, delayed())


async def in_thread(work: Callable[[], T]) -> T:
    """Run `work` in a worker thread (decoding and painting take up to a second)."""
    # Abandoned, not awaited, if the request is cancelled: the client is gone.
    return await anyio.to_thread.run_sync(work, abandon_on_cancel=True)


def route_path(scope: Scope) -> str:
    """The request's path below the mock's mount point: the bundled proxy mounts the mock
    under a prefix, and ASGI's `path` includes the `root_path`."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root) :] or "/"
    return path


def base_url(scope: Scope) -> str:
    """Scheme, host and mount point the request came to, for URLs the mock hands out and
    is asked for again: the Host header when sent, else the address the server listens on."""
    host = header(scope, b"host")
    if host is not None:
        authority = host.decode("latin-1")
    else:
        server = scope.get("server") or ("127.0.0.1", 80)
        authority = f"{server[0]}:{server[1]}"
    return f"{scope.get('scheme', 'http')}://{authority}{scope.get('root_path', '')}"

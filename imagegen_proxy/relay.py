"""Sending the upstream request and relaying its answer, byte for byte, as it arrives.

Memory per request is bounded by one network chunk whatever the image size: nothing
is collected. The client's disconnect is watched from the moment its body has been
read, so a client that leaves (even while the upstream has not answered yet) cancels
the upstream request and releases its connection at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx

from .errors import ProxyError
from .sse import EventScanner
from .types import Message, Receive, Send
from .upstream import Headers, SendUpstream, failure_kind, map_error
from .usage import Tail, Usage, tokens_in

logger = logging.getLogger("imagegen_proxy")

# Hop-by-hop headers (RFC 9110 7.6.1), plus what uvicorn sets itself and what must not
# cross from the upstream to clients.
_DROPPED = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"server",
        b"date",
        b"set-cookie",
    }
)
_SSE_HEADERS = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
_SSE_DROPPED = _DROPPED | {b"content-length", b"cache-control", b"x-accel-buffering"}
_END: Message = {"type": "http.response.body", "body": b"", "more_body": False}

OnEnd = Callable[["Outcome"], Awaitable[None]]


@dataclass(slots=True)
class Outcome:
    """How an exchange ended, for limits and accounting."""

    status: int | None = None  # the upstream's, once it answered
    usage: Usage | None = None  # token counts, when the answer was complete and had them
    client_gone: bool = False
    failure: str | None = None  # how the upstream failed (see metrics.Metrics.upstream_errors)
    upstream_request_id: str | None = None
    ttfb: float | None = None  # seconds until the upstream's response started
    elapsed: float | None = None  # seconds from sending upstream to the end
    bytes_out: int = 0  # body bytes sent to the client

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


class Relay:
    """One request's trip upstream and back.

    `headers` are added to the answer (replacing the upstream's of the same name), and
    `request_id` as its `x-request-id` when the upstream sends none.
    `on_end` is awaited just before the response's last message, so that what it settles
    (a concurrency slot, the day's usage) is settled before the client can send its next
    request; where the response is cut instead, the caller settles afterwards.
    """

    def __init__(
        self,
        send_upstream: SendUpstream,
        send: Send,
        *,
        images: int,
        headers: Headers,
        request_id: str,
        on_end: OnEnd,
    ) -> None:
        self.send_upstream = send_upstream
        self.send = send
        self.images = images
        self.headers = headers
        self.request_id = request_id.encode()
        self.on_end = on_end
        self.outcome = Outcome()
        self._finished = False

    async def run(self, request: httpx.Request, receive: Receive) -> Outcome:
        """Send `request` upstream and relay the answer to the client.

        Raises `ProxyError` only before the response has started (the caller answers it).
        Once started, a failure is answered on the wire: an SSE `error` event at an event
        boundary, otherwise an aborted connection, never a truncated body that looks whole.
        """
        outcome = self.outcome
        error: ProxyError | None = None
        task = asyncio.current_task()
        assert task is not None
        # Plain asyncio, not an anyio task group: this runs for every request, and the
        # group's bookkeeping cost more than the rest of the proxy (see bench/README.md).
        watcher = asyncio.create_task(self._watch(receive, task))
        try:
            await self._exchange(request)
        except ProxyError as exc:
            error = exc
        except OSError:
            outcome.client_gone = True  # some servers raise from send() once it left
        except asyncio.CancelledError:
            if not outcome.client_gone:
                raise  # not ours: the server is shutting down
            task.uncancel()
        finally:
            self._finished = True
            watcher.cancel()
        if outcome.client_gone:
            logger.info("client disconnected; upstream request to %s cancelled", request.url.host)
        elif error is not None:
            try:
                raise error
            finally:
                error = None  # its traceback holds this frame: no frame -> error cycle
        return outcome

    async def _watch(self, receive: Receive, task: asyncio.Task[object]) -> None:
        """From the end of the body on, the client's disconnect cancels the exchange."""
        while (await receive())["type"] != "http.disconnect":
            pass
        if not self._finished:
            self.outcome.client_gone = True
            task.cancel()

    async def _exchange(self, request: httpx.Request) -> None:
        outcome = self.outcome
        started = time.perf_counter()
        try:
            response = await self.send_upstream(request)
        except httpx.HTTPError as exc:
            logger.warning("upstream %s failed: %s", request.url.host, type(exc).__name__)
            outcome.elapsed = time.perf_counter() - started
            outcome.failure = failure_kind(exc)
            raise map_error(exc) from None
        outcome.ttfb = time.perf_counter() - started
        outcome.status = response.status_code
        outcome.upstream_request_id = response.headers.get("x-request-id")
        if not response.is_success:
            outcome.failure = "status"
        try:
            await self._relay(response)
        finally:
            # Closing is not interruptible: the watcher cancels only before this point.
            self._finished = True
            await response.aclose()
            outcome.elapsed = time.perf_counter() - started

    async def _relay(self, response: httpx.Response) -> None:
        send = self.send
        content_type = response.headers.get("content-type", "")
        scanner = None
        if response.is_success and content_type.startswith("text/event-stream"):
            scanner = EventScanner(finals=self.images)
        dropped = _DROPPED if scanner is None else _SSE_DROPPED
        dropped |= {name for name, _ in self.headers}
        headers = [(k, v) for k, v in response.headers.raw if k.lower() not in dropped]
        headers += self.headers
        if self.outcome.upstream_request_id is None:
            headers.append((b"x-request-id", self.request_id))
        if scanner is not None:
            headers += _SSE_HEADERS
        await send(
            {"type": "http.response.start", "status": response.status_code, "headers": headers}
        )
        tail = Tail() if scanner is None and response.is_success else None
        # With a content-length, the client has the whole answer with its last byte: that
        # chunk waits until the generation is settled, as the final empty message does else.
        length = None if scanner is not None else _content_length(response)
        last = b""
        try:
            async for chunk in response.aiter_raw():
                if scanner is None:
                    if tail is not None:
                        tail.feed(chunk)
                    self.outcome.bytes_out += len(chunk)
                    if self.outcome.bytes_out == length:
                        last = chunk
                        continue  # to the end of the upstream body, so its connection is reused
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    continue
                out = scanner.feed(chunk)
                if out:
                    self.outcome.bytes_out += len(out)
                    await send({"type": "http.response.body", "body": out, "more_body": True})
                if scanner.malformed:
                    logger.warning("upstream sent a malformed event stream: %s", scanner.malformed)
                    await self._fail(scanner, "The upstream sent a malformed event stream.")
                    return
                if scanner.done:
                    # The SDK's loop ends only when the connection does: end the response
                    # here even if the upstream keeps its connection open.
                    break
        except httpx.HTTPError as exc:
            logger.warning("upstream failed mid-response: %s", type(exc).__name__)
            failure = "timed out" if isinstance(exc, httpx.TimeoutException) else "failed"
            await self._fail(scanner, f"The upstream {failure} before the answer was complete.")
            return
        except OSError:
            raise
        except Exception:
            # Past the start nothing can be answered any more: log it and cut the connection.
            logger.exception("relay failed mid-response")
            self.outcome.failure = "mid_stream"
            return
        if scanner is not None and not scanner.done:
            await self._fail(
                scanner, "The upstream ended the stream before the image was completed."
            )
            return
        if scanner is not None:
            self.outcome.usage = scanner.usage
        elif tail is not None:
            self.outcome.usage = tokens_in(tail.data)
        self._finished = True  # settling must not be cancelled halfway
        await self.on_end(self.outcome)
        await send({"type": "http.response.body", "body": last, "more_body": False})

    async def _fail(self, scanner: EventScanner | None, message: str) -> None:
        """Answer a failure after the response started: an SSE error event, or abort."""
        self.outcome.failure = "mid_stream"
        if scanner is not None and scanner.completed:
            self.outcome.usage = scanner.usage  # the images completed before still cost
        if scanner is None or not scanner.at_boundary:
            # Returning without completing the response makes the server cut the
            # connection: the client sees an incomplete body instead of a short one.
            return
        error = ProxyError(502, message, type="server_error", code="upstream_error")
        data = json.dumps({"type": "error", **error.envelope()}).encode()
        frame = b"event: error\ndata: " + data + b"\n\n"
        self.outcome.bytes_out += len(frame)
        await self.send({"type": "http.response.body", "body": frame, "more_body": True})
        self._finished = True  # settling must not be cancelled halfway
        await self.on_end(self.outcome)
        await self.send(_END)


def _content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length", "")
    return int(value) if value.isdigit() else None

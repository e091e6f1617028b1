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
import zlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import httpx

from ..generation import Generation
from ..types import Message, Receive, Send
from ..wire.errors import ClientGone, ProxyError
from ..wire.headers import Headers, ResponseHeaders
from ..wire.json_upload import Incoming
from ..wire.sse import EventScanner
from ..wire.usage import Tail, tokens_in
from .call import Answer, Call, SendUpstream, retry_after
from .decoding import decoded, inflater
from .failures import INVALID_STATUS, TIMED_OUT, failure
from .pool import FAILOVER_STATUSES
from .storing import Storing
from .targets import Target
from .translated import Translated

logger = logging.getLogger("imagegen_proxy")

_SSE_HEADERS = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
# An event stream's length changes as events are held back or added, and it is relayed
# decoded when it came compressed.
_SSE_DROPPED = frozenset({b"content-length", b"content-encoding"})
_END: Message = {"type": "http.response.body", "body": b"", "more_body": False}

OnEnd = Callable[[Generation], Awaitable[None]]


class Attempts(Protocol):
    """Where a request may go, in order, and what to tell about each try."""

    @property
    def targets(self) -> Sequence[Target]: ...

    def build(self, target: Target) -> Call: ...

    def started(self, target: Target, call: Call) -> None:
        """An attempt at `target` begins with `call` (still to be sent)."""
        ...

    def ended(self, target: Target, status: int | None, retry_after: float | None) -> None: ...

    def left(self, target: Target) -> None: ...

    def failed_over(self, source: Target, to: Target, reason: str) -> None: ...


class Relay:
    """One request's trip upstream and back, written into its `generation` as it goes
    (where it went, how the upstream answered, what it used, what the client got).

    `headers` are added to the answer (replacing the upstream's of the same name), and the
    generation's id as its `x-request-id` when the upstream sends none; of the upstream's own
    headers, `response_headers` lets through its allow-list.
    `on_end(generation)` is awaited just before the response's last message, so that what it settles
    (a concurrency slot, the day's usage) is settled before the client can send its next
    request; where the response is cut instead, the caller settles afterwards.
    `total_timeout` bounds the whole exchange and `max_bytes` the answer's size: past
    either, the answer ends as any failure after the start does. With `storing`, a 2xx
    answer's images go to the `[storage]` store on the way (`storing.py`).
    """

    def __init__(
        self,
        send_upstream: SendUpstream,
        send: Send,
        generation: Generation,
        *,
        headers: Headers,
        on_end: OnEnd,
        response_headers: ResponseHeaders,
        total_timeout: float,
        max_bytes: int,
        storing: Storing | None = None,
    ) -> None:
        self.send_upstream = send_upstream
        self.send = send
        self.generation = generation
        self.images = generation.n or 1
        self.headers = headers
        self.request_id = generation.id.encode()
        self.on_end = on_end
        self.response_headers = response_headers
        self.total_timeout = total_timeout
        self.max_bytes = max_bytes
        self.storing = storing  # its images go to the store on the way (`storing.py`)
        self._finished = False
        self._expired = False  # total_timeout passed while the exchange was not settling
        self._task: asyncio.Task[object] | None = None
        self._scanner: EventScanner | None = None
        self._started = False  # the response has started: a failure is answered on the wire

    async def run(
        self, attempts: Attempts, receive: Receive, upload: Incoming | None = None
    ) -> None:
        """Send the request upstream (to the first of `attempts` that answers) and relay
        the answer to the client; `upload` is the client's body still being read, which
        the request sends as it arrives.

        Raises `ProxyError` only before the response has started (the caller answers it).
        Once started, a failure is answered on the wire: an SSE `error` event at an event
        boundary, otherwise an aborted connection, never a truncated body that looks whole.
        """
        generation = self.generation
        error: ProxyError | None = None
        self._task = task = asyncio.current_task()
        assert task is not None
        # Plain asyncio, not an anyio task group: this runs for every request, and the
        # group's bookkeeping cost more than the rest of the proxy (see bench/README.md).
        # Both the watcher and the timer cancel the exchange, unless it is settling.
        watcher = asyncio.create_task(self._watch(receive, task, upload))
        timer = asyncio.get_running_loop().call_later(self.total_timeout, self._expire)
        try:
            await self._exchange_in_time(attempts, upload)
        except ProxyError as exc:
            error = exc
        except (OSError, ClientGone):
            generation.client_gone = True  # some servers raise from send() once it left
        except asyncio.CancelledError:
            if not generation.client_gone:
                raise  # not ours: the server is shutting down
            task.uncancel()
        finally:
            self._finished = True
            timer.cancel()
            watcher.cancel()
            if upload is not None and not upload.complete and generation.upstream_status is None:
                # The upstream never had the whole body: it cannot be making anything.
                generation.reached = False
        if generation.client_gone:
            logger.info(
                "client disconnected; upstream request to %s cancelled", generation.upstream
            )
        elif error is not None:
            try:
                raise error
            finally:
                error = None  # its traceback holds this frame: no frame -> error cycle

    async def _watch(
        self, receive: Receive, task: asyncio.Task[object], upload: Incoming | None
    ) -> None:
        """From the end of the body on, the client's disconnect cancels the exchange (an
        upload that is still being read watches for it itself)."""
        if upload is not None:
            await upload.done.wait()
            if upload.error is not None:
                return  # the exchange fails with it
        while (await receive())["type"] != "http.disconnect":
            pass
        if not self._finished:
            self.generation.client_gone = True
            task.cancel()

    def _expire(self) -> None:
        """`total_timeout` is over: end the exchange, unless it is settling."""
        if not self._finished and self._task is not None:
            self._expired = True
            self._task.cancel()

    async def _exchange_in_time(self, attempts: Attempts, upload: Incoming | None) -> None:
        """`_exchange`, ended at `total_timeout` as any upstream failure ends: a 504 before
        the answer started, an error event or a cut connection after."""
        try:
            await self._exchange(attempts, upload)
        except asyncio.CancelledError:
            if not self._expired or self.generation.client_gone:
                raise
            assert self._task is not None
            self._task.uncancel()
        else:
            return
        if self._started:
            logger.warning("upstream answer not complete after total_timeout: cut")
            message = f"The upstream did not finish within {self.total_timeout:g} seconds."
            await self._fail(self._scanner, message, "timeout")
            return
        logger.warning(
            "upstream %s failed: no answer within total_timeout", self.generation.upstream
        )
        if upload is not None and upload.error is not None:
            self._upload_failed(upload.error)
        self.generation.failure = TIMED_OUT.kind
        raise TIMED_OUT.error()

    async def _exchange(self, attempts: Attempts, upload: Incoming | None) -> None:
        """Try the upstreams of `attempts` in turn until one answers, failing over only
        before anything reached the client: on a failure that left the upstream unable
        to act (a refused or reset connection), or an answer that says "not here, not
        now" (429, 500, 502, 503, 504), and never once an upload has begun to go up."""
        generation = self.generation
        started = time.perf_counter()
        targets = attempts.targets
        for index, target in enumerate(targets):
            call = attempts.build(target)
            generation.upstream, generation.attempts = target.name, index + 1
            generation.reached = True  # from here on it may have: count it unless proven otherwise
            attempts.started(target, call)
            try:
                if call.exchange is None:
                    answer = await self.send_upstream(call)
                else:  # a kind that speaks another API: its answer is translated
                    answer = await call.exchange(self.send_upstream)
            except asyncio.CancelledError:
                if self._expired:  # no answer within total_timeout
                    attempts.ended(target, None, None)
                    generation.upstream_time = time.perf_counter() - started
                else:
                    attempts.left(target)  # the client left: nothing learned of the upstream
                raise
            except Exception as exc:
                attempts.ended(target, None, None)
                generation.upstream_time = time.perf_counter() - started
                if upload is not None and upload.error is not None:
                    self._upload_failed(upload.error)  # what the client did, not the upstream
                if call.exchange is not None and isinstance(exc, ProxyError):
                    # A kind refuses so only before the provider had the request (no
                    # credentials to sign it with): nothing can have been billed.
                    generation.reached = False
                if not isinstance(exc, httpx.HTTPError | TimeoutError):
                    raise
                row = failure(exc)
                logger.warning("upstream %s failed: %s", target.name, type(exc).__name__)
                if row.failover and self._may_fail_over(index, targets, upload):
                    attempts.failed_over(target, targets[index + 1], row.kind)
                    continue
                generation.failure = row.kind
                generation.reached = generation.reached and row.reached
                raise row.error() from None
            status = answer.status
            wait = retry_after(answer.header("retry-after"))
            committed = isinstance(answer, Translated) and answer.committed
            if (
                status in FAILOVER_STATUSES
                and not committed
                and self._may_fail_over(index, targets, upload)
            ):
                attempts.ended(target, status, wait)
                attempts.failed_over(target, targets[index + 1], str(status))
                await answer.aclose()
                continue
            try:
                await self._answer(answer, started)
            finally:
                attempts.ended(target, status, wait)
            return

    @staticmethod
    def _may_fail_over(index: int, targets: Sequence[Target], upload: Incoming | None) -> bool:
        """Whether another upstream is left to try, and the request can still be sent to
        it: an upload whose bytes began to go up cannot."""
        return index < len(targets) - 1 and (upload is None or not upload.started)

    async def _answer(self, answer: Answer, started: float) -> None:
        generation = self.generation
        generation.ttfb = time.perf_counter() - started
        generation.upstream_status = status = answer.status
        generation.upstream_request_id = answer.header("x-request-id")
        if isinstance(answer, Translated) and answer.billed:
            generation.billed = True  # the provider took the work on: spent, though it failed
        if not 200 <= status < 300:
            generation.failure = "status"
        try:
            if not 200 <= status <= 599:
                # Informational (101 included) and made-up statuses: nothing a client of
                # this API can use, and uvicorn cannot even send the latter.
                generation.failure = INVALID_STATUS.kind
                logger.warning("upstream answered status %d", status)
                raise INVALID_STATUS.error()
            if self.storing is not None and 200 <= status < 300:
                answer = await self.storing.answer(answer)
                if answer.status != status:
                    generation.failure = "storage"  # made upstream (and paid), not kept
            await self._relay(answer)
        finally:
            # Closing is not interruptible: the watcher cancels only before this point.
            self._finished = True
            await answer.aclose()
            generation.upstream_time = time.perf_counter() - started

    def _upload_failed(self, error: ProxyError | ClientGone) -> None:
        """The client's upload failed on its way upstream: raise what the client did."""
        if isinstance(error, ClientGone):
            self.generation.client_gone = True
        raise error

    async def _relay(self, answer: Answer) -> None:
        send = self.send
        status = answer.status
        success = 200 <= status < 300
        scanner = None
        if success and (answer.header("content-type") or "").startswith("text/event-stream"):
            scanner = EventScanner(finals=self.images)
        inflate = inflater(answer)
        own = frozenset(name for name, _ in self.headers)
        headers = self.response_headers.filter(
            answer.raw_headers, own if scanner is None else own | _SSE_DROPPED
        )
        headers += self.headers
        if self.generation.upstream_request_id is None:
            headers.append((b"x-request-id", self.request_id))
        # The proxy's own id (its access log's and ledger's), whatever the upstream's is.
        headers.append((b"x-imagegen-request-id", self.request_id))
        if scanner is not None:
            headers += _SSE_HEADERS
        self._scanner, self._started = scanner, True
        trace = self.generation.trace
        if trace is not None:
            trace.answering(status)
            if scanner is not None:
                scanner.on_event = trace.event
        await send({"type": "http.response.start", "status": status, "headers": headers})
        tail = Tail() if scanner is None and success else None
        try:
            last = await self._body(answer, scanner, tail, inflate)
        except (httpx.HTTPError, zlib.error) as exc:
            logger.warning("upstream failed mid-response: %s", type(exc).__name__)
            failed = "timed out" if isinstance(exc, httpx.TimeoutException) else "failed"
            await self._fail(scanner, f"The upstream {failed} before the answer was complete.")
            return
        except OSError:
            raise
        except Exception:
            # Past the start nothing can be answered any more: log it and cut the connection.
            logger.exception("relay failed mid-response")
            self.generation.failure = "mid_stream"
            return
        if last is None:
            return  # failed, and answered so
        if scanner is not None and not scanner.done:
            await self._fail(
                scanner, "The upstream ended the stream before the image was completed."
            )
            return
        if scanner is not None:
            self.generation.usage = scanner.usage
        elif tail is not None:
            self.generation.usage = tokens_in(tail.data)
        self._finished = True  # settling must not be cancelled halfway
        await self.on_end(self.generation)
        await send({"type": "http.response.body", "body": last, "more_body": False})

    async def _body(
        self,
        answer: Answer,
        scanner: EventScanner | None,
        tail: Tail | None,
        inflate: zlib._Decompress | None,
    ) -> bytes | None:
        """Relay the body; return the chunk held back for the last message, or None when
        the answer failed (and was answered so)."""
        send = self.send
        generation = self.generation
        # With a content-length, the client has the whole answer with its last byte: that
        # chunk waits until the generation is settled, as the final empty message does else.
        length = None if scanner is not None else _content_length(answer)
        received = 0
        last = b""
        async for chunk in answer.chunks():
            received += len(chunk)
            if received > self.max_bytes:
                logger.warning("upstream answer over %d bytes: cut", self.max_bytes)
                message = f"The upstream's answer exceeded {self.max_bytes} bytes."
                await self._fail(scanner, message, "too_large")
                return None
            if scanner is None:
                if tail is not None:
                    for piece in decoded(chunk, inflate):
                        tail.feed(piece)
                generation.bytes_out += len(chunk)
                if generation.bytes_out == length:
                    last = chunk
                    continue  # to the end of the upstream body, so its connection is reused
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                continue
            for piece in decoded(chunk, inflate):
                out = scanner.feed(piece)
                if out:
                    generation.bytes_out += len(out)
                    await send({"type": "http.response.body", "body": out, "more_body": True})
            if scanner.malformed:
                logger.warning("upstream sent a malformed event stream: %s", scanner.malformed)
                await self._fail(scanner, "The upstream sent a malformed event stream.")
                return None
            if scanner.done:
                # The SDK's loop ends only when the connection does: end the response here
                # even if the upstream keeps its connection open.
                break
        return last

    async def _fail(
        self, scanner: EventScanner | None, message: str, kind: str = "mid_stream"
    ) -> None:
        """Answer a failure after the response started: an SSE error event, or abort."""
        self.generation.failure = kind
        if scanner is not None and scanner.completed:
            self.generation.usage = scanner.usage  # the images completed before still cost
        if scanner is None or not scanner.at_boundary:
            # Returning without completing the response makes the server cut the
            # connection: the client sees an incomplete body instead of a short one.
            return
        error = ProxyError(502, message, type="server_error", code="upstream_error")
        data = json.dumps({"type": "error", **error.envelope()}).encode()
        frame = b"event: error\ndata: " + data + b"\n\n"
        self.generation.bytes_out += len(frame)
        await self.send({"type": "http.response.body", "body": frame, "more_body": True})
        self._finished = True  # settling must not be cancelled halfway
        await self.on_end(self.generation)
        await self.send(_END)


def _content_length(answer: Answer) -> int | None:
    value = answer.header("content-length") or ""
    return int(value) if value.isdigit() else None

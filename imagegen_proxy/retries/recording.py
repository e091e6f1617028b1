"""One repeatable generation's answer, recorded as it streams, for any number of readers:
small answers in memory, larger ones in a spool file (see `idempotency`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..types import Message, Receive, Send
from ..wire.errors import ClientGone, ProxyError

logger = logging.getLogger("imagegen_proxy")

_READ = 256 * 1024  # a reader sends the spool on in pieces of at most this
_SMALL = 64 * 1024  # an answer up to this size stays in memory, not in a file
_REPLAYED = (b"idempotent-replayed", b"true")
_END: Message = {"type": "http.response.body", "body": b"", "more_body": False}
_SET = asyncio.Event()  # what a finished recording's readers find: nothing more to wait for
_SET.set()


@dataclass(frozen=True, slots=True)
class Marker:
    """What makes a request repeatable: its key in the registry, the digest of its body,
    and whether it may join an earlier one (an SDK's first attempt never does)."""

    key: str
    digest: str
    joins: bool
    explicit: bool  # an Idempotency-Key, rather than an SDK retry


class Recording:
    """One generation's answer, spooled to a file as it comes, for any number of readers.

    Its own client is one of them, and reads it as it goes: the generation sends to both
    (`tee`) and watches that client (`receiving`). When the client leaves, the generation
    goes on for `grace`, for a retry to join; others read the recording (`stream`)."""

    __slots__ = (
        "_buffer",
        "_dropped",
        "_fd",
        "_gone",
        "_grace",
        "_news",
        "_own",
        "_timer",
        "complete",
        "digest",
        "ended",
        "error",
        "finished_at",
        "key",
        "path",
        "readers",
        "request_id",
        "size",
        "start",
    )

    def __init__(
        self, marker: Marker, request_id: str, path: Path, grace: float, *, writing: bool = True
    ) -> None:
        # Plain strings, not the marker and the path: a finished recording is kept for
        # minutes, by the thousand, and each object of it is one more for the cyclic GC to
        # walk in a full collection (40,000 recordings: 94 -> 34 ms with strings).
        self.key, self.digest = marker.key, marker.digest  # its place in the registry
        self.request_id = request_id
        self.path = os.fspath(path)
        self._fd: int | None = None  # the spool file, once the answer outgrew `_SMALL`
        # A small answer stays in memory (a file costs more than the whole exchange).
        self._buffer: bytearray | None = bytearray() if writing else None
        self._grace = grace
        self.start: Message | None = None
        self.size = 0
        self.complete = False  # the answer's last message was written
        self.ended = False  # the generation is over (whole, failed or cut)
        self.error: ProxyError | None = None  # it failed before its answer started
        self.finished_at: float | None = None  # kept for replays since then
        self.readers = 1  # its own client, from the start
        self._own = True  # its own client is still there
        self._dropped = False  # its file goes when the last reader is done
        self._news = asyncio.Event()
        self._gone = asyncio.Event()  # every client left and `grace` ran out
        self._timer: asyncio.TimerHandle | None = None

    @classmethod
    def stored(
        cls, marker: Marker, request_id: str, path: Path, start: Message, size: int
    ) -> Recording:
        """A finished answer another process spooled at `path`, to replay (attached)."""
        recording = cls(marker, request_id, path, 0.0, writing=False)
        recording.start, recording.size = start, size
        recording.complete = recording.ended = True
        return recording

    @property
    def ok(self) -> bool:
        status = None if self.start is None else self.start["status"]
        return self.complete and status is not None and 200 <= status < 300

    # --- the generation's side: the relay's `send` and `receive` ------------------------

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.start = message
        elif message["type"] == "http.response.body":
            data = message.get("body", b"")
            if data:
                self._write(data)
            if not message.get("more_body", False):
                self.complete = True
        self._notify()

    def tee(self, send: Send) -> Send:
        """The generation's `send`: each message recorded, then sent to its own client
        while it is there."""

        async def send_both(message: Message) -> None:
            await self.send(message)
            if self._own:
                try:
                    await send(message)
                except (OSError, ClientGone):  # some servers raise once the client left
                    self.let_go()

        return send_both

    def receiving(self, receive: Receive) -> Receive:
        """The generation's client, as the relay sees it (`receive` is its own client's):
        gone only when every reader left and `grace` ran out."""

        async def receive_until_gone() -> Message:
            if self._own:
                while (await receive())["type"] != "http.disconnect":
                    pass
                if self._own:
                    logger.info(
                        "client left; generation %s goes on for its retries", self.request_id
                    )
                    self.let_go()  # its grace starts now
            await self._gone.wait()
            return {"type": "http.disconnect"}

        return receive_until_gone

    def let_go(self) -> None:
        """Its own client is done with it (left, or had the whole answer)."""
        if self._own:
            self._own = False
            self.detach()

    def _write(self, data: bytes) -> None:
        buffer = self._buffer
        if buffer is not None:
            if len(buffer) + len(data) <= _SMALL:
                buffer += data
                self.size += len(data)
                return
            # Outgrown: to the file, from here on (readers move over at their offset).
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            self._buffer = None
            data = bytes(buffer) + data
            self.size -= len(buffer)
        assert self._fd is not None
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        self.size += len(data)

    def fail(self, error: ProxyError) -> None:
        self.error = error
        self._notify()

    def end(self) -> None:
        self.ended = True
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._notify()
        # Kept for minutes, by the thousand: as few objects as can be for the collector.
        self._news = self._gone = _SET
        if self.start is not None:
            self.start = {**self.start, "headers": tuple(self.start["headers"])}

    def _notify(self) -> None:
        self._news.set()
        self._news = asyncio.Event()

    # --- the readers' side --------------------------------------------------------------

    def attach(self) -> None:
        """One more client will read it (`detach` when it is done)."""
        self.readers += 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def detach(self) -> None:
        self.readers -= 1
        if self.readers:
            return
        if self._dropped:
            unlink(self.path)
        elif not self.ended:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self._grace, self._expire)

    def spill(self) -> None:
        """Move a small answer held in memory to its file."""
        buffer = self._buffer
        if buffer is None:
            return
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(buffer)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        self._buffer = None

    @property
    def held(self) -> int:
        """Bytes of its answer held in memory (a small one's)."""
        return 0 if self._buffer is None else len(self._buffer)

    @property
    def dropped(self) -> bool:
        return self._dropped

    def drop(self) -> None:
        """Remove its file, now or once its last reader is done."""
        self._dropped = True
        if self.readers == 0:
            unlink(self.path)

    async def stream(self, receive: Receive, send: Send) -> int:
        """Send the answer to one attached client (a repeat), from its first byte, as it
        is written; return the body bytes sent. Raises the generation's `ProxyError` if it
        failed before its answer started, and `ClientGone` when the client leaves."""
        task = asyncio.current_task()
        assert task is not None
        left = False

        async def watch() -> None:
            nonlocal left
            while (await receive())["type"] != "http.disconnect":
                pass
            left = True
            task.cancel()

        watcher = asyncio.create_task(watch())
        try:
            return await self._stream(send)
        except asyncio.CancelledError:
            if not left:
                raise
            task.uncancel()
            raise ClientGone from None
        except OSError:
            raise ClientGone from None
        finally:
            watcher.cancel()

    def _open_at(self, offset: int) -> BinaryIO:
        # A local file in the page cache: opening and reading it does not wait on anything.
        # Never through a link: a spool path is this proxy's own file, or no file at all.
        fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        spool = os.fdopen(fd, "rb", buffering=0)
        spool.seek(offset)
        return spool

    async def _stream(self, send: Send) -> int:
        while self.start is None:
            if self.error is not None:
                raise self.error
            if self.ended:
                raise ProxyError(
                    502,
                    "The generation this request repeats ended without an answer.",
                    type="server_error",
                    code="upstream_error",
                )
            await self._news.wait()
        await send({**self.start, "headers": [*self.start["headers"], _REPLAYED]})
        sent = 0
        with contextlib.ExitStack() as stack:
            spool = None
            while True:
                if sent < self.size:
                    buffer = self._buffer
                    if buffer is not None:
                        chunk = bytes(buffer[sent : self.size])
                    else:
                        if spool is None:
                            spool = stack.enter_context(self._open_at(sent))
                        chunk = spool.read(min(_READ, self.size - sent))
                        if not chunk:  # shorter than recorded (cut or changed): end, cut
                            logger.warning(
                                "generation %s: its spool file ends at %d of %d bytes; "
                                "the replay is cut",
                                self.request_id,
                                sent,
                                self.size,
                            )
                            return sent
                    sent += len(chunk)
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                elif self.complete:
                    await send(_END)
                    return sent
                elif self.ended:
                    return sent  # cut: the server aborts the connection, as for the original
                else:
                    await self._news.wait()

    def _expire(self) -> None:
        self._timer = None
        if self.readers == 0 and not self.ended:
            logger.info(
                "generation %s: nobody came back within %g s; cancelled",
                self.request_id,
                self._grace,
            )
            self._gone.set()


def unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)

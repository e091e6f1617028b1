"""Multipart uploads (image edits and variations), parsed as they arrive and relayed as
they are parsed.

An upload is read until the text fields that decide the request are known (`Upload.head`):
normally the client sends them before its files, as the official SDK does, and the files
then stream to the upstream as they arrive (`Upload.body`). File parts that come before a
deciding field are spooled to an anonymous temporary file on disk (unlinked at creation,
so nothing is left behind even by a crash), never kept in memory. Memory per upload is one
received chunk plus the text fields, whatever the files weigh.

The upstream gets a multipart body the proxy encodes itself, with its own boundary: the
text fields first, then the files in the order they came, each part's name, filename and
content type as sent. Nothing but those parts reaches the upstream (no preamble, no other
part headers), and the `model` field can be rewritten on the way.

What a part may be, and its checks, are in `parts.py`; the spool is `spool.py`'s.
"""

from __future__ import annotations

import asyncio
import collections
import os
import secrets
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from python_multipart.multipart import MultipartParser

from ..types import Receive
from .errors import ClientGone, ProxyError, too_large
from .parts import (
    DECIDING,
    FILE_FIELDS,
    MAX_TEXT_BYTES,
    Part,
    add_field,
    boundary_of,
    check_file,
    invalid,
    part_of,
)
from .spool import SPOOL_STEP, SpoolOwner

# The upload, and what was imported from here before the parts and the spool had modules
# of their own.
__all__ = [
    "DECIDING",
    "FILE_FIELDS",
    "MAX_TEXT_BYTES",
    "SpoolOwner",
    "Spooled",
    "Upload",
    "boundary_of",
]


@dataclass(slots=True)
class Spooled:
    """A file part on the spool: where its bytes start, and how many."""

    part: Part
    offset: int
    length: int = 0


class Upload(SpoolOwner):
    """One multipart request body, read from `receive` as the request goes on.

    `max_bytes` bounds the body (413), `max_files` its file parts (400); `within` is how
    long the proxy waits for the client's bytes in all (408), not counting the time the
    upstream takes to take them.
    """

    def __init__(
        self,
        receive: Receive,
        boundary: bytes,
        *,
        max_bytes: int,
        max_files: int,
        within: float,
    ) -> None:
        self._receive = receive
        self._max_bytes, self.max_files = max_bytes, max_files
        self._wait_left = within
        self._within = within
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._on_part_begin,
                "on_header_field": self._on_header_field,
                "on_header_value": self._on_header_value,
                "on_header_end": self._on_header_end,
                "on_headers_finished": self._on_headers_finished,
                "on_part_data": self._on_part_data,
                "on_part_end": self._on_part_end,
                "on_end": self._on_end,
            },
        )
        # What the parser found in the chunks fed so far, not yet handled.
        self._events: collections.deque[tuple[str, Any]] = collections.deque()
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._ended = False  # the parser saw the closing boundary
        self._more = True  # the client has more body to send
        self._received = 0
        self._parts = 0
        self._current: Part | None = None  # the part being read (for errors)
        self.files: list[Part] = []  # the file parts seen so far
        self.fields: dict[str, str] = {}  # the text fields read before the files went upstream
        self._text_bytes = 0
        self._head: list[tuple[Part, bytes] | Spooled] = []
        self.started = False  # the body began to go upstream: it cannot be sent again
        self.complete = False  # the whole body went upstream
        self.error: ProxyError | ClientGone | None = None  # why the body could not be sent
        self.done = asyncio.Event()  # the client's body has been read to its end, or abandoned
        # The boundary of the body the upstream gets.
        self.boundary = b"imagegen-proxy-" + secrets.token_hex(16).encode()

    # -- the parser's callbacks: they only record, the reading below decides -------------

    def _on_part_begin(self) -> None:
        self._headers = {}

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        name = bytes(self._header_name).strip(b" \t").lower()
        self._headers[name] = bytes(self._header_value).strip(b" \t")
        self._header_name.clear()
        self._header_value.clear()

    def _on_headers_finished(self) -> None:
        self._events.append(("part", self._headers))

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        self._events.append(("data", data[start:end]))

    def _on_part_end(self) -> None:
        self._events.append(("end", None))

    def _on_end(self) -> None:
        self._ended = True

    # -- reading ---------------------------------------------------------------------------

    async def _pull(self) -> None:
        """Feed the parser the next chunk of the body; raise what the client did wrong."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            async with asyncio.timeout(self._wait_left):
                message = await self._receive()
        except TimeoutError:
            raise ProxyError(
                408,
                f"The request body did not arrive within {self._within:g} seconds.",
                code="request_timeout",
            ) from None
        self._wait_left -= loop.time() - started
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk: bytes = message.get("body", b"")
        self._received += len(chunk)
        if self._received > self._max_bytes:
            raise too_large(self._max_bytes)
        self._more = bool(message.get("more_body", False))
        try:
            if chunk:
                self._parser.write(chunk)
            if not self._more and not self._ended:
                raise ValueError("it ended before its closing boundary")
        except Exception as exc:  # python-multipart's parse errors, a header too long
            # After what was parsed before it, so that the error names the part it is in.
            self._events.append(("error", f"The multipart body is malformed: {exc}."))

    async def _next(self) -> tuple[str, Any] | None:
        """The next thing the parser found; None at the end of the body."""
        while not self._events:
            if not self._more:
                self.done.set()
                return None
            await self._pull()
        event = self._events.popleft()
        if event[0] == "end":
            self._current = None
        elif event[0] == "error":
            # The part being read, or the body itself: outside any part (a boundary that
            # is not the Content-Type's, a body cut off between parts).
            where = "body" if self._current is None else self._current.name
            raise invalid(event[1], where)
        return event

    def _begin(self, headers: Mapping[bytes, bytes]) -> Part:
        self._parts += 1
        part = part_of(headers, self._parts)
        self._current = part
        if part.is_file:
            check_file(part, self.fields, images=self.images, max_files=self.max_files)
            self.files.append(part)
        elif part.name in FILE_FIELDS:  # pragma: no cover - is_file covers them
            raise AssertionError(part.name)
        return part

    async def head(self, needed: Iterable[str]) -> dict[str, str]:
        """Read until the fields `needed` have come and a file part begins, or to the end
        of the body; return the text fields read (a checked field repeated is refused).

        File parts before that point are spooled to disk. Deciding fields that come later,
        after a file part has gone upstream, are refused by `body`.
        """
        missing = set(needed)
        try:
            while True:
                event = await self._next()
                if event is None:
                    return self.fields
                kind, value = event
                assert kind == "part", kind
                part = self._begin(value)
                if part.is_file and not missing:
                    self._events.appendleft(("begin", part))  # body() goes on from here
                    return self.fields
                if part.is_file:
                    await self._spool_part(part)
                else:
                    raw = await self._text(part)
                    self._head.append((part, raw))
                    add_field(self.fields, part.name, raw)
                    missing.discard(part.name)
        except (ProxyError, ClientGone) as exc:
            self._failed(exc)
            raise

    async def _text(self, part: Part) -> bytes:
        value = bytearray()
        while (event := await self._next()) is not None and event[0] == "data":
            value += event[1]
            self._text_bytes += len(event[1])
            if self._text_bytes > MAX_TEXT_BYTES:
                raise invalid(
                    f"The text fields exceed {MAX_TEXT_BYTES} bytes.", part.name, "field_too_large"
                )
        return bytes(value)

    async def _spool_part(self, part: Part) -> None:
        await self._spool_file()
        spooled = Spooled(part, self._spooled)
        self._head.append(spooled)
        pending: list[bytes] = []
        size = 0
        while (event := await self._next()) is not None and event[0] == "data":
            pending.append(event[1])
            size += len(event[1])
            if size >= SPOOL_STEP:  # one thread hop per step, not per received chunk
                await self._write(pending, size, spooled)
                pending, size = [], 0
        await self._write(pending, size, spooled)

    async def _write(self, pieces: list[bytes], size: int, spooled: Spooled) -> None:
        if size:
            assert self._spool is not None
            await asyncio.to_thread(self._spool.write, b"".join(pieces))
            spooled.length += size
            self._spooled += size

    async def body(self, rewrite: Mapping[str, str | None] | None = None) -> AsyncIterator[bytes]:
        """The body the upstream gets: the head (with the text fields in `rewrite` replaced
        or added, or left out where their value is None), then the rest of the client's
        body as it arrives.

        A failure (the client left, sent too much or too slowly, or a deciding field after
        the files) is kept in `error` and raised: the upstream gets a body without its end,
        which it cannot mistake for a whole request.
        """
        boundary = self.boundary
        rewrite = dict(rewrite or {})
        self.started = True
        try:
            yield self._fields(boundary, rewrite)
            for item in self._head:
                if isinstance(item, Spooled):
                    async for chunk in self._unspool(item, boundary):
                        yield chunk
            async for chunk in self._rest(boundary, rewrite):
                yield chunk
            yield b"--" + boundary + b"--\r\n"
            self.complete = True
        except (ProxyError, ClientGone) as exc:
            self._failed(exc)
            raise
        finally:
            self.done.set()  # an upstream that stopped reading early abandons the rest

    def _fields(self, boundary: bytes, rewrite: dict[str, str | None]) -> bytes:
        out = bytearray()
        for name, value in rewrite.items():
            if value is not None:  # None: the field is left out
                out += Part(name, None, None).head(boundary) + value.encode() + b"\r\n"
        for item in self._head:
            if not isinstance(item, Spooled) and item[0].name not in rewrite:
                out += item[0].head(boundary) + item[1] + b"\r\n"
        return bytes(out)

    async def _unspool(self, item: Spooled, boundary: bytes) -> AsyncIterator[bytes]:
        spool = self._spool
        assert spool is not None
        yield item.part.head(boundary)
        left = item.length
        await asyncio.to_thread(spool.seek, item.offset)
        while left:
            chunk = await asyncio.to_thread(spool.read, min(left, SPOOL_STEP))
            left -= len(chunk)
            yield chunk
        yield b"\r\n"

    async def _rest(
        self, boundary: bytes, rewrite: Mapping[str, str | None]
    ) -> AsyncIterator[bytes]:
        """The parts after the head, one received chunk at a time."""
        out: list[bytes] = []
        skipping = False
        while True:
            if not self._events and out:
                # What one received chunk made, in one piece; a lone piece is not copied.
                yield out[0] if len(out) == 1 else b"".join(out)
                out.clear()
            event = await self._next()
            if event is None:
                break
            kind, value = event
            if kind == "part":
                value = self._begin(value)
                kind = "begin"
            if kind == "begin":
                part: Part = value
                if not part.is_file and part.name in DECIDING and part.name not in rewrite:
                    raise invalid(
                        f"'{part.name}' came after a file: send the text fields "
                        "before the files (as the OpenAI SDK does).",
                        part.name,
                        "field_after_files",
                    )
                skipping = part.name in rewrite  # replaced already: never twice
                if not skipping:
                    out.append(part.head(boundary))
            elif skipping:
                continue
            elif kind == "data":
                out.append(value)
            else:
                out.append(b"\r\n")
        if out:
            yield b"".join(out)

    async def spool_rest(self) -> list[tuple[Part, Spooled]]:
        """Read the rest of the body to disk, for an upstream that takes the files in a
        body of its own (base64 inside JSON, several calls): the file parts, in order.

        Text fields after the files are read as `head` reads them (a deciding one is
        refused, as `body` refuses it). The body counts as sent whole once it is on disk.
        """
        self.started = True
        try:
            while (event := await self._next()) is not None:
                kind, value = event
                part = self._begin(value) if kind == "part" else value
                assert kind in ("part", "begin"), kind
                if part.is_file:
                    await self._spool_part(part)
                elif part.name in DECIDING:
                    raise invalid(
                        f"'{part.name}' came after a file: send the text fields "
                        "before the files (as the OpenAI SDK does).",
                        part.name,
                        "field_after_files",
                    )
                else:
                    add_field(self.fields, part.name, await self._text(part))
        except (ProxyError, ClientGone) as exc:
            self._failed(exc)
            raise
        if self._spool is not None:
            await asyncio.to_thread(self._spool.flush)  # `spooled` reads the file, not its buffer
        self.complete = True
        self.done.set()
        return [(item.part, item) for item in self._head if isinstance(item, Spooled)]

    async def spooled(self, item: Spooled) -> AsyncIterator[bytes]:
        """A spooled file's bytes, read at their offset (several readers at once may read
        the spool: no shared file position is used)."""
        spool = self._spool
        assert spool is not None
        at, end = item.offset, item.offset + item.length
        while at < end:
            chunk = await asyncio.to_thread(os.pread, spool.fileno(), min(end - at, SPOOL_STEP), at)
            if not chunk:
                raise OSError("the upload's spool ended early")
            at += len(chunk)
            yield chunk

    def _failed(self, exc: ProxyError | ClientGone) -> None:
        if self.error is None:
            self.error = exc
        self.done.set()

    @property
    def images(self) -> int:
        """The file parts seen so far that are not the mask: the input images."""
        return sum(part.name != "mask" for part in self.files)

    @property
    def content_type(self) -> bytes:
        """The Content-Type of the body the upstream gets."""
        return b"multipart/form-data; boundary=" + self.boundary

"""Image edits with a JSON body (OpenAI's `images: [{"image_url"} | {"file_id"}]` form),
read without holding their images in memory.

A JSON edit carries its input images inline, as data URLs of up to 20 MB each: sixteen of
them make a body of over 300 MB. Nothing in JSON is decided until its last byte (a key may
come anywhere), so the body is read to its end; as it arrives, each string longer than
`LONG_STRING` bytes (in practice, the images) goes to an anonymous temporary file on disk,
and a placeholder keeps its place. What stays in memory is the rest, the skeleton: the
fields the proxy decides on, at most `MAX_TEXT_BYTES` of them, checked by pydantic as any
JSON body is. A long string is checked as it goes to disk (its escapes, its UTF-8), so the
body the upstream gets is valid JSON wherever the proxy did not parse it itself.

The upstream gets the body re-encoded from the checked fields (its `model` rewritten where
an upstream needs it), each placeholder replaced by its string's bytes as the client sent
them, read back from disk. The whole body is on disk before anything goes up, so unlike a
multipart upload it can be sent again: to the next upstream of a pool.
"""

from __future__ import annotations

import asyncio
import codecs
import os
import re
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import IO, Any

from ..types import Receive
from .errors import ClientGone, ProxyError, too_large
from .parts import MAX_TEXT_BYTES
from .spool import SPOOL_STEP, SpoolOwner
from .upload import Upload

# A string longer than this (as sent, escapes included) goes to disk. A prompt of 32,000
# characters is at most 192 KB even with every character escaped: it stays in memory.
LONG_STRING = 256 * 1024
# OpenAI's ImageRefParam: an image_url (https or a base64 data URL) of at most 20 MiB.
MAX_IMAGE_URL = 20 * 1024 * 1024
# Where a string's scan stops: its end, an escape, or a control character (not allowed).
_STOP = re.compile(rb'["\\\x00-\x1f]')
_ESCAPED = frozenset(b'"\\/bfnrtu')
_HEX = frozenset(b"0123456789abcdefABCDEF")
_QUOTE, _BACKSLASH, _U = 0x22, 0x5C, 0x75


@dataclass(slots=True)
class Spooled:
    """A long string on disk: where its bytes (as sent, between the quotes) are, and how
    many characters it decodes to."""

    offset: int
    size: int = 0
    characters: int = 0


def _malformed(reason: str) -> ProxyError:
    return ProxyError(
        400,
        f"We could not parse the JSON body of your request: {reason}.",
        code="invalid_json",
    )


class JsonUpload(SpoolOwner):
    """One JSON edit body, read from `receive` by `read`, sent upstream by `body`.

    `max_bytes` bounds the body (413) and `within` how long the proxy waits for all of it
    (408). It offers what the relay asks of a multipart `Upload`: `done` and `error` (read
    before the relay starts, so never an error), `complete` (the last body sent went up
    whole) and `started`, always false: the body is on disk and can be sent again.
    """

    started = False
    error: ProxyError | ClientGone | None = None
    content_type = b"application/json"

    def __init__(self, receive: Receive, *, max_bytes: int, within: float) -> None:
        self._receive = receive
        self._max_bytes, self._within = max_bytes, within
        self._received = 0
        # Placeholders carry a secret of this request: a client cannot write one.
        self._sentinel = "\x00" + secrets.token_hex(16) + ":"
        self._placeholder = re.compile(rb'"\\u0000' + self._sentinel[1:-1].encode() + rb':(\d+)"')
        self._skeleton = bytearray()
        self._in_string = False
        self._short = bytearray()  # the string being read, while it is short
        self._long: Spooled | None = None  # the string being read, once it is long
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._escapes = 0  # characters the long string's escapes add to its text
        self._carry = b""  # an escape cut by the end of a chunk, read with the next
        self.strings: list[Spooled] = []
        self._pending: list[bytes] = []
        self._pending_size = 0
        self.complete = False
        self.done = asyncio.Event()

    async def read(self) -> bytes:
        """Read the body to its end; return its skeleton, the JSON text without its long
        strings (each a placeholder, see `spooled`)."""
        try:
            async with asyncio.timeout(self._within):
                while True:
                    message = await self._receive()
                    if message["type"] == "http.disconnect":
                        raise ClientGone
                    chunk: bytes = message.get("body", b"")
                    self._received += len(chunk)
                    if self._received > self._max_bytes:
                        raise too_large(self._max_bytes)
                    if chunk:
                        self._feed(chunk)
                        if self._pending_size >= SPOOL_STEP:
                            await self._flush()
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            raise ProxyError(
                408,
                f"The request body did not arrive within {self._within:g} seconds.",
                code="request_timeout",
            ) from None
        finally:
            self.done.set()
        if self._in_string or self._carry:
            raise _malformed("it ends inside a string")
        await self._flush()
        return bytes(self._skeleton)

    def spooled(self, value: object) -> Spooled | None:
        """The long string `value` stands for, if it is one of this body's placeholders."""
        if isinstance(value, str) and value.startswith(self._sentinel):
            index = value[len(self._sentinel) :]
            if index.isdigit() and int(index) < len(self.strings):
                return self.strings[int(index)]
        return None

    def placeholders(
        self, value: Any, path: tuple[str | int, ...] = ()
    ) -> Iterator[tuple[tuple[str | int, ...], Spooled]]:
        """Each long string in the parsed `value`, with where it is."""
        if isinstance(value, dict):
            for key, item in value.items():
                yield from self.placeholders(item, (*path, key))
        elif isinstance(value, list):
            for index, item in enumerate(value):
                yield from self.placeholders(item, (*path, index))
        elif (spooled := self.spooled(value)) is not None:
            yield path, spooled

    async def body(self, encoded: bytes) -> AsyncIterator[bytes]:
        """The body the upstream gets: `encoded` (the checked fields, as JSON) with each
        placeholder replaced by its string, read back from disk."""
        self.complete = False
        pieces = self._placeholder.split(encoded)
        for index, piece in enumerate(pieces):
            if index % 2 == 0:
                if piece:
                    yield piece
                continue
            yield b'"'
            async for chunk in self._unspool(self.strings[int(piece)]):
                yield chunk
            yield b'"'
        self.complete = True

    # -- the scan ------------------------------------------------------------------------

    def _feed(self, chunk: bytes) -> None:
        """Scan one received chunk: text outside strings and short strings go to the
        skeleton, long strings to the spool, checked on the way."""
        data = self._carry + chunk if self._carry else chunk
        self._carry = b""
        at, end = 0, len(data)
        while at < end:
            if not self._in_string:
                quote = data.find(b'"', at)
                if quote < 0:
                    self._keep(data[at:] if at else data)
                    return
                self._keep(data[at : quote + 1])
                self._in_string, at = True, quote + 1
                continue
            run, found = at, None  # this string's text from `run` on is checked so far
            while (found := _STOP.search(data, at)) is not None:
                stop = found.start()
                byte = data[stop]
                if byte == _QUOTE:
                    break
                if byte != _BACKSLASH:
                    raise _malformed("a string holds a control character (escape it)")
                width = 6 if stop + 1 < end and data[stop + 1] == _U else 2
                if stop + width > end:  # the escape goes on in the next chunk
                    self._text(data[run:stop])
                    self._carry = data[stop:]
                    return
                self._escape(data[stop + 1 : stop + width])
                at = stop + width
            if found is None:
                self._text(data[run:] if run else data)
                return
            self._text(data[run : found.start()])
            self._close_string()
            at = found.start() + 1

    def _escape(self, escape: bytes) -> None:
        if escape[0] not in _ESCAPED or (escape[0] == _U and not _HEX.issuperset(escape[1:])):
            raise _malformed("a string holds an invalid escape")
        self._escapes += len(escape)  # "\n" is 2 characters of text for 1, "\u00e9" 6 for 1

    def _text(self, text: bytes) -> None:
        """Some of the current string's text (as sent)."""
        if not text:
            return
        if self._long is None:
            self._short += text
            if len(self._short) <= LONG_STRING:
                return
            self._long = Spooled(self._spooled)
            text, self._short = bytes(self._short), bytearray()
        try:
            self._long.characters += len(self._decoder.decode(text))
        except UnicodeDecodeError:
            raise _malformed("a string is not UTF-8") from None
        self._long.size += len(text)
        self._spooled += len(text)
        self._pending.append(text)
        self._pending_size += len(text)

    def _close_string(self) -> None:
        self._in_string = False
        long, self._long = self._long, None
        if long is None:
            self._keep(self._short + b'"')
            self._short.clear()
            self._escapes = 0
            return
        try:
            self._decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise _malformed("a string is not UTF-8") from None
        self._decoder.reset()
        long.characters -= self._escapes
        self._escapes = 0
        placeholder = self._sentinel.replace("\x00", "\\u0000") + str(len(self.strings))
        self.strings.append(long)
        self._keep(placeholder.encode() + b'"')

    def _keep(self, text: bytes | bytearray) -> None:
        self._skeleton += text
        if len(self._skeleton) > MAX_TEXT_BYTES:
            raise ProxyError(
                400,
                f"The JSON body's fields, its images aside, exceed {MAX_TEXT_BYTES} bytes.",
                code="field_too_large",
            )

    # -- the spool -------------------------------------------------------------------------

    async def _flush(self) -> None:
        if not self._pending:
            return
        spool = await self._spool_file()
        pending, self._pending, self._pending_size = self._pending, [], 0
        await asyncio.to_thread(_write, spool, b"".join(pending))

    async def _unspool(self, spooled: Spooled) -> AsyncIterator[bytes]:
        assert self._spool is not None
        fd = self._spool.fileno()
        offset, left = spooled.offset, spooled.size
        while left:
            # pread: no shared file position, whatever else reads the spool meanwhile.
            chunk = await asyncio.to_thread(os.pread, fd, min(left, SPOOL_STEP), offset)
            if not chunk:  # pragma: no cover - the spool is this process's own file
                raise OSError("the spool file is shorter than what was written to it")
            offset += len(chunk)
            left -= len(chunk)
            yield chunk


def _write(spool: IO[bytes], data: bytes) -> None:
    spool.write(data)
    spool.flush()  # `_unspool` reads the file itself, under Python's buffer


# The body of an edit or variation, either way it comes.
Incoming = Upload | JsonUpload

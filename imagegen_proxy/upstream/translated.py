"""Answers in OpenAI's wire made from a provider's own: what a kind that speaks another API
(Gemini, FLUX, Stability, Bedrock) hands the relay in place of the upstream's answer.

A kind makes its images as `shot`s: one provider call each, an async iterator of `Piece`s
(base64 pieces of an image as they arrive, `ImageDone` at each image's end, the call's
`Usage`), raising `ProviderError` when the provider refused or failed. `translate` turns
them into a `Translated` answer, JSON or SSE as the client asked:

- one call: nothing is answered until the first piece of the first image has come, so a
  refusal (a safety block that arrives as an HTTP 200, an unknown model) is a clean
  OpenAI-shaped error; from there the image streams through, never held whole;
- several calls at once (`n` images where the provider makes one per call): they run side
  by side, each image spooled to an anonymous temporary file (disk, not memory) until all
  have ended; the images that were made are answered, so that what was paid for is not
  lost, and only when none was is the first refusal answered.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import struct
import tempfile
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO

import httpx

from ..wire.errors import ProxyError
from ..wire.jsonstream import Event, JsonEvents, JsonStreamError
from ..wire.request import ImageRequest
from ..wire.usage import Usage
from .call import Answer

RawHeaders = list[tuple[bytes, bytes]]
logger = logging.getLogger("imagegen_proxy")

_JSON = (b"content-type", b"application/json")
_SSE = (b"content-type", b"text/event-stream")
_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
_SNIFF = 96 * 1024  # base64 bytes of an image's start read for its format and size
_CHUNK = 64 * 1024


@dataclass(frozen=True, slots=True)
class ImageDone:
    """The end of one image of a shot."""


Piece = bytes | ImageDone | Usage
Pieces = AsyncGenerator[Piece, None]
Shot = Callable[[], Pieces]


class ProviderError(ProxyError):
    """A provider refused or failed, as the client is to be told. `billed`: the provider
    had accepted the work (a submitted task), so it counts as spent even though it failed;
    `retry_after`: seconds the provider asked to wait, for the client and the pool."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        billed: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(status, message, type=type, param=param, code=code)
        self.billed = billed
        self.retry_after = retry_after


def content_policy(message: str, *, billed: bool = False) -> ProviderError:
    """A safety block: OpenAI's `content_policy_violation`, not worth retrying."""
    return ProviderError(400, message, code="content_policy_violation", billed=billed)


def broken(provider: str, what: str) -> httpx.DecodingError:
    """A provider answer the proxy cannot read, once the answer has started."""
    return httpx.DecodingError(f"{provider} sent {what}")


class Translated:
    """An `Answer` made here: its status and headers known, its body an iterator.
    `committed`: the provider accepted the work, so another upstream must not be tried;
    `billed`: it counts as spent whatever the status."""

    def __init__(
        self,
        status: int,
        headers: RawHeaders,
        body: AsyncIterator[bytes],
        *,
        committed: bool,
        billed: bool = False,
        closing: Sequence[Callable[[], object]] = (),
        inner: Answer | None = None,
    ) -> None:
        self._status = status
        self._headers = headers
        self._body = body
        self.committed = committed
        self.billed = billed
        self._closing = closing
        self._inner = inner  # an answer this one is made from, closed with it

    @property
    def status(self) -> int:
        return self._status

    @property
    def raw_headers(self) -> RawHeaders:
        return self._headers

    def header(self, name: str) -> str | None:
        raw = name.encode("latin-1")
        for key, value in self._headers:
            if key == raw:
                return value.decode("latin-1")
        return None

    def chunks(self) -> AsyncIterator[bytes]:
        return self._body

    async def aclose(self) -> None:
        aclose = getattr(self._body, "aclose", None)
        try:
            if aclose is not None:
                await aclose()
        finally:
            for close in self._closing:
                close()
            if self._inner is not None:
                await self._inner.aclose()


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


def refused(error: ProxyError, headers: Sequence[tuple[bytes, bytes]] = ()) -> Translated:
    """`error` as an OpenAI-shaped answer."""
    body = json.dumps(error.envelope()).encode()
    out: RawHeaders = [_JSON, *headers]
    out += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in error.headers]
    billed = isinstance(error, ProviderError) and error.billed
    if error.code in ("content_policy_violation", "insufficient_quota"):
        out.append((b"x-should-retry", b"false"))
    if isinstance(error, ProviderError) and error.retry_after is not None:
        out.append((b"retry-after", b"%d" % max(1, round(error.retry_after))))
    return Translated(error.status, out, _once(body), committed=billed, billed=billed)


class Sniffed:
    """An image's format and pixel size, read from the start of its base64."""

    __slots__ = ("_head", "format", "size")

    def __init__(self) -> None:
        self._head = bytearray()
        self.format: str | None = None
        self.size: str | None = None

    def feed(self, b64: bytes) -> None:
        if len(self._head) < _SNIFF:
            self._head += b64[: _SNIFF - len(self._head)]

    def read(self) -> None:
        head = bytes(self._head[: len(self._head) // 4 * 4])
        try:
            data = base64.b64decode(head)
        except binascii.Error:
            return
        self.format, dimensions = image_info(data)
        if dimensions is not None:
            self.size = "{}x{}".format(*dimensions)


def image_info(data: bytes) -> tuple[str | None, tuple[int, int] | None]:
    """The format (`png`, `jpeg`, `webp`) and (width, height) of an image from its first
    bytes, as far as they tell."""
    if data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) >= 24 and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        return "png", (width, height)
    if data.startswith(b"\xff\xd8"):
        return "jpeg", _jpeg_size(data)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp", _webp_size(data)
    return None, None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    at = 2
    while at + 9 < len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            at += 2
            continue
        length = struct.unpack(">H", data[at + 2 : at + 4])[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", data[at + 5 : at + 9])
            return width, height
        at += 2 + length
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        width = 1 + int.from_bytes(data[24:27], "little")
        return width, 1 + int.from_bytes(data[27:30], "little")
    if chunk == b"VP8 " and len(data) >= 30:
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


async def json_pieces(
    answer: Answer, provider: str, read: Callable[[list[Event]], list[Piece]]
) -> Pieces:
    """A JSON answer read as a stream of events, which `read` turns into pieces (an image
    string's pieces as they arrive); what is not one JSON document fails as `broken`."""
    events = JsonEvents()
    try:
        async for chunk in answer.chunks():
            for piece in read(events.feed(chunk)):
                yield piece
        events.end()
    except JsonStreamError as exc:
        raise broken(provider, f"an answer that is not JSON ({exc})") from None


class ImageStrings:
    """The images of a JSON answer that are the strings at `prefix`: their pieces (checked
    to be base64) as they arrive, each ended by `ImageDone`; past `most` images, the rest
    are skipped (more than was asked for is not paid twice)."""

    __slots__ = ("_in_image", "images", "most", "prefix", "provider")

    def __init__(self, prefix: str, provider: str, most: int | None = None) -> None:
        self.prefix, self.provider, self.most = prefix, provider, most
        self.images = 0
        self._in_image = False

    def take(self, prefix: str, kind: str, value: object, out: list[Piece]) -> bool:
        """Add to `out` what the event says of the images; whether it was one of theirs."""
        if prefix != self.prefix:
            return False
        if kind == "string" and (self._in_image or self.most is None or self.images < self.most):
            assert isinstance(value, bytes)
            check_base64(value, self.provider)
            self._in_image = True
            out.append(value)
        elif kind == "string_end" and self._in_image:
            self._in_image = False
            self.images += 1
            out.append(ImageDone())
        return True


def check_base64(piece: bytes, provider: str) -> None:
    """Refuse a piece that is not base64 (it would break the JSON it is written into)."""
    if piece.translate(None, _B64_ALPHABET):
        raise broken(provider, "an image that is not base64")


class Base64Pieces:
    """Raw image bytes, as they arrive, to base64 pieces of at most `PIECE` bytes of input
    each: a network chunk (often most of a megabyte) is neither copied nor encoded whole.
    A chunk's last bytes, up to two, wait for the next."""

    __slots__ = ("_rest",)
    PIECE = 48 * 1024  # a multiple of 3

    def __init__(self) -> None:
        self._rest = b""

    def feed(self, data: bytes) -> Iterator[bytes]:
        view = memoryview(data)
        if self._rest:
            need = 3 - len(self._rest)
            if len(view) < need:
                self._rest += bytes(view)
                return
            yield base64.b64encode(self._rest + bytes(view[:need]))
            view, self._rest = view[need:], b""
        cut = len(view) - len(view) % 3
        for at in range(0, cut, self.PIECE):
            yield base64.b64encode(view[at : min(at + self.PIECE, cut)])
        self._rest = bytes(view[cut:])

    def end(self) -> bytes:
        rest, self._rest = self._rest, b""
        return base64.b64encode(rest)


class _Writer:
    """OpenAI's answer around images that arrive as base64 pieces: one JSON object, or one
    `*.completed` SSE event per image."""

    def __init__(self, request: ImageRequest) -> None:
        self.stream = request.stream
        self.event = b"image_edit" if request.operation == "edit" else b"image_generation"
        self.created = int(time.time())
        self.images = 0
        self.first: Sniffed | None = None

    def start(self) -> bytes:
        self.images += 1
        if self.stream:
            return b'event: %s.completed\ndata: {"type":"%s.completed","b64_json":"' % (
                self.event,
                self.event,
            )
        head = b'{"created":%d,"data":[' % self.created if self.images == 1 else b","
        return head + b'{"b64_json":"'

    def done(self, sniffed: Sniffed, usage: Usage | None) -> bytes:
        if self.first is None:
            self.first = sniffed
        if not self.stream:
            return b'"}'
        return b'"' + _described(sniffed, created_at=self.created) + _usage(usage) + b"}\n\n"

    def end(self, usage: Usage | None) -> bytes:
        if self.stream:
            return b""
        described = _described(self.first) if self.first is not None else b""
        return b"]" + described + _usage(usage) + b"}"


def _described(sniffed: Sniffed, created_at: int | None = None) -> bytes:
    out = b"" if created_at is None else b',"created_at":%d' % created_at
    if sniffed.format is not None:
        out += b',"output_format":"%s"' % sniffed.format.encode()
    if sniffed.size is not None:
        out += b',"size":"%s"' % sniffed.size.encode()
    return out


def _usage(usage: Usage | None) -> bytes:
    if usage is None:
        return b""
    value = {
        "total_tokens": usage.input_tokens + usage.output_tokens,
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "input_tokens_details": {
            "text_tokens": usage.input_text_tokens,
            "image_tokens": usage.input_image_tokens,
        },
        "output_tokens_details": {
            "text_tokens": usage.output_text_tokens,
            "image_tokens": usage.output_tokens - usage.output_text_tokens,
        },
    }
    return b',"usage":' + json.dumps(value, separators=(",", ":")).encode()


def _total(usages: Sequence[Usage]) -> Usage | None:
    if not usages:
        return None
    total = Usage()
    for usage in usages:
        total = total + usage
    return total


async def translate(
    request: ImageRequest, shot: Shot, calls: int, headers: Sequence[tuple[bytes, bytes]] = ()
) -> Translated:
    """The answer to `request` made by `calls` shots (one call making all its images, or
    one call per image side by side); `headers` go with it (the provider's request id)."""
    if calls == 1:
        return await _streamed(request, shot(), list(headers))
    return await _side_by_side(request, shot, calls, list(headers))


async def _streamed(request: ImageRequest, pieces: Pieces, headers: RawHeaders) -> Translated:
    held: list[Piece] = []
    try:
        while True:
            try:
                piece = await anext(pieces)
            except StopAsyncIteration:
                raise ProviderError(
                    502,
                    "The upstream answered without an image.",
                    type="server_error",
                    code="upstream_error",
                ) from None
            held.append(piece)
            if isinstance(piece, bytes) and piece:
                break
    except ProviderError as error:
        await pieces.aclose()
        return refused(error, headers)
    except BaseException:
        await pieces.aclose()
        raise
    writer = _Writer(request)
    ctype = _SSE if writer.stream else _JSON
    return Translated(
        200,
        [ctype, *headers],
        _stream_body(writer, held, pieces, request.images),
        committed=True,
    )


async def _stream_body(
    writer: _Writer, held: list[Piece], pieces: Pieces, wanted: int
) -> AsyncIterator[bytes]:
    """The answer's bytes from one shot's pieces: the held ones, then the rest."""
    usages: list[Usage] = []
    sniffed: Sniffed | None = None
    last: bytes | None = None  # the last image's closing, held until its usage is known

    async def all_pieces() -> AsyncIterator[Piece]:
        for piece in held:
            yield piece
        async for piece in pieces:
            yield piece

    try:
        async for piece in all_pieces():
            if isinstance(piece, Usage):
                usages.append(piece)
            elif isinstance(piece, ImageDone):
                if sniffed is None:
                    continue
                sniffed.read()
                if writer.stream:
                    # The event's usage is the call's, known only at its end: hold the
                    # last event's closing until then.
                    if last is not None:
                        yield last
                    last = _placeholder(sniffed)
                else:
                    yield writer.done(sniffed, None)
                sniffed = None
            elif piece:
                if sniffed is None:
                    if writer.images >= wanted:
                        continue  # more images than asked for: not paid for twice, dropped
                    if last is not None:
                        yield last
                        last = None
                    yield writer.start()
                    sniffed = Sniffed()
                sniffed.feed(piece)
                yield piece
    except ProviderError as error:
        raise httpx.DecodingError(error.message) from None
    finally:
        await pieces.aclose()
    if sniffed is not None:
        raise httpx.DecodingError("The upstream ended an image before it was complete.")
    usage = _total(usages)
    if last is not None:
        yield last[:-3] + _usage(usage) + b"}\n\n"
    elif writer.images == 0:
        raise httpx.DecodingError("The upstream answered without an image.")
    yield writer.end(usage)


def _placeholder(sniffed: Sniffed) -> bytes:
    """A streamed image's closing, its usage still to add before the final `}\\n\\n`."""
    return b'"' + _described(sniffed, created_at=int(time.time())) + b"}\n\n"


@dataclass(slots=True)
class _Spooled:
    file: IO[bytes] | None = None
    sniffed: Sniffed | None = None
    usage: Usage | None = None
    error: ProviderError | None = None


async def _spool(pieces: Pieces, into: _Spooled) -> None:
    """One shot's image into its own temporary file; its refusal kept, not raised."""
    try:
        async for piece in pieces:
            if isinstance(piece, Usage):
                into.usage = piece if into.usage is None else into.usage + piece
            elif isinstance(piece, ImageDone):
                if into.sniffed is not None:
                    into.sniffed.read()
            elif piece:
                if into.file is None:
                    into.file = tempfile.TemporaryFile()  # noqa: SIM115 (closed with the answer)
                    into.sniffed = Sniffed()
                assert into.sniffed is not None
                into.file.write(piece)
                into.sniffed.feed(piece)
    except ProviderError as error:
        into.error = error
    except (httpx.HTTPError, TimeoutError, ProxyError, OSError) as exc:
        # Kept, not raised: the other shots' images still count.
        if isinstance(exc, ProxyError):
            into.error = ProviderError(exc.status, exc.message, type=exc.type, code=exc.code)
        else:
            logger.warning("provider call failed: %s", type(exc).__name__)
            into.error = ProviderError(
                502,
                f"The upstream failed before the image was complete ({type(exc).__name__}).",
                type="server_error",
                code="upstream_error",
            )
    finally:
        await pieces.aclose()


async def _side_by_side(
    request: ImageRequest, shot: Shot, calls: int, headers: RawHeaders
) -> Translated:
    spooled = [_Spooled() for _ in range(calls)]

    def close() -> None:
        for one in spooled:
            if one.file is not None:
                one.file.close()

    try:
        async with asyncio.TaskGroup() as group:
            for one in spooled:
                group.create_task(_spool(shot(), one))
    except BaseException:
        close()
        raise
    made = [one for one in spooled if one.file is not None and one.error is None]
    if not made:
        close()
        errors = [one.error for one in spooled if one.error is not None]
        error = errors[0] if errors else ProviderError(502, "The upstream made no image.")
        if any(e.billed for e in errors) and isinstance(error, ProviderError):
            error.billed = True
        return refused(error, headers)
    writer = _Writer(request)
    ctype = _SSE if writer.stream else _JSON
    body = _spooled_body(writer, made)
    return Translated(200, [ctype, *headers], body, committed=True, closing=[close])


async def _spooled_body(writer: _Writer, made: list[_Spooled]) -> AsyncIterator[bytes]:
    usages = [one.usage for one in made if one.usage is not None]
    for one in made:
        assert one.file is not None and one.sniffed is not None
        yield writer.start()
        one.file.seek(0)
        while chunk := one.file.read(_CHUNK):
            yield chunk
        yield writer.done(one.sniffed, one.usage if writer.stream else None)
    yield writer.end(_total(usages))

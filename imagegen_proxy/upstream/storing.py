"""Images kept in the `[storage]` store as an answer streams through (`response_format="url"`,
or `[storage] keep = "always"`), whatever the upstream's kind.

The answer, in OpenAI's wire (the upstream's own, or a translated one), is read as a
stream of JSON events (`wire.jsonstream`); each image's `b64_json` string is decoded as its
pieces arrive and written to the store in bounded parts, never held whole.

- A JSON answer with images as URLs is read to its end first, images to the store, and
  answered once every image is kept: what is held is the answer without its images (a few
  hundred bytes an image). So a store that fails is a clean 502 `storage_unavailable` (or,
  with `on_error = "inline"`, the base64 the client would have had, spooled to disk
  meanwhile), and never a URL to an object that was not written.
- An event stream goes on as it comes: partial images stay base64 (they are small); each
  `*.completed` event is held back until its image is kept, then sent with its URL. A
  failing store ends the stream with an `error` event at that boundary.
- Kept but asked for as base64 (`keep = "always"`): the answer passes as it is, the images
  copied to the store on the way; a failing store is logged, the client's answer unharmed.

Whatever was begun and not committed (a failure, a client that left) is aborted: no half
object is ever visible.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json
import logging
import tempfile
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import IO

import httpx

from ..storage import ImageStore, ImageWriter, StorageError, object_key
from ..wire.errors import ProxyError
from ..wire.jsonstream import JsonEvents, JsonStreamError
from .call import Answer
from .translated import Translated, image_info, refused

logger = logging.getLogger("imagegen_proxy")

_JSON = (b"content-type", b"application/json")
_MEDIA = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp", "gif": "image/gif"}
_SNIFF = 64  # decoded bytes enough to tell the format
_HELD = 16 * 1024 * 1024  # what an answer without its images may hold, at most


def storage_unavailable() -> ProxyError:
    return ProxyError(
        502,
        "The gateway could not keep the image in its storage; try again later.",
        type="server_error",
        code="storage_unavailable",
    )


class Storing:
    """One request's images on their way to the store: where they go (named by project,
    day and request id), whether the client gets URLs (`as_url`, valid `ttl` seconds),
    and what a failing store means (`inline`: the base64 instead)."""

    def __init__(
        self,
        store: ImageStore,
        *,
        project: str | None,
        request_id: str,
        ttl: float,
        as_url: bool,
        inline: bool,
    ) -> None:
        self.store = store
        self.project = project
        self.request_id = request_id
        self.ttl = ttl
        self.as_url = as_url
        self.inline = inline
        self.keys: list[str] = []  # the objects kept, in order (for the ledger)
        self._writers: list[ImageWriter] = []
        self._when = datetime.now(UTC)

    async def answer(self, answer: Answer) -> Answer:
        """`answer` with its images kept (and as URLs when asked); a 2xx only."""
        media = (answer.header("content-type") or "").split(";", 1)[0].strip().lower()
        if media == "text/event-stream":
            body = _events(self, answer)
            return Translated(
                answer.status, list(answer.raw_headers), body, committed=True, inner=answer
            )
        if media != "application/json" and not media.endswith("+json"):
            return answer  # not an images answer: as it is
        if not self.as_url:
            body = _json_tee(self, answer)
            return Translated(
                answer.status, list(answer.raw_headers), body, committed=True, inner=answer
            )
        try:
            held = await _json_kept(self, answer)
        except StorageError as exc:
            logger.warning("storage failed: %s", exc)
            await self.abort()
            return refused(storage_unavailable())
        finally:
            await answer.aclose()
        headers = [
            (name, value)
            for name, value in answer.raw_headers
            if name.lower() not in (b"content-length", b"content-type", b"content-encoding")
        ]
        return Translated(answer.status, [_JSON, *headers], _once(held), committed=True)

    async def abort(self) -> None:
        """Abort every upload begun and not committed."""
        writers, self._writers = self._writers, []
        for writer in writers:
            try:
                await writer.abort()
            except Exception:
                logger.warning("storage: an aborted upload could not be cleaned up")


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


class _Image:
    """One image's base64, decoded as it comes and written to the store; its URL at the
    end. With `spool`, its base64 is also kept on disk, to be answered if the store fails."""

    def __init__(
        self, storing: Storing, index: int, *, spool: bool = False, tolerant: bool = False
    ) -> None:
        self.storing = storing
        self.index = index
        self.tolerant = tolerant  # a failing store is logged, not raised
        self.key = ""
        self._rest = b""
        self._head = b""
        self._writer: ImageWriter | None = None
        self.spool: IO[bytes] | None = tempfile.TemporaryFile() if spool else None  # noqa: SIM115
        self.failed: StorageError | None = None

    async def feed(self, b64: bytes) -> None:
        if self.spool is not None:
            self.spool.write(b64)
        if self.failed is not None:
            return
        data = self._rest + b64
        cut = len(data) - len(data) % 4
        self._rest = data[cut:]
        try:
            raw = base64.b64decode(data[:cut], validate=True)
        except binascii.Error:
            raise httpx.DecodingError("The upstream sent an image that is not base64.") from None
        await self._write(raw)

    async def _write(self, raw: bytes) -> None:
        if self._writer is None:
            self._head += raw
            if len(self._head) < _SNIFF:
                return
            raw, self._head = self._head, b""
            await self._open(raw)
            if self._writer is None:
                return  # the store failed: the image goes inline
        try:
            await self._writer.write(raw)
        except StorageError as exc:
            self._fail(exc)

    async def _open(self, first: bytes) -> None:
        found, _ = image_info(first)
        extension = found or "bin"
        storing = self.storing
        key = object_key(storing.project, storing.request_id, self.index, extension, storing._when)
        self.key = key
        try:
            self._writer = await storing.store.open(
                key, _MEDIA.get(extension, "application/octet-stream")
            )
        except StorageError as exc:
            self._fail(exc)
            return
        storing._writers.append(self._writer)

    def _fail(self, exc: StorageError) -> None:
        if not self.tolerant:
            raise exc
        logger.warning("storage failed, the image goes inline: %s", exc)
        self.failed = exc

    async def end(self) -> str | None:
        """Commit the image; its URL (None when the store failed and it goes inline)."""
        if self._rest:
            raise httpx.DecodingError("The upstream sent an image that is not base64.")
        if self._writer is None and self.failed is None:
            if not self._head:
                raise httpx.DecodingError("The upstream sent an empty image.")
            await self._open(self._head)
            if self._writer is not None:
                await self._write(self._head)
        if self.failed is not None:
            return None
        writer = self._writer
        assert writer is not None
        try:
            await writer.commit()
        except StorageError as exc:
            self._fail(exc)
            return None
        storing = self.storing
        storing._writers.remove(writer)
        storing.keys.append(self.key)
        try:
            return await storing.store.url(self.key, storing.ttl)
        except StorageError as exc:
            self._fail(exc)
            return None

    def inline(self) -> AsyncIterator[bytes]:
        """The image's base64 from its spool (a failed store, `on_error = "inline"`)."""
        spool = self.spool
        assert spool is not None

        async def read() -> AsyncIterator[bytes]:
            spool.seek(0)
            while chunk := spool.read(256 * 1024):
                yield chunk

        return read()

    def close(self) -> None:
        if self.spool is not None:
            self.spool.close()


class _Rewriter:
    """JSON events back to JSON text, with the image strings at `prefix` (`b64_json`)
    going to the store: replaced by `url` (`as_url`), or kept as they are (a copy kept)."""

    def __init__(self, storing: Storing, prefix: str, *, as_url: bool, inline: bool) -> None:
        self.storing = storing
        self.prefix = prefix
        self.key_prefix = prefix.rpartition(".")[0]
        self.as_url = as_url
        self.inline = inline
        self.out = bytearray()
        self._counts: list[int] = []  # per open container: elements written so far
        self._after_key = False
        self._string = False  # a string value is being written
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._held_key: str | None = None  # `b64_json`, not written until its value is known
        self.image: _Image | None = None
        self.done: list[_Image] = []
        # Images the store failed, `on_error = "inline"`: where their base64 goes in `out`.
        self.pending_inline: list[tuple[int, _Image]] = []

    def _sep(self) -> None:
        if self._after_key:
            self._after_key = False
            return
        if self._counts:
            if self._counts[-1]:
                self.out += b","
            self._counts[-1] += 1

    async def event(self, prefix: str, kind: str, value: object) -> None:
        if self.image is not None:  # inside an image string
            if kind == "string":
                assert isinstance(value, bytes)
                await self.image.feed(value)
                if not self.as_url:
                    self.out += value
            elif kind == "string_end":
                await self._image_end()
            return
        if kind == "map_key" and value == "b64_json" and prefix == self.key_prefix:
            self._held_key = "b64_json"
            return
        if self._held_key is not None:
            self._held_key = None
            if kind in ("string", "string_end"):
                self.image = _Image(
                    self.storing,
                    len(self.done),
                    spool=self.as_url and self.inline,
                    tolerant=self.inline,
                )
                if not self.as_url:
                    self._sep()
                    self.out += b'"b64_json":"'
                if kind == "string_end":
                    await self._image_end()
                    return
                assert isinstance(value, bytes)
                await self.image.feed(value)
                if not self.as_url:
                    self.out += value
                return
            self._key("b64_json")  # not a string: not an image, written as it came
        self._write(kind, value)

    async def _image_end(self) -> None:
        image = self.image
        assert image is not None
        self.image = None
        url = await image.end()
        self.done.append(image)
        if not self.as_url:
            self.out += b'"'
            return
        self._sep()
        if url is None:  # the store failed: the base64, inline, at the end
            self.out += b'"b64_json":"'
            self.pending_inline.append((len(self.out), image))
            self.out += b'"'
        else:
            self.out += b'"url":' + json.dumps(url).encode()

    def _key(self, key: str) -> None:
        self._sep()
        self.out += json.dumps(key).encode() + b":"
        self._after_key = True

    def _write(self, kind: str, value: object) -> None:
        out = self.out
        if kind == "map_key":
            assert isinstance(value, str)
            self._key(value)
        elif kind in ("start_map", "start_array"):
            self._sep()
            out += b"{" if kind == "start_map" else b"["
            self._counts.append(0)
        elif kind in ("end_map", "end_array"):
            out += b"}" if kind == "end_map" else b"]"
            self._counts.pop()
        elif kind == "string":
            assert isinstance(value, bytes)
            if not self._string:
                self._sep()
                out += b'"'
                self._string = True
            text = self._decoder.decode(value)
            out += json.dumps(text, ensure_ascii=False)[1:-1].encode()
        elif kind == "string_end":
            if not self._string:
                self._sep()
                out += b'"'
            text = self._decoder.decode(b"", final=True)
            out += json.dumps(text, ensure_ascii=False)[1:-1].encode() + b'"'
            self._string = False
        else:
            self._sep()
            out += json.dumps(value).encode()

    def take(self) -> bytes:
        data = bytes(self.out)
        self.out.clear()
        return data


async def _json_kept(storing: Storing, answer: Answer) -> bytes:
    """A JSON answer read to its end, its images to the store: the answer with URLs."""
    rewriter = _Rewriter(storing, "data.item.b64_json", as_url=True, inline=storing.inline)
    events = JsonEvents()
    try:
        async for chunk in answer.chunks():
            for prefix, kind, value in events.feed(chunk):
                await rewriter.event(prefix, kind, value)
            if len(rewriter.out) > _HELD:
                raise httpx.DecodingError("The upstream's answer holds too much besides images.")
        events.end()
    except JsonStreamError as exc:
        await storing.abort()
        raise httpx.DecodingError(
            f"The upstream sent an answer that is not JSON ({exc})."
        ) from None
    except BaseException:
        await storing.abort()
        raise
    try:
        if not rewriter.pending_inline:
            return rewriter.take()
        # The store failed for some images, `on_error = "inline"`: their base64 from disk.
        # (This answer is as large as the images: the price of answering anyway.)
        held, parts, at = rewriter.take(), [], 0
        for offset, image in rewriter.pending_inline:
            parts.append(held[at:offset])
            async for chunk in image.inline():
                parts.append(chunk)
            at = offset
        parts.append(held[at:])
        return b"".join(parts)
    finally:
        for image in rewriter.done:
            image.close()


async def _json_tee(storing: Storing, answer: Answer) -> AsyncIterator[bytes]:
    """A JSON answer as it comes, its images copied to the store on the way (`keep`)."""
    rewriter = _Rewriter(storing, "data.item.b64_json", as_url=False, inline=True)
    events = JsonEvents()
    broken = False
    try:
        async for chunk in answer.chunks():
            if not broken:
                try:
                    for prefix, kind, value in events.feed(chunk):
                        await rewriter.event(prefix, kind, value)
                except (JsonStreamError, httpx.DecodingError):
                    broken = True  # not ours to judge: the client gets it as it came
                rewriter.out.clear()  # the client gets the bytes as they came
            yield chunk
    finally:
        if rewriter.image is not None or broken:
            await storing.abort()
        for image in rewriter.done:
            image.close()


async def _events(storing: Storing, answer: Answer) -> AsyncIterator[bytes]:
    """An event stream as it comes; each `*.completed` event held until its image is kept,
    then sent with its `url` in place of its `b64_json` (or, kept as asked, as it came)."""
    reader = _EventReader(storing)
    try:
        async for chunk in answer.chunks():
            out = await reader.feed(chunk)
            if out:
                yield out
        rest = await reader.end()
        if rest:
            yield rest
    except StorageError as exc:
        logger.warning("storage failed mid-stream: %s", exc)
        await storing.abort()
        raise httpx.DecodingError("The gateway could not keep the image in its storage.") from None
    except BaseException:
        await storing.abort()
        raise
    finally:
        reader.close()


class _EventReader:
    """SSE, line by line, without holding a line: a `*.completed` event's `data:` JSON is
    rewritten as its events arrive (held until its image is kept); every other line passes
    through as it comes. Kept but asked for as base64 (`tee`), nothing is held or
    rewritten: the images are copied on the way, a failing store only logged."""

    def __init__(self, storing: Storing) -> None:
        self.storing = storing
        self._tee = not storing.as_url
        self._line = bytearray()  # the current line's head, until its field is known
        self._mode: str | None = None  # "pass" or "data" once the current line's field is known
        self._event = b""  # the current event's name
        self._held = bytearray()  # the current completed event, until its image is kept
        self._completed = False
        self._rewriter: _Rewriter | None = None
        self._events: JsonEvents | None = None
        self._images: list[_Image] = []

    async def feed(self, chunk: bytes) -> bytes:
        out = bytearray()
        at = 0
        while at < len(chunk):
            end = chunk.find(b"\n", at)
            piece = chunk[at:] if end < 0 else chunk[at : end + 1]
            at = len(chunk) if end < 0 else end + 1
            out += await self._piece(piece, whole=end >= 0)
        return bytes(out)

    async def _piece(self, piece: bytes, whole: bool) -> bytes:
        """Part of a line (`whole`: up to its end, newline included)."""
        if self._mode is None:
            self._line += piece
            head = bytes(self._line)
            if not whole and b":" not in head and len(head) < 64:
                return b""
            field = head.split(b":", 1)[0].strip()
            if field != b"data" and not whole and len(head) < 1024:
                return b""  # a short line (event:, id:, a comment): read it whole
            self._line.clear()
            if field == b"event":
                self._event = head.split(b":", 1)[1].strip()
                self._completed = self._event.endswith(b".completed")
            if field == b"data" and self._completed:
                self._mode = "data"
                self._rewriter = _Rewriter(
                    self.storing, "b64_json", as_url=self.storing.as_url, inline=self._tee
                )
                self._events = JsonEvents()
                content = head.split(b":", 1)[1]
                content = content[1:] if content.startswith(b" ") else content
                if not self._tee:
                    self._held += b"data: "
                await self._data(content, whole)
                return head if self._tee else b""
            self._mode = "pass"
            return self._emit(head, whole)
        if self._mode == "data":
            await self._data(piece, whole)
            return piece if self._tee else b""
        return self._emit(piece, whole)

    def _emit(self, data: bytes, whole: bool) -> bytes:
        if whole:
            self._mode = None
            if data.strip() == b"":  # the event's end
                return self._end_event(data)
        if self._completed and not self._tee:
            self._held += data
            return b""
        return data

    def _end_event(self, blank: bytes) -> bytes:
        self._event, held = b"", bytes(self._held)
        self._held.clear()
        if self._completed:
            self._completed = False
            return held + blank
        return blank

    async def _data(self, data: bytes, whole: bool) -> None:
        content = data.rstrip(b"\r\n") if whole else data
        events, rewriter = self._events, self._rewriter
        assert events is not None and rewriter is not None
        try:
            for prefix, kind, value in events.feed(content):
                await rewriter.event(prefix, kind, value)
        except JsonStreamError as exc:
            raise httpx.DecodingError(
                f"The upstream sent an event that is not JSON ({exc})."
            ) from None
        if whole:
            try:
                events.end()
            except JsonStreamError as exc:
                raise httpx.DecodingError(
                    f"The upstream sent an event that is not JSON ({exc})."
                ) from None
            if self._tee:
                rewriter.out.clear()
            else:
                self._held += rewriter.take() + b"\n"
            self._images += rewriter.done
            self._mode, self._events, self._rewriter = None, None, None
        elif self._tee:
            rewriter.out.clear()  # the client gets the bytes as they came

    async def end(self) -> bytes:
        return bytes(self._held)

    def close(self) -> None:
        for image in self._images:
            image.close()

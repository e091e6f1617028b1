"""MockUpstream: a raw ASGI app that speaks the OpenAI image-generation API, and the other
providers' APIs through `providers`."""

from __future__ import annotations

import base64
import functools
import hmac
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio

from ..types import Receive, Scope, Send
from ..wire.errors import ClientGone, ProxyError
from ..wire.request import header, is_json, read_body
from .answers import error_body, images_json, sse_event, variations_json
from .cache import BytesLRU
from .decode import Bitmap, decode_png
from .edit import Canvas, generated, tint_colour, tint_weight
from .form import read_form
from .formats import render_gif, render_svg
from .png import render_png
from .providers import Providers
from .replies import JSON as _JSON
from .replies import in_thread, respond, route_path, until_disconnect
from .wire import (
    Edit,
    Generation,
    parse_edit,
    parse_generation,
    parse_json_edit,
    parse_variation,
)

# (image index, detail) -> the image as base64 PNG; detail below 1 is a partial image.
Render = Callable[[int, float], Awaitable[bytes]]
# (created, the images as base64) -> the non-streaming answer's body.
Answer = Callable[[int, list[bytes]], bytes]

MAX_BODY = 1024 * 1024
# Edits carry images: up to 16 of them, of up to 50 MB each at OpenAI. The mock holds the
# whole form in memory, so it draws the line lower.
MAX_FORM_BODY = 80 * 1024 * 1024
GENERATIONS_SUFFIX = "/images/generations"
EDITS_SUFFIX = "/images/edits"
VARIATIONS_SUFFIX = "/images/variations"
HEALTH_SUFFIX = "/healthz"


class MockUpstream:
    """An OpenAI-compatible image-generation service answering on any `.../images/generations`,
    `.../images/edits` and `.../images/variations`.

    `delay` is how long a generation or an edit takes (spread over the events when
    streaming); `pad_to` pads every PNG to at least that many bytes. With `api_key`, requests
    need it as `Authorization: Bearer`: the bundled proxy serves its mock on its own listener,
    and only the proxy, not a client going around its keys and limits, may use it.

    Edits tint the first input image toward a colour from the prompt and fill the mask's
    transparent area with it (see `edit`); variations tint it a different colour each.

    Gemini's, Black Forest Labs', Stability's and Bedrock's own paths are answered in their
    wire (see `providers`), `api_key` being each one's credential.
    """

    def __init__(self, *, delay: float = 0.0, pad_to: int = 0, api_key: str | None = None) -> None:
        if delay < 0 or pad_to < 0:
            raise ValueError("delay and pad_to must not be negative")
        self.delay = delay
        self.pad_to = pad_to
        self._authorization = None if api_key is None else b"Bearer " + api_key.encode()
        # Encoding a padded multi-megabyte PNG costs milliseconds per request; keep the results.
        self._b64 = BytesLRU(max_bytes=128 * 1024 * 1024)
        self._providers = Providers(self, api_key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await _lifespan(receive, send)
        elif kind == "websocket":
            # Closing before accepting makes the server reject the handshake.
            await send({"type": "websocket.close", "code": 1000})

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        request_id = b"req_mock_" + os.urandom(12).hex().encode()
        path: str = scope["path"]
        method: str = scope["method"]
        if path.endswith((GENERATIONS_SUFFIX, EDITS_SUFFIX, VARIATIONS_SUFFIX)):
            if method != "POST":
                await _method_not_allowed(send, request_id, method, path, b"POST")
                return
            if not self._authorized(scope):
                error = ProxyError(401, "Incorrect API key provided.", code="invalid_api_key")
                await _error(send, error, request_id)
                return
            reply = _Reply(send, request_id, started)
            if path.endswith(GENERATIONS_SUFFIX):
                await self._generation(scope, receive, reply)
            else:
                await self._edit(scope, receive, reply, path.endswith(VARIATIONS_SUFFIX))
        elif path.endswith(HEALTH_SUFFIX):
            if method not in ("GET", "HEAD"):
                await _method_not_allowed(send, request_id, method, path, b"GET, HEAD")
                return
            await respond(send, 200, b'{"status":"ok"}', [_JSON, (b"x-request-id", request_id)])
        elif (handler := self._providers.handler(route_path(scope))) is not None:
            await handler(scope, receive, send)
        else:
            payload = error_body(
                ProxyError(404, f"Invalid URL ({method} {path})", code="unknown_url")
            )
            await respond(send, 404, payload, [_JSON, (b"x-request-id", request_id)])

    async def _generation(self, scope: Scope, receive: Receive, reply: _Reply) -> None:
        try:
            gen = parse_generation(await read_body(scope, receive, MAX_BODY))
        except ClientGone:
            return
        except ProxyError as exc:
            await _error(reply.send, exc, reply.request_id)
            return
        answer = functools.partial(images_json, gen)
        await self._answer(receive, gen, functools.partial(self._image, gen), answer, reply)

    async def _edit(self, scope: Scope, receive: Receive, reply: _Reply, variation: bool) -> None:
        try:
            if not variation and is_json(header(scope, b"content-type") or b""):
                edit = parse_json_edit(await read_body(scope, receive, MAX_FORM_BODY))
            else:
                form = await read_form(scope, receive, MAX_FORM_BODY)
                edit = parse_variation(form) if variation else parse_edit(form)
        except ClientGone:
            return
        except ProxyError as exc:
            await _error(reply.send, exc, reply.request_id)
            return
        canvas = await _canvas(edit)
        gen = edit.gen

        async def render(index: int, detail: float) -> bytes:
            if gen.still:  # a GIF or an SVG of the prompt: the mock edits PNGs only
                return await self._image(gen, index, detail)
            if variation:  # a colour of its own for each variation
                colour, weight = tint_colour(f"variation {index}"), tint_weight(0)
            else:
                colour, weight = tint_colour(gen.prompt), tint_weight(index, detail)
            paint = functools.partial(canvas.paint, colour, weight, pad_to=self.pad_to)
            return base64.b64encode(await in_thread(paint))

        answer = functools.partial(variations_json if variation else images_json, gen)
        await self._answer(receive, gen, render, answer, reply)

    async def _answer(
        self, receive: Receive, gen: Generation, render: Render, answer: Answer, reply: _Reply
    ) -> None:
        if gen.stream:
            work = self._stream(gen, render, reply)
        else:
            work = self._complete(gen, render, answer, reply)
        if self.delay > 0:
            await until_disconnect(receive, work)
        else:
            # No waiting means nothing to abandon early: skip the watcher and its overhead.
            await work

    def _authorized(self, scope: Scope) -> bool:
        if self._authorization is None:
            return True
        for name, value in scope["headers"]:
            if name == b"authorization":
                return hmac.compare_digest(value, self._authorization)
        return False

    async def _image(self, gen: Generation, index: int, detail: float) -> bytes:
        key: tuple[object, ...] = (gen.prompt, gen.width, gen.height, index, detail)
        key += (self.pad_to, gen.output_format, gen.frames, gen.frame_ms)
        b64 = self._b64.get(key)
        if b64 is None:
            size = {"width": gen.width, "height": gen.height, "index": index}
            if gen.output_format == "gif":
                gif = functools.partial(
                    render_gif, gen.prompt, frames=gen.frames, frame_ms=gen.frame_ms, **size
                )
                image = await in_thread(gif)
            elif gen.output_format == "svg":
                image = render_svg(gen.prompt, **size)
            else:
                image = render_png(gen.prompt, detail=detail, pad_to=self.pad_to, **size)
            b64 = base64.b64encode(image)
            self._b64.put(key, b64)
        return b64

    async def _complete(
        self, gen: Generation, render: Render, answer: Answer, reply: _Reply
    ) -> None:
        if self.delay > 0:
            await anyio.sleep(self.delay)
        images = [await render(i, 1.0) for i in range(gen.n)]
        body = answer(int(time.time()), images)
        headers = [_JSON, (b"x-request-id", reply.request_id), _processing_ms(reply.started)]
        await respond(reply.send, 200, body, headers)

    async def _stream(self, gen: Generation, render: Render, reply: _Reply) -> None:
        send = reply.send
        headers = [
            (b"content-type", b"text/event-stream"),
            (b"cache-control", b"no-cache"),
            (b"x-request-id", reply.request_id),
            _processing_ms(reply.started),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        steps = 1 if gen.still else gen.partial_images + 1  # a GIF or SVG comes whole
        pause = self.delay / (gen.n * steps)
        for index in range(gen.n):
            for step in range(steps):
                if pause > 0:
                    await anyio.sleep(pause)
                b64 = await render(index, (step + 1) / steps)
                partial = step if step < steps - 1 else None
                event = sse_event(gen, int(time.time()), b64, partial)
                await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


@dataclass(frozen=True, slots=True)
class _Reply:
    """Where and how an answer goes: the ASGI send, and its request's id and start time."""

    send: Send
    request_id: bytes
    started: float


async def _canvas(edit: Edit) -> Canvas:
    """The input and mask, decoded in a worker thread (a slow PNG takes up to a second), or
    the generated picture when the input is no PNG the mock can read."""
    source, mask = await in_thread(functools.partial(_decode, edit.image, edit.mask))
    if source is None:
        source = generated(edit.gen.prompt, edit.gen.width, edit.gen.height)
    return await in_thread(
        functools.partial(Canvas.of, source, mask, edit.gen.width, edit.gen.height)
    )


def _decode(image: bytes, mask: bytes | None) -> tuple[Bitmap | None, Bitmap | None]:
    return decode_png(image), None if mask is None else decode_png(mask)


async def _error(send: Send, error: ProxyError, request_id: bytes) -> None:
    await respond(send, error.status, error_body(error), [_JSON, (b"x-request-id", request_id)])


async def _method_not_allowed(
    send: Send, request_id: bytes, method: str, path: str, allow: bytes
) -> None:
    message = f"Method {method} is not allowed on {path}."
    payload = error_body(ProxyError(405, message, code="method_not_allowed"))
    headers = [_JSON, (b"allow", allow), (b"x-request-id", request_id)]
    await respond(send, 405, payload, headers)


def _processing_ms(started: float) -> tuple[bytes, bytes]:
    return (b"openai-processing-ms", b"%d" % round((time.perf_counter() - started) * 1000))


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return

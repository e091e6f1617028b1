"""A scriptable upstream double: records every request, answers as the test says.

It runs in its own uvicorn thread; the test thread and the double talk through
`threading.Event`s, so tests wait for things to happen instead of sleeping.
"""

from __future__ import annotations

import base64
import json
import os
import threading
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.to_thread
from python_multipart.multipart import MultipartParser, parse_options_header

Message = dict[str, Any]


@dataclass
class Recorded:
    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes
    client: tuple[str, int] | None = None  # the proxy's end of the connection

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k == name]
        return ",".join(values) if values else None

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def parts(self) -> list[tuple[str, str | None, bytes]]:
        """(name, filename, content) of each part of a multipart body, in order."""
        return multipart_parts(self.body, self.header("content-type") or "")

    @property
    def fields(self) -> dict[str, Any]:
        """The request's parameters: its JSON body, or a multipart body's text fields."""
        if (self.header("content-type") or "").startswith("multipart/"):
            return {
                name: value.decode(errors="replace")
                for name, filename, value in self.parts
                if filename is None
            }
        return dict(self.json)


@dataclass
class Exchange:
    """One request as the answer function sees it."""

    request: Recorded
    receive: Callable[[], Awaitable[Message]]
    send: Callable[[Message], Awaitable[None]]
    double: UpstreamDouble

    async def start(self, status: int = 200, headers: Iterable[tuple[str, str]] = ()) -> None:
        raw = [(k.encode(), v.encode()) for k, v in headers]
        await self.send({"type": "http.response.start", "status": status, "headers": raw})

    async def body(self, data: bytes, more: bool = True) -> None:
        await self.send({"type": "http.response.body", "body": data, "more_body": more})

    async def until_disconnect(self) -> None:
        """Wait until the proxy drops the connection, then tell the test."""
        while (await self.receive())["type"] != "http.disconnect":
            pass
        self.double.gone.set()

    async def wait(self, event: threading.Event) -> None:
        """Wait for the test to set `event`; the test fails if it never does."""
        if not await anyio.to_thread.run_sync(event.wait, 10):
            raise AssertionError("the test never released the upstream")


Answer = Callable[[Exchange], Awaitable[None]]


@dataclass
class UpstreamDouble:
    answer: Answer | None = None
    requests: list[Recorded] = field(default_factory=list)
    arrived: threading.Event = field(default_factory=threading.Event)
    gone: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    url: str = ""
    active: int = 0  # requests whose answer is still running

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.gone.set()
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        request = Recorded(
            method=scope["method"],
            path=scope["path"],
            query=scope["query_string"].decode(),
            headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]],
            body=b"".join(chunks),
            client=scope.get("client"),
        )
        self.requests.append(request)
        self.arrived.set()
        self.active += 1
        try:
            await (self.answer or json_image())(Exchange(request, receive, send, self))
        finally:
            self.active -= 1

    @property
    def last(self) -> Recorded:
        return self.requests[-1]


# --- answers -------------------------------------------------------------------------

UPSTREAM_HEADERS = [
    ("x-request-id", "req_upstream_123"),
    ("openai-processing-ms", "1234"),
    ("x-ratelimit-limit-requests", "500"),
    ("server", "upstream-server/1.0"),
    ("set-cookie", "upstream_session=abc"),
]


def b64_image(size: int = 1024) -> str:
    """Base64 text of about `size` characters (random, so nothing can compress or fake it)."""
    return base64.b64encode(os.urandom(size * 3 // 4)).decode()


def image_body(b64: str, n: int = 1) -> bytes:
    return json.dumps(
        {
            "created": 1700000000,
            "data": [{"b64_json": b64, "revised_prompt": "p"} for _ in range(n)],
            "usage": {"total_tokens": 10, "input_tokens": 4, "output_tokens": 6},
        }
    ).encode()


def json_image(b64: str | None = None, chunk: int = 65536) -> Answer:
    async def answer(x: Exchange) -> None:
        body = image_body(b64 or b64_image(256), n=int(x.request.fields.get("n") or 1))
        headers = [("content-type", "application/json"), *UPSTREAM_HEADERS]
        await x.start(200, [*headers, ("content-length", str(len(body)))])
        for i in range(0, len(body), chunk):
            await x.body(body[i : i + chunk])
        await x.body(b"", more=False)

    return answer


def error_json(
    status: int, error: dict[str, Any], headers: Iterable[tuple[str, str]] = ()
) -> Answer:
    async def answer(x: Exchange) -> None:
        await x.start(status, [("content-type", "application/json"), *headers])
        await x.body(json.dumps({"error": error}).encode(), more=False)

    return answer


def sse_event(name: str, **data: Any) -> bytes:
    payload = json.dumps({"type": name, **data}, separators=(",", ":"))
    return f"event: {name}\ndata: {payload}\n\n".encode()


def partial(index: int, b64: str = "cGFydGlhbA==") -> bytes:
    return sse_event(
        "image_generation.partial_image", b64_json=b64, partial_image_index=index, created_at=1
    )


def completed(b64: str = "ZmluYWw=") -> bytes:
    usage = {"total_tokens": 10, "input_tokens": 4, "output_tokens": 6}
    return sse_event("image_generation.completed", b64_json=b64, created_at=2, usage=usage)


SSE_HEADERS = [
    ("content-type", "text/event-stream"),
    ("cache-control", "private"),
    *UPSTREAM_HEADERS,
]


def sse(
    *frames: bytes,
    hold: bool = False,
    cut: bool = False,
    pause_after: int | None = None,
    resume: threading.Event | None = None,
) -> Answer:
    """Send `frames` as an SSE answer.

    hold: keep the connection open afterwards until the proxy drops it.
    cut: end by dropping the connection instead of finishing the body.
    pause_after/resume: after that many frames, wait for the test to set `resume`.
    """

    async def answer(x: Exchange) -> None:
        await x.start(200, SSE_HEADERS)
        for i, frame in enumerate(frames):
            if pause_after is not None and i == pause_after:
                assert resume is not None
                await x.wait(resume)
            await x.body(frame)
        x.double.finished.set()
        if hold:
            await x.until_disconnect()
        elif not cut:
            await x.body(b"", more=False)

    return answer


def cut_json() -> Answer:
    """Start a JSON answer, then drop the connection partway through its body."""

    async def answer(x: Exchange) -> None:
        await x.start(200, [("content-type", "application/json"), ("content-length", "5000")])
        await x.body(b'{"created": 1, "data": [{"b64_json": "AAAA')

    return answer


def stall() -> Answer:
    """Never answer: wait until the proxy gives up on the request."""

    async def answer(x: Exchange) -> None:
        await x.until_disconnect()

    return answer


def held(release: threading.Event) -> Answer:
    """Answer like `json_image()`, but only once the test sets `release`."""

    async def answer(x: Exchange) -> None:
        await x.wait(release)
        await json_image()(x)

    return answer


def multipart_parts(body: bytes, content_type: str) -> list[tuple[str, str | None, bytes]]:
    """(name, filename, content) of each part of a multipart body, in order."""
    _, options = parse_options_header(content_type)
    found: list[tuple[str, str | None, bytes]] = []
    headers: dict[bytes, bytes] = {}
    field = bytearray()
    value = bytearray()
    data = bytearray()

    def header_end() -> None:
        headers[bytes(field).lower()] = bytes(value)
        field.clear()
        value.clear()

    def part_end() -> None:
        _, disposition = parse_options_header(headers[b"content-disposition"])
        filename = disposition.get(b"filename")
        found.append(
            (
                disposition[b"name"].decode(),
                None if filename is None else filename.decode(),
                bytes(data),
            )
        )
        data.clear()
        headers.clear()

    parser = MultipartParser(
        options[b"boundary"],
        {
            "on_header_field": lambda d, s, e: field.extend(d[s:e]),
            "on_header_value": lambda d, s, e: value.extend(d[s:e]),
            "on_header_end": header_end,
            "on_part_data": lambda d, s, e: data.extend(d[s:e]),
            "on_part_end": part_end,
        },
    )
    parser.write(body)
    return found

"""What of the upstream's answer crosses back: an allow-list of headers, valid statuses only,
and compressed answers still counted."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import socket
import threading
from collections.abc import Callable, Iterator

import httpx
import openai
import pytest
from conftest import CLIENT_KEY
from double import Answer, Exchange, UpstreamDouble, completed, image_body, partial
from test_limits import KEY

from imagegen_proxy.governance.memory_limiter import MemoryLimiter

PATH = "/v1/images/generations"

OPERATOR_HEADERS = [
    ("openai-organization", "org-operators-own"),
    ("openai-project", "proj_operators_own"),
    ("www-authenticate", 'Bearer realm="upstream"'),
    ("access-control-allow-origin", "*"),
    ("alt-svc", 'h3=":443"'),
    ("strict-transport-security", "max-age=31536000"),
    ("x-internal-route", "pod-17"),
]
CLIENT_FACING = [
    ("x-request-id", "req_123"),
    ("openai-processing-ms", "1234"),
    ("openai-version", "2020-10-01"),
    ("x-ratelimit-remaining-requests", "499"),
    ("retry-after", "3"),
    ("x-should-retry", "true"),
    ("apim-request-id", "apim-1"),
    ("x-ms-region", "East US"),
]


EMPTY = b'{"created": 1, "data": []}'


def answering(headers: list[tuple[str, str]], body: bytes = EMPTY) -> Answer:
    async def answer(x: Exchange) -> None:
        await x.start(200, [("content-type", "application/json"), *headers])
        await x.body(body, more=False)

    return answer


def test_only_the_allowed_upstream_headers_reach_the_client(
    proxy: str, upstream: UpstreamDouble
) -> None:
    upstream.answer = answering([*OPERATOR_HEADERS, *CLIENT_FACING])
    answer = httpx.post(proxy + PATH, json={"prompt": "p"})
    for name, value in CLIENT_FACING:
        assert answer.headers.get(name) == value, name
    for name, _ in OPERATOR_HEADERS:
        assert name not in answer.headers, name


def test_headers_named_in_connection_are_not_relayed(proxy: str, upstream: UpstreamDouble) -> None:
    upstream.answer = answering([("connection", "x-ms-region"), *CLIENT_FACING])
    answer = httpx.post(proxy + PATH, json={"prompt": "p"})
    assert "x-ms-region" not in answer.headers
    assert answer.headers["apim-request-id"] == "apim-1"


def test_configured_response_headers_are_relayed_too(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    proxy = start_proxy(proxy={"forward_response_headers": ["X-Internal-Route"]})
    upstream.answer = answering(OPERATOR_HEADERS)
    answer = httpx.post(proxy + PATH, json={"prompt": "p"})
    assert answer.headers["x-internal-route"] == "pod-17"
    assert "openai-organization" not in answer.headers


@contextlib.contextmanager
def raw_upstream(reply: bytes) -> Iterator[str]:
    """An upstream that answers every connection with `reply`, bytes no ASGI server could
    send (statuses over 599, an unasked-for 101)."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                conn.sendall(reply)
                with contextlib.suppress(OSError):
                    conn.recv(1)  # until the proxy hangs up

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        server.close()


@pytest.mark.parametrize(
    "status_line",
    [
        b"HTTP/1.1 999 Made Up",
        b"HTTP/1.1 600 Beyond",
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade",
    ],
)
def test_an_upstream_status_outside_200_to_599_is_a_502(
    start_proxy: Callable[..., str], status_line: bytes
) -> None:
    reply = status_line + b"\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
    with raw_upstream(reply) as url:
        proxy = start_proxy(openai={"base_url": url + "/v1"})
        client = openai.OpenAI(base_url=proxy + "/v1", api_key=CLIENT_KEY, max_retries=0)
        with pytest.raises(openai.InternalServerError) as failure:
            client.images.generate(prompt="p")
    assert failure.value.status_code == 502
    assert failure.value.code == "upstream_error"


def compressed(body: bytes, sse: bool = False) -> Answer:
    async def answer(x: Exchange) -> None:
        data = gzip.compress(body)
        kind = "text/event-stream" if sse else "application/json"
        headers = [("content-type", kind), ("content-encoding", "gzip")]
        await x.start(200, [*headers, ("content-length", str(len(data)))])
        for i in range(0, len(data), 1000):  # in pieces: the inflater keeps its state
            await x.body(data[i : i + 1000])
        await x.body(b"", more=False)

    return answer


def test_a_gzip_json_answer_is_relayed_as_sent_and_its_tokens_counted(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    limiter = MemoryLimiter()
    keys = [{"name": "team-a", "key": KEY}]
    proxy = start_proxy(auth={"open": False}, keys=keys, hooks={"rate_limiter": limiter})
    upstream.answer = compressed(image_body("QUJD" * 5000))
    client = openai.OpenAI(base_url=proxy + "/v1", api_key=KEY, max_retries=0)
    image = client.images.generate(prompt="p")
    assert image.data and image.data[0].b64_json == "QUJD" * 5000
    assert asyncio.run(limiter.spent("team-a")).tokens == 10


def test_a_gzip_event_stream_is_relayed_decoded_and_its_tokens_counted(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    limiter = MemoryLimiter()
    keys = [{"name": "team-a", "key": KEY}]
    proxy = start_proxy(auth={"open": False}, keys=keys, hooks={"rate_limiter": limiter})
    upstream.answer = compressed(partial(0) + completed(), sse=True)
    client = openai.OpenAI(base_url=proxy + "/v1", api_key=KEY, max_retries=0)
    events = [event.type for event in client.images.generate(prompt="p", stream=True)]
    assert events == ["image_generation.partial_image", "image_generation.completed"]
    assert asyncio.run(limiter.spent("team-a")).tokens == 10


def test_an_answer_in_an_encoding_the_proxy_cannot_read_is_a_502(
    proxy: str, upstream: UpstreamDouble
) -> None:
    body = json.dumps({"created": 1, "data": []}).encode()
    upstream.answer = answering([("content-encoding", "br")], body)
    answer = httpx.post(proxy + PATH, json={"prompt": "p"})
    assert answer.status_code == 502
    assert "content-encoding" in answer.json()["error"]["message"]

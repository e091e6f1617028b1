"""Streaming: SSE relayed event by event, ended after `completed`, failures raised in the SDK."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import openai
import pytest
from conftest import CLIENT_KEY
from double import (
    UpstreamDouble,
    b64_image,
    completed,
    json_image,
    partial,
    sse,
    sse_event,
)


def sdk(proxy: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy + "/v1", api_key=CLIENT_KEY, max_retries=0)


def stream_types(proxy: str, **kwargs: object) -> list[str]:
    stream = sdk(proxy).images.generate(prompt="p", stream=True, partial_images=2, **kwargs)
    return [event.type for event in stream]


def test_stream_yields_partials_then_completed_and_ends(
    proxy: str, upstream: UpstreamDouble
) -> None:
    upstream.answer = sse(partial(0), partial(1), completed())
    assert stream_types(proxy) == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    assert upstream.last.json == {"prompt": "p", "stream": True, "partial_images": 2}


def test_stream_answer_headers(proxy: str, upstream: UpstreamDouble) -> None:
    upstream.answer = sse(partial(0), completed())
    with httpx.stream(
        "POST", proxy + "/v1/images/generations", json={"prompt": "p", "stream": True}
    ) as answer:
        answer.read()
    assert answer.headers["content-type"] == "text/event-stream"
    assert answer.headers["cache-control"] == "no-cache"
    assert answer.headers["x-accel-buffering"] == "no"
    assert answer.headers["x-request-id"] == "req_upstream_123"
    assert answer.headers["openai-processing-ms"] == "1234"
    assert answer.headers["x-ratelimit-limit-requests"] == "500"
    assert answer.headers["server"] == "uvicorn"
    assert "set-cookie" not in answer.headers
    assert "content-length" not in answer.headers


def test_completed_then_held_connection_still_ends_the_client_loop(
    proxy: str, upstream: UpstreamDouble
) -> None:
    upstream.answer = sse(partial(0), completed(), hold=True)
    started = time.monotonic()
    assert stream_types(proxy)[-1] == "image_generation.completed"
    # Milliseconds normally, 5 s for a loaded CI machine; a loop left waiting on the held
    # connection would end only at a timeout (the SDK's read timeout is 600 s).
    assert time.monotonic() - started < 5
    assert upstream.gone.wait(5), "the proxy kept the upstream connection open"


def test_stream_ends_after_one_completed_per_image(proxy: str, upstream: UpstreamDouble) -> None:
    upstream.answer = sse(partial(0), completed(), partial(0), completed(), hold=True)
    types = stream_types(proxy, n=2)
    assert types.count("image_generation.completed") == 2


def test_events_are_relayed_before_the_upstream_sends_the_next(
    proxy: str, upstream: UpstreamDouble
) -> None:
    resume = threading.Event()
    upstream.answer = sse(partial(0), completed(), pause_after=1, resume=resume)
    stream = sdk(proxy).images.generate(prompt="p", stream=True, partial_images=1)
    first = next(iter(stream))
    assert first.type == "image_generation.partial_image"
    assert not upstream.finished.is_set()
    resume.set()
    assert [event.type for event in stream] == ["image_generation.completed"]


def test_json_answer_is_relayed_before_the_upstream_finishes(
    proxy: str, upstream: UpstreamDouble
) -> None:
    resume = threading.Event()

    async def answer(x):  # type: ignore[no-untyped-def]
        await x.start(200, [("content-type", "application/json")])
        await x.body(b'{"created": 1, "data": [{"b64_json": "')
        await x.wait(resume)
        await x.body(b'AAAA"}]}', more=False)
        x.double.finished.set()

    upstream.answer = answer
    with httpx.stream("POST", proxy + "/v1/images/generations", json={"prompt": "p"}) as reply:
        chunks = reply.iter_raw()
        assert next(chunks).startswith(b'{"created": 1')
        assert not upstream.finished.is_set()
        resume.set()
        rest = b"".join(chunks)
    assert rest.endswith(b'AAAA"}]}')


def test_large_image_arrives_intact(proxy: str, upstream: UpstreamDouble) -> None:
    image = b64_image(6 * 1024 * 1024)
    upstream.answer = json_image(image)
    result = sdk(proxy).images.generate(prompt="p", n=2)
    assert [item.b64_json for item in result.data or []] == [image, image]


def test_large_streamed_image_arrives_intact(proxy: str, upstream: UpstreamDouble) -> None:
    image = b64_image(5 * 1024 * 1024)
    upstream.answer = sse(partial(0, image), completed(image))
    events = list(sdk(proxy).images.generate(prompt="p", stream=True, partial_images=1))
    assert [event.b64_json for event in events] == [image, image]


def test_events_split_at_every_byte_are_relayed_whole(proxy: str, upstream: UpstreamDouble) -> None:
    body = (
        b": ping\n\n"
        + partial(0)
        + b"event: image_generation.completed\r\n"
        + (completed()[len(b"event: image_generation.completed\n") :])
    )
    upstream.answer = sse(*[body[i : i + 1] for i in range(len(body))], hold=True)
    assert stream_types(proxy) == [
        "image_generation.partial_image",
        "image_generation.completed",
    ]


def test_upstream_cut_between_events_raises_api_error(proxy: str, upstream: UpstreamDouble) -> None:
    upstream.answer = sse(partial(0), cut=True)
    stream = sdk(proxy).images.generate(prompt="p", stream=True, partial_images=2)
    received = []
    with pytest.raises(openai.APIError) as failure:
        for event in stream:
            received.append(event.type)
    assert received == ["image_generation.partial_image"]
    assert "upstream" in failure.value.message.lower()
    assert failure.value.code == "upstream_error"


def test_upstream_cut_inside_an_event_aborts_the_client_connection(
    proxy: str, upstream: UpstreamDouble
) -> None:
    half = partial(1, b64_image(300_000))[:150_000]
    upstream.answer = sse(partial(0), half, cut=True)
    stream = sdk(proxy).images.generate(prompt="p", stream=True, partial_images=2)
    received = []
    with pytest.raises(openai.APIConnectionError):
        for event in stream:
            received.append(event.type)
    assert received == ["image_generation.partial_image"]


def test_upstream_ending_before_completed_raises_api_error(
    proxy: str, upstream: UpstreamDouble
) -> None:
    upstream.answer = sse(partial(0))
    with pytest.raises(openai.APIError, match="before the image was completed"):
        stream_types(proxy)


def test_upstream_error_event_is_relayed_and_raises(proxy: str, upstream: UpstreamDouble) -> None:
    error = {
        "message": "Your request was rejected by the safety system.",
        "type": "image_generation_user_error",
        "param": None,
        "code": "moderation_blocked",
    }
    upstream.answer = sse(partial(0), sse_event("error", error=error), hold=True)
    with pytest.raises(openai.APIError, match="safety system"):
        stream_types(proxy)
    assert upstream.gone.wait(5)


@pytest.mark.anyio
async def test_fifty_concurrent_streams(proxy: str, upstream: UpstreamDouble) -> None:
    upstream.answer = sse(partial(0), partial(1), completed(b64_image(64 * 1024)))

    async with openai.AsyncOpenAI(base_url=proxy + "/v1", api_key=CLIENT_KEY) as client:

        async def one(i: int) -> list[str]:
            stream = await client.images.generate(prompt=f"p{i}", stream=True, partial_images=2)
            return [event.type async for event in stream]

        results = await asyncio.gather(*(one(i) for i in range(50)))
    assert all(types[-1] == "image_generation.completed" and len(types) == 3 for types in results)
    assert len(upstream.requests) == 50

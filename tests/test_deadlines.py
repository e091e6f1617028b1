"""Bounds on a whole generation: `total_timeout` and `max_response_bytes`.

`read_timeout` only bounds silences: an upstream that keeps talking (SSE keep-alive pings, a
chunked answer that never ends) must still end, and free its slot and connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import anyio
import anyio.lowlevel
import httpx
import openai
import pytest
from conftest import CLIENT_KEY
from double import SSE_HEADERS, Answer, Exchange, UpstreamDouble, partial, stall
from test_limits import HEADERS

from imagegen_proxy.governance.memory_limiter import MemoryLimiter

PATH = "/v1/images/generations"


def pinging(comment: bytes = b"ping") -> Answer:
    """One partial image, then an SSE comment every 50 ms until the proxy hangs up."""

    async def answer(x: Exchange) -> None:
        await x.start(200, SSE_HEADERS)
        await x.body(partial(0))
        async with anyio.create_task_group() as group:

            async def ping() -> None:
                while True:
                    await x.body(b": " + comment + b"\n\n")
                    await anyio.sleep(0.05)

            group.start_soon(ping)
            await x.until_disconnect()
            group.cancel_scope.cancel()

    return answer


async def endless_json(x: Exchange) -> None:
    """A chunked JSON answer that never ends."""
    await x.start(200, [("content-type", "application/json")])
    await x.body(b'{"created": 1, "data": [{"b64_json": "')
    async with anyio.create_task_group() as group:

        async def spew() -> None:
            while True:
                await x.body(b"A" * 65536)
                await anyio.lowlevel.checkpoint()  # a send to a gone client may not yield

        group.start_soon(spew)
        await x.until_disconnect()
        group.cancel_scope.cancel()


def test_a_stream_kept_alive_by_pings_ends_at_total_timeout_with_an_error_event(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    upstream.answer = pinging()
    # The pings keep every silence under read_timeout: only total_timeout can end it.
    proxy = start_proxy(openai={"read_timeout": 0.5, "total_timeout": 1.5})
    client = openai.OpenAI(base_url=proxy + "/v1", api_key=CLIENT_KEY, max_retries=0)
    events = []
    with pytest.raises(openai.APIError) as failure:
        for event in client.images.generate(prompt="p", stream=True):
            events.append(event.type)
    assert events == ["image_generation.partial_image"]
    assert "did not finish within 1.5 seconds" in failure.value.message
    assert failure.value.code == "upstream_error"
    assert upstream.gone.wait(5)  # the upstream connection is dropped, not kept pinging


def test_an_upstream_that_never_answers_is_504_at_total_timeout_and_charged(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    upstream.answer = stall()
    limiter = MemoryLimiter()
    keys = [{"name": "team-a", "key": HEADERS["authorization"][7:], "images_per_day": 1}]
    proxy = start_proxy(
        auth={"open": False},
        keys=keys,
        hooks={"rate_limiter": limiter},
        openai={"total_timeout": 0.5},
    )
    answer = httpx.post(proxy + PATH, json={"prompt": "p"}, headers=HEADERS)
    assert answer.status_code == 504
    assert answer.json()["error"]["code"] == "upstream_timeout"
    assert answer.headers["x-should-retry"] == "false"  # a retry would be billed again
    assert upstream.gone.wait(5)
    # It reached the upstream, which may still be generating it, and bill it.
    assert asyncio.run(limiter.spent("team-a")).images == 1


def test_an_endless_json_answer_is_cut_at_max_response_bytes(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    upstream.answer = endless_json
    proxy = start_proxy(proxy={"max_response_bytes": 1024 * 1024})
    received = 0
    with (
        pytest.raises(httpx.RemoteProtocolError),
        httpx.stream("POST", proxy + PATH, json={"prompt": "p"}) as answer,
    ):
        assert answer.status_code == 200
        for chunk in answer.iter_raw():
            received += len(chunk)
    assert received <= 1024 * 1024  # then cut: an incomplete body, never a short whole one
    assert upstream.gone.wait(5)


def test_a_stream_over_max_response_bytes_ends_with_an_error_event(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    upstream.answer = pinging(b"x" * 1000)
    proxy = start_proxy(proxy={"max_response_bytes": 4096})
    client = openai.OpenAI(base_url=proxy + "/v1", api_key=CLIENT_KEY, max_retries=0)
    with pytest.raises(openai.APIError) as failure:
        for _ in client.images.generate(prompt="p", stream=True):
            pass
    assert "exceeded 4096 bytes" in failure.value.message
    assert upstream.gone.wait(5)


def test_the_slot_of_a_generation_ended_by_the_deadline_is_free(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    upstream.answer = pinging()
    limiter = MemoryLimiter()
    keys = [{"name": "team-a", "key": HEADERS["authorization"][7:], "max_concurrent": 1}]
    proxy = start_proxy(
        auth={"open": False},
        keys=keys,
        hooks={"rate_limiter": limiter},
        openai={"total_timeout": 0.5},
    )
    body = {"prompt": "p", "stream": True}
    with httpx.stream("POST", proxy + PATH, json=body, headers=HEADERS) as answer:
        assert b"event: error" in answer.read()
    assert asyncio.run(limiter.in_flight("team-a")) == 0
    with httpx.stream("POST", proxy + PATH, json=body, headers=HEADERS) as answer:
        assert answer.status_code == 200  # not 429: the slot was given back

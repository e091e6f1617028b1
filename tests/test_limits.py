"""Rate limits, concurrency and quotas (in-memory limiter), and the usage hook."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from double import (
    UpstreamDouble,
    completed,
    error_json,
    held,
    json_image,
    partial,
    sse,
    stall,
)
from support import json_request_headers, raw_request

from imagegen_proxy.governance.auth import Principal
from imagegen_proxy.governance.memory_limiter import MemoryLimiter
from imagegen_proxy.governance.ratelimit import Decision, RateLimiter
from imagegen_proxy.wire.request import ImageRequest
from imagegen_proxy.wire.usage import Usage

KEY = "sk-team-a-limits-0123456789"
PATH = "/v1/images/generations"
HEADERS = {"authorization": f"Bearer {KEY}"}


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def limited(start_proxy: Callable[..., str], limiter: Any = None, **policy: Any) -> str:
    hooks = {} if limiter is None else {"rate_limiter": limiter}
    keys = [{"name": "team-a", "key": KEY, **policy}]
    return start_proxy(auth={"open": False}, keys=keys, hooks=hooks)


def post(proxy: str, **body: Any) -> httpx.Response:
    return httpx.post(proxy + PATH, json={"prompt": "p", **body}, headers=HEADERS)


def test_requests_per_minute_refuses_with_the_time_until_a_slot_frees(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    clock = Clock()
    proxy = limited(start_proxy, MemoryLimiter(clock), requests_per_minute=2)
    first = post(proxy)
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    clock.now += 30
    assert post(proxy).headers["x-ratelimit-remaining-requests"] == "0"
    clock.now += 15.2
    refused = post(proxy)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert refused.headers["retry-after-ms"] == "14800"  # the first request leaves the window
    assert refused.headers["retry-after"] == "15"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert len(upstream.requests) == 2
    clock.now += 14.8
    assert post(proxy).status_code == 200


def test_window_is_exact_never_more_than_n_in_any_minute(
    start_proxy: Callable[..., str],
) -> None:
    clock = Clock()
    proxy = limited(start_proxy, MemoryLimiter(clock), requests_per_minute=3)
    admitted = []
    for _ in range(40):  # one attempt every 5 s for 200 s
        if post(proxy).status_code == 200:
            admitted.append(clock.now)
        clock.now += 5
    for at in admitted:
        assert sum(at <= t < at + 60 for t in admitted) <= 3
    assert len(admitted) == 12  # 3 per 60 s, over 200 s


def test_the_sdk_raises_rate_limit_error(start_proxy: Callable[..., str]) -> None:
    proxy = limited(start_proxy, MemoryLimiter(Clock()), requests_per_minute=1)
    client = openai.OpenAI(base_url=proxy + "/v1", api_key=KEY, max_retries=0)
    client.images.generate(prompt="p")
    with pytest.raises(openai.RateLimitError) as failure:
        client.images.generate(prompt="p")
    assert 0 < int(failure.value.response.headers["retry-after-ms"]) <= 60_000


def test_images_per_minute_counts_n(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    clock = Clock()
    proxy = limited(start_proxy, MemoryLimiter(clock), images_per_minute=5)
    answer = post(proxy, n=3)
    assert answer.headers["x-ratelimit-remaining-images"] == "2"
    clock.now += 10
    refused = post(proxy, n=3)
    assert refused.status_code == 429
    assert refused.headers["retry-after-ms"] == "50000"
    assert post(proxy, n=2).status_code == 200
    never = post(proxy, n=6)
    assert never.status_code == 429 and never.headers["x-should-retry"] == "false"
    assert len(upstream.requests) == 2


def test_daily_image_quota_is_insufficient_quota_not_retried(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    proxy = limited(start_proxy, images_per_day=2)
    assert post(proxy, n=2).status_code == 200
    client = openai.OpenAI(base_url=proxy + "/v1", api_key=KEY, max_retries=2)
    with pytest.raises(openai.RateLimitError) as failure:
        client.images.generate(prompt="p")
    assert failure.value.code == "insufficient_quota"
    assert failure.value.response.headers["x-should-retry"] == "false"
    assert len(upstream.requests) == 1  # the SDK did not retry


def test_failed_generations_do_not_spend_the_daily_quota(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    limiter = MemoryLimiter()
    proxy = limited(start_proxy, limiter, images_per_day=2)
    upstream.answer = error_json(
        500, {"message": "x", "type": "server_error", "param": None, "code": None}
    )
    assert post(proxy, n=2).status_code == 500
    upstream.answer = json_image()
    assert post(proxy, n=2).status_code == 200
    assert asyncio.run(limiter.spent("team-a")).images == 2


def test_tokens_per_day_counts_the_upstreams_usage(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    limiter = MemoryLimiter()
    proxy = limited(start_proxy, limiter, tokens_per_day=15)
    assert post(proxy).status_code == 200  # the double reports 10 tokens
    upstream.answer = sse(partial(0), completed())
    with httpx.stream(
        "POST", proxy + PATH, json={"prompt": "p", "stream": True}, headers=HEADERS
    ) as r:
        r.read()
    spent = asyncio.run(limiter.spent("team-a"))
    assert (spent.requests, spent.images, spent.tokens) == (2, 2, 20)
    refused = post(proxy)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "insufficient_quota"


def test_max_concurrent_refuses_at_once_and_frees_when_done(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    release = threading.Event()
    upstream.answer = held(release)
    limiter = MemoryLimiter()
    proxy = limited(start_proxy, limiter, max_concurrent=2)
    with httpx.Client() as client:
        pending = [threading.Thread(target=post, args=(proxy,)) for _ in range(2)]
        for thread in pending:
            thread.start()
        while len(upstream.requests) < 2:
            upstream.arrived.wait(1)
            upstream.arrived.clear()
        # Refused at once, not queued: `release` is set only below, so a queued request
        # would wait out the client's timeout (5 s) and raise instead of answering.
        refused = client.post(proxy + PATH, json={"prompt": "p"}, headers=HEADERS, timeout=5)
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        release.set()
        for thread in pending:
            thread.join(10)
        assert asyncio.run(limiter.in_flight("team-a")) == 0
        assert client.post(proxy + PATH, json={"prompt": "p"}, headers=HEADERS).status_code == 200


def wait_for(condition: Callable[[], bool], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.mark.parametrize(
    "stage", ["before-body", "waiting-upstream", "mid-stream", "upstream-fails"]
)
def test_slots_are_released_whatever_ends_the_generation(
    start_proxy: Callable[..., str], upstream: UpstreamDouble, stage: str
) -> None:
    limiter = MemoryLimiter()
    proxy = limited(start_proxy, limiter, max_concurrent=1)
    upstream.answer = {
        "before-body": stall(),
        "waiting-upstream": stall(),
        "mid-stream": sse(partial(0), hold=True),
        "upstream-fails": error_json(
            502, {"message": "bad", "type": "x", "param": None, "code": None}
        ),
    }[stage]
    body = json.dumps({"prompt": "p", "stream": stage == "mid-stream"}).encode()
    sent = body if stage != "before-body" else b""
    with raw_request(proxy, json_request_headers(body, **HEADERS), sent) as sock:
        if stage in ("waiting-upstream", "mid-stream"):
            assert upstream.arrived.wait(5)
        if stage in ("mid-stream", "upstream-fails"):
            assert sock.recv(65536)
    assert wait_for(lambda: asyncio.run(limiter.in_flight("team-a")) == 0)
    upstream.answer = json_image()
    assert post(proxy).status_code == 200


def test_a_storm_of_disconnects_leaves_no_slot_taken(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    upstream.answer = stall()
    limiter = MemoryLimiter()
    proxy = limited(start_proxy, limiter, max_concurrent=5000)
    body = json.dumps({"prompt": "p"}).encode()
    headers = json_request_headers(body, **HEADERS)
    for batch in range(10):
        # Three in four send their whole body and reach the upstream; the rest leave mid-body.
        sockets = [raw_request(proxy, headers, body if i % 4 else body[:5]) for i in range(100)]
        expected = 75 * (batch + 1)
        assert wait_for(lambda: len(upstream.requests) >= expected)  # noqa: B023
        for sock in sockets:
            sock.close()
    assert wait_for(lambda: asyncio.run(limiter.in_flight("team-a")) == 0)
    assert asyncio.run(limiter.spent("team-a")).requests == 750


class Recorder:
    def __init__(self) -> None:
        self.seen: list[tuple[str, Usage]] = []

    async def record(self, principal: Principal, request: ImageRequest, usage: Usage) -> None:
        self.seen.append((principal.name, usage))


def test_usage_observers_hear_json_and_stream_usage(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    recorder = Recorder()
    keys = [{"name": "team-a", "key": KEY}]
    proxy = start_proxy(auth={"open": False}, keys=keys, hooks={"usage_observers": [recorder]})
    post(proxy, n=2)
    upstream.answer = sse(partial(0), completed(), partial(0), completed())
    with httpx.stream(
        "POST", proxy + PATH, json={"prompt": "p", "stream": True, "n": 2}, headers=HEADERS
    ) as r:
        r.read()
    assert [(name, u.requests, u.images, u.tokens) for name, u in recorder.seen] == [
        ("team-a", 1, 2, 10),
        ("team-a", 1, 2, 20),
    ]


def test_usage_behind_megabytes_of_base64_is_found(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    recorder = Recorder()
    keys = [{"name": "team-a", "key": KEY}]
    proxy = start_proxy(auth={"open": False}, keys=keys, hooks={"usage_observers": [recorder]})
    from double import b64_image

    upstream.answer = json_image(b64_image(5 * 1024 * 1024), chunk=1000)
    assert post(proxy).status_code == 200
    assert recorder.seen[0][1].tokens == 10


class DenyAll(RateLimiter):
    async def acquire(
        self, principal: Principal, request: ImageRequest, reservation: int
    ) -> Decision:
        return Decision(False, retry_after=2.5, message="Maintenance window.")


def test_custom_rate_limiter_is_used(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    proxy = start_proxy(hooks={"rate_limiter": DenyAll()})
    refused = httpx.post(proxy + PATH, json={"prompt": "p"})
    assert refused.status_code == 429
    assert refused.json()["error"]["message"] == "Maintenance window."
    assert (refused.headers["retry-after"], refused.headers["retry-after-ms"]) == ("3", "2500")
    assert upstream.requests == []


class RefuseOnce(RateLimiter):
    """Refuses the first request for 0.3 s, as a limiter whose slot frees then would."""

    def __init__(self) -> None:
        self.calls = 0

    async def acquire(
        self, principal: Principal, request: ImageRequest, reservation: int
    ) -> Decision:
        self.calls += 1
        if self.calls == 1:
            return Decision(False, retry_after=0.3, message="Slot frees in 300 ms.")
        return Decision(True)


def test_the_sdk_waits_retry_after_ms_then_retries(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    limiter = RefuseOnce()
    proxy = start_proxy(hooks={"rate_limiter": limiter})
    client = openai.OpenAI(base_url=proxy + "/v1", api_key="k", max_retries=2)
    started = time.monotonic()
    assert client.images.generate(prompt="p").data
    assert time.monotonic() - started >= 0.3
    assert limiter.calls == 2 and len(upstream.requests) == 1


def test_back_to_back_requests_find_their_slot_free(start_proxy: Callable[..., str]) -> None:
    proxy = limited(start_proxy, max_concurrent=1)
    with httpx.Client(headers=HEADERS) as client:  # one keep-alive connection, no pause
        statuses = [client.post(proxy + PATH, json={"prompt": "p"}).status_code for _ in range(30)]
    assert statuses == [200] * 30


class SlowRelease(MemoryLimiter):
    """Gives slots back after a network round trip, as the Redis limiter does."""

    async def acquire(
        self, principal: Principal, request: ImageRequest, reservation: int = 0
    ) -> Decision:
        decision = await super().acquire(principal, request, reservation)
        release = decision.release
        if release is not None:

            async def slow(spent: Usage | None) -> None:
                await asyncio.sleep(0.05)
                await release(spent)

            decision.release = slow
        return decision


@pytest.mark.parametrize("stream", [False, True])
def test_the_slot_is_free_before_the_answer_is_complete_even_when_release_is_slow(
    start_proxy: Callable[..., str], upstream: UpstreamDouble, stream: bool
) -> None:
    if stream:
        upstream.answer = sse(partial(0), completed())
    proxy = limited(start_proxy, SlowRelease(), max_concurrent=1)
    # A new connection each time: on one keep-alive connection the server itself waits
    # for the end of the previous response before it reads the next request.
    statuses = [post(proxy, stream=stream).status_code for _ in range(10)]
    assert statuses == [200] * 10

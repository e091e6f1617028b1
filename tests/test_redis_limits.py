"""Limits shared through Redis: across processes, exact, and what happens when Redis is down."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from double import UpstreamDouble, held
from redis_server import redis_server
from test_cli import running

from imagegen_proxy.governance.redis_limiter import RedisLimiter

KEY = "sk-team-a-redis-0123456789"
PATH = "/v1/images/generations"
HEADERS = {"authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_server() as (url, _):
        yield url


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    return "test:" + request.node.name  # each test counts in its own keys


def shared(start_proxy: Callable[..., str], url: str, prefix: str, **policy: Any) -> str:
    limiter = RedisLimiter(url, prefix=prefix)
    keys = [{"name": "team-a", "key": KEY, **policy}]
    return start_proxy(auth={"open": False}, keys=keys, hooks={"rate_limiter": limiter})


def read(url: str, prefix: str, what: str) -> Any:
    """Ask Redis from the test's own loop (the proxy's limiter belongs to the server's)."""

    async def ask() -> Any:
        limiter = RedisLimiter(url, prefix=prefix)
        try:
            return await getattr(limiter, what)("team-a")
        finally:
            await limiter.aclose()

    return asyncio.run(ask())


def post(proxy: str, **body: Any) -> httpx.Response:
    return httpx.post(proxy + PATH, json={"prompt": "p", **body}, headers=HEADERS)


def test_requests_per_minute_through_redis(
    start_proxy: Callable[..., str], redis_url: str, prefix: str
) -> None:
    proxy = shared(start_proxy, redis_url, prefix, requests_per_minute=3)
    answers = [post(proxy) for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert answers[2].headers["x-ratelimit-remaining-requests"] == "0"
    retry_ms = int(answers[3].headers["retry-after-ms"])
    assert 55_000 < retry_ms <= 60_000
    assert answers[3].json()["error"]["code"] == "rate_limit_exceeded"


def test_images_per_minute_and_daily_quota_through_redis(
    start_proxy: Callable[..., str], redis_url: str, prefix: str
) -> None:
    proxy = shared(start_proxy, redis_url, prefix, images_per_minute=4, images_per_day=5)
    assert post(proxy, n=3).headers["x-ratelimit-remaining-images"] == "1"
    assert post(proxy, n=2).status_code == 429  # 5 > 4 per minute
    assert post(proxy, n=1).status_code == 200
    quota = post(proxy, n=2)  # 4 today + 2 > 5
    assert quota.status_code == 429
    assert quota.json()["error"]["code"] == "insufficient_quota"
    assert quota.headers["x-should-retry"] == "false"
    spent = read(redis_url, prefix, "spent")
    assert (spent.requests, spent.images, spent.tokens) == (2, 4, 20)


def test_max_concurrent_through_redis_and_release(
    start_proxy: Callable[..., str], upstream: UpstreamDouble, redis_url: str, prefix: str
) -> None:
    release = threading.Event()
    upstream.answer = held(release)
    proxy = shared(start_proxy, redis_url, prefix, max_concurrent=1)
    first = threading.Thread(target=post, args=(proxy,))
    first.start()
    assert upstream.arrived.wait(5)
    refused = post(proxy)
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    release.set()
    first.join(10)
    assert read(redis_url, prefix, "in_flight") == 0
    assert post(proxy).status_code == 200


def test_two_processes_sharing_redis_admit_exactly_n(redis_url: str, tmp_path: Path) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text(
        f'[limits]\nstorage = "{redis_url}"\n'
        f'[[keys]]\nname = "burst-{tmp_path.name}"\nkey = "{KEY}"\nrequests_per_minute = 7\n'
    )
    with running("--config", str(config)) as (one, _), running("--config", str(config)) as (two, _):

        async def burst() -> list[int]:
            async with httpx.AsyncClient(timeout=30) as client:
                replies = await asyncio.gather(
                    *(
                        client.post(
                            (one, two)[i % 2] + PATH,
                            json={"prompt": "p", "size": "16x16"},
                            headers=HEADERS,
                        )
                        for i in range(60)
                    )
                )
            return [reply.status_code for reply in replies]

        statuses = asyncio.run(burst())
    assert statuses.count(200) == 7
    assert statuses.count(429) == 53


def test_redis_down_denies_by_default_and_allows_when_configured(
    start_proxy: Callable[..., str], prefix: str
) -> None:
    with redis_server() as (url, process):
        deny = shared(start_proxy, url, prefix, requests_per_minute=100)
        allow_limiter = RedisLimiter(url, prefix=prefix, on_storage_error="allow")
        keys = [{"name": "team-a", "key": KEY, "requests_per_minute": 100}]
        allow = start_proxy(auth={"open": False}, keys=keys, hooks={"rate_limiter": allow_limiter})
        assert post(deny).status_code == 200
        process.terminate()
        process.wait(10)
        refused = post(deny)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "limits_unavailable"
        assert post(allow).status_code == 200


def test_on_storage_error_comes_from_the_config(
    start_proxy: Callable[..., str], prefix: str
) -> None:
    from redis_server import free_port

    keys = [{"name": "team-a", "key": KEY, "requests_per_minute": 5}]
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    deny = start_proxy(auth={"open": False}, keys=keys, limits={"storage": nowhere})
    allow = start_proxy(
        auth={"open": False}, keys=keys, limits={"storage": nowhere, "on_storage_error": "allow"}
    )
    assert post(deny).status_code == 503
    assert post(allow).status_code == 200


def test_back_to_back_requests_find_their_slot_free_in_redis(
    start_proxy: Callable[..., str], redis_url: str, prefix: str
) -> None:
    proxy = shared(start_proxy, redis_url, prefix, max_concurrent=1)
    with httpx.Client(headers=HEADERS) as client:
        statuses = [client.post(proxy + PATH, json={"prompt": "p"}).status_code for _ in range(30)]
    assert statuses == [200] * 30

"""Spent is spent: what may have been billed upstream counts, whoever stayed to read it."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from double import UpstreamDouble, error_json, json_image, stall
from support import json_request_headers, raw_request, read_response
from test_limits import HEADERS, KEY, PATH, Recorder, limited, post, wait_for

from imagegen_proxy.governance.memory_limiter import MemoryLimiter


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def abandon(proxy: str, upstream: UpstreamDouble) -> None:
    """Send a whole request, wait until the upstream has it, then leave."""
    body = json.dumps({"prompt": "p"}).encode()
    arrived = len(upstream.requests) + 1
    with raw_request(proxy, json_request_headers(body, **HEADERS), body):
        assert wait_for(lambda: len(upstream.requests) >= arrived)


def test_a_client_that_leaves_after_its_request_went_upstream_is_charged(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    upstream.answer = stall()
    limiter = MemoryLimiter()
    proxy = limited(start_proxy, limiter, images_per_day=5)
    for _ in range(5):
        abandon(proxy, upstream)
    assert wait_for(lambda: asyncio.run(limiter.in_flight("team-a")) == 0)
    refused = post(proxy)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "insufficient_quota"
    assert len(upstream.requests) == 5  # before: 11 reached it for a 5-a-day key
    assert asyncio.run(limiter.spent("team-a")).images == 5


def test_an_abandoned_generation_is_logged_client_gone_with_its_images(
    start_proxy: Callable[..., str],
    upstream: UpstreamDouble,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="imagegen_proxy.access")
    upstream.answer = stall()
    recorder = Recorder()
    keys = [{"name": "team-a", "key": KEY}]
    proxy = start_proxy(auth={"open": False}, keys=keys, hooks={"usage_observers": [recorder]})
    abandon(proxy, upstream)
    assert wait_for(lambda: len(recorder.seen) == 1)  # observers hear what was spent
    assert recorder.seen[0][1].images == 1
    assert wait_for(lambda: any(r.name == "imagegen_proxy.access" for r in caplog.records))
    [line] = [json.loads(r.getMessage()) for r in caplog.records if r.name.endswith("access")]
    assert (line["outcome"], line["status"], line["images"]) == ("client_gone", 499, 1)


def test_a_request_that_never_reached_the_upstream_is_free(
    start_proxy: Callable[..., str],
) -> None:
    limiter = MemoryLimiter()
    keys = [{"name": "team-a", "key": KEY, "images_per_day": 1}]
    proxy = start_proxy(
        auth={"open": False},
        keys=keys,
        hooks={"rate_limiter": limiter},
        openai={"base_url": f"http://127.0.0.1:{closed_port()}/v1"},
    )
    for _ in range(3):
        assert post(proxy).json()["error"]["code"] == "upstream_unreachable"
    assert asyncio.run(limiter.spent("team-a")).images == 0


def test_an_upstream_error_answer_is_free_and_a_success_is_not(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    limiter = MemoryLimiter()
    proxy = limited(start_proxy, limiter, images_per_day=3)
    upstream.answer = error_json(400, {"message": "bad size", "code": "invalid_value"})
    assert post(proxy, n=3).status_code == 400
    upstream.answer = json_image()
    assert post(proxy, n=3).status_code == 200
    assert post(proxy).status_code == 429
    assert asyncio.run(limiter.spent("team-a")).images == 3


def test_a_client_that_leaves_mid_body_is_not_charged(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    limiter = MemoryLimiter()
    proxy = limited(start_proxy, limiter, images_per_day=1)
    body = json.dumps({"prompt": "p"}).encode()
    with raw_request(proxy, json_request_headers(body, **HEADERS), body[:4]):
        pass
    response: Any = None
    sock = raw_request(proxy, json_request_headers(body, **HEADERS), body)
    with sock:
        response = read_response(sock)
    assert response.status_code == 200
    assert len(upstream.requests) == 1
    assert asyncio.run(limiter.spent("team-a")).images == 1
    assert httpx.post(proxy + PATH, json={"prompt": "p"}, headers=HEADERS).status_code == 429

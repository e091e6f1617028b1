"""Money through the proxy: the cost of each generation, dollar budgets that are never
overspent, their headers, and a client's own view of them, driven with the official SDK."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from double import UpstreamDouble, completed, error_json, held, partial, sse, stall
from redis_server import redis_server
from support import json_request_headers, raw_request
from test_cli import run, running
from test_limits import wait_for

from imagegen_proxy.governance.memory_limiter import MemoryLimiter

KEY = "sk-checkout-bot-0123456789"
OTHER = "sk-growth-web-0123456789"
PATH = "/v1/images/generations"
HEADERS = {"authorization": f"Bearer {KEY}"}
# What the double's usage costs for gpt-image-1: 4 text input tokens at $5/1M and 6
# output tokens at $40/1M.
DOUBLE_COST = 4 * 5 + 6 * 40  # micro-USD


def sdk(proxy: str, key: str = KEY, retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy + "/v1", api_key=key, max_retries=retries)


def budgeted(
    start_proxy: Callable[..., str],
    limiter: Any = None,
    projects: list[dict[str, Any]] | None = None,
    **policy: Any,
) -> str:
    keys = [{"name": "checkout-bot", "key": KEY, **policy}]
    if projects:
        keys[0]["project"] = projects[0]["name"]
        keys.append({"name": "growth-web", "key": OTHER, "project": projects[0]["name"]})
    hooks = {} if limiter is None else {"rate_limiter": limiter}
    options: dict[str, Any] = {"auth": {"open": False}, "keys": keys, "hooks": hooks}
    if projects:
        options["projects"] = projects
    return start_proxy(**options)


@pytest.fixture
def access(caplog: pytest.LogCaptureFixture) -> Callable[[], list[dict[str, Any]]]:
    caplog.set_level(logging.INFO, logger="imagegen_proxy.access")
    return lambda: [
        json.loads(r.getMessage()) for r in caplog.records if r.name == "imagegen_proxy.access"
    ]


@pytest.mark.parametrize("stream", [False, True])
def test_the_cost_of_a_generation_comes_from_the_upstreams_usage(
    start_proxy: Callable[..., str],
    upstream: UpstreamDouble,
    access: Callable[[], list[dict[str, Any]]],
    stream: bool,
) -> None:
    proxy = budgeted(start_proxy)
    if stream:
        upstream.answer = sse(partial(0), completed())
        events = list(sdk(proxy).images.generate(model="gpt-image-1", prompt="p", stream=True))
        assert events[-1].type == "image_generation.completed"
    else:
        assert sdk(proxy).images.generate(model="gpt-image-1", prompt="p").data
    [line] = access()
    assert line["cost_usd"] == DOUBLE_COST / 1_000_000
    assert line["model"] == "gpt-image-1" and line["images"] == 1


@pytest.mark.parametrize("model", ["gpt-image-2", "gpt-image-2.5-flare", "gpt-image-2.6-sunburst"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_budgeted_key_generates_on_todays_models_at_their_price(
    start_proxy: Callable[..., str],
    upstream: UpstreamDouble,
    access: Callable[[], list[dict[str, Any]]],
    model: str,
    stream: bool,
) -> None:
    proxy = budgeted(start_proxy, budget_usd=1.0, budget_period="day")
    asked: dict[str, Any] = {"model": model, "prompt": "p", "size": "1024x1024", "quality": "low"}
    if stream:
        upstream.answer = sse(partial(0), completed())
        events = list(sdk(proxy).images.generate(**asked, stream=True))
        assert events[-1].type == "image_generation.completed"
    else:
        assert sdk(proxy).images.generate(**asked).data
    [line] = access()
    # The double's usage: 4 text input tokens at $5/1M, 6 output tokens at $30/1M.
    assert line["cost_usd"] == (4 * 5 + 6 * 30) / 1_000_000 and line["model"] == model


def test_a_model_without_a_price_has_no_cost_when_no_budget_applies(
    start_proxy: Callable[..., str], access: Callable[[], list[dict[str, Any]]]
) -> None:
    proxy = budgeted(start_proxy)
    assert sdk(proxy).images.generate(model="my-own-model", prompt="p").data
    [line] = access()
    assert line["cost_usd"] is None


def test_a_budget_reached_exactly_refuses_the_next_request_before_the_upstream(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    # dall-e-3 is priced per image: 1024x1024 standard costs exactly $0.04.
    proxy = budgeted(start_proxy, budget_usd=0.12, budget_period="day")
    client = sdk(proxy, retries=2)
    for _ in range(3):
        assert client.images.generate(model="dall-e-3", prompt="p", size="1024x1024").data
    with pytest.raises(openai.RateLimitError) as refused:
        client.images.generate(model="dall-e-3", prompt="p", size="1024x1024")
    assert refused.value.code == "insufficient_quota"
    assert refused.value.response.headers["x-should-retry"] == "false"
    assert "$0.12" in refused.value.message and "key 'checkout-bot'" in refused.value.message
    assert len(upstream.requests) == 3  # nothing sent for the refused one, and no SDK retry


def test_the_budgets_own_refusal_carries_the_budget_headers(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    proxy = budgeted(start_proxy, budget_usd=0.12, budget_period="day")
    client = sdk(proxy)
    for _ in range(3):
        client.images.generate(model="dall-e-3", prompt="p", size="1024x1024")
    with pytest.raises(openai.RateLimitError) as refused:
        client.images.generate(model="dall-e-3", prompt="p", size="1024x1024")
    headers = refused.value.response.headers
    assert headers["x-budget-limit-usd"] == "0.12"
    assert headers["x-budget-remaining-usd"] == "0.00"
    assert headers["x-budget-reset"].endswith("T00:00:00Z")


def test_negative_usage_from_the_upstream_credits_no_budget(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    usage = {"total_tokens": -4_999_996, "input_tokens": 4, "output_tokens": -5_000_000}
    body = json.dumps({"created": 1, "data": [{"b64_json": "eA=="}], "usage": usage}).encode()

    async def answer(x: Any) -> None:
        await x.start(200, [("content-type", "application/json")])
        await x.body(body, more=False)

    upstream.answer = answer
    proxy = budgeted(start_proxy, budget_usd=0.05, budget_period="day", tokens_per_day=1000)
    for _ in range(3):  # each reserves about $0.0116 (272 output tokens at $40/1M)
        sdk(proxy).images.generate(model="gpt-image-1", prompt="p", size="1024x1024", quality="low")
    mine = httpx.get(proxy + "/v1/imagegen/budget", headers=HEADERS).json()["key"]
    # Each cost its 4 text input tokens at $5/1M, and its output nothing: not -$200.
    assert mine["budget"]["spent_usd"] == 3 * 20 / 1_000_000
    assert mine["today"]["tokens"] == 0  # total_tokens below zero counts as none


def test_a_failed_generation_costs_nothing(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    proxy = budgeted(start_proxy, budget_usd=0.04)
    upstream.answer = error_json(500, {"message": "x", "type": "server_error", "code": None})
    with pytest.raises(openai.InternalServerError):
        sdk(proxy).images.generate(model="dall-e-3", prompt="p", size="1024x1024")
    upstream.answer = None
    assert sdk(proxy).images.generate(model="dall-e-3", prompt="p", size="1024x1024").data


def test_a_client_that_leaves_is_charged_its_reservation(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    upstream.answer = stall()
    limiter = MemoryLimiter()
    proxy = budgeted(start_proxy, limiter, budget_usd=1.0)
    body = json.dumps({"prompt": "p", "model": "dall-e-3", "size": "1024x1792"}).encode()
    with raw_request(proxy, json_request_headers(body, **HEADERS), body):
        assert upstream.arrived.wait(5)
    assert wait_for(lambda: asyncio.run(limiter.in_flight("checkout-bot")) == 0)
    # The upstream may finish and bill it: its reservation stands as its cost.
    assert asyncio.run(limiter.committed("checkout-bot")) == 80_000


def test_answers_carry_the_budget_headers_of_the_tighter_budget(
    start_proxy: Callable[..., str],
) -> None:
    projects = [{"name": "growth", "budget_usd": 500.0, "budget_period": "month"}]
    proxy = budgeted(start_proxy, projects=projects, budget_usd=20.0, budget_period="day")
    answer = httpx.post(
        proxy + PATH, json={"prompt": "p", "model": "dall-e-2", "size": "256x256"}, headers=HEADERS
    )
    assert answer.status_code == 200
    assert answer.headers["x-budget-limit-usd"] == "20.00"
    assert answer.headers["x-budget-remaining-usd"] == "19.984"  # after its $0.016 reservation
    assert answer.headers["x-budget-reset"].endswith("T00:00:00Z")


def test_a_project_budget_is_shared_by_its_keys(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    projects = [{"name": "growth", "budget_usd": 0.08}]
    proxy = budgeted(start_proxy, projects=projects)
    assert sdk(proxy, KEY).images.generate(model="dall-e-3", prompt="p", size="1024x1024").data
    assert sdk(proxy, OTHER).images.generate(model="dall-e-3", prompt="p", size="1024x1024").data
    with pytest.raises(openai.RateLimitError) as refused:
        sdk(proxy, OTHER).images.generate(model="dall-e-3", prompt="p", size="1024x1024")
    assert "project 'growth'" in refused.value.message
    assert len(upstream.requests) == 2


def test_an_unpriced_model_on_a_budget_is_refused_by_default(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    proxy = budgeted(start_proxy, budget_usd=10.0)
    with pytest.raises(openai.PermissionDeniedError) as refused:
        sdk(proxy).images.generate(model="my-own-model", prompt="p")
    assert refused.value.code == "model_not_priced"
    assert upstream.requests == []


def test_an_unpriced_model_on_a_budget_is_served_when_allowed(
    start_proxy: Callable[..., str],
    upstream: UpstreamDouble,
    access: Callable[[], list[dict[str, Any]]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    keys = [{"name": "checkout-bot", "key": KEY, "budget_usd": 10.0}]
    proxy = start_proxy(auth={"open": False}, keys=keys, limits={"unpriced": "allow"})
    for _ in range(2):
        assert sdk(proxy).images.generate(model="my-own-model", prompt="p").data
    assert [line["cost_usd"] for line in access()] == [None, None]
    warnings = [r for r in caplog.records if "has no price" in r.getMessage()]
    assert len(warnings) == 1  # once per model


def test_a_deployment_priced_like_a_known_model(
    start_proxy: Callable[..., str], access: Callable[[], list[dict[str, Any]]]
) -> None:
    keys = [{"name": "checkout-bot", "key": KEY, "budget_usd": 10.0}]
    proxy = start_proxy(
        auth={"open": False},
        keys=keys,
        azure=True,
        prices={"img-eastus": {"same_as": "gpt-image-1"}},
    )
    client = openai.AzureOpenAI(
        azure_endpoint=proxy, api_key=KEY, api_version="2025-04-01-preview", max_retries=0
    )
    assert client.images.generate(model="img-eastus", prompt="p").data
    [line] = access()
    assert line["cost_usd"] == DOUBLE_COST / 1_000_000


def test_a_client_sees_its_own_budget(start_proxy: Callable[..., str]) -> None:
    projects = [{"name": "growth", "budget_usd": 500.0, "requests_per_minute": 600}]
    proxy = budgeted(start_proxy, projects=projects, budget_usd=20.0, budget_period="day")
    assert sdk(proxy).images.generate(model="dall-e-3", prompt="p", size="1024x1024").data
    view = httpx.get(proxy + "/v1/imagegen/budget", headers=HEADERS).json()
    assert view["object"] == "imagegen.budget"
    mine, project = view["key"], view["project"]
    assert mine["name"] == "checkout-bot" and mine["today"]["images"] == 1
    assert mine["budget"]["limit_usd"] == 20.0 and mine["budget"]["spent_usd"] == 0.04
    assert mine["budget"]["remaining_usd"] == 19.96 and mine["budget"]["period"] == "day"
    assert project["name"] == "growth" and project["limits"]["requests_per_minute"] == 600
    assert project["budget"]["spent_usd"] == 0.04
    assert httpx.get(proxy + "/imagegen/budget", headers=HEADERS).status_code == 200
    assert httpx.get(proxy + "/v1/imagegen/budget").status_code == 401
    refused = httpx.post(proxy + "/v1/imagegen/budget", headers=HEADERS)
    assert refused.status_code == 405 and refused.headers["allow"] == "GET"


def test_a_bad_price_table_is_refused_at_start_up_with_the_key_named(tmp_path: Path) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text('[prices."my-dep"]\nsame_as = "gpt-image-9"\n')
    result = run("--config", str(config), "--check-config")
    assert result.returncode == 1
    assert "prices.my-dep" in result.stderr and "gpt-image-9" in result.stderr


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_server() as (url, _):
        yield url


def test_concurrent_requests_across_two_processes_never_overspend(
    upstream: UpstreamDouble, redis_url: str, tmp_path: Path
) -> None:
    release = threading.Event()
    upstream.answer = held(release)  # admitted ones hold their reservation until all are in
    config = tmp_path / "proxy.toml"
    config.write_text(
        f'[openai]\nbase_url = "{upstream.url}/v1"\napi_key = "sk-upstream"\n'
        f'[limits]\nstorage = "{redis_url}"\n'
        f'[[keys]]\nname = "bot"\nkey = "{KEY}"\nbudget_usd = 0.3\nbudget_period = "day"\n'
    )
    body = {"prompt": "p", "model": "dall-e-3", "size": "1024x1024"}  # $0.04: 7 fit in $0.30
    with (
        running("--config", str(config)) as (first, _),
        running("--config", str(config)) as (second, _),
        ThreadPoolExecutor(50) as pool,
    ):
        urls = [first, second] * 25
        futures = [
            pool.submit(httpx.post, url + PATH, json=body, headers=HEADERS, timeout=30)
            for url in urls
        ]
        # Every refusal comes at once; the admitted ones wait at the upstream.
        deadline = time.monotonic() + 30  # generous: 50 requests on a loaded 2-core machine
        while sum(f.done() for f in futures) < 43 and time.monotonic() < deadline:
            time.sleep(0.05)
        release.set()
        statuses = sorted(f.result().status_code for f in futures)
    assert statuses.count(200) == 7 and statuses.count(429) == 43
    assert len(upstream.requests) == 7

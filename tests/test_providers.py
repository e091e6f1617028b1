"""What every kind that speaks its own API shares, shown on Gemini's: budgets that hold
under concurrency, a pool that mixes kinds and fails over between them, clients that leave."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
from conftest import UPSTREAM_KEY
from double import Exchange, UpstreamDouble, json_image
from providers import client, gemini_image, gemini_member, google_error, png
from support import json_request_headers, raw_request
from test_limits import wait_for

from imagegen_proxy.governance.memory_limiter import MemoryLimiter
from imagegen_proxy.governance.pricing import Prices
from imagegen_proxy.wire.usage import Usage

Start = Callable[..., str]
MODEL = "gemini-3.1-flash-image"
KEY = "sk-team-images-0123456789"


def closed_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def openai_member(url: str, name: str = "openai", **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "openai",
        "base_url": url + "/v1",
        "api_key": UPSTREAM_KEY,
        **extra,
    }


def test_a_budget_is_never_overspent_by_50_concurrent_requests(
    upstream: UpstreamDouble, provider_proxy: Start
) -> None:
    upstream.answer = gemini_image(prompt_tokens=12, image_tokens=1120)
    limiter = MemoryLimiter()
    keys = [{"name": "team", "key": KEY, "budget_usd": 0.5, "budget_period": "day"}]
    url = provider_proxy(
        [gemini_member(upstream)],
        hooks={"rate_limiter": limiter},
        auth={"open": False},
        keys=keys,
    )
    sdk = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)

    def one(_: int) -> str:
        try:
            sdk.images.generate(model=MODEL, prompt="p")
        except openai.RateLimitError as exc:
            return str(exc.code)
        return "made"

    with ThreadPoolExecutor(50) as pool:
        outcomes = list(pool.map(one, range(50)))
    made = outcomes.count("made")
    assert set(outcomes) <= {"made", "insufficient_quota"}
    price = Prices().get(MODEL)
    assert price is not None
    cost = price.spent(Usage(input_tokens=12, output_tokens=1120, input_text_tokens=12))
    spent = asyncio.run(limiter.committed("team"))
    assert spent == made * cost  # each at what its usage says it cost, nothing more
    assert spent <= 500_000  # never past the budget
    assert made == len(upstream.requests) and made >= 1
    assert made < 50  # the budget refused the rest before they went upstream


@pytest.mark.parametrize("dead", ["openai", "gemini"])
def test_a_mixed_pool_fails_over_between_kinds(
    upstream: UpstreamDouble, provider_proxy: Start, dead: str
) -> None:
    other = UpstreamDouble()
    from support import serve

    with serve(other) as other_url:
        other.url = other_url
        if dead == "openai":
            upstream.answer = gemini_image(png(8, 8))
            first = openai_member(closed_port(), models=["house-style"])
            second = gemini_member(
                upstream, models=["house-style"], model_map={"house-style": MODEL}, priority=2
            )
        else:
            upstream.answer = google_error(503, "UNAVAILABLE", "overloaded")
            other.answer = json_image()
            first = gemini_member(
                upstream, models=["house-style"], model_map={"house-style": MODEL}
            )
            second = openai_member(other.url, models=["house-style"]) | {"priority": 2}
        first["models"] = ["house-style"]
        second["models"] = ["house-style"]
        url = provider_proxy([first, second])
        answer = client(url).images.with_raw_response.generate(model="house-style", prompt="p")
        assert answer.parse().data
        if dead == "gemini":
            assert len(upstream.requests) == 1 and len(other.requests) == 1
        else:
            assert len(upstream.requests) == 1


def test_a_client_that_leaves_mid_image_closes_the_providers_answer(
    upstream: UpstreamDouble, provider_proxy: Start
) -> None:
    async def answer(x: Exchange) -> None:
        start = (
            b'{"candidates":[{"content":{"parts":[{"inlineData":{"mimeType":"image/png","data":"'
        )
        await x.start(200, [("content-type", "application/json")])
        await x.body(start + base64.b64encode(png(64, 64)))
        await x.until_disconnect()

    upstream.answer = answer
    url = provider_proxy([gemini_member(upstream)])
    body = json.dumps({"model": MODEL, "prompt": "p"}).encode()
    with raw_request(url, json_request_headers(body), body) as sock:
        head = sock.recv(65536)
        assert head.startswith(b"HTTP/1.1 200")
    assert upstream.gone.wait(10)  # generous: a loaded machine; the point is that it happens
    assert wait_for(lambda: upstream.active == 0)


def test_a_dead_provider_answers_502(provider_proxy: Start) -> None:
    url = provider_proxy([gemini_member(UpstreamDouble(url=closed_port()))])
    answer = httpx.post(url + "/v1/images/generations", json={"model": MODEL, "prompt": "p"})
    assert answer.status_code == 502
    assert answer.json()["error"]["type"] == "server_error"


def test_an_openai_member_maps_an_alias_to_its_model(
    upstream: UpstreamDouble, provider_proxy: Start
) -> None:
    member = openai_member(
        upstream.url, models=["house-style"], model_map={"house-style": "gpt-image-2"}
    )
    url = provider_proxy([member])
    client(url).images.generate(model="house-style", prompt="p")
    assert upstream.last.json["model"] == "gpt-image-2"


def test_models_lists_what_each_kind_makes(
    upstream: UpstreamDouble, provider_proxy: Start, start_proxy: Start
) -> None:
    # [openai] alone: OpenAI's models only
    listed = client(start_proxy(proxy={"list_models": True})).models.list()
    names = {model.id for model in listed}
    assert "gpt-image-1" in names and not any(
        name.startswith(("gemini-", "flux", "amazon.")) or name == "core" for name in names
    )
    url = provider_proxy([gemini_member(upstream)])  # a Gemini member naming no models
    assert {model.id for model in client(url).models.list()} == {
        "gemini-3.1-flash-image",
        "gemini-3-pro-image",
    }


def test_credentials_that_cannot_be_made_charge_nothing(
    upstream: UpstreamDouble, provider_proxy: Start, tmp_path: Any
) -> None:
    limiter = MemoryLimiter()
    (tmp_path / "sa.json").write_text("{}")  # no service account in it: no token
    member = gemini_member(
        upstream,
        api_key=None,
        vertex_project="image-team",
        credentials_file=str(tmp_path / "sa.json"),
    )
    keys = [{"name": "team", "key": KEY, "budget_usd": 1.0}]
    url = provider_proxy([member], hooks={"rate_limiter": limiter}, auth={"open": False}, keys=keys)
    sdk = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.InternalServerError) as caught:
        sdk.images.generate(model=MODEL, prompt="p")
    assert caught.value.code == "upstream_auth_failed"
    assert upstream.requests == []
    assert wait_for(lambda: asyncio.run(limiter.in_flight("team")) == 0)
    assert asyncio.run(limiter.committed("team")) == 0  # the provider never had it

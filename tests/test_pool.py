"""Several upstreams: load balancing, failover only where it is safe, passive cooldowns."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import openai
import pytest
from conftest import CLIENT_KEY, UPSTREAM_KEY, HostApp
from double import UpstreamDouble, cut_json, error_json, stall
from redis_server import redis_server
from support import json_request_headers, raw_request, serve, until
from test_cli import running

from imagegen_proxy import ImageGenProxy, ProxyConfig
from imagegen_proxy.upstream.pool import Pool

PATH = "/v1/images/generations"
RATE_LIMITED = {"message": "Slow down.", "type": "requests", "param": None, "code": "rate_limit"}


class Clock:
    """The pool's clock, moved by the test: cooldowns pass without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def doubles() -> Iterator[list[UpstreamDouble]]:
    with contextlib.ExitStack() as stack:
        found = []
        for _ in range(3):
            double = UpstreamDouble()
            double.url = stack.enter_context(serve(double))
            found.append(double)
        yield found


def member(name: str, url: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "openai",
        "base_url": url + "/v1",
        "api_key": UPSTREAM_KEY,
        **extra,
    }


@pytest.fixture
def pools() -> list[Pool]:
    return []


@pytest.fixture
def pooled(pools: list[Pool]) -> Iterator[Callable[..., tuple[str, Clock]]]:
    with contextlib.ExitStack() as stack:

        def start(members: list[dict[str, Any]], **sections: Any) -> tuple[str, Clock]:
            config = ProxyConfig.model_validate(
                {"auth": {"open": True}, "upstreams": members} | sections
            )
            proxy = ImageGenProxy(HostApp().app, config)
            assert proxy.pool is not None
            clock = Clock()
            proxy.pool.clock = clock
            pools.append(proxy.pool)
            return stack.enter_context(serve(proxy)), clock

        yield start


def generate(url: str, model: str = "gpt-image-1") -> httpx.Response:
    return httpx.post(url + PATH, json={"prompt": "p", "model": model})


def closed_port() -> str:
    with contextlib.closing(__import__("socket").socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_weights_are_honoured(pooled: Any, doubles: list[UpstreamDouble]) -> None:
    a, b, _ = doubles
    url, _ = pooled([member("a", a.url, weight=3), member("b", b.url, weight=1)])
    with httpx.Client() as client:
        for _ in range(1000):
            assert client.post(url + PATH, json={"prompt": "p"}).status_code == 200
    # 3:1 is 750 of 1,000; the binomial's standard deviation is 14: 5 of them either way.
    assert 680 <= len(a.requests) <= 820, len(a.requests)
    assert len(a.requests) + len(b.requests) == 1000


def test_a_dead_upstream_costs_no_client_an_error(
    pooled: Any, pools: list[Pool], doubles: list[UpstreamDouble]
) -> None:
    a = doubles[0]
    url, _ = pooled([member("dead", closed_port()), member("a", a.url)], pool={})
    sdk = openai.OpenAI(base_url=url + "/v1", api_key=CLIENT_KEY, max_retries=0)
    for _ in range(30):
        assert sdk.images.generate(prompt="p", model="gpt-image-1").data
    assert len(a.requests) == 30
    # After three failures in a row, the dead one sits out (1 s, doubling while it fails).
    [pool] = pools
    dead = next(target for target in pool.targets if target.name == "dead")
    state, seconds = pool.state(dead)
    assert state == "open" and seconds is not None and 0 < seconds <= 1


def test_a_429_sits_out_its_retry_after(pooled: Any, doubles: list[UpstreamDouble]) -> None:
    a, b, _ = doubles
    a.answer = error_json(429, RATE_LIMITED, [("retry-after", "2")])
    url, clock = pooled([member("a", a.url, priority=1), member("b", b.url, priority=2)])
    assert generate(url).status_code == 200  # a said 429: b answered
    assert (len(a.requests), len(b.requests)) == (1, 1)
    for _ in range(5):
        assert generate(url).status_code == 200
    assert len(a.requests) == 1  # sitting out
    clock.now += 2.1
    a.answer = None
    assert generate(url).status_code == 200
    assert len(a.requests) == 2  # back, as the better tier


def test_no_second_attempt_once_the_answer_started(
    pooled: Any, doubles: list[UpstreamDouble]
) -> None:
    a, b, _ = doubles
    a.answer = cut_json()
    url, _ = pooled([member("a", a.url, priority=1), member("b", b.url, priority=2)])
    sdk = openai.OpenAI(base_url=url + "/v1", api_key=CLIENT_KEY, max_retries=0)
    with pytest.raises(openai.APIConnectionError):
        sdk.images.generate(prompt="p", model="gpt-image-1")
    assert (len(a.requests), len(b.requests)) == (1, 0)


def test_no_second_attempt_after_a_read_timeout(pooled: Any, doubles: list[UpstreamDouble]) -> None:
    a, b, _ = doubles
    a.answer = stall()
    # A short read timeout keeps the test quick; the point is what follows it.
    url, _ = pooled([member("a", a.url, read_timeout=0.5), member("b", b.url, priority=2)])
    answer = generate(url)
    assert answer.status_code == 504
    assert answer.json()["error"]["code"] == "upstream_timeout"
    assert (len(a.requests), len(b.requests)) == (1, 0)


def test_models_pick_the_upstreams(pooled: Any, doubles: list[UpstreamDouble]) -> None:
    a, b, _ = doubles
    url, _ = pooled(
        [member("a", a.url, models=["gpt-image-1"]), member("b", b.url, models=["dall-e-3"])]
    )
    assert generate(url, "gpt-image-1").status_code == 200
    assert generate(url, "dall-e-3").status_code == 200
    assert (len(a.requests), len(b.requests)) == (1, 1)
    answer = generate(url, "dall-e-9")
    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == "model_not_found"
    assert "dall-e-9" in answer.json()["error"]["message"]


def test_every_upstream_out_is_a_503_with_the_soonest_retry_after(
    pooled: Any, doubles: list[UpstreamDouble]
) -> None:
    a, b, _ = doubles
    a.answer = error_json(429, RATE_LIMITED, [("retry-after", "30")])
    b.answer = error_json(429, RATE_LIMITED, [("retry-after", "20")])
    url, clock = pooled([member("a", a.url), member("b", b.url)])
    first = generate(url)
    assert first.status_code == 429  # the last candidate's answer passes through
    answer = generate(url)
    assert answer.status_code == 503
    assert answer.json()["error"]["code"] == "upstreams_unavailable"
    assert answer.headers["retry-after"] == "20"
    clock.now += 21
    b.answer = None
    assert generate(url).status_code == 200


def test_an_azure_member_gets_its_own_deployment(
    pooled: Any, doubles: list[UpstreamDouble]
) -> None:
    a = doubles[0]
    azure = {
        "name": "eastus",
        "kind": "azure",
        "endpoint": a.url,
        "api_key": UPSTREAM_KEY,
        "deployments": {"gpt-image-1": "img-eastus"},
    }
    url, _ = pooled([azure])
    assert generate(url).status_code == 200
    assert a.last.path == "/openai/deployments/img-eastus/images/generations"
    # The Azure form's deployment id is the model the pool routes on.
    answer = httpx.post(
        url + "/openai/deployments/gpt-image-1/images/generations?api-version=2025-04-01-preview",
        json={"prompt": "p"},
    )
    assert answer.status_code == 200
    assert a.last.path == "/openai/deployments/img-eastus/images/generations"


def test_healthz_metrics_and_the_banner_show_the_upstreams(
    doubles: list[UpstreamDouble], tmp_path: Any
) -> None:
    a = doubles[0]
    config = tmp_path / "proxy.toml"
    config.write_text(
        "[auth]\nopen = true\n"
        f'[[upstreams]]\nname = "a"\nkind = "openai"\nbase_url = "{a.url}/v1"\napi_key = "k"\n'
        "priority = 2\n"  # the dead one is always tried first, until it sits out
        f'[[upstreams]]\nname = "dead"\nkind = "openai"\nbase_url = "{closed_port()}/v1"\n'
        'api_key = "k"\n[pool]\nfailures_to_open = 1\ncooldown_min = 30\n'
        "[metrics]\nenabled = true\n[server]\nops_port = 0\n"
    )
    with running("--config", str(config), lines=7) as (url, banner):
        assert "a http://127.0.0.1:" in banner and "dead http://127.0.0.1:" in banner
        for _ in range(6):  # the dead one is tried once, then sits out
            assert generate(url).status_code == 200
        upstreams = httpx.get(url + "/healthz").json()["upstreams"]
        scraped = httpx.get(url + "/metrics").text
        ops = banner.split("Operations (/healthz details, metrics) on ", 1)[1].split()[0]
        assert httpx.get(ops + "/healthz").json()["upstreams"]["dead"]["state"] == "open"
    assert 'imagegen_proxy_upstream_state{upstream="a"} 0.0' in scraped
    assert 'imagegen_proxy_upstream_state{upstream="dead"} 3.0' in scraped
    assert 'imagegen_proxy_failovers_total{from="dead",reason="connect",to="a"} 1.0' in scraped
    assert upstreams["a"]["state"] == "up" and upstreams["a"]["kind"] == "openai"
    assert upstreams["dead"]["state"] == "open"
    assert 0 < upstreams["dead"]["cooling_seconds"] <= 30
    until = datetime.fromisoformat(upstreams["dead"]["until"])
    assert 0 < (until - datetime.now(UTC)).total_seconds() <= 31


def shared_pool(
    folder: Any, redis_url: str, a: UpstreamDouble, b: UpstreamDouble, extra: str = ""
) -> Any:
    """A config file: a pool of `a` then `b` (priorities 1 and 2), limits and cooldowns in
    the Redis at `redis_url`, open access."""
    config = folder / "proxy.toml"
    config.write_text(
        f'[auth]\nopen = true\n[limits]\nstorage = "{redis_url}"\n'
        f'[[upstreams]]\nname = "a"\nkind = "openai"\nbase_url = "{a.url}/v1"\n'
        'api_key = "k"\npriority = 1\n'
        f'[[upstreams]]\nname = "b"\nkind = "openai"\nbase_url = "{b.url}/v1"\n'
        'api_key = "k"\npriority = 2\n' + extra
    )
    return config


def test_two_processes_share_cooldowns_through_redis(
    doubles: list[UpstreamDouble], tmp_path: Any
) -> None:
    a, b, _ = doubles
    a.answer = error_json(429, RATE_LIMITED, [("retry-after", "30")])
    with redis_server() as (redis_url, _):
        config = shared_pool(tmp_path, redis_url, a, b)
        with (
            running("--config", str(config)) as (one, _),
            running("--config", str(config)) as (two, _),
        ):
            assert generate(one).status_code == 200  # a said 429: b answered

            def cooling_in_two() -> bool:
                upstreams = httpx.get(two + "/healthz").json()["upstreams"]
                return bool(upstreams["a"]["state"] == "cooling")

            until(cooling_in_two, within=10)  # generous: the news travels in milliseconds
            for _ in range(3):
                assert generate(two).status_code == 200
    assert (len(a.requests), len(b.requests)) == (1, 4)


def test_with_workers_the_ops_listener_shows_what_redis_shares(
    doubles: list[UpstreamDouble], tmp_path: Any
) -> None:
    a, b, _ = doubles
    a.answer = error_json(429, RATE_LIMITED, [("retry-after", "30")])
    with redis_server() as (redis_url, _):
        extra = "[metrics]\nenabled = true\n[server]\nops_port = 0\n"
        config = shared_pool(tmp_path, redis_url, a, b, extra)
        with running("--config", str(config), "--workers", "2", lines=8) as (url, banner):
            ops = banner.split("Operations (/healthz details, metrics) on ", 1)[1].split()[0]
            assert httpx.get(ops + "/healthz").json()["upstreams"]["a"]["state"] == "up"
            assert generate(url).status_code == 200  # a worker heard a's 429

            def cooling() -> bool:
                upstreams = httpx.get(ops + "/healthz").json()["upstreams"]
                return bool(upstreams["a"]["state"] == "cooling")

            until(cooling, within=10)  # generous: the news travels in milliseconds
            scraped = httpx.get(ops + "/metrics").text
    assert 'imagegen_proxy_upstream_state{upstream="a"} 2.0' in scraped
    assert 'imagegen_proxy_upstream_state{upstream="b"} 0.0' in scraped


def test_an_upload_fails_over_only_before_it_went_up(
    pooled: Any, doubles: list[UpstreamDouble]
) -> None:
    a, b, _ = doubles
    url, _ = pooled([member("dead", closed_port()), member("a", a.url, priority=2)])
    sdk = openai.OpenAI(base_url=url + "/v1", api_key=CLIENT_KEY, max_retries=0)
    image = ("a.png", b"\x89PNG" + b"x" * 100_000, "image/png")
    # Refused before a byte of the body left: the next upstream gets the whole upload.
    assert sdk.images.edit(image=image, prompt="p", model="gpt-image-1").data
    assert a.last.parts[-1] == ("image", "a.png", image[1])
    # Sent, then refused with a 503: the upload is gone, the client gets the answer.
    unavailable = {"message": "Busy.", "type": "server_error", "param": None, "code": None}
    b.answer = error_json(503, unavailable)
    url, _ = pooled([member("b", b.url), member("a", a.url, priority=2)])
    sdk = openai.OpenAI(base_url=url + "/v1", api_key=CLIENT_KEY, max_retries=0)
    with pytest.raises(openai.InternalServerError):
        sdk.images.edit(image=image, prompt="p", model="gpt-image-1")
    assert len(a.requests) == 1 and len(b.requests) == 1


def test_failovers_are_counted(pooled: Any, doubles: list[UpstreamDouble]) -> None:
    from prometheus_client import REGISTRY

    a, b, _ = doubles
    a.answer = error_json(
        503, {"message": "x", "type": "server_error", "param": None, "code": None}
    )
    url, _ = pooled(
        [member("busy", a.url), member("spare", b.url, priority=2)], metrics={"enabled": True}
    )
    labels = {"from": "busy", "to": "spare", "reason": "503"}
    before = REGISTRY.get_sample_value("imagegen_proxy_failovers_total", labels) or 0
    assert generate(url).status_code == 200
    after = REGISTRY.get_sample_value("imagegen_proxy_failovers_total", labels)
    assert after == before + 1


def test_the_sdk_lists_the_models_a_key_may_use(doubles: list[UpstreamDouble], pooled: Any) -> None:
    a, b, _ = doubles
    keys = [
        {"name": "all", "key": CLIENT_KEY},
        {"name": "one", "key": "sk-only-gpt-image-1", "models": ["gpt-image-1"]},
    ]
    url, _ = pooled(
        [
            member("a", a.url, models=["gpt-image-1", "dall-e-3"]),
            member("b", b.url, models=["gpt-image-1-mini"]),
        ],
        auth={"open": False},
        keys=keys,
    )
    listed = openai.OpenAI(base_url=url + "/v1", api_key=CLIENT_KEY).models.list()
    assert [model.id for model in listed] == ["dall-e-3", "gpt-image-1", "gpt-image-1-mini"]
    only = openai.OpenAI(base_url=url + "/v1", api_key="sk-only-gpt-image-1").models.list()
    assert [model.id for model in only] == ["gpt-image-1"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="sk-made-up").models.list()


def test_listed_models_carry_openais_shutdown_date(
    doubles: list[UpstreamDouble], pooled: Any
) -> None:
    a, _, _ = doubles
    url, _ = pooled([member("a", a.url, models=["gpt-image-1", "gpt-image-2.6-sunburst"])])
    listed = openai.OpenAI(base_url=url + "/v1", api_key=CLIENT_KEY).models.list()
    dates = {model.id: getattr(model, "shutdown_date", None) for model in listed}
    assert dates == {"gpt-image-1": "2026-10-23", "gpt-image-2.6-sunburst": None}
    assert "shutdown_date" in listed.data[1].model_dump()  # sent as null, not left out


def test_a_client_that_leaves_gives_back_its_slot_and_blames_no_upstream(
    pooled: Any, pools: list[Pool], doubles: list[UpstreamDouble]
) -> None:
    a = doubles[0]
    a.answer = stall()
    url, _ = pooled([member("a", a.url)], pool={"failures_to_open": 1})
    sock = raw_request(url, json_request_headers(b'{"prompt": "p"}'), b'{"prompt": "p"}')
    assert a.arrived.wait(10)
    sock.close()
    assert a.gone.wait(10)  # the proxy dropped the upstream request
    [pool] = pools
    until(lambda: pool.in_flight["a"] == 0, within=10)
    assert pool.state(pool.targets[0]) == ("up", None)

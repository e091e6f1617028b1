"""Prometheus metrics after real requests, in one process and across worker processes."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import prometheus_client
import pytest
from conftest import CLIENT_KEY, HostApp, proxy_config
from double import UpstreamDouble, error_json, held, partial, sse
from prometheus_client import REGISTRY
from starlette.routing import Route
from support import serve, until
from test_cli import running

from imagegen_proxy import ImageGenProxy, ProxyConfig
from imagegen_proxy.config import ConfigError
from imagegen_proxy.observe import metrics as metrics_module
from imagegen_proxy.observe.metrics import metrics_app
from imagegen_proxy.server.app import create_app

PATH = "/v1/images/generations"
KEYS = [{"name": "team-m", "key": CLIENT_KEY, "requests_per_minute": 3}]
AUTH = {"authorization": f"Bearer {CLIENT_KEY}"}
IMAGES = {"key": "team-m", "project": "", "operation": "generation"}


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Delta:
    """Metric values now, to compare with later: the registry is the process's, and other
    tests count in it too."""

    def __init__(self) -> None:
        self.before = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for metric in REGISTRY.collect()
            if metric.name.startswith("imagegen_proxy")
            for s in metric.samples
        }

    def __call__(self, name: str, **labels: str) -> float:
        return value(name, **labels) - self.before.get((name, tuple(sorted(labels.items()))), 0)


@pytest.fixture
def metered(start_proxy: Callable[..., str]) -> Callable[..., str]:
    def start(**options: object) -> str:
        return start_proxy(metrics={"enabled": True}, **options)

    return start


def test_requests_images_bytes_and_upstream_times_are_counted(
    metered: Callable[..., str], upstream: UpstreamDouble
) -> None:
    proxy = metered(auth={"open": False}, keys=KEYS)
    delta = Delta()
    client = openai.OpenAI(base_url=proxy + "/v1", api_key=CLIENT_KEY, max_retries=0)
    raw = client.images.with_raw_response.generate(model="gpt-image-1", prompt="p", n=3)
    requests = {
        "form": "openai",
        "operation": "generation",
        "key": "team-m",
        "model": "gpt-image-1",
        "status": "200",
    }
    assert delta("imagegen_proxy_requests_total", **requests) == 1
    assert delta("imagegen_proxy_images_total", **IMAGES, model="gpt-image-1") == 3
    assert delta("imagegen_proxy_relayed_bytes_total", key="team-m") == len(raw.content)
    assert delta("imagegen_proxy_upstream_ttfb_seconds_count", upstream="openai") == 1
    assert delta("imagegen_proxy_upstream_duration_seconds_count", upstream="openai") == 1
    assert delta("imagegen_proxy_upstream_ttfb_seconds_sum", upstream="openai") > 0
    assert value("imagegen_proxy_in_flight", key="team-m") == 0


def test_limits_and_upstream_failures_are_counted_by_kind(
    metered: Callable[..., str], upstream: UpstreamDouble
) -> None:
    proxy = metered(auth={"open": False}, keys=KEYS)
    delta = Delta()
    with httpx.Client(base_url=proxy, headers=AUTH) as client:
        upstream.answer = error_json(400, {"message": "no"})
        client.post(PATH, json={"prompt": "p"})
        upstream.answer = sse(partial(0), cut=True)
        client.post(PATH, json={"prompt": "p", "stream": True})
        client.post(PATH, json={"prompt": "p"})
        assert client.post(PATH, json={"prompt": "p"}).status_code == 429
    errors = "imagegen_proxy_upstream_errors_total"
    assert delta(errors, upstream="openai", kind="status") == 1
    assert delta(errors, upstream="openai", kind="mid_stream") == 2
    limit = {"key": "team-m", "limit": "requests_per_minute"}
    assert delta("imagegen_proxy_limited_total", **limit) == 1
    model = {"form": "openai", "operation": "generation", "key": "team-m", "model": ""}
    assert delta("imagegen_proxy_requests_total", **model, status="429") == 1
    # The two streams cut after their 200 were generated, and billed, upstream: spent.
    assert delta("imagegen_proxy_images_total", **IMAGES, model="") == 2


def test_a_dead_upstream_counts_as_a_connect_error(metered: Callable[..., str]) -> None:
    proxy = metered(openai={"base_url": "http://127.0.0.1:9/v1"})
    delta = Delta()
    assert httpx.post(proxy + PATH, json={"prompt": "p"}).status_code == 502
    assert delta("imagegen_proxy_upstream_errors_total", upstream="openai", kind="connect") == 1
    assert delta("imagegen_proxy_upstream_ttfb_seconds_count", upstream="openai") == 0


def test_generations_in_flight_are_a_gauge_per_key(
    metered: Callable[..., str], upstream: UpstreamDouble
) -> None:
    proxy = metered(auth={"open": False}, keys=[{"name": "team-g", "key": CLIENT_KEY}])
    release = threading.Event()
    upstream.answer = held(release)
    with ThreadPoolExecutor(2) as pool:
        posts = [
            pool.submit(httpx.post, proxy + PATH, json={"prompt": "p"}, headers=AUTH)
            for _ in range(2)
        ]
        deadline = time.monotonic() + 5
        while upstream.active < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert value("imagegen_proxy_in_flight", key="team-g") == 2
        release.set()
        assert [post.result().status_code for post in posts] == [200, 200]
    assert value("imagegen_proxy_in_flight", key="team-g") == 0


def test_label_values_from_clients_are_bounded() -> None:
    bounded = metrics_module._Bounded(3)
    assert [bounded(f"model-{i}") for i in range(5)] == [
        "model-0",
        "model-1",
        "model-2",
        "other",
        "other",
    ]
    assert bounded("model-1") == "model-1"  # the ones seen stay
    # Never an odd character, nor more than 64: made safe, not merged into "other".
    assert metrics_module._Bounded(10)('a"b\nc') == "a_b_c"
    assert metrics_module._Bounded(10)("x" * 65) == "x" * 64
    assert metrics_module._Bounded(10)("bot (svc_acct_1)") == "bot_svc_acct_1"
    assert metrics_module._Bounded(10)('"\n"') == "other"  # nothing left of it


def test_the_bundled_proxy_serves_metrics(upstream: UpstreamDouble) -> None:
    config = proxy_config(upstream, metrics={"enabled": True, "path": "/internal/metrics"})
    with serve(create_app(config)) as url:
        httpx.post(url + PATH, json={"prompt": "p", "model": "gpt-image-1"})
        scrape = httpx.get(url + "/internal/metrics")
    assert scrape.status_code == 200
    assert scrape.headers["content-type"].startswith("text/plain")
    line = (
        'imagegen_proxy_requests_total{form="openai",key="anonymous",model="gpt-image-1",'
        'operation="generation",'
    )
    assert line in scrape.text
    for name in (
        "imagegen_proxy_images_total",
        "imagegen_proxy_upstream_ttfb_seconds_bucket",
        "imagegen_proxy_upstream_duration_seconds_bucket",
        "imagegen_proxy_relayed_bytes_total",
        "imagegen_proxy_in_flight",
    ):
        assert name in scrape.text


def test_a_host_app_can_route_to_the_metrics_app(upstream: UpstreamDouble) -> None:
    host = HostApp()
    host.app.router.routes.insert(0, Route("/metrics", metrics_app()))
    config = proxy_config(upstream, metrics={"enabled": True})
    with serve(ImageGenProxy(host.app, config)) as url:
        httpx.post(url + PATH, json={"prompt": "p"})
        assert "imagegen_proxy_requests_total{" in httpx.get(url + "/metrics").text


def test_metrics_without_prometheus_client_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(metrics_module, "prometheus_client", None)
    monkeypatch.setattr(metrics_module.Metrics, "_instance", None)
    config = ProxyConfig.model_validate(
        {"openai": {"api_key": "k"}, "auth": {"open": True}, "metrics": {"enabled": True}}
    )
    with pytest.raises(ConfigError, match=r"imagegen-proxy\[metrics\]"):
        create_app(config)


@pytest.fixture
def workers_config(tmp_path: Path) -> Iterator[Path]:
    config = tmp_path / "proxy.toml"
    config.write_text("[metrics]\nenabled = true\n[mock]\ndelay = 0.3\n")
    yield config


def test_worker_processes_add_up_their_metrics(workers_config: Path, tmp_path: Path) -> None:
    directory = tmp_path / "prometheus"
    directory.mkdir()
    (directory / "counter_1.db").write_bytes(b"stale")  # a previous run's: must not count
    env = {"PROMETHEUS_MULTIPROC_DIR": str(directory)}
    args = ("--workers", "2", "--config", str(workers_config))
    with running(*args, env=env, lines=7) as (url, _):

        async def burst() -> None:
            # Connections at once, each held 0.3 s by the mock: the workers share them.
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                calls = [client.post(PATH, json={"prompt": f"p{i}"}) for i in range(8)]
                answers = await asyncio.gather(*calls)
            assert all(answer.status_code == 200 for answer in answers)

        def workers_seen() -> set[str]:
            return {re.sub(r"\D", "", path.name) for path in directory.glob("counter_*.db")}

        sent = 0
        while len(workers_seen()) < 2 and sent < 160:  # until both have served some
            asyncio.run(burst())
            sent += 8
        assert len(workers_seen()) == 2, "one worker took every connection"
        for _ in range(6):  # each scrape is answered by whichever worker accepts it
            with httpx.Client() as fresh:
                text = fresh.get(url + "/metrics").text
            total = sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("imagegen_proxy_requests_total{")
            )
            assert total == sent
            assert 'imagegen_proxy_in_flight{key="anonymous"} 0.0' in text
    # Stopped: each worker took its live gauge out of the sum; the counts stay.
    assert not list(directory.glob("gauge_livesum_*.db"))
    assert len(list(directory.glob("counter_*.db"))) == 2


def test_with_workers_the_ops_listener_adds_up_every_workers_metrics(tmp_path: Path) -> None:
    # No PROMETHEUS_MULTIPROC_DIR given: the command makes its own, and the ops listener
    # (started before it) must still read it.
    config = tmp_path / "proxy.toml"
    config.write_text("[metrics]\nenabled = true\n[server]\nops_port = 0\n")
    env = {"PROMETHEUS_MULTIPROC_DIR": ""}
    with running("--config", str(config), "--workers", "2", env=env, lines=8) as (url, banner):
        ops = banner.split("Operations (/healthz details, metrics) on ", 1)[1].split()[0]
        with httpx.Client(base_url=url, timeout=30) as client:
            for i in range(4):
                assert client.post(PATH, json={"prompt": f"p{i}"}).status_code == 200

        def counted() -> float:
            text = httpx.get(ops + "/metrics", timeout=10).text
            return sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("imagegen_proxy_requests_total{")
            )

        until(lambda: counted() == 4, within=10)


def test_strangers_cannot_spend_the_model_label_slots(metered: Callable[..., str]) -> None:
    proxy = metered(auth={"open": False}, keys=KEYS)
    with httpx.Client(base_url=proxy) as client:
        for i in range(150):
            body = {"prompt": "p", "model": f"stranger-model-{i}"}
            assert client.post(PATH, json=body).status_code == 401
    scraped = prometheus_client.generate_latest(REGISTRY).decode()
    assert "stranger-model" not in scraped  # before: 100 labels made, then "other"


def test_usage_above_the_reservation_is_kept_logged_and_counted(
    metered: Callable[..., str], upstream: UpstreamDouble, caplog: pytest.LogCaptureFixture
) -> None:
    # 1,000,000 output tokens at $30/1M: $30, against a reservation of about $0.0116.
    usage = {"total_tokens": 1_000_004, "input_tokens": 4, "output_tokens": 1_000_000}
    body = json.dumps({"created": 1, "data": [{"b64_json": "eA=="}], "usage": usage}).encode()

    async def answer(x: Any) -> None:
        await x.start(200, [("content-type", "application/json")])
        await x.body(body, more=False)

    upstream.answer = answer
    keys = [{"name": "team-m", "key": CLIENT_KEY, "budget_usd": 100.0}]
    proxy = metered(auth={"open": False}, keys=keys)
    delta = Delta()
    model = "gpt-image-2.6-sunburst"
    asked = {"prompt": "p", "model": model, "size": "1024x1024", "quality": "low"}
    assert httpx.post(proxy + PATH, json=asked, headers=AUTH).status_code == 200
    assert delta("imagegen_proxy_usage_over_reservation_total", model=model) == 1
    assert delta("imagegen_proxy_cost_usd_total", key="team-m", project="", model=model) == (
        pytest.approx(30.00002)  # kept as the upstream billed it: never under what was spent
    )
    assert "above its reservation" in caplog.text
    httpx.post(proxy + PATH, json={**asked, "quality": "high"}, headers=AUTH)
    assert delta("imagegen_proxy_usage_over_reservation_total", model=model) == 2

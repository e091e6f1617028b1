"""Failures on either side: clear OpenAI-shaped answers, upstream work cancelled, nothing leaked."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable

import httpx
import openai
import pytest
from conftest import CLIENT_KEY, HostApp, proxy_config
from double import UpstreamDouble, cut_json, error_json, partial, sse, stall
from support import json_request_headers, raw_request, serve

from imagegen_proxy import ImageGenProxy
from imagegen_proxy.upstream.targets import Upstreams
from imagegen_proxy.upstream.transport import AiohttpTransport


def sdk(proxy: str, **options: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy + "/v1", api_key=CLIENT_KEY, max_retries=0, **options)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_unreachable_upstream_is_502(start_proxy: Callable[..., str]) -> None:
    proxy = start_proxy(openai={"base_url": f"http://127.0.0.1:{closed_port()}/v1"})
    with pytest.raises(openai.InternalServerError) as failure:
        sdk(proxy).images.generate(prompt="p")
    assert failure.value.status_code == 502
    assert failure.value.code == "upstream_unreachable"
    assert failure.value.type == "server_error"


def test_upstream_silent_past_the_read_timeout_is_504_not_retried(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    upstream.answer = stall()
    proxy = start_proxy(openai={"read_timeout": 0.5})
    answer = httpx.post(proxy + "/v1/images/generations", json={"prompt": "p"})
    assert answer.status_code == 504
    assert answer.headers["x-should-retry"] == "false"
    assert answer.json()["error"]["code"] == "upstream_timeout"
    assert upstream.gone.wait(5)


def test_upstream_errors_pass_through_unchanged(proxy: str, upstream: UpstreamDouble) -> None:
    error = {
        "message": "Rate limit reached for images per minute.",
        "type": "requests",
        "param": None,
        "code": "rate_limit_exceeded",
    }
    upstream.answer = error_json(429, error, [("retry-after", "7"), ("x-request-id", "req_429")])
    with pytest.raises(openai.RateLimitError) as failure:
        sdk(proxy).images.generate(prompt="p")
    assert failure.value.body == error
    assert failure.value.request_id == "req_429"
    assert failure.value.response.headers["retry-after"] == "7"


def test_azure_content_filter_error_keeps_its_inner_error(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    error = {
        "message": "Your request was rejected as a result of our safety system.",
        "type": "invalid_request_error",
        "param": "prompt",
        "code": "content_policy_violation",
        "inner_error": {
            "code": "ResponsibleAIPolicyViolation",
            "content_filter_results": {"violence": {"filtered": True, "severity": "high"}},
        },
    }
    upstream.answer = error_json(400, error)
    proxy = start_proxy(openai=False, azure=True)
    client = openai.AzureOpenAI(
        azure_endpoint=proxy, api_key=CLIENT_KEY, api_version="2025-04-01-preview", max_retries=0
    )
    with pytest.raises(openai.BadRequestError) as failure:
        client.images.generate(model="dep", prompt="p")
    assert failure.value.body == error


def test_stream_request_refused_by_upstream_raises_in_the_sdk(
    proxy: str, upstream: UpstreamDouble
) -> None:
    error = {
        "message": "Invalid size.",
        "type": "invalid_request_error",
        "param": "size",
        "code": None,
    }
    upstream.answer = error_json(400, error)
    with pytest.raises(openai.BadRequestError, match="Invalid size"):
        sdk(proxy).images.generate(prompt="p", stream=True)


def test_upstream_cut_mid_json_aborts_instead_of_a_short_body(
    proxy: str, upstream: UpstreamDouble
) -> None:
    upstream.answer = cut_json()
    with pytest.raises(openai.APIConnectionError):
        sdk(proxy).images.generate(prompt="p")


def test_unexpected_internal_error_is_a_500_envelope(
    proxy: str,
    upstream: UpstreamDouble,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(Upstreams, "build", broken)
    answer = httpx.post(
        proxy + "/v1/images/generations",
        json={"prompt": "p"},
        headers={"authorization": f"Bearer {CLIENT_KEY}"},
    )
    assert answer.status_code == 500
    assert answer.json()["error"] == {
        "message": "The proxy failed to handle the request.",
        "type": "server_error",
        "param": None,
        "code": "internal_error",
    }
    assert "RuntimeError: boom" in caplog.text
    assert CLIENT_KEY not in caplog.text


def test_client_leaving_while_upstream_works_cancels_the_upstream(
    proxy: str, upstream: UpstreamDouble
) -> None:
    upstream.answer = stall()
    body = json.dumps({"prompt": "p"}).encode()
    sock = raw_request(proxy, json_request_headers(body), body)
    assert upstream.arrived.wait(5)
    sock.close()
    # 5 s: generous for a loaded CI machine, and far below the read and total timeouts
    # (600 s, 900 s) that would otherwise end the upstream request.
    assert upstream.gone.wait(5), "the upstream request was not cancelled"


def test_client_leaving_mid_stream_cancels_the_upstream(
    proxy: str, upstream: UpstreamDouble
) -> None:
    upstream.answer = sse(partial(0), hold=True)
    body = json.dumps({"prompt": "p", "stream": True}).encode()
    sock = raw_request(proxy, json_request_headers(body), body)
    received = b""
    while b"partial_image_index" not in received:
        received += sock.recv(65536)
    sock.close()
    assert upstream.gone.wait(5), "the upstream request was not cancelled"


def test_client_leaving_before_its_body_is_sent_reaches_nobody(
    proxy: str, upstream: UpstreamDouble
) -> None:
    headers = {"content-type": "application/json", "content-length": "100"}
    raw_request(proxy, headers, b'{"prompt"').close()
    # The next request on a fresh connection is served normally: nothing is stuck.
    assert sdk(proxy).images.generate(prompt="p").data
    assert len(upstream.requests) == 1


def test_lifespan_shutdown_closes_the_upstream_transport(upstream: UpstreamDouble) -> None:
    proxy = ImageGenProxy(HostApp().app, proxy_config(upstream))
    with serve(proxy, lifespan="on") as url:
        assert sdk(url).images.generate(prompt="p").data
        transport = proxy.transport
        assert isinstance(transport, AiohttpTransport) and not transport.closed
    assert transport.closed and proxy.transport is None


def test_a_given_http_client_is_used_and_never_closed(upstream: UpstreamDouble) -> None:
    seen: list[str] = []

    async def hook(request: httpx.Request) -> None:
        seen.append(str(request.url))

    client = httpx.AsyncClient(event_hooks={"request": [hook]})
    proxy = ImageGenProxy(HostApp().app, proxy_config(upstream), http_client=client)
    with serve(proxy, lifespan="on") as url:
        assert sdk(url).images.generate(prompt="p").data
    assert seen == [upstream.url + "/v1/images/generations"]
    assert not client.is_closed and proxy.transport is None


@pytest.mark.parametrize(
    ("choice", "kind"), [("httpx", httpx.AsyncHTTPTransport), ("aiohttp", AiohttpTransport)]
)
def test_the_chosen_transport_carries_the_requests(
    upstream: UpstreamDouble, choice: str, kind: type[httpx.AsyncBaseTransport]
) -> None:
    app = ImageGenProxy(HostApp().app, proxy_config(upstream, proxy={"transport": choice}))
    with serve(app) as proxy:
        assert sdk(proxy).images.generate(prompt="p").data
        assert type(app.transport) is kind


@pytest.mark.parametrize(("expiry", "reused"), [(0.3, False), (4.0, True)])
def test_idle_upstream_connections_are_kept_for_keepalive_expiry(
    start_proxy: Callable[..., str], upstream: UpstreamDouble, expiry: float, reused: bool
) -> None:
    proxy = start_proxy(proxy={"keepalive_expiry": expiry})
    client = sdk(proxy)
    client.images.generate(prompt="p")
    time.sleep(0.8)  # idle: longer than the short expiry, shorter than the upstream's 5 s
    client.images.generate(prompt="p")
    first, second = upstream.requests
    assert (first.client == second.client) is reused
